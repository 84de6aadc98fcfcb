"""CRIS (Wang et al., CVPR 2022): CLIP-driven referring image segmentation, as the paper uses it.

OpenAI CLIP's modified ResNet-50 (three-conv stem, anti-aliased strides, attention pooling that CRIS
keeps spatial and adds a 1x1 residual to) and CLIP's text transformer; a text-conditioned FPN neck;
a 3-layer transformer decoder (visual self-attention, cross-attention to the words); a projector
that turns the sentence embedding into a per-image 3x3 convolution over 104x104 features; logits
upsampled bicubically (``align_corners=True``) to the 416x416 input, as the reference code does.

transformers has no CLIP ResNet, so it is written here in plain torch with the original module
names: a CRIS checkpoint or OpenAI's RN50 weights map on by prefix (``convert_state_dict``).

Split for the engine: the image features are the backbone outputs after the neck's text-free
projections (``FPN.visual``); everything from the first text fusion on is ``decode``.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from .architectures import ARCHITECTURES
from .base import VLSM, quiet_transformers
from .weights import load_state_dict_file

SIZES = {
    # resnet blocks/width, CLIP embedding, text transformer (CLIP: 64 channels per head), FPN outputs
    # (out[1] = decoder width = text width), decoder (CRIS: 8 heads)
    "full": dict(layers=(3, 4, 6, 3), width=64, embed=1024, text_width=512, text_layers=12, text_heads=8,
                 fpn_out=(256, 512, 1024), decoder_layers=3, decoder_heads=8, ffn=2048),
    "small": dict(layers=(1, 1, 1, 1), width=16, embed=128, text_width=64, text_layers=2, text_heads=1,
                  fpn_out=(32, 64, 64), decoder_layers=1, decoder_heads=8, ffn=128),
    "tiny": dict(layers=(1, 1, 1, 1), width=8, embed=64, text_width=32, text_layers=1, text_heads=1,
                 fpn_out=(16, 32, 32), decoder_layers=1, decoder_heads=8, ffn=64),
}
# The rest of CRIS-R50's config: CLIP's vocabulary and 77-token context, CRIS's decoder dropout, the
# 7x7 attention-pool grid of CLIP RN50 at 224 pixels.
FULL = dict(SIZES["full"], vocab_size=49408, context_length=77, dropout=0.2, spacial_dim=7)


# ---- CLIP modified ResNet ------------------------------------------------------------------------

class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride > 1 or inplanes != planes * 4:  # anti-aliased: average pool, then a stride-1 1x1 conv
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)), ("0", nn.Conv2d(inplanes, planes * 4, 1, bias=False)),
                ("1", nn.BatchNorm2d(planes * 4))]))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.avgpool(F.relu(self.bn2(self.conv2(out))))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class AttentionPool2d(nn.Module):
    """CLIP's attention pooling kept spatial (CRIS): every position attends to all, plus a 1x1 residual."""

    def __init__(self, spacial_dim, embed_dim, heads, output_dim):
        super().__init__()
        self.spacial_dim = spacial_dim
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.heads = heads
        self.connect = nn.Sequential(nn.Conv2d(embed_dim, output_dim, 1, bias=False), nn.BatchNorm2d(output_dim))

    def forward(self, x):
        b, c, h, w = x.shape
        residual = self.connect(x)
        side = self.spacial_dim  # the grid CLIP was trained on (7 at 224), resized to this input's
        pos = self.positional_embedding[1:].reshape(1, side, side, c).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False)
        tokens = (x + pos.to(x.dtype)).flatten(2).transpose(1, 2)  # [B, HW, C]

        def heads(t):
            return t.reshape(b, h * w, self.heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(tokens)), heads(self.k_proj(tokens)),
                                             heads(self.v_proj(tokens)))
        out = self.c_proj(out.transpose(1, 2).reshape(b, h * w, c))
        return F.relu(out.transpose(1, 2).reshape(b, -1, h, w) + residual)


