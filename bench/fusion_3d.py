"""One plane vs each plane vs the three fused (the fusion table of docs/segment.md): 3D Dice, HD95 and NSD.

    python bench/fusion_3d.py [--epochs 15] [--train 6] [--test 4] [--json bench/results/fusion-3d.json]

Synthetic task: anisotropic volumes (1 x 1 x 2.5 mm) with two kinds of structure of the same
brightness, told apart by shape only — a "ball" (an ellipsoid) and a "tube" (a thin cylinder along a
direction oblique to every plane) — so the prompt must carry the kind. A small CLIPSeg from random
weights is finetuned through the command line with the defaults and ``--plane all`` on the training
volumes, then every held-out volume is segmented along each plane and with the three fused (mean,
max, majority). Real volumes: the pyradiomics CT (lung1, a tumour) finetunes the same way and the
MR (brain1, a lesion) is segmented with the prompt "lesion", and vice versa (``../shared/data``;
skipped with a note when absent). Writes the table, and a slice where the results differ as PNG.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_engine import machine, report  # noqa: E402

from medvlsm import io  # noqa: E402
from medvlsm.cli import main as medvlsm  # noqa: E402
from medvlsm.engine import Engine  # noqa: E402
from medvlsm.metrics import mean_std, score  # noqa: E402
from medvlsm.models import load_model  # noqa: E402
from medvlsm.request import FUSIONS, plan  # noqa: E402
from medvlsm.volume import PLANES, Volume  # noqa: E402

KINDS = ("ball", "tube")
SPACING = (1.0, 1.0, 2.5)  # i, j, k in mm: thick axial slices, as in most CT
SHARED = ROOT.parent / "shared" / "data" / "pyradiomics"


def synthetic_volume(seed: int, shape=(24, 64, 64)):
    """-> (Volume, {kind: mask}): one ball and one oblique tube, same intensity, noise around."""
    rng = np.random.default_rng(seed)
    k, j, i = np.mgrid[: shape[0], : shape[1], : shape[2]].astype(np.float32)
    mm = (i * SPACING[0], j * SPACING[1], k * SPACING[2])
    extent = [n * s for n, s in zip(shape[::-1], SPACING)]
    while True:
        centre = [rng.uniform(0.3, 0.7) * e for e in extent]
        radii = rng.uniform(7, 12, 3)
        ball = sum(((m - c) / r) ** 2 for m, c, r in zip(mm, centre, radii)) <= 1
        start = np.array([rng.uniform(0.2, 0.8) * e for e in extent])
        direction = rng.normal(size=3)
        direction = np.sign(direction) * np.clip(np.abs(direction), 0.35, None)  # oblique to every plane
        direction /= np.linalg.norm(direction)
        rel = np.stack([m - s for m, s in zip(mm, start)])
        along = np.tensordot(direction, rel, axes=1)
        distance = np.linalg.norm(rel - along[None] * direction[:, None, None, None], axis=0)
        tube = (distance <= rng.uniform(2.0, 3.0)) & (np.abs(along) <= 40)
        if ball.sum() > 200 and tube.sum() > 200 and not (ball & tube).any():
            break
    image = rng.normal(40, 15, shape)
    image[ball | tube] += 160
    volume = Volume(image.astype(np.int16), SPACING)
    return volume, {"ball": ball, "tube": tube}


def write_case(folder: Path, name: str, volume: Volume, masks: dict) -> None:
    (folder / "volumes").mkdir(parents=True, exist_ok=True)
    (folder / "segmentations").mkdir(parents=True, exist_ok=True)
    import SimpleITK as sitk

    sitk.WriteImage(io.volume_to_sitk(volume), str(folder / "volumes" / f"{name}.nrrd"))
    io.write_seg_nrrd(volume, np.stack(list(masks.values())), list(masks), folder / "segmentations" / f"{name}.seg.nrrd")


def finetune(folder: Path, model: Path, epochs: int, size: int) -> None:
    for argv in (["init", "--size", "small", "--input-size", str(size), "--output", str(model), "--overwrite"],
                 ["finetune", "--volumes", str(folder / "volumes"), "--segmentations", str(folder / "segmentations"),
                  "--plane", "all", "--labels", "complete", "--model", str(model), "--output", str(model) + "-ft", "--epochs", str(epochs),
                  "--prompt-type", "p1"]):
        if medvlsm(["--quiet", *argv]) != 0:
            raise SystemExit(f"medvlsm {argv[0]} failed")


def evaluate(engine: Engine, cases: list, tolerance_mm: float = 2.0) -> tuple[dict, tuple]:
    """-> {setting: {metric: mean}}, and (case, prompt, masks by setting, truth) where fused and axial
    differ most (for the picture)."""
    settings = [*PLANES, *(f"all ({f})" for f in FUSIONS)]
    scores = {s: {"dice": [], "hd95": [], "nsd": []} for s in settings}
    worst = (-1.0, None)
    for volume, truths in cases:
        prompts = list(truths)
        masks = {p: engine.segment(volume, plan(volume, prompts, plane=p)).masks() for p in PLANES}
        for f in FUSIONS:
            masks[f"all ({f})"] = engine.segment(volume, plan(volume, prompts, plane="all", fusion=f)).masks()
        for s in settings:
            for n, prompt in enumerate(prompts):
                result = score(masks[s][n], truths[prompt], volume.spacing[::-1], tolerance_mm)
                for metric in scores[s]:
                    scores[s][metric].append(result[metric])
        for n, prompt in enumerate(prompts):
            gap = float((masks["axial"][n] != masks["all (mean)"][n]).sum())
            if gap > worst[0]:
                worst = (gap, (volume, prompt, {s: masks[s][n] for s in ("axial", "all (mean)")}, truths[prompt]))
    table = {s: {m: mean_std(v)[0] for m, v in metrics.items()} for s, metrics in scores.items()}
    return table, worst[1]


def picture(example, path: Path) -> None:
    from medvlsm.overlay import OverlayStyle, save_overlay

    volume, prompt, masks, truth = example
    names = [f"{prompt}: truth", f"{prompt}: axial only", f"{prompt}: all three (mean)"]
    save_overlay(volume, np.stack([truth, masks["axial"], masks["all (mean)"]]), names, path,
                 OverlayStyle(plane="coronal", window="0,400", count=3,
                              title="The held-out volume where axial-only and fused differ most (coronal slices)"))


def real_cases(work: Path, epochs: int, size: int) -> dict:
    """Finetune on one pyradiomics volume, evaluate on the other, both ways (prompt: lesion)."""
    out = {}
    cases = {}
    for name in ("lung1", "brain1"):
        volume = io.read_image(SHARED / f"{name}_image.nrrd")
        label = io.read_image(SHARED / f"{name}_label.nrrd").array > 0
        cases[name] = (volume, {"lesion": label})
    for train, test in (("lung1", "brain1"), ("brain1", "lung1")):
        folder = work / f"real-{train}"
        write_case(folder, train, cases[train][0], cases[train][1])
        finetune(folder, work / f"real-{train}-model", epochs, size)
        engine = Engine(load_model(str(work / f"real-{train}-model") + "-ft"), device="cpu")
        out[f"{train} -> {test}"] = evaluate(engine, [cases[test]])[0]
        out[f"{train} -> {train}"] = evaluate(engine, [cases[train]])[0]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--train", type=int, default=6)
    p.add_argument("--test", type=int, default=4)
    p.add_argument("--input-size", type=int, default=96)
    p.add_argument("--json", default=None)
    p.add_argument("--picture", default=str(ROOT / "Resources" / "Screenshots" / "fusion.png"))
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="medvlsm-fusion-"))
    started = time.perf_counter()
    for n in range(args.train):
        write_case(work / "synthetic", f"case{n}", *synthetic_volume(n))
    finetune(work / "synthetic", work / "model", args.epochs, args.input_size)
    engine = Engine(load_model(str(work / "model") + "-ft"), device="cpu")
    table, example = evaluate(engine, [synthetic_volume(1000 + n) for n in range(args.test)])
    picture(example, Path(args.picture))
    results = {"machine": machine(), "epochs": args.epochs, "train_volumes": args.train, "test_volumes": args.test,
              "synthetic": table}
    if SHARED.is_dir():
        results["real"] = real_cases(work, args.epochs, args.input_size)
    else:
        results["real"] = f"skipped: {SHARED} is absent"
    results["seconds"] = round(time.perf_counter() - started)
    return report(results, args.json)


if __name__ == "__main__":
    main()
