"""CRIS: CLIP ResNet-50 + CLIP text + FPN + transformer decoder + projector, written in plain torch.

Weights come in two original formats (a CRIS checkpoint; OpenAI's CLIP RN50 state dict). Each test
builds one with the original key names and random tensors, converts it with ``medvlsm convert``,
loads the folder and compares with ``reference_cris``: an independent functional forward written
from the CRIS / CLIP source (sequence-first tensors, ``F.multi_head_attention_forward``, CRIS's own
positional-encoding fill) that reads the tensors by their original names.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from medvlsm.cli import main
from medvlsm.errors import ModelError
from medvlsm.models import load_model
from medvlsm.models.cris import CRIS, convert

pytestmark = pytest.mark.models


def original_cris_state_dict(size="tiny", seed=1):
    """A CRIS checkpoint: CRIS's own key names (``backbone.*`` is OpenAI's CLIP), random tensors with
    BatchNorm statistics away from identity so every normalisation matters."""
    g = torch.Generator().manual_seed(seed)
    ours = CRIS.random(size, seed=seed).hf.state_dict()
    original = {"backbone.logit_scale": torch.tensor(math.log(1 / 0.07))}
    for key, value in ours.items():
        key = key.replace("backbone.text.", "backbone.")
        if not value.is_floating_point():
            original[key] = value.clone()
        elif key.endswith("positional_embedding"):  # as large as the features, so its resizing matters
            original[key] = torch.randn(value.shape, generator=g)
        elif key.endswith("running_var"):
            original[key] = 0.5 + torch.rand(value.shape, generator=g)
        elif key.endswith(("running_mean", ".bias")) or "bn" in key or key.split(".")[-2].isdigit() and value.ndim == 1:
            original[key] = value + 0.2 * torch.randn(value.shape, generator=g)
        else:
            original[key] = value + 0.02 * torch.randn(value.shape, generator=g)
    return original


def clip_state_dict(cris_state):
    """OpenAI CLIP's RN50 layout: the same encoder tensors without ``backbone.``, plus its metadata."""
    sd = {k[len("backbone."):]: v for k, v in cris_state.items() if k.startswith("backbone.")
          and ".attnpool.connect." not in k}  # the residual 1x1 is CRIS's addition
    sd.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    return sd


# ---- the reference: CRIS's code path, functional ------------------------------------------------

def bn(sd, p, x):
    weight, bias = sd[p + ".weight"], sd[p + ".bias"]
    return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], weight, bias, False, 0.0, 1e-5)


def conv_bn_relu(sd, p, x, padding=0):
    return F.relu(bn(sd, p + ".1", F.conv2d(x, sd[p + ".0.weight"], padding=padding)))


def mha(sd, p, q, k, v, heads, attn_mask=None, key_padding_mask=None, separate=False):
    """Sequence-first attention, as nn.MultiheadAttention / CLIP's attention pool call it."""
    if separate:
        return F.multi_head_attention_forward(
            q, k, v, q.shape[-1], heads, None, torch.cat([sd[p + ".q_proj.bias"], sd[p + ".k_proj.bias"],
                                                          sd[p + ".v_proj.bias"]]),
            None, None, False, 0.0, sd[p + ".c_proj.weight"], sd[p + ".c_proj.bias"], training=False,
            need_weights=False, use_separate_proj_weight=True, q_proj_weight=sd[p + ".q_proj.weight"],
            k_proj_weight=sd[p + ".k_proj.weight"], v_proj_weight=sd[p + ".v_proj.weight"])[0]
    return F.multi_head_attention_forward(
        q, k, v, q.shape[-1], heads, sd[p + ".in_proj_weight"], sd[p + ".in_proj_bias"], None, None, False, 0.0,
        sd[p + ".out_proj.weight"], sd[p + ".out_proj.bias"], training=False, key_padding_mask=key_padding_mask,
        need_weights=False, attn_mask=attn_mask)[0]


