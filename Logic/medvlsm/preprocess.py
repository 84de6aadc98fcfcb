"""Slices -> model input and model output -> slices, in torch on the compute device.

Two composable steps, as MONAI transforms would be:

- ``window.IntensityWindow``: raw voxel values -> [0, 1], chosen once per volume (``window.py``);
- ``Letterbox``: a ``rows x cols`` slice -> the model's square input, keeping the *physical*
  aspect ratio (pixel spacing), centred on black; ``Letterbox.restore`` inverts it exactly for
  the logits. ``mode="stretch"`` squashes to the square as the paper did.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import InputError
from .window import IntensityWindow

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
