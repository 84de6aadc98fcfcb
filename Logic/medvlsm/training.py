"""Finetuning on the user's own labelled data: the paper's recipe, with its loss bug fixed.

Recipe (``../shared/reference/medvlsm.md``): AdamW (weight decay 1e-3), ReduceLROnPlateau (x0.1,
patience 5) on the validation loss, gradient clipping at 0.5, mixed precision (bf16) on GPUs that
support it, early stopping on validation Dice (patience 20), the best checkpoint by validation Dice,
seed 42. Loss: MONAI ``DiceCELoss(sigmoid=True, lambda_dice=1, lambda_ce=0.2)`` on **logits**. (The
reference code fed sigmoid probabilities: with MONAI 1.1 its CE term was always 0 for one channel,
with MONAI >= 1.3 the probabilities were squashed a second time.) Batch size and learning rate:
``--recipe default`` (16 and the architecture's measured ``lr``) or ``paper`` (128 / 32 and the
paper's; ``bench/finetune_recipe.py`` measured which settings make a small model learn the text).

One image + one prompt per sample; the prompt is drawn per sample and per epoch from the chosen
prompt types (``random``: any type the sample has), one string of list types (p7..p9).
Runs unchanged under ``torchrun`` (DistributedDataParallel; rank 0 writes).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .atomic import atomic_open, atomic_path
from .datasets import LABELS
from .errors import InputError
from .negatives import NEGATIVE_RATIO, NegativePrompts, empty_cells
from .preprocess import Letterbox, to_model_input
from .window import choose_window
from .prompts import PROMPT_TYPES, Attributes, geometry_attributes, ladder, strings

log = logging.getLogger("medvlsm")

CHECKPOINT = "checkpoint/last.pt"


@dataclass
class Sample:
    """A preprocessed training sample at the model's input size."""

    pixels: torch.Tensor  # [3, S, S] float16, normalised
    mask: torch.Tensor  # [S, S] bool
    prompts: dict  # p0.. -> str or list
    name: str = ""
    absent: tuple = ()  # other structures reviewed as absent on this image: negatives for their names
    present: tuple = ()  # other structures annotated on this image: never negatives
    empty_cells: tuple = ()  # location-grid cells without a pixel of the mask: attribute negatives


RECIPES = ("default", "paper")


@dataclass
class TrainConfig:
    """``recipe`` fills what is left at 0: ``default`` (measured, docs/finetune.md: batch 16 and the architecture's
    ``lr``), ``paper`` (the paper's batch size and learning rate per architecture)."""

    epochs: int = 50
    batch_size: int = 0
    lr: float = 0.0
    recipe: str = "default"
    weight_decay: float = 1e-3
    grad_clip: float = 0.5  # 0: no clipping
    ce_weight: float = 0.2  # loss = Dice + ce_weight x BCE
    scheduler: str = "plateau"  # plateau: x0.1 after lr_patience epochs without a better val loss; cosine: per step, 5 % warm-up
    prompt_types: list = field(default_factory=lambda: ["p1"])
    freeze: str = "none"  # none | encoders | text
    seed: int = 42
    patience: int = 20
    lr_patience: int = 5
    precision: str = "auto"
    max_steps_per_epoch: int = 0  # 0: all
    resize: str = "stretch"  # how the samples were fitted to the input: recorded in the model folder
    device: str = "auto"
    resume: bool = False  # continue from OUTPUT/checkpoint/last.pt
    negative_ratio: float = NEGATIVE_RATIO  # wrong prompts with empty targets per image (negatives.py); 0: none
    cpu_seconds: float = 0.0  # stop after the epoch that spends this much process CPU time (same-budget comparisons)
    adapt: bool = False  # the decoder only, on image features encoded once (adapt.py): implies freeze=encoders


