"""3D Slicer module: segment what you type, with vision-language segmentation models.

Thin by design: the panel is ``MedVLSMSlicerLib.panel.PanelController`` (tested offscreen), the
MRML work is ``MedVLSMSlicerLib.mrml_glue`` / ``session`` (tested with slicer-core), the model
work is the ``medvlsm`` package. This file adds what only exists inside Slicer: the module
classes, the version check, the first-use install of Python requirements, slice-view geometry,
file dialogs, and the registration of the "Text prompt" Segment Editor effect.

Needs Slicer >= 5.10 (vtkSlicerSegmentEditorLogic, vtkSegment::SetTerminology, Python 3.12).
``Testing/slicer_app.py`` loads this file the way Slicer's C++ loaders do; every Slicer call made
here is listed with the version it exists since in docs/slicer.md ("Slicer APIs used").
"""

import logging
import os
import sys

import qt
import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
MINIMUM_SLICER = (5, 10)
EFFECT_SOURCE = os.path.join(MODULE_DIR, "SegmentEditorTextPromptLib", "SegmentEditorEffect.py")
SLICE_VIEW_OF_PLANE = {"axial": "Red", "coronal": "Green", "sagittal": "Yellow"}
# Packages Slicer or its PyTorch extension install: pinned to the installed version while our
# requirements are installed, so that pip can never replace them (a replaced numpy or torch
# breaks Slicer or the GPU build the PyTorch extension chose).
SHIPPED = ("torch", "numpy", "SimpleITK", "scipy", "pydicom", "highdicom", "pillow", "requests")


def _put_medvlsm_on_path():
    """Slicer puts only this module's folder on ``sys.path``. The extension's CMake install copies the
    ``medvlsm`` package next to this file; in a checkout (the module folder added under Additional
    module paths) it is ``../Logic/medvlsm``."""
    for folder in (MODULE_DIR, os.path.join(os.path.dirname(MODULE_DIR), "Logic")):
        if os.path.isfile(os.path.join(folder, "medvlsm", "__init__.py")):
            if folder not in sys.path:
                sys.path.append(folder)
            return


_put_medvlsm_on_path()


def slicer_version():
    return int(slicer.app.majorVersion), int(slicer.app.minorVersion)


def version_problem():
    """A sentence for the user when this Slicer is too old, else empty."""
    if slicer_version() >= MINIMUM_SLICER:
        return ""
    have, need = ".".join(map(str, slicer_version())), ".".join(map(str, MINIMUM_SLICER))
    return (f"MedVLSM needs 3D Slicer {need} or newer (this is {have}): install the current stable Slicer "
            "from download.slicer.org.")


class MedVLSMSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedVLSM (text prompt)"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["MedVLSM-Slicer developers"]
        self.parent.helpText = (
            "Type what to segment (one structure per line) and a vision-language segmentation model "
            "(CLIPSeg, CRIS, BiomedCLIPSeg; arXiv 2308.07706) segments it slice by slice on the volume's exact "
            "geometry. Preview, re-threshold instantly, Apply (undoable; other segments are never changed "
            "unless you allow it) or Discard. Also available as the 'Text prompt' effect in the Segment Editor.")
        self.parent.acknowledgementText = (
            "Models: CLIPSeg (Lüddecke & Ecker 2022, weights by CIDAS, Apache-2.0). Study: Poudel et al., "
            "Exploring Transfer Learning in Medical Image Segmentation using Vision-Language Models.")
        from medvlsm.resources import resource

        icon = resource("Icons", "MedVLSMSlicer.png")
        if icon.is_file():  # Slicer looks in <module folder>/Resources, which a checkout does not have
            self.parent.icon = qt.QIcon(str(icon))
        if version_problem():
            self.parent.helpText = version_problem()
            return
        slicer.app.connect("startupCompleted()", register_effect)


def register_effect():
    """Register the 'Text prompt' Segment Editor effect (scripted effects are registered at startup).

    Slicer loads the effect file as a module named after its folder; that folder
    (``SegmentEditorTextPromptLib``) holds nothing else, so the name shadows nothing.
    """
    import qSlicerSegmentationsEditorEffectsPythonQt as effects

    instance = effects.qSlicerSegmentEditorScriptedEffect(None)
    instance.setPythonSource(EFFECT_SOURCE.replace("\\", "/"))
    instance.self().register()


# ---- first-use install -------------------------------------------------------------------------

