"""`medvlsm serve` against a hostile client holding a valid token: the real server (`medvlsm serve`
in its own process, the tiny model, its log in a file, its memory read from /proc) over real HTTP
on 127.0.0.1. Uploads that name server files, decompression bombs of each accepted encoding, every
request field with wrong types and values, caps, Host and Origin headers, log injection, the token
file's life and per-client caches. Every answer to a client is a 4xx with one line — never a 500."""

import gzip
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import blobs
from test_server import LiveServer

from medvlsm import wire
from medvlsm.client import Client
from medvlsm.request import MAX_PROMPT_CHARS, MAX_PROMPTS, plan
from medvlsm.server import ServerConfig, create_app
from medvlsm.volume import Volume

ALICE, BOB = "alice-token-0123456789", "bob-token-0123456789ab"
MAX_UPLOAD_MB, MAX_VOXELS, MAX_VOLUME_MB = 1, 1_000_000, 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``medvlsm serve`` as an operator starts it, stderr (its log) into a file."""

    def __init__(self, folder: Path, model_dir, *options):
        self.log_path = folder / "server.log"
        self.tokens = folder / "tokens"
        self.tokens.write_text(f"alice {ALICE}\nbob {BOB}\n", encoding="utf-8")
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "medvlsm.cli", "serve", "--model", str(model_dir), "--device", "cpu",
                 "--port", str(port), "--token-file", str(self.tokens), *options],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 120
        while call(self.url + "/models", token=ALICE, timeout=2)[0] != 200:
            assert self.process.poll() is None and time.monotonic() < deadline, self.log()
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def peak_rss_mb(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 1024

    def stop(self):
        self.process.terminate()
        self.process.wait(20)


def call(url, method="GET", body=None, token=ALICE, content_type="application/json", headers=None, timeout=30):
    headers = {"Content-Type": content_type, **({"Authorization": f"Bearer {token}"} if token else {}),
               **(headers or {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers, method=method), timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    live = ServerProcess(tmp_path_factory.mktemp("hostile"), tiny_model_dir, "--max-upload-mb", str(MAX_UPLOAD_MB),
                         "--max-voxels", str(MAX_VOXELS), "--max-volume-mb", str(MAX_VOLUME_MB),
                         "--upload-idle-timeout", "2")
    yield live
    live.stop()


def one_line(status, body, *statuses):
    """The answer is one of ``statuses`` with a one-line JSON reason."""
    assert status in statuses, (status, body[:300])
    detail = json.loads(body)["detail"]
    assert isinstance(detail, str) and "\n" not in detail and len(detail) < 700, detail
    return detail


# ---- uploads -------------------------------------------------------------------------------------

HEADER = ["type: int16", "dimension: 3", "space: left-posterior-superior", "sizes: 8 8 4",
          "space directions: (1,0,0) (0,1,0) (0,0,2)", "kinds: domain domain domain", "endian: little",
          "encoding: raw", "space origin: (0,0,0)"]
DATA = np.arange(256, dtype="<i2").tobytes()


def nrrd(lines, data=b"") -> bytes:
    return ("NRRD0004\n" + "\n".join(lines) + "\n\n").encode() + data


def with_field(name, value, lines=HEADER):
    kept = [line for line in lines if not line.startswith(name + ":")]
    return kept + ([f"{name}: {value}"] if value is not None else [])


def put(server, body, key="ab" * 16, **kw):
    return call(f"{server.url}/volumes/{key}", "PUT", body, content_type="application/octet-stream", **kw)


def test_the_wire_format_round_trips_volumes_rgb_and_layers():
    volume = Volume(blobs((5, 12, 14)), (0.7, 0.8, 2.0), (1.0, -2.0, 3.0), np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], float))
    limits = wire.Limits(10**6, 10**7)
    grid, array, facts = wire.decode(wire.encode(volume, fields={"model": "x"}), limits)
    assert grid.same_grid(volume) and array.dtype == np.int16 and facts == {"model": "x"}
    np.testing.assert_array_equal(array, volume.array)
    rgb = Volume(np.random.default_rng(0).integers(0, 255, (2, 6, 7, 3)).astype(np.uint8))
    np.testing.assert_array_equal(wire.decode(wire.encode(rgb), limits)[1], rgb.array)
    layers = np.random.default_rng(1).random((3,) + volume.shape).astype(np.float32)
    grid, array, _ = wire.decode(wire.encode(volume, layers), limits)
    assert grid.same_grid(volume) and array.shape == layers.shape
    np.testing.assert_array_equal(array, layers)
    big_endian = nrrd(with_field("endian", "big"), np.arange(256, dtype=">i2").tobytes())
    np.testing.assert_array_equal(wire.decode(big_endian, limits)[1].ravel(), np.arange(256))  # native order


def test_an_upload_naming_a_server_file_is_refused_before_anything_is_opened(server, tmp_path):
    secret = tmp_path / "secret.raw"
    secret.write_bytes(DATA)  # exactly what the header declares: a server that reads it answers 200
    key = wire.decode(nrrd(HEADER, DATA), wire.Limits(10**6, 10**6))[0].fingerprint()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it would block the server for ever
    details = []
    for lines in (HEADER + [f"data file: {secret}"], HEADER + [f"datafile: {secret}"],
                  HEADER + ["data file: /etc/passwd"], HEADER + ["data file: /no/such/file"],
                  HEADER + ["data file: LIST", str(secret)], HEADER + [f"data file: {fifo}"],
                  HEADER + ["data file: /dev/zero"], HEADER + ["line skip: 1"], HEADER + ["byte skip: -1"],
                  HEADER + ["lineskip: 1"], HEADER + ["byteskip: 10"]):
        status, body = put(server, nrrd(lines), key, timeout=10)
        detail = one_line(status, body, 422)
        assert "not accepted" in detail and str(tmp_path) not in detail and "passwd" not in detail
        assert "FileNotFound" not in detail and not re.search(r"\d", detail)  # no fact (size) of any server file
        details.append(detail)
    assert details[2] == details[3]  # an existing and a missing path read the same: no oracle
    assert call(f"{server.url}/volumes/{key}", "HEAD")[0] == 404  # nothing was stored


def _gzip_stream(total: int) -> bytes:
    """``total`` zero bytes, gzip-compressed in chunks (the test never holds them)."""
    squeeze = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk, out = bytes(1 << 20), []
    for _ in range(total >> 20):
        out.append(squeeze.compress(chunk))
    return b"".join(out) + squeeze.flush()


def test_bombs_are_refused_within_the_memory_budget(server):
    before = server.peak_rss_mb()
    bomb = _gzip_stream(400 << 20)  # 400 MB of zeros in ~400 kB, below --max-upload-mb
    assert len(bomb) < MAX_UPLOAD_MB << 20
    gz = with_field("encoding", "gzip")
    cases = {
        "gzip bomb": (nrrd(gz, bomb), 422, "inflates to more than"),
        "declared beyond the voxels": (nrrd(with_field("sizes", "50000 50000 800", gz), bomb[:1000]), 413, "--max-voxels"),
        "doubles beyond the bytes": (nrrd(with_field("sizes", "100 100 90", with_field("type", "double", gz)),
                                          bomb[:1000]), 413, "--max-volume-mb"),  # 900,000 voxels, 7 MB
        "bzip2": (nrrd(with_field("encoding", "bzip2"), b"BZh9" + bytes(100)), 422, "not gzip or raw"),
        "ascii": (nrrd(with_field("encoding", "ascii"), b"1 2 3\n" * 100), 422, "not gzip or raw"),
        "gzip cut short": (nrrd(gz, gzip.compress(DATA)[:-12]), 422, "ends short"),
        "bytes after the gzip data": (nrrd(gz, gzip.compress(DATA) + b"more"), 422, "follow"),
        "raw short": (nrrd(HEADER, DATA[:-2]), 422, "raw data"),
        "int64": (nrrd(with_field("type", "int64"), DATA * 4), 422, "voxel type"),
        "no end of header": (b"NRRD0004\n" + b"type: int16\n" * 10000, 422, "header"),
        "not ascii": (nrrd(HEADER + ["content: \xff"]), 422, "ASCII"),
    }
    for name, (body, expected, words) in cases.items():
        status, answer = put(server, body)
        assert words in one_line(status, answer, expected), name
    grew = server.peak_rss_mb() - before
    assert grew < 64, f"the server's peak memory grew by {grew:.0f} MB"  # the bomb alone would be 400 MB


def test_an_aborted_upload_is_one_log_line(server):
    host, port = server.url[len("http://"):].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"PUT /volumes/{'cd' * 16} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {ALICE}\r\n"
                  "Content-Length: 100000\r\n\r\n".encode() + bytes(10))
    deadline = time.monotonic() + 10
    while "aborted" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "An upload was aborted by its client after" in server.log()
    assert "Traceback" not in server.log()


# ---- requests ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def held(server):
    """A volume alice has uploaded, and the request JSON a local plan writes for it."""
    volume = Volume(blobs((6, 20, 22), seed=4), (0.8, 0.7, 2.5))
    key = Client(server.url, ALICE).upload(volume)
    return key, json.loads(plan(volume, ["liver"], cache_key=key).to_json())


def _bad_requests(request):
    """``(field, value)``: each a request that a local ``plan`` would refuse, or of the wrong type."""
    window = request["window"]
    yield from [("threshold", v) for v in ("0.5", [0.5], True, 0, 1, 1.5, -0.1, {"v": 1})]
    yield from [("slices", v) for v in (["0", "3"], [0, 1, 2], [0.0, 3.0], [5, 2], [0, 10_000], [-1, 3], None, "0:3",
                                        {"a": 0, "b": 3}, [True, 3])]
    yield from [("shape", v) for v in ([6, 20], ["6", "20", "22"], [6, 20, 22.5], [7, 20, 22], None)]
    yield from [("plane", v) for v in (3, "oblique", None, ["axial"])]
    yield from [("window", v) for v in ({**window, "low": "a"}, {**window, "high": window["low"]},
                                        {**window, "low": window["high"] + 1}, {"low": 0, "high": 1},
                                        {**window, "evil": 1}, {**window, "describe": "x" * 5000}, [0, 1], None)]
    yield from [("post", v) for v in ({"keep_largest": "yes", "min_voxels": 0, "fill_holes": False},
                                      {"keep_largest": False, "min_voxels": "3", "fill_holes": False},
                                      {"keep_largest": False, "min_voxels": -1, "fill_holes": False},
                                      {"keep_largest": False, "min_voxels": 1.5, "fill_holes": False},
                                      {"keep_largest": False, "min_voxels": 10**12, "fill_holes": False},
                                      {"keep_largest": False, "min_voxels": 0, "fill_holes": 1}, "on")]
    yield from [("prompts", v) for v in ("liver", [1], [None], ["x"] * (MAX_PROMPTS + 1), ["x" * (MAX_PROMPT_CHARS + 1)],
                                         ["liver"] * 10_000)]
    yield from [("resize", v) for v in ("zoom", 1)]
    yield from [("fusion", v) for v in ("median", 2)]
    yield from [("volume", v) for v in ("0" * 32, "../../etc/passwd", 5, None)]
    yield from [("warnings", v) for v in ([1], "x")]
    yield ("evil", 1)


def test_every_field_of_a_request_with_a_wrong_type_or_value_is_a_4xx_line(server, held):
    key, request = held
    for field, value in _bad_requests(request):
        body = json.dumps({"volume": key, "request": {**request, field: value}}).encode()
        status, answer = call(server.url + "/jobs", "POST", body)
        one_line(status, answer, 422, 413)
    fused = plan(Volume(blobs((6, 20, 22), seed=4), (0.8, 0.7, 2.5)), ["liver"], plane="all", cache_key=key)
    for slices in ([0, 5], [1, 49]):  # all three planes hold 6 + 20 + 22 slices: any other range is refused
        body = json.dumps({"volume": key, "request": {**json.loads(fused.to_json()), "slices": slices}}).encode()
        assert "All three planes" in one_line(*call(server.url + "/jobs", "POST", body), 422)
    for raw in (b"NaN", b"[]", b'"x"', b"{", b"", b'{"volume": "' + key.encode() + b'", "request": {"threshold": NaN}}',
                b'{"volume": 1e999}', json.dumps({"volume": key, "request": request, "model": 5}).encode(),
                json.dumps({"volume": key, "request": request, "model": "m" * 10_000}).encode()):
        one_line(*call(server.url + "/jobs", "POST", raw), 422, 413)
    threshold_nan = json.dumps({"volume": key, "request": {**request, "threshold": 0.5}}).replace("0.5", "NaN")
    one_line(*call(server.url + "/jobs", "POST", threshold_nan.encode()), 422)


def test_bodies_are_limited_on_every_route(server, held):
    key, request = held
    huge = json.dumps({"volume": key, "request": {**request, "prompts": ["liver"] * 20_000}}).encode()
    assert "accepts" in one_line(*call(server.url + "/jobs", "POST", huge), 413)
    host, port = server.url[len("http://"):].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:  # chunked: no Content-Length to trust
        s.sendall(f"POST /jobs HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {ALICE}\r\n"
                  "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        for _ in range(80):
            s.sendall(b"400\r\n" + b" " * 1024 + b"\r\n")
        answer = b""
        while b"exceeds" not in answer and len(answer) < 8192:  # the head and the body may come apart
            piece = s.recv(4096)
            if not piece:
                break
            answer += piece
    assert answer.startswith(b"HTTP/1.1 413") and b"exceeds" in answer
    for path in ("/models", f"/jobs/{'x' * 22}"):
        assert call(server.url + path, "GET", b"x" * (100 << 10))[0] == 413


def test_accepted_edge_requests_run_to_the_end(server, held):
    """What passes the checks never fails as 'unexpected' in the job: the checks are the planner's."""
    key, request = held
    for changes in ({"threshold": 0.999, "slices": [0, 1]}, {"prompts": [""]}, {"prompts": ["a"] * MAX_PROMPTS},
                    {"post": {"keep_largest": True, "min_voxels": 6 * 20 * 22, "fill_holes": True}},
                    {"window": {**request["window"], "low": -1e30, "high": 1e30}}, {"prompts": ["x" * MAX_PROMPT_CHARS]}):
        status, answer = call(server.url + "/jobs", "POST", json.dumps({"volume": key, "request": {**request, **changes}}).encode())
        assert status == 200, answer
        job = json.loads(answer)["job"]
        while (state := json.loads(call(f"{server.url}/jobs/{job}")[1]))["state"] not in ("done", "failed", "cancelled"):
            time.sleep(0.05)
        assert state["state"] == "done", (changes, state)
        assert call(f"{server.url}/jobs/{job}/labelmap")[0] == 200
        call(f"{server.url}/jobs/{job}", "DELETE")


