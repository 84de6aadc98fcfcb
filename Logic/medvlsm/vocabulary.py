"""Anatomy vocabulary (``Resources/Prompts/anatomy.json``): names radiologists type, their colours
and SNOMED CT codes, for segment colour/terminology and DICOM SEG."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

from .resources import resource

CATEGORIES = {"anatomy": ("123037004", "Anatomical Structure"), "altered": ("49755003", "Morphologically Altered Structure")}


@dataclass(frozen=True)
class Structure:
    name: str
    color: tuple  # 0..1
    category: str
    code: str
    meaning: str

    @property
    def category_code(self) -> tuple:
        return CATEGORIES[self.category]

    def slicer_terminology(self) -> str:
        """The string ``vtkSegment.SetTerminology`` takes (Slicer's serialised terminology entry)."""
        cat_code, cat_meaning = self.category_code
        return (f"Segmentation category and type - 3D Slicer General Anatomy list~SCT^{cat_code}^{cat_meaning}"
                f"~SCT^{self.code}^{self.meaning}~^^~Anatomic codes - DICOM master list~^^~^^")


@functools.lru_cache(maxsize=1)
def _table() -> dict:
    data = json.loads(resource("Prompts", "anatomy.json").read_text(encoding="utf-8"))
    table = {}
    for s in data["structures"]:
        entry = Structure(s["name"], tuple(c / 255 for c in s["color"]), s["category"], s["code"], s["meaning"])
        for key in [s["name"]] + s["synonyms"]:
            table[key.lower()] = entry
    return table


def names() -> list[str]:
    """Structure names for prompt completion."""
    return sorted({s.name for s in _table().values()})


def anatomy_names() -> list[str]:
    """Names of normal structures (organs), not of lesions: negative prompts for finetuning (``negatives.py``)."""
    return sorted({s.name for s in _table().values() if s.category == "anatomy"})


def lookup(prompt: str) -> Structure | None:
    """The structure a prompt names: the whole prompt, else its longest matching ending
    ("enlarged liver" -> liver, "one small round lung tumor" -> tumor)."""
    words = " ".join(str(prompt).lower().replace(",", " ").split()).split(" ")
    table = _table()
    for start in range(len(words)):
        candidate = " ".join(words[start:])
        if candidate in table:
            return table[candidate]
    return None
