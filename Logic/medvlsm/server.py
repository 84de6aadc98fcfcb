"""``medvlsm serve``: one GPU machine segments for many workstations over HTTP (FastAPI + uvicorn).

The protocol (OpenAPI schema at ``/openapi.json``, interactive at ``/docs``):

- ``HEAD /volumes/{key}``: 200 if this client's volume is held, 404 if it must be uploaded;
- ``PUT /volumes/{key}``: the volume as gzip NRRD bytes (``io.nrrd_bytes``); ``key`` is its
  ``Volume.fingerprint()`` (content + geometry), checked here: one upload per volume, then each run
  sends only its request;
- ``POST /jobs``: ``{"volume": key, "request": Request JSON, "model": name or null}`` -> ``{"job": id}``;
  the run starts in the background;
- ``GET /jobs/{id}``: state, progress, error (or ``/jobs/{id}/events``: the same as server-sent events);
  ``DELETE /jobs/{id}``: cancel a run (before the next batch), or forget a finished one and its result
  (the client does so once it has fetched it);
- ``GET /jobs/{id}/probabilities``, ``/masks`` and ``/labelmap``: uint8 layers ``[P, K, J, I]`` or
  labels ``[K, J, I]`` as gzip NRRD with the grid and the run's facts (probabilities x 255, rounded;
  masks and labelmap at the request's threshold and post-processing: the bytes a local run makes).

The image-feature cache lives here, so a re-prompt of a held volume runs the decoder only.
Security: binds to localhost by default; anywhere else needs a token file (``name token`` per line);
bearer tokens are compared in constant time; each client sees only its own volumes and jobs; model
names come from the server's list, never paths; uploads are size-limited and kept in memory only,
bounded in bytes and time; so are finished results, and each client may have only a few runs waiting
(one client cannot queue the GPU away from the others). TLS belongs to a reverse proxy in front (README).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import Depends, FastAPI, Header, HTTPException, Response
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from . import io
from .errors import Cancelled, InputError, MedVLSMError
from .request import Request

log = logging.getLogger("medvlsm")

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
LOCAL_CLIENT = "local"


@dataclass(frozen=True)
class ServerConfig:
    """What ``medvlsm serve`` is told. ``models``: served name -> registry name or model folder (the
    first is the default); ``tokens``: token -> client name (empty: no authentication, localhost only)."""

    models: dict
    tokens: dict = field(default_factory=dict)
    host: str = "127.0.0.1"
    device: str = "auto"
    max_upload_bytes: int = 1 << 30
    max_voxels: int = 2_000_000_000
    volume_cache_bytes: int = 8 << 30
    volume_ttl_s: float = 3600.0
    job_timeout_s: float = 600.0
    max_jobs_per_client: int = 4
    result_cache_bytes: int = 4 << 30
    upload_idle_timeout_s: float = 60.0
    feature_cache_bytes: int = 4 << 30

    def check(self) -> None:
        if self.host not in LOCAL_HOSTS and not self.tokens:
            raise InputError(f"Serving on {self.host} lets anyone on the network in without a token",
                             "Give --token-file (one 'name token' per line), or serve on 127.0.0.1 behind a proxy")
        if not self.models:
            raise InputError("No model to serve", "Give --model NAME_OR_FOLDER (repeat for several)")


def read_tokens(path) -> dict:
    """``name token`` per line (``#`` comments) -> ``{token: name}``; short tokens are refused."""
    tokens = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[1]) < 16:
            raise InputError(f"{path} line {number} is not 'name token' with a token of 16 or more characters",
                             "Write e.g. 'alice " + secrets.token_urlsafe(24) + "'")
        tokens[parts[1]] = parts[0]
    if not tokens:
        raise InputError(f"{path} holds no token", "Write one 'name token' line per client")
    return tokens