def reference_resnet(sd, x):
    v = "backbone.visual."
    for i in (1, 2, 3):
        x = F.relu(bn(sd, f"{v}bn{i}", F.conv2d(x, sd[f"{v}conv{i}.weight"], stride=2 if i == 1 else 1, padding=1)))
    x = F.avg_pool2d(x, 2)
    outs = []
    for stage in (1, 2, 3, 4):
        blocks = sorted({int(k.split(".")[3]) for k in sd if k.startswith(f"{v}layer{stage}.")})
        for b in blocks:
            p = f"{v}layer{stage}.{b}."
            stride = 2 if stage > 1 and b == 0 else 1
            out = F.relu(bn(sd, p + "bn1", F.conv2d(x, sd[p + "conv1.weight"])))
            out = F.relu(bn(sd, p + "bn2", F.conv2d(out, sd[p + "conv2.weight"], padding=1)))
            out = bn(sd, p + "bn3", F.conv2d(F.avg_pool2d(out, stride) if stride > 1 else out, sd[p + "conv3.weight"]))
            if p + "downsample.0.weight" in sd:
                x = bn(sd, p + "downsample.1", F.conv2d(F.avg_pool2d(x, stride) if stride > 1 else x,
                                                        sd[p + "downsample.0.weight"]))
            x = F.relu(out + x)
        outs.append(x)
    # CRIS's attention pool: spatial, positional embedding resized bicubically, plus the 1x1 residual
    p = v + "attnpool"
    b, c, h, w = x.shape
    residual = bn(sd, p + ".connect.1", F.conv2d(x, sd[p + ".connect.0.weight"]))
    pos = sd[p + ".positional_embedding"][None]
    side = round((pos.shape[1] - 1) ** 0.5)
    pos = pos[:, -side * side:].reshape(1, side, side, c).permute(0, 3, 1, 2)
    pos = F.interpolate(pos, size=(h, w), align_corners=False, mode="bicubic").flatten(2)
    tokens = (x.reshape(b, c, -1) + pos).permute(2, 0, 1)
    pooled = mha(sd, p, tokens, tokens, tokens, c // 64, separate=True).permute(1, 2, 0).reshape(b, -1, h, w)
    return outs[1], outs[2], F.relu(pooled + residual)


def reference_text(sd, ids):
    x = sd["backbone.token_embedding.weight"][ids] + sd["backbone.positional_embedding"][: ids.shape[1]]
    x = x.permute(1, 0, 2)
    width = x.shape[-1]
    mask = torch.empty(ids.shape[1], ids.shape[1]).fill_(float("-inf")).triu_(1)
    layers = sorted({int(k.split(".")[3]) for k in sd if k.startswith("backbone.transformer.resblocks.")})
    for i in layers:
        p = f"backbone.transformer.resblocks.{i}."
        ln = lambda z, n: F.layer_norm(z, (width,), sd[p + n + ".weight"], sd[p + n + ".bias"])  # noqa: E731
        y = ln(x, "ln_1")
        x = x + mha(sd, p + "attn", y, y, y, max(1, width // 64), attn_mask=mask)
        h = F.linear(ln(x, "ln_2"), sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])
        x = x + F.linear(h * torch.sigmoid(1.702 * h), sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
    x = F.layer_norm(x.permute(1, 0, 2), (width,), sd["backbone.ln_final.weight"], sd["backbone.ln_final.bias"])
    return x, x[torch.arange(len(ids)), ids.argmax(-1)] @ sd["backbone.text_projection"]


def pos2d(d_model, height, width):  # CRIS's TransformerDecoder.pos2d, verbatim in substance
    pe = torch.zeros(d_model, height, width)
    d_model = int(d_model / 2)
    div_term = torch.exp(torch.arange(0.0, d_model, 2) * -(math.log(10000.0) / d_model))
    pos_w = torch.arange(0.0, width).unsqueeze(1)
    pos_h = torch.arange(0.0, height).unsqueeze(1)
    pe[0:d_model:2, :, :] = torch.sin(pos_w * div_term).transpose(0, 1).unsqueeze(1).repeat(1, height, 1)
    pe[1:d_model:2, :, :] = torch.cos(pos_w * div_term).transpose(0, 1).unsqueeze(1).repeat(1, height, 1)
    pe[d_model::2, :, :] = torch.sin(pos_h * div_term).transpose(0, 1).unsqueeze(2).repeat(1, 1, width)
    pe[d_model + 1::2, :, :] = torch.cos(pos_h * div_term).transpose(0, 1).unsqueeze(2).repeat(1, 1, width)
    return pe.reshape(-1, 1, height * width).permute(2, 1, 0)


def pos1d(d_model, length):
    pe = torch.zeros(length, d_model)
    position = torch.arange(0, length).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float) * -(math.log(10000.0) / d_model))
    pe[:, 0::2] = torch.sin(position.float() * div_term)
    pe[:, 1::2] = torch.cos(position.float() * div_term)
    return pe.unsqueeze(1)


def reference_cris(sd, pixels, ids, heads=8):
    """CRIS.forward of the paper's code: logits ``[B, 1, S, S]`` for image i with prompt i."""
    pad_mask = ids == 0
    v3, v4, v5 = reference_resnet(sd, pixels)
    words, state = reference_text(sd, ids)
    # FPN
    s = F.relu(F.batch_norm(F.linear(state, sd["neck.txt_proj.0.weight"]), sd["neck.txt_proj.1.running_mean"],
                            sd["neck.txt_proj.1.running_var"], sd["neck.txt_proj.1.weight"], sd["neck.txt_proj.1.bias"],
                            False, 0.0, 1e-5))[..., None, None]
    f5 = F.relu(bn(sd, "neck.norm_layer.0", conv_bn_relu(sd, "neck.f1_v_proj", v5) * s))
    f4 = conv_bn_relu(sd, "neck.f2_v_proj", v4, 1)
    f4 = conv_bn_relu(sd, "neck.f2_cat", torch.cat([f4, F.interpolate(f5, scale_factor=2, mode="bilinear")], 1))
    f3 = F.avg_pool2d(conv_bn_relu(sd, "neck.f3_v_proj", v3, 1), 2, 2)
    f3 = conv_bn_relu(sd, "neck.f3_cat", torch.cat([f3, f4], 1))
    fq5 = F.interpolate(conv_bn_relu(sd, "neck.f4_proj5", f5, 1), scale_factor=2, mode="bilinear")
    fq = torch.cat([conv_bn_relu(sd, "neck.f4_proj3", f3, 1), conv_bn_relu(sd, "neck.f4_proj4", f4, 1), fq5], 1)
    fq = conv_bn_relu(sd, "neck.aggr", fq)
    b, _, h, w = fq.shape
    y, x = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    fq = torch.cat([fq, x.expand(b, 1, -1, -1), y.expand(b, 1, -1, -1)], 1)
    fq = conv_bn_relu(sd, "neck.coordconv.1", conv_bn_relu(sd, "neck.coordconv.0.conv1", fq, 1), 1)
    # decoder
    b, c, h, w = fq.shape
    vis_pos, txt_pos = pos2d(c, h, w), pos1d(words.shape[-1], words.shape[1])
    vis, txt = fq.reshape(b, c, -1).permute(2, 0, 1), words.permute(1, 0, 2)
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("decoder.layers.")})
    for i in layers:
        p = f"decoder.layers.{i}."
        ln = lambda z, n, d=c: F.layer_norm(z, (d,), sd[p + n + ".weight"], sd[p + n + ".bias"])  # noqa: E731
        v2 = ln(vis, "norm1")
        vis = vis + ln(mha(sd, p + "self_attn", v2 + vis_pos, v2 + vis_pos, v2, heads), "self_attn_norm")
        v2 = mha(sd, p + "multihead_attn", ln(vis, "norm2") + vis_pos, txt + txt_pos, txt, heads,
                 key_padding_mask=pad_mask)
        vis = vis + ln(v2, "cross_attn_norm")
        hidden = F.relu(F.linear(ln(vis, "norm3"), sd[p + "ffn.0.weight"], sd[p + "ffn.0.bias"]))
        hidden = F.layer_norm(hidden, (hidden.shape[-1],), sd[p + "ffn.3.weight"], sd[p + "ffn.3.bias"])
        vis = vis + F.linear(hidden, sd[p + "ffn.4.weight"], sd[p + "ffn.4.bias"])
    fq = F.layer_norm(vis, (c,), sd["decoder.norm.weight"], sd["decoder.norm.bias"]).permute(1, 2, 0).reshape(b, c, h, w)
    # projector
    x = conv_bn_relu(sd, "proj.vis.1", F.interpolate(fq, scale_factor=2, mode="bilinear"), 1)
    x = conv_bn_relu(sd, "proj.vis.3", F.interpolate(x, scale_factor=2, mode="bilinear"), 1)
    x = F.conv2d(x, sd["proj.vis.4.weight"], sd["proj.vis.4.bias"])
    b, c, h, w = x.shape
    word = F.linear(state, sd["proj.txt.weight"], sd["proj.txt.bias"])
    weight, bias = word[:, :-1].reshape(b, c, 3, 3), word[:, -1]
    pred = F.conv2d(x.reshape(1, b * c, h, w), weight, padding=1, groups=b, bias=bias).transpose(0, 1)
    return F.interpolate(pred, pixels.shape[-2:], mode="bicubic", align_corners=True)


