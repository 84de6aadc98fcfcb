"""`medvlsm serve` over real HTTP on localhost (uvicorn in a thread, the tiny model), its client and
the CLI's --server: the same masks as a local run, the geometry checked, and the security rules."""

import json
import threading
import time
import types
import urllib.error
import urllib.request

import numpy as np
import pytest
import SimpleITK as sitk
from fastapi import HTTPException
from conftest import assert_same_levels, blobs

from medvlsm import io, wire
from medvlsm.cli import main
from medvlsm.client import Client, ServerError
from medvlsm.engine import Engine
from medvlsm.errors import Cancelled, InputError
from medvlsm.postprocess import PostProcess
from medvlsm.request import plan
from medvlsm.models import load_model
from medvlsm.server import JobStore, ServerConfig, ServerJob, create_app, read_tokens
from medvlsm.volume import Volume

TOKENS = {"alice-token-0123456789": "alice", "bob-token-0123456789ab": "bob"}


class LiveServer:
    """uvicorn serving ``app`` on a free localhost port, in a thread, for the length of a test module."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = "http://127.0.0.1:%d" % self.server.servers[0].sockets[0].getsockname()[1]

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    config = ServerConfig(models={"tiny": str(tiny_model_dir)}, tokens=TOKENS, device="cpu",
                          max_upload_bytes=200_000, job_timeout_s=60)
    live = LiveServer(create_app(config))
    yield live
    live.stop()


def ct(shape=(6, 40, 44), seed=0):
    return Volume(blobs(shape, seed=seed), (0.8, 0.7, 2.5), (10.0, -20.0, 5.0),
                  np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], float))  # slices are not the array's first axis


def test_server_masks_equal_a_local_run_and_reprompts_use_its_cache(served, tiny_model):
    volume = ct()
    request = plan(volume, ["liver", "spleen"], plane="coronal", threshold=0.5, post=PostProcess(keep_largest=True))
    local = Engine(tiny_model, device="cpu").segment(volume, request)
    remote = Client(served.url, "alice-token-0123456789").segment(volume, request, "tiny")
    assert remote.grid is volume and remote.prompts == local.prompts == ["liver", "spleen"]
    np.testing.assert_array_equal(remote.masks(), local.masks())  # the same bytes as here
    assert_same_levels(remote.probabilities, local.probabilities)  # the result's own uint8 on the wire
    for t in (0.2, 0.5, 0.8):  # re-cut at any threshold: a local cut, up to the probability's rounding
        differ = remote.masks(t) != local.masks(t, request.post)
        assert not differ.any() or np.abs(local.probabilities[differ] - t * 255).max() <= 1
    again = Client(served.url, "alice-token-0123456789").segment(volume, plan(volume, ["kidney"], plane="coronal"))
    assert again.from_cache  # the volume was held and its image features cached: the decoder only


def test_cancel_stops_the_run_on_the_server(served):
    client = Client(served.url, "alice-token-0123456789")
    volume = ct((60, 40, 44), seed=3)
    calls = []
    with pytest.raises(Cancelled):
        client.segment(volume, plan(volume, ["liver"]), progress=lambda d, t: calls.append(d),
                       cancel=lambda: True)


def _call(url, method="GET", body=None, token=None, content_type="application/json"):
    headers = {"Content-Type": content_type, **({"Authorization": f"Bearer {token}"} if token else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers, method=method), timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_no_or_a_wrong_token_is_401_and_oversize_is_413(served):
    assert _call(served.url + "/models")[0] == 401
    assert _call(served.url + "/models", token="alice-token-012345678X")[0] == 401
    assert json.loads(_call(served.url + "/models", token="bob-token-0123456789ab")[1])["models"] == ["tiny"]
    big = Volume(np.random.default_rng(0).integers(0, 4000, (40, 64, 64)).astype(np.int16))  # noise: ~250 kB gzip
    status, body = _call(f"{served.url}/volumes/{big.fingerprint()}", "PUT", wire.encode(big),
                         "alice-token-0123456789", "application/octet-stream")
    assert status == 413 and b"accepts" in body


def test_malformed_requests_are_422_with_one_line(served):
    client = Client(served.url, "alice-token-0123456789")
    volume = ct()
    key = client.upload(volume)
    request = json.loads(plan(volume, ["liver"], cache_key=key).to_json())
    for bad, reason in (({"volume": key, "request": {**request, "plane": "oblique"}}, b"plane"),
                        ({"volume": key, "request": request, "model": "/etc/passwd"}, b"not served here"),
                        ({"volume": key, "request": request, "model": "../models/tiny"}, b"not served here"),
                        ({"volume": key}, b"request: Field required"),
                        ({"volume": key, "request": {**request, "shape": [1, 2, 3]}}, b"planned for")):
        status, body = _call(served.url + "/jobs", "POST", json.dumps(bad).encode(), "alice-token-0123456789")
        assert status == 422 and reason in body and b"\n" not in json.loads(body)["detail"].encode()
    status, body = _call(f"{served.url}/volumes/{key}", "PUT", b"not a volume", "alice-token-0123456789")
    assert status == 422 and b"NRRD" in body


def test_two_clients_never_see_each_others_volumes_or_jobs(served):
    alice, bob = Client(served.url, "alice-token-0123456789"), Client(served.url, "bob-token-0123456789ab")
    volume = ct(seed=5)
    job = alice.start(volume, plan(volume, ["liver"]))
    assert _call(f"{served.url}/volumes/{volume.fingerprint()}", "HEAD", token="bob-token-0123456789ab")[0] == 404
    for path in (f"/jobs/{job}", f"/jobs/{job}/masks"):
        assert _call(served.url + path, token="bob-token-0123456789ab")[0] == 404
    assert _call(f"{served.url}/jobs/{job}", "DELETE", token="bob-token-0123456789ab")[0] == 404
    with pytest.raises(ServerError, match="404"):  # bob's request on alice's volume: he must upload it himself
        key = volume.fingerprint()
        body = json.dumps({"volume": key, "request": json.loads(plan(volume, ["x"], cache_key=key).to_json())})
        bob._call("POST", "/jobs", body.encode())


def test_the_openapi_schema_is_published(served):
    status, body = _call(served.url + "/openapi.json")
    paths = json.loads(body)["paths"]
    assert status == 200 and {"/jobs", "/volumes/{key}", "/jobs/{job_id}"} <= set(paths)


def test_cli_segment_through_the_server_writes_what_a_local_run_writes(served, tiny_model_dir, tmp_path, capsys):
    volume = ct()
    sitk.WriteImage(io.volume_to_sitk(volume), str(tmp_path / "ct.nrrd"))
    (tmp_path / "token").write_text("alice-token-0123456789\n", encoding="utf-8")
    common = ["--quiet", "segment", str(tmp_path / "ct.nrrd"), "-p", "liver", "-p", "spleen", "--axis", "sagittal"]
    assert main(common + ["--model", str(tiny_model_dir), "--device", "cpu", "-o", str(tmp_path / "local.nii.gz")]) == 0
    assert main(common + ["--server", served.url, "--token-file", str(tmp_path / "token"), "--model", "tiny",
                          "-o", str(tmp_path / "remote.nii.gz")]) == 0
    a, b = (sitk.ReadImage(str(tmp_path / f"{n}.nii.gz")) for n in ("local", "remote"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    assert a.GetDirection() == b.GetDirection() and a.GetOrigin() == b.GetOrigin()
    assert main(common + ["--server", served.url, "-o", str(tmp_path / "x.nii.gz")]) == 2
    assert "401" in capsys.readouterr().err


def test_serving_beyond_this_computer_needs_tokens(tmp_path):
    with pytest.raises(InputError, match="token"):
        ServerConfig(models={"tiny": "x"}, host="0.0.0.0").check()
    (tmp_path / "tokens").write_text("# clients\nalice short\n", encoding="utf-8")
    with pytest.raises(InputError, match="16 or more"):
        read_tokens(tmp_path / "tokens")
    (tmp_path / "tokens").write_text("alice a-token-of-enough-length\n", encoding="utf-8")
    assert read_tokens(tmp_path / "tokens") == {"a-token-of-enough-length": "alice"}


def test_progress_streams_as_server_sent_events(served):
    client = Client(served.url, "alice-token-0123456789")
    volume = ct((12, 40, 44), seed=7)
    job = client.start(volume, plan(volume, ["liver"]))
    call = urllib.request.Request(f"{served.url}/jobs/{job}/events",
                                  headers={"Authorization": "Bearer alice-token-0123456789"})
    with urllib.request.urlopen(call, timeout=60) as stream:
        events = [json.loads(line[6:]) for line in stream.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1]["state"] == "done" and events[-1]["done"] == events[-1]["total"] > 1
    assert [e["done"] for e in events] == sorted(e["done"] for e in events)


def test_a_stalled_upload_is_dropped_with_408(tiny_model_dir):
    import socket

    live = LiveServer(create_app(ServerConfig(models={"tiny": str(tiny_model_dir)}, device="cpu",
                                              upload_idle_timeout_s=0.5)))
    try:
        host, port = live.url[len("http://"):].split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"PUT /volumes/" + b"ab" * 16 + b" HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n" + b"0" * 10)
            assert s.recv(200).startswith(b"HTTP/1.1 408")
    finally:
        live.stop()


def test_one_client_cannot_queue_the_gpu_away_and_finished_results_are_bounded(tiny_model_dir):
    """At most ``max_jobs_per_client`` runs of one client wait or run (429 beyond, others unaffected);
    a finished result waits for its client, who frees it on fetching; the oldest go past the budget."""
    gate = threading.Event()
    engine = Engine(load_model(tiny_model_dir), device="cpu")

    def held_runner(job, model):  # the real engine, started only when the test opens the gate
        gate.wait(30)
        return engine.segment(job.volume, job.request, progress=job.report, cancel=job.cancelled)

    config = ServerConfig(models={"tiny": str(tiny_model_dir)}, tokens=TOKENS, device="cpu", max_jobs_per_client=2)
    app = create_app(config, runner=held_runner)
    live = LiveServer(app)
    try:
        alice, bob = Client(live.url, "alice-token-0123456789"), Client(live.url, "bob-token-0123456789ab")
        volume = ct(seed=11)
        first = [alice.start(volume, plan(volume, [p])) for p in ("liver", "spleen")]
        with pytest.raises(ServerError, match="429.*wait for one to finish"):
            alice.start(volume, plan(volume, ["kidney"]))
        bob_job = bob.start(volume, plan(volume, ["kidney"]))  # another client is not held up by alice
        gate.set()
        for job in first:
            while json.loads(alice._call("GET", f"/jobs/{job}")[1])["state"] != "done":
                time.sleep(0.02)
        result = alice.segment(volume, plan(volume, ["kidney"]))  # a place is free again once hers finished
        assert result.prompts == ["kidney"]
        assert len(app.state.jobs) == 3  # alice's first two and bob's wait to be fetched; the fetched one is gone
        for job in first:
            alice._call("DELETE", f"/jobs/{job}")
            assert _call(f"{live.url}/jobs/{job}", token="alice-token-0123456789")[0] == 404
        assert _call(f"{live.url}/jobs/{bob_job}", token="bob-token-0123456789ab")[0] == 200
    finally:
        gate.set()
        live.stop()

    store = JobStore(max_per_client=8, max_result_bytes=3 * 4 * 1000, ttl_s=3600)
    ids = []
    for n in range(5):  # five finished results of 4 kB against a 12 kB budget
        job = ServerJob("alice", None, plan(ct(), ["x"]), deadline=time.monotonic() + 60)
        job.run(lambda job, model: types.SimpleNamespace(probabilities=np.zeros(1000, np.float32)), "tiny")
        ids.append(store.add(job))
    assert len(store) == 3
    with pytest.raises(HTTPException):
        store.get(ids[0], "alice")
    assert store.get(ids[-1], "alice").state == "done"
    expired = JobStore(max_per_client=8, max_result_bytes=1 << 30, ttl_s=0.0)
    job_id = expired.add(job)
    time.sleep(0.01)
    assert len(expired) == 0  # past its time-to-live even within the budget
    with pytest.raises(HTTPException):
        expired.get(job_id, "alice")
