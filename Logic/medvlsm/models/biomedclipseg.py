"""BiomedCLIPSeg and BiomedCLIPSeg-D: BiomedCLIP's encoders with a CLIPSeg decoder.

BiomedCLIP (``microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``) is an open_clip model:
a timm ViT-B/16 image tower and a PubMedBERT text tower (CLS token, 768 -> 640 -> 512 MLP
projection, 256 tokens). open_clip and timm pull torchvision, so the towers are rebuilt here from
transformers modules with the same mathematics — ``ViTModel`` (pre-norm blocks, exact GELU, LayerNorm
eps 1e-6) and ``BertModel`` — and the original weights are mapped onto them
(``convert_open_clip_state_dict``). The decoder is transformers' ``CLIPSegDecoder`` reading ViT blocks
5, 8 and 11 (1-indexed), as the reference code does; BiomedCLIPSeg starts it from random weights,
BiomedCLIPSeg-D from the pretrained CLIPSeg decoder (``convert_clipseg_decoder``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (AutoConfig, AutoModel, BertConfig, BertModel, CLIPSegConfig, PretrainedConfig,
                          PreTrainedModel, ViTConfig, ViTModel)
from transformers.models.clipseg.modeling_clipseg import CLIPSegDecoder

from .architectures import ARCHITECTURES
from .base import quiet_transformers
from .clipseg import CLIPSegFamily
from .weights import load_state_dict_file

EXTRACT_LAYERS = (4, 7, 10)  # blocks 5, 8, 11 counted from 1, as in the reference code
SIZES = {
    # vision / text width, layers, heads, MLP; projection; decoder reduce width
    "full": dict(width=768, layers=12, heads=12, mlp=3072, text_layers=12, vocab=30522, projection=512, reduce=64,
                 extract=EXTRACT_LAYERS),
    "small": dict(width=64, layers=4, heads=2, mlp=256, text_layers=2, vocab=1000, projection=64, reduce=32,
                  extract=(1, 2, 3)),
    "tiny": dict(width=32, layers=4, heads=2, mlp=64, text_layers=2, vocab=1000, projection=32, reduce=16,
                 extract=(1, 2, 3)),
}


class BiomedCLIPSegConfig(PretrainedConfig):
    model_type = "biomedclipseg"

    def __init__(self, vision_config=None, text_config=None, decoder_config=None, projection_dim=512,
                 text_proj_hidden=640, extract_layers=EXTRACT_LAYERS, **kwargs):
        super().__init__(**kwargs)
        self.vision_config = dict(vision_config or {})
        self.text_config = dict(text_config or {})
        self.decoder_config = dict(decoder_config or {})
        self.projection_dim = projection_dim
        self.text_proj_hidden = text_proj_hidden
        self.extract_layers = list(extract_layers)


def biomedclipseg_config(size: str = "full"):
    s = SIZES[size]
    vision = dict(hidden_size=s["width"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                  intermediate_size=s["mlp"], hidden_act="gelu", layer_norm_eps=1e-6, image_size=224, patch_size=16,
                  qkv_bias=True)
    text = dict(vocab_size=s["vocab"], hidden_size=s["width"], num_hidden_layers=s["text_layers"],
                num_attention_heads=s["heads"], intermediate_size=s["mlp"], max_position_embeddings=512)
    decoder = dict(vision_config=dict(hidden_size=s["width"], num_attention_heads=s["heads"], patch_size=16),
                   projection_dim=s["projection"],
                   reduce_dim=s["reduce"], extract_layers=list(s["extract"]), decoder_num_attention_heads=4 if
                   size == "full" else 2, decoder_intermediate_size=2048 if size == "full" else 64,
                   conditional_layer=0, use_complex_transposed_convolution=True)
    return BiomedCLIPSegConfig(vision, text, decoder, projection_dim=s["projection"],
                           text_proj_hidden=(s["width"] + s["projection"]) // 2, extract_layers=s["extract"])


class BiomedCLIPSegModel(PreTrainedModel):
    config_class = BiomedCLIPSegConfig
    base_model_prefix = "biomedclipseg"

    def __init__(self, config):
        super().__init__(config)
        self.vision = ViTModel(ViTConfig(**config.vision_config), add_pooling_layer=False)
        self.text = BertModel(BertConfig(**config.text_config), add_pooling_layer=False)
        width = config.text_config["hidden_size"]
        self.text_proj = nn.Sequential(nn.Linear(width, config.text_proj_hidden, bias=False), nn.GELU(),
                                       nn.Linear(config.text_proj_hidden, config.projection_dim, bias=False))
        self.decoder = CLIPSegDecoder(CLIPSegConfig(**config.decoder_config))
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, 0.02)
            if module.bias is not None:
                module.bias.data.zero_()


AutoConfig.register(BiomedCLIPSegConfig.model_type, BiomedCLIPSegConfig, exist_ok=True)
AutoModel.register(BiomedCLIPSegConfig, BiomedCLIPSegModel, exist_ok=True)


class BiomedCLIPSeg(CLIPSegFamily):
    """The ``VLSM`` interface over ``BiomedCLIPSegModel`` (shared by BiomedCLIPSeg and -D)."""

    hf_class = BiomedCLIPSegModel

    @classmethod
    def random(cls, size: str = "full", name: str | None = None, seed: int = 0, tokenizer=None) -> "BiomedCLIPSeg":
        quiet_transformers()
        torch.manual_seed(seed)
        hf = BiomedCLIPSegModel(biomedclipseg_config(size)).eval()
        spec = ARCHITECTURES["biomedclipseg"].spec(name=name or f"biomedclipseg-{size}-random", trained=False,
                                                   description=f"BiomedCLIPSeg {size} architecture, random weights")
        return cls(hf, tokenizer or wordpiece_tokenizer(SIZES[size]["vocab"]), spec)

    def towers(self):
        return {"image": [self.hf.vision], "text": [self.hf.text, self.hf.text_proj]}

    def encode_tokens(self, input_ids, attention_mask):
        hidden = self.hf.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.hf.text_proj(hidden[:, 0])  # open_clip's "cls_last_hidden_state_pooler" + MLP projection

    def embed(self, pixels):
        embeddings = self.hf.vision.embeddings
        return embeddings(pixels.to(embeddings.patch_embeddings.projection.weight.dtype), interpolate_pos_encoding=True)

    def blocks(self):
        return self.hf.vision.layers


def wordpiece_tokenizer(vocab_size: int = 1000):
    """A small uncased WordPiece tokenizer for random-weight models (tests, training from scratch).
    Real BiomedCLIP folders carry PubMedBERT's own vocabulary (see ``convert``)."""
    import tempfile
    from pathlib import Path

    from transformers import BertTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(letters) + [f"##{c}" for c in letters]
    tokens += [f"[unused{i}]" for i in range(vocab_size - len(tokens))]
    folder = Path(tempfile.mkdtemp())
    (folder / "vocab.txt").write_text("\n".join(tokens[:vocab_size]) + "\n", encoding="utf-8")
    return BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True, model_max_length=256)


