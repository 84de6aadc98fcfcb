"""The prompt panel under a real Qt (PySide6 through Qt.py, offscreen) with a real MRML scene
(slicer-core) and a real tiny CLIPSeg: type, run, progress, cancel, re-threshold, apply, undo.

Stand-in: only the Slicer desktop application itself (not installable here); the panel's .ui and
controller are exactly those the module loads inside Slicer.
"""

import json
import os
import shutil
import time

import numpy as np
import pytest
from conftest import blobs

from medvlsm import io

pytest.importorskip("slicer", reason="slicer-core is part of Testing/requirements.txt")
QtWidgets = pytest.importorskip("Qt.QtWidgets", reason="Qt.py + PySide6 are part of Testing/requirements.txt")
pytestmark = [pytest.mark.qt, pytest.mark.slicer]

import slicer  # noqa: E402
from MedVLSMSlicerLib import mrml_glue as glue  # noqa: E402
from MedVLSMSlicerLib import qt_compat  # noqa: E402
from MedVLSMSlicerLib.panel import PanelController, ui_file  # noqa: E402
from MedVLSMSlicerLib.session import Session, Settings  # noqa: E402
from Qt import QtCore, QtTest  # noqa: E402


@pytest.fixture(scope="module")
def app():
    return QtWidgets.QApplication.instance() or QtWidgets.QApplication([])


@pytest.fixture
def scene():
    scene = slicer.vtkMRMLScene()
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if not factory.GetConverterRules():
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
        factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())
    return scene


def add_volume(scene, shape=(6, 48, 56), name="CT chest"):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, blobs(shape))
    node.SetSpacing(0.8, 0.8, 2.5)
    return node


class Panel:
    def __init__(self, app, scene, model, tmp_path):
        self.app, self.scene = app, scene
        self.root = qt_compat.load_ui(ui_file())
        self.param = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
        self.loads = []

        def loader(name):
            self.loads.append(name)
            return model

        self.session = Session(scene, model_loader=loader)
        self.exported = tmp_path / "export.seg.nrrd"
        self.c = PanelController(self.root, scene, self.session, self.param, registry_names=["tiny-clipseg"],
                                 ask_save_path=lambda fmt: str(self.exported))
        self.ui = self.c.ui

    def click(self, name):
        QtTest.QTest.mouseClick(self.ui[name], QtCore.Qt.LeftButton)

    def wait(self, timeout=60):
        end = time.time() + timeout
        while self.c.running and time.time() < end:
            self.app.processEvents()
            time.sleep(0.01)
        self.app.processEvents()
        assert not self.c.running, "the run did not finish"


@pytest.fixture
def panel(app, scene, tiny_model, tmp_path):
    return Panel(app, scene, tiny_model, tmp_path)


def node_ids(scene):
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