def _inputs(model, prompts, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(len(prompts), 3, 416, 416, generator=g)
    return pixels, model.tokenize(prompts)["input_ids"]


def _ours(model, pixels, ids):
    with torch.no_grad():
        return model.decode_paired(model.encode_images(pixels), model.encode_tokens(ids, ids != 0))


@pytest.mark.parametrize("size", ["tiny", "full"])
def test_converted_cris_checkpoint_reproduces_the_reference_forward(tmp_path, size):
    original = original_cris_state_dict(size)
    torch.save({"state_dict": {"module." + k: v for k, v in original.items()}}, tmp_path / "cris_best.pth")  # DDP
    assert main(["--quiet", "convert", "--arch", "cris", "--from", str(tmp_path / "cris_best.pth"), "-o",
                 str(tmp_path / "cris")]) == 0
    model = load_model(tmp_path / "cris")
    assert model.spec.trained and model.spec.input_size == 416 and model.spec.threshold == 0.35
    pixels, ids = _inputs(model, ["liver", "one small pink round polyp in the center"])
    assert (ids[0, 3:] == 0).all() and ids.shape[1] == 77  # zero-padded to CLIP's 77 positions: the pad mask
    with torch.no_grad():
        expected = reference_cris(original, pixels, ids)[:, 0]
    ours = _ours(model, pixels, ids)
    assert ours.shape == expected.shape == (2, 416, 416)
    scale = expected.abs().max()
    assert scale > 0.1 and (ours - expected).abs().max() < 1e-4 * scale
    # the engine's split: cached features + text once, several prompts == the paired forward
    with torch.no_grad():
        both = model.decode(model.encode_images(pixels[:1]), model.encode_text(["liver", "one small pink round polyp "
                                                                                       "in the center"]))[0]
    torch.testing.assert_close(both[0], ours[0], rtol=0, atol=1e-4 * float(scale))
    # bf16 autocast (the engine's CPU/GPU fast path) stays close to fp32
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast = model.decode_paired(model.encode_images(pixels), model.encode_tokens(ids, ids != 0)).float()
    assert (fast - expected).abs().mean() < 0.02 * scale


def test_clip_rn50_weights_alone_give_pretrained_encoders_and_a_random_decoder(tmp_path, capsys):
    original = original_cris_state_dict("tiny", seed=4)
    save_file(clip_state_dict(original), str(tmp_path / "RN50.safetensors"))
    assert main(["convert", "--arch", "cris", "--from", str(tmp_path / "RN50.safetensors"), "-o",
                 str(tmp_path / "cris")]) == 0
    assert "finetune it before use" in capsys.readouterr().out
    model = load_model(tmp_path / "cris")
    assert not model.spec.trained
    pixels, ids = _inputs(model, ["left kidney"])
    with torch.no_grad():
        ref_c3, ref_c4, _ = reference_resnet(original, pixels)
        c3, c4, _ = model.hf.backbone.visual(pixels)
        ref_words, ref_state = reference_text(original, ids)
        words, state = model.hf.backbone.text(ids)
    for ours, ref in ((c3, ref_c3), (c4, ref_c4), (words, ref_words), (state, ref_state)):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    # a CRIS checkpoint given as well wins where both have a tensor: the complete model
    torch.save(original, tmp_path / "cris.pth")
    model = convert([tmp_path / "RN50.safetensors", tmp_path / "cris.pth"], tmp_path / "both")
    assert model.spec.trained
    torch.testing.assert_close(_ours(model, pixels, ids), reference_cris(original, pixels, ids)[:, 0],
                               rtol=0, atol=1e-3)


def test_unreadable_or_foreign_weights_say_what_to_pass(tmp_path):
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    scripted.save(str(tmp_path / "RN50.pt"))  # OpenAI ships RN50 as TorchScript
    with pytest.raises(ModelError) as err:
        convert([tmp_path / "RN50.pt"], tmp_path / "out")
    assert "TorchScript" in err.value.problem and "timm/resnet50_clip.openai" in err.value.fix
    save_file({"visual.trunk.cls_token": torch.zeros(1, 1, 8)}, str(tmp_path / "biomedclip.safetensors"))
    with pytest.raises(ModelError, match="neither a CRIS checkpoint"):
        convert([tmp_path / "biomedclip.safetensors"], tmp_path / "out")
    broken = {k: v for k, v in original_cris_state_dict("tiny").items() if "layer3" not in k}
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ModelError, match="missing"):
        convert([tmp_path / "broken.safetensors"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert main(["init", "--arch", "cris", "--size", "tiny", "--input-size", "400", "-o", str(tmp_path / "odd")]) == 2
    assert not (tmp_path / "odd").exists()  # the FPN merges 1/8, 1/16, 1/32: the side must divide by 32


def test_finetuning_with_frozen_encoders_keeps_their_batchnorm_statistics(tmp_path):
    from medvlsm import training

    model = CRIS.random("tiny")
    before = {k: v.clone() for k, v in model.hf.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    samples = [training.Sample(pixels=torch.randn(3, 416, 416, generator=g).half(),
                               mask=torch.rand(416, 416, generator=g) > 0.7, prompts={"p1": "polyp"}) for _ in range(3)]
    config = training.TrainConfig(epochs=1, batch_size=2, lr=1e-3, freeze="encoders", precision="fp32", patience=5,
                                  device="cpu")
    training.finetune(model, samples, samples[:2], tmp_path / "ft", config)
    after = model.hf.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any(k.startswith("backbone.") for k in changed)  # weights and running statistics untouched
    assert any(k.startswith("neck.") and k.endswith("running_mean") for k in changed)  # the trained part's BN did learn
    assert any(k.startswith("proj.") and k.endswith("weight") for k in changed)


def test_clipseg_converts_from_a_cidas_snapshot(tmp_path):
    """`convert --arch clipseg`: a hub snapshot (transformers' own folder, pickled weights) -> our folder
    with safetensors and the registry's settings; same logits as transformers' forward."""
    from transformers import CLIPSegForImageSegmentation

    from medvlsm.models.clipseg import clipseg_config
    from medvlsm.models.tokenizer import clip_tokenizer

    torch.manual_seed(0)
    hf = CLIPSegForImageSegmentation(clipseg_config("tiny")).eval()
    snapshot = tmp_path / "clipseg-rd64-refined"
    hf.save_pretrained(str(snapshot), safe_serialization=False)  # older CIDAS repos ship pytorch_model.bin
    clip_tokenizer().save_pretrained(str(snapshot))
    for source in ([snapshot], sorted(snapshot.iterdir())):  # the folder, or its files
        out = tmp_path / f"ours{len(source)}"
        assert main(["--quiet", "convert", "--arch", "clipseg", "--from", *map(str, source), "-o", str(out)]) == 0
        assert (out / "model.safetensors").is_file() and (out / "medvlsm.json").is_file()
        model = load_model(out)
        assert model.spec.input_size == 352 and model.spec.trained
        tokens = model.tokenize(["liver"])
        pixels = torch.randn(1, 3, 352, 352)
        with torch.no_grad():
            expected = hf(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                          pixel_values=pixels).logits
            ours = model.decode(model.encode_images(pixels), model.encode_text(["liver"]))[0, 0]
        torch.testing.assert_close(ours, expected.reshape(ours.shape), rtol=0, atol=1e-4 * float(expected.abs().max()))
    with pytest.raises(ModelError):
        convert([tmp_path / "ours1" / "medvlsm.json"], tmp_path / "x")  # not weights at all
