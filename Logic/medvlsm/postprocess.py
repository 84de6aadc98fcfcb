"""Masks from probabilities: threshold, then optional 3D clean-up (scipy.ndimage)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PostProcess:
    """Options applied to each prompt's binary mask ``[K, J, I]``, in this order.

    keep_largest: keep only the largest 3D connected component (26-connectivity).
    min_voxels: remove 3D islands smaller than this many voxels (0: keep all).
    fill_holes: fill cavities enclosed in 3D.
    """

    keep_largest: bool = False
    min_voxels: int = 0
    fill_holes: bool = False

    @property
    def active(self) -> bool:
        return self.keep_largest or self.min_voxels > 0 or self.fill_holes

    def __call__(self, mask: np.ndarray) -> np.ndarray:
        if not self.active or not mask.any():
            return mask
        from scipy import ndimage

        structure = np.ones((3, 3, 3), bool)
        if self.keep_largest or self.min_voxels > 0:
            labels, count = ndimage.label(mask, structure=structure)
            sizes = np.bincount(labels.ravel(), minlength=count + 1)
            sizes[0] = 0
            keep = sizes >= max(1, self.min_voxels)
            if self.keep_largest:
                keep = np.zeros_like(keep)
                keep[int(sizes.argmax())] = True
            mask = keep[labels]
        if self.fill_holes:
            mask = ndimage.binary_fill_holes(mask)
        return mask


LEVELS = 255  # a probability is kept as round(p x 255) in a uint8: one step is 1/255


def quantise(probabilities):
    """Float probabilities in [0, 1] (numpy or torch) -> uint8 ``round(p x 255)``."""
    scaled = probabilities * LEVELS
    if isinstance(scaled, np.ndarray):
        return np.rint(scaled).astype(np.uint8)
    import torch

    return scaled.round().to(torch.uint8)


def threshold(probabilities: np.ndarray, value: float) -> np.ndarray:
    """``[..., K, J, I]`` probabilities (uint8 x 255, or float) -> bool, strictly above ``value``. On uint8
    the mask is the float mask except where the probability lies within half a step (1/510) of ``value``."""
    if probabilities.dtype == np.uint8:
        return probabilities > value * LEVELS
    return probabilities > value


SLAB = 8  # slices updated at a time: the labelmap's temporaries are a slab, not a volume


def labelmap(masks, probabilities: np.ndarray | None = None) -> np.ndarray:
    """Binary masks ``[P, K, J, I]`` -> labels ``[K, J, I]`` (0 = none, i + 1 = prompt i).

    ``masks``: an array, or any sequence whose ``masks[p]`` makes prompt p's mask when asked (so only
    one exists at a time). Where masks overlap, the prompt with the highest probability wins (the
    later prompt when no probabilities are given).
    """
    count = len(masks)
    if count == 0:
        return np.zeros(np.shape(masks)[1:], np.uint8)
    if probabilities is None or count == 1:
        labels = None
        for p in range(count):
            m = masks[p]
            if labels is None:
                labels = np.zeros(m.shape, np.uint16 if count > 255 else np.uint8)
            labels[m] = p + 1
        return labels
    labels = np.zeros(probabilities.shape[1:], np.uint16 if count > 255 else np.uint8)
    # Beside the labels, one mask at a time and slab-sized temporaries: the probability of each voxel's
    # current label is looked up per slab, not kept as a volume. Strict ">" keeps argmax's rule: on a
    # tie the earlier prompt wins; an unlabelled voxel of a mask takes the label whatever its
    # probability (filled holes may hold 0).
    for p in range(count):
        m = masks[p]
        for k in range(0, labels.shape[0], SLAB):
            lab, inside = labels[k : k + SLAB], m[k : k + SLAB]
            current = np.zeros(lab.shape, probabilities.dtype)  # the probability of each voxel's label so far
            for earlier in range(p):
                np.copyto(current, probabilities[earlier, k : k + SLAB], where=lab == earlier + 1)
            better = np.greater(probabilities[p, k : k + SLAB], current)
            better |= lab == 0
            better &= inside
            lab[better] = p + 1
        del m, inside  # this prompt's mask goes before the next one is made
    return labels
