"""Score segmentations: files of any tool, or a model run per prompt type, plus prompt robustness.

Outputs next to ``results.csv``: ``results.md`` (mean ± std per prompt type), ``results_boxplot.png``
and ``worst_*.png`` overlays of the worst cases.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import numpy as np

from . import io
from .datasets import AnnotatedImage, binary_mask
from .errors import InputError
from .metrics import mean_std, score
from .prompts import strings
from .request import plan

log = logging.getLogger("medvlsm")

UNRELATED_PROMPT = "a photo of a car"
# Prompts that describe nothing in a medical image of another structure: other anatomy, a lesion
# elsewhere, non-medical words, nonsense. A model that uses the text answers them with empty masks.
WRONG_PROMPTS = ("liver", "left kidney", "brain tumour", UNRELATED_PROMPT, "xq zvbn plorf")
METRICS = ("dice", "iou", "hd95", "nsd")


# ---- files of any tool ------------------------------------------------------------------------

MAX_LABELS = 64  # more distinct values than this: a noisy (JPEG) binary mask, not a labelmap


def _read_labels(path: Path):
    """-> ([(name or None, bool mask [K, J, I]) per label or segment], grid Volume).

    ``.seg.nrrd``: one entry per segment, named. A labelmap: one entry per value (label 1, 2 ...), in
    value order; a noisy 0/255 mask (JPEG) is one binary mask cut at half its maximum."""
    if io.extension(path) == ".seg.nrrd":
        seg = io.read_seg_nrrd(path)
        return list(zip(seg.names, seg.masks)), seg.grid
    volume = io.read_image(path)
    a = volume.array.max(axis=-1) if volume.is_rgb else volume.array
    values = np.unique(a)
    values = values[values != 0]
    lossy = io.extension(path) in (".jpg", ".jpeg")
    labels = np.issubdtype(a.dtype, np.integer) and 0 < len(values) <= MAX_LABELS and (
        values.max() <= MAX_LABELS or len(values) <= 2)  # small label values, or a plain 0/1/255 mask
    if labels and not lossy:
        return [(None, a == v) for v in values], volume
    if len(values) > 1:  # grey levels are never scored as labels
        log.warning("%s: %d grey levels (%s), read as one binary mask cut at half its maximum", path.name,
                    len(values), "a JPEG mask is lossy" if lossy else "not a small set of label values")
    return [(None, binary_mask(volume))], volume


def _pair_labels(predicted, truth):
    """Label i of the truth with its namesake in the prediction when both are named, else with the
    prediction's i-th label; a label the prediction lacks is an empty mask."""
    named = all(n for n, _ in predicted + truth)
    by_name = {n: m for n, m in predicted}
    for index, (name, mask) in enumerate(truth):
        label = name if named else str(index + 1)
        if named:
            yield label, by_name.get(name), mask
        else:
            yield label, predicted[index][1] if index < len(predicted) else None, mask


def _on_grid(mask: np.ndarray, grid, target):
    """Nearest-neighbour resampling of ``mask`` (on ``grid``) onto the ``target`` grid."""
    if grid.same_grid(target):
        return mask
    import SimpleITK as sitk

    if grid.shape[0] == 1 and target.shape[0] == 1 and np.allclose(grid.direction, np.eye(3)):
        # 2D images of different pixel counts: the same field of view (model-resolution outputs)
        from PIL import Image

        resized = Image.fromarray(mask[0].astype(np.uint8) * 255).resize(target.shape[:0:-1], Image.NEAREST)
        return (np.asarray(resized) > 127)[None]
    moving = io.volume_to_sitk(grid, mask.astype(np.uint8))
    fixed = io.volume_to_sitk(target, np.zeros(target.shape, np.uint8))
    return sitk.GetArrayFromImage(sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0)) > 0


def _spacing(volume) -> tuple:
    """Numpy-order spacing; a one-slice volume is scored as a 2D image."""
    s = volume.spacing[::-1]
    return s[1:] if volume.shape[0] == 1 else s


