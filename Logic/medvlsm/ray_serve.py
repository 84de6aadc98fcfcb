"""``medvlsm serve --replicas N``: the same HTTP API on Ray Serve, one model replica per GPU.

Two deployments:

- ``Ingress`` (one replica): the FastAPI app of ``server.py`` — tokens, uploads, the volume store,
  jobs, results. Volumes and jobs stay here, so every call of a client (upload, run, poll, fetch)
  needs no affinity at all.
- ``Segmenter`` (N replicas, each one GPU or CPU slot): an engine per served model with its image-
  feature cache. A run is sent with the volume's key as Ray Serve's *multiplexed model id*; Ray routes
  an id to the replica that already holds it (``serve.multiplexed``) and to the least loaded one
  otherwise. So a radiologist's re-prompts reach the replica that cached their volume's features and
  run the decoder only, while different volumes spread over the replicas. A shared feature cache was
  the alternative; it would move ~100 MB of features per volume between machines on every re-prompt,
  which is what the cache exists to avoid.

Multi-node: start Ray on each machine (``ray start --head`` on one, ``ray start --address HEAD:6379``
on the others) and run ``medvlsm serve --replicas N --ray-address auto --gpus-per-replica 1`` on the
head. Progress on Ray arrives as one step (done); cancel stops a run Ray has not finished.
"""

from __future__ import annotations

import asyncio
import time

from ray import serve

from .errors import Cancelled
from .server import ServerConfig, create_app

POLL_S = 0.05
APP = "medvlsm"


class Segmenter:
    """One replica: engines for the served models, feature caches keyed by volume."""

    def __init__(self, config: ServerConfig):
        from .server import LocalEngines

        self.engines = LocalEngines(config).engines

    @serve.multiplexed(max_num_models_per_replica=64)
    async def _holds(self, volume_key: str) -> str:
        """Registers that this replica has (or is about to cache) the volume's features."""
        return volume_key

    async def segment(self, volume, request, model: str):
        await self._holds(serve.get_multiplexed_model_id())
        # in a thread: the replica's event loop keeps answering Ray (health checks, cancellation)
        result = await asyncio.to_thread(self.engines[model].segment, volume, request)
        result.device = f"{result.device}, replica {serve.get_replica_context().replica_id.unique_id}"
        return result


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

    segmenter = serve.deployment(Segmenter, name="Segmenter", num_replicas=replicas,
                                 ray_actor_options={"num_gpus": gpus_per_replica, "num_cpus": 1})
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
