"""Parameters, FLOPs per slice and seconds per slice of each architecture (the model table of docs/models.md).

    python bench/model_table.py [--slices 16] [--json bench/results/models-cpu.json]

FLOPs are counted by ``torch.utils.flop_counter`` for one slice and one prompt through the path the
engine runs (image encoder up to the deepest layer the decoder reads + decoder; the text encoder is
counted separately: it runs once per prompt). Seconds per slice: the engine on a CT-like volume of
``--slices`` 256 x 256 slices, fp32 and bf16, random weights (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import machine  # noqa: E402

from medvlsm.engine import Engine  # noqa: E402
from medvlsm.models import ARCHITECTURES  # noqa: E402
from medvlsm.volume import Volume  # noqa: E402


def gflops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops() / 1e9


def measure(arch, slices: int) -> dict:
    model = arch.random("full")
    size = model.spec.input_size
    pixels = torch.randn(1, 3, size, size)
    image = gflops(lambda: model.decode(model.encode_images(pixels), model.encode_text(["liver"]).detach()))
    text = gflops(lambda: model.encode_text(["liver"]))
    row = {"model": arch.title, "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6, "input": size,
           "gflop_per_slice": image - text, "gflop_per_prompt": text}
    rng = np.random.default_rng(0)
    volume = Volume((rng.normal(0, 300, (slices, 256, 256))).astype(np.int16), (0.7, 0.7, 2.0))
    for precision in ("fp32", "bf16"):
        engine = Engine(model, device="cpu", precision=precision)
        engine.segment(volume, ["liver"], slices=(0, engine.batch_size))  # warm-up
        start = time.perf_counter()
        engine.segment(volume, ["liver"])
        row[f"s_per_slice_{precision}"] = (time.perf_counter() - start) / slices
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slices", type=int, default=16)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rows = [measure(arch, args.slices) for arch in ARCHITECTURES.values()]
    print(f"Machine: {machine()}\n")
    print("| model | parameters | input | GFLOP / slice | GFLOP / prompt | s / slice fp32 | s / slice bf16 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['parameters_m']:.1f} M | {r['input']} | {r['gflop_per_slice']:.1f} | "
              f"{r['gflop_per_prompt']:.2f} | {r['s_per_slice_fp32']:.3f} | {r['s_per_slice_bf16']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2), encoding="utf-8")
    return rows


if __name__ == "__main__":
    main()
