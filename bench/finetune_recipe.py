"""Which finetuning settings make a small model learn to tell two prompts apart (the recipe table of docs/finetune.md).

    python bench/finetune_recipe.py [--epochs 15] [--only NAME ...] [--json bench/results/finetune-recipe.json]

The task (``Testing/synthetic.py``): 140 images with a red circle and a blue square each; one sample
per (image, object), its prompt "red circle" / "blue square" (p3); 200 samples train, 40 validate,
40 test. A small CLIPSeg from random weights (``medvlsm init --size small``, seed 0) is finetuned with
each variant below, changing one setting of the paper's recipe at a time, then the test images are
segmented with both prompts: Dice of each prompt on its own object and on the other one. Learned =
own >= 0.8 and other <= 0.2 for both prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Testing"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_engine import machine  # noqa: E402

PAPER = dict(lr=2e-3, ce_weight=0.2, grad_clip=0.5, scheduler="plateau", batch_size=16)
TRANSFORMERS_INIT = {"decoder_init": "transformers"}  # the decoder as transformers' _init_weights leaves it
VARIANTS = {  # name -> (changes to the paper's recipe, input side)
    "paper, transformers init": (TRANSFORMERS_INIT, 352),
    "paper": ({}, 352),
    **{f"{name}, transformers init": ({**TRANSFORMERS_INIT, **changes}, size) for name, (changes, size) in {
        "lr 1e-3": ({"lr": 1e-3}, 352), "lr 3e-4": ({"lr": 3e-4}, 352), "BCE weight 1": ({"ce_weight": 1.0}, 352),
        "no clipping": ({"grad_clip": 0.0}, 352), "cosine": ({"scheduler": "cosine"}, 352), "input 160": ({}, 160),
        "batch 4": ({"batch_size": 4}, 352)}.items()},
    "lr 1e-3": ({"lr": 1e-3}, 352),
    "BCE weight 1": ({"ce_weight": 1.0}, 352),
    "batch 4": ({"batch_size": 4}, 352),
    # bf16 autocast on the CPU: meaningful only where the CPU has native bf16 (avx512_bf16 / AMX)
    "paper, bf16": ({"precision": "bf16"}, 352),
    "lr 1e-3, bf16": ({"lr": 1e-3, "precision": "bf16"}, 352),
}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / float(total)


def run(name, changes, size, data, splits, epochs, work):
    from medvlsm import io, training
    from medvlsm.datasets import read_annotations
    from medvlsm.engine import Engine
    from medvlsm.models.clipseg import CLIPSeg

    changes = dict(changes)
    model_init = changes.pop("decoder_init", "torch")
    model = CLIPSeg.random("small", name="small", seed=0, decoder_init=model_init)
    model.spec.input_size = size
    images, masks = data / "images", data / "masks"
    train = training.samples_from_annotations(read_annotations(splits["train"], images, masks), model.spec)
    val = training.samples_from_annotations(read_annotations(splits["val"], images, masks), model.spec)
    config = replace(training.TrainConfig(epochs=epochs, prompt_types=["p3"], precision="fp32",
                                          device="cpu", patience=epochs), **{**PAPER, **changes})
    started = time.perf_counter()
    summary = training.finetune(model, train, val, work / name.replace(" ", "_"), config)
    seconds = time.perf_counter() - started
    engine = Engine(model.eval(), device="cpu", precision="fp32")
    own, other = {}, {}
    tests = json.loads(Path(splits["test"]).read_text(encoding="utf-8"))
    by_image = {}
    for e in tests:
        by_image.setdefault(e["img_name"], {})[e["prompts"]["p3"]] = e["mask_name"]
    for image_name, targets in by_image.items():
        result = engine.segment(io.read_image(images / image_name), list(targets))
        truth = {p: io.read_image(masks / m).array[0] > 127 for p, m in targets.items()}
        for p, prompt in enumerate(result.prompts):
            other_prompt = next(q for q in truth if q != prompt)
            own.setdefault(prompt, []).append(dice(result.masks()[p, 0], truth[prompt]))
            other.setdefault(prompt, []).append(dice(result.masks()[p, 0], truth[other_prompt]))
    row = {"variant": name, "input": size, **{**PAPER, **changes}, "decoder_init": model_init, "epochs": epochs,
           "seconds": round(seconds),
           "best_val_dice": round(summary["best_val_dice"], 3),
           **{f"own {p}": round(float(np.mean(v)), 3) for p, v in own.items()},
           **{f"other {p}": round(float(np.mean(v)), 3) for p, v in other.items()}}
    row["learned"] = all(row[f"own {p}"] >= 0.8 and row[f"other {p}"] <= 0.2 for p in own)
    print(json.dumps(row), flush=True)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--only", nargs="+", default=None, help="variant names (default: all)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from synthetic import two_object_images, write_split

    import torch

    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="medvlsm-recipe-"))
    entries = two_object_images(work / "data", 140, seed=0)
    splits = {}
    for name, part in (("train", entries[:200]), ("val", entries[200:240]), ("test", entries[240:])):
        write_split(work, name, part)
        splits[name] = work / f"{name}.json"
    rows = [run(name, changes, size, work / "data", splits, args.epochs, work)
            for name, (changes, size) in VARIANTS.items() if args.only is None or name in args.only]
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2), encoding="utf-8")
    return rows


if __name__ == "__main__":
    main()
