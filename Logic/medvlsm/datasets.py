"""Readers for labelled data: the paper's annotation format, and volumes with segmentations.

Both feed evaluation and finetuning.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError
from .io import case_name

log = logging.getLogger("medvlsm")

_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def binary_mask(volume) -> np.ndarray:
    """A mask file's voxels ``[K, J, I(, C)]`` -> bool ``[K, J, I]``. 0/255 masks (JPEG ones are
    noisy) are cut at half their maximum; colour masks by their brightest channel."""
    a = np.asarray(volume.array)
    if volume.is_rgb:
        a = a.max(axis=-1)
    top = a.max(initial=0)
    return a > (top / 2 if top > 1 else 0)


def resolve(folder: Path, name: str) -> Path:
    """``folder/name``, or the same stem with another image extension (the reference JSON says
    ``N.png`` where ClinicDB ships ``N.jpg``)."""
    path = folder / name
    if path.is_file():
        return path
    for ext in _IMAGE_EXTS:
        other = path.with_suffix(ext)
        if other.is_file():
            return other
    raise InputError(f"{name} not found in {folder}", "Check --images / --masks and the names in the JSON file")


@dataclass
class AnnotatedImage:
    """One entry of the paper's annotation format."""

    name: str
    image: Path
    mask: Path
    prompts: dict

    def load(self):
        """-> (Volume of the image, bool mask [H, W])."""
        from .io import read_image

        image = read_image(self.image)
        mask = binary_mask(read_image(self.mask))[0]
        if mask.shape != image.shape[1:]:
            raise InputError(f"Mask {self.mask.name} is {mask.shape} but image {self.image.name} is {image.shape[1:]}",
                             "Pair each image with its own mask")
        return image, mask


def read_annotations(path, images, masks) -> list[AnnotatedImage]:
    """The paper's JSON list (``img_name``, ``mask_name``, ``prompts``) with its image/mask folders."""
    path, images, masks = Path(path), Path(images), Path(masks)
    try:
        if path.suffix.lower() == ".gz":
            import gzip

            entries = json.loads(gzip.decompress(path.read_bytes()).decode("utf-8"))
        else:
            entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, EOFError) as e:
        raise InputError(f"Cannot read annotation file {path} ({e.__class__.__name__})",
                         "Give a JSON list of objects with img_name, mask_name and prompts") from e
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "img_name" in e for e in entries):
        raise InputError(f"{path} is not in the annotation format", "Give a JSON list of objects with img_name, "
                         "mask_name and prompts (see Resources/ or the paper's medvlsm-anns)")
    items = []
    for e in entries:
        mask_name = e.get("mask_name", e["img_name"])  # unique per entry: an image may have several targets
        items.append(AnnotatedImage(Path(mask_name).stem, resolve(images, e["img_name"]), resolve(masks, mask_name),
                                    e.get("prompts", {})))
    return items


@dataclass
class LabelledVolume:
    """A volume with one binary mask per named structure (the names are the prompts)."""

    name: str
    image: Path
    segmentation: Path
    label_names: dict = field(default_factory=dict)  # labelmap value -> name (prompt)

    def load(self):
        """-> (Volume, masks [S, K, J, I] bool on its grid, names)."""
        from . import io

        volume = io.read_image(self.image)
        if io.extension(self.segmentation) == ".seg.nrrd":
            seg = io.read_seg_nrrd(self.segmentation)
            if not seg.grid.same_grid(volume):
                raise InputError(f"Segmentation {self.segmentation.name} is not on the grid of {self.image.name}",
                                 "Export it from Slicer with the volume as reference geometry")
            return volume, seg.masks, seg.names
        labels = io.read_image(self.segmentation)
        if not labels.same_grid(volume):
            raise InputError(f"Labelmap {self.segmentation.name} is not on the grid of {self.image.name}",
                             "Resample it onto the image first")
        values = [int(v) for v in np.unique(labels.array) if v != 0]
        table = self.label_names or read_color_table(self.segmentation)
        unnamed = [v for v in values if v not in table]
        if unnamed:
            raise InputError(f"Labelmap {self.segmentation.name} has label value(s) {unnamed[:5]} without a name "
                             "(the names are the prompts the model learns)",
                             "Put a Slicer colour table beside it (NAME.ctbl or NAME.txt: 'value name r g b a' per "
                             "line), pass --label-names 1=liver 2=spleen, or use .seg.nrrd")
        names = [table[v] for v in values]
        return volume, np.stack([labels.array == v for v in values]) if values else np.zeros((0,) + volume.shape, bool), names


COLOR_TABLE_EXTENSIONS = (".ctbl", ".txt")


def read_color_table(labelmap: Path) -> dict:
    """``{value: name}`` from a Slicer colour table beside a labelmap (``NAME.ctbl`` / ``NAME.txt``, as
    Slicer saves a labelmap's colour node: ``value name r g b a``, ``#`` comments); {} if none."""
    stem = case_name(labelmap)
    for ext in COLOR_TABLE_EXTENSIONS:
        path = labelmap.with_name(stem + ext)
        if path.is_file():
            table = {}
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                parts = line.split("#", 1)[0].split()
                if len(parts) >= 2 and parts[0].isdigit():
                    table[int(parts[0])] = parts[1].replace("_", " ")
            return table
    return {}


def read_volume_folder(volumes, segmentations, label_names: dict | None = None) -> list[LabelledVolume]:
    """Pair ``volumes/NAME.ext`` with ``segmentations/NAME[.seg].ext`` (also NAME_label / NAME_seg)."""
    volumes, segmentations = Path(volumes), Path(segmentations)
    segs = {}
    for s in segmentations.iterdir():
        if s.suffix.lower() in COLOR_TABLE_EXTENSIONS:
            continue
        stem = case_name(s)
        for suffix in ("_label", "_seg", "_segmentation", ".seg"):
            stem = stem[: -len(suffix)] if stem.endswith(suffix) else stem
        segs[stem] = s
    pairs = []
    for v in sorted(volumes.iterdir()):
        stem = case_name(v)
        stem_base = stem[: -len("_image")] if stem.endswith("_image") else stem
        match = segs.get(stem) or segs.get(stem_base)
        if match is not None and match != v:
            pairs.append(LabelledVolume(stem_base, v, match, dict(label_names or {})))
    if not pairs:
        raise InputError(f"No volume in {volumes} has a segmentation of the same name in {segmentations}",
                         "Name them alike, e.g. case1.nii.gz and case1.seg.nrrd")
    return pairs


LABELS = ("partial", "complete")  # which slices of a volume are ground truth: see training.samples_from_volumes
REVIEWED = "reviewed"


def is_reviewed(name: str) -> bool:
    """The segment that marks slices reviewed as holding none of the structures (partial labels):
    paint anything on such a slice in a segment named ``reviewed``. It is never taught as a prompt."""
    return name.strip().lower() == REVIEWED