class ModifiedResNet(nn.Module):
    """Pixels ``[B, 3, S, S]`` -> C3 ``[B, 8w, S/8, S/8]``, C4 ``[B, 16w, S/16, S/16]``, C5 ``[B, E, S/32, S/32]``."""

    def __init__(self, layers, width, output_dim, spacial_dim=7):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        inplanes = width
        for i, (blocks, stride) in enumerate(zip(layers, (1, 2, 2, 2))):
            planes = width * 2 ** i
            stage = [Bottleneck(inplanes, planes, stride)] + [Bottleneck(planes * 4, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            inplanes = planes * 4
        self.attnpool = AttentionPool2d(spacial_dim, width * 32, width * 32 // 64, output_dim)

    def forward(self, x):
        x = x.to(self.conv1.weight.dtype)
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = F.relu(bn(conv(x)))
        x = self.layer1(F.avg_pool2d(x, 2))
        c3 = self.layer2(x)
        c4 = self.layer3(c3)
        return c3, c4, self.attnpool(self.layer4(c4))


# ---- CLIP text transformer ------------------------------------------------------------------------

def attend(attn: nn.MultiheadAttention, query, key, value, mask=None, causal=False):
    """``nn.MultiheadAttention``'s mathematics on batch-first ``[B, N, C]`` tensors via ``F.linear`` + SDPA.

    Not the module's own forward: its batch_first path transposes, and a bf16 linear on a transposed
    input expands the weight once per token (2 s of copies per batch on CPU). ``mask``: ``[B, L]``,
    True where a key is padding.
    """
    heads = attn.num_heads

    def project(x, weight, bias):
        return F.linear(x, weight, bias).reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

    weights, biases = attn.in_proj_weight.chunk(3), attn.in_proj_bias.chunk(3)
    q, k, v = (project(x, w, b) for x, w, b in zip((query, key, value), weights, biases))
    keep = None if mask is None else ~mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, is_causal=causal,
                                         dropout_p=attn.dropout if attn.training else 0.0)
    return attn.out_proj(out.transpose(1, 2).reshape(query.shape[0], query.shape[1], -1))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, width * 4)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(width * 4, width))]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x):
        y = self.ln_1(x)
        x = x + attend(self.attn, y, y, y, causal=True)
        return x + self.mlp(self.ln_2(x))


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class CLIPText(nn.Module):
    """Token ids ``[P, L]`` -> words ``[P, L, W]`` (after ``ln_final``) and the sentence ``[P, E]`` (at EOT)."""

    def __init__(self, vocab, context, width, layers, heads, embed):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.empty(context, width))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed))

    def forward(self, ids):
        length = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[:length]
        for block in self.transformer.resblocks:
            x = block(x)
        words = self.ln_final(x)
        sentence = words[torch.arange(ids.shape[0], device=ids.device), ids.argmax(-1)] @ self.text_projection
        return words, sentence


# ---- CRIS neck, decoder, projector ---------------------------------------------------------------

def conv_layer(cin, cout, kernel=1, padding=0):
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, 1, padding, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))


def upsample2(x):
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class CoordConv(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = conv_layer(cin + 2, cout, 3, 1)

    def forward(self, x):
        b, _, h, w = x.shape
        y, xx = torch.meshgrid(torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype),
                               torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype), indexing="ij")
        coords = torch.stack([xx, y])[None].expand(b, 2, h, w)
        return self.conv1(torch.cat([x, coords], 1))


