"""The `medvlsm` command: outputs, summary, and one clear line for every bad input."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import blobs, rotation, sha

from medvlsm import io
from medvlsm.cli import main
from medvlsm.volume import Volume


@pytest.fixture
def ct_file(tmp_path):
    v = Volume(blobs((5, 32, 40)), (0.8, 0.8, 2.5), (10, -20, 30), rotation(0, 0, 15))
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(io.volume_to_sitk(v), str(path))
    return path


def run(argv, capsys):
    code = main(["--quiet"] + [str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_segment_writes_every_format_on_the_input_grid(tmp_path, ct_file, tiny_model_dir, capsys):
    before = sha(ct_file)
    code, out, err = run(["segment", ct_file, "-p", "liver", "-p", "spleen", "--model", tiny_model_dir,
                          "--output", tmp_path / "s.seg.nrrd", "--probabilities", tmp_path / "p.nii.gz",
                          "--overlay", tmp_path / "o.png", "--precision", "fp32"], capsys)
    assert code == 0, err
    assert "liver:" in out and "spleen:" in out and "5 axial slices" in out and "cpu" in out
    assert "untrained" in err.lower()
    seg = io.read_seg_nrrd(tmp_path / "s.seg.nrrd")
    src = sitk.ReadImage(str(ct_file))
    assert seg.names == ["liver", "spleen"] and seg.masks.shape == (2, 5, 32, 40)
    np.testing.assert_allclose(seg.grid.ijk_to_lps()[:3, :3].ravel(),
                               (np.reshape(src.GetDirection(), (3, 3)) @ np.diag(src.GetSpacing())).ravel(), atol=1e-5)
    probs = sitk.ReadImage(str(tmp_path / "p.nii.gz"))
    assert probs.GetNumberOfComponentsPerPixel() == 2 and probs.GetSize() == src.GetSize()
    assert (tmp_path / "o.png").stat().st_size > 1000
    code, _, err = run(["segment", ct_file, "-p", "liver", "--model", tiny_model_dir, "--output",
                        tmp_path / "l.nrrd", "--axis", "coronal", "--keep-largest"], capsys)
    assert code == 0, err
    labels = sitk.ReadImage(str(tmp_path / "l.nrrd"))
    assert labels.GetSize() == src.GetSize() and np.allclose(labels.GetOrigin(), src.GetOrigin())
    assert sha(ct_file) == before  # the input is never modified


def test_2d_png_in_png_out(tmp_path, tiny_model_dir, capsys):
    rgb = np.random.default_rng(1).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "frame.png"))
    code, out, err = run(["segment", tmp_path / "frame.png", "-p", "one small pink round polyp in the center",
                          "--model", tiny_model_dir, "-o", tmp_path / "mask.png"], capsys)
    assert code == 0, err
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "mask.png")))
    assert mask.shape == (40, 50)
    assert "pixels (" in out and "mm²)" in out and "1 image in" in out  # not voxels, mL, "axial slices"
    assert "voxels" not in out and "mL" not in out and "slice" not in out


def test_models_and_init(tmp_path, capsys):
    code, out, _ = run(["models"], capsys)
    assert code == 0 and "clipseg-rd64-refined" in out and "(default)" in out and "Apache-2.0" in out
    code, out, _ = run(["init", "--size", "tiny", "--output", tmp_path / "m"], capsys)
    assert code == 0 and (tmp_path / "m" / "model.safetensors").is_file() and (tmp_path / "m" / "medvlsm.json").is_file()
    printed = float(re.search(r"([\d.]+) M parameters", out).group(1))
    assert json.loads((tmp_path / "m" / "medvlsm.json").read_text())["parameters_m"] == printed > 0  # was 0.0


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("medvlsm")  # the environment's bin/, activated or not
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "segment" in out.stdout


def test_demo_runs_on_the_bundled_ct(tmp_path, tiny_model_dir, capsys):
    code, out, err = run(["demo", "--output", tmp_path / "demo", "--model", tiny_model_dir], capsys)
    assert code == 0, err
    for name in ("demo.seg.nrrd", "demo_labels.nii.gz", "demo_overlay.png"):
        assert (tmp_path / "demo" / name).is_file()
    labels = sitk.ReadImage(str(tmp_path / "demo" / "demo_labels.nii.gz"))
    assert labels.GetSize() == (256, 256, 24)


def test_demo_offline_says_how_to_point_at_a_local_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code, _, err = run(["demo", "--output", tmp_path / "demo"], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "--model" in lines[0] and "cache" in lines[0]

    for argv in (["segment", tmp_path / "x.nii.gz", "-p", "liver", "-o", tmp_path / "o.seg.nrrd"],
                 ["download", "clipseg-rd64-refined"]):
        if argv[0] == "segment":
            sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 8, 8), np.int16)), str(argv[1]))
        code, _, err = run(argv, capsys)
        assert code == 2 and "medvlsm init" in err and "machine with internet" in err, err  # never "run download"


# ---- bad input: one line, exit 2, nothing written ----------------------------------------------

def write(path, array, vector=False, spacing=None):
    image = sitk.GetImageFromArray(array, isVector=vector)
    if spacing:
        image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


BAD_INPUTS = {
    "missing file": (lambda t: t / "nope.nii.gz", "not found"),
    "unreadable file": (lambda t: (t / "junk.nii.gz").write_bytes(b"not an image at all" * 10) and t / "junk.nii.gz",
                        "Cannot read"),
    "4D volume": (lambda t: write(t / "4d.nii.gz", np.zeros((2, 3, 8, 8), np.int16)), "4D"),
    "vector volume": (lambda t: write(t / "vec.nrrd", np.zeros((3, 8, 8, 2), np.float32), vector=True), "components"),
    "NaN voxels": (lambda t: write(t / "nan.nrrd", np.where(np.eye(8)[None] > 0, np.nan, 0).astype(np.float32)),
                   "NaN"),
    "one voxel": (lambda t: write(t / "one.nrrd", np.zeros((1, 1, 1), np.int16)), "too small"),
    "empty folder": (lambda t: (t / "empty").mkdir() or t / "empty", "No DICOM series"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs(tmp_path, tiny_model_dir, capsys, case):
    make, expected = BAD_INPUTS[case]
    path = make(tmp_path)
    code, out, err = run(["segment", path, "-p", "liver", "--model", tiny_model_dir, "-o", tmp_path / "o.nii.gz"],
                         capsys)
    assert code == 2
    assert err.strip().count("\n") == 0 and err.startswith("error:") and expected in err
    assert not (tmp_path / "o.nii.gz").exists()


def test_wrong_plane_for_a_2d_image(tmp_path, tiny_model_dir, capsys):
    write(tmp_path / "x.png", np.zeros((20, 20), np.uint8))
    code, _, err = run(["segment", tmp_path / "x.png", "-p", "a", "--model", tiny_model_dir, "-o",
                        tmp_path / "o.png", "--axis", "coronal"], capsys)
    assert code == 2 and "--axis axial" in err


@pytest.mark.parametrize("prompt,warning", [("", "p0"), ("rein gauche é", "English"),
                                            ("polyp " * 100, "Shorten")])
def test_questionable_prompts_warn_but_run(tmp_path, ct_file, tiny_model_dir, capsys, prompt, warning):
    code, _, err = run(["segment", ct_file, "-p", prompt, "--model", tiny_model_dir, "-o", tmp_path / "o.nii.gz"],
                       capsys)
    assert code == 0 and warning in err and (tmp_path / "o.nii.gz").is_file()


def _corrupt_no_weights(folder):
    (folder / "model.safetensors").unlink()


def _corrupt_truncated(folder):
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:5000])


def _corrupt_lfs_pointer(folder):
    (folder / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1\n")


def _corrupt_config(folder):
    (folder / "config.json").write_text("{ this is not json")


def _corrupt_tokenizer(folder):
    (folder / "tokenizer.json").unlink()


@pytest.mark.parametrize("corrupt,expected", [
    (_corrupt_no_weights, "no weights"), (_corrupt_truncated, "Cannot load"), (_corrupt_lfs_pointer, "LFS pointer"),
    (_corrupt_config, "config.json"), (_corrupt_tokenizer, "tokenizer")])
def test_corrupt_model_folder(tmp_path, ct_file, tiny_model, capsys, corrupt, expected):
    folder = tmp_path / "model"
    tiny_model.save_pretrained(folder)
    corrupt(folder)
    code, _, err = run(["segment", ct_file, "-p", "x", "--model", folder, "-o", tmp_path / "o.nii.gz"], capsys)
    assert code == 2 and expected in err and err.count("\n") == 1


@pytest.mark.parametrize("args,expected", [
    (["--model", "no-such-model"], "Unknown model"),
    (["--model", "/no/such/folder"], "does not exist"),
    (["-o", "{tmp}/out.jpg"], "Unknown output extension"),
    (["-o", "{tmp}/missing/out.nii.gz"], "does not exist"),
    (["--window", "40,x"], "LEVEL,WIDTH"),
    (["--slices", "5-9"], "START:STOP"),
    (["--slices", "3:99"], "outside"),
    (["--device", "cuda:7"] if not __import__("torch").cuda.is_available() else ["--device", "quantum"], "device"),
    (["--overlay", "{tmp}/o.jpg"], ".png"),
    (["--batch-size", "0"], "Batch size"),
])
def test_bad_options(tmp_path, ct_file, tiny_model_dir, capsys, args, expected):
    argv = ["segment", ct_file, "-p", "x", "--model", tiny_model_dir, "-o", tmp_path / "o.nii.gz"]
    argv += [a.format(tmp=tmp_path) for a in args]
    code, _, err = run(argv, capsys)
    assert code == 2 and expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "o.nii.gz").exists()


def test_debug_shows_the_traceback(tmp_path, tiny_model_dir):
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-m", "medvlsm.cli", "--debug", "segment", str(tmp_path / "missing.nii"),
                          "-p", "x", "--model", str(tiny_model_dir), "-o", str(tmp_path / "o.nii.gz")],
                         capture_output=True, text=True, env=env)
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_dicom_series_in_dicom_seg_out(tmp_path, tiny_model_dir, capsys):
    import highdicom as hd
    from test_io import write_dicom_series

    folder = write_dicom_series(tmp_path / "series", Volume(blobs((3, 24, 28)), (0.8, 0.8, 3.0)))
    code, _, err = run(["segment", folder, "-p", "liver", "-p", "spleen", "--model", tiny_model_dir, "-o",
                        tmp_path / "seg.dcm"], capsys)
    assert code == 0, err
    assert hd.seg.segread(str(tmp_path / "seg.dcm")).number_of_segments == 2
    code, _, err = run(["segment", tmp_path / "series" / "000.dcm", "-p", "liver", "--model", tiny_model_dir, "-o",
                        tmp_path / "x.dcm"], capsys)
    assert code == 2 and "DICOM series" in err


def test_a_cohort_runs_every_volume_once_and_resumes(tmp_path, capsys, tiny_model_dir):
    """A folder of volumes (one damaged) and a CSV of the same: one output per case, the damaged one
    named in cohort.csv without stopping the others; a second run skips what is done."""
    import csv

    folder = tmp_path / "cohort"
    folder.mkdir()
    grids = {}
    for n, shape in enumerate([(4, 24, 28), (3, 20, 20)]):
        grids[f"case{n}"] = Volume(blobs(shape, seed=n), (0.9, 0.9, 2.0), (n, 0, 0), rotation(0, 0, 10 * n))
        sitk.WriteImage(io.volume_to_sitk(grids[f"case{n}"]), str(folder / f"case{n}.nii.gz"))
    (folder / "broken.nii.gz").write_bytes(b"not an image")
    out = tmp_path / "out"
    argv = ["segment", folder, "-p", "liver", "--model", tiny_model_dir, "-o", out]
    code, printed, err = run(argv, capsys)
    assert code == 2 and "1 case(s) failed" in err and "2 segmented" in printed
    log = {row["case"]: row for row in csv.DictReader(open(out / "cohort.csv", encoding="utf-8"))}
    assert log["broken"]["state"] == "failed" and "Cannot read" in log["broken"]["reason"]
    for name, grid in grids.items():
        assert log[name]["state"] == "done" and io.read_seg_nrrd(out / f"{name}.seg.nrrd").grid.same_grid(grid)
    before = {name: (out / f"{name}.seg.nrrd").stat().st_mtime_ns for name in grids}
    (folder / "broken.nii.gz").unlink()
    assert run(argv, capsys)[0] == 0  # resumed: the done cases are skipped, untouched
    assert {name: (out / f"{name}.seg.nrrd").stat().st_mtime_ns for name in grids} == before
    assert {row["state"] for row in csv.DictReader(open(out / "cohort.csv", encoding="utf-8"))} == {"skipped"}

    (tmp_path / "list.csv").write_text("path,name\ncohort/case1.nii.gz,second\n", encoding="utf-8")
    code, printed, _ = run(["segment", tmp_path / "list.csv", "-p", "liver", "--model", tiny_model_dir, "-o",
                            tmp_path / "labels", "--format", ".nii.gz"], capsys)
    assert code == 0 and (tmp_path / "labels" / "second.nii.gz").is_file()
    code, _, err = run(["segment", folder, "-p", "liver", "--model", tiny_model_dir, "-o", tmp_path / "x.seg.nrrd"],
                       capsys)
    assert code == 2 and "is a folder" in err


def test_all_three_planes_from_the_command_line(ct_file, tmp_path, capsys, tiny_model_dir):
    code, printed, _ = run(["segment", ct_file, "-p", "liver", "--model", tiny_model_dir, "--axis", "all", "--fusion",
                            "majority", "-o", tmp_path / "fused.seg.nrrd"], capsys)
    assert code == 0 and "all three planes (majority)" in printed
    assert io.read_seg_nrrd(tmp_path / "fused.seg.nrrd").grid.same_grid(io.read_image(ct_file))
    code, _, err = run(["segment", ct_file, "-p", "liver", "--model", tiny_model_dir, "--axis", "all", "--slices",
                        "0:2", "-o", tmp_path / "x.seg.nrrd"], capsys)
    assert code == 2 and "belongs to one plane" in err


def test_a_run_in_a_log_file_says_what_it_does_as_it_goes(ct_file, tmp_path, tiny_model_dir, capsys, monkeypatch):
    """stderr is not a terminal here (captured), as in a log file: a phase line, the plan, progress
    lines at a steady pace (every line here: the pace is set to 0 s) and no bar redraws."""
    from medvlsm import cli

    monkeypatch.setattr(cli, "PROGRESS_EVERY_S", 0.0)
    assert main(["segment", str(ct_file), "-p", "liver", "--model", str(tiny_model_dir), "--device", "cpu",
                 "--batch-size", "2", "-o", str(tmp_path / "o.seg.nrrd")]) == 0
    err = capsys.readouterr().err
    assert "loading the model" in err and "plan: 'liver' on 5 axial slices" in err, err
    assert "on cpu (" in err and "UNTRAINED (random) weights" in err and "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("segmenting: ")]
    assert len(lines) >= 3 and lines[-1].startswith("segmenting: 5/5 slices (100 %)") and "s left" in lines[1]
