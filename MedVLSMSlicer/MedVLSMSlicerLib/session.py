"""The module's logic without Qt: settings, background runs, preview/apply/undo, export.

``MedVLSMSlicerLogic`` (the Slicer module) and the panel controller both drive a ``Session``;
tests drive it with the slicer-core scene. The model runs in a worker thread; everything that
touches MRML happens on the calling (GUI) thread in ``Job.finish`` / ``Session.collect``.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass, field, fields

import numpy as np

from medvlsm.errors import Cancelled, InputError, MedVLSMError
from medvlsm.request import ALL_PLANES, planes_cost

from . import mrml_glue as glue

SCOPES = ("whole volume", "current slice", "slice range")
# what the plane choosers show -> Settings.plane (and the request's plane)
PLANE_CHOICES = {"axial": "axial", "coronal": "coronal", "sagittal": "sagittal", "all three (slower)": "all"}


def plane_label(plane: str) -> str:
    return next(label for label, value in PLANE_CHOICES.items() if value == plane)
POLL_MS = 50  # GUI timer period while a job runs: the GUI answers within 50 ms
GUI_WAIT_S = 0.045  # of each period, the GUI thread waits on the worker (GIL released): 90 % for the model
_SHARED: dict = {}


@dataclass
class Settings:
    """Everything the panel lets the user choose; saved in the scene's parameter node."""

    model: str = ""
    prompts: list = field(default_factory=list)
    history: list = field(default_factory=list)
    plane: str = "axial"
    scope: str = "whole volume"
    slice_start: int = 0
    slice_stop: int = 0
    threshold: float = -1.0  # < 0: the model's own
    keep_largest: bool = False
    fill_holes: bool = False
    min_voxels: int = 0
    device: str = "auto"
    overwrite: bool = False  # replace the same-named segment instead of adding "liver (2)"
    modify_others: bool = False  # let Apply overwrite other segments (Segment Editor's overwrite mode)
    window: str = "auto"
    server: str = ""  # empty: this computer; else the URL of a `medvlsm serve` server
    server_token_file: str = ""  # a path: the token itself never goes into the scene

    def post(self):
        from medvlsm.postprocess import PostProcess

        return PostProcess(self.keep_largest, self.min_voxels, self.fill_holes)

    def request(self, volume, slices=None, cache_key=None):
        """The ``medvlsm.request.Request`` these settings ask for on ``volume`` (validated)."""
        from medvlsm.request import plan

        return plan(volume, self.prompts, plane=self.plane, slices=slices, window=self.window,
                    threshold=None if self.threshold < 0 else self.threshold, post=self.post(), cache_key=cache_key)

    def save(self, parameter_node) -> None:
        """Writes only what changed, in one Modified event (each keystroke saves the settings)."""
        wasModifying = parameter_node.StartModify()
        try:
            for f in fields(self):
                value = getattr(self, f.name)
                text = "\n".join(value) if isinstance(value, list) else str(value)
                if parameter_node.GetParameter(f.name) != text:
                    parameter_node.SetParameter(f.name, text)
        finally:
            parameter_node.EndModify(wasModifying)

    @classmethod
    def load(cls, parameter_node) -> "Settings":
        s = cls()
        for f in fields(cls):
            text = parameter_node.GetParameter(f.name)
            if not text and f.name not in ("prompts", "history"):
                continue
            default = getattr(s, f.name)
            if isinstance(default, list):
                value = [line for line in text.split("\n") if line] if text else []
            elif isinstance(default, bool):
                value = text == "True"
            else:
                value = type(default)(text)
            setattr(s, f.name, value)
        return s


