"""Teaching on the server (``--teach-dir DIR``): a client's labelled cases become that client's model.

- ``PUT /labels/{key}``: a case's segments on its volume's grid, uint8 layers ``[S, K, J, I]`` (0/1)
  in the wire format with their names (the prompts) as ``MedVLSM_names``; ``key`` is
  ``wire.labels_fingerprint``. The same upload path and limits as volumes; its volume is uploaded
  with ``PUT /volumes/{key}``. Each is uploaded once and held in memory like volumes.
- ``POST /teach``: ``{"cases": [{"volume": key, "labels": key}], "model": base or null, "mode":
  "adapt"|"finetune", "epochs": N, "plane": ..., "labels": "partial"|"complete"}`` -> ``{"job": id}``.
- ``GET /teach/{id}`` (or ``/events``, server-sent): state, steps done / total, the learning curve
  so far, and when done the new model's name and summary; ``DELETE`` cancels (no model is kept) or
  forgets a finished job.

One teach job trains at a time on the device (one worker thread; the others queue), one per client
waiting or running. Segmentation runs keep priority: before each training step the teach job waits
while any run is queued or running, so a radiologist's Run is never slowed by a colleague's teaching.
The model goes to ``DIR/<client>/<base>-taught-<N>`` (``models.py``): the client's alone.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
from fastapi import APIRouter, Depends, HTTPException
from pydantic import Field

from .. import wire
from ..datasets import LABELS
from ..errors import InputError
from ..request import MAX_PROMPT_CHARS, MAX_PROMPTS
from ..teaching import MODES, Hooks, LabelledArrays, TeachSettings, teach_model
from ..volume import PLANES
from .config import VOLUME_KEY
from .runs import BackgroundJob, Strict, follow_routes
from .volumes import UploadKind, upload_routes

log = logging.getLogger("medvlsm")

MAX_CASES = 16


@dataclass
class HeldLabels:
    """An uploaded case's labels: ``array`` (uint8 layers, what the store counts), their grid and names."""

    grid: object
    array: np.ndarray
    names: list


def _labels_from_upload(body: bytearray, key: str, limits: wire.Limits) -> HeldLabels:
    grid, layers, facts = wire.decode(body, limits, source="The labels")
    if layers.ndim != 4 or layers.dtype != np.uint8:
        raise InputError("The labels are not uint8 layers [segments, K, J, I]",
                         "Send one 0/1 layer per segment (Client.teach does)")
    try:
        names = json.loads(facts.get("names", ""))
    except ValueError:
        names = None
    if (not isinstance(names, list) or len(names) != layers.shape[0] or not 1 <= len(names) <= MAX_PROMPTS
            or not all(isinstance(n, str) and n.strip() and len(n) <= MAX_PROMPT_CHARS for n in names)):
        raise InputError(f"The labels need one name per layer (1..{MAX_PROMPTS}, each 1..{MAX_PROMPT_CHARS} "
                         "characters) in MedVLSM_names", "Name every segment: the names are the prompts")
    if layers.max(initial=0) > 1:
        raise InputError("The labels hold values other than 0 and 1", "Send one binary layer per segment")
    if wire.labels_fingerprint(grid, layers, names) != key:
        raise InputError("The uploaded labels do not match their key", "Key labels by wire.labels_fingerprint")
    return HeldLabels(grid, layers, names)


class CaseIn(Strict):
    volume: str = Field(pattern=VOLUME_KEY)
    labels: str = Field(pattern=VOLUME_KEY)


class TeachIn(Strict):
    """``POST /teach``: held cases, the model to start from (default: the first served), how to teach."""

    cases: list[CaseIn] = Field(min_length=1, max_length=MAX_CASES)
    model: str | None = Field(default=None, max_length=200)
    mode: Literal[tuple(MODES)] = "adapt"
    epochs: int = Field(default=10, ge=1, le=1000)
    plane: Literal[PLANES] = "axial"
    labels: Literal[LABELS] = "partial"


