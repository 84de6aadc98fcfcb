"""The prompt panel's controller: binds the .ui widgets to a ``Session``. No model or MRML logic here.

Runs inside Slicer (PythonQt) and under PySide6 offscreen in the tests; the differences live in
``qt_compat``. Dialogs (model folder, export path, "current slice") are injected callables so the
tests drive them without a desktop.
"""

from __future__ import annotations

import logging
from pathlib import Path

from medvlsm.errors import InputError
from medvlsm.prompts import Attributes, ladder, strings

from . import mrml_glue as glue
from . import qt_compat
from .session import PLANE_CHOICES, POLL_MS, SCOPES, Session, Settings, plane_label, readable

log = logging.getLogger("medvlsm")

NEW_SEGMENTATION = "(new segmentation)"
LOCAL_FOLDER = "Local folder..."


def ui_file() -> Path:
    from medvlsm.resources import resource

    return resource("UI", "MedVLSMSlicer.ui")


class PanelController:
    def __init__(self, root, scene, session: Session, parameter_node=None, *, ask_folder=None, ask_save_path=None,
                 current_slice=None, dicom_files=None, registry_names=None):
        self.root = root
        self.ui = qt_compat.children_by_name(root)
        self.scene = scene
        self.session = session
        self.parameter_node = parameter_node
        self.ask_folder = ask_folder or (lambda: None)
        self.ask_save_path = ask_save_path or (lambda fmt: None)
        self.current_slice = current_slice or (lambda volume_node, plane: None)
        self.dicom_files = dicom_files or (lambda volume_node: [])
        self.settings = Settings.load(parameter_node) if parameter_node is not None else Settings()
        self.job = None
        self.job_volume = None
        self.prefetch_job = None
        self._prefetched = None
        self._showing = False
        self._default_placeholder = None
        self.timer = qt_compat.timer(POLL_MS, self.poll)
        self._fill_models(registry_names)
        self.refresh_nodes()
        self._show_settings()
        self._connect()

    # ---- widgets <-> settings --------------------------------------------------------------
    def w(self, name):
        return self.ui[name]

    def _fill_models(self, names):
        if names is None:
            from medvlsm.models import registry

            names = list(registry())
        combo = self.w("modelCombo")
        combo.clear()
        for name in names:
            combo.addItem(name)
        combo.addItem(LOCAL_FOLDER)

    def add_model_folder(self, folder: str) -> None:
        combo = self.w("modelCombo")
        if combo.findText(folder) < 0:
            combo.insertItem(combo.property("count") - 1, folder)
        combo.setCurrentIndex(combo.findText(folder))

    def refresh_nodes(self) -> None:
        """Volumes and segmentations of the scene (previews excluded) into the two combos."""
        volumes, segmentations = self.w("volumeCombo"), self.w("segmentationCombo")
        keep_volume, keep_seg = volumes.property("currentText"), segmentations.property("currentText")
        volumes.clear()
        segmentations.clear()
        segmentations.addItem(NEW_SEGMENTATION, "")
        for n in range(self.scene.GetNumberOfNodes()):
            node = self.scene.GetNthNode(n)
            cls = node.GetClassName()
            if cls in ("vtkMRMLScalarVolumeNode", "vtkMRMLVectorVolumeNode"):
                volumes.addItem(node.GetName(), node.GetID())
            elif cls == "vtkMRMLSegmentationNode" and not node.GetAttribute(glue.PREVIEW_ATTRIBUTE):
                segmentations.addItem(node.GetName(), node.GetID())
        for combo, text in ((volumes, keep_volume), (segmentations, keep_seg)):
            if text and combo.findText(text) >= 0:
                combo.setCurrentIndex(combo.findText(text))

    def _text(self, name) -> str:
        return self.w(name).property("text")

    def _combo_text(self, name) -> str:
        return self.w(name).property("currentText")

    def _checked(self, name) -> bool:
        return bool(self.w(name).property("checked"))

    def _value(self, name):
        return self.w(name).property("value")

    def read_settings(self) -> Settings:
        s = self.settings
        if self._showing:  # widgets are being filled from the settings: they are half old, half new
            return s
        plain = self.w("promptsEdit").toPlainText()
        s.prompts = [line.strip() for line in plain.splitlines() if line.strip()]
        s.model = self._combo_text("modelCombo") if self._combo_text("modelCombo") != LOCAL_FOLDER else s.model
        s.plane = PLANE_CHOICES.get(self._combo_text("planeCombo"), "axial")
        s.scope = self._combo_text("scopeCombo")
        s.slice_start, s.slice_stop = int(self._value("sliceStartSpin")), int(self._value("sliceStopSpin"))
        s.keep_largest, s.fill_holes = self._checked("keepLargestCheck"), self._checked("fillHolesCheck")
        s.min_voxels = int(self._value("minSizeSpin"))
        s.device = self._combo_text("deviceCombo")
        s.server, s.server_token_file = self._text("serverEdit").strip(), self._text("tokenFileEdit").strip()
        s.overwrite = self._checked("overwriteCheck")
        s.modify_others = self._checked("modifyOthersCheck")
        if self.parameter_node is not None:
            s.save(self.parameter_node)
        return s

    def _show_settings(self) -> None:
        self._showing = True
        try:
            self._fill_widgets(self.settings)
        finally:
            self._showing = False

    def _fill_widgets(self, s: Settings) -> None:
        self.w("promptsEdit").setPlainText("\n".join(s.prompts))
        for combo, value in (("modelCombo", s.model), ("planeCombo", plane_label(s.plane)), ("scopeCombo", s.scope),
                             ("deviceCombo", s.device)):
            if value and self.w(combo).findText(value) >= 0:
                self.w(combo).setCurrentIndex(self.w(combo).findText(value))
        self.w("sliceStartSpin").setValue(s.slice_start)
        self.w("sliceStopSpin").setValue(s.slice_stop)
        self.w("minSizeSpin").setValue(s.min_voxels)
        self.w("serverEdit").setText(s.server)
        self.w("tokenFileEdit").setText(s.server_token_file)
        self.w("keepLargestCheck").setChecked(s.keep_largest)
        self.w("fillHolesCheck").setChecked(s.fill_holes)
        self.w("overwriteCheck").setChecked(s.overwrite)
        self.w("modifyOthersCheck").setChecked(s.modify_others)
        if s.threshold >= 0:
            self.w("thresholdSlider").setValue(int(round(s.threshold * 100)))
        self._show_history()
        self._scope_changed()

    def _show_history(self) -> None:
        history = self.w("historyList")
        history.clear()
        for p in self.settings.history:
            history.addItem(p)

    def _connect(self) -> None:
        self.w("promptsEdit").textChanged.connect(self.prefetch)
        self.w("runButton").clicked.connect(self.run_or_cancel)
        self.w("applyButton").clicked.connect(self.apply)
        self.w("discardButton").clicked.connect(self.discard)
        self.w("undoButton").clicked.connect(self.undo)
        self.w("exportButton").clicked.connect(self.export)
        # a drag re-cuts the whole volume's preview once, on release (each step would rewrite every
        # segment on the GUI thread); the label follows the drag
        self.w("thresholdSlider").setTracking(False)
        self.w("thresholdSlider").valueChanged.connect(self.threshold_changed)
        self.w("thresholdSlider").sliderMoved.connect(
            lambda value: self.w("thresholdValueLabel").setText(f"{value / 100.0:.2f}"))
        self.w("historyList").itemDoubleClicked.connect(lambda item: self.add_prompt(qt_compat.item_text(item)))
        self.w("ladderList").itemClicked.connect(lambda item: self.add_prompt(qt_compat.item_text(item).split(": ", 1)[1]))
        for name in ("classEdit", "shapeEdit", "colorEdit", "numberEdit", "locationEdit", "descriptionEdit"):
            self.w(name).textChanged.connect(self.build_ladder)
        self.w("sizeCombo").currentIndexChanged.connect(self.build_ladder)
        self.w("modelCombo").currentIndexChanged.connect(self.model_changed)
        self.w("deviceCombo").currentIndexChanged.connect(self.device_changed)
        self.w("scopeCombo").currentIndexChanged.connect(self._scope_changed)
        for name in ("keepLargestCheck", "fillHolesCheck"):
            self.w(name).toggled.connect(self.postprocess_changed)

    # ---- user actions ------------------------------------------------------------------------
    def status(self, text: str, error: bool = False) -> None:
        label = self.w("statusLabel")
        label.setText(text)
        label.setStyleSheet("color: #b00020;" if error else "")

    def add_prompt(self, prompt: str) -> None:
        current = self.w("promptsEdit").toPlainText().rstrip("\n")
        self.w("promptsEdit").setPlainText(f"{current}\n{prompt}" if current else prompt)

    def build_ladder(self, *_):
        cls = self._text("classEdit").strip()
        ladder_list = self.w("ladderList")
        ladder_list.clear()
        if not cls:
            return
        description = self._text("descriptionEdit").strip()
        attributes = Attributes(cls, self._text("shapeEdit").strip(), self._text("colorEdit").strip(),
                                self._combo_text("sizeCombo"), self._text("numberEdit").strip(),
                                self._text("locationEdit").strip(), [description] if description else [])
        prompts = ladder(attributes)
        seen = set()
        for ptype in prompts:
            for text in strings(prompts, ptype):
                if text and text not in seen:  # types whose attributes are blank repeat the previous one
                    seen.add(text)
                    ladder_list.addItem(f"{ptype}: {text}")

    def model_changed(self, *_):
        if self._combo_text("modelCombo") == LOCAL_FOLDER:
            folder = self.ask_folder()
            if folder:
                self.add_model_folder(str(folder))
            return  # adding the folder selected it: this slot ran again for it
        self._show_model_reads_text()

    def _show_model_reads_text(self) -> None:
        """An image-only model (the UNet baseline) ignores the prompt box: the box and the status say so."""
        from medvlsm.models import reads_text

        edit = self.w("promptsEdit")
        if self._default_placeholder is None:
            self._default_placeholder = edit.property("placeholderText")
        if reads_text(self._combo_text("modelCombo")):
            edit.setPlaceholderText(self._default_placeholder)
            return
        edit.setPlaceholderText(IMAGE_ONLY_NOTE)
        self.status(IMAGE_ONLY_NOTE)

    def device_changed(self, *_):
        self.w("deviceWarningLabel").setText(device_warning(self._combo_text("deviceCombo")))

    def _scope_changed(self, *_):
        ranged = self._combo_text("scopeCombo") == "slice range"
        self.w("sliceStartSpin").setEnabled(ranged)
        self.w("sliceStopSpin").setEnabled(ranged)

    def selected_node(self, combo_name):
        combo = self.w(combo_name)
        node_id = combo.itemData(combo.property("currentIndex"))
        return self.scene.GetNodeByID(node_id) if node_id else None

    def prefetch(self) -> None:
        """Typing a prompt encodes the slice on screen in the background (once per slice, model, plane)."""
        volume_node = self.selected_node("volumeCombo")
        if volume_node is None or self.running or (self.prefetch_job is not None and not self.prefetch_job.done):
            return
        settings = self.read_settings()
        if settings.server:  # the server encodes when the request arrives; nothing to prepare here
            return
        current = None if settings.plane == "all" else self.current_slice(volume_node, settings.plane)
        wanted = (Session.cache_key(volume_node), settings.model, settings.device, settings.plane, settings.window,
                  current)
        if wanted != self._prefetched:
            self._prefetched = wanted
            try:
                self.prefetch_job = self.session.prefetch(volume_node, settings, current)
            except Exception:  # an unusable volume: Run will say why
                self.prefetch_job = None
                return
            self.timer.start()  # under PythonQt the worker runs only while a timer slot waits on it

    @property
    def running(self) -> bool:
        return self.job is not None

    def run_or_cancel(self) -> None:
        if self.running:
            self.job.cancel()
            self.status("Cancelling after the current batch...")
            return
        settings = self.read_settings()
        volume_node = self.selected_node("volumeCombo")
        try:
            if volume_node is None:
                raise InputError("No input volume", "Load a volume (File > Add Data) and select it above")
            current = self.current_slice(volume_node, settings.plane) if settings.scope == "current slice" else None
            self.job = self.session.start(volume_node, settings, current)
        except Exception as e:
            self.status(readable(e), error=True)
            return
        self.job_volume = volume_node
        self.w("runButton").setText("Cancel")
        self.w("progressBar").setValue(0)
        self.status(self.job.with_note(f"Segmenting {', '.join(repr(p) for p in settings.prompts)}") + "...")
        self.timer.start()

    def reload_settings(self) -> None:
        """After a scene is loaded or closed: show the settings its parameter node holds. The session
        has dropped the preview of the scene that was (``Session.scene_changed``): so do the buttons."""
        if self.parameter_node is not None:
            self.settings = Settings.load(self.parameter_node)
        self.refresh_nodes()
        self._show_settings()
        if self.session.preview is None or not self.session.preview.alive:
            self._preview_done()
        self.w("undoButton").setEnabled(False)

    def poll(self) -> None:
        """The GUI timer's slot: gives the run (or, before any Run, the prefetch) the GIL for most of
        each tick; PythonQt holds it while Qt idles, so no worker thread advances otherwise."""
        job = self.job
        if job is None:
            prefetch = self.prefetch_job
            if prefetch is None or prefetch.wait_gui():
                self.timer.stop()
            return
        job.wait_gui()  # the worker runs while the GUI thread waits (PythonQt holds the GIL otherwise)
        done, total = job.progress
        if total:
            self.w("progressBar").setValue(int(100 * done / total))
        if not job.done:
            self.status(job.phase)
            return
        self.timer.stop()
        self.job = None
        self.w("runButton").setText("Run")
        try:
            self.session.collect(job, self.job_volume, self.settings)
        except Exception as e:
            self.status(readable(e), error=isinstance(e, Exception) and "cancelled" not in str(e).lower())
            return
        result = self.session.last_result
        self._show_history()
        self._set_threshold_slider(result)
        masks = self.session.preview.masks
        counts = ", ".join(f"{p or '(empty)'}: {int(m.sum())} voxels" for p, m in zip(result.prompts, masks))
        nothing = [p for p, m in zip(result.prompts, masks) if not m.any()]
        warnings = " ".join(result.warnings + ([nothing_found(nothing)] if nothing else []))
        cached = " (cached image features: decoder only)" if result.from_cache else ""
        self.status(f"Preview - {counts}. {result.seconds:.1f} s on {result.device}{cached}. "
                    f"Apply or Discard. {warnings}".strip())
        self.w("applyButton").setEnabled(True)
        self.w("discardButton").setEnabled(True)

    def _set_threshold_slider(self, result) -> None:
        slider = self.w("thresholdSlider")
        slider.blockSignals(True)
        threshold = result.threshold if self.settings.threshold < 0 else self.settings.threshold
        slider.setValue(int(round(threshold * 100)))
        self.w("thresholdValueLabel").setText(f"{threshold:.2f}")
        slider.blockSignals(False)

    def threshold_changed(self, value) -> None:
        self.settings.threshold = value / 100.0
        self.w("thresholdValueLabel").setText(f"{self.settings.threshold:.2f}")
        self.session.rethreshold(self.read_settings())

    def postprocess_changed(self, *_):
        self.session.rethreshold(self.read_settings())

    def _preview_done(self) -> None:
        self.w("applyButton").setEnabled(False)
        self.w("discardButton").setEnabled(False)

    def apply(self) -> None:
        settings = self.read_settings()
        target = self.selected_node("segmentationCombo")
        try:
            if target is None:
                target = glue.new_segmentation(self.scene, self.session.preview.volume_node)
            ids = self.session.apply(target, settings)
        except Exception as e:
            self.status(readable(e), error=True)
            return
        self.refresh_nodes()
        self.w("segmentationCombo").setCurrentIndex(self.w("segmentationCombo").findText(target.GetName()))
        self._preview_done()
        self.w("undoButton").setEnabled(True)
        self.status(f"Applied {len(ids)} segment(s) to {target.GetName()}. Undo reverts the last edit of the "
                    "segmentation, here or in the Segment Editor (one history).")

    def discard(self) -> None:
        self.session.discard()
        self._preview_done()
        self.status("Preview discarded.")

    def undo(self) -> None:
        """The Segment Editor's Undo: the last edit of the segmentation, whichever tool made it."""
        try:
            self.session.undo()
        except Exception as e:
            self.status(readable(e), error=True)
            return
        self.status("Undone: the last edit of the segmentation (Redo is in the Segment Editor).")

    def shutdown(self, wait_s: float = 5.0) -> None:
        """The module's cleanup (Slicer calls it when the module is unloaded or Slicer exits): the timer
        stops, a run and a prefetch are cancelled and given ``wait_s`` to end at their next batch, and
        the session stops observing the scene."""
        self.timer.stop()
        for job in (self.job, self.prefetch_job):
            if job is not None and not job.done:
                job.cancel()
                job.wait(wait_s)
        self.job = self.prefetch_job = None
        self.session.close()

    def export(self) -> None:
        fmt = self._combo_text("exportFormatCombo")
        segmentation, volume = self.selected_node("segmentationCombo"), self.selected_node("volumeCombo")
        try:
            if segmentation is None or volume is None:
                raise InputError("Nothing to export", "Apply a result to a segmentation and select it above")
            path = self.ask_save_path(fmt)
            if not path:
                return
            if fmt == "DICOM SEG":
                glue.export_dicom_seg(segmentation, volume, self.dicom_files(volume), path)
            else:
                glue.export(self.scene, segmentation, volume, path)
        except Exception as e:
            self.status(readable(e), error=True)
            return
        self.status(f"Exported {segmentation.GetName()} to {path}.")


IMAGE_ONLY_NOTE = ("This model is image-only (a UNet baseline): it ignores the text; any line here gives the same "
                   "mask, named after the line.")


def nothing_found(prompts) -> str:
    """The line for prompts whose preview is empty: the model did not recognise them in these slices."""
    names = ", ".join(repr(p) for p in prompts)
    return (f"Nothing found for {names}: the model does not recognise it in these slices (an empty preview, "
            "not a guess). Check the structure is in view, or rephrase the prompt.")


def device_warning(choice: str) -> str:
    """A one-line warning about the chosen device (empty when all is well)."""
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed yet: it is installed on first run (confirm when asked)."
    if choice in ("cuda", "auto") and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        if free < 3 << 30:
            return f"Only {free / 2**30:.1f} GB of GPU memory free: close other GPU programs or choose cpu."
        return ""
    if choice == "cuda":
        return "No CUDA GPU is available to PyTorch: runs will fail; choose auto or cpu."
    return "Runs on the CPU: a whole volume takes minutes; 'current slice' is quick." if choice == "auto" else ""


__all__ = ["IMAGE_ONLY_NOTE", "PanelController", "SCOPES", "ui_file", "device_warning", "nothing_found"]