def test_client_text_never_reaches_the_log_raw(server, held):
    key, request = held
    forged = "x\nERROR: FORGED line\r\nwarning: FORGED too\u2028"
    for field, value in (("prompts", [forged, "Niere ä" + forged]), ("window", {**request["window"], "describe": forged}),
                         ("plane", forged), ("fusion", forged), ("warnings", [forged]), (forged, 1),
                         ("slices", {forged: 0, "b": 1}), ("post", {**request["post"], forged: 1})):
        call(server.url + "/jobs", "POST", json.dumps({"volume": key, "request": {**request, field: value}}).encode())
    call(server.url + "/jobs", "POST", json.dumps({"volume": key, "request": request, "model": forged}).encode())
    put(server, nrrd(HEADER + [forged]))
    call(server.url + "/models", headers={"X-Evil": "FORGED"}, token="x FORGED")
    time.sleep(0.5)
    for line in server.log().splitlines():
        assert "FORGED" not in line.split(":", 1)[0] and not line.lstrip().startswith("FORGED"), line
        assert len(line) < 400 and "Traceback" not in line, line


# ---- hosts, tokens, caches -----------------------------------------------------------------------

def test_a_token_less_server_answers_localhost_names_only(tiny_model_dir):
    cases = (((), "localhost:9", None, 200), ((), "127.0.0.1", None, 200), ((), "[::1]:80", None, 200),
             ((), "evil.example", None, 403), ((), "evil.example:80", None, 403),
             ((), "localhost", "http://evil.example", 403), ((), "localhost", "null", 403),
             ((), "localhost", "http://localhost:3000", 200), (("seg.hospital.org",), "seg.hospital.org", None, 200),
             (("seg.hospital.org",), "evil.example", None, 403))
    for allowed, host, origin, expected in cases:
        live = LiveServer(create_app(ServerConfig(models={"tiny": str(tiny_model_dir)}, device="cpu",
                                                  allowed_hosts=allowed), runner=lambda job, model: None))
        try:
            extra = {"Host": host, **({"Origin": origin} if origin else {})}
            status, body = call(live.url + "/models", token=None, headers=extra)
            assert status == expected, (allowed, host, origin)
            if expected == 403:
                assert "answers requests addressed to" in one_line(status, body, 403)
        finally:
            live.stop()


