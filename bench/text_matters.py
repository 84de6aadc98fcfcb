"""Does the text earn its place? VLSM with and without negative prompts, and the image-only UNet, at
an equal CPU budget, on the same data, loaders, recipe and evaluation.

    python bench/text_matters.py                       # CVC-ClinicDB + synthetic, ~50 minutes on 2 cores
    python bench/text_matters.py --task synthetic      # ~8 minutes

Tasks:
- ``cvc``: the paper's CVC-ClinicDB split (``../shared/reference/medvlsm-anns/clinicdb_polyp.*.json``,
  images from ``../shared/data/cvc-clinicdb``): the last 10 % of the training entries validate, the
  61 test entries are scored. VLSMs train on ``--prompt-type random`` (as in issue 24's measurement).
- ``synthetic``: ``Testing/synthetic.py``'s images, each holding a red circle and a blue square with
  one entry per object: only the text says which one is wanted (an image-only model cannot know).

Variants: a small CLIPSeg from random weights without negatives (``--negative-ratio 0``), the same
with the default negatives, and MONAI's BasicUNet (small, 0.50 M parameters). Each trains in its own
process until the epoch in which it has spent ``--budget`` CPU-seconds (``finetune --cpu-seconds``);
the table gives the training process's CPU-seconds as measured by the OS (``getrusage``).

Scores on the test split: right-prompt Dice (p1 and, for the VLSMs, p6), and from ``evaluate
--robustness``: wrong-prompt Dice (against the truth), the empty-mask rate of the wrong prompts and the
Dice between right- and wrong-prompt masks (1: the text is ignored). Writes
``bench/results/text_matters.{json,md}``. Random initial weights everywhere (no pretrained weights are
reachable here): these are small models trained from scratch, not the paper's pretrained ones.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path[:0] = [str(ROOT / "Testing"), str(ROOT / "bench")]

VARIANTS = {  # name -> finetune arguments
    "CLIPSeg small, no negatives": ["--model", "{small}", "--negative-ratio", "0"],
    "CLIPSeg small, negatives 0.25": ["--model", "{small}", "--negative-ratio", "0.25"],
    "UNet small (image only)": ["--arch", "unet", "--size", "small"],
    "UNet small, input 176 (image only)": ["--model", "{unet176}"],  # 4x fewer pixels: more epochs per CPU-second
}


def cvc_task(work: Path) -> dict:
    anns, data = SHARED / "reference" / "medvlsm-anns", SHARED / "data" / "cvc-clinicdb"
    if not (anns / "clinicdb_polyp.train.json").is_file() or not (data / "images").is_dir():
        raise SystemExit(f"CVC-ClinicDB needs {anns} and {data} (the shared data folder)")
    train = json.loads((anns / "clinicdb_polyp.train.json").read_text(encoding="utf-8"))
    n_val = len(train) // 10
    for name, part in (("train", train[:-n_val]), ("val", train[-n_val:])):
        (work / f"{name}.json").write_text(json.dumps(part), encoding="utf-8")
    return {"train": work / "train.json", "val": work / "val.json", "test": anns / "clinicdb_polyp.test.json",
            "images": data / "images", "masks": data / "masks", "prompt_type": ["random"], "score": ["p1", "p6"]}


def synthetic_task(work: Path) -> dict:
    from synthetic import two_object_images, write_split

    entries = two_object_images(work / "data", 140, seed=0)
    for name, part in (("train", entries[:200]), ("val", entries[200:240]), ("test", entries[240:])):
        write_split(work, name, part)
    return {"train": work / "train.json", "val": work / "val.json", "test": work / "test.json",
            "images": work / "data" / "images", "masks": work / "data" / "masks", "prompt_type": ["p3"],
            "score": ["p3"]}


def train(task: dict, variant: list, output: Path, budget: float, starts: dict) -> dict:
    argv = [sys.executable, "-m", "medvlsm.cli", "finetune", "--train", str(task["train"]), "--val", str(task["val"]),
            "--images", str(task["images"]), "--masks", str(task["masks"]), "--output", str(output),
            "--prompt-type", *task["prompt_type"], "--epochs", "1000", "--patience", "1000",
            "--cpu-seconds", str(budget), *[a.format(**starts) for a in variant]]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"finetune failed: {done.stderr[-2000:]}")
    card = (output / "README.md").read_text(encoding="utf-8")
    epochs = next(line for line in card.splitlines() if line.startswith("| epochs run"))
    return {"cpu_seconds": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime),
            "wall_seconds": round(time.perf_counter() - started), "epochs": epochs.split("|")[2].strip()}


def score(task: dict, folder: Path) -> dict:
    from medvlsm import evaluation
    from medvlsm.datasets import read_annotations
    from medvlsm.engine import Engine
    from medvlsm.models import architecture, load_model

    engine = Engine(load_model(folder), device="cpu", precision="fp32", cache_bytes=256 << 20)
    items = read_annotations(task["test"], task["images"], task["masks"])
    reads_text = architecture(engine.model.spec.arch).reads_text
    types = task["score"] if reads_text else task["score"][:1]
    rows = evaluation.evaluate_model(engine, items, types, resize=engine.model.spec.resize)
    out = {f"dice_{t}": sum(r["dice"] for r in rows if r["prompt_type"] == t) / len(items) for t in types}
    robust = evaluation.robustness(engine, items, task["score"][0], resize=engine.model.spec.resize)
    out.update({k: robust[k] for k in ("wrong_prompt_dice", "wrong_prompt_empty_rate", "right_wrong_mask_dice")})
    return out


def table(results: dict) -> list[str]:
    lines = []
    for task, rows in results["tasks"].items():
        lines += [f"### {task}", "", "| model | CPU-s | epochs (best) | right-prompt Dice | wrong-prompt Dice | "
                  "wrong prompts empty | right/wrong mask Dice |", "|---|---|---|---|---|---|---|"]
        for name, r in rows.items():
            right = ", ".join(f"{k[5:]} {v:.3f}" for k, v in r.items() if k.startswith("dice_"))
            lines.append(f"| {name} | {r['cpu_seconds']} | {r['epochs']} | {right} | {r['wrong_prompt_dice']:.3f} | "
                         f"{100 * r['wrong_prompt_empty_rate']:.0f} % | {r['right_wrong_mask_dice']:.3f} |")
        lines.append("")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["cvc", "synthetic", "both"], default="both")
    p.add_argument("--budget", type=float, default=900.0, help="CPU-seconds of training per model (cvc)")
    p.add_argument("--synthetic-budget", type=float, default=150.0, help="CPU-seconds per model (synthetic)")
    p.add_argument("--work", default=None)
    p.add_argument("--only", nargs="+", default=None, metavar="VARIANT",
                   help="run these variants only and merge them into the existing results file")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "text_matters"))
    args = p.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="medvlsm-text-"))
    from medvlsm.cli import main as medvlsm

    starts = {"small": work / "clipseg-small", "unet176": work / "unet-small-176"}
    if not starts["small"].is_dir():
        assert medvlsm(["init", "--size", "small", "--output", str(starts["small"])]) == 0
    if not starts["unet176"].is_dir():
        assert medvlsm(["init", "--arch", "unet", "--size", "small", "--input-size", "176", "--output",
                        str(starts["unet176"])]) == 0
    tasks = {"synthetic": (synthetic_task, args.synthetic_budget), "cvc": (cvc_task, args.budget)}
    wanted = list(tasks) if args.task == "both" else [args.task]
    from bench_engine import machine

    results = {"machine": machine(), "tasks": {}}
    if args.only and Path(args.out + ".json").is_file():
        results = json.loads(Path(args.out + ".json").read_text(encoding="utf-8"))
    for name in wanted:
        make, budget = tasks[name]
        folder = work / name
        folder.mkdir(exist_ok=True)
        task = make(folder)
        rows = results["tasks"].setdefault(f"{name} (budget {budget:g} CPU-s)", {})
        for variant, extra in VARIANTS.items():
            if args.only and variant not in args.only:
                continue
            output = folder / variant.split(",")[0].split()[0].lower() / variant.replace(" ", "_").replace(",", "")
            print(f"{name}: training {variant} ...", flush=True)
            rows[variant] = {**train(task, extra, output, budget, starts), **score(task, output)}
            print(f"  {rows[variant]}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    Path(args.out + ".md").write_text("\n".join(table(results)), encoding="utf-8")
    print("\n".join(table(results)))


if __name__ == "__main__":
    main()