# ---- weights in their original formats --------------------------------------------------------------

def convert_open_clip_state_dict(original: dict, layers: int = 12) -> dict:
    """BiomedCLIP's open_clip state dict (``visual.trunk.*`` timm ViT, ``text.transformer.*`` BERT,
    ``text.proj.*``) -> the keys of ``BiomedCLIPSegModel`` (decoder excluded)."""
    out = {}
    v = "visual.trunk."
    out["vision.embeddings.cls_token"] = original[v + "cls_token"]
    out["vision.embeddings.position_embeddings"] = original[v + "pos_embed"]
    out["vision.embeddings.patch_embeddings.projection.weight"] = original[v + "patch_embed.proj.weight"]
    out["vision.embeddings.patch_embeddings.projection.bias"] = original[v + "patch_embed.proj.bias"]
    for i in range(layers):
        b, t = f"{v}blocks.{i}.", f"vision.layers.{i}."
        for name, part in zip(("q_proj", "k_proj", "v_proj"), range(3)):
            w, bias = original[b + "attn.qkv.weight"], original[b + "attn.qkv.bias"]
            d = w.shape[0] // 3
            out[t + f"attention.{name}.weight"] = w[part * d : (part + 1) * d]
            out[t + f"attention.{name}.bias"] = bias[part * d : (part + 1) * d]
        pairs = {"attn.proj": "attention.o_proj", "norm1": "layernorm_before", "norm2": "layernorm_after",
                 "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
        for src, dst in pairs.items():
            for p in ("weight", "bias"):
                out[t + f"{dst}.{p}"] = original[b + f"{src}.{p}"]
    out["vision.layernorm.weight"] = original[v + "norm.weight"]
    out["vision.layernorm.bias"] = original[v + "norm.bias"]
    for key, value in original.items():
        if key.startswith("text.transformer.") and ".pooler." not in key and "position_ids" not in key:
            out["text." + key[len("text.transformer."):]] = value
    out["text_proj.0.weight"] = original["text.proj.0.weight"]
    out["text_proj.2.weight"] = original["text.proj.2.weight"]
    return out


def convert_clipseg_decoder(clipseg_state_dict: dict) -> dict:
    """CIDAS CLIPSeg weights (``decoder.*``) -> this model's decoder, for BiomedCLIPSeg-D."""
    return {k: v for k, v in clipseg_state_dict.items() if k.startswith("decoder.")}


def convert(sources, output, name: str | None = None) -> "BiomedCLIPSeg":
    """``medvlsm convert --arch biomedclipseg``: open_clip weights and vocab.txt, in any order."""
    return convert_files(*_sorted_sources(sources, with_decoder=False), output, name=name or "biomedclipseg")


def convert_d(sources, output, name: str | None = None) -> "BiomedCLIPSeg":
    """``medvlsm convert --arch biomedclipseg-d``: the same files and the CLIPSeg weights (its decoder)."""
    return convert_files(*_sorted_sources(sources, with_decoder=True), output, name=name or "biomedclipseg-d")


def _sorted_sources(sources, with_decoder: bool) -> tuple:
    """-> (open_clip weights, vocab.txt, CLIPSeg weights or None), from files given in any order."""
    from pathlib import Path

    from ..errors import InputError

    files = [Path(f) for f in sources]
    vocab = [f for f in files if f.suffix == ".txt"]
    weights = [f for f in files if f.suffix != ".txt"]
    wanted = 2 if with_decoder else 1
    if len(vocab) != 1 or len(weights) != wanted:
        raise InputError(f"biomedclipseg{'-d' if with_decoder else ''} needs {wanted} weights file(s) and one "
                         f"vocab.txt, got {len(weights)} and {len(vocab)}",
                         "Pass open_clip_pytorch_model.bin, vocab.txt" +
                         (" and the CLIPSeg model.safetensors" if with_decoder else ""))
    return weights[0], vocab[0], weights[1] if with_decoder else None


def convert_files(open_clip_weights, vocab, clipseg_weights, output, name: str) -> "BiomedCLIPSeg":
    """BiomedCLIP's ``open_clip_pytorch_model.bin`` + PubMedBERT's ``vocab.txt`` (+ CLIPSeg weights for
    the -D variant) -> a model folder in our format."""
    from pathlib import Path

    from transformers import BertTokenizer

    from ..errors import ModelError

    original = load_state_dict_file(open_clip_weights)
    if "visual.trunk.cls_token" not in original:
        raise ModelError(f"{open_clip_weights} is not a BiomedCLIP open_clip checkpoint (no visual.trunk.*)",
                         "Pass open_clip_pytorch_model.bin of microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224")
    tokenizer = BertTokenizer(str(vocab), do_lower_case=True, model_max_length=256)
    model = BiomedCLIPSeg.random("full", name=name, tokenizer=tokenizer)
    state = convert_open_clip_state_dict(original)
    if clipseg_weights:
        state.update(convert_clipseg_decoder(load_state_dict_file(clipseg_weights)))
    missing, unexpected = model.hf.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("decoder.") for k in missing):
        raise ModelError(f"The checkpoint does not match BiomedCLIP ViT-B/16 + PubMedBERT ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected tensors)", "Check that the files are the original ones")
    model.spec.trained = bool(clipseg_weights)  # BiomedCLIPSeg's decoder starts random: finetune it first
    model.spec.source = str(open_clip_weights)
    model.spec.licence = "MIT (BiomedCLIP)" + ("; Apache-2.0 (CLIPSeg decoder)" if clipseg_weights else "")
    model.spec.description = ("BiomedCLIP encoders + pretrained CLIPSeg decoder" if clipseg_weights else
                              "BiomedCLIP encoders + random CLIPSeg decoder (finetune with --freeze encoders)")
    Path(output).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    return model