def test_type_run_preview_rethreshold_apply_undo(panel, tmp_path):
    volume = add_volume(panel.scene)
    panel.c.refresh_nodes()
    QtTest.QTest.keyClicks(panel.ui["promptsEdit"], "liver")
    panel.ui["promptsEdit"].appendPlainText("spleen")
    panel.click("runButton")
    assert panel.ui["runButton"].text() == "Cancel"
    panel.wait()
    assert panel.ui["runButton"].text() == "Run"
    assert panel.ui["progressBar"].value() == 100
    assert "Preview" in panel.ui["statusLabel"].text(), panel.ui["statusLabel"].text()
    preview = panel.session.preview
    assert preview is not None and preview.node.GetSegmentation().GetNumberOfSegments() == 2
    assert panel.ui["applyButton"].isEnabled()

    # re-threshold: instant, no model run
    calls = []
    engine = panel.session.engine("tiny-clipseg", "auto")
    original = engine.segment
    engine.segment = lambda *a, **k: calls.append(1) or original(*a, **k)
    slider, cuts = panel.ui["thresholdSlider"], []
    rethreshold = panel.session.rethreshold
    panel.session.rethreshold = lambda settings: cuts.append(settings.threshold) or rethreshold(settings)
    slider.setSliderDown(True)  # a drag: the label follows, the preview is re-cut once, on release
    for value in (90, 80, 70):
        slider.setSliderPosition(value)
    assert cuts == [] and panel.ui["thresholdValueLabel"].text() == "0.70"
    slider.setSliderDown(False)
    assert cuts == [pytest.approx(0.70)]
    del panel.session.rethreshold
    before = preview.masks.sum()
    panel.ui["thresholdSlider"].setValue(95)
    assert calls == [] and preview.masks.sum() <= before
    np.testing.assert_array_equal(preview.masks, panel.session.last_result.masks(0.95))

    # a new prompt on the same volume reuses the image features
    panel.ui["promptsEdit"].setPlainText("kidney")
    del engine.segment
    panel.click("runButton")
    panel.wait()
    assert panel.session.last_result.from_cache and "decoder only" in panel.ui["statusLabel"].text()
    assert panel.loads == ["tiny-clipseg"]  # the model was loaded once

    panel.click("applyButton")
    target = panel.c.selected_node("segmentationCombo")
    assert target is not None and target.GetSegmentation().GetNumberOfSegments() == 1
    assert target.GetSegmentation().GetNthSegment(0).GetName() == "kidney"
    assert panel.session.preview is None and panel.ui["undoButton"].isEnabled()
    np.testing.assert_array_equal(glue.read_segment(target, target.GetSegmentation().GetNthSegmentID(0), volume),
                                  panel.session.last_result.masks(0.95)[0])
    panel.click("exportButton")
    assert panel.exported.is_file() and "Exported" in panel.ui["statusLabel"].text()
    panel.click("undoButton")
    assert target.GetSegmentation().GetNumberOfSegments() == 0
    # history and settings live in the parameter node: a new panel shows them
    again = PanelController(qt_compat.load_ui(ui_file()), panel.scene, panel.session, panel.param,
                            registry_names=["tiny-clipseg"])
    assert again.ui["promptsEdit"].toPlainText() == "kidney"
    assert [again.ui["historyList"].item(i).text() for i in range(3)] == ["kidney", "spleen", "liver"]
    assert Settings.load(panel.param).threshold == pytest.approx(0.95)


def test_typing_a_prompt_encodes_the_current_slice_in_the_background(panel):
    volume = add_volume(panel.scene)
    panel.c.refresh_nodes()
    panel.ui["scopeCombo"].setCurrentIndex(panel.ui["scopeCombo"].findText("current slice"))
    QtTest.QTest.keyClicks(panel.ui["promptsEdit"], "liv")
    job = panel.c.prefetch_job
    assert job is not None and job.wait(60) and job.error is None
    QtTest.QTest.keyClicks(panel.ui["promptsEdit"], "er")
    assert panel.c.prefetch_job is job  # once per slice, not per keystroke
    panel.click("runButton")
    panel.wait()
    assert panel.session.last_result.from_cache  # the preview ran the decoder only
    assert panel.session.last_result.slice_range[1] - panel.session.last_result.slice_range[0] == 1
    assert panel.scene.GetNodeByID(volume.GetID()) is volume


def scene_snapshot(scene):
    """Every node's ID and its saved state (the scene as an MRML document), for exact comparisons."""
    scene.SetSaveToXMLString(1)
    scene.Commit()
    return node_ids(scene), scene.GetSceneXMLString()


def test_cancel_leaves_the_scene_as_it_was(panel):
    add_volume(panel.scene, shape=(400, 32, 32))
    panel.c.refresh_nodes()
    panel.ui["promptsEdit"].setPlainText("liver")
    before = scene_snapshot(panel.scene)
    panel.click("runButton")
    panel.click("runButton")  # now "Cancel"
    panel.wait()
    assert "cancelled" in panel.ui["statusLabel"].text().lower()
    assert panel.session.preview is None and scene_snapshot(panel.scene) == before
    assert not panel.ui["applyButton"].isEnabled()


