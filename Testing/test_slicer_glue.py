"""The MRML glue against real MRML (slicer-core wheel: Slicer's scene, nodes and logics, no app)."""

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import blobs, rotation

slicer = pytest.importorskip("slicer", reason="the slicer-core wheel is part of Testing/requirements.txt")
pytestmark = pytest.mark.slicer

from MedVLSMSlicerLib import mrml_glue as glue  # noqa: E402  (MedVLSMSlicer/ is on sys.path, conftest)

from medvlsm import io  # noqa: E402
from medvlsm.volume import Volume  # noqa: E402


@pytest.fixture
def scene():
    scene = slicer.vtkMRMLScene()
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if not factory.GetConverterRules():
        for rule in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
                     slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):
            factory.RegisterConverterRule(rule())
    return scene


def volume_node(scene, array, ijk_to_ras, name="CT"):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.CreateDefaultDisplayNodes()
    slicer.util.updateVolumeFromArray(node, array)
    node.SetIJKToRASMatrix(glue._to_vtk(ijk_to_ras))
    return node


def matrix(direction, spacing, origin):
    m = np.eye(4)
    m[:3, :3] = np.asarray(direction) @ np.diag(spacing)
    m[:3, 3] = origin
    return m


GEOMETRIES = {
    "axis-aligned": matrix(np.eye(3), (0.8, 0.8, 2.5), (10, 20, 30)),
    "oblique": matrix(rotation(15, -10, 30), (0.7, 0.9, 3.0), (-50, 12, 80)),
    "flipped": matrix(np.diag([-1, 1, -1]), (1.0, 1.2, 2.0), (5, -5, 5)),
    "anisotropic-permuted": matrix(np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]]), (0.5, 4.0, 1.5), (0, 0, 0)),
}


def physical_ras(m, k, j, i):
    return (m @ [i, j, k, 1])[:3]


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("transformed", [False, True], ids=["no-transform", "parent-transform"])
def test_volume_node_to_medvlsm_and_back(scene, geometry, transformed):
    arr = blobs((6, 12, 14))
    node = volume_node(scene, arr, GEOMETRIES[geometry])
    world = np.eye(4)
    if transformed:
        world = matrix(rotation(0, 20, 0), (1, 1, 1), (3, -7, 11))
        t = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
        t.SetMatrixTransformToParent(glue._to_vtk(world))
        node.SetAndObserveTransformNodeID(t.GetID())
    v = glue.volume_from_node(node)
    np.testing.assert_array_equal(v.array, arr)
    # a voxel's LPS position in medvlsm == its RAS world position in Slicer, x and y negated
    for k, j, i in ((0, 0, 0), (5, 11, 13), (2, 7, 3)):
        ras = (world @ np.append(physical_ras(GEOMETRIES[geometry], k, j, i), 1))[:3]
        np.testing.assert_allclose((v.ijk_to_lps() @ [i, j, k, 1])[:3], ras * [-1, -1, 1], atol=1e-6)
    # and masks written back land on exactly those voxels
    mask = arr > 300
    seg = glue.new_segmentation(scene, node)
    (sid,) = glue.write_masks(seg, node, mask[None], ["liver"])
    np.testing.assert_array_equal(glue.read_segment(seg, sid, node), mask)


def test_input_volume_is_never_modified(scene):
    arr = blobs((4, 10, 10))
    node = volume_node(scene, arr, GEOMETRIES["oblique"])
    before = node.GetMTime(), slicer.util.arrayFromVolume(node).copy()
    v = glue.volume_from_node(node)
    v.array[:] = 0
    assert node.GetMTime() == before[0]
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), before[1])


def test_nonlinear_parent_transform_is_a_clear_error(scene):
    node = volume_node(scene, blobs((3, 8, 8)), np.eye(4))
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    node.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(glue.InputError, match="Harden"):
        glue.volume_from_node(node)


