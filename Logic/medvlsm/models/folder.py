"""A model folder on disk: is it complete, and what does it need to be fed (no torch)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ModelError
from .architectures import ARCHITECTURES, architecture
from .spec import SPEC_FILE, ModelSpec


def folder_spec(folder: Path, fallback: ModelSpec | None = None) -> ModelSpec:
    """The folder's ``medvlsm.json`` over its architecture's defaults; without one, ``fallback`` (the
    registry entry of a hub snapshot) or the defaults with the snapshot's own mean/std."""
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"Model folder {folder} has no readable config.json ({e.__class__.__name__})",
                         "Point --model at a folder written by save_pretrained / `medvlsm init` / `medvlsm finetune`") from e
    arch = config.get("model_type", "")
    if arch not in ARCHITECTURES:
        raise ModelError(f"Model folder {folder} holds a {arch or 'unknown'!r} model, not a supported VLSM",
                         f"Supported: {', '.join(ARCHITECTURES)}")
    if (folder / SPEC_FILE).is_file():
        try:
            recorded = json.loads((folder / SPEC_FILE).read_text(encoding="utf-8"))
            if not isinstance(recorded, dict):
                raise ValueError("not a JSON object")
            return architecture(arch).spec(**{"name": folder.name, **recorded})
        except (ValueError, TypeError) as e:
            raise ModelError(f"{folder / SPEC_FILE} is not a valid model description ({e})",
                             "Restore the file from the original model folder, or delete it to use the "
                             "architecture's defaults") from e
    if fallback is not None:
        return fallback
    spec = dict(name=folder.name, source=str(folder))
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        p = json.loads(pre.read_text(encoding="utf-8"))
        spec.update({k: tuple(p[src]) for k, src in (("mean", "image_mean"), ("std", "image_std")) if src in p})
    return architecture(arch).spec(**spec)


def _reads_text(folder: Path) -> bool:
    """Whether the folder's architecture needs a tokenizer (unknown: assume it does; ``folder_spec`` names it)."""
    try:
        arch = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type", "")
    except (OSError, ValueError, AttributeError):
        return True
    return arch not in ARCHITECTURES or ARCHITECTURES[arch].reads_text


def check_folder(folder: Path) -> None:
    """Name the first missing piece of a model folder, before transformers fails obscurely."""
    if not folder.is_dir():
        raise ModelError(f"Model folder {folder} does not exist", "Check the path given to --model")
    weights = list(folder.glob("*.safetensors")) + list(folder.glob("pytorch_model*.bin"))
    if not weights:
        raise ModelError(f"Model folder {folder} has no weights (model.safetensors)",
                         "Copy the complete folder, or recreate it with save_pretrained")
    if _reads_text(folder) and not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
        raise ModelError(f"Model folder {folder} has no tokenizer (tokenizer.json or vocab.json + merges.txt)",
                         "Copy the tokenizer files into the folder (tokenizer.save_pretrained)")
    for w in weights:
        if w.stat().st_size < 1024:
            raise ModelError(f"Weights file {w} is only {w.stat().st_size} bytes: an incomplete copy or a Git LFS pointer",
                             "Copy the real file (git lfs pull, or download it again)")