def prepare(image_volume, mask: np.ndarray, prompts: dict, spec, resize: str = "stretch", window="auto") -> Sample:
    """A 2D image (one-slice ``Volume``) and its mask ``[H, W]`` -> model-sized tensors (a ``Sample``
    without a name). ``window``: a name or an ``IntensityWindow`` chosen for the whole volume."""
    from .volume import SliceView

    view = SliceView(image_volume, "axial")
    box = Letterbox.fit(view.rows, view.cols, view.pixel_spacing, spec.input_size, resize)
    raw = torch.from_numpy(np.ascontiguousarray(view.view(image_volume.array)[:1]).astype(np.float32))
    pixels = to_model_input(raw, choose_window(image_volume, window), box, spec.mean, spec.std)[0]
    m = torch.from_numpy(np.ascontiguousarray(view.view(mask[None].astype(np.float32))))[:, None]
    target = box.apply(m)[0, 0] > 0.5
    return Sample(pixels.to(torch.float16), target, prompts, empty_cells=empty_cells(mask))


def samples_from_annotations(items, spec, resize: str = "stretch") -> list[Sample]:
    """Entries -> samples; entries sharing an image tell each sample which other classes that image
    holds (never its negatives) and which were annotated as absent (its first negatives)."""
    from .negatives import class_name

    out = []
    for item in items:
        image, mask = item.load()
        out.append(dataclasses.replace(prepare(image, mask, item.prompts, spec, resize), name=item.name))
    by_image = {}
    for item, sample in zip(items, out):
        by_image.setdefault(item.image, []).append(sample)
    for siblings in by_image.values():
        for sample in siblings:
            others = [(class_name(o.prompts), bool(o.mask.any())) for o in siblings if o is not sample]
            sample.present = tuple(name for name, there in others if there)
            sample.absent = tuple(name for name, there in others if not there)
    return out


@dataclass
class Slicing:
    """How volumes become 2D samples (``samples_from_volumes``): the plane, which slices are labelled,
    the share of empty slices kept (complete labels), the seed of that choice, how slices are fitted."""

    plane: str = "axial"
    labels: str = "partial"
    empty_fraction: float = 0.1
    seed: int = 42
    resize: str = "letterbox"


def samples_from_volumes(pairs, spec, slicing: Slicing = Slicing()) -> list[Sample]:
    """Volumes + segmentations -> 2D samples along ``slicing.plane``, one per (slice, structure);
    ``all``: the slices of the three planes, so one model serves multi-planar fusion.

    Prompts: the segment name as p1, plus the ladder p2..p6 built from the slice mask's geometry.
    Each sample records the case's other structures absent from its slice (negative prompts,
    ``negatives.py``).

    ``slicing.labels``: which slices are ground truth. ``partial`` (the default, how a radiologist labels):
    only *labelled* slices of ``plane``, the plane the labels were drawn in — those holding a voxel of
    any segment, or of the ``reviewed`` segment that marks slices reviewed as holding none — and on
    such a slice, a segment absent from it is absent (every structure taught is labelled wherever it
    is on a labelled slice). An unlabelled slice is never a negative; a structure's absent labelled
    slices are all kept. (The other planes' slices cross unlabelled ones: ``all`` is refused; a
    plane other than the one labelled in cannot be told from the voxels, and is the user's word.)
    ``complete``:
    every slice of the volume is labelled (an empty slice says "nothing here"); slices without the
    structure are kept at ``empty_fraction`` x the slices with it.
    """
    from .request import ALL_PLANES
    from .volume import PLANES, SliceView

    plane, labels = slicing.plane, slicing.labels
    if labels not in LABELS:
        raise InputError(f"Unknown labels '{labels}'", f"Choose one of: {', '.join(LABELS)}")
    if labels == "partial" and plane == ALL_PLANES:
        raise InputError("Partial labels are whole only on the slices they were drawn on; the other planes' "
                         "slices cross unlabelled ones", "Teach along the plane you labelled in (--plane axial), or "
                         "say --labels complete if every slice is labelled")
    rng = random.Random(slicing.seed)
    out = []
    for pair in pairs:
        volume, masks, names = pair.load()
        masks, names, labelled = _split_reviewed(masks, names)
        planes = PLANES if plane == ALL_PLANES else (plane,)
        window = choose_window(volume)
        for one_plane in planes:
            view = SliceView(volume, one_plane)
            rows = view.view(labelled).any(axis=(1, 2)) if labels == "partial" else None
            out += _plane_samples(pair.name, (volume, masks, names, rows), view, (spec, slicing.resize, window),
                                  slicing.empty_fraction, rng)
    if not out:
        raise InputError("The segmentations hold no labelled voxels", "Check that the segments are not empty")
    return out


