"""BiomedCLIPSeg(-D): rebuilt BiomedCLIP towers + CLIPSeg decoder; weights mapped from open_clip's
format and checked against an independent forward of the original (timm ViT) mathematics."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import blobs

from medvlsm import io
from medvlsm.cli import main
from medvlsm.models.biomedclipseg import (BiomedCLIPSeg, SIZES, convert_clipseg_decoder,
                                          convert_open_clip_state_dict)
from medvlsm.volume import Volume


def open_clip_state_dict(size="tiny", seed=1):
    """Random tensors under BiomedCLIP's original open_clip key names and shapes."""
    s = SIZES[size]
    g = torch.Generator().manual_seed(seed)
    w, mlp, proj = s["width"], s["mlp"], s["projection"]

    def t(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    sd = {"visual.trunk.cls_token": t(1, 1, w), "visual.trunk.pos_embed": t(1, 197, w),
          "visual.trunk.patch_embed.proj.weight": t(w, 3, 16, 16), "visual.trunk.patch_embed.proj.bias": t(w),
          "visual.trunk.norm.weight": 1 + t(w), "visual.trunk.norm.bias": t(w), "visual.head.proj.weight": t(proj, w),
          "text.proj.0.weight": t((w + proj) // 2, w), "text.proj.2.weight": t(proj, (w + proj) // 2),
          "logit_scale": torch.tensor(4.6)}
    for i in range(s["layers"]):
        b = f"visual.trunk.blocks.{i}."
        sd.update({b + "norm1.weight": 1 + t(w), b + "norm1.bias": t(w), b + "attn.qkv.weight": t(3 * w, w),
                   b + "attn.qkv.bias": t(3 * w), b + "attn.proj.weight": t(w, w), b + "attn.proj.bias": t(w),
                   b + "norm2.weight": 1 + t(w), b + "norm2.bias": t(w), b + "mlp.fc1.weight": t(mlp, w),
                   b + "mlp.fc1.bias": t(mlp), b + "mlp.fc2.weight": t(w, mlp), b + "mlp.fc2.bias": t(w)})
    reference = BiomedCLIPSeg.random(size, seed=seed + 7)
    for key, value in reference.hf.text.state_dict().items():  # BERT keys are HF's own in open_clip
        sd["text.transformer." + key] = t(*value.shape) if value.is_floating_point() else value
    return sd


def timm_vit_blocks(sd, pixels, heads, upto):
    """The original tower, written from timm's definition: patchify, cls + pos, pre-norm blocks."""
    x = F.conv2d(pixels, sd["visual.trunk.patch_embed.proj.weight"], sd["visual.trunk.patch_embed.proj.bias"],
                 stride=16).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.trunk.cls_token"].expand(len(x), -1, -1), x], 1) + sd["visual.trunk.pos_embed"]
    outputs = []
    for i in range(upto + 1):
        b = f"visual.trunk.blocks.{i}."
        w = x.shape[-1]
        h = F.layer_norm(x, (w,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps=1e-6)
        q, k, v = F.linear(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]).chunk(3, -1)
        split = lambda z: z.reshape(len(z), -1, heads, w // heads).transpose(1, 2)  # noqa: E731
        att = torch.softmax(split(q) @ split(k).transpose(-1, -2) / (w // heads) ** 0.5, -1) @ split(v)
        x = x + F.linear(att.transpose(1, 2).reshape(len(x), -1, w), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = F.layer_norm(x, (w,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
                         sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        outputs.append(x)
    return outputs


def test_converted_weights_reproduce_the_original_towers():
    sd = open_clip_state_dict("tiny")
    model = BiomedCLIPSeg.random("tiny")
    converted = convert_open_clip_state_dict(sd, layers=SIZES["tiny"]["layers"])
    missing, unexpected = model.hf.load_state_dict(converted, strict=False)
    assert not unexpected and all(k.startswith("decoder.") for k in missing)
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        reference = timm_vit_blocks(sd, pixels, SIZES["tiny"]["heads"], max(model.extract_layers))
        features = model.encode_images(pixels)
        expected = [reduce(reference[i]) for i, reduce in zip(model.extract_layers[::-1], model.hf.decoder.reduces)]
        for ours, ref in zip(features, expected):
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
        # text: CLS of the BERT tower through open_clip's 2-layer MLP projection
        tokens = model.tokenize(["liver", "left kidney"])
        bert = model.hf.text(**tokens).last_hidden_state[:, 0]
        ref_text = F.linear(F.gelu(F.linear(bert, sd["text.proj.0.weight"])), sd["text.proj.2.weight"])
        torch.testing.assert_close(model.encode_text(["liver", "left kidney"]), ref_text)


@pytest.mark.models
def test_biomedclipseg_d_takes_the_pretrained_clipseg_decoder():
    """Full size: CIDAS CLIPSeg's decoder (768 -> 64 reduces, FiLM from 512) fits BiomedCLIPSeg exactly."""
    from medvlsm.models.clipseg import CLIPSeg

    clipseg = CLIPSeg.random("full", seed=3)
    decoder = convert_clipseg_decoder(clipseg.hf.state_dict())
    model = BiomedCLIPSeg.random("full")
    ours = {k: v for k, v in model.hf.state_dict().items() if k.startswith("decoder.")}
    assert set(decoder) == set(ours) and all(decoder[k].shape == ours[k].shape for k in ours)
    model.hf.load_state_dict(decoder, strict=False)
    features = tuple(torch.randn(1, 197, 64) for _ in range(3))
    text = torch.randn(1, 512)
    with torch.no_grad():
        ours, reference = model.decode_paired(features, text), clipseg.decode_paired(features, text)
    # same weights; attention kernels may differ (eager vs SDPA): ~1e-6 of the logits' range
    assert float((ours - reference).abs().max() / reference.abs().max()) < 1e-5
    del clipseg, model


def test_init_segment_and_finetune_the_decoder_only(tmp_path, capsys):
    folder = tmp_path / "bcs"
    assert main(["init", "--arch", "biomedclipseg", "--size", "tiny", "--output", str(folder)]) == 0
    v = Volume(blobs((3, 40, 48)), (0.8, 0.8, 2.5))
    import SimpleITK as sitk

    sitk.WriteImage(io.volume_to_sitk(v), str(tmp_path / "ct.nrrd"))
    assert main(["--quiet", "segment", str(tmp_path / "ct.nrrd"), "-p", "liver", "--model", str(folder), "-o",
                 str(tmp_path / "out.seg.nrrd")]) == 0
    assert io.read_seg_nrrd(tmp_path / "out.seg.nrrd").masks.shape == (1,) + v.shape
    # the paper trains BiomedCLIPSeg's decoder only
    from medvlsm import training
    from medvlsm.models import load_model

    model = load_model(folder)
    before = {k: p.clone() for k, p in model.hf.named_parameters()}
    mask = np.zeros((40, 48), bool)
    mask[10:20, 10:30] = True
    samples = [training.prepare(Volume(v.array[:1]), mask, {"p1": "liver"}, model.spec) for _ in range(4)]
    training.finetune(model, samples, samples, tmp_path / "ft", training.TrainConfig(
        epochs=1, batch_size=2, freeze="encoders", precision="fp32", device="cpu"))
    changed = {k for k, p in model.hf.named_parameters() if not torch.equal(p.detach().cpu(), before[k])}
    assert changed and all(k.startswith("decoder.") for k in changed)


@pytest.mark.models
def test_convert_command_from_original_files(tmp_path, capsys):
    """Original-format files in, our folder out, loaded and run: towers equal the reference forward."""
    from medvlsm.models import load_model
    from medvlsm.models.clipseg import CLIPSeg

    sd = open_clip_state_dict("full")
    torch.save(sd, tmp_path / "open_clip_pytorch_model.bin")
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["liver", "kidney", "left"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in CLIPSeg.random("full", seed=2).hf.state_dict().items()},
              str(tmp_path / "clipseg.safetensors"))
    assert main(["convert", "--arch", "biomedclipseg-d", "--from", str(tmp_path / "open_clip_pytorch_model.bin"),
                 str(tmp_path / "vocab.txt"), str(tmp_path / "clipseg.safetensors"), "-o", str(tmp_path / "d")]) == 0
    model = load_model(tmp_path / "d")
    assert model.spec.arch == "biomedclipseg" and model.spec.trained and model.spec.input_size == 224
    assert model.tokenize(["left kidney"])["input_ids"][0].tolist() == [101, 132, 131, 102]  # PubMedBERT-style ids
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        reference = timm_vit_blocks(sd, pixels, 12, 10)
        features = model.encode_images(pixels)
        expected = [reduce(reference[i]) for i, reduce in zip((10, 7, 4), model.hf.decoder.reduces)]
    for ours, ref in zip(features, expected):  # 11 fp32 blocks in another operation order: 1e-5 of the range
        assert float((ours - ref).abs().max() / ref.abs().max()) < 1e-5
    assert main(["convert", "--arch", "biomedclipseg", "--from", str(tmp_path / "vocab.txt"), "-o",
                 str(tmp_path / "x")]) == 2
