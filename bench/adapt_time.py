"""How long teaching takes on a CPU: ``finetune --adapt`` (the decoder only, on features encoded once)
against a full finetune, full-size CLIPSeg (random weights: the time does not depend on them), one
structure labelled on 20 slices of a 512 x 512 CT-like volume.

    python bench/adapt_time.py [--epochs 10]        # ~5 minutes on a 2-core CPU

Prints and writes ``bench/results/adapt_time.json``: the wall time of the whole Adapt command
(reading, feature encoding and every epoch) and of one full-finetune epoch. The target (issue 23):
one Adapt on 20 labelled slices <= 60 s including the feature encoding.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def case(folder: Path, slices: int = 20, size: int = 512) -> None:
    import bench_engine

    from medvlsm import io

    (folder / "volumes").mkdir(parents=True)
    (folder / "segmentations").mkdir()
    bench_engine.make_volume(slices, size, folder / "volumes" / "case.nrrd")
    volume = io.read_image(folder / "volumes" / "case.nrrd")
    organ = volume.array > 100  # the bright "organ" make_volume draws on every slice
    io.write_seg_nrrd(volume, organ[None], ["liver"], folder / "segmentations" / "case.seg.nrrd")


def timed(argv: list) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "medvlsm.cli", "--quiet", *argv], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    return time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--json", default=str(HERE / "results" / "adapt_time.json"))
    args = p.parse_args(argv)
    from bench_engine import machine

    work = Path(tempfile.mkdtemp(prefix="medvlsm-adapt-"))
    case(work)
    subprocess.run([sys.executable, "-m", "medvlsm.cli", "init", "--size", "full", "-o", str(work / "full")],
                   check=True, capture_output=True)
    data = ["--volumes", str(work / "volumes"), "--segmentations", str(work / "segmentations"), "--model",
            str(work / "full"), "--empty-fraction", "0", "--batch-size", "4"]
    adapt = timed(["finetune", *data, "--adapt", "--epochs", str(args.epochs), "-o", str(work / "adapted")])
    full = timed(["finetune", *data, "--epochs", "1", "-o", str(work / "finetuned")])
    result = {"machine": machine(), "labelled_slices": 20, "slice": "512 x 512", "model": "CLIPSeg full (150.7 M)",
              "adapt_epochs": args.epochs, "adapt_seconds_total": round(adapt, 1),
              "full_finetune_seconds_one_epoch": round(full, 1)}
    print(json.dumps(result, indent=2))
    Path(args.json).write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