def _split_reviewed(masks, names) -> tuple:
    """-> (the structures' masks, their names, the union of every segment incl. ``reviewed``)."""
    from .datasets import is_reviewed

    keep = [i for i, name in enumerate(names) if not is_reviewed(name)]
    return masks[keep], [names[i] for i in keep], masks.any(axis=0)


def _plane_samples(case: str, loaded, view, recipe, empty_fraction: float, rng) -> list[Sample]:
    """One volume's samples along ``view``'s plane (``loaded``: volume, masks, names, and which slices
    are labelled, None: all; ``recipe``: spec, resize, window)."""
    from .volume import Volume

    volume, masks, names, labelled_rows = loaded
    spec, resize, window = recipe
    image = view.view(volume.array)
    out = []
    views = [view.view(m) for m in masks]
    labelled = range(view.num_slices) if labelled_rows is None else np.flatnonzero(labelled_rows).tolist()
    for mview, name in zip(views, names):
        present = [s for s in labelled if mview[s].any()]
        absent = [s for s in labelled if not mview[s].any()]
        if labelled_rows is None:
            absent = rng.sample(absent, min(len(absent), int(round(empty_fraction * len(present)))))
        for s in sorted(present + absent):
            g = geometry_attributes(mview[s])
            prompts = ladder(Attributes(name, size=g["size"], number=g["number"], location=g["location"]))
            slice_volume = Volume(np.ascontiguousarray(image[s][None]), (view.pixel_spacing[1], view.pixel_spacing[0], 1.0))
            sample = prepare(slice_volume, np.asarray(mview[s]), prompts, spec, resize, window)
            others = [(other, bool(oview[s].any())) for other, oview in zip(names, views) if other != name]
            out.append(dataclasses.replace(sample, name=f"{case}:{name}:{view.plane}:{s}",
                                           present=tuple(o for o, there in others if there),
                                           absent=tuple(o for o, there in others if not there)))
    return out


def train_val_split(pairs: list, val_fraction: float, samples) -> tuple[list, list]:
    """Volumes -> (training, validation) samples (``samples(pairs)`` slices them): whole volumes are
    held out (``val_fraction`` of them, at least one), so no slice of a validation patient is trained
    on; a single volume holds out every fifth of its labelled slices instead (each with all its
    structures: no slice is both trained on and measured)."""
    if len(pairs) < 2:
        everything = samples(pairs)
        slices = sorted({slice_of(s) for s in everything}, key=lambda key: (key[0], int(key[1])))
        held = set(slices[::5])
        return [s for s in everything if slice_of(s) not in held], [s for s in everything if slice_of(s) in held]
    n_val = max(1, int(round(val_fraction * len(pairs))))
    return samples(pairs[n_val:]), samples(pairs[:n_val])


def slice_of(sample: Sample) -> tuple:
    """(plane, slice index) from a volume sample's name ``case:structure:plane:slice``."""
    return tuple(sample.name.rsplit(":", 2)[1:])


def pick_prompt(sample: Sample, prompt_types, rng: random.Random) -> str:
    types = [t for t in (PROMPT_TYPES if prompt_types == ["random"] else prompt_types) if t in sample.prompts]
    if not types:
        raise InputError(f"{sample.name} has none of the prompt types {prompt_types}",
                         f"Use types it has: {', '.join(sample.prompts)}")
    return rng.choice(strings(sample.prompts, rng.choice(types)))


# ---- distributed helpers -------------------------------------------------------------------------

def dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")


def _all_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist_info()[1] > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


# ---- the loop ----------------------------------------------------------------------------------

def with_recipe(config: TrainConfig, arch) -> TrainConfig:
    """``config`` with the recipe's batch size and learning rate where it leaves them at 0."""
    if config.recipe not in RECIPES:
        raise InputError(f"Unknown recipe {config.recipe!r}", f"Use one of: {', '.join(RECIPES)}")
    paper = config.recipe == "paper"
    return dataclasses.replace(config, batch_size=config.batch_size or (arch.paper_batch_size if paper else 16),
                               lr=config.lr or (arch.paper_lr if paper else arch.lr or arch.paper_lr))


