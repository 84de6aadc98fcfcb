"""What a model needs to be fed: the registry entry / ``medvlsm.json`` of a model folder (no torch)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

SPEC_FILE = "medvlsm.json"


@dataclass
class ModelSpec:
    """What the engine needs to know to feed a model (one per registry entry / model folder).

    The input size, mean/std, threshold and text length have no defaults here: a spec is made by
    its architecture (``architectures.Architecture.spec``), which fills what a folder leaves out.
    """

    name: str
    arch: str
    input_size: int
    mean: tuple
    std: tuple
    threshold: float
    text_tokens: int
    source: str = ""
    licence: str = ""
    description: str = ""
    parameters_m: float = 0.0
    weights_files: list = field(default_factory=list)
    obtain: str = ""  # how to get weights that need converting (shown when the name cannot be loaded)
    trained: bool = True  # False for random weights (tests, `medvlsm init`): masks are meaningless
    resize: str = ""  # how training fitted slices to the input ("stretch" / "letterbox"); "" = not recorded

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def save(self, folder) -> None:
        data = {k: v for k, v in asdict(self).items() if k not in ("weights_files", "obtain")}
        Path(folder, SPEC_FILE).write_text(json.dumps(data, indent=2), encoding="utf-8")


