"""Slices -> model input and model output -> slices, in torch on the compute device.

Two composable steps, as MONAI transforms would be:

- ``IntensityWindow``: raw voxel values -> [0, 1] (CT windows in HU, robust percentiles for MR
  and other images, /255 for 8-bit photos), computed once per volume so every slice of a volume
  is normalised the same way;
- ``Letterbox``: a ``rows x cols`` slice -> the model's square input, keeping the *physical*
  aspect ratio (pixel spacing), centred on black; ``Letterbox.restore`` inverts it exactly for
  the logits. ``mode="stretch"`` squashes to the square as the paper did.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

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
    1 % of voxels at -500 HU or below and tissue above 100) -> the abdomen soft-tissue window;
    anything else (MR, PET, ...) -> 0.5-99.5 percentiles.
    A window may also be given as ``"LEVEL,WIDTH"``.
    """
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
        level, width = CT_WINDOWS["abdomen"]
        return IntensityWindow(level - width / 2, level + width / 2, "abdomen (auto: CT range detected)")
    low, high = np.percentile(sample, [0.5, 99.5])
    if high <= low:
        high = low + 1.0  # constant image: everything maps to 0, the model sees a black slice
    return IntensityWindow(float(low), float(high), f"percentiles 0.5-99.5 ({low:.4g} to {high:.4g})")


@dataclass(frozen=True)
class Letterbox:
    """Placement of a ``rows x cols`` slice inside the ``size x size`` model input."""

    rows: int
    cols: int
    size: int
    height: int
    width: int
    top: int
    left: int

    @classmethod
    def fit(cls, rows: int, cols: int, pixel_spacing=(1.0, 1.0), size: int = 352, mode: str = "letterbox") -> "Letterbox":
        if mode == "stretch":
            return cls(rows, cols, size, size, size, 0, 0)
        if mode != "letterbox":
            raise InputError(f"Unknown resize mode {mode!r}", "Use letterbox (keeps the aspect ratio) or stretch (as the paper)")
        phys_h, phys_w = rows * pixel_spacing[0], cols * pixel_spacing[1]
        scale = size / max(phys_h, phys_w)
        height = int(min(size, max(1, round(phys_h * scale))))
        width = int(min(size, max(1, round(phys_w * scale))))
        return cls(rows, cols, size, height, width, (size - height) // 2, (size - width) // 2)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, rows, cols]`` in [0, 1] -> ``[B, C, size, size]``, black around the image."""
        resized = F.interpolate(images, size=(self.height, self.width), mode="bilinear",
                                align_corners=False, antialias=self.height < self.rows or self.width < self.cols)
        if (self.height, self.width) == (self.size, self.size):
            return resized
        out = images.new_zeros(images.shape[0], images.shape[1], self.size, self.size)
        out[:, :, self.top : self.top + self.height, self.left : self.left + self.width] = resized
        return out

    def restore(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B, P, size, size]`` -> ``[B, P, rows, cols]`` on the slice's own pixels."""
        crop = logits[:, :, self.top : self.top + self.height, self.left : self.left + self.width]
        return F.interpolate(crop.float(), size=(self.rows, self.cols), mode="bilinear", align_corners=False)


def to_model_input(slices: torch.Tensor, window: IntensityWindow, box: Letterbox, mean, std) -> torch.Tensor:
    """Raw slices ``[B, rows, cols]`` or ``[B, rows, cols, 3]`` -> normalised ``[B, 3, S, S]``."""
    x = window(slices)
    x = x.permute(0, 3, 1, 2) if x.ndim == 4 else x[:, None].expand(-1, 3, -1, -1)
    x = box.apply(x)
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device)[None, :, None, None]
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device)[None, :, None, None]
    return (x - mean_t) / std_t
