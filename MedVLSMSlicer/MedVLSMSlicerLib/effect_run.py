"""What the Segment Editor's "Text prompt" effect does, without Qt: one run from Segment to the last
re-threshold.

The effect file (``SegmentEditorTextPromptLib/SegmentEditorEffect.py``) only binds widgets to this
class and passes the editor's ``saveStateForUndo`` and ``modifySegmentByLabelmap``; the tests pass
the same calls of ``vtkSlicerSegmentEditorLogic``, which the editor itself delegates to (Slicer >= 5.10).
"""

from __future__ import annotations

from medvlsm.errors import InputError

from . import mrml_glue as glue
from .session import Job, Session, Settings


class TextPromptRun:
    """Segment ``prompt`` on the editor's source image into one segment, fixed when Run is pressed.

    - model, device and window are the module panel's (its parameter node), so the effect and the
      panel share one loaded model (``session``);
    - the source image's grid is copied at Run (the editor may re-align its source image later);
    - every write (the first and each re-threshold) is preceded by ``save_state_for_undo``.
    """

    def __init__(self, session: Session, source_image, segmentation_node, segment_id: str, prompt: str,
                 plane: str, *, save_state_for_undo, modify):
        if source_image is None:
            raise InputError("No source volume", "Select a source volume in the Segment Editor")
        if not segment_id or segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
            raise InputError("No segment is selected", "Add or select the segment to fill, then press Segment")
        self.segmentation_node = segmentation_node
        self.segment_id = segment_id
        self.grid = glue.image_grid(source_image)
        self._save_state_for_undo = save_state_for_undo
        self._modify = modify
        self.settings = Settings.load(glue.parameter_node(session.scene))
        self.settings.prompts = [prompt]
        self.settings.plane = plane
        volume = glue.volume_from_oriented_image(source_image, glue.to_world(segmentation_node))
        self.session = session
        self.result = None
        self.job: Job = session.run(volume, self.settings)

    def finish(self) -> float:
        """After ``job.done``, on the GUI thread: write the mask at the model's threshold (returned).
        Raises the run's error; a cancelled run raises ``Cancelled`` and writes nothing."""
        from medvlsm.errors import Cancelled

        if self.job.error is not None:
            raise self.job.error
        if self.job.result is None:
            raise Cancelled()
        self.result = self.job.result
        self.write(self.result.threshold)
        return self.result.threshold

    def write(self, threshold: float) -> None:
        """Re-cut at ``threshold`` (no model run) into the segment chosen at Run; undoable."""
        self.settings.threshold = threshold
        mask = self.session.masks(self.settings, self.result)[0]
        self._save_state_for_undo()
        self._modify(self.segmentation_node, self.segment_id, glue.oriented_image_on_grid(mask, self.grid))
