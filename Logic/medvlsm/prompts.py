"""The paper's prompt ladders P0..P9, built from attributes, and attributes derived from masks.

Pure Python + numpy (no torch): ``medvlsm prompts`` starts instantly and the Slicer panel's
prompt builder uses the same functions.

Generic ladder (the reference annotation files of Kvasir, ClinicDB, BKAI, ColonDB, ETIS, ISIC,
DFU; rebuilt string-exact by the tests)::

    p0 ""                          p5 "{number} {size} {color} {shape} {class}"
    p1 "{class}"                   p6 p5 + ", located in {location} of the image"
    p2 "{shape} {class}"           p7 ["{class} which is {description}", ...]
    p3 "{color} {shape} {class}"   p8 [p5 + " which is {description}", ...]
    p4 "{size} {color} {shape} {class}"   p9 [p8 + " located in {location} of the image", ...]

Several objects: ``size`` lists the distinct sizes in ladder order ("small, medium") and
``location`` one cell per object ("top left, right"). No object: every prompt is "no {class}".
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field

import numpy as np

PROMPT_TYPES = tuple(f"p{i}" for i in range(10))
SIZES = ("tiny", "small", "medium", "large")
GRID = (("top left", "top", "top right"), ("left", "center", "right"), ("bottom left", "bottom", "bottom right"))

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_word(n: int) -> str:
    """0..99 as English words ("seventy-three"); larger numbers as digits."""
    n = int(n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    return str(n)


def _join(values) -> str:
    if isinstance(values, (list, tuple)):
        return ", ".join(str(v) for v in values if str(v))
    return str(values or "")


def _words(*parts) -> str:
    return " ".join(p for p in parts if p)


@dataclass
class Attributes:
    """What a prompt can say about the target. Lists are allowed where several objects differ."""

    cls: str
    shape: str = ""
    color: str = ""
    size: str | list = ""
    number: str | int = ""
    location: str | list = ""
    descriptions: list = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict) -> "Attributes":
        d = dict(d)
        if "class" in d:
            d["cls"] = d.pop("class")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown attribute(s) {sorted(unknown)}: use class, shape, color, size, number, "
                             "location, descriptions")
        return cls(**d)

    @property
    def absent(self) -> bool:
        return str(self.number).strip().lower() in ("0", "no", "zero")


def ladder(a: Attributes) -> dict:
    """The ten prompt types of the paper for one target (p7..p9 are lists, one per description)."""
    if a.absent:
        none = f"no {a.cls}"
        return {"p0": "", **{f"p{i}": none for i in range(1, 7)}, **{f"p{i}": [none] for i in range(7, 10)}}
    number = number_word(a.number) if isinstance(a.number, int) else str(a.number)
    size, location = _join(a.size), _join(a.location)
    p5 = _words(number, size, a.color, a.shape, a.cls)
    located = f"located in {location} of the image" if location else ""
    p8 = [f"{p5} which is {d}" for d in a.descriptions]
    return {
        "p0": "",
        "p1": a.cls,
        "p2": _words(a.shape, a.cls),
        "p3": _words(a.color, a.shape, a.cls),
        "p4": _words(size, a.color, a.shape, a.cls),
        "p5": p5,
        "p6": f"{p5}, {located}" if located else p5,
        "p7": [f"{a.cls} which is {d}" for d in a.descriptions],
        "p8": p8,
        "p9": [_words(p, located) for p in p8],
    }


def size_word(fraction: float) -> str:
    """The paper's size classes by area fraction of the image."""
    if fraction > 0.30:
        return "large"
    if fraction > 0.08:
        return "medium"
    if fraction < 0.001:
        return "tiny"
    return "small"


def geometry_attributes(mask: np.ndarray) -> dict:
    """``number``, ``size`` and ``location`` of a 2D binary mask ``[H, W]`` by the paper's rules.

    number: 4-connected components as a word; size: area fraction of the whole target; location:
    the 3x3 grid cell of each component's centroid, in label (raster) order.
    """
    from scipy import ndimage

    mask = np.asarray(mask) > 0
    if mask.ndim != 2:
        raise ValueError(f"geometry_attributes takes a 2D mask, got shape {mask.shape}")
    labels, count = ndimage.label(mask)
    if count == 0:
        return {"number": "no", "size": "", "location": ""}
    h, w = mask.shape
    centres = ndimage.center_of_mass(mask, labels, range(1, count + 1))
    cells = [GRID[min(2, int(3 * cy / h))][min(2, int(3 * cx / w))] for cy, cx in centres]
    return {"number": number_word(count), "size": size_word(mask.sum() / mask.size), "location": cells}


