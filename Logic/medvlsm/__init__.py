"""medvlsm: text-prompted segmentation of medical images and volumes with vision-language models.

Python use (no Slicer, no Qt)::

    from medvlsm import read_image, load_model, Engine
    volume = read_image("ct.nii.gz")
    engine = Engine(load_model("clipseg-rd64-refined"))
    result = engine.segment(volume, ["liver", "spleen"], plane="axial")
    masks = result.masks()          # [P, K, J, I] on the volume's exact grid

Heavy modules (torch, transformers) load on first use, so ``import medvlsm`` is instant.
"""

__version__ = "0.1.0"

_LAZY = {
    "Volume": "volume", "SliceView": "volume", "read_image": "io", "write_labelmap": "io",
    "write_seg_nrrd": "io", "read_seg_nrrd": "io", "load_model": "models", "registry": "models",
    "Engine": "engine", "SegmentationResult": "engine", "PostProcess": "postprocess",
    "MedVLSMError": "errors", "InputError": "errors", "ModelError": "errors", "Cancelled": "errors",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'medvlsm' has no attribute {name!r}")


__all__ = sorted(_LAZY)