def test_a_failed_run_leaves_the_scene_as_it_was(panel):
    add_volume(panel.scene)
    panel.c.refresh_nodes()

    def broken(name):
        raise RuntimeError("weights file is damaged")

    panel.session._load_model = broken
    panel.ui["deviceCombo"].setCurrentIndex(panel.ui["deviceCombo"].findText("cpu"))  # a new engine is loaded
    panel.ui["promptsEdit"].setPlainText("liver")
    panel.c.read_settings()  # the panel's settings as they stand when Run is pressed
    before = scene_snapshot(panel.scene)
    panel.click("runButton")
    panel.wait()
    assert "weights file is damaged" in panel.ui["statusLabel"].text()
    assert scene_snapshot(panel.scene) == before


def test_export_is_atomic_and_never_leaves_a_partial_file(panel, monkeypatch):
    volume = add_volume(panel.scene)
    target = glue.new_segmentation(panel.scene, volume)
    glue.write_masks(target, volume, blobs((6, 48, 56))[None] > 300, ["liver"])
    panel.c.refresh_nodes()
    panel.ui["segmentationCombo"].setCurrentIndex(panel.ui["segmentationCombo"].findText(target.GetName()))
    panel.exported.write_bytes(b"earlier export")
    monkeypatch.setattr(glue, "_write_with_storage_node", lambda writer, node, path: False)  # e.g. a full disk
    panel.click("exportButton")
    assert "Could not write" in panel.ui["statusLabel"].text()
    assert panel.exported.read_bytes() == b"earlier export"
    assert [p.name for p in panel.exported.parent.iterdir() if ".tmp" in p.name] == []
    monkeypatch.undo()
    panel.click("exportButton")
    assert panel.ui["statusLabel"].text().startswith("Exported")
    assert io.read_seg_nrrd(panel.exported).names == ["liver"]


def test_discard_and_errors_are_one_line_in_the_panel(panel):
    panel.ui["promptsEdit"].setPlainText("liver")
    panel.click("runButton")
    assert panel.ui["statusLabel"].text().startswith("No input volume.") and not panel.c.running
    add_volume(panel.scene)
    panel.c.refresh_nodes()
    panel.ui["promptsEdit"].setPlainText("")
    panel.click("runButton")
    assert panel.ui["statusLabel"].text().startswith("No prompt.")
    panel.ui["promptsEdit"].setPlainText("liver")
    panel.ui["scopeCombo"].setCurrentIndex(panel.ui["scopeCombo"].findText("slice range"))
    panel.ui["sliceStartSpin"].setValue(4)
    panel.ui["sliceStopSpin"].setValue(99)
    panel.click("runButton")
    assert "outside" in panel.ui["statusLabel"].text() and "\n" not in panel.ui["statusLabel"].text()
    panel.ui["scopeCombo"].setCurrentIndex(panel.ui["scopeCombo"].findText("current slice"))
    before = node_ids(panel.scene)
    panel.click("runButton")
    panel.wait()
    assert panel.session.last_result.slice_range == (3, 4)  # the middle slice without a view
    panel.click("discardButton")
    assert node_ids(panel.scene) == before and panel.ui["statusLabel"].text() == "Preview discarded."


def test_prompt_builder_and_history(panel):
    panel.ui["builderGroup"].setChecked(True)
    QtTest.QTest.keyClicks(panel.ui["classEdit"], "polyp")
    QtTest.QTest.keyClicks(panel.ui["shapeEdit"], "round")
    QtTest.QTest.keyClicks(panel.ui["colorEdit"], "pink")
    panel.ui["sizeCombo"].setCurrentIndex(panel.ui["sizeCombo"].findText("small"))
    QtTest.QTest.keyClicks(panel.ui["numberEdit"], "one")
    QtTest.QTest.keyClicks(panel.ui["locationEdit"], "center")
    items = [panel.ui["ladderList"].item(i).text() for i in range(panel.ui["ladderList"].count())]
    assert "p6: one small pink round polyp, located in center of the image" in items
    row = items.index("p3: pink round polyp")
    item = panel.ui["ladderList"].item(row)
    rect = panel.ui["ladderList"].visualItemRect(item)
    panel.root.show()
    QtTest.QTest.mouseClick(panel.ui["ladderList"].viewport(), QtCore.Qt.LeftButton, QtCore.Qt.NoModifier,
                            rect.center())
    assert panel.ui["promptsEdit"].toPlainText() == "pink round polyp"
    panel.root.hide()


