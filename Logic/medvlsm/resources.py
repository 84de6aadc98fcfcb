"""Locate the project's ``Resources/`` folder (model registry, tokenizer, demo data).

Installed with pip, ``Resources/`` is the package ``medvlsm.resources`` (see setup.py).
Inside the Slicer extension it sits next to the module; ``MEDVLSM_RESOURCES`` overrides both.
"""

import os
from pathlib import Path


def resources_dir() -> Path:
    env = os.environ.get("MEDVLSM_RESOURCES")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve().parent
    candidates += [here / "resources", here.parents[1] / "Resources", here.parent / "Resources"]
    try:
        from importlib.resources import files

        candidates.insert(1 if env else 0, Path(str(files("medvlsm.resources"))))
    except (ImportError, ModuleNotFoundError, TypeError):
        pass
    for c in candidates:
        if (c / "models.json").is_file():
            return c
    raise FileNotFoundError(
        "medvlsm cannot find its Resources folder (models.json). Reinstall with `pip install -e .` "
        "from the project root or set MEDVLSM_RESOURCES to the Resources folder."
    )


def resource(*parts: str) -> Path:
    return resources_dir().joinpath(*parts)