def test_segments_are_named_and_coloured_from_the_prompt(scene):
    node = volume_node(scene, blobs((4, 10, 10)), np.eye(4))
    seg = glue.new_segmentation(scene, node)
    masks = np.zeros((3, 4, 10, 10), bool)
    masks[:, 1, 2:5, 2:5] = True
    ids = glue.write_masks(seg, node, masks, ["liver", "one small pink round polyp", "lung tumor"])
    segments = [seg.GetSegmentation().GetSegment(i) for i in ids]
    assert [s.GetName() for s in segments] == ["liver", "one small pink round polyp", "lung tumor"]
    np.testing.assert_allclose(segments[0].GetColor(), np.array([221, 130, 101]) / 255)
    assert "10200004" in segments[0].GetTerminology()  # SNOMED CT liver
    assert "108369006" in segments[2].GetTerminology()  # neoplasm
    assert len({tuple(s.GetColor()) for s in segments}) == 3


def test_writing_into_an_existing_segmentation_keeps_other_segments(scene):
    node = volume_node(scene, blobs((4, 10, 10)), np.eye(4))
    seg = glue.new_segmentation(scene, node)
    manual = np.zeros((4, 10, 10), bool)
    manual[1:3, 1:8, 1:8] = True
    (kept,) = glue.write_masks(seg, node, manual[None], ["manual edit"])
    new = np.zeros((1, 4, 10, 10), bool)
    new[0, :, 4:10, 4:10] = True  # overlaps the manual segment
    (liver,) = glue.write_masks(seg, node, new, ["liver"])
    np.testing.assert_array_equal(glue.read_segment(seg, kept, node), manual)
    np.testing.assert_array_equal(glue.read_segment(seg, liver, node), new[0])
    # same name again: a second segment unless overwriting is asked for
    (again,) = glue.write_masks(seg, node, ~new, ["liver"])
    assert seg.GetSegmentation().GetSegment(again).GetName() == "liver (2)"
    (replaced,) = glue.write_masks(seg, node, ~new, ["liver"], overwrite=True)
    assert replaced == liver
    np.testing.assert_array_equal(glue.read_segment(seg, liver, node), ~new[0])
    np.testing.assert_array_equal(glue.read_segment(seg, kept, node), manual)


def scene_state(scene):
    nodes = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    return sorted((n.GetID(), n.GetName()) for n in nodes)


def test_preview_then_discard_leaves_the_scene_unchanged(scene):
    node = volume_node(scene, blobs((4, 10, 10)), np.eye(4))
    target = glue.new_segmentation(scene, node)
    before = scene_state(scene)
    probs = np.random.default_rng(0).random((1, 4, 10, 10)).astype(np.float32)
    preview = glue.Preview(scene, node, probs > 0.5, ["liver"])
    assert scene_state(scene) != before and not preview.node.GetSaveWithScene()
    preview.set_masks(probs > 0.9)
    sid = preview.node.GetSegmentation().GetNthSegmentID(0)
    np.testing.assert_array_equal(glue.read_segment(preview.node, sid, node), probs[0] > 0.9)
    preview.discard()
    assert scene_state(scene) == before
    assert target.GetSegmentation().GetNumberOfSegments() == 0


def test_preview_apply_merges_into_the_target(scene):
    node = volume_node(scene, blobs((4, 10, 10)), GEOMETRIES["flipped"])
    target = glue.new_segmentation(scene, node)
    masks = blobs((4, 10, 10))[None] > 300
    before = scene_state(scene)
    preview = glue.Preview(scene, node, masks, ["spleen"])
    (sid,) = preview.apply(target)
    assert scene_state(scene) == before
    np.testing.assert_array_equal(glue.read_segment(target, sid, node), masks[0])