def evaluate_files(predictions, ground_truth, nsd_tolerance_mm: float = 2.0) -> list[dict]:
    """One row per case and label of the ground truth, matched by file name without extension.

    Multi-label files are scored per label (see ``_pair_labels``). A ground-truth case without a
    prediction is scored as an empty prediction (Dice 0 for a present target) and marked ``missing``.
    """
    predictions, ground_truth = Path(predictions), Path(ground_truth)
    for folder, what in ((predictions, "--predictions"), (ground_truth, "--ground-truth")):
        if not folder.is_dir():
            raise InputError(f"{what} folder {folder} does not exist", "Give a folder of mask files")
    predicted = {io.case_name(p): p for p in predictions.iterdir() if p.is_file()}
    rows = []
    for truth_path in sorted(p for p in ground_truth.iterdir() if p.is_file()):
        case = io.case_name(truth_path)
        truth, grid = _read_labels(truth_path)
        squeeze = (lambda a: a[0]) if grid.shape[0] == 1 else (lambda a: a)
        pred_labels = []
        if case in predicted:
            pred_labels, pred_grid = _read_labels(predicted[case])
            pred_labels = [(n, _on_grid(m, pred_grid, grid)) for n, m in pred_labels]
        for label, pred, target in _pair_labels(pred_labels, truth):
            pred = np.zeros_like(target) if pred is None else pred
            rows.append({"case": case, "label": label, "missing": case not in predicted,
                         **score(squeeze(pred), squeeze(target), _spacing(grid), nsd_tolerance_mm)})
    if not any(not r["missing"] for r in rows):
        raise InputError(f"No file in {predictions} has a namesake in {ground_truth}",
                         "Name predictions like their ground truth (case1.nii.gz <-> case1.seg.nrrd)")
    return rows


def missing_cases(rows: list[dict]) -> list[str]:
    return sorted({r["case"] for r in rows if r.get("missing")})


# ---- a model, per prompt type -----------------------------------------------------------------

def _model_resolution(prob: np.ndarray, truth: np.ndarray, size: int, threshold: float):
    import torch
    import torch.nn.functional as F

    p = F.interpolate(torch.from_numpy(prob)[None, None], size=(size, size), mode="bilinear", align_corners=False)
    t = F.interpolate(torch.from_numpy(truth.astype(np.float32))[None, None], size=(size, size), mode="nearest")
    return p[0, 0].numpy() > threshold, t[0, 0].numpy() > 0.5


def _run(engine, item: AnnotatedImage, image, prompt: str, options: dict):
    """One prompt on one image -> (float probabilities ``[J, I]``, threshold): one request, planned once.
    (``prob > threshold`` is the result's own mask: the uint8 levels / 255 cut as ``masks()`` cuts them.)"""
    from .postprocess import LEVELS

    request = plan(image, [prompt], cache_key=str(item.image), **options)
    result = engine.segment(image, request)
    return result.probabilities[0, 0].astype(np.float32) / LEVELS, result.threshold


