"""The first download of a registry model, against a Hugging Face hub endpoint served on 127.0.0.1
(a stand-in: the real hub cannot be reached here): progress in bytes, Cancel between chunks with
nothing half-written left in the cache, the checksum of a finished download; and the panel's
session, whose Cancel during "Downloading the model" ends the run."""

import hashlib
import http.server
import json
import re
import threading
import time

import numpy as np
import pytest

import medvlsm.models as models
from medvlsm.errors import Cancelled

COMMIT = "c" * 40
REPO = "medvlsm-test/tiny"
BIG = 30 << 20  # three of huggingface_hub's 10 MB download chunks


class FakeHub:
    """The hub's API for one repository (model info, file tree, resolve) with the big file sent
    slowly, so a download takes seconds; ``sent`` counts the bytes that left."""

    def __init__(self, files, pause_s=0.005, chunk=1 << 16):
        self.files, self.sent = files, 0
        hub = self

        def meta(name, data):
            entry = {"type": "file", "path": name, "rfilename": name, "size": len(data),
                     "oid": hashlib.sha1(data).hexdigest()}
            if len(data) > 1000:
                entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "oid": hashlib.sha256(data).hexdigest(),
                                "size": len(data), "pointerSize": 130}
            return entry

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _json(self, value):
                body = json.dumps(value).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _file(self):
                match = re.fullmatch(rf"/{re.escape(REPO)}/resolve/[^/]+/(.+)", self.path.split("?")[0])
                return hub.files.get(match.group(1)) if match else None

            def _head(self, data):
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()

            def do_HEAD(self):
                data = self._file()
                if data is None:
                    return self.send_error(404)
                self._head(data)

            def do_GET(self):
                if self.path.startswith(f"/api/models/{REPO}/tree/"):
                    return self._json([meta(n, d) for n, d in hub.files.items()])
                if self.path.startswith(f"/api/models/{REPO}"):
                    return self._json({"id": REPO, "sha": COMMIT, "siblings": [meta(n, d) for n, d in hub.files.items()]})
                data = self._file()
                if data is None:
                    return self.send_error(404)
                self._head(data)
                try:
                    for start in range(0, len(data), chunk):
                        self.wfile.write(data[start:start + chunk])
                        hub.sent += len(data[start:start + chunk])
                        time.sleep(pause_s if len(data) > 1000 else 0)
                except (BrokenPipeError, ConnectionResetError):  # the client hung up: a cancelled download
                    pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()


@pytest.fixture
def hub(monkeypatch, tmp_path):
    import huggingface_hub.constants as constants

    weights = np.random.default_rng(0).integers(0, 255, BIG, np.uint8).tobytes()
    served = FakeHub({"config.json": b'{"model_type": "clipseg"}', "model.safetensors": weights})
    monkeypatch.setenv("HF_ENDPOINT", served.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    spec = models.architecture("clipseg").spec(name="tiny-download", arch="clipseg", source=f"hf:{REPO}",
                                               weights_files=["config.json", "*.safetensors"])
    yield served, spec, tmp_path / "cache"
    served.stop()


def partial_files(cache):
    return [p for p in cache.rglob("*") if p.name.endswith(".incomplete")]


def test_cancel_stops_a_download_between_chunks_and_keeps_nothing(hub):
    served, spec, cache = hub
    seen = []
    started = time.perf_counter()
    with pytest.raises(Cancelled):  # Cancel pressed once the first megabytes of the weights are in
        models.fetch(spec, progress=lambda done, total: seen.append((done, total)),
                     cancel=lambda: any(done > 1 << 20 for done, _ in seen))
    assert time.perf_counter() - started < 20
    assert seen[-1][1] >= BIG and seen[-1][0] < BIG  # it took effect at the next chunk
    assert served.sent < BIG  # the rest was never sent
    assert partial_files(cache) == [] and not list(cache.rglob("model.safetensors"))


def test_a_download_reports_its_bytes_and_is_checked(hub):
    served, spec, cache = hub
    seen = []
    folder = models.fetch(spec, progress=lambda done, total: seen.append((done, total)))
    assert (folder / "model.safetensors").stat().st_size == BIG and partial_files(cache) == []
    assert seen[-1][0] >= BIG and len({done for done, _ in seen}) >= 3  # one report per 10 MB chunk at least


def test_cancel_in_the_panel_during_the_first_download_ends_the_run(hub, monkeypatch):
    slicer = pytest.importorskip("slicer", reason="the slicer-core wheel is part of Testing/requirements.txt")
    from MedVLSMSlicerLib.session import Session, Settings

    from medvlsm.volume import Volume

    served, spec, cache = hub
    monkeypatch.setattr(models, "registry", lambda: {spec.name: spec})
    session = Session(slicer.vtkMRMLScene())
    job = session.run(Volume(np.zeros((4, 16, 16), np.int16)), Settings(model=spec.name, prompts=["liver"], device="cpu"))
    deadline = time.time() + 30
    while "Downloading the model" not in job.phase and not job.done and time.time() < deadline:
        time.sleep(0.01)
    assert "MB" in job.phase, job.phase
    job.cancel()
    assert job.wait(20)  # ended at the next chunk, not after the whole file
    assert isinstance(job.error, Cancelled) and partial_files(cache) == []
    assert served.sent < BIG