def test_screenshot_of_the_panel(panel, tmp_path):
    """Renders the panel offscreen after a run; MEDVLSM_SCREENSHOT_DIR keeps a copy for the README."""
    add_volume(panel.scene)
    panel.c.refresh_nodes()
    panel.ui["promptsEdit"].setPlainText("liver\nleft kidney")
    panel.ui["builderGroup"].setChecked(True)
    QtTest.QTest.keyClicks(panel.ui["classEdit"], "polyp")
    QtTest.QTest.keyClicks(panel.ui["shapeEdit"], "round")
    panel.click("runButton")
    panel.wait()
    panel.root.resize(440, 980)
    path = tmp_path / "panel.png"
    assert panel.root.grab().save(str(path))
    assert path.stat().st_size > 10_000
    target = os.environ.get("MEDVLSM_SCREENSHOT_DIR")
    if target:
        shutil.copy(path, os.path.join(target, "panel.png"))


def test_the_panel_shows_the_settings_of_a_loaded_scene(panel):
    """A scene loaded or closed brings its own parameter node values (the widget re-reads them)."""
    Settings(prompts=["spleen", "liver"], plane="coronal", min_voxels=50, modify_others=True).save(panel.param)
    events = []
    panel.param.AddObserver(__import__("vtk").vtkCommand.ModifiedEvent, lambda *_: events.append(1))
    panel.c.reload_settings()
    assert panel.ui["promptsEdit"].toPlainText() == "spleen\nliver"
    assert panel.ui["planeCombo"].currentText() == "coronal" and panel.ui["minSizeSpin"].value() == 50
    assert panel.ui["modifyOthersCheck"].isChecked()
    assert events == []  # showing the settings does not write them back half-updated


def test_compute_on_a_server_previews_and_applies_like_a_local_run(panel, tiny_model_dir):
    """Compute: a `medvlsm serve` URL (real HTTP on localhost, the same tiny model): the preview holds
    the masks a local run makes, Apply writes them, and no model is loaded on this computer."""
    from test_server import LiveServer

    from medvlsm.server import ServerConfig, create_app

    live = LiveServer(create_app(ServerConfig(models={"tiny-clipseg": str(tiny_model_dir)}, device="cpu")))
    try:
        volume = add_volume(panel.scene)
        panel.c.refresh_nodes()
        panel.ui["serverEdit"].setText(live.url)
        panel.ui["promptsEdit"].setPlainText("liver\nspleen")  # typing prefetches nothing: the server encodes
        panel.click("runButton")
        panel.wait()
        assert "Preview" in panel.ui["statusLabel"].text(), panel.ui["statusLabel"].text()
        assert panel.loads == []  # the server ran it
        remote = panel.session.last_result
        local = panel.session.engine("tiny-clipseg", "cpu").segment(glue.volume_from_node(volume), remote.request)
        np.testing.assert_array_equal(panel.session.preview.masks, local.masks())
        panel.click("applyButton")
        target = panel.c.selected_node("segmentationCombo")
        segment_id = target.GetSegmentation().GetNthSegmentID(0)
        np.testing.assert_array_equal(glue.read_segment(target, segment_id, volume), local.masks()[0])
        assert Settings.load(panel.param).server == live.url
    finally:
        live.stop()


