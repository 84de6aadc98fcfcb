"""The Teach section's controller: binds its widgets to ``teach.py``. No model or MRML logic here.

It sits beside the prompt panel's controller and reads from it what the two share: the model to start
from, the device, the plane and Compute. When teaching ends, the new model folder is added under Model
and selected, so the next Run uses it; the model before stays in the list.
"""

from __future__ import annotations

from pathlib import Path

from medvlsm.teaching import MODES, TeachSettings

from . import mrml_glue as glue
from . import qt_compat
from .session import POLL_MS, readable
from .teach import LearningCurve, folder_cases, scene_cases, teach, teach_on_server


UNTRAINED_BASE = (" It started from random weights (no pretrained ones here): the Dice shows what your labels "
                  "taught, not what a pretrained model would reach.")


class TeachController:
    def __init__(self, root, scene, panel, *, models_folder: str = "", show_chart=None):
        self.ui = qt_compat.children_by_name(root)
        self.scene, self.panel = scene, panel
        self.models_folder = models_folder
        self.show_chart = show_chart or (lambda chart_node: None)
        self.job = None
        self.curve = None
        self.folder = None  # the last taught model
        self._nodes = []  # the list's segmentation nodes, in its order (references, never IDs)
        self.timer = qt_compat.timer(POLL_MS, self.poll)
        combo = self.ui["teachModeCombo"]
        for text in MODES.values():
            combo.addItem(text)
        self.ui["teachButton"].clicked.connect(lambda *_: self.teach_or_cancel())
        self.refresh()

    @property
    def running(self) -> bool:
        return self.job is not None

    def refresh(self) -> None:
        """The scene's segmentations (previews excluded) into the list; ticks are kept by node."""
        ticked = set(map(id, self.checked_nodes()))
        widget = self.ui["teachCasesList"]
        widget.clear()
        self._nodes = [node for node in glue.nodes_of_class(self.scene, "vtkMRMLSegmentationNode")
                       if not node.GetAttribute(glue.PREVIEW_ATTRIBUTE)]
        for node in self._nodes:
            qt_compat.add_checkable_item(widget, node.GetName(), id(node) in ticked)

    def checked_nodes(self) -> list:
        widget = self.ui["teachCasesList"]
        return [node for row, node in enumerate(self._nodes)
                if row < widget.property("count") and qt_compat.item_checked(widget.item(row))]

    def settings(self) -> TeachSettings:
        shared = self.panel.settings
        mode = list(MODES)[max(0, self.ui["teachModeCombo"].property("currentIndex"))]
        return TeachSettings(mode=mode, epochs=int(self.ui["teachEpochsSpin"].property("value")),
                             plane="axial" if shared.plane == "all" else shared.plane,
                             labels="complete" if self.ui["teachCompleteCheck"].property("checked") else "partial",
                             device=shared.device)

    def start(self, cases, settings: TeachSettings):
        """Where the panel's Compute says: this computer, or the server (the client's own model there)."""
        shared = self.panel.settings
        if shared.server:
            from medvlsm.client import Client, read_token

            return teach_on_server(cases, shared.model, settings,
                                   Client(shared.server, read_token(shared.server_token_file)))
        return teach(cases, shared.model, settings, self.models_folder)

    def status(self, text: str) -> None:
        self.ui["teachStatusLabel"].setText(text)

    def teach_or_cancel(self) -> None:
        if self.running:
            self.job.cancel()
            self.status("Cancelling after the current step...")
            return
        try:
            self.panel.read_settings()
            settings = self.settings()
            folder = self.ui["teachFolderEdit"].property("text").strip()
            cases = scene_cases(self.checked_nodes(), allow_none=bool(folder))
            cases += folder_cases(folder) if folder else []
            self.job = self.start(cases, settings)
        except Exception as e:
            self.status(readable(e))
            return
        self.curve = LearningCurve(self.scene, Path(self.panel.settings.model.rstrip("/\\")).name)
        self.show_chart(self.curve.chart)
        self.ui["teachButton"].setText("Cancel")
        self.ui["teachProgressBar"].setValue(0)
        self.status(f"Teaching ({settings.mode}, along {settings.plane}) on {', '.join(c.name for c in cases)}...")
        self.timer.start()

    def poll(self) -> None:
        """The GUI timer's slot: the worker gets the GIL for most of each tick (see ``Job``)."""
        job = self.job
        if job is None:
            self.timer.stop()
            return
        job.wait_gui()
        done, total = job.progress
        if total:
            self.ui["teachProgressBar"].setValue(int(100 * done / total))
        if self.curve is not None and self.scene.IsNodePresent(self.curve.table):
            self.curve.update(list(job.curve))
        if not job.done:
            self.status(job.phase)
            return
        self.timer.stop()
        self.job = None
        self.ui["teachButton"].setText("Teach")
        if job.error is not None or job.cancelled:
            if self.curve is not None:
                self.curve.remove()  # a teach that did not finish leaves the scene as it was
            self.curve = None
            self.status("Teaching cancelled: no model was kept." if job.cancelled else readable(job.error))
            return
        self.folder, summary = job.result
        self.panel.add_model_folder(str(self.folder))
        self.panel.read_settings()
        self.ui["teachProgressBar"].setValue(100)
        where = " on the server (yours alone there)" if self.panel.settings.server else ""
        self.status(f"Taught {Path(str(self.folder)).name}{where}: held-out Dice {summary['best_val_dice']:.2f} (epoch "
                    f"{summary['best_epoch']} of {summary['epochs']}, {summary['train_samples']} training / "
                    f"{summary['val_samples']} held-out slices, {summary['seconds']:.0f} s). Selected under Model; "
                    f"the model before is one click away there.{UNTRAINED_BASE if job.base_untrained else ''}")

    def shutdown(self, wait_s: float = 5.0) -> None:
        self.timer.stop()
        if self.job is not None and not self.job.done:
            self.job.cancel()
            self.job.wait(wait_s)
        self.job = None
