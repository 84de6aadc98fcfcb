"""The client of ``medvlsm serve`` (standard library only: it runs in Slicer's Python as it is).

``Client(url, token).segment(volume, request)`` uploads the volume once (the server keeps it, keyed
by its fingerprint), sends the request, follows the progress, cancels on request, and returns a
``SegmentationResult`` holding the server's uint8 probabilities on the volume's own grid (checked):
the very bytes of the server's result, so masks and labelmaps cut here at any threshold are the
server's (and a local run's) byte for byte.
"""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.error
import urllib.request

import numpy as np

from . import wire
from .errors import Cancelled, InputError, MedVLSMError
from .result import SegmentationResult

POLL_S = 0.05
TEACH_POLL_S = 0.5  # a teach takes minutes: twice a second is plenty


def read_token(path) -> str | None:
    """This computer's token from a file holding it alone (or as 'name token'); None for no file."""
    if not path:
        return None
    from pathlib import Path

    try:
        lines = [line.split()[-1] for line in Path(path).read_text(encoding="utf-8").splitlines()
                 if line.strip() and not line.startswith("#")]
    except OSError as e:
        raise InputError(f"Cannot read the token file {path} ({e.__class__.__name__})", "Check the path") from e
    if len(lines) != 1:
        raise InputError(f"{path} should hold one token", "Put this computer's token alone in the file")
    return lines[0]


class ServerError(MedVLSMError):
    """The server refused or failed; the message is its one-line reason."""