def _scheduler(optimizer, config: TrainConfig, steps: int):
    """``plateau``: stepped per epoch on the validation loss; ``cosine``: stepped per optimiser step."""
    if config.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1, patience=config.lr_patience)
    if config.scheduler != "cosine":
        raise InputError(f"Unknown scheduler {config.scheduler!r}", "Use plateau or cosine")
    steps = max(1, steps)
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))))


def _freeze(model, how: str) -> list:
    """none: train everything; encoders: the decoder only (the paper's BiomedCLIPSeg); text: all but text.
    Returns the frozen modules (kept in eval mode while training: BatchNorm statistics stay put too)."""
    if how not in ("none", "text", "encoders"):
        raise InputError(f"Unknown --freeze {how!r}", "Use none, encoders or text")
    towers = model.towers()
    frozen = {"none": [], "text": towers["text"], "encoders": towers["image"] + towers["text"]}[how]
    if how != "none" and not frozen:
        raise InputError(f"{model.spec.arch} has no pretrained encoders to freeze (--freeze {how})",
                         "Use --freeze none")
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
    return frozen


def _masks(samples, rows, device):
    """The samples' masks ``[B, S, S]`` as floats on ``device``."""
    return torch.stack([samples[r].mask for r in rows]).float().to(device)


class _Feed(NamedTuple):
    """What turns samples into batches: the config, the device, the negatives."""

    config: TrainConfig
    device: torch.device
    negatives: NegativePrompts | None


class Batch(NamedTuple):
    """One training step: sample indices (a negative repeats its image's), their prompts, the target
    masks, and how many rows come before the negatives."""

    rows: list
    prompts: list
    masks: torch.Tensor
    positives: int


def _batches(samples, indices, rng, feed: _Feed):
    """Training ``Batch``es; a last batch of one joins the one before (BatchNorm, as in CRIS, needs
    two). With negatives, each image comes back with probability ``negative_ratio`` with a prompt for
    something absent and an empty target, appended to its batch after the ``positives`` rows."""
    config = feed.config
    starts = list(range(0, len(indices), config.batch_size))
    if len(starts) > 1 and len(indices) - starts[-1] == 1:
        starts.pop()
    for start, end in zip(starts, starts[1:] + [len(indices)]):
        rows = list(indices[start:end])
        prompts = [pick_prompt(samples[r], config.prompt_types, rng) for r in rows]
        masks = _masks(samples, rows, feed.device)
        positives = len(rows)
        if feed.negatives is not None:
            wrong = [(r, feed.negatives.pick(samples[r], p, rng)) for r, p in zip(rows[:positives], prompts)
                     if rng.random() < feed.negatives.ratio]
            wrong = [(r, text) for r, text in wrong if text is not None]
            if wrong:
                rows += [r for r, _ in wrong]
                prompts += [text for _, text in wrong]
                masks = torch.cat([masks, torch.zeros((len(wrong), *masks.shape[1:]), device=feed.device)])
        yield Batch(rows, prompts, masks, positives)


def negative_loss(negative_logits: torch.Tensor, positive_masks: torch.Tensor, ce_weight: float) -> torch.Tensor:
    """Loss of the prompts whose answer is "nothing here" (logits ``[N, S, S]``): the fraction of the
    batch's predicted foreground that falls on them, beside its true foreground (``positive_masks``),
    plus the recipe's BCE. Per-image Dice gives an empty target almost no gradient; this term keeps
    one as long as anything is predicted there, and stays in scale with the positives' Dice (a fixed
    weight on the top pixels made a small model answer nothing to everything for epochs)."""
    wrong = torch.sigmoid(negative_logits).sum()
    fraction = wrong / (wrong + positive_masks.sum() + 1.0)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(negative_logits, torch.zeros_like(negative_logits))
    return fraction + ce_weight * bce


def _loss(loss_fn, logits, masks, positives: int) -> torch.Tensor:
    """The recipe's loss on the batch's described images, plus ``negative_loss`` on its negatives."""
    loss = loss_fn(logits[:positives, None], masks[:positives, None])
    if positives < len(logits):
        loss = loss + negative_loss(logits[positives:], masks[:positives], loss_fn.lambda_ce)
    return loss


