"""Learning curves of teaching: held-out Dice against the number of labelled slices and against
seconds, for Adapt (decoder only, features encoded once) and Finetune (all layers), on

- synthetic CT-like volumes holding a "liver" and a "spleen" of the *same* brightness (only their
  place and size, i.e. the text, tell them apart), trained on partial labels of one case and measured
  on another case; each prompt's Dice on its own structure and on the other one;
- the shared pyradiomics volumes (a brain MR lesion on 7 slices, a lung CT tumour on 3): trained on
  n of the structure's slices, measured on the volume's other slices (the rest of the structure and
  every empty slice, so false positives count).

    python bench/teach.py                    # ~25 minutes on a 2-core CPU
    python bench/teach.py --quick            # a smoke run (tests)

The model is the small CLIPSeg (3.6 M parameters) from random weights: no pretrained weights are
reachable here, so these curves measure how fast the pipeline learns from a few labelled slices from
nothing; pretrained encoders start from features that already see edges and organs. Writes
``bench/results/teach.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "Logic"))
SHARED = HERE.parent.parent / "shared" / "data" / "pyradiomics"


def synthetic_case(seed: int, depth: int = 24, size: int = 112):
    """A body with a large "liver" (left, slices 3..18) and a small "spleen" (right, slices 8..21) of
    the same brightness: volume, masks [2, K, J, I], names."""
    from medvlsm.volume import Volume

    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(np.arange(depth), np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    body = j**2 / 0.8 + i**2 / 0.9 < 1
    array = np.where(body, -100.0, -1000.0) + rng.normal(0, 10, body.shape)  # fat-like body in air
    cj, ci = rng.uniform(-0.1, 0.1, 2)
    liver = ((j - cj) ** 2 / 0.16 + (i + 0.4 - ci) ** 2 / 0.09 < 1) & (k >= 3) & (k <= 18)
    spleen = ((j + cj) ** 2 + (i - 0.5 + ci) ** 2 < 0.03) & (k >= 8) & (k <= 21)
    array[liver | spleen] = 150 + rng.normal(0, 10, (liver | spleen).sum())  # contrast-enhanced, both alike
    return Volume(array.astype(np.int16), (0.8, 0.8, 2.5)), np.stack([liver, spleen]), ["liver", "spleen"]


def real_case(name: str, structure: str):
    from medvlsm import io

    volume = io.read_image(SHARED / f"{name}_image.nrrd")
    label = io.read_image(SHARED / f"{name}_label.nrrd").array > 0
    return volume, label[None], [structure]


def labelled_on(masks, slices):
    """Partial labels: the masks on these axial slices only (every structure labelled there)."""
    out = np.zeros_like(masks)
    out[:, slices] = masks[:, slices]
    return out


def dice(a, b) -> float:
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else 1.0


def teach_once(train_case, test_case, test_slices, mode: str, steps: int, spec_size: str, input_size: int):
    """``steps`` optimiser steps (as epochs of the training slices: a few slices need many epochs)
    -> (row of results, curve [(seconds, held-out Dice)])."""
    import math

    from medvlsm import training
    from medvlsm.engine import Engine
    from medvlsm.models import load_model
    from medvlsm.models.clipseg import CLIPSeg
    from medvlsm.teaching import LabelledArrays

    model = CLIPSeg.random(spec_size, seed=0)
    model.spec.input_size = input_size
    train = training.samples_from_volumes([LabelledArrays("train", *train_case)], model.spec)
    epochs = max(1, round(steps / math.ceil(len(train) / 16)))
    volume, masks, names = test_case
    held = LabelledArrays("held-out", volume, labelled_on(masks, test_slices), names)
    val = training.samples_from_volumes([held], model.spec)
    config = training.TrainConfig(epochs=epochs, adapt=mode == "adapt", device="cpu", prompt_types=["p1"],
                                  resize="letterbox", patience=epochs)
    start, curve = time.perf_counter(), []
    with tempfile.TemporaryDirectory() as out:
        summary = training.finetune(model, train, val, Path(out) / "taught", config, training.Progress(
            epoch=lambda row: curve.append((round(time.perf_counter() - start, 1), round(row["val_dice"], 4)))))
        engine = Engine(load_model(Path(out) / "taught"), device="cpu", precision="fp32")
        predicted = engine.segment(volume, names).masks()[:, test_slices]
    truth = masks[:, test_slices]
    own = {name: round(dice(predicted[p], truth[p]), 4) for p, name in enumerate(names)}
    other = {name: round(dice(predicted[p], truth[q]), 4) for p, name in enumerate(names)
             for q in range(len(names)) if q != p}
    return {"held_out_dice": round(summary["best_val_dice"], 4), "own_dice": own, "other_dice": other,
            "seconds": round(time.perf_counter() - start, 1), "train_samples": len(train),
            "epochs": summary["epochs"], "steps": summary["epochs"] * summary["steps_per_epoch"]}, curve


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run: the tiny model, one slice count, two steps, "
                   "the synthetic case only")
    p.add_argument("--adapt-steps", type=int, default=200)
    p.add_argument("--finetune-steps", type=int, default=100)
    p.add_argument("--size", default="small", help="CLIPSeg size from random weights (default small)")
    p.add_argument("--input-size", type=int, default=160, help="the model's input (default 160: CPU time)")
    p.add_argument("--json", default=str(HERE / "results" / "teach.json"))
    p.add_argument("--figure", default=str(HERE.parent / "Resources" / "Screenshots" / "teach-curves.png"),
                   help="the README's learning-curve figure ('' for none)")
    p.add_argument("--plot-only", action="store_true", help="draw the figure from --json without training")
    args = p.parse_args(argv)
    if args.plot_only:
        results = json.loads(Path(args.json).read_text(encoding="utf-8"))
        plot(results, args.figure)
        return results
    from bench_engine import machine

    steps = {"adapt": args.adapt_steps, "finetune": args.finetune_steps}
    if args.quick:
        steps, args.size, args.input_size = {"adapt": 2, "finetune": 1}, "tiny", 64
    train, test = synthetic_case(1), synthetic_case(2)
    present = [k for k in range(train[1].shape[1]) if train[1][:, k].any()]
    counts = (2,) if args.quick else (1, 2, 5, 10, 20)
    datasets = {"synthetic liver + spleen (same brightness)": [
        (n, (train[0], labelled_on(train[1], present[:: max(1, len(present) // n)][:n]), train[2]), test,
         list(range(test[0].shape[0]))) for n in counts]}
    if not args.quick and SHARED.is_dir():
        for name, structure in (("brain1", "lesion"), ("lung1", "tumour")):
            case = real_case(name, structure)
            slices = [k for k in range(case[1].shape[1]) if case[1][:, k].any()]
            rows = []
            for n in (1, 2, 5):
                if n >= len(slices):
                    continue
                chosen = slices[:: max(1, len(slices) // n)][:n]
                held = [k for k in range(case[0].shape[0]) if k not in chosen]
                rows.append((n, (case[0], labelled_on(case[1], chosen), case[2]), case, held))
            datasets[f"pyradiomics {name} ({structure}, {len(slices)} slices)"] = rows
    results = {"machine": machine(), "model": f"CLIPSeg {args.size}, random weights, input {args.input_size}",
               "steps": steps, "runs": [], "curves": {}}
    print(f"Machine: {results['machine']}; {results['model']}; optimiser steps {steps}", flush=True)
    for dataset, rows in datasets.items():
        for n, train_case, test_case, test_slices in rows:
            for mode in ("adapt", "finetune"):
                row, curve = teach_once(train_case, test_case, test_slices, mode, steps[mode], args.size,
                                        args.input_size)
                row.update(dataset=dataset, labelled_slices=n, mode=mode)
                results["runs"].append(row)
                if n == max(r[0] for r in rows):
                    results["curves"][f"{dataset}, {mode}, {n} slices"] = curve
                print(f"{dataset} | {mode} | {n} slices | held-out Dice {row['held_out_dice']:.3f} | own "
                      f"{row['own_dice']} | other {row['other_dice']} | {row['seconds']:.0f} s", flush=True)
    table = ["| data | mode | labelled slices | held-out Dice | own Dice per prompt | Dice on the other structure "
             "| seconds |", "|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        fmt = lambda d: ", ".join(f"{k} {v:.2f}" for k, v in d.items()) or "-"  # noqa: E731
        table.append(f"| {r['dataset']} | {r['mode']} | {r['labelled_slices']} | {r['held_out_dice']:.3f} | "
                     f"{fmt(r['own_dice'])} | {fmt(r['other_dice'])} | {r['seconds']:.0f} |")
    print("\n".join(table))
    results["table"] = table
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")
    if args.figure:
        plot(results, args.figure)
    return results


def plot(results: dict, path) -> None:
    """Held-out Dice against labelled slices (one line per data set and mode) and, for the most
    slices, against seconds of training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_slices, by_seconds) = plt.subplots(1, 2, figsize=(12, 4.2))
    lines = {}
    for run in results["runs"]:
        lines.setdefault((run["dataset"].split(" (")[0], run["mode"]), []).append(
            (run["labelled_slices"], run["held_out_dice"]))
    for (dataset, mode), points in lines.items():
        by_slices.plot(*zip(*sorted(points)), marker="o", linestyle="-" if mode == "finetune" else "--",
                       label=f"{dataset}, {mode}")
    by_slices.set(xscale="log", xlabel="labelled slices", ylabel="held-out Dice", ylim=(0, 1),
                  title="Held-out Dice after a fixed number of steps")
    by_slices.legend(fontsize=7)
    for name, curve in results["curves"].items():
        dataset, mode, slices = name.rsplit(", ", 2)
        if curve:
            by_seconds.plot(*zip(*curve), label=f"{dataset.split(' (')[0]}, {mode}, {slices}",
                            linestyle="-" if mode == "finetune" else "--")
    by_seconds.set(xlabel="seconds of training (2-core CPU)", ylabel="held-out Dice", ylim=(0, 1),
                   title="Learning curve, most labelled slices")
    by_seconds.legend(fontsize=7)
    figure.suptitle(f"Teaching from random weights ({results['model']}; {results['machine']})", fontsize=10)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
