"""MRML <-> medvlsm, without Qt and without Slicer's globals.

Every function takes the scene, nodes and logics it works on as arguments (never
``slicer.mrmlScene`` / ``slicer.modules``), so the same code runs inside 3D Slicer and under the
``slicer-core`` wheel in CI (``Testing/test_slicer_glue.py``).

Geometry: a volume node's IJK-to-RAS matrix, composed with its parent transform when that is
linear, becomes the ``Volume``'s LPS geometry (x and y negated); masks computed on that grid are
written back through a ``vtkOrientedImageData`` carrying the same matrix, expressed in the
segmentation node's own coordinate frame — so they land on the voxels they came from.
"""

from __future__ import annotations

import numpy as np

from medvlsm.errors import InputError
from medvlsm.io import PALETTE
from medvlsm.volume import Volume
from medvlsm.vocabulary import lookup

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
PREVIEW_ATTRIBUTE = "MedVLSM.Preview"


def _slicer():
    import slicer

    return slicer


def _to_numpy(vtk_matrix) -> np.ndarray:
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _to_vtk(matrix: np.ndarray):
    import vtk

    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(matrix[r, c]))
    return m


def to_world(node) -> np.ndarray:
    """4x4 from the node's local RAS to world RAS (identity without a parent transform)."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise InputError(f"{node.GetName()} is under a non-linear (warping) transform",
                         "Harden the transform (Data module: right-click > Harden transform) and run again")
    import vtk

    m = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(m)
    return _to_numpy(m)


def ijk_to_world(volume_node) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return to_world(volume_node) @ _to_numpy(m)


def _volume(array: np.ndarray, ijk_to_ras: np.ndarray, name: str) -> Volume:
    """Voxels ``[K, J, I(, C)]`` and their IJK-to-RAS matrix -> ``Volume`` (LPS: x and y negated)."""
    lps = RAS_TO_LPS @ ijk_to_ras
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    return Volume(array, tuple(spacing), tuple(lps[:3, 3]), lps[:3, :3] / spacing, name)


def volume_from_node(volume_node) -> Volume:
    """A scalar or RGB volume node -> ``Volume`` in world LPS (a copy: the node is never modified)."""
    if volume_node is None or volume_node.GetImageData() is None:
        raise InputError("No input volume is selected, or it has no image data", "Load a volume and select it")
    slicer = _slicer()
    array = np.array(slicer.util.arrayFromVolume(volume_node), copy=True)
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    return _volume(array, ijk_to_world(volume_node), volume_node.GetName())


def geometry_of_node(volume_node) -> Volume:
    """The node's grid as a ``Volume`` whose voxels are a zero-byte broadcast: for slice arithmetic
    on the GUI thread (which slice is on screen) without copying the volume."""
    k, j, i = volume_node.GetImageData().GetDimensions()[::-1]
    return _volume(np.broadcast_to(np.zeros((), np.float32), (k, j, i)), ijk_to_world(volume_node),
                   volume_node.GetName())


def _oriented_image(mask: np.ndarray, image_to_frame: np.ndarray, start=(0, 0, 0)):
    """Binary mask ``[K, J, I]`` -> ``vtkOrientedImageData`` with the given IJK-to-RAS matrix; ``start``:
    the ``(k, j, i)`` of the mask's first voxel on that grid (a cropped mask). The voxels are shared,
    not copied, when the mask is a contiguous bool or uint8 array (VTK keeps a reference to it)."""
    import vtk
    from vtk.util.numpy_support import numpy_to_vtk

    slicer = _slicer()
    image = slicer.vtkOrientedImageData()
    k, j, i = mask.shape
    k0, j0, i0 = start
    image.SetExtent(i0, i0 + i - 1, j0, j0 + j - 1, k0, k0 + k - 1)
    voxels = np.ascontiguousarray(mask)
    voxels = voxels.view(np.uint8) if voxels.dtype == bool else voxels.astype(np.uint8)
    image.GetPointData().SetScalars(numpy_to_vtk(voxels.ravel(), deep=False, array_type=vtk.VTK_UNSIGNED_CHAR))
    image.SetImageToWorldMatrix(_to_vtk(image_to_frame))
    return image


def _mask_in_segmentation_frame(mask: np.ndarray, volume_node, segmentation_node, crop: bool = False):
    """The mask as an image in the segmentation node's local frame (parent transforms honoured);
    ``crop``: only its bounding box (a replace of the whole segment writes only that)."""
    frame = np.linalg.inv(to_world(segmentation_node)) @ ijk_to_world(volume_node)
    if not crop:
        return _oriented_image(mask, frame)
    spans = [np.flatnonzero(mask.any(axis=other)) for other in ((1, 2), (0, 2), (0, 1))]
    if any(span.size == 0 for span in spans):  # empty: one background voxel
        return _oriented_image(np.zeros((1, 1, 1), bool), frame)
    box = tuple(slice(span[0], span[-1] + 1) for span in spans)
    return _oriented_image(mask[box], frame, tuple(b.start for b in box))


def _resampled_onto(image, reference):
    """A binary labelmap resampled (nearest neighbour) onto ``reference``'s grid."""
    slicer = _slicer()
    out = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(image, reference, out, False)
    return out