def _installed_versions(names):
    import importlib.metadata

    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def write_constraints(folder):
    """A pip constraints file pinning what Slicer and the PyTorch extension already installed."""
    path = os.path.join(folder, "medvlsm-constraints.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(f"{name}=={version}\n" for name, version in _installed_versions(SHIPPED).items())
    return path


def missing_requirements(requirements_file):
    """The requirement lines this Python does not satisfy (``packaging``, as pip decides)."""
    import importlib.metadata

    from packaging.requirements import Requirement

    missing = []
    with open(requirements_file, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            requirement = Requirement(line)
            try:
                installed = importlib.metadata.version(requirement.name)
            except importlib.metadata.PackageNotFoundError:
                missing.append(line)
                continue
            if not requirement.specifier.contains(installed, prereleases=True):
                missing.append(line)
    return missing


def installed_distributions():
    """Every installed distribution: ``{name: version}`` (what pip may change, dependencies included)."""
    import importlib.metadata

    return {dist.metadata["Name"]: dist.version for dist in importlib.metadata.distributions() if dist.metadata["Name"]}


def needs_restart(before, after):
    """Distributions that changed (upgraded, downgraded, installed as a dependency) while one of their
    modules is already imported in this session: the old code stays loaded until Slicer restarts."""
    import importlib.metadata

    modules_of: dict = {}
    for module, names in importlib.metadata.packages_distributions().items():
        for name in names:
            modules_of.setdefault(name.lower(), set()).add(module)
    imported = {name.split(".")[0] for name in sys.modules}
    return sorted(name for name, version in after.items() if before.get(name) != version
                  and (modules_of.get(name.lower(), {name.replace("-", "_")}) & imported))


def ensure_requirements(ask=True) -> bool:
    """Install torch (through the PyTorch extension) and the requirements on first use, after the
    user agrees; never at import. Returns True when the module can run now without a restart."""
    try:
        import torch  # noqa: F401
    except ImportError:
        try:
            import PyTorchUtils  # the SlicerPyTorch extension picks the right CUDA/CPU build
        except ImportError:
            slicer.util.errorDisplay("MedVLSM needs PyTorch: install the 'PyTorch' extension from the Extensions "
                                     "Manager, restart Slicer, and open this module again.")
            return False
        if ask and not slicer.util.confirmOkCancelDisplay(
                "MedVLSM needs PyTorch. Install it now with the PyTorch extension (the right build for this "
                "computer's GPU)? This can take several minutes."):
            return False
        try:
            PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False)
        except Exception as e:  # offline, a proxy, no disk space: one line, details in the Python console
            logging.error("Installing PyTorch failed", exc_info=e)
            slicer.util.errorDisplay(f"Installing PyTorch failed ({e.__class__.__name__}: {str(e)[:200]}). Check the "
                                     "internet connection (or install PyTorch from the PyTorch module), then open "
                                     "MedVLSM again. Details are in the Python console.")
            return False
        if not _installed_versions(["torch"]):
            slicer.util.errorDisplay("PyTorch is still not installed. Install it from the PyTorch module "
                                     "(Utilities > PyTorch Utils), then open MedVLSM again.")
            return False
    from medvlsm.resources import resource

    requirements = str(resource("requirements.txt"))
    missing = missing_requirements(requirements)
    if not missing:
        return True
    if ask and not slicer.util.confirmOkCancelDisplay(
            "MedVLSM needs these Python packages: " + ", ".join(missing) + ". Install them now? Packages that "
            "Slicer and the PyTorch extension already have (numpy, torch, scipy, pydicom ...) are left as they are."):
        return False
    import tempfile

    before = installed_distributions()
    with tempfile.TemporaryDirectory() as folder:
        constraints = write_constraints(folder)
        try:
            install(requirements, constraints)
        except Exception as e:  # pip's own message is in the log / progress dialog
            slicer.util.errorDisplay(f"Installing MedVLSM's Python packages failed: {e}. Check the internet "
                                     "connection, then open this module again.")
            return False
    after = installed_distributions()
    if after == before and slicer.app.testingEnabled():  # slicer.packaging skips installs in --testing
        slicer.util.errorDisplay("Slicer runs in testing mode, where extensions install no Python packages; "
                                 f"MedVLSM needs {', '.join(missing)}. Install them first, or start Slicer without "
                                 "--testing.")
        return False
    stale = needs_restart(before, after)
    if stale or missing_requirements(requirements):
        slicer.util.infoDisplay("MedVLSM's Python packages were installed; restart Slicer to use them"
                                + (f" ({', '.join(stale)} were already loaded in another version)." if stale else "."))
        return False
    return True


def install(requirements, constraints):
    """pip through Slicer's own helpers: ``slicer.packaging.pip_ensure`` (Slicer >= 5.11: progress
    dialog, its own restart prompt) or ``slicer.util.pip_install`` with an argument list (5.10; a
    list keeps paths with spaces, such as Slicer's default Windows install folder, intact)."""
    try:
        import slicer.packaging as packaging  # a submodule since 5.11: it must be imported explicitly
    except ImportError:
        packaging = None
    if packaging is not None and hasattr(packaging, "pip_ensure"):
        # the user agreed already (prompt_install); the restart question is ours, asked once, with the
        # packages that need it (prompt_restart); in --testing it installs nothing (skip_in_testing)
        packaging.pip_ensure(packaging.load_requirements(requirements), constraints=constraints,
                             prompt_install=False, prompt_restart=False, requester="MedVLSM")
    else:
        slicer.util.pip_install(["-r", requirements, "-c", constraints])


# ---- the module's logic, widget and self-test ----------------------------------------------------

class MedVLSMSlicerLogic(ScriptedLoadableModuleLogic):
    """Callable without the GUI: ``MedVLSMSlicerLogic().segment(volumeNode, ["liver"])``."""

    @property
    def session(self):
        from MedVLSMSlicerLib.session import shared_session

        return shared_session(slicer.mrmlScene, editor_history=segment_editor_history)

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

    def teach(self, segmentation_nodes, model="", mode="adapt", epochs=10, plane="axial", labels="partial",
              device="auto", models_folder=""):
        """Teach a new model on these segmentations (each over its volume; segment names = prompts), in
        the background, with the code the panel's Teach runs. Returns the job: ``job.done``,
        ``job.curve`` (one row per epoch), ``job.result`` = (model folder, summary); ``job.cancel()``
        leaves no folder. In the Python console, ``job.wait()`` blocks Slicer until it ends."""
        from medvlsm.teaching import TeachSettings
        from MedVLSMSlicerLib.teach import scene_cases, teach

        settings = TeachSettings(mode=mode, epochs=epochs, plane=plane, labels=labels, device=device)
        return teach(scene_cases(segmentation_nodes), model, settings, models_folder)


class MedVLSMSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.controller = None
        self.teach = None
        self.logic = None
        self.placeholder = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        if version_problem():
            label = qt.QLabel(version_problem())
            label.setWordWrap(True)
            self.layout.addWidget(label)
            return
        self.logic = MedVLSMSlicerLogic()
        self.placeholder = qt.QPushButton("Set up MedVLSM (installs the Python packages it needs)")
        self.layout.addWidget(self.placeholder)
        self.placeholder.clicked.connect(self.build)
        self.layout.addStretch(1)
        from medvlsm.resources import resource

        if not missing_requirements(str(resource("requirements.txt"))) and _installed_versions(["torch"]):
            self.build()  # already installed: the panel at once, without asking anything

    def build(self):
        if not ensure_requirements():
            return
        from MedVLSMSlicerLib import mrml_glue as glue
        from MedVLSMSlicerLib import qt_compat
        from MedVLSMSlicerLib.panel import PanelController, ui_file
        from MedVLSMSlicerLib.teach_panel import TeachController

        self.placeholder.hide()
        root = qt_compat.load_ui(ui_file())
        self.layout.insertWidget(0, root)
        self.controller = PanelController(
            root, slicer.mrmlScene, self.logic.session, glue.parameter_node(slicer.mrmlScene),
            ask_folder=lambda: qt.QFileDialog.getExistingDirectory(None, "Model folder (save_pretrained format)"),
            ask_save_path=self._ask_save_path, current_slice=current_slice_index, dicom_files=dicom_files)
        # the Plots module's logic shows the learning curve in a plot view (ShowChartInLayout: Slicer >= 4.11)
        self.teach = TeachController(root, slicer.mrmlScene, self.controller,
                                     show_chart=lambda chart: slicer.modules.plots.logic().ShowChartInLayout(chart))
        scene = slicer.mrmlScene
        for event in (scene.NodeAddedEvent, scene.NodeRemovedEvent):
            self.addObserver(scene, event, lambda *_: self._nodes_changed())
        for event in (scene.EndImportEvent, scene.EndCloseEvent):
            self.addObserver(scene, event, self._scene_loaded)

    def _nodes_changed(self):
        self.controller.refresh_nodes()
        self.teach.refresh()

    def _scene_loaded(self, *_):
        from MedVLSMSlicerLib import mrml_glue as glue

        self.teach.refresh()
        self.controller.parameter_node = glue.parameter_node(slicer.mrmlScene)
        self.controller.reload_settings()

    @staticmethod
    def _ask_save_path(fmt):
        suffix = {".seg.nrrd": ".seg.nrrd", "DICOM SEG": ".dcm"}.get(fmt, ".nii.gz")
        return qt.QFileDialog.getSaveFileName(None, "Export segmentation", f"segmentation{suffix}",
                                              f"*{suffix}") or None

    def cleanup(self):
        self.removeObservers()
        if self.teach is not None:
            self.teach.shutdown()
        if self.controller is not None:
            self.controller.shutdown()


def segment_editor_history():
    """The Segment Editor module's widget (SegmentEditor.py: ``self.editor``, a
    qMRMLSegmentEditorWidget): Apply saves its undo state there, so the Segment Editor's Undo and the
    panel's Undo are one history. ``widgetRepresentation()`` creates the module's widget if the user
    never opened it."""
    from MedVLSMSlicerLib import mrml_glue as glue

    return glue.EditorHistory(slicer.modules.segmenteditor.widgetRepresentation().self().editor)


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
    """In-Slicer self-test: the demo CT, a tiny random-weight model (no download), Run through the
    panel, Apply, Undo; a segment the user drew is never changed."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        missing = self.missing()
        if missing:  # a build factory runs the generic tests without the PyTorch extension
            self.delayDisplay(f"MedVLSM self-test skipped: {', '.join(missing)} not installed (set up MedVLSM first)")
            return
        self.setUp()
        self.test_run_apply_undo_keeps_other_segments()

    @staticmethod
    def missing():
        from medvlsm.resources import resource

        missing = missing_requirements(str(resource("requirements.txt")))
        try:
            import torch  # noqa: F401
        except ImportError:
            missing.append("torch")
        return missing

    def test_run_apply_undo_keeps_other_segments(self):
        import tempfile

        import numpy as np
        from medvlsm.models.clipseg import CLIPSeg
        from medvlsm.resources import resource
        from MedVLSMSlicerLib import mrml_glue as glue

        volume = slicer.util.loadVolume(str(resource("Demo", "lung1_ct_crop.nrrd")))
        segmentation = glue.new_segmentation(slicer.mrmlScene, volume, "self-test")
        drawn = np.zeros(slicer.util.arrayFromVolume(volume).shape, bool)
        drawn[8:16, 100:160, 60:200] = True
        (manual,) = glue.write_masks(segmentation, volume, drawn[None], ["manual edit"])

        widget = slicer.modules.medvlsmslicer.widgetRepresentation().self()
        panel = widget.controller
        self.assertIsNotNone(panel, "the panel is built (requirements installed)")
        model_dir = tempfile.mkdtemp(prefix="medvlsm-selftest-")
        CLIPSeg.random("tiny", seed=0).save_pretrained(model_dir)
        panel.add_model_folder(model_dir)
        panel.w("volumeCombo").setCurrentIndex(panel.w("volumeCombo").findText(volume.GetName()))
        panel.w("segmentationCombo").setCurrentIndex(panel.w("segmentationCombo").findText("self-test"))
        panel.w("scopeCombo").setCurrentIndex(panel.w("scopeCombo").findText("whole volume"))
        panel.w("promptsEdit").setPlainText("lung")
        panel.run_or_cancel()
        while panel.running:
            slicer.app.processEvents()
        self.assertIsNotNone(panel.session.preview, panel.w("statusLabel").property("text"))
        panel.apply()
        self.assertEqual(segmentation.GetSegmentation().GetNumberOfSegments(), 2)
        self.assertTrue(np.array_equal(glue.read_segment(segmentation, manual, volume), drawn),
                        "Apply left the drawn segment unchanged")
        panel.undo()
        self.assertEqual(segmentation.GetSegmentation().GetNumberOfSegments(), 1)
        self.assertTrue(np.array_equal(glue.read_segment(segmentation, manual, volume), drawn))
        logging.info("MedVLSM self-test passed")
        self.delayDisplay("MedVLSM: Run, Apply, Undo passed; the drawn segment is unchanged")
