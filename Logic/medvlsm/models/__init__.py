"""Model registry and loading: a registry name (downloaded once, cached, checksummed) or a folder.

A model folder is transformers' ``save_pretrained`` layout (``config.json``, safetensors
weights, tokenizer files) plus our ``medvlsm.json`` (input size, mean/std, threshold). Folders
without ``medvlsm.json`` (a plain hub snapshot) get the registry defaults of their architecture.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path

from ..errors import ModelError
from ..resources import resource
from .spec import SPEC_FILE, ModelSpec

log = logging.getLogger("medvlsm")

ARCHITECTURES = {"clipseg": "CLIPSegForImageSegmentation", "biomedclipseg": "BiomedCLIPSegModel", "cris": "CRISModel"}


@functools.lru_cache(maxsize=1)
def _registry_json() -> dict:
    return json.loads(resource("models.json").read_text(encoding="utf-8"))


def registry() -> dict[str, ModelSpec]:
    return {m["name"]: ModelSpec.from_dict(m) for m in _registry_json()["models"]}


def default_model_name() -> str:
    return _registry_json()["default"]


def _arch_defaults(arch: str) -> dict:
    for spec in registry().values():
        if spec.arch == arch:
            return {k: getattr(spec, k) for k in ("input_size", "mean", "std", "threshold", "text_tokens")}
    return {}


def _model_class(arch: str):
    if arch == "clipseg":
        from .clipseg import CLIPSeg

        return CLIPSeg
    if arch == "biomedclipseg":
        from .biomedclipseg import BiomedCLIPSeg

        return BiomedCLIPSeg
    if arch == "cris":
        from .cris import CRIS

        return CRIS
    raise ModelError(f"Architecture {arch!r} is not supported", f"Use one of: {', '.join(ARCHITECTURES)}")


def _folder_spec(folder: Path, fallback: ModelSpec | None = None) -> ModelSpec:
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
            return ModelSpec.from_dict({"arch": arch, "name": folder.name, **recorded})
        except (ValueError, TypeError) as e:
            raise ModelError(f"{folder / SPEC_FILE} is not a valid model description ({e})",
                             "Restore the file from the original model folder, or delete it to use the "
                             "architecture's defaults") from e
    if fallback is not None:
        return fallback
    spec = dict(_arch_defaults(arch), name=folder.name, arch=arch, source=str(folder))
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        p = json.loads(pre.read_text(encoding="utf-8"))
        spec.update({k: tuple(p[src]) for k, src in (("mean", "image_mean"), ("std", "image_std")) if src in p})
    return ModelSpec.from_dict(spec)


def check_folder(folder: Path) -> None:
    """Name the first missing piece of a model folder, before transformers fails obscurely."""
    if not folder.is_dir():
        raise ModelError(f"Model folder {folder} does not exist", "Check the path given to --model")
    weights = list(folder.glob("*.safetensors")) + list(folder.glob("pytorch_model*.bin"))
    if not weights:
        raise ModelError(f"Model folder {folder} has no weights (model.safetensors)",
                         "Copy the complete folder, or recreate it with save_pretrained")
    if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
        raise ModelError(f"Model folder {folder} has no tokenizer (tokenizer.json or vocab.json + merges.txt)",
                         "Copy the tokenizer files into the folder (tokenizer.save_pretrained)")
    for w in weights:
        if w.stat().st_size < 1024:
            raise ModelError(f"Weights file {w} is only {w.stat().st_size} bytes: an incomplete copy or a Git LFS pointer",
                             "Copy the real file (git lfs pull, or download it again)")


def _loading_problem(error: Exception) -> str:
    """The informative line of a transformers loading error (its first line may point at a report
    printed elsewhere: "look at the above report!")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if any("mismatch" in line.lower() or "shape" in line.lower() for line in lines):
        return "its weights do not have the sizes its config.json describes (weights of another model size or version)"
    first = lines[0] if lines else error.__class__.__name__
    return first.split(" For details")[0][:200]


