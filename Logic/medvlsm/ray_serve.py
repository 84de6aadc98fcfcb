"""``medvlsm serve --replicas N``: the same HTTP API on Ray Serve, one model replica per GPU.

Two deployments:

- ``Ingress`` (one replica): the FastAPI app of ``server.py`` — tokens, uploads, the volume store,
  jobs, results. Volumes and jobs stay here, so every call of a client (upload, run, poll, fetch)
  needs no affinity at all.
- ``Segmenter`` (N replicas, each one GPU or CPU slot): an engine per served model with its image-
  feature cache. A run is sent with the volume's key as its *multiplexed model id*, and
  ``VolumeAffinityRouter`` (in the ingress, the only caller) sends every run of a volume to the
  replica that ran its first one, and a new volume to the replica holding fewest. So a radiologist's
  re-prompts reach the replica that cached their volume's features and run the decoder only, while
  different volumes spread over the replicas. Ray's own multiplexed routing was the first choice; it
  learns where an id lives from the replicas through the controller, and a re-prompt sent before
  that news arrived (a loaded machine, a quick radiologist) went to the other replica and encoded
  the volume again. A shared feature cache was the other alternative; it would move ~100 MB of
  features per volume between machines on every re-prompt, which is what the cache exists to avoid.

Multi-node: start Ray on each machine (``ray start --head`` on one, ``ray start --address HEAD:6379``
on the others) and run ``medvlsm serve --replicas N --ray-address auto --gpus-per-replica 1`` on the
head. Progress on Ray arrives as one step (done); cancel stops a run Ray has not finished.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import FIFOMixin, RequestRouter

from .errors import Cancelled
from .server import ServerConfig, create_app

POLL_S = 0.05
APP = "medvlsm"


class Segmenter:
    """One replica: engines for the served models, feature caches keyed by volume."""

    def __init__(self, config: ServerConfig):
        from .server import LocalEngines

        self.engines = LocalEngines(config)

    async def segment(self, volume, request, model: str):
        # in a thread: the replica's event loop keeps answering Ray (health checks, cancellation)
        result = await asyncio.to_thread(self.engines.engine(model).segment, volume, request)
        result.device = f"{result.device}, replica {serve.get_replica_context().replica_id.unique_id}"
        return result


class VolumeAffinityRouter(FIFOMixin, RequestRouter):
    """Ray Serve request router (``ray.serve.request_router``, alpha; ``RequestRouterConfig`` since Ray 2.48, ray-project/ray#53870): a volume's runs
    go to the replica that ran its first one, which holds its image features; a new volume goes to the
    replica that holds fewest volumes. Where a replica lives is known here at the moment a run is
    routed, so a re-prompt sent right after the first answer cannot miss it. A busy or dead holder
    falls back to the other replicas (the run is right, only slower: it encodes the volume again)."""

    REMEMBERED = 4096  # volumes; each replica's engine keeps fewer features than this in its cache

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.holders: OrderedDict[str, object] = OrderedDict()  # volume key -> ReplicaID, oldest first

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if pending_request is None:
            return [candidate_replicas]
        pending_request.routing_context.should_backoff = True  # all full: wait before trying again
        holder = self.holders.get(pending_request.metadata.multiplexed_model_id)
        held = [replica for replica in candidate_replicas if replica.replica_id == holder]
        others = [replica for replica in candidate_replicas if replica.replica_id != holder]
        if held:
            return [held, others]
        volumes = Counter(self.holders.values())
        fewest = min((volumes[replica.replica_id] for replica in others), default=0)
        return [[r for r in others if volumes[r.replica_id] == fewest],
                [r for r in others if volumes[r.replica_id] != fewest]]

    def on_request_routed(self, pending_request, replica_id, result):
        volume = pending_request.metadata.multiplexed_model_id
        if volume and volume not in self.holders:  # a busy holder's overflow does not move the volume
            self.holders[volume] = replica_id
            while len(self.holders) > self.REMEMBERED:
                self.holders.popitem(last=False)
        elif volume:
            self.holders.move_to_end(volume)

    def on_replica_actor_died(self, replica_id):
        super().on_replica_actor_died(replica_id)
        for volume in [v for v, holder in self.holders.items() if holder == replica_id]:
            del self.holders[volume]


class RayRunner:
    """``runner(job, model)`` for the ingress: the run goes to the replica that holds the volume."""

    def __init__(self):
        self.segmenter = None

    def __call__(self, job, model: str):
        if self.segmenter is None:  # resolved in the ingress replica, once Ray Serve runs the application
            self.segmenter = serve.get_deployment_handle("Segmenter", app_name=APP)
        response = self.segmenter.options(multiplexed_model_id=job.request.volume).segment.remote(
            job.volume, job.request, model)
        while True:
            if job.cancelled():
                response.cancel()
                raise Cancelled()
            try:
                result = response.result(timeout_s=POLL_S)
            except TimeoutError:
                continue
            job.report(*[job.request.slices[1] - job.request.slices[0]] * 2)
            return result


def build(config: ServerConfig, replicas: int, gpus_per_replica: float = 0.0):
    """The Ray Serve application: ``serve.run(build(...), name=APP)``. The FastAPI app is built in the
    ingress replica (it holds threads and locks, which do not travel)."""

    @serve.deployment(name="Ingress")
    @serve.ingress(lambda: create_app(config, runner=RayRunner()))
    class Ingress:
        def __init__(self, segmenter):
            self.segmenter = segmenter  # binds the Segmenter into the application; runs use its handle by name

    segmenter = serve.deployment(
        Segmenter, name="Segmenter", num_replicas=replicas,
        ray_actor_options={"num_gpus": gpus_per_replica, "num_cpus": 1},
        request_router_config=RequestRouterConfig(request_router_class=VolumeAffinityRouter))
    return Ingress.bind(segmenter.bind(config))


def run(config: ServerConfig, port: int, replicas: int, *, address: str | None = None, gpus_per_replica=0.0):
    """Start (or join, ``address``) Ray and serve until interrupted."""
    import ray

    ray.init(address=address, include_dashboard=False, ignore_reinit_error=True)
    serve.start(http_options={"host": config.host, "port": port})
    serve.run(build(config, replicas, gpus_per_replica), name=APP, route_prefix="/")
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
