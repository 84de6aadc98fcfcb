"""``medvlsm serve``: one GPU machine segments for many workstations over HTTP (FastAPI + uvicorn).

The protocol (OpenAPI schema at ``/openapi.json``, interactive at ``/docs``):

- ``HEAD /volumes/{key}``: 200 if this client's volume is held, 404 if it must be uploaded;
- ``PUT /volumes/{key}``: the volume as NRRD bytes in the wire format of ``wire.py`` (gzip or raw,
  attached data only); ``key`` is its ``Volume.fingerprint()`` (content + geometry), checked here:
  one upload per volume, then each run sends only its request;
- ``POST /jobs``: ``{"volume": key, "request": Request JSON, "model": name or null}`` -> ``{"job": id}``;
  the run starts in the background;
- ``GET /jobs/{id}``: state, progress, error (or ``/jobs/{id}/events``: the same as server-sent events);
  ``DELETE /jobs/{id}``: cancel a run (before the next batch), or forget a finished one and its result
  (the client does so once it has fetched it);
- ``GET /jobs/{id}/probabilities``, ``/masks`` and ``/labelmap``: uint8 layers ``[P, K, J, I]`` or
  labels ``[K, J, I]`` as gzip NRRD with the grid and the run's facts (probabilities x 255, rounded;
  masks and labelmap at the request's threshold and post-processing: the bytes a local run makes).

The image-feature cache lives here, so a re-prompt of a held volume runs the decoder only; it is
kept per client, so no client learns from a cache hit what another client segmented.

Security (docs/server-security.md lists each rule with its option): binds to localhost by
default, where only requests addressed to a localhost name (Host and Origin) are answered, against
DNS rebinding; anywhere else needs a token file (``name token`` per line, re-read when it changes);
bearer tokens are compared in constant time; each client sees only its own volumes and jobs; model
names come from the server's list, never paths. Uploads are decoded by ``wire.decode``: attached data
only, their decoded size checked against ``--max-voxels`` / ``--max-volume-mb`` before a byte is
inflated. Requests are checked by ``Request.validate``, the code a local run uses, with caps on
prompts; every body is size-limited; anything malformed is one 4xx line, never a 500. Volumes and
results are kept in memory only, bounded in bytes and time; each client may have only a few runs
waiting (one client cannot queue the GPU away from the others). The log holds what the server
decided, one printable bounded line per event, never raw client text. TLS belongs to a reverse proxy
in front (docs/server.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import os
import secrets
import threading
import time
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import numpy as np
from fastapi import Depends, FastAPI, Header, HTTPException, Path as PathParam, Response
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from . import wire
from .errors import Cancelled, InputError, MedVLSMError
from .request import (ALL_PLANES, FUSIONS, MAX_DESCRIBE_CHARS, MAX_PROMPT_CHARS, MAX_PROMPTS, RESIZE_MODES,
                      Request)
from .volume import PLANES

log = logging.getLogger("medvlsm")

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
LOCAL_CLIENT = "local"
VOLUME_KEY = r"^[0-9a-f]{32}$"  # Volume.fingerprint(): 16 bytes of blake2b in hex
MAX_LOG_CHARS = 300


@dataclass(frozen=True)
class ServerConfig:
    """What ``medvlsm serve`` is told. ``models``: served name -> registry name or model folder (the
    first is the default); ``tokens``: token -> client name (empty: no authentication, localhost only)."""

    models: dict
    tokens: dict = field(default_factory=dict)
    host: str = "127.0.0.1"
    device: str = "auto"
    token_file: str | None = None  # re-read when it changes; ``tokens`` then holds its first reading
    allowed_hosts: tuple = ()  # names besides localhost's that Host/Origin may give (a token-less server)
    max_upload_bytes: int = 1 << 30  # what is sent (compressed); all uploads in flight together too
    max_voxels: int = 1 << 28  # what it decodes to: 512 x 512 x 1024 voxels (or values of an RGB volume)
    max_volume_bytes: int = 1 << 30  # and in bytes: a float32 512 x 512 x 1024 CT
    max_json_bytes: int = 64 << 10  # any other body; a request with 64 prompts of 1000 characters fits
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


class TokenSource:
    """The server's tokens: ``config.tokens``, or its token file re-read whenever it changes (checked at
    most once a second), so a token removed from the file stops working at once, without a restart. A
    token file that cannot be read or holds no valid line lets nobody in until it is fixed (one log
    line); it never switches the server to no authentication."""

    def __init__(self, config: ServerConfig):
        self.path, self.tokens = config.token_file, dict(config.tokens)
        self.required = bool(config.tokens or config.token_file)
        self._stamp, self._checked = self._stat(), time.monotonic()
        self._lock = threading.Lock()

    def _stat(self):
        try:
            st = os.stat(self.path) if self.path else None
        except OSError:
            return "missing"
        return st and (st.st_mtime_ns, st.st_size, st.st_ino)

    def current(self) -> dict:
        if not self.path:
            return self.tokens
        with self._lock:
            if time.monotonic() - self._checked >= 1.0:
                self._checked = time.monotonic()
                stamp = self._stat()
                if stamp != self._stamp:
                    self._stamp = stamp
                    try:
                        self.tokens = read_tokens(self.path)
                        log.warning("Token file re-read: %d client(s)", len(self.tokens))
                    except (OSError, InputError) as e:
                        self.tokens = {}
                        log.warning("Token file unusable (%s): every request is refused until it is fixed",
                                    e.__class__.__name__)
            return self.tokens


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
        except Exception as e:  # a bug of ours (client input is refused before a job starts): one log line
            log.error("A run failed", exc_info=e)
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


def _volume_from_upload(body: bytearray, key: str, limits: wire.Limits):
    volume, _, _ = wire.decode(body, limits)
    volume.validate()
    if volume.fingerprint() != key:
        raise InputError("The uploaded volume does not match its key", "Key a volume by Volume.fingerprint()")
    return volume


# ---- the request body as typed models: the OpenAPI schema states every field, type and cap. The
# values are then checked by Request.from_json and Request.validate, the code a local run uses.

class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class WindowIn(_Strict):
    low: float
    high: float
    describe: str = Field(max_length=MAX_DESCRIBE_CHARS)


class PostIn(_Strict):
    keep_largest: bool = False
    min_voxels: int = Field(default=0, ge=0)
    fill_holes: bool = False


class RequestIn(_Strict):
    """``Request.to_json``: what to segment in the uploaded volume, and how (see ``request.py``)."""

    volume: str = Field(pattern=VOLUME_KEY, description="the uploaded volume's key")
    shape: list[int] = Field(min_length=3, max_length=3)
    prompts: list[Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]] = Field(max_length=MAX_PROMPTS)
    plane: Literal[(*PLANES, ALL_PLANES)]
    slices: list[int] = Field(min_length=2, max_length=2)
    window: WindowIn
    resize: Literal[RESIZE_MODES] | None = None
    threshold: float | None = Field(default=None, gt=0, lt=1)
    post: PostIn = PostIn()
    warnings: list[Annotated[str, Field(max_length=2 * MAX_PROMPT_CHARS)]] = Field(default=[], max_length=2 * MAX_PROMPTS,
                                description="ignored: derived from the prompts again here")
    fusion: Literal[FUSIONS] = "mean"


class JobIn(_Strict):
    """``POST /jobs``: a held volume's key, a ``Request`` as JSON, a served model (default: the first)."""

    volume: str = Field(pattern=VOLUME_KEY)
    request: RequestIn
    model: str | None = Field(default=None, max_length=200)


