"""Synthetic data sets in the paper's annotation format, for evaluation and finetuning tests."""

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medvlsm.prompts import Attributes, geometry_attributes, ladder

OBJECTS = {"red circle": (220, 40, 40), "blue square": (40, 60, 220)}


def two_object_images(folder: Path, count: int, size: int = 96, seed: int = 0) -> list[dict]:
    """Images with a red circle and a blue square each; one annotation entry per (image, object),
    its own mask and its own prompt ladder (p1 = the object's name)."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    entries = []
    yy, xx = np.mgrid[:size, :size]
    for n in range(count):
        image = rng.integers(0, 50, (size, size, 3)).astype(np.uint8)
        while True:
            cy, cx = rng.integers(18, size - 18, 2)
            sy, sx = rng.integers(4, size - 26, 2)
            side, radius = int(rng.integers(16, 24)), int(rng.integers(9, 14))
            circle = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
            square = (yy >= sy) & (yy < sy + side) & (xx >= sx) & (xx < sx + side)
            if not (circle & square).any():
                break
        for name, mask in (("red circle", circle), ("blue square", square)):
            image[mask] = OBJECTS[name]
        sitk.WriteImage(sitk.GetImageFromArray(image, isVector=True), str(folder / "images" / f"{n}.png"))
        for name, mask in (("red circle", circle), ("blue square", square)):
            mask_name = f"{n}_{name.replace(' ', '_')}.png"
            sitk.WriteImage(sitk.GetImageFromArray(mask.astype(np.uint8) * 255), str(folder / "masks" / mask_name))
            g = geometry_attributes(mask)
            colour, shape = name.split()
            entries.append({"img_name": f"{n}.png", "mask_name": mask_name,
                            "prompts": ladder(Attributes(shape, "", colour, g["size"], g["number"], g["location"],
                                                         ["a synthetic object"]))})
    return entries


def write_split(folder: Path, name: str, entries: list[dict]) -> Path:
    path = folder / f"{name}.json"
    path.write_text(json.dumps(entries))
    return path
