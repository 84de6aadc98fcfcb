"""The inference engine: one volume, several prompts, exact geometry, bounded memory.

Runs a ``request.Request`` (planned once by ``request.plan``) for the CLI, the Slicer module, the
Segment Editor effect and evaluation:

- slices of one anatomical plane (``SliceView``: no resampling) stream through the model in
  batches; only one batch of activations exists at a time;
- each prompt's text is encoded once; all prompts share one image-encoder pass per batch;
- optional image-feature cache (``cache_bytes``): a new prompt on a volume seen before runs the
  decoder only. Keys: the request's volume identity (Slicer: node ID + modified time) or the
  volume's content hash, plus plane, slice range, intensity window and letterbox;
- ``progress(done, total)`` after each batch; ``cancel()`` returning True stops before the next
  batch and raises ``Cancelled`` — nothing partial is returned.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import postprocess
from .errors import Cancelled, InputError
from .postprocess import LEVELS, quantise
from .models.base import VLSM
from .preprocess import Letterbox, to_model_input
from .request import ALL_PLANES, Request, plan
from .result import SegmentationResult
from .volume import PLANES, SliceView, Volume

log = logging.getLogger("medvlsm")

_TORCH_NATIVE = (np.dtype(np.uint8), np.dtype(np.int16), np.dtype(np.int32), np.dtype(np.float32))


def resolve_device(device: str | None = "auto") -> torch.device:
    """``auto`` -> cuda > mps > cpu. Asking for an absent accelerator is an error, not a fallback."""
    device = (device or "auto").lower()
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA GPU is available to PyTorch",
                         "Use --device cpu (or auto), or install a CUDA build of PyTorch")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("--device mps was asked for but Apple's Metal backend is not available", "Use --device cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise InputError(f"Unknown device {device!r}", "Use auto, cpu, cuda, cuda:N or mps") from e
    if resolved.type not in ("cpu", "cuda", "mps"):  # meta, xla ... hold no data or are not supported here
        raise InputError(f"Device {device!r} cannot run the model", "Use auto, cpu, cuda, cuda:N or mps")
    return resolved


def cpu_has_native_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """``auto``: bf16 on GPUs that support it and on CPUs with native bf16; fp32 otherwise."""
    precision = (precision or "auto").lower()
    if precision in ("fp32", "float32"):
        return torch.float32
    if precision in ("bf16", "bfloat16"):
        return torch.bfloat16
    if precision != "auto":
        raise InputError(f"Unknown precision {precision!r}", "Use auto, fp32 or bf16")
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


@dataclass
class _FeaturePlan:
    view: SliceView
    box: Letterbox
    key: tuple | None
    cached: list | None


class Engine:
    """Runs a ``VLSM`` over volumes. Thread-safe for one run at a time (the Slicer worker)."""

    TEXT_CACHE_ENTRIES = 1024  # encoded prompts kept (a server's clients send prompts for its lifetime)
    WARNINGS_KEPT = 256  # warnings already logged, not logged again

    def __init__(self, model: VLSM, device: str | torch.device | None = "auto", precision: str = "auto",
                 batch_size: int | None = None, cache_bytes: int = 0):
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.dtype = resolve_dtype(self.device, precision)
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size if batch_size is not None else (32 if self.device.type == "cuda" else 8)
        if self.batch_size < 1:
            raise InputError(f"Batch size {self.batch_size} must be at least 1", "Use --batch-size 1 or more")
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict = OrderedDict()
        self._text_cache: OrderedDict = OrderedDict()
        self._warned: OrderedDict = OrderedDict()
        self._lock = threading.Lock()  # one run at a time: a prefetch and a Run from the GUI may overlap

    # -- helpers -------------------------------------------------------------------------
    def _autocast(self):
        enabled = self.dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=enabled)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """``[P, D]``; remembered per prompt so re-running a prompt costs nothing."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        encoded = dict(zip(missing, self._encode_missing(missing)))
        for p in prompts:
            if p in self._text_cache:
                self._text_cache.move_to_end(p)
                encoded[p] = self._text_cache[p]
        self._text_cache.update((p, encoded[p]) for p in missing)
        while len(self._text_cache) > self.TEXT_CACHE_ENTRIES:
            self._text_cache.popitem(last=False)
        return torch.stack([encoded[p] for p in prompts])

    def _encode_missing(self, prompts: list[str]):
        if not prompts:
            return []
        with torch.inference_mode(), self._autocast():
            return list(self.model.encode_text(prompts))

    def clear_cache(self) -> None:
        self._cache.clear()

    def _cache_lookup(self, key):
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        return None

    def _cache_store(self, key, batches: list) -> None:
        size = sum(t.numel() * t.element_size() for feats in batches for t in feats)
        if size > self.cache_bytes:
            log.info("Image features (%.0f MB) exceed the cache budget (%.0f MB): not cached.",
                     size / 2**20, self.cache_bytes / 2**20)
            return
        self._cache[key] = batches
        while sum(t.numel() * t.element_size() for b in self._cache.values() for f in b for t in f) > self.cache_bytes:
            self._cache.popitem(last=False)

    # -- the run -------------------------------------------------------------------------
    def request(self, volume: Volume, request, **options) -> Request:
        """``request`` itself, checked against ``volume``; or prompts planned with ``options``
        (``request.plan``'s keywords), so ``segment(volume, ["liver"], plane="coronal")`` works."""
        if isinstance(request, Request):
            request.validate(volume)
            return request
        return plan(volume, request, **options)

    def _plan_features(self, volume, request: Request) -> _FeaturePlan:
        """Where the image features of a request come from: the slices, their preprocessing, the cache."""
        view = SliceView(volume, request.plane)
        resize = request.resize or self.model.spec.resize or "letterbox"  # as the model was trained, if recorded
        box = Letterbox.fit(view.rows, view.cols, view.pixel_spacing, self.model.spec.input_size, resize)
        key = None
        if self.cache_bytes > 0:
            identity = request.volume or volume.fingerprint()
            key = (identity, view.plane, *request.slices, request.window, box, id(self.model), self.dtype)
        cached = self._cache_lookup(key) if key is not None else None
        return _FeaturePlan(view, box, key, cached)

    def _features(self, volume, request: Request, fp: _FeaturePlan, cancel=None):
        """Yields ``(first, stop, features)`` per batch, cached or encoded; caches fresh ones at the end.
        Runs in the caller's inference-mode / autocast context."""
        spec = self.model.spec
        source = fp.view.view(volume.array)
        fresh = [] if (fp.key is not None and fp.cached is None) else None
        start, stop = request.slices
        for batch_index, s in enumerate(range(start, stop, self.batch_size)):
            if cancel is not None and cancel():
                raise Cancelled()
            e = min(s + self.batch_size, stop)
            if fp.cached is not None:
                features = tuple(f.to(self.device) for f in fp.cached[batch_index])
            else:
                raw = np.ascontiguousarray(source[s:e])
                if raw.dtype not in _TORCH_NATIVE:
                    raw = raw.astype(np.float32)
                pixels = to_model_input(torch.from_numpy(raw).to(self.device), request.window, fp.box, spec.mean,
                                        spec.std)
                features = self.model.encode_images(pixels)
                if fresh is not None:
                    fresh.append(features)
            yield s, e, features
            del features  # the caller frees its reference: no batch outlives its decoding
        if fresh is not None:
            self._cache_store(fp.key, fresh)

    def prefetch(self, volume: Volume, request=(), *, cancel: Callable[[], bool] | None = None, **options) -> None:
        """Encode and cache the image features of a request's slices before any prompt is known (the
        slice the radiologist is looking at, while they type): the next ``segment`` of them runs the
        decoder only. Needs a cache (``cache_bytes`` > 0). ``request``/``options``: as ``segment``; all
        three planes: every slice of each (a whole-volume run of them then decodes only). ``cancel()``
        returning True stops it before the next batch (``Cancelled``), nothing cached."""
        request = self.request(volume, request, **options)
        if request.plane == ALL_PLANES:
            parts = [dataclasses.replace(request, plane=p, slices=(0, SliceView(volume, p).num_slices)) for p in PLANES]
        else:
            parts = [request]
        slices = sum(part.slices[1] - part.slices[0] for part in parts)
        for part in parts:
            with self._lock:  # per plane: a Run may come in between
                fp = self._plan_features(volume, part)
                if fp.key is None or fp.cached is not None:
                    continue
                with torch.inference_mode(), self._autocast():
                    for first, stop, features in self._features(volume, part, fp, cancel):
                        needed = sum(t.numel() * t.element_size() for t in features) / (stop - first) * slices
                        if needed > self.cache_bytes:  # the run could not use it: encoding now would be waste
                            log.info("Not prefetched: the image features (%.0f MB) exceed the cache budget (%.0f MB).",
                                     needed / 2**20, self.cache_bytes / 2**20)
                            return

    def segment(self, volume: Volume, request, *, progress: Callable[[int, int], None] | None = None,
                cancel: Callable[[], bool] | None = None, **options) -> SegmentationResult:
        """Segment ``volume`` once per prompt of ``request``.

        Args:
            volume: the image; never modified.
            request: a ``Request`` planned for ``volume`` (``request.plan``), or the prompts, planned
                here with ``options``: ``plane``, ``slices``, ``window``, ``resize``, ``threshold``,
                ``post``, ``cache_key`` (see ``request.plan``).
            progress: ``progress(done, total)`` after each batch.
            cancel: returning True stops before the next batch with ``Cancelled``.

        Returns:
            ``SegmentationResult`` with probabilities ``[P, K, J, I]`` (zero outside the slices).
        """
        request = self.request(volume, request, **options)
        if not request.prompts:
            raise InputError("No prompt given", "Give at least one --prompt (\"\" is the paper's empty prompt p0)")
        with self._lock:
            return self._segment(volume, request, progress, cancel)

    def _segment(self, volume, request: Request, progress, cancel) -> SegmentationResult:
        start_time = time.perf_counter()
        spec = self.model.spec
        prompts = list(request.prompts)
        warnings = list(request.warnings) + self.model.prompt_warnings(prompts)
        text = self.encode_text(prompts)
        threshold = spec.threshold if request.threshold is None else request.threshold
        if request.plane == ALL_PLANES:
            probabilities, from_cache = self._fused(volume, request, text, threshold, (progress, cancel))
            threshold = 0.5 if request.fusion == "majority" else threshold  # two of three planes
        else:
            probabilities = np.zeros((len(prompts),) + volume.shape, np.uint8)
            from_cache = self._one_plane(volume, request, text, probabilities, progress, cancel)
        if not spec.trained:
            warnings.append(f"{spec.name} has random (untrained) weights: the masks show the pipeline, not anatomy.")
        for w in warnings:
            if w not in self._warned:  # once per engine: evaluation calls segment thousands of times
                self._warned[w] = None
                log.warning(w)
            while len(self._warned) > self.WARNINGS_KEPT:
                self._warned.popitem(last=False)
        return SegmentationResult(
            grid=volume, request=request, probabilities=probabilities, threshold=threshold, model_name=spec.name,
            trained=spec.trained, device=str(self.device), dtype=str(self.dtype).replace("torch.", ""),
            seconds=time.perf_counter() - start_time, warnings=warnings, from_cache=from_cache,
        )

    def _one_plane(self, volume, request: Request, text, out: np.ndarray, progress, cancel) -> bool:
        """The request's slices of its plane into ``out [P, K, J, I]``; True if every feature was cached."""
        fp = self._plan_features(volume, request)
        targets = [fp.view.view(out[p]) for p in range(len(out))]
        start, stop = request.slices
        with torch.inference_mode(), self._autocast():
            for s, e, features in self._features(volume, request, fp, cancel):
                logits = self.model.decode(features, text)
                probs = quantise(torch.sigmoid(fp.box.restore(logits).float())).cpu().numpy()
                del features, logits  # free this batch's activations before the next one is encoded
                for p in range(len(out)):
                    targets[p][s:e] = probs[:, p]
                if progress is not None:
                    progress(e - start, stop - start)
        return fp.cached is not None

    def _fused(self, volume, request: Request, text, threshold: float, callbacks) -> tuple[np.ndarray, bool]:
        """Each plane in turn (its own feature cache), fused on the volume's grid as ``request.fusion``
        says, into uint8 probabilities; two arrays of ``[P, K, J, I]`` at a time (the mean sums in uint16)."""
        progress, cancel = callbacks
        shape = (len(request.prompts),) + volume.shape
        fused = np.zeros(shape, np.uint16 if request.fusion == "mean" else np.uint8)
        plane_out = np.empty(shape, np.uint8)
        done, all_cached = 0, True
        for plane in PLANES:
            count = SliceView(volume, plane).num_slices
            report = None if progress is None else (lambda d, t, before=done: progress(before + d, request.slices[1]))
            plane_request = dataclasses.replace(request, plane=plane, slices=(0, count))
            all_cached &= self._one_plane(volume, plane_request, text, plane_out, report, cancel)
            if request.fusion == "max":
                np.maximum(fused, plane_out, out=fused)
            elif request.fusion == "majority":
                fused += postprocess.threshold(plane_out, threshold)
            else:
                fused += plane_out
            done += count
        if request.fusion == "majority":  # votes 0..3 -> 0, 85, 170, 255: the fraction of planes, x 255
            fused *= LEVELS // len(PLANES)
        elif request.fusion == "mean":  # rounded, in place: no float or second uint16 copy
            fused += len(PLANES) // 2
            fused //= len(PLANES)
            fused = fused.astype(np.uint8)
        return fused, all_cached
