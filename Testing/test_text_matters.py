"""Text that matters: negative prompts in finetuning, and the image-only UNet baseline beside the VLSMs."""

import json
import random

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import blobs
from synthetic import two_object_images, write_split

from medvlsm import io, training
from medvlsm.cli import main
from medvlsm.datasets import read_annotations
from medvlsm.negatives import NegativePrompts, empty_cells
from medvlsm.volume import Volume


def two_object_samples(tmp_path, tiny_model, count=3):
    data = tmp_path / "data"
    write_split(tmp_path, "set", two_object_images(data, count))
    items = read_annotations(tmp_path / "set.json", data / "images", data / "masks")
    return training.samples_from_annotations(items, tiny_model.spec)


def test_a_negative_never_names_what_the_image_holds(tmp_path, tiny_model):
    """Two objects per image: the circle's negatives are never the square (annotated on the same image),
    and a moved location names only grid cells without a pixel of the circle."""
    samples = two_object_samples(tmp_path, tiny_model)
    negatives = NegativePrompts.for_samples(samples, 1.0)
    circle = next(s for s in samples if s.prompts["p1"] == "circle")
    assert circle.present == ("square",) and circle.absent == ()
    assert "square" in negatives.names and "liver" in negatives.names and "tumor" not in negatives.names
    rng = random.Random(0)
    picked = [negatives.pick(circle, circle.prompts["p6"], rng) for _ in range(400)]
    assert not [p for p in picked if "square" in p]
    moved = [p for p in picked if p.startswith(circle.prompts["p5"] + ", located in ")]
    assert moved and {p.split("located in ")[1][: -len(" of the image")] for p in moved} <= set(circle.empty_cells)
    kept_form = circle.prompts["p6"].replace("circle", "liver")  # the class word replaced, the rest kept
    assert "liver" in picked and kept_form in picked


def test_empty_cells_are_the_grid_cells_without_a_pixel():
    mask = np.zeros((90, 90), bool)
    mask[70:85, 5:20] = True  # bottom left only
    assert set(empty_cells(mask)) == {"top left", "top", "top right", "left", "center", "right", "bottom",
                                      "bottom right"}


def test_a_slice_of_a_case_names_the_segments_absent_from_it(tmp_path, tiny_model):
    """Volumes: the other segments of the case absent on a slice are its reviewed negatives."""
    volumes, segs = tmp_path / "volumes", tmp_path / "segs"
    volumes.mkdir(), segs.mkdir()
    v = Volume(blobs((8, 32, 32)), (1.0, 1.0, 3.0))
    sitk.WriteImage(io.volume_to_sitk(v), str(volumes / "case.nrrd"))
    liver, spleen = np.zeros(v.shape, bool), np.zeros(v.shape, bool)
    liver[1:5, 4:14, 4:14] = True
    spleen[3:7, 18:28, 18:28] = True
    io.write_seg_nrrd(v, np.stack([liver, spleen]), ["liver", "spleen"], segs / "case.seg.nrrd")
    from medvlsm.datasets import read_volume_folder

    samples = training.samples_from_volumes(read_volume_folder(volumes, segs), tiny_model.spec,
                                            training.Slicing(empty_fraction=0))
    by_name = {s.name: s for s in samples}
    assert by_name["case:liver:axial:1"].absent == ("spleen",) and by_name["case:liver:axial:3"].present == ("spleen",)
    assert by_name["case:spleen:axial:6"].absent == ("liver",)
    rng = random.Random(0)
    negatives = NegativePrompts.for_samples(samples, 1.0)
    picked = {negatives.pick(by_name["case:liver:axial:1"], "liver", rng) for _ in range(200)}
    assert "spleen" in picked and "liver" not in picked


def test_batches_carry_negatives_with_empty_targets(tmp_path, tiny_model):
    samples = two_object_samples(tmp_path, tiny_model)
    config = training.TrainConfig(batch_size=6, prompt_types=["p1"])
    with_negatives = training._Feed(config, torch.device("cpu"), NegativePrompts.for_samples(samples, 1.0))
    batch = next(training._batches(samples, list(range(6)), random.Random(0), with_negatives))
    assert len(batch.rows) == len(batch.prompts) == batch.masks.shape[0] == 12 and batch.positives == 6
    assert batch.rows[6:] == batch.rows[:6]  # every image twice at ratio 1, the second time with a wrong prompt
    assert batch.masks[:6].flatten(1).any(1).all() and not batch.masks[6:].any()
    assert all(samples[r].prompts["p1"] not in wrong for r, wrong in zip(batch.rows[6:], batch.prompts[6:]))
    without = with_negatives._replace(negatives=None)
    assert len(next(training._batches(samples, list(range(6)), random.Random(0), without)).rows) == 6


