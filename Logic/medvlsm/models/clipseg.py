"""CLIPSeg (Lüddecke & Ecker, CVPR 2022) on transformers' ``CLIPSegForImageSegmentation``.

Differences from calling the transformers model directly, all output-preserving
(``Testing/test_engine.py`` checks equality with the plain forward):

- the vision encoder stops after the deepest layer the decoder reads (``extract_layers``):
  layers 10 and 11 of ViT-B/16 never reach the output (~16 % of the FLOPs);
- the decoder's per-layer ``reduces`` projections (768 -> 64) do not depend on the text, so
  they belong to the image features: the cache is 12x smaller and a new prompt runs only the
  64-wide decoder;
- gradients flow everywhere (transformers' forward wraps the encoders in ``no_grad``), so the
  same three stages finetune the whole model;
- the text is encoded once per prompt and broadcast over the batch.
"""

from __future__ import annotations

import torch
from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

from .architectures import ARCHITECTURES
from .base import VLSM, quiet_transformers
from .folder import check_folder
from .spec import ModelSpec


def clipseg_config(size: str = "full") -> CLIPSegConfig:
    """The CLIPSeg architecture: ``full`` = CIDAS/clipseg-rd64-refined, ``tiny`` for fast tests."""
    if size == "full":
        text = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8)
        vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        extra = dict(projection_dim=512, reduce_dim=64, extract_layers=[3, 6, 9], decoder_num_attention_heads=4,
                     decoder_intermediate_size=2048, use_complex_transposed_convolution=True)
    elif size == "small":
        text = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2)
        vision = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2)
        extra = dict(projection_dim=64, reduce_dim=32, extract_layers=[1, 2, 3], decoder_num_attention_heads=2,
                     decoder_intermediate_size=128, use_complex_transposed_convolution=False)
    elif size == "tiny":
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        extra = dict(projection_dim=32, reduce_dim=16, extract_layers=[0, 1], decoder_num_attention_heads=2,
                     decoder_intermediate_size=64, use_complex_transposed_convolution=True)
    else:
        raise ValueError(f"unknown size {size!r}: full, small or tiny")
    text.update(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    vision.update(image_size=224, patch_size=16)
    return CLIPSegConfig(text_config=text, vision_config=vision, conditional_layer=0, **extra)


class CLIPSegFamily(VLSM):
    """A ViT whose blocks feed transformers' ``CLIPSegDecoder``: CLIPSeg and BiomedCLIPSeg(-D).

    Subclasses say how pixels become tokens (``embed``) and which blocks follow (``blocks``).
    """

    def __init__(self, hf_model, tokenizer, spec: ModelSpec):
        super().__init__(hf_model, tokenizer, spec)
        self.extract_layers = list(hf_model.config.extract_layers)

    def embed(self, pixels):
        raise NotImplementedError

    def blocks(self):
        raise NotImplementedError

    def encode_images(self, pixels):
        hidden = self.embed(pixels)
        wanted = {layer: i for i, layer in enumerate(self.extract_layers)}
        activations = [None] * len(wanted)
        for index, layer in enumerate(self.blocks()[: max(self.extract_layers) + 1]):
            hidden = layer(hidden, None)
            if index in wanted:
                activations[wanted[index]] = hidden
        # The decoder consumes activations deepest first, each through its own reduce.
        return tuple(reduce(act) for act, reduce in zip(activations[::-1], self.hf.decoder.reduces))

    def decode_paired(self, features, text):
        return clipseg_decode(self.hf.decoder, features, text)


class CLIPSeg(CLIPSegFamily):
    hf_class = CLIPSegForImageSegmentation  # transformers' own, registered there under "clipseg"

    @classmethod
    def random(cls, size: str = "full", name: str | None = None, seed: int = 0,
               decoder_init: str = "torch") -> "CLIPSeg":
        """Random weights from the config (no hub): for tests, benchmarks and training from scratch.

        ``decoder_init="torch"``: the decoder starts from PyTorch's default initialisation, as in the
        original CLIPSeg code. transformers' ``_init_weights`` (``"transformers"``) leaves the reduce,
        FiLM and transposed-convolution weights at a standard deviation of 1: activations grow ~10x
        per layer and a model trained from scratch learns to ignore the prompt
        (``bench/finetune_recipe.py``)."""
        from .tokenizer import clip_tokenizer

        quiet_transformers()
        torch.manual_seed(seed)
        hf = CLIPSegForImageSegmentation(clipseg_config(size)).eval()
        if decoder_init == "torch":
            for module in hf.decoder.modules():
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                    module.reset_parameters()
        elif decoder_init != "transformers":
            raise ValueError(f"unknown decoder_init {decoder_init!r}: torch or transformers")
        spec = ARCHITECTURES["clipseg"].spec(name=name or f"clipseg-{size}-random", trained=False,
                                             description=f"CLIPSeg {size} architecture, random weights")
        return cls(hf, clip_tokenizer(), spec)

    def towers(self):
        clip = self.hf.clip
        return {"image": [clip.vision_model, clip.visual_projection], "text": [clip.text_model, clip.text_projection]}

    def encode_tokens(self, input_ids, attention_mask):
        return self.hf.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output

    def embed(self, pixels):
        vision = self.hf.clip.vision_model
        return vision.pre_layrnorm(vision.embeddings(pixels, interpolate_pos_encoding=True))

    def blocks(self):
        return self.hf.clip.vision_model.encoder.layers


def clipseg_decode(decoder, features, text):
    """transformers' ``CLIPSegDecoder`` on pre-reduced features (deepest first) and one text embedding
    per image (FiLM at ``conditional_layer``) -> logits ``[N, S, S]``. Shared by the CLIPSeg family."""
    cond = text.to(features[0].dtype)
    output = None
    for i, (reduced, layer) in enumerate(zip(features, decoder.layers)):
        output = reduced if output is None else reduced + output
        if i == decoder.conditional_layer:
            output = decoder.film_mul(cond)[:, None] * output + decoder.film_add(cond)[:, None]
        output = layer(output, None)
    output = output[:, 1:, :].transpose(1, 2)
    side = int(round(output.shape[2] ** 0.5))
    output = output.reshape(output.shape[0], output.shape[1], side, side)
    return decoder.transposed_convolution(output)[:, 0]


def convert(sources, output, name: str | None = None) -> CLIPSeg:
    """A CIDAS/clipseg-* hub snapshot (a folder, or its files: config.json, weights, tokenizer files)
    -> a model folder in our format (safetensors weights, ``medvlsm.json`` with the registry's settings)."""
    import shutil
    import tempfile
    from pathlib import Path

    from ..errors import ModelError

    sources = [Path(p) for p in sources]
    with tempfile.TemporaryDirectory() as tmp:
        if len(sources) == 1 and sources[0].is_dir():
            folder = sources[0]
        else:  # loose files: gathered into a folder, as transformers reads them
            folder = Path(tmp)
            for f in sources:
                shutil.copy(f, folder / f.name)
        check_folder(folder)
        spec = ARCHITECTURES["clipseg"].spec(name=name or folder.name, source=str(sources[0]),
                                             licence="Apache-2.0 (CIDAS CLIPSeg)",
                                             description="CLIPSeg converted from a CIDAS snapshot")
        try:
            model = CLIPSeg.from_folder(folder, spec)
        except Exception as e:  # transformers raises many types for foreign folders
            raise ModelError(f"{sources[0]} is not a CIDAS CLIPSeg snapshot ({str(e).splitlines()[0][:160]})",
                             "Pass the folder of CIDAS/clipseg-rd64-refined (config.json, weights, tokenizer files)") from e
    Path(output).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    return model
