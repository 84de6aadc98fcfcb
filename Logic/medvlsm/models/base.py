"""The one small interface every VLSM implements: encode text, encode images, decode.

The split is what makes prompt refinement instant: image features do not depend on the
text, so the engine caches them and a new prompt runs only ``decode``.
"""

from __future__ import annotations

import torch
import transformers

from ..errors import ModelError
from .spec import ModelSpec

# The lowest transformers the model code is tested with (``make test`` runs the model tests on it; the
# pinned one is newer): the code calls transformers' modules below their public forward.
TRANSFORMERS_MIN = (5, 18)


def check_transformers(version: str = transformers.__version__) -> None:
    found = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    if found < TRANSFORMERS_MIN or found[:1] > TRANSFORMERS_MIN[:1]:
        low = ".".join(map(str, TRANSFORMERS_MIN))
        raise ModelError(f"medvlsm's models need transformers >= {low} and < {TRANSFORMERS_MIN[0] + 1}, this Python "
                         f"has {version}", f"Run: pip install 'transformers>={low},<{TRANSFORMERS_MIN[0] + 1}'")


check_transformers()

def quiet_transformers() -> None:
    """No progress bars or info chatter from transformers: our CLI and panel report progress themselves."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


class VLSM(torch.nn.Module):
    """A text-promptable 2D segmentation model.

    Subclasses implement the three stages; shapes use B images, P prompts, S = input size.
    """

    spec: ModelSpec

    def __init__(self, hf_model, tokenizer, spec: ModelSpec):
        """``hf_model``: a transformers ``PreTrainedModel`` (its config + ``save_pretrained`` are the format)."""
        super().__init__()
        self.hf = hf_model
        self.tokenizer = tokenizer
        self.spec = spec

    hf_class: type  # the transformers ``PreTrainedModel`` this VLSM wraps (read by ``from_folder``)

    @classmethod
    def from_folder(cls, folder, spec: ModelSpec) -> "VLSM":
        """A model folder (``save_pretrained`` layout, local files only) -> the model in eval mode."""
        from transformers import AutoTokenizer

        from .architectures import architecture

        quiet_transformers()
        hf = cls.hf_class.from_pretrained(str(folder), local_files_only=True).eval()
        reads_text = architecture(spec.arch).reads_text
        return cls(hf, AutoTokenizer.from_pretrained(str(folder), local_files_only=True) if reads_text else None, spec)

    def prompt_warnings(self, prompts: list[str]) -> list[str]:
        """Sentences about how the model reads the prompts (the engine shows them): here, one per
        prompt longer than the text encoder reads."""
        full = self.tokenizer(list(prompts), padding=False, truncation=False)["input_ids"]
        return [f"Prompt {p[:60] + '...'!r} is {len(ids)} tokens long; {self.spec.name} reads at most "
                f"{self.spec.text_tokens}, the rest is ignored. Shorten the prompt."
                for p, ids in zip(prompts, full) if len(ids) > self.spec.text_tokens]

    def tokenize(self, prompts: list[str]) -> dict:
        """Token ids ``[P, L]`` and attention mask, truncated to ``spec.text_tokens``."""
        tok = self.tokenizer
        enc = tok(list(prompts), padding=True, truncation=True, max_length=self.spec.text_tokens, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids ``[P, L]`` -> text embeddings ``[P, D]``."""
        raise NotImplementedError

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> text embeddings ``[P, D]``."""
        tokens = self.tokenize(prompts)
        return self.encode_tokens(tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device))

    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Normalised images ``[B, 3, S, S]`` -> prompt-independent features, each ``[B, ...]``."""
        raise NotImplementedError

    def decode_paired(self, features: tuple[torch.Tensor, ...], text: torch.Tensor) -> torch.Tensor:
        """Features of N images and one text embedding each (``[N, D]``) -> logits ``[N, S, S]``."""
        raise NotImplementedError

    def decode(self, features: tuple[torch.Tensor, ...], text: torch.Tensor) -> torch.Tensor:
        """Features of B images and ``text [P, D]`` -> logits ``[B, P, S, S]`` (every image x every prompt)."""
        batch, prompts = features[0].shape[0], text.shape[0]
        paired = tuple(f[:, None].expand(batch, prompts, *f.shape[1:]).reshape(batch * prompts, *f.shape[1:])
                       for f in features)
        cond = text[None].expand(batch, prompts, text.shape[1]).reshape(batch * prompts, text.shape[1])
        logits = self.decode_paired(paired, cond)
        return logits.reshape(batch, prompts, *logits.shape[-2:])

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Training: image i with prompt i -> logits ``[B, S, S]`` (one module call, as DDP wants)."""
        return self.decode_paired(self.encode_images(pixels), self.encode_tokens(input_ids, attention_mask))

    def towers(self) -> dict:
        """``{"image": [modules], "text": [modules]}``: the pretrained encoders (what ``--freeze`` freezes)."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def save_pretrained(self, folder) -> None:
        """One checkpoint format: transformers' folder + tokenizer (if it reads text) + ``medvlsm.json``. Written into a
        temporary folder first, then renamed file by file into ``folder`` with ``medvlsm.json`` last
        (files 0644, readable by colleagues; an interrupted save leaves the earlier model intact)."""
        from ..atomic import atomic_files
        from .spec import SPEC_FILE

        with atomic_files(folder, last=SPEC_FILE) as tmp:
            self.hf.save_pretrained(str(tmp), safe_serialization=True)
            if self.tokenizer is not None:  # an image-only model has none
                self.tokenizer.save_pretrained(str(tmp))
            self.spec.save(tmp)
