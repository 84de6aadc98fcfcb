"""Original weights files, read without running code from them (no torch model classes here)."""

from __future__ import annotations

import pickle

import torch


def load_state_dict_file(path) -> dict:
    """safetensors, or a pickled checkpoint opened with ``weights_only=True`` (never arbitrary code)."""
    from pathlib import Path

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's message suggests turning the protection off: we do not
        from ..errors import ModelError

        raise ModelError(f"{path.name} holds Python objects besides tensors, which medvlsm does not unpickle (that "
                         "could run code from the file)", "Pass the weights as safetensors, or a plain state_dict "
                         "saved with torch.save(model.state_dict(), ...)") from e
    return state.get("state_dict", state) if isinstance(state, dict) else state
