"""Issue 12, evaluation and finetuning: scores that mean what they say, training data named as the
user named it, a finetuned folder that describes itself and the preprocessing it was trained with."""

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import blobs

from medvlsm import evaluation, io, training
from medvlsm.cli import main
from medvlsm.datasets import read_volume_folder
from medvlsm.errors import InputError
from medvlsm.volume import Volume


def _labelmap(path, array):
    sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.uint8)), str(path))


def test_a_multi_label_file_against_itself_scores_one_per_label(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir(), gt.mkdir()
    labels = np.zeros((4, 20, 20), np.uint8)
    labels[:, 2:8, 2:8] = 1
    labels[:, 12:18, 12:18] = 2
    _labelmap(gt / "case1.nii.gz", labels)
    _labelmap(pred / "case1.nii.gz", labels)
    rows = evaluation.evaluate_files(pred, gt)
    assert [(r["label"], r["dice"]) for r in rows] == [("1", 1.0), ("2", 1.0)]


def test_segments_are_paired_by_name_and_missing_cases_count_as_zero(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir(), gt.mkdir()
    v = Volume(np.zeros((3, 12, 12), np.int16))
    liver, spleen = np.zeros((3, 12, 12), bool), np.zeros((3, 12, 12), bool)
    liver[:, 1:5, 1:5], spleen[:, 7:11, 7:11] = True, True
    io.write_seg_nrrd(v, np.stack([liver, spleen]), ["liver", "spleen"], gt / "a.seg.nrrd")
    io.write_seg_nrrd(v, np.stack([spleen, liver]), ["spleen", "liver"], pred / "a.seg.nrrd")  # other order
    io.write_seg_nrrd(v, liver[None], ["liver"], gt / "b.seg.nrrd")  # no prediction for b
    rows = evaluation.evaluate_files(pred, gt)
    by = {(r["case"], r["label"]): r for r in rows}
    assert by[("a", "liver")]["dice"] == 1.0 and by[("a", "spleen")]["dice"] == 1.0
    assert by[("b", "liver")]["dice"] == 0.0 and by[("b", "liver")]["missing"]
    assert evaluation.missing_cases(rows) == ["b"]


def test_the_report_lists_cases_without_a_prediction(tmp_path, capsys):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir(), gt.mkdir()
    mask = np.zeros((1, 10, 10), np.uint8)
    mask[0, 2:6, 2:6] = 1
    for name in ("c1", "c2", "c3"):
        _labelmap(gt / f"{name}.nii.gz", mask)
    _labelmap(pred / "c1.nii.gz", mask)
    out = tmp_path / "new" / "folder" / "r.csv"  # evaluate makes its report's folder, as finetune does
    assert main(["evaluate", "--predictions", str(pred), "--ground-truth", str(gt), "-o", str(out)]) == 0
    report = (out.parent / "r.md").read_text(encoding="utf-8")
    assert "Cases without a prediction (2" in report and "c2, c3" in report
    assert "| all | 3 | 0.333" in report
    assert "2 case(s) without a prediction" in capsys.readouterr().out


def test_worst_cases_are_distinct_cases():
    worst = evaluation.WorstCases(3)
    item = lambda name: type("Item", (), {"name": name})()  # noqa: E731
    for name, dice in (("a", 0.1), ("a", 0.05), ("a", 0.2), ("b", 0.3), ("c", 0.4), ("d", 0.9)):
        worst(item(name), "p1", None, None, None, {"dice": dice})
    assert [(c[1], c[0]) for c in worst.cases] == [("a", 0.05), ("b", 0.3), ("c", 0.4)]


def test_robustness_uses_the_same_preprocessing_as_the_table(tmp_path, monkeypatch, tiny_model_dir):
    from test_prompts_eval import synthetic_dataset

    synthetic_dataset(tmp_path, count=2)
    seen = []
    from medvlsm.engine import Engine

    real = Engine.segment

    def spy(self, volume, request, **kwargs):
        seen.append(request.resize)  # evaluation plans each run's request once; the engine runs it
        return real(self, volume, request, **kwargs)

    monkeypatch.setattr(Engine, "segment", spy)
    assert main(["--quiet", "evaluate", "--model", str(tiny_model_dir), "--data", str(tmp_path / "anns.json"),
                 "--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks"), "--robustness",
                 "--resize", "letterbox", "--precision", "fp32", "-o", str(tmp_path / "r.csv")]) == 0
    assert set(seen) == {"letterbox"} and len(seen) > 2


def _volume_pair(tmp_path, table=None):
    volumes, segs = tmp_path / "volumes", tmp_path / "segs"
    volumes.mkdir(), segs.mkdir()
    v = Volume(blobs((6, 24, 24)), (1.0, 1.0, 2.0))
    sitk.WriteImage(io.volume_to_sitk(v), str(volumes / "case1.nrrd"))
    labels = np.zeros(v.shape, np.uint8)
    labels[1:5, 4:12, 4:12], labels[1:5, 14:20, 14:20] = 1, 2
    io.write_labelmap(v, labels, segs / "case1.nrrd")
    if table:
        (segs / "case1.ctbl").write_text(table, encoding="utf-8")
    return volumes, segs


def test_labelmaps_without_names_are_refused_with_the_ways_to_name_them(tmp_path):
    volumes, segs = _volume_pair(tmp_path)
    (pair,) = read_volume_folder(volumes, segs)
    with pytest.raises(InputError, match=r"label value\(s\) \[1, 2\] without a name.*--label-names"):
        pair.load()


def test_label_names_come_from_a_slicer_colour_table_or_the_option(tmp_path):
    volumes, segs = _volume_pair(tmp_path, "# Slicer colour table\n0 Background 0 0 0 0\n1 liver 128 0 0 255\n"
                                           "2 left_kidney 0 128 0 255\n")
    (pair,) = read_volume_folder(volumes, segs)
    assert pair.load()[2] == ["liver", "left kidney"]
    (pair,) = read_volume_folder(volumes, segs, {1: "Leber", 2: "Niere"})
    assert pair.load()[2] == ["Leber", "Niere"]


@pytest.mark.parametrize("option,value", [("--epochs", "0"), ("--batch-size", "0"), ("--lr", "-1"), ("--lr", "nan")])
def test_training_options_are_validated(tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as exit_:
        main(["finetune", "--volumes", str(tmp_path), "--segmentations", str(tmp_path), "-o", str(tmp_path / "o"),
              option, value])
    assert exit_.value.code == 2 and value in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_a_finetuned_folder_names_itself_and_records_its_preprocessing(tmp_path, tiny_model_dir, capsys):
    volumes, segs = _volume_pair(tmp_path, "1 liver 1 0 0 1\n2 spleen 0 1 0 1\n")
    out = tmp_path / "my-liver-model"
    assert main(["--quiet", "finetune", "--volumes", str(volumes), "--segmentations", str(segs), "--model",
                 str(tiny_model_dir), "-o", str(out), "--epochs", "1", "--batch-size", "4", "--precision", "fp32",
                 "--device", "cpu"]) == 0, capsys.readouterr().err
    spec = json.loads((out / "medvlsm.json").read_text(encoding="utf-8"))
    assert spec["name"] == "my-liver-model" and spec["parameters_m"] > 0 and spec["trained"]
    assert spec["resize"] == "letterbox"
    from medvlsm.engine import Engine
    from medvlsm.models import load_model

    card = (out / "README.md").read_text(encoding="utf-8")
    assert card.startswith("# my-liver-model") and f"Finetuned from `{load_model(tiny_model_dir).spec.name}`" in card

    engine = Engine(load_model(out), device="cpu", precision="fp32")
    stretched = Engine(load_model(tiny_model_dir), device="cpu", precision="fp32")
    v = Volume(blobs((2, 20, 40)), (1.0, 1.0, 2.0))
    spy = []
    engine.model.spec.resize = "stretch"  # what the folder says is what the engine uses when not told
    real = training.Letterbox.fit
    training.Letterbox.fit = staticmethod(lambda *a: spy.append(a[-1]) or real(*a))
    try:
        engine.segment(v, ["liver"])
        stretched.segment(v, ["liver"])
    finally:
        training.Letterbox.fit = staticmethod(real)
    assert spy == ["stretch", "letterbox"]


def test_an_interrupted_finetune_leaves_a_truthful_model_folder(tmp_path, tiny_model_dir, monkeypatch, capsys):
    volumes, segs = _volume_pair(tmp_path, "1 liver 1 0 0 1\n2 spleen 0 1 0 1\n")
    out = tmp_path / "ft"
    calls = []
    real = training.write_curves

    def interrupt_after_first_epoch(history, output):
        real(history, output)
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "write_curves", interrupt_after_first_epoch)
    code = main(["--quiet", "finetune", "--volumes", str(volumes), "--segmentations", str(segs), "--model",
                 str(tiny_model_dir), "-o", str(out), "--epochs", "3", "--batch-size", "4", "--precision", "fp32",
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code != 0 and "no output was written" not in err
    spec = json.loads((out / "medvlsm.json").read_text(encoding="utf-8"))
    assert spec["name"] == "ft" and spec["trained"] and spec["parameters_m"] > 0
    assert list(csv.DictReader(open(out / "training_log.csv")))[0]["epoch"] == "1"
    assert [p.name for p in out.rglob("*") if ".tmp" in p.name] == []


def test_jpeg_masks_are_binarised_with_a_warning_never_scored_per_grey_level(tmp_path, caplog):
    """Three CVC-ClinicDB masks (JPEG: 0/255 with compression noise) against themselves and against
    their PNG cut at 127: one binary label per case, Dice 1 and near 1 (used to be 0.000 over 161
    "labels", the grey levels)."""
    import shutil

    from conftest import SHARED_DATA

    masks = SHARED_DATA / "cvc-clinicdb" / "masks"
    if not masks.is_dir():
        pytest.skip(f"{masks} is absent (the shared real-data folder beside the checkout)")
    gt, same, png = (tmp_path / n for n in ("gt", "same", "png"))
    for folder in (gt, same, png):
        folder.mkdir()
    for name in ("1", "10", "100"):
        shutil.copy(masks / f"{name}.jpg", gt / f"{name}.jpg")
        shutil.copy(masks / f"{name}.jpg", same / f"{name}.jpg")
        grey = sitk.GetArrayFromImage(sitk.ReadImage(str(masks / f"{name}.jpg")))
        grey = grey.max(axis=-1) if grey.ndim == 3 else grey  # stored as RGB
        sitk.WriteImage(sitk.GetImageFromArray(((grey > 127) * 255).astype(np.uint8)), str(png / f"{name}.png"))
    rows = evaluation.evaluate_files(same, gt)
    assert [(r["case"], r["label"], r["dice"]) for r in rows] == [(n, "1", 1.0) for n in ("1", "10", "100")]
    assert "read as one binary mask" in caplog.text and "JPEG" in caplog.text
    rows = evaluation.evaluate_files(png, gt)
    assert len(rows) == 3 and min(r["dice"] for r in rows) > 0.95
