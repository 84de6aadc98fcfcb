"""`medvlsm serve --replicas 2` on a local Ray (two CPU replicas of the tiny model): the same API and
masks as one server, and every re-prompt of a volume reaches the replica that cached its features."""

import socket

import numpy as np
import pytest
from conftest import blobs

from medvlsm.client import Client
from medvlsm.engine import Engine
from medvlsm.request import plan
from medvlsm.server import ServerConfig
from medvlsm.volume import Volume


@pytest.fixture(scope="module")
def ray_url(tiny_model_dir):
    import ray
    from ray import serve

    from medvlsm.ray_serve import build

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServerConfig(models={"tiny": str(tiny_model_dir)}, tokens={"ray-client-token-0123": "clinic"},
                              device="cpu")
        serve.run(build(config, replicas=2), name="medvlsm", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_answer_like_one_engine_and_keep_each_volume_on_its_replica(ray_url, tiny_model):
    client = Client(ray_url, "ray-client-token-0123")
    local = Engine(tiny_model, device="cpu")
    replicas = set()
    for seed in range(4):  # four volumes spread over two replicas
        volume = Volume(blobs((4, 32, 36), seed=seed), (0.8, 0.8, 2.0))
        first = client.segment(volume, plan(volume, ["liver"]))
        assert not first.from_cache
        np.testing.assert_array_equal(first.masks(), local.segment(volume, plan(volume, ["liver"])).masks())
        for prompt in ("spleen", "left kidney"):  # random routing would miss the cache about half the time
            again = client.segment(volume, plan(volume, [prompt]))
            assert again.from_cache and again.device == first.device  # the same replica
        replicas.add(first.device)
    assert len(replicas) == 2  # a new volume goes to the replica holding fewer


def test_the_router_sends_a_reprompt_to_the_volume_s_replica_the_moment_its_first_run_was_routed():
    """The router alone, in this process. A double for Ray's RunningReplica (it needs a live actor;
    the router reads only its replica_id). Ray's multiplexed routing learned where a volume lives from
    the replica through the controller, so a quick re-prompt could go to the other replica (CI did)."""
    import asyncio
    from types import SimpleNamespace

    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
    from ray.serve.request_router import PendingRequest, ReplicaID

    from medvlsm.ray_serve import VolumeAffinityRouter

    deployment = DeploymentID(name="Segmenter", app_name="medvlsm")
    router = VolumeAffinityRouter(deployment_id=deployment, handle_source=DeploymentHandleSource.UNKNOWN)
    a, b, c = (SimpleNamespace(replica_id=ReplicaID(unique_id=name, deployment_id=deployment)) for name in "abc")

    async def run(volume, routed_to=None, replicas=(a, b)):
        request = PendingRequest(args=[], kwargs={}, metadata=RequestMetadata(
            request_id=volume, internal_request_id=volume, multiplexed_model_id=volume))
        ranks = await router.choose_replicas(list(replicas), request)
        chosen = routed_to or ranks[0][0]
        router.on_request_routed(request, chosen.replica_id, None)
        return [[replica.replica_id.unique_id for replica in rank] for rank in ranks]

    async def scenario():
        assert await run("first", routed_to=a) == [["a", "b"], []]  # nobody holds anything: both equal
        assert await run("first") == [["a"], ["b"]]  # at once, no news to wait for; b only if a is full
        assert await run("second") == [["b"], ["a"]]  # a new volume: the replica holding fewest
        assert await run("first", routed_to=b) == [["a"], ["b"]]  # a full: b ran it once...
        assert await run("first") == [["a"], ["b"]]  # ...but the volume stays where its features are
        router.on_replica_actor_died(a.replica_id)  # Ray starts c in its place
        assert await run("first", replicas=(b, c)) == [["c"], ["b"]]  # encoded again where fewest are

    asyncio.run(scenario())