class Job:
    """One model run on a worker thread. Poll ``done``; read ``progress`` and ``phase``; ``cancel()``
    anytime. ``note``: what the user should know while it runs (what all three planes cost), shown with
    the progress (``with_note``).

    Inside Slicer, PythonQt holds the GIL while Qt's event loop idles, so a Python worker thread runs
    only while the GUI thread executes Python. GUI timers therefore call ``wait_gui``: the GUI thread
    sleeps on the worker (releasing the GIL) for most of each tick and the worker runs at full speed.
    """

    def __init__(self, target, note: str = ""):
        self.progress = (0, 0)
        self.phase = "Starting..."
        self.note = note
        self.result = None
        self.error: Exception | None = None
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(target,), daemon=True)
        self.started = time.perf_counter()
        self._thread.start()

    def _run(self, target):
        try:
            self.result = target(self)
        except Exception as e:  # reported on the GUI thread, never raised there
            self.error = e

    def report(self, done, total):
        self.progress = (done, total)
        self.phase = self.with_note(f"Segmenting: {done}/{total} slices")

    def with_note(self, text: str) -> str:
        return f"{text} - {self.note}" if self.note else text

    def cancel(self):
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout=None):
        self._thread.join(timeout)
        return self.done

    def wait_gui(self, seconds: float = GUI_WAIT_S) -> bool:
        """Called from a GUI timer slot: give the worker the GIL for ``seconds`` (or until it ends)."""
        return self.wait(seconds)


def readable(error: Exception) -> str:
    """One line for the panel, whatever went wrong."""
    if isinstance(error, MedVLSMError):
        return str(error)
    name = error.__class__.__name__
    if "OutOfMemory" in name or "out of memory" in str(error).lower():
        return ("The GPU ran out of memory. Choose Device: CPU (slower but always fits), or close other GPU "
                "programs and run again.")
    first = str(error).splitlines()[0][:200] if str(error) else ""
    logging.getLogger("medvlsm").error("Unexpected %s", name, exc_info=(type(error), error, error.__traceback__))
    return f"Unexpected {name}: {first}. Details are in the Python console; please report them."


def shared_session(scene, model_loader=None, editor_history=None) -> "Session":
    """The one session of a scene: the panel, the Segment Editor effect and the module's logic share
    its engines (the model is loaded once), its volume copies and its preview."""
    key = id(scene)
    if key not in _SHARED or _SHARED[key].scene is not scene:
        _SHARED[key] = Session(scene, model_loader, editor_history=editor_history)
    return _SHARED[key]


