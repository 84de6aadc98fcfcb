"""Teaching a new model on a few labelled cases: what Slicer's Teach section, the server's teach jobs
and ``medvlsm finetune --server`` share.

A case is a volume with named masks on its grid (``LabelledArrays``). Only labelled slices are data
(``training.samples_from_volumes``, partial labels by default); the held-out slices for the learning
curve come from ``training.train_val_split``. The model is trained (``training.finetune``; Adapt = the
decoder only, on image features encoded once) into a hidden staging folder beside the destination and
renamed onto it when complete: a cancelled or failed teach leaves no model folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .datasets import LABELS
from .errors import Cancelled, InputError
from .volume import PLANES

MODES = {"adapt": "Adapt: decoder only, minutes on a CPU", "finetune": "Finetune: all layers, for a GPU"}
VAL_FRACTION = 0.2  # with several cases: this share of whole cases is held out


@dataclass
class TeachSettings:
    mode: str = "adapt"
    epochs: int = 10
    plane: str = "axial"
    labels: str = "partial"  # or "complete": every slice of each case is labelled
    device: str = "auto"

    def check(self, max_epochs: int = 1000) -> None:
        if self.mode not in MODES:
            raise InputError(f"Unknown teach mode '{self.mode}'", f"Choose one of: {', '.join(MODES)}")
        if not 1 <= self.epochs <= max_epochs:
            raise InputError(f"Epochs must be 1..{max_epochs}, got {self.epochs}", "Set the number of epochs")
        if self.plane not in PLANES:
            raise InputError(f"Teach along one plane, not '{self.plane}'", f"Choose one of: {', '.join(PLANES)}")
        if self.labels not in LABELS:
            raise InputError(f"Unknown labels '{self.labels}'", f"Choose one of: {', '.join(LABELS)}")


@dataclass
class LabelledArrays:
    """One case in memory: a volume and its named masks ``[S, K, J, I]`` on its grid (``load`` as the
    file-based ``datasets.LabelledVolume``)."""

    name: str
    volume: object
    masks: object
    names: list

    def load(self):
        return self.volume, self.masks, self.names


def in_memory(cases) -> list:
    """Cases as ``LabelledArrays`` (files read now): what a server upload needs."""
    return [case if isinstance(case, LabelledArrays) else LabelledArrays(case.name, *case.load()) for case in cases]


def versioned_folder(models_folder, base_model: str) -> Path:
    """``models_folder/<base>-taught-<N>`` with the first N not taken."""
    stem = Path(str(base_model).rstrip("/\\")).name.split("-taught-")[0] or "model"
    n = 1
    while (Path(models_folder) / f"{stem}-taught-{n}").exists():
        n += 1
    return Path(models_folder) / f"{stem}-taught-{n}"


@dataclass
class Hooks:
    """What a teach reports and asks as it goes: ``progress(done, total)`` per step, ``on_epoch(row)``
    per epoch; ``cancelled()`` is asked at each (then ``Cancelled`` is raised); ``pause()`` runs before
    each step (the server waits there while segmentation runs)."""

    progress: Callable = lambda done, total: None
    on_epoch: Callable = lambda row: None
    cancelled: Callable = lambda: False
    pause: Callable = lambda: None


def teach_model(model, cases: list, settings: TeachSettings, folder, hooks: Hooks = Hooks()) -> dict:
    """Train ``model`` (the loaded base) on ``cases`` (``LabelledArrays``, or anything with ``name`` and
    ``load()`` such as ``datasets.LabelledVolume``) into ``folder`` (absent, or an empty directory
    reserved for it), reporting through ``hooks``. Returns the training summary."""
    from . import training

    settings.check()
    folder = Path(folder)
    slicing = training.Slicing(plane=settings.plane, labels=settings.labels)
    train, val = training.train_val_split(cases, VAL_FRACTION, lambda some: training.samples_from_volumes(
        some, model.spec, slicing))
    if not train or not val:
        slices = len({training.slice_of(sample) for sample in train + val})
        raise InputError(f"{slices} labelled slice(s): too few to teach and measure",
                         "Label the structures on at least 2 slices (one is held out to measure the model)")
    # no early stop: the user chose the epochs, a few held-out slices make a noisy curve, the best is kept
    config = training.TrainConfig(epochs=settings.epochs, adapt=settings.mode == "adapt", device=settings.device,
                                  prompt_types=["p1"], resize="letterbox", patience=settings.epochs)

    def step(epoch, done, steps):
        if hooks.cancelled():
            raise Cancelled()
        hooks.pause()
        hooks.progress((epoch - 1) * steps + done, settings.epochs * steps)

    def epoch_done(row):
        hooks.on_epoch(row)
        if hooks.cancelled():
            raise Cancelled()

    prompts = sorted({sample.prompts["p1"] for sample in train + val if sample.mask.any()})  # the names taught
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".teaching-", dir=folder.parent))
    try:
        summary = training.finetune(model, train, val, staging / folder.name, config,
                                    training.Progress(step, epoch_done))
        summary.update(cases=[case.name for case in cases], prompts=prompts, labels=settings.labels)
        training.write_model_card(staging / folder.name, model, config, summary)  # the card, with the cases
        shutil.rmtree(staging / folder.name / "checkpoint", ignore_errors=True)  # nothing resumes a teach
        os.replace(staging / folder.name, folder)  # onto an empty reserved directory too (POSIX rename)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary
