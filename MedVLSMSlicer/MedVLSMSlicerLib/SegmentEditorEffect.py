"""Segment Editor effect "Text prompt": segment the selected segment from a typed description.

Writes through ``modifySelectedSegmentByLabelmap`` after ``saveStateForUndo``, so the editor's
masking (editable area, intensity range), overwrite rules and Undo behave as for Threshold or
Paint. The prompt defaults to the selected segment's name; the model reads the editor's source
image (possibly resampled to the segmentation geometry) and the result lands on that same grid.
The threshold slider re-cuts the last probabilities instantly (no model run).
"""

import os

import qt
import slicer
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

HERE = os.path.dirname(os.path.abspath(__file__))


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    def __init__(self, scriptedEffect):
        scriptedEffect.name = "Text prompt"
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.job = None
        self.result = None
        self.source_image = None
        self.timer = qt.QTimer()
        self.timer.setInterval(100)
        self.timer.connect("timeout()", self._poll)

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        cloned = effects.qSlicerSegmentEditorScriptedEffect(None)
        cloned.setPythonSource(__file__.replace("\\", "/"))
        return cloned

    def icon(self):
        path = os.path.join(HERE, "..", "Resources", "Icons", "MedVLSMSlicer.png")
        return qt.QIcon(path) if os.path.exists(path) else qt.QIcon()

    def helpText(self):
        return ("<html>Type what the selected segment is (e.g. <i>liver</i>, <i>left kidney</i>) and press "
                "<b>Segment</b>. A vision-language model segments it slice by slice; masking and overwrite "
                "settings apply; Undo reverts. The threshold re-cuts the last result instantly.</html>")

    def setupOptionsFrame(self):
        self.promptEdit = qt.QLineEdit()
        self.promptEdit.setPlaceholderText("what to segment (default: the segment's name)")
        self.scriptedEffect.addLabeledOptionsWidget("Prompt:", self.promptEdit)
        self.planeCombo = qt.QComboBox()
        self.planeCombo.addItems(["axial", "coronal", "sagittal"])
        self.scriptedEffect.addLabeledOptionsWidget("Plane:", self.planeCombo)
        self.thresholdSlider = slicer.qMRMLSliderWidget()
        self.thresholdSlider.minimum, self.thresholdSlider.maximum = 0.01, 0.99
        self.thresholdSlider.singleStep, self.thresholdSlider.value = 0.01, 0.5
        self.thresholdSlider.connect("valueChanged(double)", self._rethreshold)
        self.scriptedEffect.addLabeledOptionsWidget("Threshold:", self.thresholdSlider)
        self.runButton = qt.QPushButton("Segment")
        self.runButton.connect("clicked()", self._run_or_cancel)
        self.progress = qt.QProgressBar()
        row = qt.QHBoxLayout()
        row.addWidget(self.runButton)
        row.addWidget(self.progress)
        self.scriptedEffect.addOptionsWidget(row)
        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)

    def activate(self):
        segment_id = self.scriptedEffect.parameterSetNode().GetSelectedSegmentID()
        segmentation = self.scriptedEffect.parameterSetNode().GetSegmentationNode()
        if segment_id and segmentation and not self.promptEdit.text:
            self.promptEdit.text = segmentation.GetSegmentation().GetSegment(segment_id).GetName()

    def deactivate(self):
        if self.job is not None:
            self.job.cancel()

    def _session(self):
        return slicer.modules.medvlsmslicer.widgetRepresentation().self().logic.session

    def _run_or_cancel(self):
        if self.job is not None:
            self.job.cancel()
            return
        from MedVLSMSlicerLib import mrml_glue as glue
        from MedVLSMSlicerLib.session import Job, readable

        prompt = self.promptEdit.text.strip() or self._segment_name()
        segmentation = self.scriptedEffect.parameterSetNode().GetSegmentationNode()
        try:
            # Slicer < 5.4 named it "master" (one of the renames users trip over)
            read_source = getattr(self.scriptedEffect, "sourceVolumeImageData", None) or \
                self.scriptedEffect.masterVolumeImageData
            self.source_image = read_source()
            if self.source_image is None:
                raise glue.InputError("No source volume", "Select a source volume in the Segment Editor")
            volume = glue.volume_from_oriented_image(self.source_image, glue.to_world(segmentation))
            volume.validate()
            plane = self.planeCombo.currentText
            engine = self._session().engine("", "auto")
        except Exception as e:
            self.statusLabel.text = readable(e)
            return
        self.job = Job(lambda job: engine.segment(volume, [prompt], plane=plane, progress=job.report,
                                                  cancel=lambda: job.cancelled))
        self.runButton.text = "Cancel"
        self.statusLabel.text = f"Segmenting {prompt!r}..."
        self.timer.start()

    def _segment_name(self):
        node = self.scriptedEffect.parameterSetNode()
        return node.GetSegmentationNode().GetSegmentation().GetSegment(node.GetSelectedSegmentID()).GetName()

    def _poll(self):
        from MedVLSMSlicerLib.session import readable

        done, total = self.job.progress
        if total:
            self.progress.value = int(100 * done / total)
        if not self.job.done:
            return
        self.timer.stop()
        job, self.job = self.job, None
        self.runButton.text = "Segment"
        if job.error is not None or job.result is None:
            self.statusLabel.text = readable(job.error) if job.error else "Cancelled: nothing was changed."
            return
        self.result = job.result
        self.thresholdSlider.blockSignals(True)
        self.thresholdSlider.value = self.result.threshold
        self.thresholdSlider.blockSignals(False)
        self.scriptedEffect.saveStateForUndo()
        self._write(self.result.threshold)
        self.statusLabel.text = f"Done in {self.result.seconds:.1f} s. Undo reverts; the threshold re-cuts instantly."

    def _rethreshold(self, value):
        if self.result is not None:
            self._write(value)

    def _write(self, threshold):
        from MedVLSMSlicerLib import mrml_glue as glue

        mask = self.result.masks(threshold)[0]
        modifier = glue.oriented_image_like(mask, self.source_image)
        self.scriptedEffect.modifySelectedSegmentByLabelmap(
            modifier, slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet)