def new_segmentation(scene, volume_node, name: str | None = None):
    """A segmentation node on ``volume_node``'s geometry, under the same parent transform."""
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or f"{volume_node.GetName()} MedVLSM")
    seg.CreateDefaultDisplayNodes()
    parent = volume_node.GetParentTransformNode()
    if parent is not None:  # first: the reference geometry is computed in the segmentation's frame
        seg.SetAndObserveTransformNodeID(parent.GetID())
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    return seg


def segment_style(prompt: str, index: int):
    """(display name, colour 0..1, terminology string or None) for a prompt."""
    structure = lookup(prompt)
    name = prompt if prompt else "(empty prompt)"
    if structure is None:
        return name, PALETTE[index % len(PALETTE)], None
    return name, structure.color, structure.slicer_terminology()


def find_segment(segmentation_node, name: str):
    segmentation = segmentation_node.GetSegmentation()
    sid = segmentation.GetSegmentIdBySegmentName(name)
    return sid or None


def target_segment(segmentation_node, prompt: str, index: int, overwrite: bool) -> str:
    """The segment a prompt's mask goes to: the same-named one when overwriting, else a new one
    ("liver", then "liver (2)" ...) styled from the vocabulary. Other segments are never touched."""
    name, color, terminology = segment_style(prompt, index)
    sid = find_segment(segmentation_node, name) if overwrite else None
    if sid is not None:
        return sid
    unique, n = name, 2
    while find_segment(segmentation_node, unique):
        unique, n = f"{name} ({n})", n + 1
    segmentation = segmentation_node.GetSegmentation()
    sid = segmentation.AddEmptySegment("", unique, list(color))
    if terminology:
        segmentation.GetSegment(sid).SetTerminology(terminology)
    return sid


def write_masks(segmentation_node, volume_node, masks: np.ndarray, prompts, *, overwrite: bool = False) -> list[str]:
    """One segment per prompt, named after it, holding ``masks [P, K, J, I]`` (on the volume's grid).

    Returns the segment IDs written (see ``target_segment`` for which).
    """
    ids = [target_segment(segmentation_node, prompt, index, overwrite) for index, prompt in enumerate(prompts)]
    replace_segments(segmentation_node, ids, volume_node, masks)
    return ids


def replace_segments(segmentation_node, segment_ids, volume_node, masks) -> None:
    """Each segment's whole content becomes its mask (written as the mask's bounding box: a mask
    covering a tenth of a CT writes a tenth of its voxels)."""
    slicer = _slicer()
    for sid, mask in zip(segment_ids, masks):
        image = _mask_in_segmentation_frame(mask, volume_node, segmentation_node, crop=True)
        if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
                image, segmentation_node, sid, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE):
            raise RuntimeError(f"Slicer refused to write segment {segmentation_node.GetSegmentation().GetSegment(sid).GetName()!r}")


def read_segment(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """A segment as a bool array ``[K, J, I]`` on the volume's grid (no nodes are created)."""
    from vtk.util.numpy_support import vtk_to_numpy

    slicer = _slicer()
    segment_image = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        segmentation_node, segment_id, segment_image)
    k, j, i = volume_node.GetImageData().GetDimensions()[::-1]
    # GetSegmentBinaryLabelmapRepresentation returns the segment in world coordinates
    reference = _oriented_image(np.zeros((k, j, i), bool), ijk_to_world(volume_node))
    out = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        segment_image, reference, out, False)
    # segments may share a layer: this segment is the voxels holding its own label value
    value = segmentation_node.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    return vtk_to_numpy(out.GetPointData().GetScalars()).reshape(k, j, i) == value


class temporary_nodes:
    """Removes every node added to ``scene`` inside the ``with`` block (display, storage, colour nodes
    included), so helper nodes of an export never outlive it."""

    def __init__(self, scene):
        self.scene = scene

    def __enter__(self):
        self.before = set(_nodes(self.scene))
        return self

    def __exit__(self, *exc):
        remove_if_present(self.scene, [node for node in _nodes(self.scene) if node not in self.before])
        return False


def _nodes(scene) -> list:
    return [scene.GetNthNode(n) for n in range(scene.GetNumberOfNodes())]


def nodes_of_class(scene, class_name: str) -> list:
    return [node for node in _nodes(scene) if node.IsA(class_name)]


def remove_if_present(scene, nodes) -> None:
    """Remove these node *objects* if the scene still holds them. Never by ID: a closed scene
    (``vtkMRMLScene::Clear``) resets its ID counters, so the next patient's nodes reuse the IDs."""
    for node in nodes:
        if node is not None and scene.IsNodePresent(node):
            scene.RemoveNode(node)


# ---- preview / apply / discard / undo ----------------------------------------------------------

class Preview:
    """Results shown in a temporary segmentation node until applied or discarded.

    The preview node is not saved with the scene; discarding removes it, so the scene is
    exactly as before.
    """

    def __init__(self, scene, volume_node, masks, prompts):
        before = set(_nodes(scene))
        self.scene = scene
        self.volume_node = volume_node
        self.masks = masks
        self.prompts = list(prompts)
        self.node = new_segmentation(scene, volume_node, f"{volume_node.GetName()} MedVLSM preview")
        self.node.SetAttribute(PREVIEW_ATTRIBUTE, "1")
        self.node.SetSaveWithScene(False)
        display = self.node.GetDisplayNode()
        if display is not None:
            display.SetOpacity2DFill(0.35)
        self.segment_ids = write_masks(self.node, volume_node, masks, self.prompts)
        # the node, its display node, colour table...: held as objects (see remove_if_present)
        self.created = [node for node in _nodes(scene) if node not in before]

    def set_masks(self, masks) -> None:
        """Show new masks for the same prompts (re-threshold, post-processing): no model run; each
        preview segment's content is replaced in place."""
        self.masks = masks
        replace_segments(self.node, self.segment_ids, self.volume_node, masks)

    @property
    def alive(self) -> bool:
        """False once its node left the scene (scene closed, or the user deleted it)."""
        return self.node is not None and bool(self.scene.IsNodePresent(self.node))

    def discard(self) -> None:
        remove_if_present(self.scene, self.created)
        self.created, self.node = [], None

    def apply(self, target_node, *, overwrite: bool = False, editor=None) -> list[str]:
        """Merge into ``target_node``. With ``editor`` (an ``EditorSession``), through the Segment
        Editor: masking, overwrite mode and undo apply as for any effect."""
        if editor is not None:
            ids = editor.apply(target_node, self.volume_node, self.masks, self.prompts, overwrite=overwrite)
        else:
            ids = write_masks(target_node, self.volume_node, self.masks, self.prompts, overwrite=overwrite)
        self.discard()
        return ids


