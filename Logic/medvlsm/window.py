"""Intensity windows: raw voxel values -> [0, 1], chosen once per volume (numpy only, no torch).

CT windows in HU, robust percentiles for MR and other images, /255 for 8-bit photos; every slice
of a volume is normalised the same way. A window is part of a segmentation request
(``request.plan``), so it is chosen where the request is made and travels with it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .errors import InputError

log = logging.getLogger("medvlsm")

# (level, width) in HU
CT_WINDOWS = {
    "abdomen": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "mediastinum": (50.0, 350.0),
}
WINDOW_CHOICES = ("auto",) + tuple(CT_WINDOWS) + ("percentile", "none")


@dataclass(frozen=True)
class IntensityWindow:
    """Linear map of ``[low, high]`` to ``[0, 1]``, clipped. ``describe`` says why it was chosen."""

    low: float
    high: float
    describe: str

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` any shape, any real dtype -> float32 in [0, 1], same shape."""
        return ((x.float() - self.low) / (self.high - self.low)).clamp_(0.0, 1.0)


def _sample(array: np.ndarray, limit: int = 2_000_000) -> np.ndarray:
    flat = array.reshape(-1)
    step = max(1, flat.size // limit)
    return flat[::step]


def choose_window(volume, window: str = "auto") -> IntensityWindow:
    """Pick the intensity mapping for a whole volume.

    ``auto``: 8-bit images -> /255; CT (DICOM Modality, or without one a CT-like range: at least
    1 % of voxels at -500 HU or below and tissue above 100) -> the lung window for a chest CT (a tenth
    or more of the non-air voxels at -950..-600 HU), else the abdomen soft-tissue window;
    anything else (MR, PET, ...) -> 0.5-99.5 percentiles.
    A window may also be given as ``"LEVEL,WIDTH"``, or as an ``IntensityWindow`` already chosen.
    """
    if isinstance(window, IntensityWindow):
        return window
    a = volume.array
    window = (window or "auto").strip().lower()
    if window in CT_WINDOWS or "," in window:
        try:
            level, width = CT_WINDOWS[window] if window in CT_WINDOWS else (float(v) for v in window.split(","))
        except ValueError as e:
            raise InputError(f"Window {window!r} is not LEVEL,WIDTH", "Write e.g. --window 40,400 or a preset name") from e
        if not (np.isfinite(level) and np.isfinite(width) and width > 0):
            raise InputError(f"Window {window!r} needs a finite level and a positive width",
                             "Write e.g. --window 40,400 (or -600,1500 for lung)")
        sample = _sample(a)
        if sample.min() > -200 and window in CT_WINDOWS:
            log.warning("The image has no values below -200: it does not look like CT in HU, "
                        "so the %r window may show nothing. Try --window auto.", window)
        return IntensityWindow(level - width / 2, level + width / 2, f"{window} (level {level:g}, width {width:g})")
    if window not in ("auto", "percentile", "none"):
        raise InputError(f"Unknown window {window!r}", f"Use one of: {', '.join(WINDOW_CHOICES)}, or LEVEL,WIDTH")
    if window == "none" or (window == "auto" and a.dtype == np.uint8):
        return IntensityWindow(0.0, 255.0, "8-bit values / 255")
    sample = _sample(a).astype(np.float64)
    modality = getattr(volume, "modality", "")
    # Without a stated modality, CT is recognised by its air (at least 1 % of voxels at -500 HU or
    # below: one outlier voxel in an MR must not switch the rule) and tissue above 100.
    looks_ct = np.percentile(sample, 1) <= -500 and np.percentile(sample, 99) >= 100
    if window == "auto" and (modality == "CT" or (not modality and looks_ct)):
        # A chest CT (aerated lung, -950..-600 HU, is a tenth or more of what is not outside air): the
        # lung window, in which the lungs are not black and soft tissue stays visible; else abdomen.
        inside = sample[sample > -950]
        lung = float(np.mean(inside <= -600)) if inside.size else 0.0
        name, why = ("lung", f"chest CT: {lung:.0%} aerated lung") if lung >= 0.1 else ("abdomen", "CT range detected")
        level, width = CT_WINDOWS[name]
        return IntensityWindow(level - width / 2, level + width / 2, f"{name} (auto: {why})")
    low, high = np.percentile(sample, [0.5, 99.5])
    if high <= low:
        high = low + 1.0  # constant image: everything maps to 0, the model sees a black slice
    return IntensityWindow(float(low), float(high), f"percentiles 0.5-99.5 ({low:.4g} to {high:.4g})")
