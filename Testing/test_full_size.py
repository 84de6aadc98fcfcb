"""The full-size CLIPSeg architecture (150.7 M parameters, random weights from its config: no hub)
end to end: `medvlsm init` -> folder -> `medvlsm segment` -> files on the input grid."""

import pytest
import SimpleITK as sitk
import torch
from conftest import blobs

from medvlsm import io
from medvlsm.cli import main
from medvlsm.volume import Volume

pytestmark = pytest.mark.models


@pytest.fixture(scope="module")
def full_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("full") / "clipseg-full"
    assert main(["init", "--size", "full", "--output", str(folder)]) == 0
    return folder


def test_full_size_matches_the_published_architecture(full_model_dir):
    from medvlsm.models import load_model

    model = load_model(full_model_dir)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / 1e6 - 150.75) < 0.05
    assert model.hf.config.extract_layers == [3, 6, 9] and model.spec.input_size == 352
    ids = model.tokenize(["a photo of a cat"])["input_ids"][0].tolist()
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # OpenAI's CLIP BPE, exactly
    x = torch.randn(1, 3, 352, 352)
    with torch.no_grad():
        ours = model.decode(model.encode_images(x), model.encode_text(["liver"]))[:, 0]
        tokens = model.tokenize(["liver"])
        ref = model.hf(pixel_values=x, **tokens).logits
    assert float((ours - ref).abs().max() / ref.abs().max()) < 1e-5


def test_full_size_segment_end_to_end(tmp_path, full_model_dir, capsys):
    v = Volume(blobs((2, 64, 80)), (0.7, 0.7, 5.0), (1, 2, 3))
    sitk.WriteImage(io.volume_to_sitk(v), str(tmp_path / "ct.nrrd"))
    code = main(["--quiet", "segment", str(tmp_path / "ct.nrrd"), "-p", "liver", "-p", "tumour", "--model",
                 str(full_model_dir), "-o", str(tmp_path / "out.seg.nrrd"), "--precision", "bf16"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "bfloat16" in out
    seg = io.read_seg_nrrd(tmp_path / "out.seg.nrrd")
    assert seg.masks.shape == (2,) + v.shape and seg.grid.same_grid(v)
