"""Every architecture through every entry point: init, save/load, segment a 2D image and a volume,
evaluate, finetune a few steps (random weights; no hub); the table of architectures itself, and a
toy architecture added as docs/models.md says."""

import ast
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import blobs
from synthetic import two_object_images, write_split

from medvlsm import io
from medvlsm.cli import main
from medvlsm.models import ARCHITECTURES
from medvlsm.volume import Volume

pytestmark = pytest.mark.models

LOGIC = Path(__file__).resolve().parents[1] / "Logic" / "medvlsm"


def test_the_table_holds_the_papers_settings():
    """The facts of arXiv 2308.07706 (and CRIS's own code for its threshold), in the one table."""
    paper = {"clipseg": (352, 0.5, 2e-3), "cris": (416, 0.35, 2e-5), "biomedclipseg": (224, 0.5, 2e-3)}
    assert {name: (a.defaults["input_size"], a.defaults["threshold"], a.paper_lr)
            for name, a in ARCHITECTURES.items() if a.reads_text} == paper
    assert [name for name, a in ARCHITECTURES.items() if not a.reads_text] == ["unet"]  # the image-only baseline
    assert ARCHITECTURES["biomedclipseg"].defaults["text_tokens"] == 256  # PubMedBERT's context


def test_config_and_model_classes_are_registered_with_the_auto_classes(tmp_path):
    from transformers import AutoConfig, AutoModel

    for name, arch in ARCHITECTURES.items():
        vlsm = arch.model_class()
        assert isinstance(AutoConfig.for_model(name), vlsm.hf_class.config_class)
    folder = tmp_path / "cris"
    ARCHITECTURES["cris"].random("tiny").save_pretrained(folder)
    assert type(AutoModel.from_pretrained(folder)).__name__ == "CRISModel"


def test_no_function_in_logic_takes_more_than_six_parameters():
    """Beyond six, options are grouped: in the request (``request.plan``'s keyword-only options are its
    fields), a config or a small options object."""
    crowded = []
    for path in LOGIC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                named = [x.arg for x in a.posonlyargs + a.args if x.arg not in ("self", "cls")]
                if not (path.name == "request.py" and node.name == "plan"):
                    named += [x.arg for x in a.kwonlyargs]
                if len(named) > 6:
                    crowded.append(f"{path.relative_to(LOGIC)}:{node.lineno} {node.name}({', '.join(named)})")
    assert not crowded, crowded


def test_the_declared_transformers_range_is_the_tested_one():
    """setup.py, the Makefile's lowest-version run and the check at import name the same version; under
    that run (MEDVLSM_EXPECT_TRANSFORMERS), these tests really import it."""
    import os
    import re

    import transformers

    from medvlsm.errors import ModelError
    from medvlsm.models.base import TRANSFORMERS_MIN, check_transformers

    root = LOGIC.parents[1]
    low, high = re.search(r'"transformers>=([\d.]+),<(\d+)"', (root / "setup.py").read_text(encoding="utf-8")).groups()
    lowest = re.search(r"TRANSFORMERS_LOWEST := transformers==([\d.]+)", (root / "Makefile").read_text()).group(1)
    assert tuple(map(int, low.split("."))) == TRANSFORMERS_MIN == tuple(map(int, lowest.split(".")[:2]))
    assert int(high) == TRANSFORMERS_MIN[0] + 1
    check_transformers(lowest)
    with pytest.raises(ModelError, match="pip install 'transformers>="):
        check_transformers("5.17.1")
    expected = os.environ.get("MEDVLSM_EXPECT_TRANSFORMERS")
    if expected:
        assert f"transformers=={transformers.__version__}" == expected


@pytest.fixture
def toy_architecture():
    import toy_vlsm

    yield toy_vlsm.add()
    del ARCHITECTURES["toyseg"]


def test_a_new_architecture_is_one_module_and_one_table_entry(toy_architecture, tmp_path, capsys):
    """Registered as docs/models.md says, the toy architecture works through init, load, segment and
    finetune with no other change: every choice and default comes from the table."""
    from medvlsm.models import load_model

    folder = tmp_path / "toy"
    assert main(["init", "--arch", "toyseg", "--size", "tiny", "--output", str(folder)]) == 0
    assert json.loads((folder / "config.json").read_text(encoding="utf-8"))["model_type"] == "toyseg"
    model = load_model(folder)
    assert type(model).__name__ == "ToySeg" and model.spec.input_size == 64 and model.spec.threshold == 0.5
    assert main(["init", "--arch", "toyseg", "--input-size", "66", "--output", str(tmp_path / "odd")]) == 2
    assert "divisible by 4" in capsys.readouterr().err

    v = Volume(blobs((4, 40, 44)), (0.8, 0.8, 3.0))
    sitk.WriteImage(io.volume_to_sitk(v), str(tmp_path / "ct.nii.gz"))
    assert main(["--quiet", "segment", str(tmp_path / "ct.nii.gz"), "-p", "liver", "-p", "spleen", "--model",
                 str(folder), "-o", str(tmp_path / "ct.seg.nrrd")]) == 0
    seg = io.read_seg_nrrd(tmp_path / "ct.seg.nrrd")
    assert seg.grid.same_grid(v) and seg.names == ["liver", "spleen"]

    data = tmp_path / "data"
    write_split(tmp_path, "set", two_object_images(data, 4))
    assert main(["--quiet", "finetune", "--train", str(tmp_path / "set.json"), "--val", str(tmp_path / "set.json"),
                 "--images", str(data / "images"), "--masks", str(data / "masks"), "--model", str(folder),
                 "--output", str(tmp_path / "ft"), "--epochs", "1", "--batch-size", "2", "--precision", "fp32"]) == 0
    card = (tmp_path / "ft" / "README.md").read_text(encoding="utf-8")
    assert '"lr": 0.001' in card  # the table's paper_lr of the new architecture
    assert type(load_model(tmp_path / "ft")).__name__ == "ToySeg"
    capsys.readouterr()


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("size", ["small", "full"])
def test_architecture_end_to_end(tmp_path, capsys, arch, size):
    folder = tmp_path / "model"
    assert main(["init", "--arch", arch, "--size", size, "--output", str(folder)]) == 0
    spec = json.loads((folder / "medvlsm.json").read_text(encoding="utf-8"))
    assert spec["arch"] == arch and spec["input_size"] == ARCHITECTURES[arch].defaults["input_size"]

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