def test_all_three_planes_in_the_panel(panel):
    """Planes: all three: the whole volume only, its cost said at Run, then a preview on the volume's voxels."""
    volume = add_volume(panel.scene)
    panel.c.refresh_nodes()
    panel.ui["planeCombo"].setCurrentIndex(panel.ui["planeCombo"].findText("all three (slower)"))
    panel.ui["scopeCombo"].setCurrentIndex(panel.ui["scopeCombo"].findText("current slice"))
    panel.ui["promptsEdit"].setPlainText("liver")
    panel.click("runButton")
    assert "belongs to one plane" in panel.ui["statusLabel"].text() and not panel.c.running
    panel.ui["scopeCombo"].setCurrentIndex(panel.ui["scopeCombo"].findText("whole volume"))
    panel.click("runButton")
    k, j, i = glue.volume_from_node(volume).shape  # an axial volume: axial K, coronal J, sagittal I slices
    note = f"all three planes: {k} axial + {j} coronal + {i} sagittal slices, {(k + j + i) / k:.1f}x one axial run"
    assert panel.ui["statusLabel"].text() == f"Segmenting 'liver' - {note}..."
    job = panel.c.job
    job.report(3, k + j + i)  # as the engine does after a batch: the cost stays in sight while it runs
    assert job.phase == f"Segmenting: 3/{k + j + i} slices - {note}"
    panel.wait()
    result = panel.session.last_result
    assert result.plane == "all" and Settings.load(panel.param).plane == "all"
    np.testing.assert_array_equal(panel.session.preview.masks, result.masks())
    assert result.grid.same_grid(glue.volume_from_node(volume))


def test_an_image_only_model_and_an_unrecognised_prompt_say_so(app, scene, tmp_path):
    """The UNet baseline selected under Model: the prompt box and the status say the text is ignored.
    A prompt the model answers with nothing: an empty preview and a line that says so, not a region.
    (A UNet whose output layer is biased to "nothing" stands in for a model that does not recognise a
    prompt; no pretrained weights are reachable here.)"""
    import torch
    from medvlsm.models import ARCHITECTURES

    unet = ARCHITECTURES["unet"].random("tiny")
    folder = tmp_path / "unet-baseline"
    unet.save_pretrained(folder)
    with torch.no_grad():
        unet.hf.unet.final_conv.bias.fill_(-100.0)
    panel = Panel(app, scene, unet, tmp_path)
    add_volume(scene)
    panel.c.refresh_nodes()
    edit = panel.ui["promptsEdit"]
    assert "image-only" not in edit.placeholderText()
    panel.c.add_model_folder(str(folder))
    assert "image-only" in edit.placeholderText() and "ignores the text" in panel.ui["statusLabel"].text()
    edit.setPlainText("liver")
    panel.click("runButton")
    panel.wait()
    status = panel.ui["statusLabel"].text()
    assert "liver: 0 voxels" in status and "Nothing found for 'liver'" in status, status
    assert "ignores the prompt" in status
    assert panel.session.preview is not None and not panel.session.preview.masks.any()
    panel.c.add_model_folder("tiny-clipseg")  # back to a VLSM: the box's own hint returns
    assert "image-only" not in edit.placeholderText()
    panel.c.shutdown()


def labelled_case(scene, name="patient1"):
    """A volume with liver labelled on axial slices 1, 3, 5 and spleen on 3 (partial labels), and slice
    7 marked reviewed: the Teach section's data."""
    volume = add_volume(scene, shape=(10, 32, 36), name=name)
    segmentation = glue.new_segmentation(scene, volume, f"{name} labels")
    liver, spleen, reviewed = (np.zeros((10, 32, 36), bool) for _ in range(3))
    for k in (1, 3, 5):
        liver[k, 6:16, 6:18] = True
    spleen[3, 20:28, 22:32] = True
    reviewed[7, 0, 0] = True
    glue.write_masks(segmentation, volume, np.stack([liver, spleen, reviewed]), ["liver", "spleen", "reviewed"])
    return volume, segmentation


