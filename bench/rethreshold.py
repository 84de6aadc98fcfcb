"""The panel's threshold slider: how long one re-cut of the preview takes on real MRML (slicer-core).

    python bench/rethreshold.py [--shape 300 512 512] [--prompts 3] [--repeats 5] [--json out.json]

A volume node of ``--shape`` voxels, a preview of ``--prompts`` segments from noisy ball-shaped
probabilities of ``--radius`` (a fraction of the volume's half-width: 0.3 is organ-sized, a liver in
an abdominal CT; 0.85 covers most of the volume), then re-cuts at alternating thresholds (what a
slider release does): the time per re-cut (the median of ``--repeats``), split into the threshold
itself and the preview update.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "MedVLSMSlicer"))
from bench_engine import machine, report  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512), metavar=("K", "J", "I"))
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--radius", type=float, default=0.3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import slicer
    import slicer.util
    from MedVLSMSlicerLib import mrml_glue as glue
    from MedVLSMSlicerLib.session import Session, Settings

    from medvlsm.result import SegmentationResult
    from medvlsm.volume import Volume

    scene = slicer.vtkMRMLScene()
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if not factory.GetConverterRules():  # what the Segmentations module registers at Slicer's start
        for rule in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
                     slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):
            factory.RegisterConverterRule(rule())
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    shape = tuple(args.shape)
    slicer.util.updateVolumeFromArray(node, np.zeros(shape, np.int16))
    rng = np.random.default_rng(0)
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij", sparse=True)
    r2 = args.radius ** 2
    probabilities = np.stack([np.clip(0.5 + (r2 - (k - c) ** 2 - j**2 - i**2) / r2 + 0.05 * rng.standard_normal(shape, np.float32),
                                      0, 1) for c in np.linspace(-0.4, 0.4, args.prompts)]).astype(np.float32)
    prompts = [f"structure {n}" for n in range(args.prompts)]
    session = Session(scene)
    session.last_result = SegmentationResult(
        grid=Volume(np.broadcast_to(np.int16(0), shape)), request=None, probabilities=probabilities, threshold=0.5,
        model_name="bench", trained=False, device="cpu", dtype="float32", seconds=0.0, warnings=[], from_cache=False)
    settings = Settings(prompts=prompts, threshold=0.5)
    session.preview = glue.Preview(scene, node, session.masks(settings), prompts)
    cut, update = [], []
    for n in range(args.repeats):
        settings.threshold = 0.4 if n % 2 else 0.6
        t0 = time.perf_counter()
        masks = session.masks(settings)
        t1 = time.perf_counter()
        session.preview.set_masks(masks)
        t2 = time.perf_counter()
        cut.append(t1 - t0)
        update.append(t2 - t1)
    total = [a + b for a, b in zip(cut, update)]
    return report({"machine": machine(), "shape": list(shape), "prompts": args.prompts, "radius": args.radius,
                   "covered": float(session.preview.masks.mean()),
                   "rethreshold_s": float(np.median(total)), "threshold_s": float(np.median(cut)),
                   "preview_update_s": float(np.median(update))}, args.json)


if __name__ == "__main__":
    main()
