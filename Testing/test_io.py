"""Files keep the geometry: labelmaps, probabilities and .seg.nrrd read back at the right place."""

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import blobs, rotation

from medvlsm import io
from medvlsm.errors import InputError
from medvlsm.volume import Volume


@pytest.fixture
def oblique_volume():
    return Volume(blobs((6, 20, 24)), (0.7, 0.9, 3.0), (-12.5, 40.0, 101.0), rotation(10, -20, 25) @ np.diag([1, -1, 1]))


def assert_same_geometry(image, volume, tol=1e-5):
    np.testing.assert_allclose(image.GetSpacing(), volume.spacing, atol=tol)
    np.testing.assert_allclose(image.GetOrigin(), volume.origin, atol=tol)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), volume.direction, atol=tol)


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_labelmap_round_trip(tmp_path, oblique_volume, ext):
    labels = (oblique_volume.array > 0).astype(np.uint8) + (oblique_volume.array > 300)
    path = tmp_path / f"labels{ext}"
    io.write_labelmap(oblique_volume, labels, path)
    image = sitk.ReadImage(str(path))
    assert_same_geometry(image, oblique_volume, tol=1e-4 if ext.startswith(".nii") else 1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), labels)
    # a labelled voxel is at the physical point it came from
    k, j, i = np.argwhere(labels == 2)[0]
    expected = oblique_volume.ijk_to_lps() @ [i, j, k, 1]
    np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((int(i), int(j), int(k))), expected[:3], atol=1e-3)


@pytest.mark.parametrize("ext", [".nrrd", ".nii.gz", ".nii", ".mha"])
@pytest.mark.parametrize("prompts", [1, 2])
def test_probabilities_one_component_per_prompt(tmp_path, oblique_volume, ext, prompts):
    """uint8 probabilities x 255, one component per prompt; NRRD and NIfTI are written as streams by our
    own code, so each is read back against SimpleITK's own writing of the same image."""
    probs = np.random.default_rng(0).integers(0, 256, (prompts,) + oblique_volume.shape, dtype=np.uint8)
    io.write_probabilities(oblique_volume, probs, tmp_path / f"p{ext}", "UNTRAINED WEIGHTS (x)")
    image = sitk.ReadImage(str(tmp_path / f"p{ext}"))
    assert image.GetNumberOfComponentsPerPixel() == prompts
    assert image.GetPixelID() == (sitk.sitkVectorUInt8 if prompts > 1 else sitk.sitkUInt8)
    array = sitk.GetArrayFromImage(image)
    np.testing.assert_array_equal(np.moveaxis(array, -1, 0) if prompts > 1 else array[None], probs)
    assert_same_geometry(image, oblique_volume)
    if ext != ".mha":
        assert image.GetMetaData("descrip").startswith("UNTRAINED WEIGHTS (x); probability x 255")


@pytest.mark.parametrize("overlap", [False, True], ids=["shared-layer", "one-layer-per-segment"])
def test_seg_nrrd_round_trip(tmp_path, oblique_volume, overlap):
    a = oblique_volume.array > 0
    b = oblique_volume.array > 300 if overlap else np.zeros_like(a)
    if not overlap:
        b[0, :3, :3] = True
        a = a & ~b
    path = tmp_path / "s.seg.nrrd"
    io.write_seg_nrrd(oblique_volume, np.stack([a, b]), ["liver", "left kidney"], path)
    seg = io.read_seg_nrrd(path)
    assert seg.names == ["liver", "left kidney"]
    np.testing.assert_array_equal(seg.masks, np.stack([a, b]))
    assert seg.grid.same_grid(oblique_volume)
    if not overlap:  # a shared-layer file is a plain labelmap any ITK tool reads at the right place
        image = sitk.ReadImage(str(path))
        assert_same_geometry(image, oblique_volume)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), a * 1 + b * 2)


def test_2d_rgb_png_is_a_one_slice_volume(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "x.png"))
    v = io.read_image(tmp_path / "x.png")
    assert v.array.shape == (1, 30, 40, 3) and v.is_rgb
    io.write_labelmap(v, (v.array[..., 0] > 128).astype(np.uint8), tmp_path / "m.png")
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "m.png")))
    assert back.shape == (30, 40) and set(np.unique(back)) <= {0, 255}