class VolumeStore:
    """Uploaded volumes in memory, per client: least recently used out past ``max_bytes``, and any
    older than ``ttl_s``."""

    def __init__(self, max_bytes: int, ttl_s: float):
        self.max_bytes, self.ttl_s = max_bytes, ttl_s
        self._items: OrderedDict = OrderedDict()  # (client, key) -> (volume, stored at)
        self._lock = threading.Lock()

    def _expire(self) -> None:
        now = time.monotonic()
        for k in [k for k, (_, at) in self._items.items() if now - at > self.ttl_s]:
            del self._items[k]
        while self._items and sum(v.array.nbytes for v, _ in self._items.values()) > self.max_bytes:
            self._items.popitem(last=False)

    def get(self, client: str, key: str):
        with self._lock:
            self._expire()
            item = self._items.get((client, key))
            if item is None:
                return None
            self._items.move_to_end((client, key))
            return item[0]

    def put(self, client: str, key: str, volume) -> None:
        if volume.array.nbytes > self.max_bytes:
            raise InputError(f"The volume ({volume.array.nbytes >> 20} MB) is larger than this server keeps "
                             f"({self.max_bytes >> 20} MB)", "Send a smaller volume or raise --volume-cache-mb")
        with self._lock:
            self._items[(client, key)] = (volume, time.monotonic())
            self._expire()


FINISHED = ("done", "failed", "cancelled")


class ServerJob:
    """One run on the server: progress, cancel, result, error (read by the client's polls)."""

    def __init__(self, client: str, volume, request: Request, deadline: float):
        self.client, self.volume, self.request, self.deadline = client, volume, request, deadline
        self.progress = (0, request.slices[1] - request.slices[0])
        self.state = "queued"
        self.error = ""
        self.result = None
        self.finished_at = None  # time.monotonic() when it ended, however it ended
        self._cancel = threading.Event()

    @property
    def result_bytes(self) -> int:
        return 0 if self.result is None else self.result.probabilities.nbytes

    def cancelled(self) -> bool:
        return self._cancel.is_set() or time.monotonic() > self.deadline

    def report(self, done, total) -> None:
        self.progress = (done, total)

    def run(self, runner, model: str) -> None:
        """``runner(job, model)`` segments (``LocalEngines`` here, ``ray_serve.RayRunner`` on Ray)."""
        self.state = "running"
        state, error = "failed", ""
        try:
            self.result = runner(self, model)
            state = "done"
        except Cancelled:
            state, error = "cancelled", "timed out" if not self._cancel.is_set() else "cancelled by the client"
        except MedVLSMError as e:
            error = str(e)
        except Exception as e:  # reported to the client in one line; the details stay in the server's log
            log.exception("Job failed")
            error = f"unexpected {e.__class__.__name__} on the server"
        finally:
            self.volume = None  # the store keeps the volume; the job needs only its result
            self.finished_at = time.monotonic()
            self.error, self.state = error, state  # the state last: whoever sees it finished sees finished_at

    def status(self) -> dict:
        done, total = self.progress
        return {"state": self.state, "done": done, "total": total, "error": self.error}


class JobStore:
    """The server's jobs. A client may have ``max_per_client`` runs queued or running (more is a 429);
    finished jobs wait for their client to fetch and forget them, but no longer than ``ttl_s`` and
    only while their results fit ``max_result_bytes`` (oldest finished first out)."""

    def __init__(self, max_per_client: int, max_result_bytes: int, ttl_s: float):
        self.max_per_client, self.max_result_bytes, self.ttl_s = max_per_client, max_result_bytes, ttl_s
        self._jobs: dict = {}  # id -> job
        self._lock = threading.Lock()

    def add(self, job: ServerJob) -> str:
        with self._lock:
            self._expire()
            waiting = sum(j.finished_at is None for j in self._jobs.values() if j.client == job.client)
            if waiting >= self.max_per_client:
                raise HTTPException(429, f"{waiting} runs of this client are waiting or running here; "
                                         "wait for one to finish")
            job_id = secrets.token_urlsafe(16)
            self._jobs[job_id] = job
            return job_id

    def get(self, job_id: str, client: str) -> ServerJob:
        """The job if it is this client's; another client's job does not exist for this one (404)."""
        with self._lock:
            self._expire()
            job = self._jobs.get(job_id)
        if job is None or job.client != client:
            raise HTTPException(404, "No such job (finished results are kept for a while only)")
        return job

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._jobs)

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)

    def _expire(self) -> None:
        now = time.monotonic()
        finished = sorted((job.finished_at, job_id) for job_id, job in self._jobs.items() if job.finished_at)
        held = sum(self._jobs[job_id].result_bytes for _, job_id in finished)
        for n, (finished_at, job_id) in enumerate(finished):  # oldest first
            newest = n == len(finished) - 1  # kept for its client even if it alone exceeds the budget
            if now - finished_at > self.ttl_s or (held > self.max_result_bytes and not newest):
                held -= self._jobs.pop(job_id).result_bytes


