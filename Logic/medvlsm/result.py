"""A segmentation's probabilities and how they were made (numpy only: the server's clients use it too)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import postprocess
from .request import Request
from .volume import Volume


@dataclass
class SegmentationResult:
    """Probabilities ``[P, K, J, I]`` on the input volume's grid, and how they were made.

    ``threshold`` is the request's, else the model's; ``window`` says which intensity window was
    used (``request.window`` is the window itself).
    """

    grid: Volume
    request: Request
    probabilities: np.ndarray
    threshold: float
    model_name: str
    trained: bool
    device: str
    dtype: str
    seconds: float
    warnings: list = field(default_factory=list)
    from_cache: bool = False

    @property
    def prompts(self) -> list:
        return list(self.request.prompts)

    @property
    def plane(self) -> str:
        return self.request.plane

    @property
    def slice_range(self) -> tuple:
        return self.request.slices

    @property
    def window(self) -> str:
        return self.request.window.describe

    def masks(self, threshold: float | None = None, post: postprocess.PostProcess | None = None) -> np.ndarray:
        """Binary masks ``[P, K, J, I]`` at ``threshold`` with ``post`` (default: the request's);
        re-thresholding is instant (no model run)."""
        t = self.threshold if threshold is None else threshold
        masks = postprocess.threshold(self.probabilities, t)
        post = self.request.post if post is None else post
        if post.active:
            masks = np.stack([post(m) for m in masks])
        return masks

    def labelmap(self, threshold: float | None = None, post: postprocess.PostProcess | None = None,
                 masks: np.ndarray | None = None) -> np.ndarray:
        """Labels ``[K, J, I]`` (i + 1 = prompt i; overlaps to the higher probability); ``masks``: the
        ``masks(threshold, post)`` already made, so the clean-up runs once."""
        return postprocess.labelmap(self.masks(threshold, post) if masks is None else masks, self.probabilities)