class Client:
    """One server. ``token``: the bearer token (None: a localhost server without authentication)."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 60.0):
        if not url.startswith(("http://", "https://")):
            raise InputError(f"Server address {url!r} is not a URL", "Write e.g. http://gpu-server:8765")
        self.url, self.token, self.timeout_s = url.rstrip("/"), token, timeout_s

    def _call(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json"):
        headers = {"Content-Type": content_type}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        call = urllib.request.Request(self.url + path, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(call, timeout=self.timeout_s) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            if method == "HEAD" and e.code == 404:
                return 404, b""
            try:
                reason = json.loads(e.read() or b"{}").get("detail", "")
            except ValueError:
                reason = ""
            fixes = {401: "Check the token (Settings: server token file)",
                     429: "Wait for your earlier runs or teaching on the server to finish (or delete a model)"}
            raise ServerError(f"The server answered {e.code}: {reason or e.reason}",
                              fixes.get(e.code, "Check the server address, token and request")) from e
        except (urllib.error.URLError, OSError) as e:
            raise ServerError(f"Cannot reach the server at {self.url} ({getattr(e, 'reason', e)})",
                              "Check the address, that `medvlsm serve` runs there and that the network allows it") from e

    def models(self) -> dict:
        return json.loads(self._call("GET", "/models")[1])

    def upload(self, volume) -> str:
        """The volume's key on the server; uploaded only if the server does not hold it yet."""
        key = volume.fingerprint()
        if self._call("HEAD", f"/volumes/{key}")[0] != 200:
            self._call("PUT", f"/volumes/{key}", wire.encode(volume), "application/octet-stream")
        return key

    def start(self, volume, request, model: str | None = None) -> str:
        key = self.upload(volume)
        request = dataclasses.replace(request, volume=key)  # the server's feature cache is keyed on it
        body = json.dumps({"volume": key, "request": json.loads(request.to_json()), "model": model}).encode()
        return json.loads(self._call("POST", "/jobs", body)[1])["job"]

    def segment(self, volume, request, model: str | None = None, *, progress=None, cancel=None) -> SegmentationResult:
        """Run ``request`` on ``volume`` there; ``progress(done, total)`` while it runs; ``cancel()``
        returning True cancels it there and raises ``Cancelled``."""
        job = self.start(volume, request, model)
        self._follow(f"/jobs/{job}", POLL_S, progress, cancel, ("segment", "run"))
        return self._result(volume, request, job)

    def _follow(self, path: str, every_s: float, progress, cancel, verbs: tuple, on_status=None) -> dict:
        """Poll a job until it ends: ``progress(done, total)`` and ``on_status(status)`` at each poll;
        ``cancel()`` returning True cancels it there. Its last status if done; ``Cancelled`` or one
        ``ServerError`` line otherwise (``verbs``: what it could not do, what to do again)."""
        while True:
            status = json.loads(self._call("GET", path)[1])
            if progress is not None and status["total"]:
                progress(status["done"], status["total"])
            if on_status is not None:
                on_status(status)
            if status["state"] in ("done", "failed", "cancelled"):
                break
            if cancel is not None and cancel():
                self._call("DELETE", path)
                raise Cancelled()
            time.sleep(every_s)
        if status["state"] == "cancelled":
            raise Cancelled(status["error"])
        if status["state"] == "failed":
            raise ServerError(f"The server could not {verbs[0]}: {status['error']}",
                              f"See the message; fix and {verbs[1]} again")
        return status

    def upload_labels(self, volume, masks, names) -> str:
        """A case's segments (``masks [S, K, J, I]`` on ``volume``'s grid) under their key; uploaded only
        if the server does not hold them yet."""
        layers = np.ascontiguousarray(masks, np.uint8)
        key = wire.labels_fingerprint(volume, layers, names)
        if self._call("HEAD", f"/labels/{key}")[0] != 200:
            body = wire.encode(volume, layers, {"names": json.dumps(list(names))})
            self._call("PUT", f"/labels/{key}", body, "application/octet-stream")
        return key

    def teach(self, cases, settings, model: str | None = None, *, progress=None, on_epoch=None,
              cancel=None) -> tuple[str, dict]:
        """Teach a model there on ``cases`` (``teaching.LabelledArrays``: volume, masks, names) with
        ``settings`` (``teaching.TeachSettings``; the server's device is used). ``progress(done, total)``
        per step, ``on_epoch(row)`` per finished epoch; ``cancel()`` returning True cancels it there (no
        model is kept) and raises ``Cancelled``. Returns (the new model's name there, its summary): the
        model is this client's alone, usable by name in ``segment``."""
        settings.check()
        body = {"cases": [{"volume": self.upload(case.volume),
                           "labels": self.upload_labels(case.volume, case.masks, case.names)} for case in cases],
                "model": model, "mode": settings.mode, "epochs": settings.epochs, "plane": settings.plane,
                "labels": settings.labels}
        job = json.loads(self._call("POST", "/teach", json.dumps(body).encode())[1])["job"]
        seen = []  # the curve's rows already handed to on_epoch

        def new_rows(status):
            for row in status["curve"][len(seen):]:
                seen.append(row)
                if on_epoch is not None:
                    on_epoch(row)
            if status["state"] in ("done", "failed", "cancelled"):
                try:  # the job ended: the server may forget it (it does after a while anyway)
                    self._call("DELETE", f"/teach/{job}")
                except ServerError:
                    pass

        status = self._follow(f"/teach/{job}", TEACH_POLL_S, progress, cancel, ("teach", "teach"), new_rows)
        return status["model"], status["summary"]

    def _result(self, volume, request, job: str) -> SegmentationResult:
        values = int(np.prod(volume.shape)) * max(1, len(request.prompts))  # one uint8 layer per prompt
        grid, probabilities, facts = wire.decode(self._call("GET", f"/jobs/{job}/probabilities")[1],
                                                 wire.Limits(max_values=values, max_bytes=values),
                                                 source="The server's probabilities")
        if (not grid.same_grid(volume) or probabilities.dtype != np.uint8
                or probabilities.reshape(-1, *volume.shape).shape[0] != len(request.prompts)):
            raise ServerError("The server's result is not one uint8 layer per prompt on the volume's grid",
                              "Report this server")
        try:  # the server may free the result now; it forgets it after a while anyway
            self._call("DELETE", f"/jobs/{job}")
        except ServerError:
            pass
        return SegmentationResult(
            grid=volume, request=request, probabilities=probabilities.reshape(-1, *volume.shape),
            threshold=float(facts["threshold"]), model_name=facts["model"], trained=facts["trained"] == "True",
            device=f"{facts['device']} on {self.url}", dtype=facts["dtype"], seconds=float(facts["seconds"]),
            warnings=json.loads(facts["warnings"]), from_cache=facts["from_cache"] == "True")
