"""Runs: ``POST /jobs`` (a held volume, a ``Request``, a model) starts a segmentation in the background;
``GET /jobs/{id}`` (or ``/events``, server-sent) follows it, ``DELETE`` cancels or forgets it, and
``GET /jobs/{id}/probabilities|masks|labelmap`` fetches its result. A client sees only its own jobs."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import threading
import time
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import wire
from ..errors import Cancelled, InputError, MedVLSMError
from ..request import (ALL_PLANES, FUSIONS, MAX_DESCRIBE_CHARS, MAX_PROMPT_CHARS, MAX_PROMPTS, RESIZE_MODES,
                       Request)
from ..volume import PLANES
from .config import VOLUME_KEY

log = logging.getLogger("medvlsm")


FINISHED = ("done", "failed", "cancelled")


class BackgroundJob:
    """What the server's jobs share: a client, a deadline, cancel, progress and how a job ends."""

    def __init__(self, client: str, deadline: float):
        self.client, self.deadline = client, deadline
        self.progress = (0, 0)
        self.state, self.error = "queued", ""
        self.finished_at = None  # time.monotonic() when it ended, however it ended
        self._cancel = threading.Event()

    def cancelled(self) -> bool:
        return self._cancel.is_set() or time.monotonic() > self.deadline

    def report(self, done, total) -> None:
        self.progress = (done, total)

    def _run(self, work, what: str, release) -> None:
        """``work()``, then its state: done, cancelled (by the client or the deadline) or failed with one
        line; ``release(state)`` lets go of what the job held, whatever happened."""
        self.state = "running"
        state, error = "failed", ""
        try:
            work()
            state = "done"
        except Cancelled:
            state, error = "cancelled", "timed out" if not self._cancel.is_set() else "cancelled by the client"
        except MedVLSMError as e:
            error = str(e)
        except Exception as e:  # a bug of ours (client input is refused before a job starts): one log line
            log.error("A %s failed", what, exc_info=e)
            error = f"unexpected {e.__class__.__name__} on the server"
        finally:
            release(state)
            self.finished_at = time.monotonic()
            self.error, self.state = error, state  # the state last: whoever sees it finished sees the rest


class ServerJob(BackgroundJob):
    """One run on the server: progress, cancel, result, error (read by the client's polls)."""

    def __init__(self, client: str, volume, request: Request, deadline: float):
        super().__init__(client, deadline)
        self.volume, self.request = volume, request
        self.progress = (0, request.slices[1] - request.slices[0])
        self.result = None

    @property
    def result_bytes(self) -> int:
        return 0 if self.result is None else self.result.probabilities.nbytes

    def run(self, runner, model: str) -> None:
        """``runner(job, model)`` segments (``LocalEngines`` here, ``ray_serve.RayRunner`` on Ray)."""

        def segment():
            self.result = runner(self, model)

        def release(state):
            self.volume = None  # the store keeps the volume; the job needs only its result

        self._run(segment, "run", release)

    def status(self) -> dict:
        done, total = self.progress
        return {"state": self.state, "done": done, "total": total, "error": self.error}


