"""Model registry and loading: a registry name (downloaded once, cached, checksummed) or a folder.

A model folder is transformers' ``save_pretrained`` layout (``config.json``, safetensors
weights, tokenizer files) plus our ``medvlsm.json`` (input size, mean/std, threshold). Folders
without ``medvlsm.json`` (a plain hub snapshot) get the defaults of their architecture
(``architectures.py``: the one table of architectures).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path

from ..errors import Cancelled, ModelError
from ..resources import resource
from .architectures import ARCHITECTURES, Architecture, architecture, register
from .folder import check_folder, folder_spec
from .spec import SPEC_FILE, ModelSpec

__all__ = ["ARCHITECTURES", "Architecture", "ModelSpec", "architecture", "check_folder", "default_model_name",
           "fetch", "load_model", "reads_text", "register", "registry"]

log = logging.getLogger("medvlsm")

@functools.lru_cache(maxsize=1)
def _registry_json() -> dict:
    return json.loads(resource("models.json").read_text(encoding="utf-8"))


def registry() -> dict[str, ModelSpec]:
    """Registry name -> spec; an entry records only where it differs from its architecture's defaults."""
    return {m["name"]: architecture(m["arch"]).spec(**m) for m in _registry_json()["models"]}


def reads_text(name_or_path: str) -> bool:
    """Whether a registry model or model folder reads the prompt (False: an image-only baseline), without
    loading it; an unknown name or unreadable folder counts as reading text (loading it will say why)."""
    specs = registry()
    if name_or_path in specs:
        return architecture(specs[name_or_path].arch).reads_text
    try:
        return architecture(folder_spec(Path(name_or_path).expanduser()).arch).reads_text
    except ModelError:
        return True


def default_model_name() -> str:
    return _registry_json()["default"]


def _loading_problem(error: Exception) -> str:
    """The informative line of a transformers loading error (its first line may point at a report
    printed elsewhere: "look at the above report!")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if any("mismatch" in line.lower() or "shape" in line.lower() for line in lines):
        return "its weights do not have the sizes its config.json describes (weights of another model size or version)"
    first = lines[0] if lines else error.__class__.__name__
    return first.split(" For details")[0][:200]


def load_model(name_or_path: str | os.PathLike | None = None, device=None, *, allow_download: bool = True,
               progress=None, cancel=None):
    """A ready model in eval mode on ``device``. Raises ``ModelError`` with the fix on any failure;
    ``progress(done_bytes, total_bytes)`` and ``cancel()`` follow a first download (see ``fetch``)."""
    name_or_path = str(name_or_path or default_model_name())
    path = Path(name_or_path).expanduser()
    specs = registry()
    if name_or_path in specs:
        spec = specs[name_or_path]
        folder = fetch(spec, allow_download=allow_download, progress=progress, cancel=cancel)
        spec = folder_spec(folder, fallback=spec if not (folder / SPEC_FILE).is_file() else None)
    elif path.exists() or os.sep in name_or_path or name_or_path.startswith("."):
        folder = path.resolve()
        check_folder(folder)
        spec = folder_spec(folder)
    else:
        raise ModelError(f"Unknown model {name_or_path!r}",
                         f"Use a registry name ({', '.join(specs)}; see `medvlsm models`) or a model folder path")
    try:
        model = architecture(spec.arch).model_class().from_folder(folder, spec)
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


def _download_progress(progress, cancel):
    """A tqdm class for huggingface_hub's byte bars (hub >= 2: one update per downloaded chunk of
    ~10 MB): reports the bytes and raises ``Cancelled`` when ``cancel()`` says so, between chunks."""
    from tqdm.auto import tqdm

    class DownloadProgress(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.received = 0  # a disabled bar (no terminal) counts nothing itself

        def update(self, n=1):
            result = super().update(n)
            if self.unit == "B":
                self.received += n or 0
                if progress is not None and self.total:
                    progress(self.received, self.total)
            if cancel is not None and cancel():
                raise Cancelled("The model download was cancelled; nothing of it was kept")
            return result

    return DownloadProgress


def _remove_partial_downloads(repo: str) -> None:
    """What a cancelled or failed download leaves in the cache (``*.incomplete`` blobs)."""
    for partial in (Path(_hf_cache_dir()) / f"models--{repo.replace('/', '--')}" / "blobs").glob("*.incomplete"):
        partial.unlink(missing_ok=True)


def fetch(spec: ModelSpec, *, allow_download: bool = True, progress=None, cancel=None) -> Path:
    """The local snapshot folder of a registry model: from the HF cache, or downloaded once.

    A fresh download is checked against the SHA-256 the hub lists for each weights file;
    ``progress(done_bytes, total_bytes)`` follows it and ``cancel()`` stops it between chunks
    (``Cancelled``), leaving no partial file in the cache. ``HF_ENDPOINT`` is read at each call.
    """
    from huggingface_hub import snapshot_download

    repo = _hf_repo(spec)
    endpoint = os.environ.get("HF_ENDPOINT") or None
    patterns = spec.weights_files or None
    try:
        folder = Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=True))
        if list(folder.glob("*.safetensors")) or list(folder.glob("pytorch_model*.bin")):
            return folder
    except Exception:
        pass
    offline_hint = (
        f"On a machine with internet, run `medvlsm download {spec.name}` and copy its cache folder "
        f"({_hf_cache_dir()}) to this one; or pass a model folder with --model /path/to/folder; or try the "
        "pipeline with random weights: `medvlsm init --output my-model`, then --model my-model"
    )
    if not allow_download or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise ModelError(f"The weights of {spec.name} ({repo}) are not in the local cache and downloads are off",
                         offline_hint)
    log.info("Downloading %s from the Hugging Face hub (once; cached in %s)", repo, _hf_cache_dir())
    options = dict(endpoint=endpoint, cache_dir=_hf_cache_dir(), tqdm_class=_download_progress(progress, cancel))
    try:
        folder = Path(snapshot_download(repo, allow_patterns=patterns, **options))
        if not list(folder.glob("*.safetensors")):  # older repos: pickled weights, loaded weights_only
            folder = Path(snapshot_download(repo, allow_patterns=["pytorch_model.bin"], **options))
    except Cancelled:
        _remove_partial_downloads(repo)
        raise
    except Exception as e:
        _remove_partial_downloads(repo)
        raise ModelError(f"Cannot download {spec.name} from the Hugging Face hub ({repo}): no connection "
                         f"or the hub refused ({e.__class__.__name__})", offline_hint) from e
    verify_checksums(repo, folder, endpoint)
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


def verify_checksums(repo: str, folder: Path, endpoint: str | None = None) -> None:
    """Compare each downloaded LFS file with the SHA-256 the hub publishes; delete and fail on mismatch."""
    from huggingface_hub import HfApi

    info = HfApi(endpoint=endpoint).model_info(repo, files_metadata=True)
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
