"""Every architecture through every entry point: init, save/load, segment a 2D image and a volume,
evaluate, finetune a few steps (random weights; no hub)."""

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import blobs
from synthetic import two_object_images, write_split

from medvlsm import io
from medvlsm.cli import main
from medvlsm.volume import Volume

pytestmark = pytest.mark.models

ARCHES = ["clipseg", "cris", "biomedclipseg"]
INPUT_SIZE = {"clipseg": 352, "cris": 416, "biomedclipseg": 224}


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("size", ["small", "full"])
def test_architecture_end_to_end(tmp_path, capsys, arch, size):
    folder = tmp_path / "model"
    assert main(["init", "--arch", arch, "--size", size, "--output", str(folder)]) == 0
    spec = json.loads((folder / "medvlsm.json").read_text(encoding="utf-8"))
    assert spec["arch"] == arch and spec["input_size"] == INPUT_SIZE[arch]

    data = tmp_path / "data"
    entries = two_object_images(data, 3)
    write_split(tmp_path, "set", entries)
    # a 2D RGB image
    assert main(["--quiet", "segment", str(data / "images" / "0.png"), "-p", "red circle", "--model", str(folder),
                 "-o", str(tmp_path / "mask.png")]) == 0
    assert sitk.ReadImage(str(tmp_path / "mask.png")).GetSize() == (96, 96)
    # a volume
    v = Volume(blobs((3, 40, 44)), (0.8, 0.8, 3.0))
    sitk.WriteImage(io.volume_to_sitk(v), str(tmp_path / "ct.nii.gz"))
    assert main(["--quiet", "segment", str(tmp_path / "ct.nii.gz"), "-p", "liver", "-p", "spleen", "--model",
                 str(folder), "-o", str(tmp_path / "ct.seg.nrrd"),
                 "--axis", "coronal" if size == "small" else "axial"]) == 0  # full size: 3 slices, not 40
    assert io.read_seg_nrrd(tmp_path / "ct.seg.nrrd").grid.same_grid(v)
    if size == "full":
        return  # full size: build, save, load, segment; the slower paths run at small size
    # evaluate
    assert main(["--quiet", "evaluate", "--model", str(folder), "--data", str(tmp_path / "set.json"), "--images",
                 str(data / "images"), "--masks", str(data / "masks"), "--prompt-type", "p1", "-o",
                 str(tmp_path / "eval.csv")]) == 0
    assert len(list(csv.DictReader(open(tmp_path / "eval.csv", encoding="utf-8")))) == len(entries)
    # finetune a few steps
    assert main(["--quiet", "finetune", "--train", str(tmp_path / "set.json"), "--val", str(tmp_path / "set.json"),
                 "--images", str(data / "images"), "--masks", str(data / "masks"), "--model", str(folder),
                 "--output", str(tmp_path / "ft"), "--epochs", "1", "--batch-size", "2", "--precision", "fp32",
                 "--freeze", "encoders" if arch == "biomedclipseg" else "none"]) == 0
    assert (tmp_path / "ft" / "model.safetensors").is_file()
    assert np.isfinite(float(next(csv.DictReader(open(tmp_path / "ft" / "training_log.csv")))["train_loss"]))
    capsys.readouterr()