def test_the_negative_ratio_is_an_option_recorded_in_the_card(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "data"
    write_split(tmp_path, "set", two_object_images(data, 3))
    common = ["--train", str(tmp_path / "set.json"), "--val", str(tmp_path / "set.json"), "--images",
              str(data / "images"), "--masks", str(data / "masks"), "--model", str(tiny_model_dir), "--epochs", "1",
              "--batch-size", "2"]
    assert main(["--quiet", "finetune", *common, "--output", str(tmp_path / "ft"), "--negative-ratio", "0.5"]) == 0
    card = (tmp_path / "ft" / "README.md").read_text(encoding="utf-8")
    assert "| negative prompts per image | 0.5 (wrong prompts trained to an empty mask) |" in card
    assert '"negative_ratio": 0.5' in card
    with pytest.raises(SystemExit) as refused:
        main(["finetune", *common, "--output", str(tmp_path / "x"), "--negative-ratio", "-1"])
    assert refused.value.code == 2
    assert "not a ratio from 0 to 4" in capsys.readouterr().err


# ---- the image-only baseline ------------------------------------------------------------------

def test_unet_from_finetune_arch_to_segment_says_the_prompt_is_ignored(tmp_path, capsys):
    """``finetune --arch unet`` trains MONAI's BasicUNet by the same loaders; its folder has no tokenizer,
    loads by path, and every run says the text is ignored (and gives the same mask for any prompt)."""
    data = tmp_path / "data"
    write_split(tmp_path, "set", two_object_images(data, 4, size=64))
    code = main(["--quiet", "finetune", "--arch", "unet", "--size", "tiny", "--train", str(tmp_path / "set.json"),
                 "--val", str(tmp_path / "set.json"), "--images", str(data / "images"), "--masks",
                 str(data / "masks"), "--output", str(tmp_path / "unet"), "--epochs", "1", "--batch-size", "4"])
    assert code == 0, capsys.readouterr().err
    folder = tmp_path / "unet"
    assert not (folder / "tokenizer.json").exists()
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert "| negative prompts per image | 0 |" in card  # a wrong prompt would teach it to erase the image
    spec = json.loads((folder / "medvlsm.json").read_text(encoding="utf-8"))
    assert spec["arch"] == "unet" and spec["trained"]
    capsys.readouterr()
    assert main(["segment", str(data / "images" / "0.png"), "-p", "red circle", "-p", "liver", "--model",
                 str(folder), "-o", str(tmp_path / "out.seg.nrrd")]) == 0
    err = capsys.readouterr().err
    assert "IMAGE-ONLY (the prompt is ignored)" in err and "ignores the prompt" in err
    seg = io.read_seg_nrrd(tmp_path / "out.seg.nrrd")
    assert np.array_equal(seg.masks[0], seg.masks[1])
    assert main(["finetune", "--arch", "unet", "--model", str(folder), "--train", "x", "-o", str(tmp_path / "y")]) == 2
    assert "--model and --arch" in capsys.readouterr().err


def test_freezing_an_image_only_model_is_refused(tmp_path, capsys):
    data = tmp_path / "data"
    write_split(tmp_path, "set", two_object_images(data, 2, size=64))
    assert main(["finetune", "--arch", "unet", "--size", "tiny", "--freeze", "encoders", "--train",
                 str(tmp_path / "set.json"), "--val", str(tmp_path / "set.json"), "--images", str(data / "images"),
                 "--masks", str(data / "masks"), "--output", str(tmp_path / "u"), "--epochs", "1"]) == 2
    assert "has no pretrained encoders to freeze" in capsys.readouterr().err
    assert main(["finetune", "--arch", "unet", "--size", "tiny", "--adapt", "--train",
                 str(tmp_path / "set.json"), "--val", str(tmp_path / "set.json"), "--images", str(data / "images"),
                 "--masks", str(data / "masks"), "--output", str(tmp_path / "a"), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "nothing to adapt" in err and "Train it without --adapt" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("size", ["tiny", "small", "full"])
def test_unet_sizes_build(size):
    from medvlsm.models import ARCHITECTURES

    model = ARCHITECTURES["unet"].random(size)
    logits = model(torch.zeros(2, 3, 64, 64), *model.tokenize(["a", "b"]).values())
    assert logits.shape == (2, 64, 64) and not model.spec.trained


# ---- adapt: the decoder only, on features encoded once ---------------------------------------------

def test_adapt_encodes_each_image_once_and_trains_the_decoder_only(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """``finetune --adapt``: every training and validation image goes through the image encoder once,
    not once per epoch; the saved model's encoders are the starting model's, its decoder is not."""
    from safetensors.torch import load_file

    from medvlsm.models.clipseg import CLIPSeg

    data = tmp_path / "data"
    entries = two_object_images(data, 5, size=64)
    write_split(tmp_path, "train", entries[:8])
    write_split(tmp_path, "val", entries[8:])
    encoded = []
    real = CLIPSeg.encode_images
    monkeypatch.setattr(CLIPSeg, "encode_images", lambda self, px: encoded.append(len(px)) or real(self, px))
    code = main(["--quiet", "finetune", "--adapt", "--train", str(tmp_path / "train.json"), "--val",
                 str(tmp_path / "val.json"), "--images", str(data / "images"), "--masks", str(data / "masks"),
                 "--model", str(tiny_model_dir), "--output", str(tmp_path / "adapted"), "--epochs", "3",
                 "--batch-size", "4"])
    assert code == 0, capsys.readouterr().err
    assert sum(encoded) == 8 + 2  # 8 training and 2 validation entries (two objects per image), once each
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(tmp_path / "adapted" / "model.safetensors")
    encoders = [k for k in before if k.startswith(("clip.vision_model", "clip.text_model"))]
    decoder = [k for k in before if k.startswith("decoder.") and not k.startswith("decoder.reduces")]
    assert encoders and decoder
    assert all(torch.equal(before[k], after[k]) for k in encoders)
    assert any(not torch.equal(before[k], after[k]) for k in decoder)
    assert "| frozen | encoders |" in (tmp_path / "adapted" / "README.md").read_text(encoding="utf-8")
