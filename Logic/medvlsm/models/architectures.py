"""The one table of architectures: everything medvlsm knows about a model family, in one entry.

The command line's choices, ``medvlsm init`` and ``convert``, the defaults of a model folder that
records no ``medvlsm.json``, the paper's learning rate, the benchmark and the tests all read this
table. Adding an architecture is one module (a ``VLSM`` subclass, see ``base.py``) and one
``register(Architecture(...))`` call (docs/models.md, "Adding an architecture").

No torch here: the table is read by fast commands and by Slicer before any model is needed; the
module of an architecture is imported on first use of its classes.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from ..errors import InputError, ModelError
from .spec import ModelSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Architecture:
    """One model family.

    Attributes:
        name: ``model_type`` of its ``config.json`` and ``--arch`` of ``medvlsm init``.
        title: how people call it (tables, messages).
        module: the module holding its ``VLSM`` subclass, its transformers config and model classes
            (registered with ``AutoConfig`` / ``AutoModel`` when imported) and its ``convert``.
        vlsm: the name of the ``VLSM`` subclass in ``module``.
        defaults: ``ModelSpec`` fields of its folders that record none (input size, mean/std,
            threshold, text tokens): the paper's settings.
        paper_lr: the paper's finetuning learning rate (``--recipe paper``), at ``paper_batch_size``.
        lr: the default recipe's learning rate at batch 16 (0: the paper's), measured by
            ``bench/finetune_recipe.py`` where it differs.
        input_multiple: the square input side must be a multiple of this (CRIS's FPN merges 1/8,
            1/16 and 1/32 scales: 32).
        sizes: the sizes its ``random(size)`` builds (``full`` = the paper's).
        converters: ``medvlsm convert --arch`` name -> (function of ``module`` taking ``sources,
            output, name``, what ``--from`` takes).
        reads_text: False for an image-only model (the paper's UNet baseline): its folder has no
            tokenizer, every prompt gives the same mask, and every surface says so.
    """

    name: str
    title: str
    module: str
    vlsm: str
    defaults: dict
    paper_lr: float
    lr: float = 0.0
    paper_batch_size: int = 16
    input_multiple: int = 1
    sizes: tuple = ("full", "small", "tiny")
    converters: dict = field(default_factory=dict)
    reads_text: bool = True

    def model_class(self):
        """The ``VLSM`` subclass (imports its module: torch and transformers)."""
        return getattr(importlib.import_module(self.module), self.vlsm)

    def random(self, size: str = "full", **options):
        """A model with random weights from the ``size`` config (tests, training from scratch)."""
        return self.model_class().random(size, **options)

    def convert(self, converter: str, sources, output, name: str):
        """Original weights (``sources``: paths) -> a model folder; returns the model."""
        function = getattr(importlib.import_module(self.module), self.converters[converter][0])
        return function(sources, output, name)

    def spec(self, **fields) -> ModelSpec:
        """A ``ModelSpec`` of this architecture: ``fields`` over the defaults."""
        return ModelSpec.from_dict({**self.defaults, **fields, "arch": self.name})

    def check_input_size(self, size: int) -> None:
        if size < self.input_multiple or size % self.input_multiple:
            raise InputError(f"{self.title} needs an input side divisible by {self.input_multiple}, not {size}",
                             f"Use e.g. {self.defaults['input_size']} (the paper's)")


ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Add ``arch`` to the table (built-ins below; a plug-in or a test adds its own the same way)."""
    ARCHITECTURES[arch.name] = arch
    return arch


def architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ModelError(f"Architecture {name!r} is not supported", f"Use one of: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def converters() -> dict[str, Architecture]:
    """``medvlsm convert --arch`` name -> its architecture."""
    return {converter: arch for arch in ARCHITECTURES.values() for converter in arch.converters}


register(Architecture(
    "clipseg", "CLIPSeg", "medvlsm.models.clipseg", "CLIPSeg",
    dict(input_size=352, mean=IMAGENET_MEAN, std=IMAGENET_STD, threshold=0.5, text_tokens=77), paper_lr=2e-3, lr=1e-3,
    paper_batch_size=128,
    converters={"clipseg": ("convert", "a CIDAS/clipseg-* snapshot folder or its files")}))
register(Architecture(
    "cris", "CRIS", "medvlsm.models.cris", "CRIS",
    dict(input_size=416, mean=CLIP_MEAN, std=CLIP_STD, threshold=0.35, text_tokens=77), paper_lr=2e-5,
    paper_batch_size=32,
    input_multiple=32, converters={"cris": ("convert", "a CRIS checkpoint (cris_best.pth) and/or OpenAI CLIP RN50 weights")}))
register(Architecture(
    "biomedclipseg", "BiomedCLIPSeg(-D)", "medvlsm.models.biomedclipseg", "BiomedCLIPSeg",
    dict(input_size=224, mean=CLIP_MEAN, std=CLIP_STD, threshold=0.5, text_tokens=256), paper_lr=2e-3, lr=1e-3,
    paper_batch_size=128,
    converters={"biomedclipseg": ("convert", "open_clip_pytorch_model.bin and vocab.txt (BiomedCLIP hub repo)"),
                "biomedclipseg-d": ("convert_d", "the same and model.safetensors of CIDAS/clipseg-rd64-refined "
                                    "(its decoder)")}))
register(Architecture(
    "unet", "UNet (image only)", "medvlsm.models.unet", "UNet",
    dict(input_size=352, mean=IMAGENET_MEAN, std=IMAGENET_STD, threshold=0.5, text_tokens=0), paper_lr=1e-3,
    input_multiple=16, reads_text=False))
