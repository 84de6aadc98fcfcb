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
