"""The README's picture: a real MR segmented by the pipeline after it was taught — made honestly.

    python bench/readme_figure.py [--epochs 60] [--output Resources/Screenshots/brain-mr-lesion.png]

No medical weights are published and open-domain VLSMs do not transfer zero-shot, so a picture of a
segmentation needs a taught model. This finetunes a small CLIPSeg from random weights on the one
labelled pyradiomics brain MR (``../shared/data``: a lesion, BSD-3) with ``--plane all`` through the
command line, segments that same volume with the prompt "lesion" (all three planes, fused) and draws
the reference and the result on it. It shows the pipeline after teaching on a case it was taught —
not a validated model: one labelled volume does not transfer to another (docs/segment.md).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fusion_3d import SHARED, finetune, write_case  # noqa: E402

from medvlsm import io  # noqa: E402
from medvlsm.engine import Engine  # noqa: E402
from medvlsm.metrics import score  # noqa: E402
from medvlsm.models import load_model  # noqa: E402
from medvlsm.overlay import OverlayStyle, save_overlay  # noqa: E402
from medvlsm.request import plan  # noqa: E402
from medvlsm.volume import Volume  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--input-size", type=int, default=160)
    parser.add_argument("--output", default=str(ROOT / "Resources" / "Screenshots" / "brain-mr-lesion.png"))
    args = parser.parse_args(argv)
    volume = io.read_image(SHARED / "brain1_image.nrrd")
    truth = io.read_image(SHARED / "brain1_label.nrrd").array > 0
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        write_case(work / "data", "brain1", volume, {"lesion": truth})
        finetune(work / "data", work / "model", args.epochs, args.input_size)
        engine = Engine(load_model(str(work / "model") + "-ft"), device="cpu")
        result = engine.segment(volume, plan(volume, ["lesion"], plane="all"))
    mask = result.masks()[0]
    dice = score(mask, truth, volume.spacing[::-1])["dice"]
    title = (f"Brain MR (pyradiomics): the lesion labelled (green) and segmented (red) by a small CLIPSeg taught "
             f"on this same volume, {args.epochs} epochs; Dice {dice:.2f}. A taught case, not a validated model")
    slab = slice(*(lambda k: (k.min(), k.max() + 1))(np.flatnonzero(truth.any(axis=(1, 2)))))  # the lesion's slices
    shown = Volume(volume.array[slab], volume.spacing, volume.origin, volume.direction)
    save_overlay(shown, np.stack([truth[slab], mask[slab]]), ["reference", "MedVLSM, prompt 'lesion'"], args.output,
                 OverlayStyle(plane="axial", count=3, title=title, colors=((0.1, 0.8, 0.2), (0.95, 0.2, 0.2))))
    print(f"Dice {dice:.3f} -> {args.output}")
    return {"dice": dice, "epochs": args.epochs}


if __name__ == "__main__":
    main()
