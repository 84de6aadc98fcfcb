"""The README's Teach picture: the real prompt panel after teaching on a real CT, beside the CT slices.

    python bench/teach_figure.py [--epochs 30] [--output Resources/Screenshots/teach-lung-ct.png]

The pyradiomics lung CT (``../shared/data``, BSD-3) has a tumour on three axial slices. Here it is
labelled on two of them (32 and 34) and a few tumour-free slices are marked ``reviewed``, in a
slicer-core scene; the panel's Teach section (the module's own .ui and controllers, PySide6
offscreen: no Slicer desktop exists here) adapts a small CLIPSeg from random weights on them; then
Run segments the volume with the taught model. The picture is the panel as it looks then, and three
slices: the two labelled ones and the middle one, never labelled, with the reference (green) and the
taught model's result (red). A model taught on two slices of one case from random weights: it shows
the loop, not a validated model.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "pyradiomics"
sys.path.insert(0, str(ROOT / "Logic"))
sys.path.insert(0, str(ROOT / "MedVLSMSlicer"))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--size", default="small", help="CLIPSeg size from random weights")
    parser.add_argument("--output", default=str(ROOT / "Resources" / "Screenshots" / "teach-lung-ct.png"))
    args = parser.parse_args(argv)
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    import slicer
    from Qt import QtCore, QtWidgets

    from medvlsm import io
    from medvlsm.metrics import score
    from medvlsm.models.clipseg import CLIPSeg
    from medvlsm.overlay import OverlayStyle, save_overlay
    from medvlsm.volume import Volume
    from MedVLSMSlicerLib import mrml_glue as glue
    from MedVLSMSlicerLib import qt_compat
    from MedVLSMSlicerLib.panel import PanelController, ui_file
    from MedVLSMSlicerLib.session import Session
    from MedVLSMSlicerLib.teach_panel import TeachController

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    scene = slicer.vtkMRMLScene()
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if not factory.GetConverterRules():  # what the Segmentations module registers at Slicer's start
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
        factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "lung CT")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")  # Slicer's own volume reader
    storage.SetFileName(str(SHARED / "lung1_image.nrrd"))
    storage.ReadData(node)
    volume = glue.volume_from_node(node)
    label = io.read_image(SHARED / "lung1_label.nrrd")
    if not label.same_grid(volume):
        raise SystemExit("the label is not on the CT's grid as Slicer read it")
    truth = label.array > 0
    labels = np.zeros((2, *truth.shape), bool)
    labels[0, [32, 34]] = truth[[32, 34]]  # the tumour, labelled on two of its three slices
    for k in (12, 20, 26, 40, 46):
        labels[1, k, 0, 0] = True  # reviewed: no tumour here
    segmentation = glue.new_segmentation(scene, node, "lung CT labels")
    glue.write_masks(segmentation, node, labels, ["tumour", "reviewed"])
    work = Path(tempfile.mkdtemp(prefix="medvlsm-teach-figure-"))
    CLIPSeg.random(args.size, seed=0).save_pretrained(work / "clipseg-small")
    root = qt_compat.load_ui(ui_file())
    session = Session(scene)
    panel = PanelController(root, scene, session, registry_names=[])
    teach = TeachController(root, scene, panel, models_folder=str(work / "taught"))
    panel.add_model_folder(str(work / "clipseg-small"))
    panel.w("deviceCombo").setCurrentIndex(panel.w("deviceCombo").findText("cpu"))
    teach.ui["teachEpochsSpin"].setValue(args.epochs)
    teach.ui["teachCasesList"].item(0).setCheckState(QtCore.Qt.Checked)

    def settle(busy):
        while busy():
            app.processEvents()
            time.sleep(0.02)
        app.processEvents()

    teach.teach_or_cancel()
    settle(lambda: teach.running)
    taught = teach.ui["teachStatusLabel"].text()
    if not taught.startswith("Taught"):
        raise SystemExit(taught)
    panel.w("volumeCombo").setCurrentIndex(panel.w("volumeCombo").findText("lung CT"))
    panel.w("promptsEdit").setPlainText("tumour")
    panel.run_or_cancel()
    settle(lambda: panel.running)
    mask = session.preview.masks[0]
    middle = score(mask[33], truth[33])["dice"]
    root.resize(460, 1180)
    panel_png, slices_png = work / "panel.png", work / "slices.png"
    root.grab().save(str(panel_png))
    j, i = (int(np.mean(axis)) for axis in np.nonzero(truth[33]))
    crop = (slice(32, 35), slice(max(0, j - 80), j + 80), slice(max(0, i - 80), i + 80))  # 160 x 160 around it
    shown = Volume(volume.array[crop], volume.spacing, volume.origin, volume.direction)
    save_overlay(shown, np.stack([truth[crop], mask[crop]]), ["reference", "taught model, prompt 'tumour'"],
                 slices_png, OverlayStyle(plane="axial", count=3, window="lung", colors=((0.1, 0.8, 0.2), (0.95, 0.2, 0.2)),
                                          title=f"Slices 32, 33, 34 around the tumour. Labelled: 32 and 34; 33, never "
                                                f"labelled: Dice {middle:.2f}"))
    compose(panel_png, slices_png, args.output)
    teach.shutdown()
    panel.shutdown()
    print(f"{taught}\nslice 33 Dice {middle:.3f} -> {args.output}")
    return {"status": taught, "dice_slice_33": middle}


def compose(panel_png, slices_png, output) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panel, slices = plt.imread(str(panel_png)), plt.imread(str(slices_png))
    figure, (left, right) = plt.subplots(1, 2, figsize=(14, 8), gridspec_kw={"width_ratios": [1, 2.2]})
    for axis, image in ((left, panel), (right, slices)):
        axis.imshow(image)
        axis.axis("off")
    figure.tight_layout()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