def test_the_token_file_is_re_read_and_fails_closed(server):
    original = server.tokens.read_text(encoding="utf-8")
    try:
        assert call(server.url + "/models", token=BOB)[0] == 200
        server.tokens.write_text(f"alice {ALICE}\n", encoding="utf-8")  # bob's access withdrawn
        time.sleep(1.1)
        assert call(server.url + "/models", token=BOB)[0] == 401
        assert call(server.url + "/models", token=ALICE)[0] == 200
        server.tokens.write_text("alice short\n", encoding="utf-8")  # damaged: nobody in, never everybody
        time.sleep(1.1)
        assert call(server.url + "/models", token=ALICE)[0] == 401
        assert call(server.url + "/models", token=None)[0] == 401
    finally:
        server.tokens.write_text(original, encoding="utf-8")
        time.sleep(1.1)
    assert call(server.url + "/models", token=BOB)[0] == 200
    assert "Token file unusable (InputError)" in server.log()


def test_a_cache_hit_does_not_tell_one_client_what_another_segmented(server):
    volume = Volume(blobs((6, 20, 22), seed=9), (0.8, 0.7, 2.5))
    alice, bob = Client(server.url, ALICE), Client(server.url, BOB)
    assert not alice.segment(volume, plan(volume, ["liver"])).from_cache
    assert not bob.segment(volume, plan(volume, ["liver"])).from_cache  # the same scan, his first run
    assert alice.segment(volume, plan(volume, ["spleen"])).from_cache