class FPN(nn.Module):
    """Multi-modal FPN: C5 gated by the sentence, merged top-down with C4 and C3 -> ``[B, out[1], S/16, S/16]``."""

    def __init__(self, cin, cout):
        super().__init__()
        self.txt_proj = nn.Sequential(nn.Linear(cin[2], cout[2], bias=False), nn.BatchNorm1d(cout[2]), nn.ReLU(True))
        self.f1_v_proj = conv_layer(cin[2], cout[2])
        self.norm_layer = nn.Sequential(nn.BatchNorm2d(cout[2]), nn.ReLU(True))
        self.f2_v_proj = conv_layer(cin[1], cout[1], 3, 1)
        self.f2_cat = conv_layer(cout[2] + cout[1], cout[1])
        self.f3_v_proj = conv_layer(cin[0], cout[0], 3, 1)
        self.f3_cat = conv_layer(cout[0] + cout[1], cout[1])
        self.f4_proj5 = conv_layer(cout[2], cout[1], 3, 1)
        self.f4_proj4 = conv_layer(cout[1], cout[1], 3, 1)
        self.f4_proj3 = conv_layer(cout[1], cout[1], 3, 1)
        self.aggr = conv_layer(3 * cout[1], cout[1])
        self.coordconv = nn.Sequential(CoordConv(cout[1], cout[1]), conv_layer(cout[1], cout[1], 3, 1))

    def visual(self, c3, c4, c5):
        """The text-free half (cached per slice): C5, C4 projected; C3 projected and pooled to S/16."""
        return self.f1_v_proj(c5), self.f2_v_proj(c4), F.avg_pool2d(self.f3_v_proj(c3), 2, 2)

    def fuse(self, v5, v4, v3, sentence):
        f5 = self.norm_layer(v5 * self.txt_proj(sentence)[:, :, None, None])
        f4 = self.f2_cat(torch.cat([v4, upsample2(f5)], 1))
        f3 = self.f3_cat(torch.cat([v3, f4], 1))
        fq = torch.cat([self.f4_proj3(f3), self.f4_proj4(f4), upsample2(self.f4_proj5(f5))], 1)
        return self.coordconv(self.aggr(fq))


class TransformerDecoderLayer(nn.Module):
    def __init__(self, width, heads, ffn, dropout):
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(width)
        self.cross_attn_norm = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(width, heads, dropout=dropout)
        self.ffn = nn.Sequential(nn.Linear(width, ffn), nn.ReLU(True), nn.Dropout(dropout), nn.LayerNorm(ffn),
                                 nn.Linear(ffn, width))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, vis, words, vis_pos, word_pos, pad_mask):
        y = self.norm1(vis)
        q = y + vis_pos
        vis = vis + self.dropout1(self.self_attn_norm(attend(self.self_attn, q, q, y)))
        y = self.norm2(vis)
        y = attend(self.multihead_attn, y + vis_pos, words + word_pos, words, mask=pad_mask)
        vis = vis + self.dropout2(self.cross_attn_norm(y))
        return vis + self.dropout3(self.ffn(self.norm3(vis)))


