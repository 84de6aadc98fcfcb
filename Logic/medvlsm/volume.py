"""Volumes with their physical geometry, and the anatomical slicing that keeps it exact.

Conventions (the ITK/DICOM ones, so files round-trip without surprises):

- ``Volume.array`` is indexed ``[k, j, i]`` (numpy order, the reverse of ITK's ``(i, j, k)``),
  with a trailing channel axis ``[k, j, i, c]`` for RGB images.
- ``spacing``, ``origin`` and the columns of ``direction`` are given in ITK order ``(i, j, k)``
  and in **LPS** patient coordinates (x to the patient's left, y posterior, z superior).
  Slicer's RAS is LPS with x and y negated; ``medvlsm.slicer_glue`` converts.

Slicing (``SliceView``) never resamples: an anatomical plane is obtained by permuting and
flipping array axes, so every pixel the model sees *is* one voxel of the volume and every
output value is written back to exactly that voxel, whatever the storage order, handedness
or obliquity.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError

PLANES = ("axial", "coronal", "sagittal")

# Display conventions, as LPS unit vectors: (slice stacking direction, image-down, image-right).
# Axial: anterior at the top, patient's left on the image's right (radiological convention).
# Coronal: superior at the top, patient's left on the right.
# Sagittal: superior at the top, anterior on the left (posterior on the right), as Slicer shows it.
_L, _P, _S = np.eye(3)
PLANE_AXES = {
    "axial": (_S, _P, _L),
    "coronal": (_P, -_S, _L),
    "sagittal": (_L, -_S, _P),
}


@dataclass
class Volume:
    """An image on a physical grid.

    Attributes:
        array: voxels, shape ``[K, J, I]`` or ``[K, J, I, 3]`` for RGB.
        spacing: voxel size in mm along ``(i, j, k)``.
        origin: LPS position (mm) of voxel ``(0, 0, 0)``.
        direction: 3x3 matrix whose columns are the LPS unit vectors of the ``i, j, k`` axes.
        source: where it came from (file path, node name), for messages only.
        dicom_files: for a DICOM series, the file of each slice (DICOM SEG export references them).
    """

    array: np.ndarray
    spacing: tuple = (1.0, 1.0, 1.0)
    origin: tuple = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    source: str = ""
    dicom_files: tuple = ()  # the DICOM instances of slices k = 0..K-1, when read from a series
    modality: str = ""  # DICOM Modality (CT, MR ...) when the file states it; the automatic window uses it

    def __post_init__(self):
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def is_rgb(self) -> bool:
        return self.array.ndim == 4

    @property
    def shape(self) -> tuple:
        """Spatial shape ``[K, J, I]``."""
        return tuple(self.array.shape[:3])

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous ``(i, j, k, 1)`` to LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def same_grid(self, other: "Volume", tol: float = 1e-4) -> bool:
        return self.shape == other.shape and np.allclose(self.ijk_to_lps(), other.ijk_to_lps(), atol=tol)

    def with_array(self, array: np.ndarray) -> "Volume":
        """A volume on the same grid holding ``array`` (labels, probabilities...)."""
        return Volume(array, self.spacing, self.origin, self.direction.copy(), self.source, self.dicom_files)

    def fingerprint(self) -> str:
        """Content + geometry hash: the key of the image-feature cache outside Slicer."""
        h = hashlib.blake2b(digest_size=16)
        h.update(np.ascontiguousarray(self.array).view(np.uint8).data)
        h.update(repr((self.array.shape, self.array.dtype.str, self.ijk_to_lps().round(6).tolist())).encode())
        return h.hexdigest()

    def validate(self) -> None:
        """Reject what no 2D model can segment, with the fix in the message. Checked once per array:
        the reader and ``request.plan`` both ask, the scan of the voxels runs once."""
        if getattr(self, "_validated", None) is self.array:
            return
        self._check()
        self._validated = self.array

    def _check(self) -> None:
        a = self.array
        name = self.source or "the image"
        if a.ndim not in (3, 4) or (a.ndim == 4 and a.shape[3] not in (3, 4)):
            raise InputError(
                f"{name} has shape {a.shape}: a 4D or multi-component volume cannot be segmented slice by slice",
                "Extract one 3D volume (one time point or one channel) first, e.g. with Slicer's "
                "'Sequences' module or SimpleITK's VectorIndexSelectionCast",
            )
        if sorted(a.shape[:3])[1] < 2:  # no plane with at least 2x2 pixels
            raise InputError(
                f"{name} has {a.shape[2]}x{a.shape[1]}x{a.shape[0]} voxels: too small to hold a 2D slice",
                "Use an image at least 2x2 pixels in one plane",
            )
        if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
            raise InputError(f"{name} has voxel type {a.dtype}", "Convert it to an integer or real pixel type")
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            bad = int((~np.isfinite(a)).sum())
            raise InputError(
                f"{name} has {bad} NaN or infinite voxels",
                "Replace them (e.g. with the background value) before segmenting; medvlsm will not guess",
            )
        if not np.all(np.isfinite(self.direction)) or abs(np.linalg.det(self.direction)) < 1e-6:
            raise InputError(f"{name} has a degenerate direction matrix", "Fix the image header's orientation")
        if not np.allclose(self.direction.T @ self.direction, np.eye(3), atol=1e-4):
            raise InputError(f"{name} has a sheared (non-orthogonal) voxel grid: slices, masks and volumes in mL "
                             "would be wrong", "Resample it onto an orthogonal grid first (e.g. Slicer's 'Resample "
                             "Scalar/Vector/DWI Volume' or SimpleITK Resample)")
        if min(self.spacing) <= 0:
            raise InputError(f"{name} has a non-positive voxel spacing {self.spacing}", "Fix the image header's spacing")


def plane_permutation(direction: np.ndarray, plane: str) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """Which array axes become (slice, row, column) of ``plane``, and which must be flipped.

    Args:
        direction: 3x3, columns = LPS unit vectors of ITK axes ``i, j, k``.
        plane: one of ``PLANES``.

    Returns:
        ``(perm, flips)``: ``perm[m]`` is the numpy array axis (0=k, 1=j, 2=i) shown as slice /
        row / column; ``flips[m]`` is True where that axis runs against the display direction.
        For oblique volumes the nearest anatomical axis wins (as Slicer's "closest plane").
    """
    if plane not in PLANE_AXES:
        raise InputError(f"Unknown plane {plane!r}", f"Use one of: {', '.join(PLANES)}")
    axes_np = [np.asarray(direction)[:, 2 - a] for a in range(3)]  # numpy axis a -> ITK axis 2-a
    targets = PLANE_AXES[plane]
    best = max(
        itertools.permutations(range(3)),
        key=lambda p: sum(abs(float(axes_np[p[m]] @ targets[m])) for m in range(3)),
    )
    flips = tuple(bool(axes_np[best[m]] @ targets[m] < 0) for m in range(3))
    return tuple(best), flips


def default_plane(volume: Volume) -> str:
    """Axial, unless the volume is a single slice of another plane (a 2D sagittal scout, say)."""
    for plane in PLANES:
        perm, _ = plane_permutation(volume.direction, plane)
        if volume.shape[perm[0]] == 1:
            return plane
    return "axial"


class SliceView:
    """A volume seen as a stack of 2D slices of one anatomical plane, in display orientation.

    ``view(a)`` turns any array on the volume's grid (``[K, J, I, ...]``) into a numpy *view*
    ``[N, rows, cols, ...]``; writing into ``view(out)`` writes the same voxels of ``out``.
    """

    def __init__(self, volume: Volume, plane: str):
        self.plane = plane
        self.perm, self.flips = plane_permutation(volume.direction, plane)
        shape = volume.shape
        self.num_slices, self.rows, self.cols = (shape[a] for a in self.perm)
        spacing_np = volume.spacing[::-1]
        self.pixel_spacing = (spacing_np[self.perm[1]], spacing_np[self.perm[2]])  # (row, col) mm
        self.slice_spacing = spacing_np[self.perm[0]]
        if self.rows < 2 or self.cols < 2:
            raise InputError(
                f"{volume.source or 'The image'} has {self.rows}x{self.cols} pixels in the {plane} plane",
                f"Choose the plane the image was acquired in (--axis {default_plane(volume)})",
            )

    def view(self, array: np.ndarray) -> np.ndarray:
        v = np.transpose(array, self.perm + tuple(range(3, array.ndim)))
        index = tuple(slice(None, None, -1) if f else slice(None) for f in self.flips)
        return v[index]

    def __repr__(self):
        return (
            f"SliceView({self.plane}: {self.num_slices} slices of {self.rows}x{self.cols}, "
            f"pixel {self.pixel_spacing[0]:.3g}x{self.pixel_spacing[1]:.3g} mm)"
        )