def _volume_from_upload(body: bytes, key: str, max_voxels: int):
    volume, _, _ = io.from_nrrd_bytes(body, max_voxels)
    volume.validate()
    if volume.fingerprint() != key:
        raise InputError("The uploaded volume does not match its key", "Key a volume by Volume.fingerprint()")
    return volume


class JobIn(BaseModel):
    """``POST /jobs``: a held volume's key, a ``Request`` as JSON, a served model (default: the first)."""

    volume: str
    request: dict
    model: str | None = None


RESULT_KINDS = ("probabilities", "masks", "labelmap")


def result_layers(job: ServerJob, kind: str) -> bytes:
    """The job's probabilities (uint8, x 255), masks (0/1) or labelmap (overlaps resolved on the
    float32 probabilities) as NRRD bytes with the run's facts."""
    result = job.result
    if kind == "masks":
        layers = result.masks().astype(np.uint8)
    elif kind == "labelmap":
        layers = result.labelmap()
    else:
        layers = np.rint(result.probabilities * 255.0).astype(np.uint8)
    facts = {"prompts": json.dumps(result.prompts), "threshold": repr(result.threshold),
             "model": result.model_name, "trained": str(result.trained), "device": result.device,
             "dtype": result.dtype, "seconds": f"{result.seconds:.6f}", "warnings": json.dumps(result.warnings),
             "from_cache": str(result.from_cache)}
    return io.nrrd_bytes(result.grid, layers, facts)


class LocalEngines:
    """Runs jobs on this machine: one engine per served model with its feature cache. Every model is
    loaded here, before the first client comes: a missing model fails the start, not a radiologist's
    run, and no request pays the load."""

    def __init__(self, config: ServerConfig):
        from .engine import Engine
        from .models import load_model

        self.engines = {name: Engine(load_model(source), device=config.device,
                                     cache_bytes=config.feature_cache_bytes) for name, source in config.models.items()}

    def __call__(self, job: ServerJob, model: str):
        return self.engines[model].segment(job.volume, job.request, progress=job.report, cancel=job.cancelled)