def evaluate_model(engine, items: list[AnnotatedImage], prompt_types, *, nsd_tolerance_mm: float = 2.0,
                   progress=None, keep=None, **options) -> list[dict]:
    """Run ``engine`` on every image with each prompt type's (first) string and score it.

    ``options``: the requests' ``threshold`` and ``resize`` (see ``request.plan``; the paper's
    protocol stretches). Scores at the original image size (``dice`` ...) and at the model's input
    size (``dice_model_res``, as the paper reports both). ``keep(item, prompt_type, prediction,
    truth, image, row)`` is called per case, e.g. to remember the worst ones for overlays.
    """
    rows = []
    size = engine.model.spec.input_size
    options = {"resize": "stretch", **options}
    for n, item in enumerate(items):
        image, truth = item.load()
        for ptype in prompt_types:
            if ptype not in item.prompts:
                raise InputError(f"{item.name} has no prompt of type {ptype}",
                                 f"Use one of {', '.join(sorted(item.prompts))}")
            prompt = strings(item.prompts, ptype)[0]
            prob, t = _run(engine, item, image, prompt, options)
            row = {"case": item.name, "prompt_type": ptype, "prompt": prompt,
                   **score(prob > t, truth, _spacing(image), nsd_tolerance_mm)}
            pm, tm = _model_resolution(prob, truth, size, t)
            small = score(pm, tm, None, nsd_tolerance_mm)
            row.update({"dice_model_res": small["dice"], "iou_model_res": small["iou"]})
            rows.append(row)
            if keep is not None:
                keep(item, ptype, prob > t, truth, image, row)
        if progress is not None:
            progress(n + 1, len(items))
    return rows


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    """Overlap of two masks; two empty masks agree fully."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def robustness(engine, items: list[AnnotatedImage], prompt_type: str = "p1", **options) -> dict:
    """Does the model use the text? Dice with the correct prompt minus Dice with the empty prompt and
    with an unrelated one, and the false-positive rate on images where the target is absent; for the
    fixed ``WRONG_PROMPTS`` (other anatomy, non-medical words, nonsense): their Dice with the truth,
    how often their mask is empty, and their masks' Dice with the right prompt's (1: the text is
    ignored). ``options``: as ``evaluate_model``'s."""
    correct, empty, unrelated, fp = [], [], [], []
    wrong_dice, wrong_empty, agreement = [], [], []
    options = {"resize": "stretch", **options}
    for item in items:
        image, truth = item.load()
        probs = {}
        right = strings(item.prompts, prompt_type)[0]
        for key, prompt in (("correct", right), ("empty", ""), ("unrelated", UNRELATED_PROMPT)):
            prob, t = _run(engine, item, image, prompt, options)
            probs[key] = prob > t
        d = {k: score(v, truth)["dice"] for k, v in probs.items()}
        correct.append(d["correct"])
        empty.append(d["empty"])
        unrelated.append(d["unrelated"])
        if not truth.any():
            fp.append(float(probs["correct"].any()))
        for prompt in (p for p in WRONG_PROMPTS if p != right):  # the text should make these come back empty
            prob, t = _run(engine, item, image, prompt, options)
            mask = prob > t
            if truth.any():
                wrong_dice.append(_dice(mask, truth))
            wrong_empty.append(float(not mask.any()))
            agreement.append(_dice(mask, probs["correct"]))
    return {
        "prompt_type": prompt_type,
        "dice_correct": mean_std(correct)[0],
        "dice_gain_over_empty_prompt": mean_std(np.subtract(correct, empty))[0],
        "dice_gain_over_unrelated_prompt": mean_std(np.subtract(correct, unrelated))[0],
        "false_positive_rate_on_empty_images": mean_std(fp)[0] if fp else math.nan,
        "wrong_prompt_dice": mean_std(wrong_dice)[0],  # WRONG_PROMPTS against the truth: should be ~0
        "wrong_prompt_empty_rate": mean_std(wrong_empty)[0],  # how often they give an empty mask: should be ~1
        "right_wrong_mask_dice": mean_std(agreement)[0],  # right vs wrong prompt's masks: 1 = the text is ignored
        "empty_images": len(fp),
        "cases": len(items),
    }


# ---- reports --------------------------------------------------------------------------------

