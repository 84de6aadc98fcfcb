"""One segmentation request, validated once against its volume (numpy only, no torch).

``plan(volume, prompts, ...)`` checks everything a run needs before any model work — the volume,
the plane, the slice range, the window, the prompts — and returns a frozen ``Request``. The
command line, the Slicer session, the Segment Editor effect and evaluation build one; the engine
runs it (``Engine.segment(volume, request)``) without checking again; ``to_json`` / ``from_json``
carry it to a server.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .errors import InputError
from .postprocess import PostProcess
from .prompts import clean_prompt
from .volume import PLANES, SliceView, Volume, default_plane
from .window import IntensityWindow, choose_window

RESIZE_MODES = ("letterbox", "stretch")
ALL_PLANES = "all"  # each of the three planes, fused on the volume's grid
FUSIONS = ("mean", "max", "majority")


@dataclass(frozen=True)
class Request:
    """What to segment in one volume, and how.

    Attributes:
        volume: the caller's identity of the volume's content (Slicer: node ID + modified times);
            keys the engine's image-feature cache. Empty: the engine hashes the content if it caches.
        shape: ``[K, J, I]`` of the volume it was planned for.
        prompts: the cleaned prompts, one segment each.
        plane: axial / coronal / sagittal, or ``all``: each of them, the probabilities fused.
        slices: ``(start, stop)`` in display order of ``plane``; for ``all``, ``(0, the three planes'
            slices together)``.
        window: the intensity window chosen for the volume.
        resize: ``letterbox`` / ``stretch``; ``None``: as the model was trained (else letterbox).
        threshold: probability threshold; ``None``: the model's.
        post: 3D clean-up of the masks.
        warnings: what the user should know about the prompts.
        fusion: how ``all`` fuses the planes: ``mean`` / ``max`` of the probabilities, or ``majority``
            (the fraction of planes above the threshold, cut at one half).
    """

    volume: str
    shape: tuple
    prompts: tuple
    plane: str
    slices: tuple
    window: IntensityWindow
    resize: str | None = None
    threshold: float | None = None
    post: PostProcess = field(default_factory=PostProcess)
    warnings: tuple = ()
    fusion: str = "mean"

    def check(self, volume: Volume) -> None:
        """The request was planned for a volume of this shape (a server gets both over the wire)."""
        if tuple(volume.shape) != tuple(self.shape):
            raise InputError(f"The request was planned for a {self.shape} volume, not {volume.shape}",
                             "Plan the request for the volume it is run on")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Request":
        """The inverse of ``to_json``; a malformed request is an ``InputError`` naming the problem."""
        try:
            d = json.loads(text)
            d["window"] = IntensityWindow(**d["window"])
            d["post"] = PostProcess(**d["post"])
            for key in ("shape", "slices", "warnings"):
                d[key] = tuple(d[key])
            d["prompts"] = tuple(clean_prompt(p)[0] for p in d["prompts"])
            request = cls(**d)
        except (ValueError, TypeError, KeyError) as e:
            raise InputError(f"Malformed segmentation request ({e.__class__.__name__}: {e})",
                             "Send what Request.to_json writes") from e
        request._check_fields()
        return request

    def _check_fields(self) -> None:
        start, stop = self.slices
        if self.plane not in (*PLANES, ALL_PLANES) or not 0 <= start < stop or len(self.shape) != 3:
            raise InputError(f"Malformed segmentation request (plane {self.plane!r}, slices {self.slices}, "
                             f"shape {self.shape})", "Send what Request.to_json writes")
        if (self.resize not in (None, *RESIZE_MODES) or (self.threshold is not None and not 0 < self.threshold < 1)
                or self.fusion not in FUSIONS):
            raise InputError(f"Malformed segmentation request (resize {self.resize!r}, threshold {self.threshold}, "
                             f"fusion {self.fusion!r})", "Send what Request.to_json writes")


def plan(volume: Volume, prompts=(), *, plane: str | None = None, slices: tuple | None = None, window="auto",
         resize: str | None = None, threshold: float | None = None, post: PostProcess | None = None,
         cache_key=None, fusion: str = "mean") -> Request:
    """Validate a request before any model work; each problem is an ``InputError`` with its fix.

    ``prompts`` may be empty only for a prefetch (image features before any prompt is typed);
    ``window`` a name (see ``window.choose_window``) or an ``IntensityWindow`` already chosen;
    ``cache_key`` the caller's cheap identity of the volume's content (see ``Request.volume``).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    volume.validate()
    if plane is not None and plane not in (*PLANES, ALL_PLANES):
        raise InputError(f"Unknown plane {plane!r}", f"Use one of: {', '.join(PLANES)} or {ALL_PLANES}")
    if fusion not in FUSIONS:
        raise InputError(f"Unknown fusion {fusion!r}", f"Use one of: {', '.join(FUSIONS)}")
    if plane == ALL_PLANES:
        if slices is not None:
            raise InputError("A slice range belongs to one plane; all three planes segment the whole volume",
                             "Leave out the slice range, or choose one plane")
        start, stop = 0, sum(SliceView(volume, p).num_slices for p in PLANES)  # each plane must hold 2x2 pixels
    else:
        view = SliceView(volume, plane or default_plane(volume))
        plane = view.plane
        start, stop = slices if slices is not None else (0, view.num_slices)
        if not (0 <= start < stop <= view.num_slices):
            raise InputError(f"Slice range {start}:{stop} is outside the {view.num_slices} {view.plane} slices",
                             f"Choose START:STOP within 0:{view.num_slices}")
    if threshold is not None and not 0.0 < threshold < 1.0:
        raise InputError(f"Threshold {threshold} is not a probability", "Give a number between 0 and 1, e.g. 0.5")
    if resize not in (None, *RESIZE_MODES):
        raise InputError(f"Unknown resize mode {resize!r}", "Use letterbox (keeps the aspect ratio) or stretch (as the paper)")
    cleaned, warnings = [], []
    for prompt in prompts:
        text, problems = clean_prompt(prompt)
        cleaned.append(text)
        warnings += problems
    return Request(
        volume="" if cache_key is None else str(cache_key), shape=tuple(volume.shape),
        prompts=tuple(cleaned), plane=plane, slices=(int(start), int(stop)), fusion=fusion,
        window=choose_window(volume, window), resize=resize,
        threshold=threshold, post=post or PostProcess(), warnings=tuple(warnings))


def planes_cost(volume: Volume) -> str:
    """What all three planes cost against one plane: every slice costs the same model pass, so the
    ratio of slice counts — 3x for a cube, ~6x axial for a 512 x 512 x 200 CT."""
    counts = {p: SliceView(volume, p).num_slices for p in PLANES}
    one = default_plane(volume)
    total = sum(counts.values())
    return f"{' + '.join(f'{n} {p}' for p, n in counts.items())} slices, {total / counts[one]:.1f}x one {one} run"
