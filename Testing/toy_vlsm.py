"""A toy architecture added the way docs/models.md's "Adding an architecture" says: this one module and
one ``register`` call (``TOY``). Real transformers classes, random weights; small enough for a test.

The model: a strided convolution encodes the image, the prompt is the mean of its token
embeddings, and a FiLM-conditioned convolution decodes the mask at a quarter of the input side.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from medvlsm.models import ARCHITECTURES, Architecture, register
from medvlsm.models.architectures import CLIP_MEAN, CLIP_STD
from medvlsm.models.base import VLSM
from medvlsm.models.tokenizer import clip_tokenizer


class ToySegConfig(PretrainedConfig):
    model_type = "toyseg"

    def __init__(self, width=16, vocab_size=49408, **kwargs):
        super().__init__(**kwargs)
        self.width = width
        self.vocab_size = vocab_size


class ToySegModel(PreTrainedModel):
    config_class = ToySegConfig
    base_model_prefix = "toyseg"

    def __init__(self, config):
        super().__init__(config)
        self.image = nn.Sequential(nn.Conv2d(3, config.width, 4, stride=4), nn.GELU(),
                                   nn.Conv2d(config.width, config.width, 3, padding=1))
        self.tokens = nn.Embedding(config.vocab_size, config.width)
        self.film = nn.Linear(config.width, 2 * config.width)
        self.head = nn.Conv2d(config.width, 1, 3, padding=1)
        self.post_init()


AutoConfig.register(ToySegConfig.model_type, ToySegConfig, exist_ok=True)
AutoModel.register(ToySegConfig, ToySegModel, exist_ok=True)


class ToySeg(VLSM):
    hf_class = ToySegModel

    @classmethod
    def random(cls, size="full", name=None, seed=0):
        torch.manual_seed(seed)
        hf = ToySegModel(ToySegConfig(width={"full": 16, "tiny": 8}[size])).eval()
        spec = ARCHITECTURES["toyseg"].spec(name=name or f"toyseg-{size}-random", trained=False)
        return cls(hf, clip_tokenizer(), spec)

    def towers(self):
        return {"image": [self.hf.image], "text": [self.hf.tokens]}

    def encode_tokens(self, input_ids, attention_mask):
        keep = attention_mask[..., None].to(self.hf.tokens.weight.dtype)
        return (self.hf.tokens(input_ids) * keep).sum(1) / keep.sum(1).clamp(min=1)

    def encode_images(self, pixels):
        return (self.hf.image(pixels),)

    def decode_paired(self, features, text):
        (image,) = features
        scale, shift = self.hf.film(text.to(image.dtype)).chunk(2, dim=1)
        logits = self.hf.head(image * scale[..., None, None] + shift[..., None, None])
        return F.interpolate(logits, scale_factor=4, mode="bilinear", align_corners=False)[:, 0]


TOY = Architecture("toyseg", "ToySeg", __name__, "ToySeg",
                   dict(input_size=64, mean=CLIP_MEAN, std=CLIP_STD, threshold=0.5, text_tokens=77), paper_lr=1e-3,
                   input_multiple=4, sizes=("full", "tiny"))


def add():
    """Register the toy architecture (the test removes it again: the built-in table stays as shipped)."""
    return register(TOY)