def load_model(name_or_path: str | os.PathLike | None = None, device=None, *, allow_download: bool = True):
    """A ready model in eval mode on ``device``. Raises ``ModelError`` with the fix on any failure."""
    name_or_path = str(name_or_path or default_model_name())
    path = Path(name_or_path).expanduser()
    specs = registry()
    if name_or_path in specs:
        spec = specs[name_or_path]
        folder = fetch(spec, allow_download=allow_download)
        spec = _folder_spec(folder, fallback=spec if not (folder / SPEC_FILE).is_file() else None)
    elif path.exists() or os.sep in name_or_path or name_or_path.startswith("."):
        folder = path.resolve()
        check_folder(folder)
        spec = _folder_spec(folder)
    else:
        raise ModelError(f"Unknown model {name_or_path!r}",
                         f"Use a registry name ({', '.join(specs)}; see `medvlsm models`) or a model folder path")
    try:
        model = _model_class(spec.arch).from_folder(folder, spec)
    except ModelError:
        raise
    except Exception as e:  # transformers raises many types for damaged folders
        raise ModelError(f"Cannot load the model in {folder}: {_loading_problem(e)}",
                         "The folder is damaged or from an incompatible version; download or export it again") from e
    return model.to(device) if device is not None else model


# ---- download, cache, checksum ---------------------------------------------------------------

def _hf_repo(spec: ModelSpec) -> str:
    if not spec.source.startswith("hf:"):
        raise ModelError(f"{spec.name}'s weights come in another format and must be converted once",
                         spec.obtain or "Pass a converted model folder with --model")
    return spec.source[3:]


def fetch(spec: ModelSpec, *, allow_download: bool = True) -> Path:
    """The local snapshot folder of a registry model: from the HF cache, or downloaded once.

    A fresh download is checked against the SHA-256 the hub lists for each weights file.
    """
    from huggingface_hub import snapshot_download

    repo = _hf_repo(spec)
    patterns = spec.weights_files or None
    try:
        folder = Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=True))
        if list(folder.glob("*.safetensors")) or list(folder.glob("pytorch_model*.bin")):
            return folder
    except Exception:
        pass
    offline_hint = (
        f"Download it once on a connected machine (`medvlsm download {spec.name}`, cache: "
        f"{_hf_cache_dir()}) or pass a local model folder with --model /path/to/folder"
    )
    if not allow_download or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise ModelError(f"The weights of {spec.name} ({repo}) are not in the local cache and downloads are off",
                         offline_hint)
    log.info("Downloading %s from the Hugging Face hub (once; cached in %s)", repo, _hf_cache_dir())
    try:
        folder = Path(snapshot_download(repo, allow_patterns=patterns))
        if not list(folder.glob("*.safetensors")):  # older repos: pickled weights, loaded weights_only
            folder = Path(snapshot_download(repo, allow_patterns=["pytorch_model.bin"]))
    except Exception as e:
        raise ModelError(f"Cannot download {spec.name} from the Hugging Face hub ({repo}): no connection "
                         f"or the hub refused ({e.__class__.__name__})", offline_hint) from e
    verify_checksums(repo, folder)
    return folder


def _hf_cache_dir() -> str:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        return str(HF_HUB_CACHE)
    except ImportError:
        return "~/.cache/huggingface/hub"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checksums(repo: str, folder: Path) -> None:
    """Compare each downloaded LFS file with the SHA-256 the hub publishes; delete and fail on mismatch."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo, files_metadata=True)
    for sibling in info.siblings or []:
        lfs = getattr(sibling, "lfs", None)
        local = folder / sibling.rfilename
        if lfs is None or not local.is_file():
            continue
        expected = lfs["sha256"] if isinstance(lfs, dict) else lfs.sha256
        actual = sha256(local)
        if actual != expected:
            local.unlink()
            raise ModelError(f"Checksum mismatch for {repo}/{sibling.rfilename} (got {actual[:12]}, expected {expected[:12]})",
                             "The download was corrupted or intercepted by a proxy; run the command again")