def test_masked_apply_through_the_segment_editor_and_undo(scene):
    """Mask segment, overwrite mode and intensity range of the editor node apply; undo restores."""
    arr = np.zeros((3, 12, 12), np.int16)
    arr[:, :, 6:] = 200  # bright right half
    node = volume_node(scene, arr, np.eye(4))
    target = glue.new_segmentation(scene, node)
    allowed = np.zeros((3, 12, 12), bool)
    allowed[:, 2:10, :] = True
    (mask_id,) = glue.write_masks(target, node, allowed[None], ["allowed region"])
    editor = glue.EditorSession(scene)
    editor.node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
    editor.node.SetMaskSegmentID(mask_id)
    editor.node.SetSourceVolumeIntensityMask(True)
    editor.node.SetSourceVolumeIntensityMaskRange(100, 300)
    editor.node.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
    proposal = np.ones((1, 3, 12, 12), bool)
    preview = glue.Preview(scene, node, proposal, ["liver"])
    (sid,) = preview.apply(target, editor=editor)
    result = glue.read_segment(target, sid, node)
    np.testing.assert_array_equal(result, allowed & (arr >= 100))
    np.testing.assert_array_equal(glue.read_segment(target, mask_id, node), allowed)  # untouched
    editor.history.undo()
    assert target.GetSegmentation().GetSegmentIdBySegmentName("liver") == ""
    np.testing.assert_array_equal(glue.read_segment(target, mask_id, node), allowed)


@pytest.mark.parametrize("ext", [".seg.nrrd", ".nii.gz", ".nrrd"])
def test_export_reads_back_with_identical_voxels_and_geometry(scene, tmp_path, ext):
    arr = blobs((5, 12, 14))
    node = volume_node(scene, arr, GEOMETRIES["oblique"])
    seg = glue.new_segmentation(scene, node)
    masks = np.stack([arr > 300, (arr > 0) & (arr <= 300)])
    glue.write_masks(seg, node, masks, ["bright", "soft"])
    path = tmp_path / f"out{ext}"
    glue.export(scene, seg, node, path)
    reference = glue.volume_from_node(node)
    if ext == ".seg.nrrd":
        read = io.read_seg_nrrd(path)
        # Slicer crops to the segments' extent: compare physically, on the reference grid
        for s, name in enumerate(read.names):
            on_ref = _resample_to(read.masks[s], read.grid, reference)
            np.testing.assert_array_equal(on_ref, masks[["bright", "soft"].index(name)])
    else:
        image = sitk.ReadImage(str(path))
        labels = sitk.GetArrayFromImage(image)
        np.testing.assert_array_equal(labels == 1, masks[0])
        np.testing.assert_array_equal(labels == 2, masks[1])
        np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), reference.direction, atol=1e-5)
        np.testing.assert_allclose(image.GetOrigin(), reference.origin, atol=1e-4)
        np.testing.assert_allclose(image.GetSpacing(), reference.spacing, atol=1e-5)


def _resample_to(mask, grid: Volume, reference: Volume):
    moving = io.volume_to_sitk(grid, mask.astype(np.uint8))
    fixed = io.volume_to_sitk(reference, np.zeros(reference.shape, np.uint8))
    return sitk.GetArrayFromImage(sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0)) > 0


def test_medvlsm_seg_nrrd_loads_in_slicer(scene, tmp_path):
    """Our own .seg.nrrd writer produces a file Slicer's storage node reads at the right voxels."""
    arr = blobs((4, 10, 12))
    ref = matrix(rotation(0, 0, 25), (0.6, 0.6, 3.0), (1, 2, 3))
    node = volume_node(scene, arr, ref)
    v = glue.volume_from_node(node)
    masks = np.stack([arr > 300, arr < -500])
    io.write_seg_nrrd(v, masks, ["bright", "air"], tmp_path / "m.seg.nrrd")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(tmp_path / "m.seg.nrrd"))
    assert storage.ReadData(seg)
    names = [seg.GetSegmentation().GetNthSegment(i).GetName() for i in range(2)]
    assert names == ["bright", "air"]
    for i in range(2):
        np.testing.assert_array_equal(glue.read_segment(seg, seg.GetSegmentation().GetNthSegmentID(i), node), masks[i])