class TransformerDecoder(nn.Module):
    """Visual tokens ``[B, C, H, W]`` attend to themselves and to the words ``[B, L, C]`` -> ``[B, C, H, W]``."""

    def __init__(self, layers, width, heads, ffn, dropout):
        super().__init__()
        self.layers = nn.ModuleList(TransformerDecoderLayer(width, heads, ffn, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, vis, words, pad_mask):
        b, c, h, w = vis.shape
        vis_pos, word_pos = sine_positions(c, h, w, words.shape[1])
        vis_pos, word_pos = vis_pos.to(vis.device, vis.dtype), word_pos.to(words.device, words.dtype)
        out = vis.flatten(2).transpose(1, 2)
        for layer in self.layers:
            out = layer(out, words, vis_pos, word_pos, pad_mask)
        return self.norm(out).transpose(1, 2).reshape(b, c, h, w)


@functools.lru_cache(maxsize=8)
def sine_positions(dim, height, width, length):
    """CRIS's fixed encodings: 2D ``[HW, D]`` (first half from x, second from y) and 1D ``[L, D]``."""
    def sines(count, d):
        div = torch.exp(torch.arange(0.0, d, 2) * -(math.log(10000.0) / d))
        angles = torch.arange(float(count))[:, None] * div
        return torch.stack([torch.sin(angles), torch.cos(angles)], -1).flatten(1)  # sin, cos interleaved

    half = dim // 2
    ex, ey = sines(width, half), sines(height, half)
    grid = torch.cat([ex[None].expand(height, width, half), ey[:, None].expand(height, width, half)], -1)
    return grid.reshape(height * width, dim), sines(length, dim)


class Projector(nn.Module):
    """Decoder output ``[B, C, H, W]`` x sentence ``[B, E]`` -> logits ``[B, 1, 4H, 4W]``: the sentence
    becomes each image's own 3x3 convolution kernel and bias."""

    def __init__(self, word_dim, in_dim, kernel=3):
        super().__init__()
        self.kernel = kernel
        self.vis = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear"), conv_layer(in_dim * 2, in_dim * 2, 3, 1),
                                 nn.Upsample(scale_factor=2, mode="bilinear"), conv_layer(in_dim * 2, in_dim, 3, 1),
                                 nn.Conv2d(in_dim, in_dim, 1))
        self.txt = nn.Linear(word_dim, in_dim * kernel * kernel + 1)

    def forward(self, x, sentence):
        x = self.vis(x)
        b, c, h, w = x.shape
        params = self.txt(sentence).to(x.dtype)
        weight = params[:, :-1].reshape(b, c, self.kernel, self.kernel)
        out = F.conv2d(x.reshape(1, b * c, h, w), weight, bias=params[:, -1], padding=self.kernel // 2, groups=b)
        return out.transpose(0, 1)


# ---- the transformers model (config + save_pretrained / from_pretrained) ------------------------

class CRISConfig(PretrainedConfig):
    """CRIS's sizes; any field not given is CRIS-R50's (``FULL``)."""

    model_type = "cris"

    def __init__(self, **kwargs):
        fields = {name: kwargs.pop(name, default) for name, default in FULL.items()}
        super().__init__(**kwargs)
        for name, value in fields.items():
            setattr(self, name, list(value) if isinstance(value, tuple) else value)


class CRISModel(PreTrainedModel):
    config_class = CRISConfig
    base_model_prefix = "cris"

    def __init__(self, config):
        super().__init__(config)
        c = config
        self.backbone = nn.Module()
        self.backbone.visual = ModifiedResNet(c.layers, c.width, c.embed, c.spacial_dim)
        self.backbone.text = CLIPText(c.vocab_size, c.context_length, c.text_width, c.text_layers, c.text_heads,
                                      c.embed)
        self.neck = FPN((c.width * 8, c.width * 16, c.embed), c.fpn_out)
        self.decoder = TransformerDecoder(c.decoder_layers, c.fpn_out[1], c.decoder_heads, c.ffn, c.dropout)
        self.proj = Projector(c.embed, c.fpn_out[1] // 2)
        self.post_init()

    def _init_weights(self, module):
        pass  # torch's defaults; CLIP's own initialisation is applied by ``CRIS.random``


AutoConfig.register(CRISConfig.model_type, CRISConfig, exist_ok=True)
AutoModel.register(CRISConfig, CRISModel, exist_ok=True)


def cris_config(size: str = "full"):
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}: {', '.join(SIZES)}")
    return CRISConfig(**SIZES[size])


def clip_initialisation(model) -> None:
    """OpenAI CLIP's initialisation (zero-init last BN of each bottleneck, scaled attention/MLP weights)."""
    text, visual = model.backbone.text, model.backbone.visual
    nn.init.normal_(text.token_embedding.weight, std=0.02)
    nn.init.normal_(text.positional_embedding, std=0.01)
    pool = visual.attnpool
    for linear in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
        nn.init.normal_(linear.weight, std=pool.c_proj.in_features ** -0.5)
    for name, param in visual.named_parameters():
        if name.startswith("layer") and name.endswith("bn3.weight"):
            nn.init.zeros_(param)
    width, layers = text.ln_final.weight.shape[0], len(text.transformer.resblocks)
    for block in text.transformer.resblocks:
        nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
        nn.init.normal_(block.attn.out_proj.weight, std=width ** -0.5 * (2 * layers) ** -0.5)
        nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
        nn.init.normal_(block.mlp.c_proj.weight, std=width ** -0.5 * (2 * layers) ** -0.5)
    nn.init.normal_(text.text_projection, std=width ** -0.5)


class CRIS(VLSM):
    """The ``VLSM`` interface over ``CRISModel``.

    The text embedding of a prompt is one flat vector: sentence ``[E]``, words ``[L, W]`` and the
    word mask ``[L]`` (pads are id 0, as in CRIS), so the engine caches and broadcasts it like any
    other model's.
    """

    hf_class = CRISModel

    @classmethod
    def random(cls, size: str = "full", name: str | None = None, seed: int = 0) -> "CRIS":
        return cls.from_config(cris_config(size), name or f"cris-{size}-random", seed,
                               description=f"CRIS {size} architecture, random weights")

    @classmethod
    def from_config(cls, config, name: str, seed: int = 0, description: str = "") -> "CRIS":
        """Random weights with CLIP's initialisation (no hub): tests, training from scratch, conversion."""
        from .tokenizer import clip_tokenizer

        quiet_transformers()
        torch.manual_seed(seed)
        hf = CRISModel(config).eval()
        clip_initialisation(hf)
        spec = ARCHITECTURES["cris"].spec(name=name, text_tokens=config.context_length, trained=False,
                                          description=description)
        return cls(hf, clip_tokenizer(), spec)

    def towers(self):
        return {"image": [self.hf.backbone.visual], "text": [self.hf.backbone.text]}

    def tokenize(self, prompts):
        """CLIP BPE ids zero-padded to the 77 positions the causal text transformer was built for."""
        tokens = super().tokenize(prompts)  # already truncated to text_tokens
        ids = torch.zeros(len(prompts), self.spec.text_tokens, dtype=torch.long)
        ids[:, : tokens["input_ids"].shape[1]] = tokens["input_ids"] * tokens["attention_mask"]
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    def encode_tokens(self, input_ids, attention_mask):
        words, sentence = self.hf.backbone.text(input_ids)
        keep = (input_ids != 0).to(words.dtype)
        return torch.cat([sentence, words.flatten(1), keep], 1)

    def split_text(self, text):
        """Flat text embeddings ``[N, D]`` -> sentence ``[N, E]``, words ``[N, L, W]``, pad mask ``[N, L]``."""
        embed, width = self.hf.config.embed, self.hf.config.text_width
        length = (text.shape[1] - embed) // (width + 1)
        sentence, words, keep = text.split([embed, length * width, length], 1)
        return sentence, words.reshape(-1, length, width), keep < 0.5

    def encode_images(self, pixels):
        # channels-last: oneDNN's bf16 convolutions run ~20 % faster on it (bench/results, CRIS row)
        c3, c4, c5 = self.hf.backbone.visual(pixels.contiguous(memory_format=torch.channels_last))
        return self.hf.neck.visual(c3, c4, c5)  # v5 (S/32), v4, v3 (S/16)

    def decode_paired(self, features, text):
        v5, v4, v3 = features
        sentence, words, pad_mask = self.split_text(text.to(v5.dtype))
        fq = self.hf.neck.fuse(v5, v4, v3, sentence)
        fq = self.hf.decoder(fq, words, pad_mask)
        logits = self.hf.proj(fq, sentence)
        size = (logits.shape[-2] * 4, logits.shape[-1] * 4)  # 104 -> 416: the input side
        return F.interpolate(logits, size=size, mode="bicubic", align_corners=True)[:, 0]


# ---- original weights ------------------------------------------------------------------------------

UNUSED_KEYS = ("logit_scale", "input_resolution", "context_length", "vocab_size")


def convert_state_dict(original: dict) -> dict:
    """A CRIS checkpoint (``backbone.*``, ``neck.*``, ``decoder.*``, ``proj.*``; DDP's ``module.`` prefix
    allowed) or OpenAI CLIP weights (``visual.*``, ``transformer.*``, ...) -> ``CRISModel`` keys."""
    out = {}
    for key, value in original.items():
        key = key.removeprefix("module.")
        if key.startswith(("neck.", "decoder.", "proj.")):
            out[key] = value
            continue
        key = key.removeprefix("backbone.")
        if key in UNUSED_KEYS:
            continue
        out[("backbone." if key.startswith("visual.") else "backbone.text.") + key] = value
    return out


def is_cris_checkpoint(state: dict) -> bool:
    return any(k.removeprefix("module.").startswith("neck.") for k in state)


def load_original(path) -> dict:
    """safetensors or a ``weights_only`` pickle; OpenAI's TorchScript ``RN50.pt`` is refused with the way out."""
    import zipfile

    from ..errors import ModelError

    if zipfile.is_zipfile(path) and any(n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist()):
        raise ModelError(f"{path} is a TorchScript archive (OpenAI's RN50.pt): it cannot be read without running "
                         "the code inside it",
                         "Use the same weights as safetensors (open_clip_model.safetensors of timm/resnet50_clip.openai) "
                         "or save its state_dict once where you trust it: "
                         "torch.save(torch.jit.load('RN50.pt').state_dict(), 'RN50_state_dict.pt')")
    try:
        return load_state_dict_file(path)
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"Cannot read {path} as weights ({str(e).splitlines()[0][:160]})",
                         "Pass a safetensors file or a plain state_dict saved with torch.save") from e


