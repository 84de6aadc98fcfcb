"""Issue 12, outputs and options: nothing the user has is lost, nothing wrong is reported as success.

Each test would fail on the commit before the atomic writer and the up-front checks."""

import os
import stat

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import blobs, sha

from medvlsm import io
from medvlsm.atomic import atomic_open, atomic_path
from medvlsm.cli import main
from medvlsm.volume import Volume


@pytest.fixture
def ct_file(tmp_path):
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(io.volume_to_sitk(Volume(blobs((4, 24, 28)), (0.8, 0.8, 2.5))), str(path))
    return path


def run(argv, capsys):
    code = main(["--quiet"] + [str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "unexpected" not in err
    return code, out, err


def leftovers(folder):
    return [p.name for p in folder.iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize("option", ["--output", "--probabilities", "--overlay"])
def test_an_output_that_is_the_input_is_refused_before_the_model_loads(tmp_path, ct_file, capsys, option):
    before = sha(ct_file)
    argv = ["segment", ct_file, "-p", "liver", "--model", tmp_path / "no-such-model"]
    argv += [option, ct_file] + (["--output", tmp_path / "out.seg.nrrd"] if option != "--output" else [])
    code, _, err = run(argv, capsys)
    assert code == 2 and "is the input" in err  # said before the (missing) model was looked at
    assert sha(ct_file) == before


def test_two_outputs_of_one_run_cannot_be_one_file(tmp_path, ct_file, capsys):
    out = tmp_path / "same.nii.gz"
    code, _, err = run(["segment", ct_file, "-p", "liver", "-o", out, "--probabilities", out], capsys)
    assert code == 2 and "another output of this run" in err


def test_an_output_that_is_a_folder_is_one_line(tmp_path, ct_file, capsys):
    (tmp_path / "dir.nii.gz").mkdir()
    code, _, err = run(["segment", ct_file, "-p", "liver", "-o", tmp_path / "dir.nii.gz"], capsys)
    assert code == 2 and "is a folder" in err


@pytest.mark.parametrize("option,value", [("--threshold", "2"), ("--threshold", "-1"), ("--threshold", "nan"),
                                          ("--threshold", "0"), ("--min-size", "-5")])
def test_out_of_range_options_are_refused_with_the_valid_range(tmp_path, ct_file, capsys, option, value):
    with pytest.raises(SystemExit) as exit_:
        main(["segment", str(ct_file), "-p", "liver", "-o", str(tmp_path / "o.nii.gz"), option, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert value in err and ("between 0 and 1" in err or ">= 0" in err)
    assert not (tmp_path / "o.nii.gz").exists()


def test_negative_window_level_is_accepted_as_typed(tmp_path, ct_file, tiny_model_dir, capsys):
    code, out, err = run(["segment", ct_file, "-p", "lung", "--model", tiny_model_dir, "-o", tmp_path / "o.nii.gz",
                          "--window", "-600,1500", "--precision", "fp32"], capsys)
    assert code == 0, err
    assert "-600" in out


def _seg_nrrd(path, value):
    v = Volume(np.zeros((2, 6, 7), np.int16))
    io.write_seg_nrrd(v, np.full((1, 2, 6, 7), value, bool), ["liver"], path)


@pytest.mark.parametrize("failure", [KeyboardInterrupt(), OSError(28, "No space left on device")],
                         ids=["interrupt", "disk-full"])
def test_a_write_that_stops_midway_leaves_the_earlier_file_and_no_temporary(tmp_path, monkeypatch, failure):
    from medvlsm import wire

    target = tmp_path / "result.seg.nrrd"
    _seg_nrrd(target, True)
    before = sha(target)
    real_write = wire.write_nrrd

    def half_then_fail(file, *args, **kwargs):
        real_write(file, *args, **kwargs)
        file.flush()
        file.truncate(file.tell() // 2)
        raise failure

    monkeypatch.setattr(wire, "write_nrrd", half_then_fail)
    with pytest.raises(type(failure)):
        _seg_nrrd(target, False)
    assert sha(target) == before and leftovers(tmp_path) == []


def test_a_failed_write_in_the_cli_says_the_path_is_unchanged(tmp_path, ct_file, tiny_model_dir, capsys, monkeypatch):
    target = tmp_path / "o.nii.gz"
    target.write_bytes(b"earlier result")

    def disk_full(*args, **kwargs):
        raise RuntimeError("Exception thrown in SimpleITK ImageFileWriter_Execute: No space left on device")

    monkeypatch.setattr(sitk, "WriteImage", disk_full)
    code, _, err = run(["segment", ct_file, "-p", "liver", "--model", tiny_model_dir, "-o", target,
                        "--precision", "fp32"], capsys)
    assert code == 2 and "holds what it held before" in err and "No space left" in err
    assert target.read_bytes() == b"earlier result" and leftovers(tmp_path) == []


def test_every_written_file_is_world_readable_and_complete(tmp_path):
    old = os.umask(0o077)  # a strict umask, as on many shared servers
    try:
        with atomic_open(tmp_path / "report.csv", "w", encoding="utf-8") as f:
            f.write("a,b\n")
        with atomic_path(tmp_path / "image.nii.gz") as tmp:
            sitk.WriteImage(sitk.Image(3, 3, sitk.sitkUInt8), str(tmp))
    finally:
        os.umask(old)
    for name in ("report.csv", "image.nii.gz"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
    assert sitk.ReadImage(str(tmp_path / "image.nii.gz")).GetSize() == (3, 3)
    assert leftovers(tmp_path) == []


def test_init_refuses_a_model_folder_that_holds_files_and_writes_0644(tmp_path, capsys):
    out = tmp_path / "model"
    code, _, err = run(["init", "--size", "tiny", "-o", out], capsys)
    assert code == 0, err
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}
    weights = sha(out / "model.safetensors")
    code, _, err = run(["init", "--size", "tiny", "-o", out, "--seed", "1"], capsys)
    assert code == 2 and "already holds files" in err and "--overwrite" in err
    assert sha(out / "model.safetensors") == weights
    code, _, err = run(["init", "--size", "tiny", "-o", out, "--seed", "1", "--overwrite"], capsys)
    assert code == 0 and sha(out / "model.safetensors") != weights
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_init_input_size_must_be_positive(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["init", "--size", "tiny", "-o", str(tmp_path / "m"), "--input-size", "0"])
    assert "must be at least 1" in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_an_interrupted_model_save_keeps_the_earlier_model(tmp_path, tiny_model, monkeypatch):
    out = tmp_path / "model"
    tiny_model.save_pretrained(out)
    before = {p.name: sha(p) for p in out.iterdir()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tiny_model.tokenizer), "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tiny_model.save_pretrained(out)
    assert {p.name: sha(p) for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_untrained_results_say_so_in_every_format(tmp_path, ct_file, tiny_model_dir, capsys):
    import gzip

    outputs = {ext: tmp_path / f"o{ext}" for ext in (".nii.gz", ".nrrd", ".seg.nrrd")}
    for ext, path in outputs.items():
        code, _, err = run(["segment", ct_file, "-p", "liver", "--model", tiny_model_dir, "-o", path,
                            "--probabilities", tmp_path / f"p{ext if ext != '.seg.nrrd' else '.nii'}",
                            "--precision", "fp32"], capsys)
        assert code == 0, err
    header = gzip.decompress(outputs[".nii.gz"].read_bytes())[148:228]
    assert header.startswith(b"UNTRAINED WEIGHTS")
    assert (tmp_path / "p.nii").read_bytes()[148:157] == b"UNTRAINED"
    assert sitk.ReadImage(str(outputs[".nrrd"])).GetMetaData("descrip").startswith("UNTRAINED")
    assert b"MedVLSM_Note:=UNTRAINED WEIGHTS" in outputs[".seg.nrrd"].read_bytes()[:4000]
    assert sitk.ReadImage(str(outputs[".nii.gz"])).GetSize() == sitk.ReadImage(str(ct_file)).GetSize()


def test_dicom_seg_marks_untrained_and_carries_utf8_labels(tmp_path, tiny_model_dir, capsys):
    import pydicom
    from conftest import rotation
    from test_io import write_dicom_series

    series = write_dicom_series(tmp_path / "ct", Volume(blobs((4, 16, 18)), (0.7, 0.9, 2.5), (0, 0, 0),
                                                        rotation(0, 0, 10)))
    code, _, err = run(["segment", series, "-p", "Leber 肝", "--model", tiny_model_dir, "-o", tmp_path / "s.dcm",
                        "--precision", "fp32"], capsys)
    assert code == 0, err
    ds = pydicom.dcmread(tmp_path / "s.dcm")
    assert ds.SeriesDescription.startswith("UNTRAINED") and ds.ContentDescription.startswith("UNTRAINED")
    assert ds.SpecificCharacterSet == "ISO_IR 192" and ds.SegmentSequence[0].SegmentLabel == "Leber 肝"


def test_dicom_seg_from_a_series_without_uids_is_refused_before_the_model(tmp_path, capsys):
    from conftest import rotation
    from test_io import write_dicom_series

    series = write_dicom_series(tmp_path / "ct", Volume(blobs((4, 16, 18)), (0.7, 0.9, 2.5), (0, 0, 0),
                                                        rotation(0, 0, 10)))
    import pydicom

    for f in series.iterdir():  # an anonymiser that dropped the study UID
        ds = pydicom.dcmread(f)
        del ds.StudyInstanceUID
        ds.save_as(f)
    code, _, err = run(["segment", series, "-p", "liver", "--model", tmp_path / "absent", "-o", tmp_path / "s.dcm"],
                       capsys)
    assert code == 2 and "StudyInstanceUID" in err


@pytest.fixture
def small_filesystem(tmp_path):
    """A real file system of a given size (tmpfs): full disks and read-only folders without simulation."""
    import subprocess

    mounted = []

    def mount(size="64k", read_only=False):
        folder = tmp_path / f"fs{len(mounted)}"
        folder.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()[:100]}): needs root in a "
                        "machine that allows mounts")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], capture_output=True)


def test_a_full_disk_leaves_the_earlier_result_and_says_so(tmp_path, ct_file, tiny_model_dir, capsys,
                                                          small_filesystem):
    big = tmp_path / "big.nii.gz"
    sitk.WriteImage(io.volume_to_sitk(Volume(blobs((8, 64, 64)))), str(big))  # a 32 KB uncompressed labelmap
    disk = small_filesystem("64k")
    earlier = disk / "result.nii"
    earlier.write_bytes(os.urandom(40_000))  # an earlier result fills most of the disk
    before = sha(earlier)
    code, _, err = run(["segment", big, "-p", "liver", "--model", tiny_model_dir, "-o", earlier,
                        "--precision", "fp32"], capsys)
    assert code == 2 and "holds what it held before" in err
    assert sha(earlier) == before and [p.name for p in disk.iterdir()] == ["result.nii"]


@pytest.mark.parametrize("command", ["segment", "init", "evaluate"])
def test_a_read_only_folder_is_refused_before_any_work(tmp_path, ct_file, tiny_model_dir, capsys, small_filesystem,
                                                     command):
    locked = small_filesystem("64k", read_only=True)
    argv = {"segment": ["segment", ct_file, "-p", "liver", "--model", tmp_path / "absent", "-o", locked / "o.nii.gz"],
            "init": ["init", "--size", "tiny", "-o", locked / "model"],
            "evaluate": ["evaluate", "--predictions", tmp_path, "--ground-truth", tmp_path, "-o", locked / "r.csv"]}
    code, _, err = run(argv[command], capsys)
    assert code == 2 and ("permission denied" in err or "not writable" in err), err


def test_damaged_model_folders_and_odd_devices_are_one_line_user_errors(tmp_path, ct_file, tiny_model_dir, capsys):
    import shutil

    import torch

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    (bad / "medvlsm.json").write_text("{not json", encoding="utf-8")
    code, _, err = run(["segment", ct_file, "-p", "liver", "--model", bad, "-o", tmp_path / "o.nii.gz"], capsys)
    assert code == 2 and "medvlsm.json is not a valid model description" in err
    code, _, err = run(["segment", ct_file, "-p", "liver", "--model", tiny_model_dir, "-o", tmp_path / "o.nii.gz",
                        "--device", "meta"], capsys)
    assert code == 2 and "cannot run the model" in err
    assert main(["--quiet", "init", "--size", "small", "-o", str(tmp_path / "small")]) == 0
    shutil.copy(tmp_path / "small" / "model.safetensors", bad / "model.safetensors")
    (bad / "medvlsm.json").unlink()
    code, _, err = run(["segment", ct_file, "-p", "liver", "--model", bad, "-o", tmp_path / "o.nii.gz"], capsys)
    assert code == 2 and "do not have the sizes its config.json describes" in err and "above report" not in err
    torch.save({"weights": object()}, tmp_path / "pickled.pth")
    code, _, err = run(["convert", "--arch", "cris", "--from", tmp_path / "pickled.pth", "-o", tmp_path / "c"], capsys)
    assert code == 2 and "does not unpickle" in err and "two options" not in err


def test_upper_case_extensions_are_written_in_their_format(tmp_path, ct_file, tiny_model_dir, capsys):
    code, _, err = run(["segment", ct_file, "-p", "liver", "--model", tiny_model_dir, "-o", tmp_path / "OUT.NII.GZ",
                        "--precision", "fp32"], capsys)
    assert code == 0, err
    assert sitk.ReadImage(str(tmp_path / "OUT.NII.GZ")).GetSize() == sitk.ReadImage(str(ct_file)).GetSize()


@pytest.mark.parametrize("stage", ["before-any-byte", "midway", "complete-before-rename"])
def test_an_interrupt_at_any_point_of_a_write_leaves_the_earlier_file(tmp_path, monkeypatch, stage):
    import medvlsm.atomic as atomic

    target = tmp_path / "report.csv"
    target.write_text("earlier\n", encoding="utf-8")
    if stage == "complete-before-rename":
        monkeypatch.setattr(atomic, "_fsync", lambda path: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(target, "w", encoding="utf-8") as f:
            if stage == "before-any-byte":
                raise KeyboardInterrupt
            f.write("new,half")
            if stage == "midway":
                raise KeyboardInterrupt
            f.write(",complete\n")
    assert target.read_text(encoding="utf-8") == "earlier\n" and leftovers(tmp_path) == []


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal", "all"])
def test_every_plane_with_every_output_kind_and_the_overlay(tmp_path, ct_file, tiny_model_dir, capsys, axis):
    """--axis all with --overlay used to fail after the whole run ("Unknown plane 'all'"). Every output
    kind with all three planes; one kind per single plane (the kinds do not depend on the plane)."""
    for ext in (".seg.nrrd", ".nii.gz", ".nrrd") if axis == "all" else (".seg.nrrd",):
        written = [tmp_path / f"{axis}{ext}", tmp_path / f"{axis}{ext}-p.nii.gz", tmp_path / f"{axis}{ext}.png"]
        code, _, err = run(["segment", ct_file, "-p", "liver", "-p", "spleen", "--model", tiny_model_dir, "--axis",
                            axis, "-o", written[0], "--probabilities", written[1], "--overlay", written[2]], capsys)
        assert code == 0, err
        assert all(p.is_file() for p in written)
    assert leftovers(tmp_path) == []


def test_demo_with_all_three_planes_writes_its_overlay(tmp_path, capsys, tiny_model_dir):
    code, _, err = run(["demo", "--axis", "all", "--model", tiny_model_dir, "--output", tmp_path / "demo"], capsys)
    assert code == 0, err
    assert (tmp_path / "demo" / "demo_overlay.png").is_file()


def test_one_runs_outputs_commit_together(tmp_path, ct_file, tiny_model_dir, capsys, monkeypatch):
    """A full disk on the second output: the first is not left behind as a changed file, and the
    message names every output."""
    labels, probabilities = tmp_path / "labels.nii.gz", tmp_path / "p.nii.gz"
    labels.write_bytes(b"the labels of yesterday")

    def disk_full(*args):
        with atomic_path(args[2]) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(io, "write_probabilities", disk_full)
    code, _, err = run(["segment", ct_file, "-p", "liver", "--model", tiny_model_dir, "-o", labels,
                        "--probabilities", probabilities], capsys)
    assert code == 2 and "No space left" in err
    assert "None of this run's outputs was written" in err and str(labels) in err and str(probabilities) in err
    assert labels.read_bytes() == b"the labels of yesterday" and not probabilities.exists()
    assert leftovers(tmp_path) == []