def test_teach_adapts_on_the_scene_s_labels_draws_the_curve_and_the_next_run_uses_the_new_model(
        panel, tiny_model_dir, tmp_path):
    from MedVLSMSlicerLib.teach_panel import TeachController

    models = tmp_path / "models"
    charts = []
    teach = TeachController(panel.root, panel.scene, panel.c, models_folder=str(models), show_chart=charts.append)
    volume, segmentation = labelled_case(panel.scene)
    panel.c.refresh_nodes()
    teach.refresh()
    panel.c.add_model_folder(str(tiny_model_dir))
    panel.ui["teachEpochsSpin"].setValue(2)
    panel.click("teachButton")  # nothing ticked
    assert panel.ui["teachStatusLabel"].text() == ("No segmentation chosen to teach on. Tick at least one "
                                                   "segmentation under Teach.") and not teach.running
    panel.ui["teachCasesList"].item(0).setCheckState(QtCore.Qt.Checked)
    panel.click("teachButton")
    assert teach.running and panel.ui["teachButton"].text() == "Cancel"
    wait_for(panel.app, teach)
    status = panel.ui["teachStatusLabel"].text()
    folder = models / "clipseg-tiny-taught-1"
    assert status.startswith("Taught clipseg-tiny-taught-1: held-out Dice") and "random weights" in status
    assert (folder / "model.safetensors").is_file() and not (folder / "checkpoint").exists()
    assert [p.name for p in models.iterdir()] == [folder.name]  # no staging folder left
    card = json.loads((folder / "medvlsm.json").read_text(encoding="utf-8"))
    assert card["prompts"] == ["liver", "spleen"] and card["cases"] == ["patient1 labels"]
    assert card["labels"] == "partial" and card["name"] == folder.name
    (chart,) = charts
    assert chart.GetNumberOfPlotSeriesNodes() == 2 and panel.scene.IsNodePresent(chart)
    table = chart.GetNthPlotSeriesNode(1).GetTableNode().GetTable()
    assert table.GetNumberOfRows() == 2  # one row per epoch, filled while it ran
    assert 0.0 <= table.GetValue(1, 2) <= 1.0  # the held-out Dice column
    assert panel.ui["modelCombo"].currentText() == str(folder)
    assert panel.ui["modelCombo"].findText(str(tiny_model_dir)) >= 0  # the model before: one click away
    panel.ui["volumeCombo"].setCurrentIndex(panel.ui["volumeCombo"].findText(volume.GetName()))
    panel.ui["promptsEdit"].setPlainText("liver")
    panel.click("runButton")
    panel.wait()
    assert panel.loads[-1] == str(folder)  # the next Run uses the taught model


def test_cancelled_teach_leaves_no_model_and_the_scene_as_it_was(panel, tiny_model_dir, tmp_path):
    from MedVLSMSlicerLib.teach_panel import TeachController

    models = tmp_path / "models"
    teach = TeachController(panel.root, panel.scene, panel.c, models_folder=str(models))
    labelled_case(panel.scene)
    teach.refresh()
    panel.c.add_model_folder(str(tiny_model_dir))
    panel.ui["teachEpochsSpin"].setValue(200)
    panel.ui["teachCasesList"].item(0).setCheckState(QtCore.Qt.Checked)
    panel.c.read_settings()  # the panel's choices go into its parameter node on any press, Run as Teach
    before = scene_snapshot(panel.scene)
    panel.click("teachButton")
    while teach.running and not teach.job.curve:  # cancel once the curve has its first row
        panel.app.processEvents()
        time.sleep(0.01)
    panel.click("teachButton")  # "Cancel"
    wait_for(panel.app, teach)
    assert panel.ui["teachStatusLabel"].text() == "Teaching cancelled: no model was kept."
    assert scene_snapshot(panel.scene) == before  # the curve's nodes went with it
    assert not models.exists() or list(models.iterdir()) == []
    assert panel.ui["modelCombo"].currentText() == str(tiny_model_dir)


