"""Where a segmentation goes: checked before the model runs, written by extension after it.

A run of ``medvlsm segment`` / ``demo`` (and a server's reply) writes its masks to one or more
files, each in the format its extension names, plus optionally the probabilities and a PNG overlay.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import io
from .errors import InputError
from .request import ALL_PLANES
from .volume import default_plane


@dataclass(frozen=True)
class Outputs:
    """``files``: mask files (.seg.nrrd, a labelmap .nii/.nii.gz/.nrrd/.mha, .png for 2D inputs, .dcm
    DICOM SEG for DICOM inputs); ``probabilities``: the probabilities, x 255 as uint8; ``overlay``: a PNG montage."""

    files: tuple
    probabilities: Path | None = None
    overlay: Path | None = None

    def check(self, input_path, volume) -> list[str]:
        """Before any model work: every path can be written in its format, none is an input or
        another output of the run. Returns the extension of each of ``files``."""
        is_2d = volume.shape[0] == 1
        io.check_distinct_outputs([input_path, *volume.dicom_files], [*self.files, self.probabilities, self.overlay])
        extensions = [io.check_output_path(o, is_2d=is_2d, dicom=bool(volume.dicom_files)) for o in self.files]
        if ".dcm" in extensions:
            io.check_dicom_seg_source(volume.dicom_files)
        if self.probabilities:
            io.check_output_path(self.probabilities, is_2d=is_2d, kind="probabilities")
        if self.overlay and io.extension(self.overlay) != ".png":
            raise InputError(f"--overlay {self.overlay} must be a .png file", "Give a path ending in .png")
        return extensions

    @property
    def paths(self) -> list:
        return [str(p) for p in (*self.files, self.probabilities, self.overlay) if p]

    def write(self, volume, result):
        """``result``'s masks ``[P, K, J, I]`` (its request's threshold and post-processing) on
        ``volume``'s grid into every file; the files commit together (``atomic.together``): all are
        written, or none is and each path holds what it held before. Untrained weights are marked in
        every file. Returns the masks."""
        from .atomic import PartialCommit, together

        try:
            with together():
                return self._write(volume, result)
        except InputError as e:  # one file failed: none was renamed into place
            raise InputError(f"{e.problem}. None of this run's outputs was written: {', '.join(self.paths)} hold "
                             "what they held before", e.fix) from e
        except PartialCommit as e:
            raise InputError(f"Could not put every output in place ({e}); the others hold what they held before",
                             "Check the folder (disk, permissions), then run again") from e

    def _write(self, volume, result):
        """In the order that holds the fewest bytes per voxel: the probabilities file, the labelmap (one
        mask at a time), then the masks cut into the probabilities' own buffer (``release_masks``: the
        run ends here) for the other files. One prompt: its labelmap is its mask's own bytes."""
        note = "" if result.trained else f"UNTRAINED WEIGHTS ({result.model_name}): pipeline check, not a segmentation"
        if self.probabilities:
            io.written(self.probabilities, io.write_probabilities, volume, result.probabilities, self.probabilities,
                       note)
        labelled = [o for o in self.files if io.extension(o) not in (".seg.nrrd", ".dcm")]
        labels = result.labelmap() if labelled and len(result.prompts) > 1 else None
        masks = result.release_masks()
        if labelled and labels is None:
            labels = masks[0].view(np.uint8)
        for output in self.files:
            ext = io.extension(output)
            if ext == ".seg.nrrd":
                io.written(output, io.write_seg_nrrd, volume, masks, result.prompts, output, None, note)
            elif ext == ".dcm":
                io.written(output, io.write_dicom_seg, volume, masks, result.prompts, output, result.model_name, note)
            else:
                io.written(output, io.write_labelmap, volume, labels, output, note)
        if self.overlay:
            from .overlay import OverlayStyle, save_overlay

            title = f"{result.model_name}: {', '.join(repr(p) for p in result.prompts)}"
            if not result.trained:
                title = "UNTRAINED WEIGHTS (pipeline check, not a segmentation) - " + title
            plane = result.plane
            if plane == ALL_PLANES:  # fused from the three planes: shown in the volume's natural plane
                plane = default_plane(volume)
                title += " (fused from all three planes)"
            style = OverlayStyle(plane=plane, window=result.request.window, title=title)
            io.written(self.overlay, save_overlay, volume, masks, result.prompts, self.overlay, style)
        return masks
