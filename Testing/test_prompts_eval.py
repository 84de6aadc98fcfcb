"""Prompt ladders (string-exact against the paper's annotation files), metrics, evaluation."""

import csv
import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medvlsm.cli import main
from medvlsm.metrics import score
from medvlsm.prompts import (Attributes, busi_ladder, camus_ladder, geometry_attributes, ladder, number_word,
                             parse_ladder)

ANNS = Path(__file__).resolve().parent / "data" / "medvlsm-anns"  # the paper's files, shipped (MIT)
CLINICDB = Path(__file__).resolve().parents[2] / "shared" / "data" / "cvc-clinicdb"


def reference(name: str) -> list:
    return json.loads(gzip.decompress((ANNS / f"{name}.json.gz").read_bytes()).decode("utf-8"))


def test_all_fourteen_reference_files_are_shipped():
    entries = sum(len(reference(p.name[: -len(".json.gz")])) for p in ANNS.glob("*.json.gz"))
    assert len(list(ANNS.glob("*.json.gz"))) == 14 and entries == 5916


@pytest.mark.parametrize("path", sorted(ANNS.glob("*.json.gz")), ids=lambda p: p.name)
def test_every_reference_ladder_is_rebuilt_string_exact(path):
    entries = reference(path.name[: -len(".json.gz")])
    for entry in entries:
        attributes = parse_ladder(entry["prompts"])
        assert ladder(attributes) == entry["prompts"], entry["img_name"]


def test_cli_attributes_json_gives_the_reference_structure(tmp_path, capsys):
    entries = reference("kvasir_polyp.test")[:5]
    attrs = []
    for e in entries:
        a = parse_ladder(e["prompts"])
        attrs.append({"class": a.cls, "shape": a.shape, "color": a.color, "size": a.size, "number": a.number,
                      "location": a.location, "descriptions": a.descriptions})
    (tmp_path / "a.json").write_text(json.dumps(attrs))
    assert main(["prompts", "--attributes", str(tmp_path / "a.json")]) == 0
    assert json.loads(capsys.readouterr().out) == [e["prompts"] for e in entries]


def test_prompts_command_does_not_import_torch():
    code = "import sys; from medvlsm.cli import main; main(['prompts', '--class', 'liver']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("False")


def test_ladder_examples_of_the_paper():
    a = Attributes("polyp", "circle", "pink", "small", "one", "right", ["a projecting growth of tissue"])
    lad = ladder(a)
    assert lad["p6"] == "one small pink circle polyp, located in right of the image"
    assert lad["p9"] == ["one small pink circle polyp which is a projecting growth of tissue located in right of the image"]
    assert ladder(Attributes("polyp", number="no"))["p4"] == "no polyp"
    assert ladder(Attributes("liver"))["p5"] == "liver"  # missing attributes leave no double spaces
    assert number_word(73) == "seventy-three" and number_word(2) == "two"


def test_dataset_styles():
    c = camus_ladder("Left ventricular cavity", "two-chamber", "diastole", (73, "male"), "good", "oval")
    assert c["p5"][0] == "Left ventricular cavity in two-chamber view of the heart at end of the diastole cycle of a " \
                         "seventy-three-year-old male."
    b = busi_ladder("benign", True, 1, "medium", "center", "oval")
    assert b["p4"] == ["One medium benign tumor in the breast ultrasound image.",
                       "One medium regular-shaped tumor in the breast ultrasound image."]
    assert b["p6"][1] == "One medium oval-shaped regular tumor at the center in the breast ultrasound image."
    assert busi_ladder(number=0)["p3"] == "No tumor in the breast ultrasound image."


def test_geometry_attributes_from_synthetic_masks():
    m = np.zeros((90, 120), bool)
    m[5:15, 100:115] = True  # top right, 150 px = 1.4 % -> small
    assert geometry_attributes(m) == {"number": "one", "size": "small", "location": ["top right"]}
    m[60:85, 5:40] = True  # second object, bottom left; 1025 px -> 9.5 % -> medium
    g = geometry_attributes(m)
    assert g["number"] == "two" and g["size"] == "medium" and g["location"] == ["top right", "bottom left"]
    big = np.ones((10, 10), bool)
    assert geometry_attributes(big)["size"] == "large" and geometry_attributes(big)["location"] == ["center"]
    tiny = np.zeros((100, 100), bool)
    tiny[50, 50] = True
    assert geometry_attributes(tiny)["size"] == "tiny"
    assert geometry_attributes(np.zeros((5, 5)))["number"] == "no"


@pytest.mark.skipif(not CLINICDB.is_dir(), reason=f"CVC-ClinicDB images not found at {CLINICDB} (not "
                    "redistributable: research use only; CI has them in shared/data)")
def test_number_and_size_match_the_reference_on_real_clinicdb_masks():
    """Our rules reproduce the reference's number (4-connected components) and size on real masks."""
    from medvlsm.datasets import read_annotations

    items = read_annotations(ANNS / "clinicdb_polyp.test.json.gz", CLINICDB / "images", CLINICDB / "masks")
    agree_number = agree_size = 0
    for item in items:
        _, mask = item.load()
        g = geometry_attributes(mask)
        ref = parse_ladder(item.prompts)
        agree_number += g["number"] == ref.number
        agree_size += g["size"] == ref.size
    assert agree_number == len(items) and agree_size >= len(items) - 1


# ---- metrics ------------------------------------------------------------------------------------

