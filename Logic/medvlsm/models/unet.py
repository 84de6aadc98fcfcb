"""The paper's image-only baseline: MONAI's ``BasicUNet`` (2D) behind the ``VLSM`` interface.

It reads no text: every prompt gives the same mask, and the engine, the command line and the
Slicer panel say so. It exists so a user can compare a VLSM with an image-only model trained on
the same data by the same loaders, recipe and evaluation (``medvlsm finetune --arch unet``).

The folder format is the VLSMs' (transformers' ``config.json`` + safetensors + ``medvlsm.json``)
without tokenizer files: a ``PreTrainedModel`` holds the MONAI network.
"""

from __future__ import annotations

import contextlib
import io

import torch
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from .architectures import ARCHITECTURES
from .base import VLSM, quiet_transformers

# BasicUNet's six feature widths; ``small`` is the 0.49 M-parameter baseline of issue 24's measurement.
SIZES = {"full": (32, 32, 64, 128, 256, 32), "small": (16, 16, 32, 64, 128, 16), "tiny": (4, 4, 8, 8, 16, 4)}


class UNetConfig(PretrainedConfig):
    model_type = "unet"

    def __init__(self, features=SIZES["full"], in_channels: int = 3, dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.features = list(features)
        self.in_channels = in_channels
        self.dropout = dropout


class UNetModel(PreTrainedModel):
    config_class = UNetConfig
    base_model_prefix = "unet"

    def __init__(self, config):
        super().__init__(config)
        from monai.networks.nets import BasicUNet

        with contextlib.redirect_stdout(io.StringIO()):  # BasicUNet prints its feature widths
            self.unet = BasicUNet(spatial_dims=2, in_channels=config.in_channels, out_channels=1,
                                  features=tuple(config.features), dropout=config.dropout)
        self.post_init()

    def _init_weights(self, module):
        pass  # MONAI's own initialisation

    def forward(self, pixels):
        return self.unet(pixels)


AutoConfig.register(UNetConfig.model_type, UNetConfig, exist_ok=True)
AutoModel.register(UNetConfig, UNetModel, exist_ok=True)


class UNet(VLSM):
    """Image in, logits out; the "text embedding" is an empty vector the decoder ignores."""

    hf_class = UNetModel

    @classmethod
    def random(cls, size: str = "full", name: str | None = None, seed: int = 0) -> "UNet":
        if size not in SIZES:
            raise ValueError(f"unknown size {size!r}: {', '.join(SIZES)}")
        quiet_transformers()
        torch.manual_seed(seed)
        hf = UNetModel(UNetConfig(features=SIZES[size])).eval()
        spec = ARCHITECTURES["unet"].spec(name=name or f"unet-{size}-random", trained=False,
                                          description=f"MONAI BasicUNet ({size}), image only, random weights")
        return cls(hf, None, spec)

    def prompt_warnings(self, prompts: list[str]) -> list[str]:
        return [f"{self.spec.name} is an image-only model (UNet): it ignores the prompt, every prompt gives the "
                "same mask."]

    def tokenize(self, prompts: list[str]) -> dict:
        return {"input_ids": torch.zeros(len(prompts), 1, dtype=torch.long),
                "attention_mask": torch.ones(len(prompts), 1, dtype=torch.long)}

    def encode_tokens(self, input_ids, attention_mask):
        return torch.zeros(input_ids.shape[0], 0, device=input_ids.device)

    def encode_images(self, pixels):
        return (self.hf(pixels),)

    def decode_paired(self, features, text):
        return features[0][:, 0]

    def towers(self):
        return {"image": [], "text": []}