def wait_for(app, teach, timeout=120):
    end = time.time() + timeout
    while teach.running and time.time() < end:
        app.processEvents()
        time.sleep(0.01)
    assert not teach.running, "teaching did not finish"


def test_teach_with_compute_on_a_server_makes_the_client_s_model_there(panel, tiny_model_dir, tmp_path):
    """Compute: a `medvlsm serve --teach-dir` URL: Teach uploads the case, trains there, and selects the
    server's new model (this client's alone) under Model; the next Run names it there."""
    from test_server import LiveServer

    from medvlsm.server import ServerConfig, create_app
    from MedVLSMSlicerLib.teach_panel import TeachController

    live = LiveServer(create_app(ServerConfig(models={"tiny-clipseg": str(tiny_model_dir)}, device="cpu",
                                              teach_dir=str(tmp_path / "server-models"))))
    try:
        teach = TeachController(panel.root, panel.scene, panel.c, models_folder=str(tmp_path / "local"))
        volume, _ = labelled_case(panel.scene)
        panel.c.refresh_nodes()
        teach.refresh()
        panel.ui["serverEdit"].setText(live.url)
        panel.ui["teachEpochsSpin"].setValue(1)
        panel.ui["teachCasesList"].item(0).setCheckState(QtCore.Qt.Checked)
        panel.click("teachButton")
        wait_for(panel.app, teach)
        status = panel.ui["teachStatusLabel"].text()
        assert status.startswith("Taught tiny-clipseg-taught-1 on the server (yours alone there)"), status
        assert panel.ui["modelCombo"].currentText() == "tiny-clipseg-taught-1"
        assert not (tmp_path / "local").exists() and panel.loads == []  # nothing trained or loaded here
        panel.ui["volumeCombo"].setCurrentIndex(panel.ui["volumeCombo"].findText(volume.GetName()))
        panel.ui["promptsEdit"].setPlainText("liver")
        panel.click("runButton")
        panel.wait()
        assert panel.session.last_result.model_name == "tiny-clipseg-taught-1"
    finally:
        live.stop()


def test_teach_also_reads_a_folder_of_labelled_cases(panel, tiny_model_dir, tmp_path):
    import SimpleITK as sitk

    from medvlsm.volume import Volume
    from MedVLSMSlicerLib.teach_panel import TeachController

    teach = TeachController(panel.root, panel.scene, panel.c, models_folder=str(tmp_path / "models"))
    panel.c.add_model_folder(str(tiny_model_dir))
    panel.ui["teachEpochsSpin"].setValue(1)
    panel.ui["teachFolderEdit"].setText(str(tmp_path / "nowhere"))
    panel.click("teachButton")
    assert panel.ui["teachStatusLabel"].text().startswith(f"{tmp_path / 'nowhere'} has no volumes/ and segmentations/")
    cases = tmp_path / "cases"
    (cases / "volumes").mkdir(parents=True), (cases / "segmentations").mkdir()
    volume = Volume(blobs((8, 24, 28), seed=6), (0.9, 0.9, 3.0))
    liver = np.zeros(volume.shape, bool)
    liver[[1, 3, 5], 4:12, 5:15] = True
    sitk.WriteImage(io.volume_to_sitk(volume), str(cases / "volumes" / "case1.nrrd"))
    io.write_seg_nrrd(volume, liver[None], ["liver"], cases / "segmentations" / "case1.seg.nrrd")
    panel.ui["teachFolderEdit"].setText(str(cases))
    panel.click("teachButton")  # nothing ticked in the scene: the folder alone
    wait_for(panel.app, teach)
    assert panel.ui["teachStatusLabel"].text().startswith("Taught clipseg-tiny-taught-1"), panel.ui["teachStatusLabel"].text()
    card = json.loads((tmp_path / "models" / "clipseg-tiny-taught-1" / "medvlsm.json").read_text(encoding="utf-8"))
    assert card["cases"] == ["case1"] and card["prompts"] == ["liver"]
