"""The README's Teach picture: the real prompt panel after teaching on a real CT, beside the CT slices.

    python bench/teach_figure.py [--epochs 60] [--mode finetune|adapt] [--output Resources/Screenshots/teach-lung-ct.png]

The pyradiomics chest CT (``../shared/data``, BSD-3), in a slicer-core scene read by Slicer's own
volume reader. The lungs are labelled on five axial slices (8, 16, 24, 32, 40) — by a threshold
(below -400 HU, not connected to the air around the body), as a radiologist would paint them with
the Segment Editor's Threshold effect. The panel's Teach section (the module's own .ui and
controllers, PySide6 offscreen: no Slicer desktop exists here) finetunes a small CLIPSeg from random
weights on those slices; then Run segments the whole volume with the taught model. The picture is
the panel as it looks then, beside three slices that were never labelled with the threshold's lungs
(green) and the taught model's (red), and their Dice. A model taught on five slices of one case from
random weights: it shows the loop, not a validated model.
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
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--size", default="small", help="CLIPSeg size from random weights")
    parser.add_argument("--mode", default="finetune", choices=("adapt", "finetune"))
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
    truth = lungs(volume.array)
    labels = np.zeros((1, *truth.shape), bool)
    labels[0, LABELLED] = truth[LABELLED]
    segmentation = glue.new_segmentation(scene, node, "lung CT labels")
    glue.write_masks(segmentation, node, labels, ["lung"])
    work = Path(tempfile.mkdtemp(prefix="medvlsm-teach-figure-"))
    CLIPSeg.random(args.size, seed=0).save_pretrained(work / "clipseg-small")
    root = qt_compat.load_ui(ui_file())
    session = Session(scene)
    panel = PanelController(root, scene, session, registry_names=[])
    teach = TeachController(root, scene, panel, models_folder=str(work / "taught"))
    panel.add_model_folder(str(work / "clipseg-small"))
    panel.w("deviceCombo").setCurrentIndex(panel.w("deviceCombo").findText("cpu"))
    teach.ui["teachEpochsSpin"].setValue(args.epochs)
    teach.ui["teachModeCombo"].setCurrentIndex(0 if args.mode == "adapt" else 1)
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
    panel.w("promptsEdit").setPlainText("lung")
    panel.run_or_cancel()
    settle(lambda: panel.running)
    mask = session.preview.masks[0]
    unlabelled = [k for k in range(truth.shape[0]) if k not in LABELLED and truth[k].any()]
    dice = score(mask[unlabelled], truth[unlabelled])["dice"]
    root.resize(460, 1180)
    panel_png, slices_png = work / "panel.png", work / "slices.png"
    root.grab().save(str(panel_png))
    shown_slices = [12, 20, 28]  # never labelled
    shown = Volume(volume.array[shown_slices], volume.spacing, volume.origin, volume.direction)
    save_overlay(shown, np.stack([truth[shown_slices], mask[shown_slices]]),
                 ["lungs by threshold", "taught model, prompt 'lung'"], slices_png,
                 OverlayStyle(plane="axial", count=3, window="lung", colors=((0.1, 0.8, 0.2), (0.95, 0.2, 0.2)),
                              title=f"Axial slices {', '.join(map(str, shown_slices))}, never labelled (taught on "
                                    f"{', '.join(map(str, LABELLED))}). Dice on every unlabelled slice: {dice:.2f}"))
    compose(panel_png, slices_png, args.output)
    teach.shutdown()
    panel.shutdown()
    print(f"{taught}\nDice on the unlabelled slices {dice:.3f} -> {args.output}")
    return {"status": taught, "dice_unlabelled": dice}


LABELLED = [8, 16, 24, 32, 40]


def lungs(hu: np.ndarray) -> np.ndarray:
    """Below -400 HU and not connected, within its slice, to the air around the body."""
    from scipy import ndimage

    out = np.zeros(hu.shape, bool)
    for k in range(hu.shape[0]):
        parts, _ = ndimage.label(hu[k] < -400)
        outside = np.unique(np.concatenate([parts[0], parts[-1], parts[:, 0], parts[:, -1]]))
        out[k] = (parts > 0) & ~np.isin(parts, outside)
    return out


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
