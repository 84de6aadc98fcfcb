"""3D Slicer module: segment what you type, with vision-language segmentation models.

Thin by design: the panel is ``MedVLSMSlicerLib.panel.PanelController`` (tested offscreen), the
MRML work is ``MedVLSMSlicerLib.mrml_glue`` / ``session`` (tested with slicer-core), the model
work is the ``medvlsm`` package. This file adds what only exists inside Slicer: the module
classes, the first-use install of Python requirements, slice-view geometry, file dialogs, and
the registration of the "Text prompt" Segment Editor effect.
"""

import logging
import os
import shutil
import sys

import qt
import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

MODULE_DIR = os.path.dirname(__file__)
REQUIREMENTS = os.path.join(MODULE_DIR, "Resources", "requirements.txt")
SLICE_VIEW_OF_PLANE = {"axial": "Red", "coronal": "Green", "sagittal": "Yellow"}


class MedVLSMSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedVLSM (text prompt)"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations", "SegmentEditor"]
        self.parent.contributors = ["MedVLSM-Slicer developers"]
        self.parent.helpText = (
            "Type what to segment (one structure per line) and a vision-language segmentation model "
            "(CLIPSeg; arXiv 2308.07706) segments it slice by slice on the volume's exact geometry. "
            "Preview, re-threshold instantly, Apply (undoable) or Discard. Also available as the "
            "'Text prompt' effect in the Segment Editor.")
        self.parent.acknowledgementText = (
            "Models: CLIPSeg (Lüddecke & Ecker 2022, weights by CIDAS, Apache-2.0). Study: Poudel et al., "
            "Exploring Transfer Learning in Medical Image Segmentation using Vision-Language Models.")
        slicer.app.connect("startupCompleted()", register_effect)


def register_effect():
    """Register the 'Text prompt' Segment Editor effect (scripted effects are registered at startup)."""
    import qSlicerSegmentationsEditorEffectsPythonQt as effects

    instance = effects.qSlicerSegmentEditorScriptedEffect(None)
    instance.setPythonSource(os.path.join(MODULE_DIR, "MedVLSMSlicerLib", "SegmentEditorEffect.py").replace("\\", "/"))
    instance.self().register()


def ensure_requirements(ask=True) -> bool:
    """Install the pinned requirements on first use, after the user agrees. Never at import time.

    numpy and SimpleITK come with Slicer and torch with the PyTorch extension: they are never
    reinstalled (they are not in requirements.txt). Returns True when everything is importable now.
    """
    try:
        import torch  # noqa: F401
    except ImportError:
        try:
            import PyTorchUtils  # the SlicerPyTorch extension picks the right CUDA/CPU build

            if ask and not slicer.util.confirmOkCancelDisplay(
                    "MedVLSM needs PyTorch. Install it now with the PyTorch extension (the right build for this "
                    "computer's GPU)? This can take several minutes."):
                return False
            PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False)
        except ImportError:
            slicer.util.errorDisplay("MedVLSM needs PyTorch: install the 'PyTorch' extension from the Extensions "
                                     "Manager, restart Slicer, and open this module again.")
            return False
    pydeps = getattr(slicer, "pydeps", None)  # Slicer >= 5.11
    if pydeps is not None:
        requirements = pydeps.load_requirements(REQUIREMENTS)
        satisfied = pydeps.pip_check(requirements)
    else:
        requirements, satisfied = None, _importable("transformers", "monai", "nrrd", "scipy", "tqdm", "matplotlib")
    if satisfied:
        return True
    if ask and not slicer.util.confirmOkCancelDisplay(
            "MedVLSM needs a few Python packages (transformers, monai ... pinned in requirements.txt; numpy, "
            "SimpleITK and torch are left as they are). Install them now?"):
        return False
    with _busy():
        if pydeps is not None:
            pydeps.pip_ensure(requirements, requester="MedVLSM")
        else:
            slicer.util.pip_install(f"-r {REQUIREMENTS}")
    if not _importable("transformers", "monai", "nrrd"):
        slicer.util.infoDisplay("The packages were installed; please restart Slicer to use them.")
        return False
    return True


def _importable(*modules) -> bool:
    import importlib

    try:
        for module in modules:
            importlib.import_module(module)
    except ImportError:
        return False
    return True


class _busy:
    def __enter__(self):
        qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)

    def __exit__(self, *exc):
        qt.QApplication.restoreOverrideCursor()
        return False