def test_end_to_end_engine_into_a_segmentation(scene, engine):
    arr = blobs((5, 16, 18))
    node = volume_node(scene, arr, GEOMETRIES["anisotropic-permuted"])
    v = glue.volume_from_node(node)
    result = engine.segment(v, ["liver", "spleen"], plane="coronal")
    seg = glue.new_segmentation(scene, node)
    ids = glue.write_masks(seg, node, result.masks(), result.prompts)
    for p, sid in enumerate(ids):
        np.testing.assert_array_equal(glue.read_segment(seg, sid, node), result.masks()[p])


def test_effect_source_image_round_trip(scene):
    """The effect reads the editor's source image (vtkOrientedImageData, any extent/matrix) and writes
    the mask back on exactly that grid."""
    arr = blobs((4, 9, 11))
    m = GEOMETRIES["oblique"]
    image = glue._oriented_image(arr > 300, m)
    image.SetExtent(3, 13, 2, 10, 5, 8)  # a cropped/offset extent, as the editor may give
    v = glue.volume_from_oriented_image(image)
    np.testing.assert_array_equal(v.array, arr > 300)
    # voxel (0,0,0) of the array is extent start (3,2,5)
    np.testing.assert_allclose((v.ijk_to_lps() @ [0, 0, 0, 1])[:3], (m @ [3, 2, 5, 1])[:3] * [-1, -1, 1], atol=1e-9)
    back = glue.oriented_image_on_grid(arr > 0, glue.image_grid(image))
    assert back.GetExtent() == image.GetExtent()
    assert glue.volume_from_oriented_image(back).same_grid(v)


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_current_slice_index_from_a_view_centre(scene, plane):
    from medvlsm.volume import SliceView

    node = volume_node(scene, blobs((7, 9, 11)), GEOMETRIES["flipped"])
    v = glue.volume_from_node(node)
    view = SliceView(v, plane)
    for index in (0, 3, view.num_slices - 1):
        # the RAS centre of that displayed slice
        probe = np.zeros(v.shape, np.int8)
        view.view(probe)[index] = 1
        k, j, i = np.argwhere(probe)[len(np.argwhere(probe)) // 2]
        ras = (GEOMETRIES["flipped"] @ [i, j, k, 1])[:3]
        assert glue.view_slice_index(node, ras, plane) == index


def test_settings_live_in_a_parameter_node(scene):
    from MedVLSMSlicerLib.session import Settings

    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
    s = Settings(prompts=["liver", "left kidney"], plane="coronal", threshold=0.35, keep_largest=True, min_voxels=7)
    s.save(node)
    assert Settings.load(node) == s


def test_export_for_finetuning_reads_back_as_a_training_set(scene, tmp_path, tiny_model):
    from medvlsm import training
    from medvlsm.datasets import read_volume_folder

    arr = blobs((6, 16, 18))
    node = volume_node(scene, arr, GEOMETRIES["oblique"])
    seg = glue.new_segmentation(scene, node)
    liver = arr > 300
    glue.write_masks(seg, node, liver[None], ["liver"])
    before = sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))
    volume_path, seg_path = glue.export_training_pair(scene, node, seg, tmp_path, "case 1".replace(" ", "_"))
    assert sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())) == before
    (pair,) = read_volume_folder(tmp_path / "volumes", tmp_path / "segmentations")
    volume, masks, names = pair.load()
    assert names == ["liver"] and volume.same_grid(glue.volume_from_node(node))
    np.testing.assert_array_equal(masks[0], liver)
    samples = training.samples_from_volumes([pair], tiny_model.spec)
    assert samples and all(s.prompts["p1"] == "liver" for s in samples)


def test_dicom_seg_export_from_a_dicom_loaded_volume(scene, tmp_path):
    import highdicom as hd
    from test_io import write_dicom_series

    v = Volume(blobs((4, 12, 14)), (0.8, 0.8, 3.0), (5.0, -5.0, 40.0), rotation(0, 0, 20))
    read = io.read_image(write_dicom_series(tmp_path / "series", v))
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    m = np.eye(4)
    m[:3, :3] = lps_to_ras @ read.direction @ np.diag(read.spacing)
    m[:3, 3] = lps_to_ras @ np.asarray(read.origin)
    node = volume_node(scene, read.array, m)
    seg = glue.new_segmentation(scene, node)
    glue.write_masks(seg, node, (read.array > 300)[None], ["liver"])
    glue.export_dicom_seg(seg, node, read.dicom_files, tmp_path / "seg.dcm")
    dcm = hd.seg.segread(str(tmp_path / "seg.dcm"))
    assert dcm.get_segment_description(1).segment_label == "liver"
    with pytest.raises(glue.InputError, match="DICOM"):
        glue.export_dicom_seg(seg, node, [], tmp_path / "x.dcm")


def _user_segment_editor(scene, segmentation):
    """The Segment Editor module's own node (SegmentEditor.py::selectParameterNode)."""
    scene.RegisterNodeClass(slicer.vtkMRMLSegmentEditorNode())
    node = scene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
    node.UnRegister(None)
    node.SetSingletonTag("SegmentEditor")
    node = scene.AddNode(node)
    node.SetAndObserveSegmentationNode(segmentation)
    return node


def test_apply_never_changes_other_segments_unless_allowed(scene):
    """Issue 11 point 7: a fresh editor node overwrites all segments; Apply must not."""
    from MedVLSMSlicerLib.session import Session, Settings

    node = volume_node(scene, blobs((4, 12, 12)), GEOMETRIES["oblique"])
    target = glue.new_segmentation(scene, node)
    drawn = np.zeros((4, 12, 12), bool)
    drawn[1:3, 2:9, 2:9] = True
    (manual,) = glue.write_masks(target, node, drawn[None], ["manual edit"])
    liver = np.zeros_like(drawn)
    liver[:, 5:12, 5:12] = True  # overlaps the drawn segment
    session = Session(scene)
    session.preview = glue.Preview(scene, node, liver[None], ["liver"])
    (sid,) = session.apply(target, Settings())
    np.testing.assert_array_equal(glue.read_segment(target, manual, node), drawn)
    np.testing.assert_array_equal(glue.read_segment(target, sid, node), liver)
    session.undo()
    assert target.GetSegmentation().GetSegmentIdBySegmentName("liver") == ""
    session.preview = glue.Preview(scene, node, liver[None], ["liver"])
    session.apply(target, Settings(modify_others=True))  # opted in: the overlap leaves the drawn segment
    np.testing.assert_array_equal(glue.read_segment(target, manual, node), drawn & ~liver)
    assert not glue.EditorSession(scene).node.GetSaveWithScene()


def test_apply_follows_the_users_segment_editor_masking(scene):
    from MedVLSMSlicerLib.session import Session, Settings

    node = volume_node(scene, blobs((4, 12, 12)), GEOMETRIES["flipped"])
    target = glue.new_segmentation(scene, node)
    region = np.zeros((4, 12, 12), bool)
    region[:, :6, :] = True
    (region_id,) = glue.write_masks(target, node, region[None], ["region"])
    user = _user_segment_editor(scene, target)
    user.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
    user.SetMaskSegmentID(region_id)
    session = Session(scene)
    session.preview = glue.Preview(scene, node, np.ones((1, 4, 12, 12), bool), ["liver"])
    (sid,) = session.apply(target, Settings())
    np.testing.assert_array_equal(glue.read_segment(target, sid, node), region)
    np.testing.assert_array_equal(glue.read_segment(target, region_id, node), region)


def test_settings_save_writes_only_what_changed_in_one_event(scene):
    from MedVLSMSlicerLib.session import Settings

    parameters = glue.parameter_node(scene)
    assert glue.parameter_node(scene) is parameters and parameters.GetAttribute("ModuleName") == "MedVLSMSlicer"
    Settings(prompts=["liver"]).save(parameters)
    events = []
    parameters.AddObserver(__import__("vtk").vtkCommand.ModifiedEvent, lambda *_: events.append(1))
    Settings(prompts=["liver"]).save(parameters)
    assert events == []
    Settings(prompts=["liver", "spleen"], plane="coronal").save(parameters)
    assert len(events) == 1 and Settings.load(parameters).plane == "coronal"


def test_slice_on_screen_is_found_without_copying_the_volume(scene):
    node = volume_node(scene, blobs((6, 12, 14)), GEOMETRIES["oblique"])
    geometry = glue.geometry_of_node(node)
    assert geometry.shape == (6, 12, 14)
    assert geometry.array.base is not None and geometry.array.strides == (0, 0, 0)


# ---- a working day: one patient after another, the panel and the Segment Editor mixed ----------

def _paint(user_logic, segmentation, volume, name, region):
    """A Segment Editor stroke: the editor saves its undo state (before Add segment too, as
    qMRMLSegmentEditorWidget::onAddSegment does), then writes through its logic."""
    user_logic.SetSegmentationNode(segmentation)
    user_logic.SaveStateForUndo()
    sid = segmentation.GetSegmentation().GetSegmentIdBySegmentName(name) or \
        segmentation.GetSegmentation().AddEmptySegment("", name)
    user_logic.ModifySegmentByLabelmap(segmentation, sid, glue._mask_in_segmentation_frame(region, volume, segmentation),
                                       slicer.vtkSlicerSegmentEditorLogic.ModificationModeSet, False, False)
    return sid


def _segments(segmentation, volume):
    seg = segmentation.GetSegmentation()
    return {seg.GetNthSegment(n).GetName(): glue.read_segment(segmentation, seg.GetNthSegmentID(n), volume)
            for n in range(seg.GetNumberOfSegments())}


def test_closing_the_scene_with_a_pending_preview_never_touches_the_next_patient(scene):
    """File > Close Scene (vtkMRMLScene::Clear(false)) resets the ID counters: the next patient's
    segmentation gets the preview's old ID. Discard, Run and Apply must not reach it."""
    from MedVLSMSlicerLib.session import Session, Settings

    session = Session(scene)
    first = volume_node(scene, blobs((4, 12, 12)), np.eye(4), "patient 1")
    session.preview = glue.Preview(scene, first, np.ones((1, 4, 12, 12), bool), ["liver"])
    preview_id = session.preview.node.GetID()
    scene.Clear(False)
    assert session.preview is None and session.last_result is None  # dropped with the scene
    second = volume_node(scene, blobs((4, 12, 12), seed=2), np.eye(4), "patient 2")
    users = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "patient 2 segmentation")
    users.CreateDefaultDisplayNodes()
    drawn = np.zeros((4, 12, 12), bool)
    drawn[1:3, 2:8, 2:8] = True
    glue.write_masks(users, second, drawn[None], ["tumour"])
    assert users.GetID() == preview_id  # the reuse that made the stale ID dangerous
    session.discard()
    with pytest.raises(glue.InputError, match="Nothing to apply"):
        session.apply(users, Settings())
    assert scene.IsNodePresent(users) and scene.IsNodePresent(users.GetDisplayNode())
    np.testing.assert_array_equal(_segments(users, second)["tumour"], drawn)
    session.preview = glue.Preview(scene, second, np.ones((1, 4, 12, 12), bool), ["liver"])  # the next Run
    (sid,) = session.apply(users, Settings())  # Apply after the close: a fresh private editor node
    assert session.editor.alive and set(_segments(users, second)) == {"tumour", "liver"}
    np.testing.assert_array_equal(_segments(users, second)["tumour"], drawn)