def test_metrics_on_hand_made_cases():
    a = np.zeros((20, 20), bool)
    a[5:10, 5:10] = True
    b = np.zeros((20, 20), bool)
    b[7:12, 5:10] = True  # shifted 2 rows: overlap 15 of 25 + 25
    s = score(b, a)
    assert s["dice"] == pytest.approx(0.6) and s["iou"] == pytest.approx(15 / 35)
    assert s["hd95"] == pytest.approx(2.0)
    assert score(b, a, spacing=(2.0, 1.0))["hd95"] == pytest.approx(4.0)  # rows are 2 mm
    assert score(a, a) == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "nsd": 1.0}
    empty = np.zeros_like(a)
    assert score(empty, empty)["dice"] == 1.0  # the paper's convention
    miss = score(empty, a)
    assert miss["dice"] == 0.0 and np.isnan(miss["hd95"]) and miss["nsd"] == 0.0
    vol = np.zeros((6, 10, 10), bool)
    vol[1:4, 2:6, 2:6] = True
    assert score(vol, vol, spacing=(3.0, 1.0, 1.0))["dice"] == 1.0


def test_evaluate_files_of_any_tool(tmp_path, capsys):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir(), gt.mkdir()
    a = np.zeros((1, 20, 20), np.uint8)
    a[0, 5:10, 5:10] = 1
    b = np.zeros_like(a)
    b[0, 7:12, 5:10] = 1
    for folder, arr in ((gt, a), (pred, b)):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((1.0, 2.0, 1.0))
        sitk.WriteImage(img, str(folder / "case1.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(a[0] * 255), str(gt / "case2.png"))
    sitk.WriteImage(sitk.GetImageFromArray(a[0] * 255), str(pred / "case2.png"))
    assert main(["evaluate", "--predictions", str(pred), "--ground-truth", str(gt), "-o", str(tmp_path / "r.csv")]) == 0
    rows = {r["case"]: r for r in csv.DictReader(open(tmp_path / "r.csv"))}
    assert set(rows) == {"case1", "case2"}
    assert float(rows["case1"]["dice"]) == pytest.approx(0.6)
    assert float(rows["case1"]["hd95"]) == pytest.approx(4.0)  # 2 rows of 2 mm
    assert float(rows["case2"]["dice"]) == 1.0
    assert (tmp_path / "r.md").read_text(encoding="utf-8").count("|") > 10 and (tmp_path / "r_boxplot.png").is_file()


def synthetic_dataset(folder: Path, count: int = 4):
    """The paper's format: images/, masks/, anns.json; a bright square on a dark background."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    entries = []
    for n in range(count):
        img = rng.integers(0, 60, (48, 64, 3)).astype(np.uint8)
        mask = np.zeros((48, 64), np.uint8)
        if n != count - 1:  # the last image has no target
            y, x = rng.integers(4, 30), rng.integers(4, 40)
            img[y : y + 12, x : x + 16] = (230, 120, 140)
            mask[y : y + 12, x : x + 16] = 255
        sitk.WriteImage(sitk.GetImageFromArray(img, isVector=True), str(folder / "images" / f"{n}.png"))
        sitk.WriteImage(sitk.GetImageFromArray(mask), str(folder / "masks" / f"{n}.png"))
        g = geometry_attributes(mask > 0)
        entries.append({"img_name": f"{n}.jpg" if n == 0 else f"{n}.png", "mask_name": f"{n}.png",
                        "prompts": ladder(Attributes("square", "square", "pink", g["size"], g["number"],
                                                     g["location"], ["a bright patch"]))})
    (folder / "anns.json").write_text(json.dumps(entries))
    return folder


def test_evaluate_a_model_end_to_end(tmp_path, tiny_model_dir, capsys):
    data = synthetic_dataset(tmp_path / "data")
    out = tmp_path / "eval" / "results.csv"
    out.parent.mkdir()
    code = main(["--quiet", "evaluate", "--model", str(tiny_model_dir), "--data", str(data / "anns.json"),
                 "--images", str(data / "images"), "--masks", str(data / "masks"), "--prompt-type", "p1", "p6",
                 "p9", "--robustness", "-o", str(out)])
    text = capsys.readouterr()
    assert code == 0, text.err
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 4 * 3 and {r["prompt_type"] for r in rows} == {"p1", "p6", "p9"}
    assert all(0.0 <= float(r["dice"]) <= 1.0 and 0.0 <= float(r["dice_model_res"]) <= 1.0 for r in rows)
    assert rows[0]["prompt"] == "square"
    report = out.with_suffix(".md").read_text(encoding="utf-8")
    assert "| p6 | 4 |" in report and "dice_gain_over_empty_prompt" in report and "empty_images: 1" in report
    wrong = {k: float(v) for k, v in re.findall(r"- (wrong_prompt_dice|wrong_prompt_empty_rate|right_wrong_mask_dice): "
                                                 r"([\d.]+)", report)}
    assert set(wrong) == {"wrong_prompt_dice", "wrong_prompt_empty_rate", "right_wrong_mask_dice"}, report
    assert all(0.0 <= v <= 1.0 for v in wrong.values())
    assert len(list(out.parent.glob("results_worst*.png"))) == 3
    # random weights: every output says so (the PNGs in their title, also as PNG text)
    assert "UNTRAINED WEIGHTS" in report and all(r["weights"] == "untrained" for r in rows)
    for png in [out.parent / "results_boxplot.png", *out.parent.glob("results_worst*.png")]:
        assert b"UNTRAINED WEIGHTS" in png.read_bytes(), png.name


def test_evaluate_bad_input(tmp_path, capsys):
    assert main(["evaluate", "-o", str(tmp_path / "r.csv")]) == 2
    assert main(["evaluate", "--predictions", str(tmp_path), "-o", str(tmp_path / "r.csv")]) == 2
    assert main(["evaluate", "--predictions", str(tmp_path), "--ground-truth", str(tmp_path), "-o",
                 str(tmp_path / "r.txt")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 3 and "Traceback" not in err
