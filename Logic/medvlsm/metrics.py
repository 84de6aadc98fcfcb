"""Per-case segmentation metrics with MONAI, in millimetres where distances are involved.

Conventions (the paper's, and stated for the edge cases it leaves open):

- Dice and IoU: empty truth and empty prediction score 1 (MONAI ``ignore_empty=False``);
- HD95 (mm): 0 when both are empty, NaN when exactly one is empty (no distance exists);
- NSD at a tolerance in mm: 1 when both are empty, 0 when exactly one is empty.
"""

from __future__ import annotations

import math
import warnings

import numpy as np


def _onehot(mask: np.ndarray):
    import torch

    return torch.as_tensor(np.asarray(mask, dtype=bool)[None, None].astype(np.float32))


def score(prediction: np.ndarray, truth: np.ndarray, spacing=None, nsd_tolerance_mm: float = 2.0) -> dict:
    """Binary ``prediction`` and ``truth`` (same 2D or 3D shape) -> dice, iou, hd95, nsd.

    ``spacing``: physical size of one pixel/voxel per array axis (numpy order), default 1.
    """
    from monai.metrics import compute_dice, compute_iou

    prediction, truth = np.asarray(prediction) > 0, np.asarray(truth) > 0
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {prediction.shape} and truth {truth.shape} differ in shape")
    spacing = tuple(float(s) for s in (spacing or (1.0,) * truth.ndim))
    p, t = _onehot(prediction), _onehot(truth)
    result = {
        "dice": float(compute_dice(p, t, include_background=True, ignore_empty=False)),
        "iou": float(compute_iou(p, t, include_background=True, ignore_empty=False)),
    }
    if prediction.any() and truth.any():
        with warnings.catch_warnings():  # MONAI >= 1.5 warns about its own internal arguments
            warnings.simplefilter("ignore", FutureWarning)
            result.update(_distances(p, t, spacing, nsd_tolerance_mm))
    else:
        both_empty = not prediction.any() and not truth.any()
        result["hd95"] = 0.0 if both_empty else math.nan
        result["nsd"] = 1.0 if both_empty else 0.0
    return result


def _distances(p, t, spacing, tolerance_mm) -> dict:
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    return {
        "hd95": float(compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=spacing)),
        "nsd": float(compute_surface_dice(p, t, [tolerance_mm], include_background=True, spacing=spacing)),
    }


def mean_std(values) -> tuple[float, float, int]:
    """Mean, standard deviation and count of the finite values."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
    if len(v) == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std()), len(v)
