"""A segmentation's probabilities and how they were made (numpy only: the server's clients use it too)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import postprocess
from .postprocess import LEVELS
from .request import Request
from .volume import Volume


@dataclass
class SegmentationResult:
    """Probabilities ``[P, K, J, I]`` on the input volume's grid, and how they were made.

    ``probabilities`` are uint8, each the probability x 255 rounded (``postprocess.quantise``): one byte
    per voxel and prompt instead of four; a mask at any threshold is the float32 mask except where the
    probability lies within half a step (1/510) of the threshold (``Testing/test_engine.py`` checks it).
    ``threshold`` is the request's, else the model's; ``window`` says which intensity window was used
    (``request.window`` is the window itself).
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

    def mask(self, prompt: int, threshold: float | None = None, post: postprocess.PostProcess | None = None):
        """One prompt's binary mask ``[K, J, I]`` (as ``masks`` makes them all)."""
        t = self.threshold if threshold is None else threshold
        mask = postprocess.threshold(self.probabilities[prompt], t)
        post = self.request.post if post is None else post
        return post(mask) if post.active else mask

    def labelmap(self, threshold: float | None = None, post: postprocess.PostProcess | None = None,
                 masks: np.ndarray | None = None) -> np.ndarray:
        """Labels ``[K, J, I]`` (i + 1 = prompt i; overlaps to the higher probability); ``masks``: the
        ``masks(threshold, post)`` already made, so the clean-up runs once; else each prompt's mask is
        made when its turn comes (one at a time: a byte per voxel, not one per prompt)."""
        if masks is None:
            masks = _OneAtATime(self, threshold, post)
        return postprocess.labelmap(masks, self.probabilities)

    def release_masks(self, threshold: float | None = None, post: postprocess.PostProcess | None = None):
        """The masks ``[P, K, J, I]``, cut into the probabilities' own buffer: no second byte per voxel
        and prompt. The result holds no probabilities afterwards (``probabilities`` is None): for the
        last step of a run that writes its files and ends (the command line)."""
        buffer, self.probabilities = self.probabilities, None
        t = LEVELS * (self.threshold if threshold is None else threshold)
        post = self.request.post if post is None else post
        masks = buffer.view(bool)
        for p in range(len(buffer)):
            for k in range(0, buffer.shape[1], postprocess.SLAB):  # numpy copies an input that overlaps its
                np.greater(buffer[p, k : k + postprocess.SLAB], t,  # output: a slab's copy, not a volume's
                           out=masks[p, k : k + postprocess.SLAB])
            if post.active:
                masks[p] = post(masks[p])
        return masks


class _OneAtATime:
    """A result's masks as a sequence that makes ``masks[p]`` when asked (``postprocess.labelmap``)."""

    def __init__(self, result, threshold, post):
        self.result, self.threshold, self.post = result, threshold, post

    def __len__(self):
        return len(self.result.probabilities)

    def __getitem__(self, p):
        return self.result.mask(p, self.threshold, self.post)