class TeachServerJob(BackgroundJob):
    """One teach job: progress, the curve, cancel, the new model's name (read by the client's polls)."""

    result_bytes = 0  # what JobStore counts: a teach's result is a folder on disk, not memory

    def __init__(self, client: str, cases: list, base: str, settings: TeachSettings, deadline: float, runs_waiting):
        super().__init__(client, deadline)
        self.cases, self.base, self.settings = cases, base, settings
        self.folder, self.runs_waiting = None, runs_waiting  # the folder: reserved once the job is accepted
        self.curve, self.model, self.summary = [], None, None

    def _yield_to_runs(self) -> None:
        """Segmentation first: wait while any run is queued or running (checked before each step)."""
        while self.runs_waiting() and not self.cancelled():
            time.sleep(0.05)

    def run(self, load_model) -> None:
        def teach():
            model = load_model(self.base)
            base_trained = bool(model.spec.trained)  # before training marks the new model trained
            summary = teach_model(model, self.cases, self.settings, self.folder,
                                  Hooks(self.report, self.curve.append, self.cancelled, self._yield_to_runs))
            self.summary = {key: summary[key] for key in ("best_val_dice", "best_epoch", "epochs", "train_samples",
                                                          "val_samples", "seconds")}
            self.summary["base_trained"] = base_trained
            self.model = self.folder.name

        def release(state):
            if state != "done":  # the reserved folder goes: no half model is ever listed or served
                shutil.rmtree(self.folder, ignore_errors=True)
            self.cases = None

        self._run(teach, "teach job", release)

    def status(self) -> dict:
        done, total = self.progress
        curve = [{k: round(float(row[k]), 6) for k in ("epoch", "train_loss", "val_loss", "val_dice")}
                 for row in list(self.curve)]
        return {"state": self.state, "done": done, "total": total, "error": self.error, "curve": curve,
                "model": self.model, "summary": self.summary}


def routes(client, config, stores) -> APIRouter:
    """``stores``: ``config.Stores`` (teaching yields to its segmentation jobs)."""
    from concurrent.futures import ThreadPoolExecutor

    from ..models import load_model
    from .runs import JobStore
    from .volumes import VolumeStore

    router = APIRouter()
    volumes, runs, models = stores.volumes, stores.jobs, stores.models
    held_labels = VolumeStore(config.volume_cache_bytes // 4, config.volume_ttl_s)
    teach_jobs = JobStore(1, 0, config.volume_ttl_s, noun="teach jobs")
    trainer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medvlsm-teach")  # one training per device

    def teaching_here() -> None:
        if models.root is None:
            raise HTTPException(404, "This server does not teach (its operator starts it with --teach-dir DIR)")

    upload_routes(router, "/labels", client, held_labels, stores.uploads,
                  UploadKind(_labels_from_upload, "these labels", before=teaching_here))

    @router.post("/teach")
    def start_teach(teach_in: TeachIn, name: str = Depends(client)):
        teaching_here()
        base = models.resolve(name, teach_in.model)
        settings = TeachSettings(mode=teach_in.mode, epochs=teach_in.epochs, plane=teach_in.plane,
                                 labels=teach_in.labels, device=config.device)
        settings.check(max_epochs=config.max_teach_epochs)
        cases = []
        for number, case in enumerate(teach_in.cases, start=1):
            volume, labels = volumes.get(name, case.volume), held_labels.get(name, case.labels)
            if volume is None or labels is None:
                raise HTTPException(404, f"Upload case {number}'s volume and labels first (they may have expired)")
            if not labels.grid.same_grid(volume):
                raise InputError(f"Case {number}'s labels are not on its volume's grid",
                                 "Send the segments resampled onto the volume (Client.teach does)")
            cases.append(LabelledArrays(f"case {number}", volume, labels.array.astype(bool), labels.names))
        source = config.models.get(base, base)  # a served name's registry name or folder; an own model's folder
        job = TeachServerJob(name, cases, source, settings, time.monotonic() + config.teach_timeout_s, runs.waiting)
        job_id = teach_jobs.add(job)  # 429 if this client already teaches
        try:
            job.folder = models.new_folder(name, base)
        except Exception:
            teach_jobs.forget(job_id)
            raise
        trainer.submit(job.run, load_model)
        return {"job": job_id}

    follow_routes(router, "/teach", client, teach_jobs, "Progress and the learning curve")

    return router