@pytest.mark.parametrize("order", ["apply-paint-undo-undo", "paint-apply-undo-undo"])
def test_apply_and_segment_editor_strokes_share_one_undo_history(scene, order):
    """Undo in the panel or in the Segment Editor undoes the last edit, whichever tool made it; Redo
    brings it back. No edit the user did not undo is ever lost."""
    from MedVLSMSlicerLib.session import Session, Settings

    node = volume_node(scene, blobs((4, 12, 12)), GEOMETRIES["oblique"])
    target = glue.new_segmentation(scene, node)
    user_logic = glue.headless_editor_history(scene).editor  # the Segment Editor's own logic
    session = Session(scene, editor_history=lambda: glue.EditorHistory(user_logic))
    liver, stroke = np.zeros((2, 4, 12, 12), bool)
    liver[:, 6:, :] = True
    stroke[1:3, :4, :4] = True
    states = [{}]

    def apply():
        session.preview = glue.Preview(scene, node, liver[None], ["liver"])
        session.apply(target, Settings())

    for step in order.split("-")[:2]:
        apply() if step == "apply" else _paint(user_logic, target, node, "stroke", stroke)
        states.append({k: v.copy() for k, v in _segments(target, node).items()})
    assert set(states[-1]) == {"liver", "stroke"}

    def same(state):
        now = _segments(target, node)
        return set(now) == set(state) and all(np.array_equal(now[k], state[k]) for k in state)

    session.undo()  # the panel's Undo: the last edit only, whichever tool made it
    assert same(states[1])
    user_logic.Undo()  # the Segment Editor's Undo: the edit before
    assert same(states[0])
    user_logic.Redo()
    assert same(states[1])
    session.redo()
    assert same(states[2])


def test_an_intensity_masked_apply_onto_another_grid_writes_or_says_why(scene):
    """vtkSlicerSegmentEditorLogic skips a write whose labelmap is not on the aligned source volume's
    grid (DoGeometriesMatch) when the editable intensity range is on: Apply used to report success
    with empty segments. The mask now goes onto that grid; a masking that excludes every proposed
    voxel is one line, and the scene is as before."""
    from MedVLSMSlicerLib.session import Session, Settings

    arr = np.zeros((4, 12, 12), np.int16)
    arr[:, :, 6:] = 200
    node = volume_node(scene, arr, matrix(np.eye(3), (1.0, 1.0, 2.0), (0, 0, 0)))
    other = volume_node(scene, np.zeros((8, 24, 24), np.int16), matrix(np.eye(3), (0.5, 0.5, 1.0), (0, 0, 0)), "other")
    target = glue.new_segmentation(scene, other, "on another grid")  # its geometry is not the volume's
    user = _user_segment_editor(scene, target)
    user.SetSourceVolumeIntensityMask(True)
    user.SetSourceVolumeIntensityMaskRange(100, 300)
    session = Session(scene)
    proposal = np.zeros((1, 4, 12, 12), bool)
    proposal[0, 1:3, 2:10, 2:10] = True
    session.preview = glue.Preview(scene, node, proposal, ["liver"])
    (sid,) = session.apply(target, Settings())
    np.testing.assert_array_equal(glue.read_segment(target, sid, node), proposal[0] & (arr >= 100))
    user.SetSourceVolumeIntensityMaskRange(1000, 2000)  # no voxel of the volume is that bright
    session.preview = glue.Preview(scene, node, proposal, ["spleen"])
    with pytest.raises(glue.InputError, match="intensity range"):
        session.apply(target, Settings())
    assert target.GetSegmentation().GetSegmentIdBySegmentName("spleen") == ""  # nothing half-done
    assert session.preview is not None  # the preview stays to be applied once the masking allows it
