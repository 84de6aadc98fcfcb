"""Issue 12, inputs: damaged or ambiguous inputs are refused with the problem and the fix, before
any model work — never read as something else (ITK reads a truncated .nii.gz as zeros, NaN as 0,
and GDCM averages the spacing of a series with a missing slice)."""

import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import blobs, rotation
from test_io import write_dicom_series

from medvlsm import io
from medvlsm.errors import InputError
from medvlsm.window import choose_window
from medvlsm.volume import Volume


def test_truncated_nifti_is_refused(tmp_path):
    full = tmp_path / "full.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 999, (20, 40, 40)).astype(np.int16)),
                    str(full))
    io.read_image(full)
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(InputError, match="incomplete|damaged"):
        io.read_image(cut)
    plain = tmp_path / "plain.nii"
    sitk.WriteImage(sitk.ReadImage(str(full)), str(plain))
    short = tmp_path / "short.nii"
    short.write_bytes(plain.read_bytes()[:-1000])
    with pytest.raises(InputError, match="header says"):
        io.read_image(short)


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd"])
def test_non_finite_voxels_are_refused_in_every_format(tmp_path, ext):
    a = np.random.default_rng(0).normal(size=(4, 10, 12)).astype(np.float32)
    a[1, 2, 3], a[2, 3, 4] = np.nan, np.inf
    path = tmp_path / f"v{ext}"
    sitk.WriteImage(sitk.GetImageFromArray(a), str(path))
    with pytest.raises(InputError, match="2 NaN or infinite voxels"):
        io.read_image(path)


def _series(tmp_path, count=6):
    v = Volume(blobs((count, 16, 18)), (0.7, 0.9, 2.5), (-12.5, 40.0, 101.0), rotation(10, -20, 25))
    return write_dicom_series(tmp_path / "ct", v)


def test_dicom_series_with_a_missing_slice_names_the_gap(tmp_path):
    folder = _series(tmp_path)
    (folder / "003.dcm").unlink()
    with pytest.raises(InputError, match=r"002.dcm and 004.dcm are 5.00 mm apart, the others 2.50 mm"):
        io.read_image(folder)


def test_dicom_series_with_a_duplicate_slice_is_refused(tmp_path):
    folder = _series(tmp_path)
    image = sitk.ReadImage(str(folder / "002.dcm"))
    image.SetMetaData("0008|0018", "1.2.826.0.1.3680043.2.1125.10.99")
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(folder / "002b.dcm"))
    writer.Execute(image)
    with pytest.raises(InputError, match="same position"):
        io.read_image(folder)


def test_dicom_series_with_an_unreadable_file_is_refused(tmp_path):
    folder = _series(tmp_path)
    data = (folder / "004.dcm").read_bytes()
    (folder / "004.dcm").write_bytes(data[:200])  # a copy cut short
    with pytest.raises(InputError, match="cannot be read as part of the series: 004.dcm"):
        io.read_image(folder)


def test_a_good_dicom_series_still_reads_and_states_its_modality(tmp_path):
    folder = _series(tmp_path)
    shutil.copy(folder / "000.dcm", tmp_path / "elsewhere.dcm")
    volume = io.read_image(folder)
    assert volume.shape == (6, 16, 18) and volume.modality == "CT"


def test_sheared_grid_is_refused(tmp_path):
    shear = np.array([[1, 0.3, 0], [0, 1, 0], [0, 0, 1.0]])
    shear /= np.linalg.norm(shear, axis=0)
    with pytest.raises(InputError, match="sheared"):
        Volume(blobs((3, 8, 8)), direction=shear).validate()


def test_one_outlier_does_not_make_an_mr_a_ct():
    mr = np.random.default_rng(0).uniform(0, 800, (8, 32, 32)).astype(np.int16)
    mr[0, 0, :2] = -1000
    assert choose_window(Volume(mr), "auto").describe.startswith("percentiles")
    ct = blobs((8, 32, 32))
    assert choose_window(Volume(ct), "auto").describe.startswith("abdomen")
    assert choose_window(Volume(ct, modality="MR"), "auto").describe.startswith("percentiles")


@pytest.mark.parametrize("window", ["nan,nan", "40,inf", "40,-5", "40,0"])
def test_window_needs_a_finite_level_and_positive_width(window):
    with pytest.raises(InputError, match="finite level and a positive width"):
        choose_window(Volume(blobs((2, 8, 8))), window)


def test_seg_nrrd_segment_names_are_utf8_as_slicer_writes_them(tmp_path):
    names = ["Niere ä", "Leber 肝", "liver"]
    io.write_seg_nrrd(Volume(np.zeros((2, 5, 6), np.int16)), np.ones((3, 2, 5, 6), bool), names,
                      tmp_path / "s.seg.nrrd")
    assert io.read_seg_nrrd(tmp_path / "s.seg.nrrd").names == names
    assert "Niere ä".encode("utf-8") in (tmp_path / "s.seg.nrrd").read_bytes()
