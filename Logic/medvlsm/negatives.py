"""Negative prompts for finetuning: text that describes nothing in the image, trained to an empty mask.

Without them every training prompt describes its mask, and a model learns "segment the salient
region" whatever the text says (issue 24: "polyp" and "liver" masks agreeing on 96 % of pixels).
With them, a fraction ``ratio`` of each batch's images comes back a second time with a prompt for
something that is not there and an all-empty target. Where those prompts come from, in the order
they are trusted:

- **the structures reviewed as absent** on that slice: other segments of the same case (a volume's
  segmentation labels every segment on every slice, so a slice without the spleen is a reviewed
  "no spleen"); these may be near-synonyms of each other ("left kidney" / "right kidney") and still
  are negatives, because the radiologist drew them apart;
- **other names**: the classes of the other training samples and the organ names of the anatomy
  vocabulary, minus any that shares a word or a synonym with the sample's class or with another
  structure annotated on the same image (a lesion name such as "tumor" could describe any lesion,
  so only organs are used);
- **attribute negatives**, where the mask decides them: the prompt's "located in ... of the image"
  moved to a cell of the 3x3 grid that holds no pixel of the mask.

A negative keeps the prompt's form half the time (the class word replaced in "one small pink round
polyp" -> "one small pink round liver"), so the model cannot learn "long prompt = something".
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np

from .prompts import GRID

NEGATIVE_RATIO = 0.25  # default: measured in docs/finetune.md ("Text that matters")
_LOCATED = re.compile(r"located in .+? of the image")


def empty_cells(mask) -> tuple:
    """The cells of the paper's 3x3 location grid (``prompts.GRID`` names) holding no pixel of ``mask [H, W]``."""
    mask = np.asarray(mask) > 0
    h, w = mask.shape
    rows, cols = np.linspace(0, h, 4).astype(int), np.linspace(0, w, 4).astype(int)
    return tuple(GRID[r][c] for r in range(3) for c in range(3)
                 if not mask[rows[r]:rows[r + 1], cols[c]:cols[c + 1]].any())


def class_name(prompts: dict) -> str:
    """The sample's class: its p1 (``no X`` on an empty sample -> ``X``)."""
    p1 = prompts.get("p1", "")
    return p1[3:] if p1.startswith("no ") else p1


def related(name: str, cls: str) -> bool:
    """Could ``name`` describe ``cls``? A shared word ("kidney" / "left kidney") or the same vocabulary entry."""
    from .vocabulary import lookup

    if set(name.lower().split()) & set(cls.lower().split()):
        return True
    entry = lookup(name)
    return entry is not None and entry == lookup(cls)


@dataclass(frozen=True)
class NegativePrompts:
    """The negatives of one training set: ``names`` (other classes + organ vocabulary) and ``ratio``
    (negatives per image of a batch, drawn image by image)."""

    names: tuple
    ratio: float

    @classmethod
    def for_samples(cls, samples, ratio: float = NEGATIVE_RATIO) -> "NegativePrompts":
        from .vocabulary import anatomy_names

        classes = {class_name(s.prompts) for s in samples} - {""}
        return cls(tuple(sorted(classes | set(anatomy_names()))), ratio)

    def candidates(self, sample) -> tuple[list, list]:
        """(reviewed-absent names of the sample's case, other names that can describe neither its class
        nor another structure annotated on its image)."""
        cls = class_name(sample.prompts)
        reviewed = [n for n in sample.absent if n.lower() != cls.lower()]
        return reviewed, self._unrelated((cls, *sample.present))

    @functools.lru_cache(maxsize=1024)
    def _unrelated(self, there: tuple) -> list:
        """The names related to none of ``there`` (asked once per sample per epoch: kept, not recomputed)."""
        return [n for n in self.names if not any(related(n, t) for t in there)]

    def pick(self, sample, prompt: str, rng) -> str | None:
        """A prompt describing nothing in ``sample``'s image (``prompt``: the positive one drawn for it);
        None when there is none to give."""
        if sample.mask.any() and sample.empty_cells and _LOCATED.search(prompt) and rng.random() < 0.25:
            cell = rng.choice(sample.empty_cells)
            return _LOCATED.sub(f"located in {cell} of the image", prompt)
        reviewed, others = self.candidates(sample)
        pool = reviewed if reviewed and (not others or rng.random() < 0.5) else others
        if not pool:
            return None
        wrong = rng.choice(pool)
        cls = class_name(sample.prompts)
        if cls and cls in prompt and rng.random() < 0.5:
            return prompt.replace(cls, wrong)
        return wrong