def _dice(logits, masks, threshold: float = 0.5) -> torch.Tensor:
    """Per-sample Dice of predictions thresholded at the model's probability, empty+empty = 1 (the paper's)."""
    pred = logits > math.log(threshold / (1 - threshold))
    target = masks > 0.5
    inter = (pred & target).flatten(1).sum(1).float()
    total = (pred.flatten(1).sum(1) + target.flatten(1).sum(1)).float()
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))


class Progress(NamedTuple):
    """What ``finetune`` reports as it goes; either may raise ``Cancelled`` to stop it:
    ``step(epoch, step, steps_per_epoch)`` after each step, ``epoch(row)`` after each epoch (train
    loss, held-out loss and Dice)."""

    step: object = None
    epoch: object = None


def finetune(model, train: list[Sample], val: list[Sample], output, config: TrainConfig,
             progress: Progress = Progress()) -> dict:
    """Train ``model`` in place; write the best model folder, card, curves and a resumable checkpoint.

    Returns a summary: best validation Dice and its epoch, epochs run, steps per epoch, seconds.
    """
    from monai.losses import DiceCELoss

    from .engine import resolve_device, resolve_dtype
    from .models.architectures import architecture

    output = Path(output)
    device = resolve_device(config.device)
    config = with_recipe(config, architecture(model.spec.arch))
    if config.adapt:
        if not architecture(model.spec.arch).reads_text:
            raise InputError(f"{model.spec.arch} has no encoders to freeze: nothing to adapt",
                             "Train it without --adapt")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise InputError("--adapt trains in one process", "Run it without torchrun")
        config = dataclasses.replace(config, freeze="encoders")
    base_name = model.spec.name
    # The saved folder is this new model from its first save on: its own name, size and preprocessing,
    # so an interrupted run leaves a usable, truthfully described best model.
    model.spec = dataclasses.replace(model.spec, name=output.name, trained=True, resize=config.resize,
                                     parameters_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 2))
    init_distributed(device)
    rank, world = dist_info()
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    # auto trains in bf16 on GPUs only: on a CPU it is unmeasured where native and ~6x slower where emulated
    dtype = resolve_dtype(device, "fp32" if device.type == "cpu" and config.precision == "auto" else config.precision)
    torch.manual_seed(config.seed)
    model = model.to(device).train()
    frozen = _freeze(model, config.freeze)
    for module in frozen:
        module.eval()
    negatives = None
    if config.negative_ratio > 0 and architecture(model.spec.arch).reads_text:
        negatives = NegativePrompts.for_samples(train, config.negative_ratio)
    elif config.negative_ratio > 0:  # an image-only model: a wrong prompt would only teach it to erase the image
        config = dataclasses.replace(config, negative_ratio=0.0)
        log.info("%s reads no text: trained without negative prompts", model.spec.arch)
    if len(train) < 2 and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training
                              for m in model.modules()):
        raise InputError(f"{model.spec.arch} normalises over the batch (BatchNorm) and needs at least 2 training "
                         f"samples, got {len(train)}", "Add training images")
    trainable = [p for p in model.parameters() if p.requires_grad]
    step_model = model
    if world > 1:
        # DDP warns on every rank that gradient strides differ from its buckets (a copy per step, no
        # error); the user cannot act on it, so it is not shown.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        step_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    local = list(range(rank, len(train), world))  # the distributed sampler: a disjoint shard per rank
    steps_per_epoch = math.ceil(len(local) / config.batch_size)
    if config.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = _scheduler(optimizer, config, config.epochs * steps_per_epoch)
    loss_fn = DiceCELoss(sigmoid=True, lambda_dice=1.0, lambda_ce=config.ce_weight)
    state = {"epoch": 0, "best_dice": -1.0, "best_epoch": 0, "history": []}
    checkpoint = output / CHECKPOINT
    if config.resume:
        if not checkpoint.is_file():
            raise InputError(f"No checkpoint to resume in {output}", "Run without --resume first")
        saved = torch.load(checkpoint, map_location=device, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = json.loads(saved["state"])
    if rank == 0:
        (output / "checkpoint").mkdir(parents=True, exist_ok=True)
    feed = _Feed(config, device, negatives)
    started, cpu_started = time.perf_counter(), time.process_time()
    if config.adapt:
        from .adapt import FeatureForward

        log.info("adapt: encoding the image features of %d training and %d validation samples once", len(train),
                 len(val))
        forward, val_forward = FeatureForward(model, train, device), FeatureForward(model, val, device)
    else:
        from .adapt import PixelForward

        forward, val_forward = PixelForward(step_model, train, model.tokenize, device), PixelForward(
            model, val, model.tokenize, device)
    for epoch in range(state["epoch"] + 1, config.epochs + 1):
        rng = random.Random(config.seed * 1000 + epoch * 10 + rank)
        order = local[:]
        rng.shuffle(order)
        model.train()
        for module in frozen:
            module.eval()
        train_loss, steps, epoch_start = 0.0, 0, time.perf_counter()
        for batch in _batches(train, order, rng, feed):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                logits = forward(batch.rows, batch.prompts)
            loss = _loss(loss_fn, logits.float(), batch.masks, batch.positives)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
            optimizer.step()
            if config.scheduler == "cosine":
                scheduler.step()
            train_loss += float(loss.detach())
            steps += 1
            if progress.step is not None and rank == 0:
                progress.step(epoch, steps, steps_per_epoch)
            if steps >= steps_per_epoch:
                break
        val_loss, val_dice = evaluate_samples(model, val, val_forward, (config, loss_fn),
                                              _Run(device, dtype, rank, world))
        if config.scheduler == "plateau":
            scheduler.step(val_loss)
        row = {"epoch": epoch, "train_loss": train_loss / max(steps, 1), "val_loss": val_loss, "val_dice": val_dice,
               "lr": optimizer.param_groups[0]["lr"], "steps": steps, "world_size": world,
               "seconds_per_step": (time.perf_counter() - epoch_start) / max(steps, 1)}
        state["history"].append(row)
        state["epoch"] = epoch
        improved = val_dice > state["best_dice"]
        if improved:
            state["best_dice"], state["best_epoch"] = val_dice, epoch
        if rank == 0:
            if improved:
                model.save_pretrained(output)
            with atomic_path(checkpoint) as tmp:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "state": json.dumps(state)}, tmp)
            write_curves(state["history"], output)
            if progress.epoch is not None:
                progress.epoch(row)
        if rank == 0:  # one line per epoch, not one per process
            log.info("epoch %d: train loss %.4f, val loss %.4f, val Dice %.4f%s", epoch, row["train_loss"],
                     val_loss, val_dice, " (best)" if improved else "")
        if epoch - state["best_epoch"] >= config.patience:
            if rank == 0:
                log.info("Early stop: no better validation Dice for %d epochs", config.patience)
            break
        if config.cpu_seconds and time.process_time() - cpu_started >= config.cpu_seconds:
            if rank == 0:
                log.info("Stopped: %.0f CPU-seconds spent (--cpu-seconds %g)", time.process_time() - cpu_started,
                         config.cpu_seconds)
            break
    summary = {"best_val_dice": state["best_dice"], "best_epoch": state["best_epoch"], "epochs": state["epoch"],
               "steps_per_epoch": steps_per_epoch, "world_size": world, "seconds": time.perf_counter() - started,
               "cpu_seconds": time.process_time() - cpu_started,
               "train_samples": len(train), "val_samples": len(val), "base_model": base_name}
    if rank == 0:
        write_model_card(output, model, config, summary)
    return summary