def config_from_state_dict(state: dict):
    """The architecture a converted state dict describes (as CLIP's ``build_model`` reads it); the CRIS
    parts follow CRIS's ResNet-50 recipe where only CLIP weights are given."""
    def count(prefix):
        return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})

    text_width = state["backbone.text.ln_final.weight"].shape[0]
    embed = state["backbone.text.text_projection"].shape[1]
    config = dict(layers=[count(f"backbone.visual.layer{i}.") for i in range(1, 5)],
                  width=state["backbone.visual.layer1.0.conv1.weight"].shape[0], embed=embed,
                  text_width=text_width, text_layers=count("backbone.text.transformer.resblocks."),
                  text_heads=max(1, text_width // 64), vocab_size=state["backbone.text.token_embedding.weight"].shape[0],
                  context_length=state["backbone.text.positional_embedding"].shape[0],
                  spacial_dim=round((state["backbone.visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5),
                  fpn_out=[text_width // 2, text_width, embed], decoder_layers=3, decoder_heads=8, ffn=4 * text_width)
    if "neck.f1_v_proj.0.weight" in state:
        config.update(fpn_out=[state[f"neck.{k}.0.weight"].shape[0] for k in ("f3_v_proj", "f2_v_proj", "f1_v_proj")],
                      decoder_layers=count("decoder.layers."), ffn=state["decoder.layers.0.ffn.0.weight"].shape[0])
    return CRISConfig(**config)


def convert(sources, output, name: str | None = None) -> "CRIS":
    """OpenAI CLIP RN50 weights and/or a CRIS checkpoint -> a model folder in our format.

    A CRIS checkpoint alone is the complete model. CLIP weights alone give CRIS with pretrained
    encoders and a random neck/decoder (finetune it). Both: CLIP first, the CRIS checkpoint on top.
    """
    from pathlib import Path

    from ..errors import ModelError

    states = [load_original(p) for p in sources]
    for path, state in zip(sources, states):
        if not (is_cris_checkpoint(state) or "visual.layer1.0.conv1.weight" in state):
            raise ModelError(f"{path} is neither a CRIS checkpoint (neck.*) nor OpenAI CLIP ResNet weights "
                             "(visual.layer1.*)",
                             "Pass RN50 weights and/or the CRIS checkpoint (cris_best.pth)")
    states.sort(key=is_cris_checkpoint)  # CLIP first, so the CRIS checkpoint wins where both have a tensor
    merged = {}
    for state in states:
        merged.update(convert_state_dict(state))
    try:
        config = config_from_state_dict(merged)
    except KeyError as e:
        raise ModelError(f"The weights lack {e.args[0]}: not a CLIP ResNet with its text transformer",
                         "Pass OpenAI's RN50 weights and/or a complete CRIS checkpoint") from e
    model = CRIS.from_config(config, name or "cris")
    target = model.hf.state_dict()
    unexpected = [k for k in merged if k not in target]
    wrong = [k for k in merged if k in target and merged[k].shape != target[k].shape]
    complete = any(is_cris_checkpoint(s) for s in states)
    missing = [k for k in target if k not in merged and (complete or k.startswith("backbone."))
               and not k.startswith("backbone.visual.attnpool.connect.") and not k.endswith("num_batches_tracked")]
    if unexpected or wrong or missing:
        raise ModelError(f"The weights do not match CRIS with CLIP RN50 ({len(missing)} missing, {len(unexpected)} "
                         f"unexpected, {len(wrong)} of another shape; first: {(missing + unexpected + wrong)[0]})",
                         "Check that the files are OpenAI's RN50 weights and a CRIS ResNet-50 checkpoint")
    model.hf.load_state_dict(merged, strict=False)
    model.spec.trained = complete
    model.spec.source = " + ".join(str(p) for p in sources)
    model.spec.licence = "MIT (OpenAI CLIP weights, CRIS code)"
    model.spec.description = ("CRIS (CLIP RN50) from a CRIS checkpoint" if complete else
                              "CRIS with OpenAI CLIP RN50 encoders and a random neck/decoder: finetune before use")
    Path(output).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    return model
