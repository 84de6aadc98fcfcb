"""Geometry is sacred: anatomical slicing, display orientation and exact write-back.

The central property (issue 2): the same physical volume stored in different voxel orders
(permuted, flipped, LPS/RAS-like, oblique, anisotropic) gives the same segmentation at the
same physical points.
"""

import itertools

import numpy as np
import pytest
from conftest import blobs, rotation

from medvlsm.volume import PLANE_AXES, PLANES, SliceView, Volume, default_plane, plane_permutation

SIGNED_PERMUTATIONS = [
    (perm, signs) for perm in itertools.permutations(range(3)) for signs in itertools.product((1, -1), repeat=3)
]


def signed_permutation(perm, signs):
    d = np.zeros((3, 3))
    for col, (row, sign) in enumerate(zip(perm, signs)):
        d[row, col] = sign
    return d


def physical_coordinates(volume):
    """LPS position of every voxel, ``[K, J, I, 3]``."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij")
    ijk1 = np.stack([i, j, k, np.ones_like(i)], -1).astype(float)
    return (ijk1 @ volume.ijk_to_lps().T)[..., :3]


def reorder(volume, perm, flips):
    """The same physical volume stored with numpy axes permuted by ``perm`` and then ``flips``.

    Returns the new Volume: voxel for voxel the same physical points, other index order.
    """
    steps = [volume.direction[:, 2 - a] * volume.spacing[2 - a] for a in range(3)]  # numpy axis -> LPS step
    array = np.transpose(volume.array, perm)
    origin = np.array(volume.origin, float)
    new_steps = []
    for m in range(3):
        step = steps[perm[m]]
        if flips[m]:
            origin = origin + step * (array.shape[m] - 1)
            step = -step
        new_steps.append(step)
    array = array[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]
    spacing = [np.linalg.norm(new_steps[2 - c]) for c in range(3)]  # ITK axis c = numpy axis 2 - c
    direction = np.stack([new_steps[2 - c] / spacing[c] for c in range(3)], axis=1)
    return Volume(np.ascontiguousarray(array), spacing, origin, direction)


def undo_reorder(array, perm, flips):
    array = array[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]
    return np.transpose(array, tuple(np.argsort(perm)) + tuple(range(3, array.ndim)))


def test_reorder_helper_keeps_physical_points():
    v = Volume(blobs((4, 5, 6)), (0.7, 0.9, 3.0), (10, -20, 30), rotation(10, 20, 30))
    w = reorder(v, (2, 0, 1), (True, False, True))
    back = undo_reorder(physical_coordinates(w), (2, 0, 1), (True, False, True))
    np.testing.assert_allclose(back, physical_coordinates(v), atol=1e-9)
    np.testing.assert_array_equal(undo_reorder(w.array, (2, 0, 1), (True, False, True)), v.array)


@pytest.mark.parametrize("plane", PLANES)
@pytest.mark.parametrize("perm,signs", SIGNED_PERMUTATIONS)
def test_every_storage_order_is_shown_in_display_orientation(plane, perm, signs):
    """All 48 axis-aligned storage orders x 3 planes: slices step along the plane normal,
    rows go down the displayed image (anterior/superior at the top) and columns to the right
    (patient left on image right for axial/coronal, posterior on the right for sagittal)."""
    spacing = (0.6, 0.8, 2.5)
    v = Volume(np.zeros((5, 6, 7), np.int16), spacing, (3.0, -4.0, 5.0), signed_permutation(perm, signs))
    view = SliceView(v, plane)
    pos = view.view(physical_coordinates(v))  # [N, rows, cols, 3]
    normal, down, right = PLANE_AXES[plane]
    for axis, target in ((0, normal), (1, down), (2, right)):
        step = np.diff(pos, axis=axis).reshape(-1, 3)
        assert len(step)
        along = step @ target
        assert np.all(along > 0), (plane, axis)
        np.testing.assert_allclose(np.linalg.norm(step, axis=1), along)  # no sideways component
    np.testing.assert_allclose(view.pixel_spacing, [np.linalg.norm(pos[0, 1, 0] - pos[0, 0, 0]),
                                                    np.linalg.norm(pos[0, 0, 1] - pos[0, 0, 0])])


@pytest.mark.parametrize("plane", PLANES)
@pytest.mark.parametrize("angles", [(20, 0, 0), (0, -30, 0), (0, 0, 40), (15, -25, 35)])
def test_oblique_volumes_use_the_closest_anatomical_axes(plane, angles):
    v = Volume(np.zeros((4, 5, 6), np.int16), (1, 1, 1), (0, 0, 0), rotation(*angles) @ np.diag([1, -1, 1]))
    view = SliceView(v, plane)
    pos = view.view(physical_coordinates(v))
    for axis, target in zip(range(3), PLANE_AXES[plane]):
        step = np.diff(pos, axis=axis).reshape(-1, 3)[0]
        assert step @ target / np.linalg.norm(step) > np.cos(np.deg2rad(55))


def test_view_writes_land_on_the_source_voxels():
    v = Volume(blobs((6, 7, 8)), (1, 1, 1), (0, 0, 0), signed_permutation((2, 0, 1), (-1, 1, -1)))
    for plane in PLANES:
        view = SliceView(v, plane)
        out = np.zeros(v.shape, np.int32)
        view.view(out)[:] = view.view(v.array)
        np.testing.assert_array_equal(out, v.array)


def test_default_plane_is_the_acquisition_plane_of_single_slices():
    assert default_plane(Volume(np.zeros((1, 8, 9)))) == "axial"
    assert default_plane(Volume(np.zeros((7, 8, 1)))) == "sagittal"  # i (left-right) has one voxel
    coronal_scout = Volume(np.zeros((1, 8, 9)), direction=signed_permutation((0, 2, 1), (1, -1, 1)))  # k -> y
    perm, _ = plane_permutation(coronal_scout.direction, "coronal")
    assert coronal_scout.shape[perm[0]] == 1 and default_plane(coronal_scout) == "coronal"
    assert default_plane(Volume(np.zeros((5, 8, 9)))) == "axial"


STORAGE_ORDERS = [
    pytest.param((0, 1, 2), (False, True, True), id="RAS-like (x,y flipped)"),
    pytest.param((2, 1, 0), (False, False, False), id="axes reversed"),
    pytest.param((1, 2, 0), (True, False, True), id="permuted+flipped"),
    pytest.param((2, 0, 1), (True, True, True), id="all flipped"),
]


@pytest.mark.parametrize("plane", PLANES)
@pytest.mark.parametrize("perm,flips", STORAGE_ORDERS)
@pytest.mark.parametrize("oblique", [False, True], ids=["straight", "oblique"])
def test_same_physical_volume_gives_same_segmentation_at_same_points(engine, plane, perm, flips, oblique):
    direction = rotation(12, -8, 20) if oblique else np.eye(3)
    a = Volume(blobs((9, 20, 24), seed=1), (0.8, 1.1, 3.0), (-40.0, 25.0, 100.0), direction)
    b = reorder(a, perm, flips)
    ra = engine.segment(a, ["bright blob", "background"], plane=plane)
    rb = engine.segment(b, ["bright blob", "background"], plane=plane)
    back = np.stack([undo_reorder(p, perm, flips) for p in rb.probabilities])
    np.testing.assert_allclose(back.astype(int), ra.probabilities.astype(int), rtol=0, atol=1)  # one uint8 level
    masks_b = np.stack([undo_reorder(m, perm, flips) for m in rb.masks(0.5)])
    np.testing.assert_array_equal(masks_b, ra.masks(0.5))
    assert ra.probabilities.std() > 0  # a real, non-constant output was compared


def test_model_sees_anterior_up_and_patient_left_on_the_right(tiny_model):
    """A marker in the anterior-left corner of an RAS-stored volume reaches the model at the
    top-right of its axial input: checked on the exact tensor handed to the image encoder."""
    from medvlsm.engine import Engine

    arr = np.zeros((3, 40, 40), np.int16)
    ras = np.diag([-1.0, -1.0, 1.0])  # i -> patient right, j -> anterior (a typical RAS-stored NIfTI)
    # patient left = low i (i runs to the right); anterior = high j
    arr[:, 30:, :10] = 1000
    v = Volume(arr, (1, 1, 1), (0, 0, 0), ras)
    seen = []
    original = tiny_model.encode_images
    tiny_model.encode_images = lambda px: (seen.append(px.clone()), original(px))[1]
    try:
        Engine(tiny_model, device="cpu", precision="fp32").segment(v, ["x"], plane="axial", window="0,2000")
    finally:
        del tiny_model.encode_images
    img = seen[0][0, 0]
    s = img.shape[-1]
    top_right = img[: s // 4, -s // 4 :].mean()
    bottom_left = img[-s // 4 :, : s // 4].mean()
    assert top_right > bottom_left + 1.0