def write_report(rows: list[dict], out: Path, robust: dict | None = None, worst: "WorstCases | None" = None,
                 untrained: str = "") -> list:
    """``out`` (.csv) and beside it ``.md`` (summary, cases without a prediction, prompt robustness),
    the box plot and the worst cases' overlays. ``untrained``: the model's name when its weights are
    random — then every one of these outputs says so. Returns the Markdown report's lines."""
    note = f"UNTRAINED WEIGHTS ({untrained}): these scores measure the pipeline, not a model" if untrained else ""
    write_csv([{**row, "weights": "untrained"} for row in rows] if note else rows, out)
    report = [f"# Evaluation: {out.name}", "", summary_table(rows)]
    if note:
        report[1:1] = ["", f"**{note}.**"]
    missing = missing_cases(rows)
    if missing:
        report += ["", f"## Cases without a prediction ({len(missing)}, scored as empty predictions)", "",
                   ", ".join(missing)]
    if robust:
        report += ["", "## Prompt robustness", ""] + [f"- {k}: {v:.3f}" if isinstance(v, float) else f"- {k}: {v}"
                                                     for k, v in robust.items()]
    from .atomic import atomic_open

    with atomic_open(out.with_suffix(".md"), "w", encoding="utf-8") as f:
        f.write("\n".join(report) + "\n")
    box_plot(rows, out.with_name(out.stem + "_boxplot.png"), note=note)
    if worst is not None:
        worst.save(out.parent, out.stem, note=note)
    return report


def write_csv(rows: list[dict], path) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    from .atomic import atomic_open

    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def summary_table(rows: list[dict]) -> str:
    """Markdown: mean ± std per prompt type (one 'all' row for file evaluations)."""
    groups = {}
    for row in rows:
        groups.setdefault(row.get("prompt_type", "all"), []).append(row)
    extra = [m for m in ("dice_model_res",) if any(m in r for r in rows)]
    head = "| prompt type | cases | " + " | ".join(METRICS + tuple(extra)) + " |"
    lines = [head, "|" + "---|" * (2 + len(METRICS) + len(extra))]
    for group, members in groups.items():
        cells = []
        for metric in METRICS + tuple(extra):
            mean, std, n = mean_std(r.get(metric) for r in members)
            cells.append(f"{mean:.3f} ± {std:.3f}" + (f" (n={n})" if n != len(members) else ""))
        lines.append(f"| {group} | {len(members)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def box_plot(rows: list[dict], path, metric: str = "dice", note: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {}
    for row in rows:
        groups.setdefault(row.get("prompt_type", "all"), []).append(row[metric])
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(groups), 3.6))
    ax.boxplot(list(groups.values()), tick_labels=list(groups), showmeans=True)
    ax.set_ylabel(metric.capitalize())
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("prompt type")
    ax.grid(axis="y", alpha=0.3)
    if note:
        import textwrap

        ax.set_title(textwrap.fill(note, 40), fontsize=8, color="darkred")
    fig.tight_layout()
    from .atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(str(tmp), dpi=100, metadata={"Title": note or f"{metric} per prompt type"})
    plt.close(fig)


class WorstCases:
    """Keeps the ``count`` lowest-Dice cases of a model evaluation for overlay PNGs."""

    def __init__(self, count: int = 3):
        self.count = count
        self.cases = []

    def __call__(self, item, ptype, prediction, truth, image, row):
        """Keeps distinct cases: a case's worst prompt type stands for it."""
        kept = next((c for c in self.cases if c[1] == item.name), None)
        if kept is not None:
            if kept[0] <= row["dice"]:
                return
            self.cases.remove(kept)
        self.cases.append((row["dice"], item.name, ptype, prediction, truth, image))
        self.cases.sort(key=lambda c: c[0])
        del self.cases[self.count :]

    def save(self, folder: Path, stem: str, note: str = "") -> list[Path]:
        from .overlay import OverlayStyle, save_overlay

        paths = []
        for rank, (dice, name, ptype, pred, truth, image) in enumerate(self.cases, start=1):
            path = folder / f"{stem}_worst{rank}_{name}_{ptype}.png"
            title = f"{name} {ptype}: Dice {dice:.3f}" + (f" - {note}" if note else "")
            save_overlay(image, np.stack([pred[None], truth[None]]), ["prediction", "ground truth"], path,
                         OverlayStyle(count=1, title=title))
            paths.append(path)
        return paths
