"""One segmentation request, validated once against its volume (numpy only, no torch).

``plan(volume, prompts, ...)`` checks everything a run needs before any model work — the volume,
the plane, the slice range, the window, the prompts — and returns a frozen ``Request``. The
command line, the Slicer session, the Segment Editor effect and evaluation build one; the engine
runs it (``Engine.segment(volume, request)``) without checking again; ``to_json`` / ``from_json``
carry it to a server.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, field, fields

from .errors import InputError
from .postprocess import PostProcess
from .prompts import clean_prompt
from .volume import PLANES, SliceView, Volume, default_plane
from .window import IntensityWindow, choose_window

RESIZE_MODES = ("letterbox", "stretch")
ALL_PLANES = "all"  # each of the three planes, fused on the volume's grid
FUSIONS = ("mean", "max", "majority")
# Caps on what one request may carry, the same here and on a server (its OpenAPI schema says them):
MAX_PROMPTS = 64  # segments of one run; a labelmap holds them all
MAX_PROMPT_CHARS = 1000  # a bound on memory: the encoders read 77 tokens (~300 characters), the rest is cut with a warning
MAX_VOLUME_KEY_CHARS = 256  # Slicer's node ID + modified times, or a fingerprint
MAX_DESCRIBE_CHARS = 200


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

    def validate(self, volume: Volume) -> None:
        """Every field, its type and its range, against the volume it runs on: what ``plan`` built
        passes; what a server receives is checked by this same code. Each problem is one
        ``InputError`` line with its fix."""
        _check_types(self)
        if tuple(volume.shape) != tuple(self.shape):
            raise InputError(f"The request was planned for a {self.shape} volume, not {volume.shape}",
                             "Plan the request for the volume it is run on")
        _check_prompts(self.prompts)
        _check_options(self.plane, self.fusion, self.threshold, self.resize)
        start, stop = self.slices
        if self.plane == ALL_PLANES:
            total = all_planes_slice_count(volume)
            if (start, stop) != (0, total):
                raise InputError(f"All three planes segment slices 0:{total} of this volume, not {start}:{stop}",
                                 "Leave out the slice range, or choose one plane")
        else:
            count = SliceView(volume, self.plane).num_slices
            if not 0 <= start < stop <= count:
                raise InputError(f"Slice range {start}:{stop} is outside the {count} {self.plane} slices",
                                 f"Choose START:STOP within 0:{count}")
        low, high = self.window.low, self.window.high
        if not (math.isfinite(low) and math.isfinite(high) and high > low):
            raise InputError(f"Window {low:g} to {high:g} is not a finite range of positive width",
                             "Give LEVEL,WIDTH with a positive width, e.g. 40,400")
        if self.post.min_voxels > volume.array.size:
            raise InputError(f"min_voxels {self.post.min_voxels} exceeds the volume's {volume.array.size} voxels",
                             "Give a smaller minimum island size")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Request":
        """The inverse of ``to_json``: exactly its fields, of its types (no conversion: "0.5" is not a
        threshold). The prompts are cleaned again and their warnings derived from them, as ``plan``
        does. A malformed request is an ``InputError`` naming the problem; ``validate(volume)`` checks
        the values against the volume it runs on."""
        try:
            d = json.loads(text, parse_constant=_no_constant)
            if not isinstance(d, dict) or set(d) != FIELDS:
                raise ValueError(f"the fields must be {', '.join(sorted(FIELDS))}")
            window, post = d["window"], d["post"]
            if not isinstance(window, dict) or set(window) != {"low", "high", "describe"}:
                raise ValueError("window must be {low, high, describe}")
            if not isinstance(post, dict) or set(post) != {"keep_largest", "min_voxels", "fill_holes"}:
                raise ValueError("post must be {keep_largest, min_voxels, fill_holes}")
            for key in ("shape", "slices", "prompts"):
                if not isinstance(d[key], list):
                    raise ValueError(f"{key} must be a list")
            _check_prompts(d["prompts"])
            prompts = [clean_prompt(p) for p in d["prompts"]]
            request = cls(volume=d["volume"], shape=tuple(d["shape"]), prompts=tuple(t for t, _ in prompts),
                          plane=d["plane"], slices=tuple(d["slices"]), window=IntensityWindow(**window),
                          resize=d["resize"], threshold=d["threshold"], post=PostProcess(**post),
                          warnings=tuple(w for _, problems in prompts for w in problems), fusion=d["fusion"])
        except InputError:
            raise
        except (ValueError, TypeError) as e:
            raise InputError(f"Malformed segmentation request: {str(e)[:200]}", "Send what Request.to_json writes") from e
        _check_types(request)
        _check_options(request.plane, request.fusion, request.threshold, request.resize)
        return request


FIELDS = frozenset(f.name for f in fields(Request))


def _no_constant(name):
    raise ValueError(f"{name} is not a number JSON allows")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_types(request: Request) -> None:
    """The types of a request's fields, whoever built it (a server's JSON or a caller's Python)."""
    problems = []
    if not isinstance(request.volume, str) or len(request.volume) > MAX_VOLUME_KEY_CHARS:
        problems.append(f"volume must be a text of at most {MAX_VOLUME_KEY_CHARS} characters")
    if len(request.shape) != 3 or not all(_is_int(n) and n > 0 for n in request.shape):
        problems.append("shape must be three positive integers")
    if len(request.slices) != 2 or not all(_is_int(n) for n in request.slices):
        problems.append("slices must be two integers")
    if not isinstance(request.plane, str) or not isinstance(request.fusion, str):
        problems.append("plane and fusion must be texts")
    if not (request.resize is None or isinstance(request.resize, str)):
        problems.append("resize must be a text or null")
    if not (request.threshold is None or _is_real(request.threshold)):
        problems.append("threshold must be a number or null")
    window, post = request.window, request.post
    if not (isinstance(window, IntensityWindow) and _is_real(window.low) and _is_real(window.high)
            and isinstance(window.describe, str) and len(window.describe) <= MAX_DESCRIBE_CHARS):
        problems.append(f"window must be finite numbers low, high and a describe text of at most {MAX_DESCRIBE_CHARS}")
    if not (isinstance(post, PostProcess) and isinstance(post.keep_largest, bool) and isinstance(post.fill_holes, bool)
            and _is_int(post.min_voxels) and post.min_voxels >= 0):
        problems.append("post must be keep_largest and fill_holes true/false and min_voxels an integer >= 0")
    if problems:
        raise InputError(f"Malformed segmentation request: {problems[0]}", "Send what Request.to_json writes")