class JobStore:
    """The server's jobs. A client may have ``max_per_client`` runs queued or running (more is a 429);
    finished jobs wait for their client to fetch and forget them, but no longer than ``ttl_s`` and
    only while their results fit ``max_result_bytes`` (oldest finished first out)."""

    def __init__(self, max_per_client: int, max_result_bytes: int, ttl_s: float, noun: str = "runs"):
        self.max_per_client, self.max_result_bytes, self.ttl_s = max_per_client, max_result_bytes, ttl_s
        self.noun = noun
        self._jobs: dict = {}  # id -> job
        self._lock = threading.Lock()

    def add(self, job: ServerJob) -> str:
        with self._lock:
            self._expire()
            waiting = sum(j.finished_at is None for j in self._jobs.values() if j.client == job.client)
            if waiting >= self.max_per_client:
                raise HTTPException(429, f"{waiting} {self.noun} of this client are waiting or running here; "
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

    def waiting(self) -> int:
        """Jobs of any client queued or running."""
        with self._lock:
            return sum(job.finished_at is None for job in self._jobs.values())

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


# ---- the request body as typed models: the OpenAPI schema states every field, type and cap. The
# values are then checked by Request.from_json and Request.validate, the code a local run uses.

class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class WindowIn(Strict):
    low: float
    high: float
    describe: str = Field(max_length=MAX_DESCRIBE_CHARS)


class PostIn(Strict):
    keep_largest: bool = False
    min_voxels: int = Field(default=0, ge=0)
    fill_holes: bool = False


class RequestIn(Strict):
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


class JobIn(Strict):
    """``POST /jobs``: a held volume's key, a ``Request`` as JSON, a served model (default: the first)."""

    volume: str = Field(pattern=VOLUME_KEY)
    request: RequestIn
    model: str | None = Field(default=None, max_length=200)


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
    """Runs jobs on this machine: one engine per served model with its feature cache. Every served model
    is loaded here, before the first client comes: a missing model fails the start, not a radiologist's
    run, and no request pays the load. A client's own (taught) models are loaded when first used, the
    ``OWN_LOADED`` most recently used kept."""

    OWN_LOADED = 2

    def __init__(self, config):
        from collections import OrderedDict

        from ..engine import Engine
        from ..models import load_model

        self.config = config
        self.engines = {name: Engine(load_model(source), device=config.device,
                                     cache_bytes=config.feature_cache_bytes) for name, source in config.models.items()}
        self.own = OrderedDict()  # model folder (ModelStore.resolve's answer) -> Engine
        self._lock = threading.Lock()

    def engine(self, model: str):
        """``model``: a served name, or the folder ``ModelStore.resolve`` gave for a client's own model."""
        if model in self.engines:
            return self.engines[model]
        from ..engine import Engine
        from ..models import load_model

        with self._lock:
            if model not in self.own:
                self.own[model] = Engine(load_model(model), device=self.config.device,
                                         cache_bytes=self.config.feature_cache_bytes // 4)
                while len(self.own) > self.OWN_LOADED:
                    self.own.popitem(last=False)
            self.own.move_to_end(model)
            return self.own[model]

    def __call__(self, job: ServerJob, model: str):
        return self.engine(model).segment(job.volume, job.request, progress=job.report, cancel=job.cancelled)


def events(status):
    """``status()`` as server-sent events, one per change, until the job ends."""

    async def stream():
        last = None
        while True:
            now = status()
            if now != last:
                yield f"data: {json.dumps(now)}\n\n"
                last = now
            if now["state"] in FINISHED:
                return
            await asyncio.sleep(0.05)

    return StreamingResponse(stream(), media_type="text/event-stream")


def follow_routes(router: APIRouter, path: str, client, jobs: JobStore, what: str) -> None:
    """``GET path/{id}`` (status), ``path/{id}/events`` (server-sent) and ``DELETE path/{id}`` (cancel a
    job, or forget a finished one) for a store of this client's jobs."""

    @router.get(path + "/{job_id}")
    def status(job_id: str, name: str = Depends(client)):
        return jobs.get(job_id, name).status()

    @router.get(path + "/{job_id}/events", description=f"{what} as server-sent events, one per change, until "
                "the job ends")
    async def status_events(job_id: str, name: str = Depends(client)):
        return events(jobs.get(job_id, name).status)

    @router.delete(path + "/{job_id}")
    def cancel_or_forget(job_id: str, name: str = Depends(client)):
        job = jobs.get(job_id, name)
        if job.finished_at is not None:
            jobs.forget(job_id)
        else:
            job._cancel.set()
        return job.status()


def routes(client, config, stores, workers, runner) -> APIRouter:
    """``stores``: ``config.Stores``; ``runner()``: the current runner (``app.state.runner``, which a Ray
    replica sets when it starts)."""
    router = APIRouter()
    volumes, jobs, models = stores.volumes, stores.jobs, stores.models

    @router.post("/jobs")
    def start_job(job_in: JobIn, name: str = Depends(client)):
        model = models.resolve(name, job_in.model)
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
        workers.submit(job.run, runner(), model)
        return {"job": job_id}

    follow_routes(router, "/jobs", client, jobs, "Progress")

    @router.get("/jobs/{job_id}/{kind}")
    def job_result(job_id: str, kind: Literal[RESULT_KINDS], name: str = Depends(client)):
        job = jobs.get(job_id, name)
        if job.state != "done":
            raise HTTPException(409, f"The job is {job.state}" + (f": {job.error}" if job.error else ""))
        return Response(result_layers(job, kind), media_type="application/octet-stream")

    return router