class Session:
    """Engines (one per model and device, kept warm), the last result and the preview.

    The scene is the truth: the preview holds its nodes as objects, and a scene close or import
    drops it (``scene_changed``, observed here), so nothing the session does later can reach a node
    of the next patient through a reused ID. Apply saves its undo state in the user's Segment Editor
    history: ``editor_history()`` returns it (``mrml_glue.EditorHistory``; inside Slicer, over the
    Segment Editor module's widget); without one, the history of the scene's Segment Editor node.
    """

    def __init__(self, scene, model_loader=None, cache_bytes: int = 2 << 30, editor_history=None):
        self.scene = scene
        self._load_model = model_loader
        self.cache_bytes = cache_bytes
        self._engines = {}
        self._volume = (None, None)  # (cache key, Volume): the last volume node copied
        self.preview: glue.Preview | None = None
        self.last_result = None
        self.editor: glue.EditorSession | None = None
        self._editor_history = editor_history
        self._headless_history: glue.EditorHistory | None = None
        self._loading = threading.Lock()  # a prefetch and a Run may both ask for the model first
        session = weakref.ref(self)  # the scene must not keep the session alive (nor call a dead one)

        def changed(*_):
            if session() is not None:
                session().scene_changed()

        self._observers = [scene.AddObserver(event, changed) for event in (scene.EndCloseEvent, scene.EndImportEvent)]

    def scene_changed(self, *_) -> None:
        """After File > Close Scene or an import: the pending preview is dropped (its nodes removed if
        the scene still holds them), and with it the last result and the volume copy; the private
        editor node is re-created at the next Apply if the close removed it."""
        self.discard()
        self.last_result = None
        self._volume = (None, None)
        if self.editor is not None and not self.editor.alive:
            self.editor = None

    def close(self) -> None:
        """Stop observing the scene (the module's cleanup)."""
        for tag in self._observers:
            self.scene.RemoveObserver(tag)
        self._observers = []

    def history(self) -> "glue.EditorHistory":
        """The user's Segment Editor undo history (see the class docstring)."""
        if self._editor_history is not None:
            return self._editor_history()
        if self._headless_history is None:
            self._headless_history = glue.headless_editor_history(self.scene)
        return self._headless_history

    def engine(self, model: str, device: str, job: Job | None = None):
        from medvlsm.engine import Engine

        key = (model, device)
        with self._loading:
            if key not in self._engines:
                if job is not None:
                    job.phase = "Loading the model (the first use of a registry model downloads it)..."
                loader = self._load_model or self._downloading_loader(job)
                self._engines[key] = Engine(loader(model or None), device=device, cache_bytes=self.cache_bytes)
            return self._engines[key]

    @staticmethod
    def _downloading_loader(job: Job | None):
        """``load_model`` whose first download shows its megabytes in the job and stops at its Cancel."""
        from medvlsm.models import load_model

        if job is None:
            return load_model

        def progress(done, total):
            job.progress = (done, total)
            job.phase = f"Downloading the model (once): {done / 2**20:.0f} of {total / 2**20:.0f} MB"

        return lambda name: load_model(name, progress=progress, cancel=lambda: job.cancelled)

    def volume(self, volume_node):
        """The node's voxels as a ``Volume`` (a copy), copied once per content: re-prompts and
        prefetches of an unchanged node reuse it (keyed on node ID + modified times)."""
        key = self.cache_key(volume_node)
        if self._volume[0] != key:
            self._volume = (key, glue.volume_from_node(volume_node))
        return self._volume[1]

    @staticmethod
    def current_slice_range(volume, plane: str, current_slice: int | None):
        """The slice on screen (the middle one when no view shows this plane)."""
        from medvlsm.volume import SliceView

        index = SliceView(volume, plane).num_slices // 2 if current_slice is None else current_slice
        return index, index + 1

    @staticmethod
    def slice_range(settings: Settings, volume, current_slice: int | None):
        """The scope as a slice range of the plane (``None``: all); ``request.plan`` checks it."""
        from medvlsm.volume import SliceView

        if settings.plane == "all" and settings.scope != "whole volume":
            raise InputError(f"Scope '{settings.scope}' belongs to one plane; all three planes segment the whole "
                             "volume", "Choose Scope: whole volume, or one plane")
        if settings.scope == "current slice":
            return Session.current_slice_range(volume, settings.plane, current_slice)
        if settings.scope == "slice range":
            return settings.slice_start, settings.slice_stop or SliceView(volume, settings.plane).num_slices
        return None

    def start(self, volume_node, settings: Settings, current_slice: int | None = None) -> Job:
        """Validate on the GUI thread (fast, clear errors), then run the model in the background."""
        volume = self.volume(volume_node)
        slices = self.slice_range(settings, volume, current_slice)
        return self.run(volume, settings, slices, self.cache_key(volume_node))

    def run(self, volume, settings: Settings, slices=None, cache_key=None) -> Job:
        """Any ``Volume`` (a node's copy, the Segment Editor's source image): the request is planned
        here, on the calling thread (clear errors before any model work), then a worker loads the
        model if needed and runs it."""
        prompts = list(settings.prompts)
        if not prompts:
            raise InputError("No prompt", "Type what to segment, one structure per line")
        request = settings.request(volume, slices, cache_key)
        model, device = settings.model, settings.device
        note = f"all three planes: {planes_cost(volume)}" if request.plane == ALL_PLANES else ""
        if settings.server:
            return Job(self._remote_work(volume, request, settings), note)

        def work(job: Job):
            engine = self.engine(model, device, job)
            if job.cancelled:
                raise Cancelled()
            job.phase = "Segmenting..."
            return engine.segment(volume, request, progress=job.report, cancel=lambda: job.cancelled)

        return Job(work, note)

    @staticmethod
    def _remote_work(volume, request, settings: Settings):
        """The same run on a ``medvlsm serve`` server: the volume is uploaded once, then each run sends
        its request; the result comes back on the volume's grid (checked by the client)."""
        from medvlsm.client import Client, read_token

        client = Client(settings.server, read_token(settings.server_token_file))
        model = settings.model if settings.model and "/" not in settings.model and "\\" not in settings.model else None

        def work(job: Job):
            job.phase = f"Sending the volume to {settings.server}..."
            return client.segment(volume, request, model, progress=job.report, cancel=lambda: job.cancelled)

        return work

    @staticmethod
    def cache_key(volume_node):
        """Cheap identity of the volume's content and placement (node ID + modified times)."""
        transform = volume_node.GetParentTransformNode()
        image = volume_node.GetImageData()
        return (volume_node.GetID(), volume_node.GetMTime(), image and image.GetMTime(),
                transform and transform.GetMTime())

    def prefetch(self, volume_node, settings: Settings, current_slice: int | None = None) -> Job:
        """While the prompt is typed: load the model and encode the slice on screen in the background,
        so a current-slice Run of any prompt then runs the decoder only; with all three planes, every
        slice of each (paid while typing; skipped by the engine when it would not fit its cache). Errors stay in the job: Run reports them."""
        volume = self.volume(volume_node)
        slices = None if settings.plane == "all" else self.current_slice_range(volume, settings.plane, current_slice)
        key = self.cache_key(volume_node)

        def work(job: Job):
            engine = self.engine(settings.model, settings.device, job)
            engine.prefetch(volume, plane=settings.plane, window=settings.window, slices=slices, cache_key=key,
                            cancel=lambda: job.cancelled)

        return Job(work)

    def collect(self, job: Job, volume_node, settings: Settings):
        """On the GUI thread after ``job.done``: show the preview, or raise the job's error.
        A cancelled or failed run changes nothing in the scene."""
        if job.error is not None:
            raise job.error
        if job.result is None:
            raise Cancelled()
        if not self.scene.IsNodePresent(volume_node):
            raise InputError("The volume was closed while it was being segmented", "Load it again and Run")
        self.discard()
        self.last_result = job.result
        self.preview = glue.Preview(self.scene, volume_node, self.masks(settings), job.result.prompts)
        for p in settings.prompts:  # only prompts that gave a result enter the history
            if p in settings.history:
                settings.history.remove(p)
            settings.history.insert(0, p)
        del settings.history[30:]
        return self.preview

    def masks(self, settings: Settings, result=None) -> np.ndarray:
        """The masks at the settings' current threshold and clean-up (they change after the run)."""
        threshold = None if settings.threshold < 0 else settings.threshold
        return (result or self.last_result).masks(threshold, settings.post())

    def rethreshold(self, settings: Settings) -> None:
        """Instant: re-cut the last probabilities into the preview, no model run."""
        if self.preview is None or self.last_result is None or not self.preview.alive:
            return
        self.preview.set_masks(self.masks(settings))

    def discard(self) -> None:
        if self.preview is not None:
            self.preview.discard()
        self.preview = None

    def apply(self, target_node, settings: Settings):
        """Into ``target_node`` through the Segment Editor logic: the user's masking applies, other
        segments are untouched unless ``settings.modify_others``; undoable in the Segment Editor's
        history, like any edit."""
        if self.preview is None or not self.preview.alive:
            self.preview = None
            raise InputError("Nothing to apply", "Run first, then Apply the preview")
        if self.editor is None or not self.editor.alive:
            self.editor = glue.EditorSession(self.scene)
        self.editor.history = self.history()
        self.editor.follow_user_masking(target_node, settings.modify_others)
        ids = self.preview.apply(target_node, overwrite=settings.overwrite, editor=self.editor)
        self.preview = None
        return ids

    def undo(self) -> None:
        """The Segment Editor's Undo: the last edit of the segmentation, whichever tool made it."""
        self.history().undo()

    def redo(self) -> None:
        self.history().redo()
