"""How a training step gets its logits: from pixels through the whole model, or — to *adapt* a model
in minutes on a CPU — from image features encoded once.

Adapt (``finetune --adapt``) trains the decoder only, as the paper trains BiomedCLIPSeg: the image and
text encoders are frozen, so each sample's image features never change. They are encoded once,
before the first epoch (kept in float16 on the CPU), and each prompt's text embedding once, when first
seen; every step then runs the decoder alone. What counts as the decoder is the model's
``decode_paired`` (CLIPSeg: the FiLM-conditioned transformer and the upsampling head; its per-layer
``reduces`` belong to the cached features and stay as they are).
"""

from __future__ import annotations

import torch


class PixelForward:
    """Samples' pixels and prompts through ``module`` (the model, or its DistributedDataParallel)."""

    def __init__(self, module, samples, tokenize, device):
        self.module, self.samples, self.tokenize, self.device = module, samples, tokenize, device

    def __call__(self, rows, prompts):
        pixels = torch.stack([self.samples[r].pixels for r in rows]).float().to(self.device)
        tokens = self.tokenize(prompts)
        return self.module(pixels, tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device))


class FeatureForward:
    """Cached image features and text embeddings through the decoder only (frozen encoders)."""

    def __init__(self, model, samples, device, batch_size: int = 16):
        self.model, self.device, self.text_cache = model, device, {}
        self.features = []  # per sample: a tuple of tensors [...] without the batch axis
        with torch.no_grad():
            for start in range(0, len(samples), batch_size):
                chunk = samples[start : start + batch_size]
                pixels = torch.stack([s.pixels for s in chunk]).float().to(device)
                encoded = model.encode_images(pixels)
                for i in range(len(chunk)):
                    self.features.append(tuple(f[i].to("cpu", torch.float16) for f in encoded))

    def text(self, prompts) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self.text_cache]
        if missing:
            with torch.no_grad():
                tokens = self.model.tokenize(missing)
                embedded = self.model.encode_tokens(tokens["input_ids"].to(self.device),
                                                    tokens["attention_mask"].to(self.device))
            self.text_cache.update(zip(missing, embedded))
        return torch.stack([self.text_cache[p] for p in prompts])

    def __call__(self, rows, prompts):
        features = tuple(torch.stack([self.features[r][k] for r in rows]).to(self.device, torch.float32)
                         for k in range(len(self.features[rows[0]])))
        return self.model.decode_paired(features, self.text(prompts))