class MedVLSMSlicerLogic(ScriptedLoadableModuleLogic):
    """Callable without the GUI: ``MedVLSMSlicerLogic().segment(volumeNode, ["liver"])``."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._session = None

    @property
    def session(self):
        if self._session is None:
            from MedVLSMSlicerLib.session import Session

            self._session = Session(slicer.mrmlScene)
        return self._session

    def segment(self, volume_node, prompts, segmentation_node=None, model="", plane="axial", device="auto"):
        """Run synchronously and write one segment per prompt; returns the segmentation node."""
        from MedVLSMSlicerLib import mrml_glue as glue
        from MedVLSMSlicerLib.session import Settings

        settings = Settings(model=model, prompts=list(prompts), plane=plane, device=device)
        job = self.session.start(volume_node, settings)
        job.wait()
        self.session.collect(job, volume_node, settings)
        target = segmentation_node or glue.new_segmentation(slicer.mrmlScene, volume_node)
        self.session.apply(target, settings)
        return target


    def finetune(self, pairs, output, model="", epochs=30, plane="axial"):
        """Finetune on these segmentations, out of process (the GUI stays free).

        ``pairs``: [(volumeNode, segmentationNode), ...]. Exports them into OUTPUT/data, then runs
        ``PythonSlicer -m medvlsm.cli finetune ...``; progress goes to OUTPUT/finetune.log. Returns the
        process (``poll()`` is None while it runs). The result is a model folder: choose it under
        Model > Local folder... in the panel.
        """
        import subprocess

        from MedVLSMSlicerLib import mrml_glue as glue

        data = os.path.join(output, "data")
        for volume_node, segmentation_node in pairs:
            glue.export_training_pair(slicer.mrmlScene, volume_node, segmentation_node, data)
        python = shutil.which("PythonSlicer") or sys.executable
        argv = glue.finetune_command(python, data, output, model=model, epochs=epochs, plane=plane)
        logfile = open(os.path.join(output, "finetune.log"), "w", encoding="utf-8")
        return subprocess.Popen(argv, stdout=logfile, stderr=subprocess.STDOUT)


class MedVLSMSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.controller = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.logic = MedVLSMSlicerLogic()
        placeholder = qt.QPushButton("Set up MedVLSM (installs the Python packages it needs)")
        self.layout.addWidget(placeholder)
        placeholder.connect("clicked()", lambda: self._build(placeholder))
        self.layout.addStretch(1)
        try:  # already installed: build the panel at once, without asking anything
            import torch  # noqa: F401
            import transformers  # noqa: F401

            self._build(placeholder)
        except ImportError:
            pass

    def _build(self, placeholder):
        if not ensure_requirements():
            return
        from MedVLSMSlicerLib import qt_compat
        from MedVLSMSlicerLib.panel import PanelController, ui_file

        placeholder.hide()
        root = qt_compat.load_ui(ui_file())
        self.layout.insertWidget(0, root)
        self.controller = PanelController(
            root, slicer.mrmlScene, self.logic.session, self.logic.getParameterNode(),
            ask_folder=lambda: qt.QFileDialog.getExistingDirectory(None, "Model folder (save_pretrained format)"),
            ask_save_path=self._ask_save_path, current_slice=current_slice_index, dicom_files=dicom_files)
        for event in (slicer.mrmlScene.NodeAddedEvent, slicer.mrmlScene.NodeRemovedEvent):
            self.addObserver(slicer.mrmlScene, event, lambda *_: self.controller.refresh_nodes())

    @staticmethod
    def _ask_save_path(fmt):
        suffix = {".seg.nrrd": ".seg.nrrd", "DICOM SEG": ".dcm"}.get(fmt, ".nii.gz")
        return qt.QFileDialog.getSaveFileName(None, "Export segmentation", f"segmentation{suffix}",
                                              f"*{suffix}") or None

    def cleanup(self):
        self.removeObservers()
        if self.controller is not None and self.controller.running:
            self.controller.job.cancel()


def dicom_files(volume_node):
    """The DICOM file of each slice of a volume loaded through the DICOM module (else empty)."""
    uids = (volume_node.GetAttribute("DICOM.instanceUIDs") or "").split()
    database = getattr(slicer, "dicomDatabase", None)
    return [database.fileForInstance(uid) for uid in uids] if database is not None else []


def current_slice_index(volume_node, plane):
    """The slice shown in the plane's view (Red/Green/Yellow), in medvlsm's slice order."""
    from MedVLSMSlicerLib import mrml_glue as glue

    slice_node = slicer.app.layoutManager().sliceWidget(SLICE_VIEW_OF_PLANE[plane]).mrmlSliceNode()
    m = slice_node.GetSliceToRAS()
    return glue.view_slice_index(volume_node, [m.GetElement(r, 3) for r in range(3)], plane)


class MedVLSMSlicerTest(ScriptedLoadableModuleTest):
    """In-Slicer self-test: sample volume -> logic and effect end to end. The inference step is
    skipped, with a message, when no weights can be had (offline)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_geometry_round_trip()
        self.test_logic_and_effect()

    def test_geometry_round_trip(self):
        import numpy as np
        import SampleData
        from MedVLSMSlicerLib import mrml_glue as glue

        volume = SampleData.downloadSample("MRHead")
        v = glue.volume_from_node(volume)
        seg = glue.new_segmentation(slicer.mrmlScene, volume)
        mask = v.array > np.percentile(v.array, 90)
        (sid,) = glue.write_masks(seg, volume, mask[None], ["brain"])
        self.assertTrue(np.array_equal(glue.read_segment(seg, sid, volume), mask))
        self.delayDisplay("Geometry round trip passed")

    def test_logic_and_effect(self):
        import SampleData
        from medvlsm.errors import ModelError
        from medvlsm.models import load_model

        volume = SampleData.downloadSample("CTChest")
        try:
            load_model()
        except ModelError as e:
            self.delayDisplay(f"Inference skipped: {e}")
            return
        seg = MedVLSMSlicerLogic().segment(volume, ["lung"], plane="axial")
        self.assertEqual(seg.GetSegmentation().GetNthSegment(0).GetName(), "lung")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(seg)
        editor.setSourceVolumeNode(volume)
        editor.setActiveEffectByName("Text prompt")
        effect = editor.activeEffect()
        self.assertIsNotNone(effect, "the Text prompt effect is registered")
        logging.info("MedVLSM self-test passed")
        self.delayDisplay("MedVLSM logic and effect passed")