def printable(text, limit: int = MAX_LOG_CHARS) -> str:
    """One line of printable text, at most ``limit`` characters: control characters (newlines
    included) escaped, so no client text can forge a log line or a second line of an answer."""
    text = str(text)
    out = "".join(ch if unicodedata.category(ch)[0] != "C" else ch.encode("unicode_escape").decode("ascii")
                  for ch in text[:limit])
    return out + ("..." if len(text) > limit else "")


class OneLineLog(logging.Filter):
    """On the server's loggers: every record becomes one printable, bounded line; a traceback becomes
    its exception's type and the place it was raised (its message may hold client text)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            error, trace = record.exc_info[1], record.exc_info[2]
            while trace is not None and trace.tb_next is not None:
                trace = trace.tb_next
            where = f" at {Path(trace.tb_frame.f_code.co_filename).name}:{trace.tb_lineno}" if trace else ""
            message += f" ({error.__class__.__name__}{where})"
            record.exc_info, record.exc_text = None, None
        record.msg, record.args = printable(message), None
        return True


def _install_log_filter() -> None:
    for name in ("medvlsm", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, OneLineLog) for f in logger.filters):
            logger.addFilter(OneLineLog())


def _host_name(value: str) -> str:
    """``host[:port]`` or ``[v6]:port`` -> the name, lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Gate:
    """ASGI middleware before any route: the Host/Origin allow-list of a token-less server, and the
    body limit of every route but the upload (which counts its own bytes as they stream in)."""

    def __init__(self, app, config: ServerConfig, token_source: TokenSource):
        self.app, self.config, self.tokens = app, config, token_source
        self.hosts = {*LOCAL_HOSTS, *(h.lower() for h in config.allowed_hosts)}

    async def _refuse(self, send, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def _origin_allowed(self, headers: dict) -> bool:
        host = _host_name(headers.get(b"host", b"").decode("latin-1"))
        origin = headers.get(b"origin")
        if origin is None:
            return host in self.hosts
        return host in self.hosts and (urlsplit(origin.decode("latin-1")).hostname or "") in self.hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if (not self.tokens.required or self.config.allowed_hosts) and not self._origin_allowed(headers):
            log.warning("Refused a request addressed to another host or from a web page's origin")
            return await self._refuse(send, 403, "This server answers requests addressed to "
                                                 f"{', '.join(sorted(self.hosts))} only")
        if scope["method"] == "PUT" and scope["path"].startswith("/volumes/"):
            return await self.app(scope, receive, send)
        limit = self.config.max_json_bytes
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            return await self._refuse(send, 400, "Content-Length is not a number")
        if declared > limit:
            return await self._refuse(send, 413, f"The body is {declared:,} bytes; this route accepts {limit:,}")
        chunks, size, more = [], 0, True
        while more:  # small bodies only: read here with the limit, handed on whole
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                return await self._refuse(send, 413, f"The body exceeds {limit:,} bytes")
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        return await self.app(scope, replay, send)


RESULT_KINDS = ("probabilities", "masks", "labelmap")


def result_layers(job: ServerJob, kind: str) -> bytes:
    """The job's probabilities (the result's own uint8, x 255), masks (0/1) or labelmap as NRRD bytes
    with the run's facts."""
    result = job.result
    if kind == "masks":
        layers = result.masks().astype(np.uint8)
    elif kind == "labelmap":
        layers = result.labelmap()
    else:
        layers = result.probabilities
    facts = {"prompts": json.dumps(result.prompts), "threshold": repr(result.threshold),
             "model": result.model_name, "trained": str(result.trained), "device": result.device,
             "dtype": result.dtype, "seconds": f"{result.seconds:.6f}", "warnings": json.dumps(result.warnings),
             "from_cache": str(result.from_cache)}
    return wire.encode(result.grid, layers, facts)


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
    _install_log_filter()
    app = FastAPI(title="MedVLSM", version="1", description=__doc__.split("\n\n")[0])
    app.state.runner = LocalEngines(config) if runner is None else runner
    tokens = TokenSource(config)
    app.add_middleware(Gate, config=config, token_source=tokens)
    volumes = VolumeStore(config.volume_cache_bytes, config.volume_ttl_s)
    jobs = app.state.jobs = JobStore(config.max_jobs_per_client, config.result_cache_bytes, config.volume_ttl_s)
    workers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="medvlsm-job")
    limits = wire.Limits(max_values=config.max_voxels, max_bytes=config.max_volume_bytes)
    decoding = threading.Lock()  # one upload decoded at a time: at most one decoded budget in memory
    receiving = {"bytes": 0}  # upload bytes held by all connections together (the event loop's thread only)
    key_param = PathParam(pattern=VOLUME_KEY, description="Volume.fingerprint() of the volume")

    def client(authorization: str | None = Header(default=None, max_length=1024)) -> str:
        """The client's name from its bearer token (every token compared, in constant time)."""
        if not tokens.required:
            return LOCAL_CLIENT
        given = (authorization or "").removeprefix("Bearer ").strip()
        name = None
        for token, owner in tokens.current().items():
            if hmac.compare_digest(given.encode(), token.encode()):
                name = owner
        if name is None:
            raise HTTPException(401, "A valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})
        return name

    @app.exception_handler(RequestValidationError)
    async def one_line_422(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse({"detail": printable(f"{where}: {first.get('msg', 'invalid')}")}, status_code=422)

    @app.exception_handler(InputError)
    async def input_error(request, exc):
        status = 413 if "accepted here" in str(exc) else 422  # a budget, or a malformed value
        return JSONResponse({"detail": printable(exc)}, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return JSONResponse({"detail": printable(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def server_fault(request, exc):  # a bug of ours, never a client's input: one line, no client text
        log.error("Internal error on %s %s", request.method, request.scope.get("route").path
                  if request.scope.get("route") else "(no route)", exc_info=exc)
        return JSONResponse({"detail": "Internal server error (logged on the server)"}, status_code=500)

    @app.get("/models")
    def served_models(name: str = Depends(client)):
        return {"models": list(config.models), "default": next(iter(config.models))}

    @app.head("/volumes/{key}")
    def has_volume(key: str = key_param, name: str = Depends(client)):
        if volumes.get(name, key) is None:
            raise HTTPException(404, "Upload this volume first")
        return Response(status_code=200)

    async def receive_upload(request: HTTPRequest, body: bytearray) -> None:
        """The body into ``body``, within the upload limit (this one and all in flight together) and
        the idle timeout; an aborted upload is one log line."""
        chunks = request.stream().__aiter__()
        while True:
            try:  # a client that stops sending mid-upload does not hold a connection forever
                chunk = await asyncio.wait_for(chunks.__anext__(), config.upload_idle_timeout_s)
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                raise HTTPException(408, f"The upload stalled for {config.upload_idle_timeout_s:g} s") from None
            except ClientDisconnect:
                log.warning("An upload was aborted by its client after %d bytes", len(body))
                raise HTTPException(400, "The upload was aborted") from None
            if len(body) + len(chunk) > config.max_upload_bytes:
                raise HTTPException(413, f"The upload exceeds {config.max_upload_bytes >> 20} MB")
            if receiving["bytes"] + len(chunk) > config.max_upload_bytes:
                raise HTTPException(503, "The server is receiving other uploads; send again in a moment",
                                    headers={"Retry-After": "5"})
            body += chunk
            receiving["bytes"] += len(chunk)

    @app.put("/volumes/{key}", responses={413: {"description": "over --max-upload-mb, --max-voxels or "
                                                              "--max-volume-mb"}})
    async def put_volume(request: HTTPRequest, key: str = key_param, name: str = Depends(client)):
        """The volume as NRRD (gzip or raw, attached data, LPS; see ``wire.py``), decoded within the limits."""
        try:
            declared = int(request.headers.get("content-length") or 0)
        except ValueError:
            raise HTTPException(400, "Content-Length is not a number") from None
        if declared > config.max_upload_bytes:
            raise HTTPException(413, f"The upload is {declared >> 20} MB; this server accepts "
                                     f"{config.max_upload_bytes >> 20} MB")
        body = bytearray()
        try:
            await receive_upload(request, body)

            def decode():
                with decoding:
                    return _volume_from_upload(body, key, limits)

            # decompressing and hashing a CT takes a moment: off the event loop, so other clients' polls go on
            volumes.put(name, key, await asyncio.to_thread(decode))
        finally:
            receiving["bytes"] -= len(body)
        return {"volume": key}

    @app.post("/jobs")
    def start_job(job_in: JobIn, name: str = Depends(client)):
        model = job_in.model or next(iter(config.models))
        if model not in config.models:
            raise InputError(f"Model {model!r} is not served here", f"Use one of: {', '.join(config.models)}")
        volume = volumes.get(name, job_in.volume)
        if volume is None:
            raise HTTPException(404, "Upload this volume first (it may have expired)")
        request = Request.from_json(job_in.request.model_dump_json())
        request.validate(volume)
        if request.volume != job_in.volume:
            raise InputError("The request's volume is not the uploaded one", "Send request.volume = the volume key")
        # the feature cache is keyed per client: no client learns from a cache hit what another segmented
        request = dataclasses.replace(request, volume=f"{name}/{job_in.volume}")
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
    def job_result(job_id: str, kind: Literal[RESULT_KINDS], name: str = Depends(client)):
        job = jobs.get(job_id, name)
        if job.state != "done":
            raise HTTPException(409, f"The job is {job.state}" + (f": {job.error}" if job.error else ""))
        return Response(result_layers(job, kind), media_type="application/octet-stream")

    return app