class _Run(NamedTuple):
    """Where training runs: the device, the autocast dtype, this process's rank and the process count."""

    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    world: int = 1


@torch.no_grad()
def evaluate_samples(model, samples, forward, recipe, run: _Run) -> tuple[float, float]:
    """Validation loss and mean Dice over every prompt type asked for (deterministic: first string);
    ``forward(rows, prompts)`` makes the logits of ``samples[rows]`` (``adapt.py``); ``recipe``: the
    config and the loss."""
    config, loss_fn = recipe
    device, dtype, rank, world = run
    model.eval()
    types = PROMPT_TYPES[1:] if config.prompt_types == ["random"] else config.prompt_types
    loss_sum = dice_sum = count = 0.0
    local = list(range(rank, len(samples), world))
    for ptype in types:
        for start in range(0, len(local), config.batch_size):
            rows = [i for i in local[start : start + config.batch_size] if ptype in samples[i].prompts]
            if not rows:
                continue
            masks = _masks(samples, rows, device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                logits = forward(rows, [strings(samples[r].prompts, ptype)[0] for r in rows]).float()
            loss_sum += float(loss_fn(logits[:, None], masks[:, None])) * len(rows)
            dice_sum += float(_dice(logits, masks, model.spec.threshold).sum())
            count += len(rows)
    loss_sum, dice_sum, count = _all_sum([loss_sum, dice_sum, count], device)
    model.train()
    return loss_sum / max(count, 1), dice_sum / max(count, 1)


def write_curves(history: list[dict], output: Path) -> None:
    with atomic_open(output / "training_log.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(epochs, [h["train_loss"] for h in history], label="train")
    a.plot(epochs, [h["val_loss"] for h in history], label="validation")
    a.set_xlabel("epoch"), a.set_ylabel("Dice + 0.2 BCE loss"), a.legend()
    b.plot(epochs, [h["val_dice"] for h in history], color="tab:green")
    b.set_xlabel("epoch"), b.set_ylabel("validation Dice"), b.set_ylim(0, 1)
    fig.tight_layout()
    with atomic_path(output / "training_curves.png") as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


CARD_EXTRAS = ("cases", "prompts", "labels")  # what teaching adds to a summary for the card (teaching.py)


def write_model_card(output: Path, model, config: TrainConfig, summary: dict) -> None:
    n_train, n_val, base_name = summary["train_samples"], summary["val_samples"], summary["base_model"]
    spec = json.loads((output / "medvlsm.json").read_text(encoding="utf-8")) if (output / "medvlsm.json").is_file() else {}
    spec.update(name=model.spec.name, trained=True, parameters_m=model.spec.parameters_m, resize=config.resize,
                description=f"Finetuned with medvlsm on {n_train} samples from {base_name}",
                **{key: value for key, value in summary.items() if key in CARD_EXTRAS})
    with atomic_open(output / "medvlsm.json", "w", encoding="utf-8") as f:
        f.write(json.dumps(spec, indent=2))
    card = [
        f"# {model.spec.name}", "",
        f"Finetuned from `{base_name}` ({model.spec.arch}, {model.spec.parameters_m:g} M parameters) with "
        f"`medvlsm finetune`; slices fitted to the input by {config.resize} (used by `segment` and Slicer).", "",
        "| | |", "|---|---|",
        f"| training / validation samples | {n_train} / {n_val} |",
        f"| prompt types | {', '.join(config.prompt_types)} |",
        f"| negative prompts per image | {config.negative_ratio:g}"
        f"{' (wrong prompts trained to an empty mask)' if config.negative_ratio else ''} |",
        f"| epochs run (best) | {summary['epochs']} ({summary['best_epoch']}) |",
        f"| training time | {summary['seconds']:.0f} s, {summary['cpu_seconds']:.0f} CPU-seconds |",
        f"| best validation Dice | {summary['best_val_dice']:.4f} |",
        f"| batch size, lr, weight decay | {config.batch_size}, {config.lr:g}, {config.weight_decay:g} |",
        f"| frozen | {config.freeze} |",
        f"| processes | {summary['world_size']} |",
        *(f"| {key} | {', '.join(map(str, value)) if isinstance(value, list) else value} |"
          for key, value in summary.items() if key in CARD_EXTRAS), "",
        "Loss: Dice + 0.2 x BCE on logits (MONAI DiceCELoss, sigmoid=True). Curves: `training_curves.png`, "
        "`training_log.csv`. Use: `medvlsm segment IMAGE --model THIS_FOLDER --prompt ...`.",
        "", "```json", json.dumps(asdict(config), indent=2), "```",
    ]
    with atomic_open(output / "README.md", "w", encoding="utf-8") as f:
        f.write("\n".join(card) + "\n")