def test_dicom_series_folder(tmp_path):
    # DICOM stacks slices along the cross product of the row/column directions: right-handed only
    oblique_volume = Volume(blobs((6, 20, 24)), (0.7, 0.9, 3.0), (-12.5, 40.0, 101.0), rotation(10, -20, 25))
    folder = tmp_path / "series"
    folder.mkdir()
    image = io.volume_to_sitk(oblique_volume)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.1"
    for k in range(image.GetDepth()):
        s = image[:, :, k]
        for tag, value in (("0020|000e", uid), ("0020|0013", str(k + 1)), ("0008|0060", "CT"),
                           ("0020|0037", "\\".join(f"{v:.8f}" for v in oblique_volume.direction[:, :2].T.ravel())),
                           ("0020|0032", "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))))):
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(s)
    v = io.read_image(folder)
    assert v.shape == oblique_volume.shape
    np.testing.assert_array_equal(v.array, oblique_volume.array)
    np.testing.assert_allclose(v.ijk_to_lps(), oblique_volume.ijk_to_lps(), atol=1e-3)


def test_output_path_checks(tmp_path):
    with pytest.raises(InputError, match="Unknown output extension"):
        io.check_output_path(tmp_path / "x.jpg", is_2d=True)
    with pytest.raises(InputError, match="does not exist"):
        io.check_output_path(tmp_path / "missing" / "x.nii.gz", is_2d=False)
    with pytest.raises(InputError, match="2D slice"):
        io.check_output_path(tmp_path / "x.png", is_2d=False)
    assert io.check_output_path(tmp_path / "x.seg.nrrd", is_2d=False) == ".seg.nrrd"


def write_dicom_series(folder, volume, modality="CT"):
    """A DICOM series of ``volume`` written by SimpleITK with the tags a real scanner series has."""
    folder.mkdir()
    image = io.volume_to_sitk(volume)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series, study, frame = (f"1.2.826.0.1.3680043.2.1125.{n}" for n in (1, 2, 3))
    for k in range(image.GetDepth()):
        s = image[:, :, k]
        tags = {"0020|000e": series, "0020|000d": study, "0020|0052": frame, "0020|0013": str(k + 1),
                "0008|0060": modality, "0010|0020": "TEST001", "0010|0010": "Test^Patient",
                "0008|0018": f"1.2.826.0.1.3680043.2.1125.10.{k}", "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
                "0020|0037": "\\".join(f"{v:.8f}" for v in volume.direction[:, :2].T.ravel()),
                "0020|0032": "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k)))}
        for tag, value in tags.items():
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(s)
    return folder


def test_dicom_seg_export_references_the_series(tmp_path):
    import highdicom as hd

    v = Volume(blobs((5, 16, 20)), (0.7, 0.7, 2.5), (-10.0, 20.0, 30.0), rotation(0, 0, 10))
    volume = io.read_image(write_dicom_series(tmp_path / "ct", v))
    assert len(volume.dicom_files) == 5
    masks = np.stack([volume.array > 300, volume.array < -500])
    io.write_dicom_seg(volume, masks, ["liver", "one small round lesion"], tmp_path / "seg.dcm")
    seg = hd.seg.segread(str(tmp_path / "seg.dcm"))
    assert seg.number_of_segments == 2
    labels = [seg.get_segment_description(i).segment_label for i in (1, 2)]
    assert labels == ["liver", "one small round lesion"]
    assert seg.get_segment_description(1).segmented_property_type.value == "10200004"  # SNOMED CT liver
    sop_uids = [sitk.ReadImage(f).GetMetaData("0008|0018") for f in volume.dicom_files]
    by_source = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=sop_uids, segment_numbers=[1, 2], ignore_spatial_locations=True)
    np.testing.assert_array_equal(by_source.astype(bool), np.moveaxis(masks, 0, -1))


def test_dicom_seg_needs_a_dicom_input(tmp_path):
    with pytest.raises(InputError, match="DICOM series"):
        io.check_output_path(tmp_path / "x.dcm", is_2d=False)