def _check_prompts(prompts) -> None:
    if len(prompts) > MAX_PROMPTS:
        raise InputError(f"{len(prompts)} prompts in one run; at most {MAX_PROMPTS} are segmented together",
                         "Split the prompts over several runs")
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise InputError("A prompt is not a text", "Send each prompt as a text")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InputError(f"A prompt of {len(prompt)} characters is longer than the {MAX_PROMPT_CHARS} accepted "
                             "(the text encoders read about 300 at most)", "Shorten the prompt")


def _check_options(plane, fusion, threshold, resize) -> None:
    if plane not in (*PLANES, ALL_PLANES):
        raise InputError(f"Unknown plane {str(plane)[:40]!r}", f"Use one of: {', '.join(PLANES)} or {ALL_PLANES}")
    if fusion not in FUSIONS:
        raise InputError(f"Unknown fusion {str(fusion)[:40]!r}", f"Use one of: {', '.join(FUSIONS)}")
    if threshold is not None and not 0.0 < threshold < 1.0:
        raise InputError(f"Threshold {threshold} is not a probability", "Give a number between 0 and 1, e.g. 0.5")
    if resize not in (None, *RESIZE_MODES):
        raise InputError(f"Unknown resize mode {str(resize)[:40]!r}",
                         "Use letterbox (keeps the aspect ratio) or stretch (as the paper)")


def plan(volume: Volume, prompts=(), *, plane: str | None = None, slices: tuple | None = None, window="auto",
         resize: str | None = None, threshold: float | None = None, post: PostProcess | None = None,
         cache_key=None, fusion: str = "mean") -> Request:
    """Validate a request before any model work; each problem is an ``InputError`` with its fix.

    ``prompts`` may be empty only for a prefetch (image features before any prompt is typed);
    ``window`` a name (see ``window.choose_window``) or an ``IntensityWindow`` already chosen;
    ``cache_key`` the caller's cheap identity of the volume's content (see ``Request.volume``).
    The request is checked by ``Request.validate``, the code a server runs on what it receives.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    volume.validate()
    _check_options(plane or default_plane(volume), fusion, threshold, resize)
    _check_prompts(prompts)
    if plane == ALL_PLANES:
        if slices is not None:
            raise InputError("A slice range belongs to one plane; all three planes segment the whole volume",
                             "Leave out the slice range, or choose one plane")
        start, stop = 0, all_planes_slice_count(volume)
    else:
        view = SliceView(volume, plane or default_plane(volume))
        plane = view.plane
        start, stop = slices if slices is not None else (0, view.num_slices)
    cleaned = [clean_prompt(prompt) for prompt in prompts]
    request = Request(
        volume="" if cache_key is None else str(cache_key), shape=tuple(int(n) for n in volume.shape),
        prompts=tuple(text for text, _ in cleaned), plane=plane, slices=(int(start), int(stop)), fusion=fusion,
        window=choose_window(volume, window), resize=resize, threshold=threshold, post=post or PostProcess(),
        warnings=tuple(w for _, problems in cleaned for w in problems))
    request.validate(volume)
    return request


def all_planes_slice_count(volume: Volume) -> int:
    """The slices of the three planes together: a request's range for ``all`` (each plane must hold
    2x2 pixels)."""
    return sum(SliceView(volume, p).num_slices for p in PLANES)


def planes_cost(volume: Volume) -> str:
    """What all three planes cost against one plane: every slice costs the same model pass, so the
    ratio of slice counts — 3x for a cube, ~6x axial for a 512 x 512 x 200 CT."""
    counts = {p: SliceView(volume, p).num_slices for p in PLANES}
    one = default_plane(volume)
    total = sum(counts.values())
    return f"{' + '.join(f'{n} {p}' for p, n in counts.items())} slices, {total / counts[one]:.1f}x one {one} run"