def parse_ladder(prompts: dict) -> Attributes:
    """Recover the attributes from a generic reference ladder (the inverse of ``ladder``)."""
    cls = prompts["p1"]
    if cls.startswith("no ") and prompts["p5"] == cls:
        return Attributes(cls=cls[3:], number="no")

    def head(longer: str, tail: str) -> str:
        if not longer.endswith(tail):
            raise ValueError(f"{longer!r} does not end with {tail!r}: not a generic ladder")
        return longer[: len(longer) - len(tail)].rstrip()

    shape = head(prompts["p2"], cls)
    color = head(prompts["p3"], prompts["p2"])
    size = head(prompts["p4"], prompts["p3"])
    number = head(prompts["p5"], prompts["p4"])
    location = prompts["p6"][len(prompts["p5"]) + len(", located in ") : -len(" of the image")]
    descriptions = [p[len(cls) + len(" which is ") :] for p in prompts.get("p7", [])]
    return Attributes(cls, shape, color, size, number, location, descriptions)


def clean_prompt(prompt: str) -> tuple[str, list[str]]:
    """Normalise whitespace/unicode; return the prompt and warnings to show the user."""
    warnings = []
    text = unicodedata.normalize("NFC", str(prompt))
    text = " ".join("".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in text).split())
    if not text:
        warnings.append("Empty prompt (the paper's p0): the model segments from the image alone, without text guidance.")
    elif not text.isascii():  # a cheap signal, not language detection: "Leber" passes, "Niere ä" does not
        warnings.append(f"Prompt {text!r} has characters outside English's alphabet: the text encoders were trained "
                        "on English, so results may be unreliable; an English prompt is safer.")
    return text, warnings


# ---- dataset-specific styles of the paper ------------------------------------------------------

def camus_ladder(structure: str, view: str, cycle: str, patient: tuple, quality: str, shape: str) -> dict:
    """CAMUS echocardiography (p0..p7), two phrasings per type as in the paper's annotations.

    structure e.g. "Left ventricular cavity"; view "two-chamber"/"four-chamber"; cycle
    "diastole"/"systole"; patient ``(age, sex)``, sex "male"/"female"; quality "good"/"medium"/"poor".
    """
    age, sex = patient
    out = {"p0": ""}
    for base in ("of the heart", "in the cardiac ultrasound"):
        viewed = f"{structure} in {view} view {base}"
        timed = f"{viewed} at end of the {cycle} cycle"
        person = f"{timed} of a {number_word(age)}-year-old {sex}"
        full = f"{person} with {quality} image quality"
        shaped = f"{structure} of {shape} shape in {view} view {base} at end of the {cycle} cycle of a " \
                 f"{number_word(age)}-year-old {sex} with {quality} image quality"
        steps = [f"{structure} {base}", viewed, timed, f"{timed} of a {sex}", person, full, shaped]
        for i, text in enumerate(steps, start=1):
            out.setdefault(f"p{i}", []).append(text + ".")
    return out


def busi_ladder(tumor_type: str = "", regular: bool | None = None, number: int = 1, size: str = "",
                location="", shape: str = "") -> dict:
    """BUSI breast ultrasound (p0..p6): by tumour type and by regularity; none -> "No tumor ..."."""
    tail = "in the breast ultrasound image."
    if number == 0:
        none = f"No tumor {tail}"
        return {"p0": "", **{f"p{i}": none for i in range(1, 7)}}
    noun = "tumors" if number > 1 else "tumor"
    count = number_word(number).capitalize()
    at = f"at the {_join(location)}" if location else ""
    reg = "regular" if regular else "irregular"
    out = {"p0": "", "p1": f"Tumor {tail}"}
    for kind, kind_shaped in ((tumor_type, f"{shape}-shaped {tumor_type}"), (f"{reg}-shaped", f"{shape}-shaped {reg}")):
        steps = [
            f"{kind.capitalize()} tumor {tail}",
            _words(count, kind, noun, tail),
            _words(count, size, kind, noun, tail),
            _words(count, size, kind, noun, at, tail),
            _words(count, size, kind_shaped, noun, at, tail),
        ]
        for i, text in enumerate(steps, start=2):
            out.setdefault(f"p{i}", []).append(text)
    return out


def chest_xray_ladder(finding: str, view: str = "", co_findings=(), location="") -> dict:
    """Chest X-ray (CheXlocalize-like) in the paper's spirit: finding, view, co-occurring findings,
    location. Our phrasing: the paper's exact chest X-ray strings are not published with the code."""
    base = f"{finding} in the {view + ' ' if view else ''}chest X-ray"
    with_co = f"{base} with {_join(co_findings)}" if co_findings else base
    located = f"{with_co} at the {_join(location)}" if location else with_co
    return {"p0": "", "p1": f"{finding} in the chest X-ray.", "p2": f"{base}.", "p3": f"{with_co}.",
            "p4": f"{located}."}


def strings(prompts: dict, prompt_type: str) -> list[str]:
    """All strings of one type (a type holds a string or a list)."""
    value = prompts[prompt_type]
    return list(value) if isinstance(value, (list, tuple)) else [value]