def create_app(config: ServerConfig, runner=None):
    """The FastAPI application (``uvicorn.run(create_app(config))``); ``runner(job, model)`` segments
    (default: ``LocalEngines(config)``). ``app.state.runner`` is read per job, so a deployment may set
    it when its replica starts (``ray_serve.py``)."""
    from concurrent.futures import ThreadPoolExecutor

    config.check()
    app = FastAPI(title="MedVLSM", version="1", description=__doc__.split("\n\n")[0])
    app.state.runner = LocalEngines(config) if runner is None else runner
    volumes = VolumeStore(config.volume_cache_bytes, config.volume_ttl_s)
    jobs = app.state.jobs = JobStore(config.max_jobs_per_client, config.result_cache_bytes, config.volume_ttl_s)
    workers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="medvlsm-job")

    def client(authorization: str | None = Header(default=None)) -> str:
        """The client's name from its bearer token (every token compared, in constant time)."""
        if not config.tokens:
            return LOCAL_CLIENT
        given = (authorization or "").removeprefix("Bearer ").strip()
        name = None
        for token, owner in config.tokens.items():
            if hmac.compare_digest(given.encode(), token.encode()):
                name = owner
        if name is None:
            raise HTTPException(401, "A valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})
        return name

    @app.exception_handler(RequestValidationError)
    async def one_line_422(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse({"detail": f"{where}: {first.get('msg', 'invalid')}"}, status_code=422)

    @app.exception_handler(InputError)
    async def input_error(request, exc):
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.get("/models")
    def served_models(name: str = Depends(client)):
        return {"models": list(config.models), "default": next(iter(config.models))}

    @app.head("/volumes/{key}")
    def has_volume(key: str, name: str = Depends(client)):
        if volumes.get(name, key) is None:
            raise HTTPException(404, "Upload this volume first")
        return Response(status_code=200)

    @app.put("/volumes/{key}")
    async def put_volume(key: str, request: HTTPRequest, name: str = Depends(client)):
        declared = int(request.headers.get("content-length") or 0)
        if declared > config.max_upload_bytes:
            raise HTTPException(413, f"The upload is {declared >> 20} MB; this server accepts "
                                     f"{config.max_upload_bytes >> 20} MB")
        body = bytearray()
        chunks = request.stream().__aiter__()
        while True:
            try:  # a client that stops sending mid-upload does not hold a connection forever
                chunk = await asyncio.wait_for(chunks.__anext__(), config.upload_idle_timeout_s)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise HTTPException(408, f"The upload stalled for {config.upload_idle_timeout_s:g} s") from None
            body += chunk
            if len(body) > config.max_upload_bytes:
                raise HTTPException(413, f"The upload exceeds {config.max_upload_bytes >> 20} MB")
        # decompressing and hashing a CT takes a moment: off the event loop, so other clients' polls go on
        volumes.put(name, key, await asyncio.to_thread(_volume_from_upload, bytes(body), key, config.max_voxels))
        return {"volume": key}

    @app.post("/jobs")
    def start_job(job_in: JobIn, name: str = Depends(client)):
        model = job_in.model or next(iter(config.models))
        if model not in config.models:
            raise InputError(f"Model {model!r} is not served here", f"Use one of: {', '.join(config.models)}")
        volume = volumes.get(name, job_in.volume)
        if volume is None:
            raise HTTPException(404, "Upload this volume first (it may have expired)")
        request = Request.from_json(json.dumps(job_in.request))
        request.check(volume)
        if request.volume != job_in.volume:  # the feature cache is keyed on the server's identity
            raise InputError("The request's volume is not the uploaded one", "Send request.volume = the volume key")
        job = ServerJob(name, volume, request, time.monotonic() + config.job_timeout_s)
        job_id = jobs.add(job)
        workers.submit(job.run, app.state.runner, model)
        return {"job": job_id}

    @app.get("/jobs/{job_id}")
    def job_status(job_id: str, name: str = Depends(client)):
        return jobs.get(job_id, name).status()

    @app.get("/jobs/{job_id}/events")
    async def job_events(job_id: str, name: str = Depends(client)):
        """Progress as server-sent events, one per change, until the job ends."""
        job = jobs.get(job_id, name)

        async def events():
            last = None
            while True:
                status = job.status()
                if status != last:
                    yield f"data: {json.dumps(status)}\n\n"
                    last = status
                if status["state"] in FINISHED:
                    return
                await asyncio.sleep(0.05)

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.delete("/jobs/{job_id}")
    def cancel_or_forget_job(job_id: str, name: str = Depends(client)):
        job = jobs.get(job_id, name)
        if job.finished_at is not None:
            jobs.forget(job_id)
        else:
            job._cancel.set()
        return job.status()

    @app.get("/jobs/{job_id}/{kind}")
    def job_result(job_id: str, kind: str, name: str = Depends(client)):
        job = jobs.get(job_id, name)
        if kind not in RESULT_KINDS:
            raise HTTPException(404, f"Ask for one of: {', '.join(RESULT_KINDS)}")
        if job.state != "done":
            raise HTTPException(409, f"The job is {job.state}" + (f": {job.error}" if job.error else ""))
        return Response(result_layers(job, kind), media_type="application/octet-stream")

    return app
