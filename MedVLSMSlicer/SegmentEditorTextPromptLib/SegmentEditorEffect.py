"""Segment Editor effect "Text prompt": fill the selected segment from a typed description.

Slicer loads this file as a Python module named after its folder (``SegmentEditorTextPromptLib``,
qSlicerSegmentEditorScriptedEffect::setPythonSource), so the folder holds this file alone and
nothing imports from it; the work is ``MedVLSMSlicerLib.effect_run.TextPromptRun``.

Writes through ``modifySegmentByLabelmap`` after ``saveStateForUndo``: the editor's masking
(editable area, intensity range), overwrite rules and Undo behave as for Threshold or Paint. The
model, device and window are the MedVLSM panel's; the model runs in the background (progress,
Cancel) and loads there on first use.

Widgets are driven through calls both PythonQt and PySide6 offer (``setText``, ``property``,
``signal.connect``), so the test harness runs this file unchanged.
"""

import sys

import qt
import slicer
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    def __init__(self, scriptedEffect):
        scriptedEffect.name = "Text prompt"
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.run = None
        self.timer = None

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        cloned = effects.qSlicerSegmentEditorScriptedEffect(None)
        cloned.setPythonSource(__file__.replace("\\", "/"))
        return cloned

    def icon(self):
        from medvlsm.resources import resource

        path = resource("Icons", "MedVLSMSlicer.png")
        return qt.QIcon(str(path)) if path.exists() else qt.QIcon()

    def helpText(self):
        return ("<html>Type what the selected segment is (e.g. <i>liver</i>, <i>left kidney</i>) and press "
                "<b>Segment</b>. A vision-language model segments it slice by slice in the background, with the "
                "model and device chosen in the MedVLSM module; masking and overwrite settings apply; Undo "
                "reverts. The threshold re-cuts the last result instantly (each change is undoable).</html>")

    def setupOptionsFrame(self):
        from MedVLSMSlicerLib.session import PLANE_CHOICES, POLL_MS

        self.promptEdit = qt.QLineEdit()
        self.promptEdit.setPlaceholderText("what to segment (default: the segment's name)")
        self.scriptedEffect.addLabeledOptionsWidget("Prompt:", self.promptEdit)
        self.planeCombo = qt.QComboBox()
        for label in PLANE_CHOICES:  # "all three (slower)": each plane, fused
            self.planeCombo.addItem(label)
        self.scriptedEffect.addLabeledOptionsWidget("Plane:", self.planeCombo)
        self.thresholdSlider = qt.QSlider(qt.Qt.Horizontal)
        self.thresholdSlider.setRange(1, 99)
        self.thresholdSlider.setValue(50)
        self.thresholdSlider.setTracking(False)  # one re-cut (and one undo state) per release, not per pixel
        self.thresholdSlider.valueChanged.connect(self.onThresholdChanged)
        self.scriptedEffect.addLabeledOptionsWidget("Threshold:", self.thresholdSlider)
        self.runButton = qt.QPushButton("Segment")
        self.runButton.clicked.connect(self.onRunOrCancel)
        self.progressBar = qt.QProgressBar()
        row = qt.QHBoxLayout()
        row.addWidget(self.runButton)
        row.addWidget(self.progressBar)
        self.scriptedEffect.addOptionsWidget(row)
        self.statusLabel = qt.QLabel()
        self.statusLabel.setWordWrap(True)
        self.scriptedEffect.addOptionsWidget(self.statusLabel)
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.timeout.connect(self.onPoll)

    def activate(self):
        if not self.promptEdit.property("text"):
            self.promptEdit.setText(self._selected_segment_name())

    def deactivate(self):
        if self.run is not None and self.run.result is None:
            self.run.job.cancel()

    def _selected_segment_name(self):
        node = self.scriptedEffect.parameterSetNode()
        segmentation, segment_id = node.GetSegmentationNode(), node.GetSelectedSegmentID()
        segment = segmentation.GetSegmentation().GetSegment(segment_id) if segmentation and segment_id else None
        return segment.GetName() if segment is not None else ""

    def onRunOrCancel(self):
        from MedVLSMSlicerLib.effect_run import TextPromptRun
        from MedVLSMSlicerLib.session import PLANE_CHOICES, readable, shared_session

        if self.run is not None and self.run.result is None and not self.run.job.done:
            self.run.job.cancel()
            self.statusLabel.setText("Cancelling after the current batch...")
            return
        module = sys.modules.get("MedVLSMSlicer")  # the module file, as Slicer's loader names it
        if module is not None and not module.ensure_requirements():  # the panel's set-up, offered here too
            self.statusLabel.setText("MedVLSM's Python packages are not ready (see the message); once they are, "
                                     "press Segment again.")
            return
        node = self.scriptedEffect.parameterSetNode()
        prompt = self.promptEdit.property("text").strip() or self._selected_segment_name()
        try:
            self.run = TextPromptRun(
                shared_session(slicer.mrmlScene), self.scriptedEffect.sourceVolumeImageData(),
                node.GetSegmentationNode(), node.GetSelectedSegmentID(), prompt,
                PLANE_CHOICES[self.planeCombo.property("currentText")],
                save_state_for_undo=self.scriptedEffect.saveStateForUndo, modify=self._modify)
        except Exception as e:
            self.run = None
            self.statusLabel.setText(readable(e))
            return
        self.runButton.setText("Cancel")
        self.progressBar.setValue(0)
        self.statusLabel.setText(self.run.job.with_note(f"Segmenting {prompt!r}") + "...")
        self.timer.start()

    def _modify(self, segmentation_node, segment_id, modifier):
        self.scriptedEffect.modifySegmentByLabelmap(
            segmentation_node, segment_id, modifier, slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet)

    def onPoll(self):
        from MedVLSMSlicerLib.session import readable

        job = self.run.job
        job.wait_gui()  # PythonQt holds the GIL while Qt idles: let the worker run during the tick
        done, total = job.progress
        if total:
            self.progressBar.setValue(int(100 * done / total))
        if not job.done:
            self.statusLabel.setText(job.phase)
            return
        self.timer.stop()
        self.runButton.setText("Segment")
        try:
            threshold = self.run.finish()
        except Exception as e:
            self.run = None
            self.statusLabel.setText(readable(e))
            return
        self.thresholdSlider.blockSignals(True)
        self.thresholdSlider.setValue(int(round(threshold * 100)))
        self.thresholdSlider.blockSignals(False)
        warnings = " ".join(self.run.result.warnings)  # an untrained model, a truncated prompt: as the panel says
        self.statusLabel.setText(f"Done in {self.run.result.seconds:.1f} s. Undo reverts; the threshold re-cuts "
                                 f"instantly. {warnings}".strip())

    def onThresholdChanged(self, value):
        if self.run is not None and self.run.result is not None:
            self.run.write(value / 100.0)