SEGMENT_EDITOR_TAG = "SegmentEditor"  # the Segment Editor module's singleton node (SegmentEditor.py)
MASKING_SETTINGS = ("MaskMode", "MaskSegmentID", "SourceVolumeIntensityMask", "SourceVolumeIntensityMaskRange")


def user_editor_node(scene):
    """The Segment Editor module's own parameter node (its masking settings), or None if the
    editor was never opened in this scene."""
    return scene.GetSingletonNode(SEGMENT_EDITOR_TAG, "vtkMRMLSegmentEditorNode")


class EditorHistory:
    """The undo history of the user's Segment Editor, which every edit of a segmentation goes
    through: Apply saves its state there, so Undo in the Segment Editor or in the panel undoes the
    last edit, whichever tool made it, and Redo redoes it. There is no second history.

    ``editor``: inside Slicer, the Segment Editor module's ``qMRMLSegmentEditorWidget``, whose
    ``saveStateForUndo`` / ``undo`` / ``redo`` slots call its own ``vtkSlicerSegmentEditorLogic``
    (qMRMLSegmentEditorWidget.cxx, Slicer >= 5.10); without the application (tests, headless use),
    such a logic itself. Saving a state for another segmentation than the one the editor shows
    selects that segmentation there first, as choosing it in the Segment Editor would.
    """

    def __init__(self, editor):
        self.editor = editor
        names = ("GetSegmentationNode", "SetSegmentationNode", "SaveStateForUndo", "Undo", "Redo")
        if not hasattr(editor, "SaveStateForUndo"):  # the widget: the same calls, Qt's spelling
            names = ("segmentationNode", "setSegmentationNode", "saveStateForUndo", "undo", "redo")
        self._segmentation, self._select, self._save, self.undo, self.redo = (getattr(editor, n) for n in names)

    def save_state(self, segmentation_node) -> None:
        if self._segmentation() is not segmentation_node:
            self._select(segmentation_node)
        self._save()


def headless_editor_history(scene) -> EditorHistory:
    """Without the Segment Editor module (no application): the history of a logic on the scene's
    Segment Editor node, the one the module itself would use (SegmentEditor.py: singleton tag
    "SegmentEditor"); created, unsaved and hidden, when the editor was never opened."""
    slicer = _slicer()
    node = user_editor_node(scene)
    if node is None:
        scene.RegisterNodeClass(slicer.vtkMRMLSegmentEditorNode())
        node = scene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
        node.UnRegister(None)
        node.SetSingletonTag(SEGMENT_EDITOR_TAG)
        node.SetSaveWithScene(False)
        node.SetHideFromEditors(True)
        node = scene.AddNode(node)
    logic = slicer.vtkSlicerSegmentEditorLogic()
    logic.SetMRMLScene(scene)
    logic.SetSegmentEditorNode(node)
    return EditorHistory(logic)


class EditorSession:
    """A Qt-free Segment Editor: ``vtkSlicerSegmentEditorLogic`` (Slicer >= 5.10) on a private
    ``vtkMRMLSegmentEditorNode``, the same logic Slicer's effects write through; its undo states go
    to the user's Segment Editor history (``EditorHistory``), never to one of its own.

    Masking follows the user's Segment Editor (mask mode and segment, intensity range) when it edits
    the same segmentation. Other segments are never modified unless ``modify_others``: the private
    node's overwrite mode is "none" (a fresh editor node would overwrite all visible segments).
    """

    def __init__(self, scene, history: EditorHistory | None = None, editor_node=None):
        slicer = _slicer()
        self.scene = scene
        if editor_node is None:
            editor_node = slicer.vtkMRMLSegmentEditorNode()
            editor_node.SetSaveWithScene(False)
            editor_node.SetHideFromEditors(True)
            editor_node.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
            editor_node = scene.AddNode(editor_node)
        self.node = editor_node
        self.history = history
        self.logic = slicer.vtkSlicerSegmentEditorLogic()
        self.logic.SetMRMLScene(scene)
        self.logic.SetSegmentEditorNode(self.node)

    @property
    def alive(self) -> bool:
        """False once a scene close removed its private editor node."""
        return bool(self.scene.IsNodePresent(self.node))

    def follow_user_masking(self, segmentation_node, modify_others: bool = False) -> None:
        """Copy the user's masking for ``segmentation_node``; overwrite others only if asked."""
        slicer = _slicer()
        user = user_editor_node(self.scene)
        same = user is not None and user.GetSegmentationNode() is segmentation_node
        self.node.SetMaskMode(user.GetMaskMode() if same else slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere)
        self.node.SetMaskSegmentID(user.GetMaskSegmentID() if same else None)
        self.node.SetSourceVolumeIntensityMask(bool(same and user.GetSourceVolumeIntensityMask()))
        if same:
            self.node.SetSourceVolumeIntensityMaskRange(user.GetSourceVolumeIntensityMaskRange())
        overwrite = slicer.vtkMRMLSegmentEditorNode.OverwriteNone
        if modify_others:
            overwrite = user.GetOverwriteMode() if same else slicer.vtkMRMLSegmentEditorNode.OverwriteAllSegments
        self.node.SetOverwriteMode(overwrite)

    def apply(self, segmentation_node, volume_node, masks, prompts, *, overwrite: bool = False) -> list[str]:
        slicer = _slicer()
        self.logic.SetSegmentationNode(segmentation_node)
        self.logic.SetSourceVolumeNode(volume_node)
        if self.history is None:
            self.history = headless_editor_history(self.scene)
        self.history.save_state(segmentation_node)
        # With the editable intensity range on, the logic writes only a labelmap on the aligned source
        # volume's grid (the segmentation's geometry) and skips any other without a word
        # (vtkSlicerSegmentEditorLogic::ModifySegmentByLabelmap, DoGeometriesMatch): go onto that grid.
        aligned = None
        if self.node.GetSourceVolumeIntensityMask() and self.logic.UpdateAlignedSourceVolume():
            aligned = self.logic.GetAlignedSourceVolume()
        ids, proposed, written = [], False, False
        for index, (mask, prompt) in enumerate(zip(masks, prompts)):
            sid = target_segment(segmentation_node, prompt, index, overwrite)
            image = _mask_in_segmentation_frame(mask, volume_node, segmentation_node)
            if aligned is not None:
                image = _resampled_onto(image, aligned)
            self.logic.ModifySegmentByLabelmap(segmentation_node, sid, image,
                                               slicer.vtkSlicerSegmentEditorLogic.ModificationModeSet, False, False)
            ids.append(sid)
            proposed = proposed or bool(mask.any())
            written = written or bool(read_segment(segmentation_node, sid, volume_node).any())
        if proposed and not written:  # masking excluded every voxel: say so, leave the segmentation as it was
            self.history.undo()
            raise InputError("Nothing was written: the Segment Editor's masking (editable area or intensity range) "
                             "excludes every voxel of the result",
                             "Widen or turn off Masking in the Segment Editor, then Apply again")
        return ids



def parameter_node(scene, module_name: str = "MedVLSMSlicer"):
    """The module's singleton parameter node, found or created exactly as
    ``ScriptedLoadableModuleLogic.getParameterNode`` does (Slicer's ScriptedLoadableModule.py), so the
    panel, the effect and the module's logic share one set of settings."""
    node = scene.GetSingletonNode(module_name, "vtkMRMLScriptedModuleNode")
    if node is None:
        node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)
        node.SetSingletonTag(module_name)
        node.SetAttribute("ModuleName", module_name)
        node.SetName(scene.GenerateUniqueName(module_name))
        node = scene.AddNode(node)
    elif node.GetAttribute("ModuleName") != module_name:  # a scene close may drop the attribute
        node.SetAttribute("ModuleName", module_name)
    return node


# ---- export ------------------------------------------------------------------------------------

def export_labelmap_node(scene, segmentation_node, volume_node, segment_ids=None, logic=None):
    """Segments -> a new labelmap volume node on the volume's geometry (label i = i-th segment)."""
    slicer = _slicer()
    import vtk

    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{segmentation_node.GetName()} labels")
    ids = vtk.vtkStringArray()
    for sid in segment_ids or list(segmentation_node.GetSegmentation().GetSegmentIDs()):
        ids.InsertNextValue(sid)
    logic = logic or slicer.vtkSlicerSegmentationsModuleLogic()
    if not logic.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap, volume_node):
        scene.RemoveNode(labelmap)
        raise RuntimeError("Slicer could not export the segments to a labelmap")
    return labelmap


def save_node(scene, node, path) -> None:
    """Write a node with a storage node (``slicer.util.saveNode`` needs the application), atomically:
    to a temporary name beside ``path``, renamed when complete. The node's own file association is
    left as it was: an export is not a "Save as"."""
    from medvlsm.io import written

    written(path, _save_with_storage_node, scene, node, path)


def _save_with_storage_node(scene, node, path) -> None:
    from medvlsm.atomic import atomic_path

    storage = node.GetStorageNode()
    previous = storage.GetFileName() if storage is not None else None
    with temporary_nodes(scene):  # a storage node the node did not have is removed afterwards
        if storage is None:
            node.AddDefaultStorageNode()
        writer = node.GetStorageNode()
        try:
            with atomic_path(path) as tmp:
                if not _write_with_storage_node(writer, node, tmp):
                    raise OSError("Slicer's writer failed: disk full, or the folder is not writable")
        finally:
            if storage is None:
                node.SetAndObserveStorageNodeID(None)
            else:
                storage.SetFileName(previous)


def _write_with_storage_node(writer, node, path) -> bool:
    writer.SetFileName(str(path))
    return bool(writer.WriteData(node))


def export_dicom_seg(segmentation_node, volume_node, dicom_files, path) -> None:
    """Segments -> DICOM SEG referencing the volume's own DICOM instances (one file per slice k)."""
    from medvlsm.io import write_dicom_seg

    files = list(dicom_files or [])
    volume = volume_from_node(volume_node)
    if len(files) != volume.shape[0]:
        raise InputError(f"{volume_node.GetName()} was not loaded from a DICOM series (no instance per slice)",
                         "Load the series through the DICOM module, or export .seg.nrrd")
    volume.dicom_files = tuple(files)
    segmentation = segmentation_node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    if not ids:
        raise InputError("The segmentation has no segments", "Apply a result first")
    masks = np.stack([read_segment(segmentation_node, sid, volume_node) for sid in ids])
    write_dicom_seg(volume, masks, [segmentation.GetSegment(sid).GetName() for sid in ids], path)


def export(scene, segmentation_node, volume_node, path, logic=None) -> None:
    """``.seg.nrrd`` (segments as they are) or ``.nii.gz``/``.nrrd`` (labelmap on the volume grid)."""
    path = str(path)
    if path.lower().endswith(".seg.nrrd"):
        save_node(scene, segmentation_node, path)
        return
    if not path.lower().endswith((".nii.gz", ".nii", ".nrrd")):
        raise InputError(f"Cannot export to {path}", "Use .seg.nrrd, .nii.gz or .nrrd")
    with temporary_nodes(scene):
        save_node(scene, export_labelmap_node(scene, segmentation_node, volume_node, logic=logic), path)


def view_slice_index(volume_node, ras_point, plane: str) -> int:
    """The medvlsm slice index (display order of ``plane``) through a world RAS point, e.g. the
    centre of a slice view: what "current slice" means."""
    from medvlsm.volume import SliceView

    volume = geometry_of_node(volume_node)
    ijk = np.linalg.inv(ijk_to_world(volume_node)) @ np.append(np.asarray(ras_point, float), 1.0)
    kji = np.round(ijk[:3][::-1]).astype(int)
    view = SliceView(volume, plane)
    axis = view.perm[0]
    index = int(np.clip(kji[axis], 0, volume.shape[axis] - 1))
    return volume.shape[axis] - 1 - index if view.flips[0] else index


# ---- the Segment Editor effect's images --------------------------------------------------------

def volume_from_oriented_image(image, frame_to_world=None, name: str = "source") -> Volume:
    """The editor's source image (``vtkOrientedImageData``, in the segmentation's frame) -> ``Volume``.

    ``frame_to_world`` (the segmentation's parent transform) only orients the slicing anatomically;
    masks go back onto the very same image grid (``oriented_image_on_grid``).
    """
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    extent = image.GetExtent()
    shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    if min(shape) < 1:
        raise InputError("The source volume is empty", "Select a source volume in the Segment Editor")
    components = image.GetNumberOfScalarComponents()
    array = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape + ((components,) if components > 1 else ()))
    ijk_to_frame = _to_numpy(m)
    offset = np.eye(4)
    offset[:3, 3] = [extent[0], extent[2], extent[4]]  # voxel (0,0,0) of the array is the extent's start
    to_world_ras = (frame_to_world if frame_to_world is not None else np.eye(4)) @ ijk_to_frame @ offset
    return _volume(np.array(array, copy=True), to_world_ras, name)


def image_grid(image) -> tuple:
    """An oriented image's grid as plain values (extent, image-to-world 4x4): a copy that stays valid
    when the editor later changes or re-aligns the image."""
    import vtk

    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    return tuple(image.GetExtent()), _to_numpy(m)


def oriented_image_on_grid(mask: np.ndarray, grid: tuple):
    """A binary mask ``[K, J, I]`` as a ``vtkOrientedImageData`` on ``grid`` (see ``image_grid``)."""
    extent, matrix = grid
    result = _oriented_image(mask, matrix)
    result.SetExtent(extent)
    return result


# ---- finetuning from Slicer segmentations -------------------------------------------------------

def export_training_pair(scene, volume_node, segmentation_node, folder, name: str | None = None) -> tuple:
    """Write ``volumes/NAME.nrrd`` and ``segmentations/NAME.seg.nrrd`` (segments on the volume's grid,
    segment names = prompts), the layout ``medvlsm finetune --volumes --segmentations`` reads."""
    from pathlib import Path

    folder = Path(folder)
    name = name or volume_node.GetName().replace(" ", "_")
    (folder / "volumes").mkdir(parents=True, exist_ok=True)
    (folder / "segmentations").mkdir(parents=True, exist_ok=True)
    volume_path = folder / "volumes" / f"{name}.nrrd"
    seg_path = folder / "segmentations" / f"{name}.seg.nrrd"
    save_node(scene, volume_node, volume_path)
    # segments exported on the volume's grid so training slices line up voxel for voxel
    from medvlsm.io import write_seg_nrrd

    segmentation = segmentation_node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    masks = np.stack([read_segment(segmentation_node, sid, volume_node) for sid in ids])
    names = [segmentation.GetSegment(sid).GetName() for sid in ids]
    colors = [segmentation.GetSegment(sid).GetColor() for sid in ids]
    write_seg_nrrd(volume_from_node(volume_node), masks, names, seg_path, colors)
    return volume_path, seg_path
