"""A PNG montage of a few slices with the masks drawn on them (a quick look without a viewer)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .io import PALETTE
from .window import choose_window
from .volume import SliceView


def pick_slices(masks_views, count: int, n: int) -> list[int]:
    """Up to ``count`` of ``n`` slice indices, spread over the slices that hold a mask (else over all);
    ``masks_views``: each mask in the plane's slice order (views: no copy of any mask is made)."""
    held = np.zeros(n, bool)
    for m in masks_views:
        held |= m.any(axis=tuple(range(1, m.ndim)))
    hit = np.flatnonzero(held)
    pool = hit if len(hit) else np.arange(n)
    idx = np.linspace(0, len(pool) - 1, min(count, len(pool))).round().astype(int)
    return sorted(set(int(pool[i]) for i in idx))


@dataclass(frozen=True)
class OverlayStyle:
    """How a montage looks: ``count`` slices of ``plane``, the intensity ``window`` (a name or the
    request's ``IntensityWindow``), a ``title``; mask ``colors`` default to the vocabulary's."""

    plane: str = "axial"
    window: object = "auto"
    count: int = 6
    title: str = ""
    colors: tuple | None = None


def save_overlay(volume, masks: np.ndarray, names, path, style: OverlayStyle = OverlayStyle()) -> None:
    """Draw ``masks [P, K, J, I]`` over ``volume`` in display orientation of ``style.plane``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    plane, title = style.plane, style.title
    view = SliceView(volume, plane)
    image = view.view(volume.array)
    masks_view = [view.view(m) for m in masks]
    intensity = choose_window(volume, style.window)
    from .vocabulary import lookup

    structures = [lookup(name) for name in names]  # the colours of the .seg.nrrd and of Slicer
    colors = list(style.colors or [s.color if s else PALETTE[i % len(PALETTE)] for i, s in enumerate(structures)])
    chosen = pick_slices(masks_view, style.count, view.num_slices)
    cols = min(3, len(chosen))
    rows = int(np.ceil(len(chosen) / cols))
    aspect = view.pixel_spacing[0] / view.pixel_spacing[1]
    # constrained layout keeps slice titles, the suptitle and the legend clear of the images
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows + 1.0), squeeze=False, layout="constrained")
    for ax in axes.ravel():
        ax.axis("off")
    for ax, s in zip(axes.ravel(), chosen):
        img = np.clip((image[s].astype(np.float32) - intensity.low) / (intensity.high - intensity.low), 0, 1)
        ax.imshow(img, cmap=None if img.ndim == 3 else "gray", aspect=aspect, interpolation="nearest")
        for p in range(len(masks_view)):
            m = masks_view[p][s]
            if m.any():
                ax.imshow(np.ma.masked_where(~m, m), cmap=ListedColormap([colors[p]]), alpha=0.45,
                          aspect=aspect, interpolation="nearest")
                ax.contour(m.astype(float), levels=[0.5], colors=[colors[p]], linewidths=1.0)
        if volume.shape[0] > 1:  # a 2D image has no slices to name
            ax.set_title(f"{plane} slice {s}", fontsize=9)
    handles = [Patch(color=colors[p], label=str(names[p]) or "(empty prompt)") for p in range(len(names))]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(4, len(handles)), fontsize=9, frameon=False)
    if title:
        import textwrap

        fig.suptitle(textwrap.fill(title, width=12 * cols + 8), fontsize=11,
                     color="darkred" if "UNTRAINED" in title else "black")
    from .atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(str(tmp), dpi=90, metadata={"Title": title})  # readable without looking
    plt.close(fig)
