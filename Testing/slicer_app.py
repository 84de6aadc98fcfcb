"""A stand-in for the 3D Slicer desktop application, to load MedVLSMSlicer exactly as Slicer does.

Underneath is the real thing wherever it exists outside the application: MRML, segmentations and
``vtkSlicerSegmentEditorLogic`` from the slicer-core wheel, Qt widgets from PySide6 (through Qt.py),
the real ``.ui`` file, the module and effect files unchanged. Faked is only what exists solely in the
desktop application; each fake follows the Slicer source file named in its comment (Slicer 5.12.3,
and 5.8.1 where the two differ):

- the scripted-module factory: only the module's folder is appended to ``sys.path``, the file is
  loaded as a module named after the file (Base/QTGUI/qSlicerScriptedLoadableModuleFactory.cxx,
  Base/QTGUI/qSlicerScriptedLoadableModule.cxx::setPythonSource);
- the effect loader: module named after the effect file's *folder*, put in ``sys.modules``;
  ``importlib`` from 5.10, ``imp.load_source`` up to 5.8 (Base/QTCore/qSlicerScriptedUtils.cxx::
  loadSourceAsModule, Modules/Loadable/Segmentations/EditorEffects/qSlicerSegmentEditorScriptedEffect.cxx);
- ``slicer.app`` (startupCompleted, version, processEvents), ``slicer.modules``, ``slicer.util``'s
  dialogs, ``slicer.packaging`` (Base/Python/slicer/packaging.py, 5.11+), ``ScriptedLoadableModule``
  (Base/Python/slicer/ScriptedLoadableModule.py), ``AbstractScriptedSegmentEditorEffect``
  (.../EditorEffects/Python/SegmentEditorEffects/AbstractScriptedSegmentEditorEffect.py), the effect
  host, and the Segment Editor module's widget with its parameter node, its logic and the undo
  history that logic holds (``SegmentEditorWidget``: Modules/Scripted/SegmentEditor/SegmentEditor.py,
  Modules/Loadable/Segmentations/Widgets/qMRMLSegmentEditorWidget.cxx, whose saveStateForUndo, undo
  and redo call the logic from 5.10 on);
- PythonQt's event loop, which holds the GIL while Qt idles (``hold_gil_event_loop``).

Slicer's Python has no ``medvlsm`` installed: the harness hides this checkout's editable install, so
the module must find the package itself, as it must inside Slicer.

Run as ``python Testing/slicer_app.py SCENARIO [--layout checkout|install] [--slicer 5.12]``; prints
one JSON line (``Testing/test_slicer_app.py`` runs every scenario).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
import types
import unittest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT: dict = {"errors": [], "infos": [], "confirms": [], "pip": [], "delay": []}


# ---- Slicer's Python: no medvlsm, no project folders ---------------------------------------------

def hide_project_install():
    """Remove this checkout's editable install and folders from the import system."""
    sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("__editable__")]
    project = {str(ROOT), str(ROOT / "Logic"), str(ROOT / "Testing"), str(ROOT / "MedVLSMSlicer"), ""}
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") not in project and p not in project]
    for name in [m for m in sys.modules if m == "medvlsm" or m.startswith("medvlsm.")]:
        del sys.modules[name]
    sys.path_importer_cache.clear()


# ---- PythonQt's `qt` module ------------------------------------------------------------------

def install_qt():
    """PythonQt exposes QtCore, QtGui and QtWidgets as one module, ``qt``."""
    from Qt import QtCore, QtGui, QtWidgets

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    qt = types.ModuleType("qt")
    for module in (QtCore, QtGui, QtWidgets):
        for name in dir(module):
            if not name.startswith("_"):
                setattr(qt, name, getattr(module, name))
    sys.modules["qt"] = qt
    return app


# ---- slicer.app, slicer.modules, slicer.util's dialogs -------------------------------------------

class FakeApplication:
    """qSlicerApplication: the properties and signals the module uses (Base/QTCore/qSlicerCoreApplication.h)."""

    def __init__(self, qapp, version):
        self.qapp = qapp
        self.majorVersion, self.minorVersion = version
        self._slots: dict = {}

    def connect(self, signal, slot):  # PythonQt's old-style connect, as Slicer's module template uses
        self._slots.setdefault(signal, []).append(slot)

    def emit(self, signal):
        for slot in self._slots.get(signal, []):
            slot()

    def processEvents(self):
        self.qapp.processEvents()

    testing = False  # `Slicer --testing` (the harness's --testing)

    def testingEnabled(self):
        return self.testing

    def layoutManager(self):
        if getattr(self, "_layout", None) is None:
            self._layout = LayoutManager()
        return self._layout


class LayoutManager:
    """qSlicerLayoutManager: slice widgets whose mrmlSliceNode() is a real vtkMRMLSliceNode of the
    scene, one per view (Red axial, Green coronal, Yellow sagittal), as the default layout makes them
    (Base/QTGUI/qSlicerLayoutManager.cxx, qMRMLSliceWidget::mrmlSliceNode)."""

    ORIENTATION = {"Red": "Axial", "Green": "Coronal", "Yellow": "Sagittal"}

    def __init__(self):
        self._nodes: dict = {}

    def sliceWidget(self, name):
        import slicer

        node = self._nodes.get(name)
        if node is None or not slicer.mrmlScene.IsNodePresent(node):
            node = slicer.vtkMRMLSliceNode()
            node.SetName(name)
            node.SetLayoutName(name)
            node.SetSingletonTag(name)
            node.SetOrientation(self.ORIENTATION[name])
            node = self._nodes[name] = slicer.mrmlScene.AddNode(node)
        return types.SimpleNamespace(mrmlSliceNode=lambda: node)


class ModuleHandle:
    """What ``slicer.modules.<name>`` is for a scripted module: widgetRepresentation() builds the
    widget on first use (Base/QTGUI/qSlicerAbstractModule.cxx::widgetRepresentation)."""

    def __init__(self, module_py, name):
        self.module_py, self.name, self._widget = module_py, name, None

    def widgetRepresentation(self):
        if self._widget is None:
            from Qt import QtWidgets

            parent = QtWidgets.QWidget()
            parent.setLayout(QtWidgets.QVBoxLayout())
            widget = getattr(self.module_py, self.name + "Widget")(parent)
            widget.setup()
            self._widget = types.SimpleNamespace(self=lambda: widget, parent=parent)
        return self._widget


class PlotsModule:
    """``slicer.modules.plots``: its logic is slicer-core's real ``vtkSlicerPlotsLogic``; the charts
    asked to be shown are recorded (the layout they would switch to is the desktop application's)."""

    def __init__(self, slicer, scene):
        self._logic = slicer.vtkSlicerPlotsLogic()
        self._logic.SetMRMLScene(scene)
        self._logic.ShowChartInLayout = self._show
        self.shown = []

    def _show(self, chart):
        self.shown.append(chart)
        type(self._logic).ShowChartInLayout(self._logic, chart)

    def logic(self):
        return self._logic


def install_slicer(qapp, version, answer_confirm=True):
    import slicer
    import slicer.util

    scene = slicer.vtkMRMLScene()
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    scene.RegisterNodeClass(slicer.vtkMRMLSegmentEditorNode())  # vtkSlicerSegmentationsModuleLogic::RegisterNodes
    if not factory.GetConverterRules():  # the Segmentations module registers these at startup
        for rule in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
                     slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):
            factory.RegisterConverterRule(rule())
    slicer.mrmlScene = scene
    slicer.app = FakeApplication(qapp, version)
    slicer.modules = types.SimpleNamespace()
    slicer.modules.segmenteditor = SegmentEditorModule(slicer)
    slicer.modules.plots = PlotsModule(slicer, scene)
    slicer.selfTests = {}

    def confirm(text, *a, **k):
        REPORT["confirms"].append(text)
        return answer_confirm

    slicer.util.confirmOkCancelDisplay = confirm
    slicer.util.errorDisplay = lambda text, *a, **k: REPORT["errors"].append(text)
    slicer.util.infoDisplay = lambda text, *a, **k: REPORT["infos"].append(text)
    slicer.util.delayDisplay = lambda text, *a, **k: REPORT["delay"].append(text)
    slicer.util.pip_install = lambda requirements: REPORT["pip"].append({"pip_install": requirements})

    def load_ui(path):
        from Qt import QtCompat

        return QtCompat.loadUi(str(path))

    slicer.util.loadUI = load_ui

    def load_volume(filename, properties={}, returnNode=False):  # slicer/util.py loadVolume, without the IO manager
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", Path(filename).name.split(".")[0])
        storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(str(filename))
        node.SetAndObserveStorageNodeID(storage.GetID())
        if not storage.ReadData(node):
            raise RuntimeError(f"cannot read {filename}")
        node.CreateDefaultDisplayNodes()
        return node

    slicer.util.loadVolume = load_volume

    if version >= (5, 11):  # slicer.packaging: a submodule since 5.11, absent before
        packaging = types.ModuleType("slicer.packaging")

        def load_requirements(path):
            from packaging.requirements import Requirement

            lines = [line.split("#", 1)[0].strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
            return [Requirement(line) for line in lines if line]

        def pip_ensure(requirements, constraints=None, skip_packages=None, prompt_install=True,
                       prompt_restart=True, requester=None, skip_in_testing=True, show_progress=True):
            REPORT["pip"].append({"pip_ensure": [str(r) for r in requirements], "constraints": str(constraints),
                                  "constraints_text": Path(constraints).read_text() if constraints else "",
                                  "requester": requester, "prompt_restart": prompt_restart,
                                  "prompt_install": prompt_install, "skip_in_testing": skip_in_testing})
            # installs nothing here; in --testing, slicer.packaging installs nothing either (skip_in_testing)

        packaging.load_requirements, packaging.pip_ensure = load_requirements, pip_ensure
        sys.modules["slicer.packaging"] = packaging
        slicer.packaging = packaging
    install_scripted_module_api(slicer)
    install_effect_api(slicer)
    return slicer


def install_scripted_module_api(slicer):
    """slicer.ScriptedLoadableModule, following Base/Python/slicer/ScriptedLoadableModule.py."""
    m = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent
            self.moduleName = self.__class__.__name__
            parent.title = parent.helpText = parent.acknowledgementText = ""
            parent.categories, parent.dependencies, parent.contributors = [], [], []
            slicer.selfTests[self.moduleName] = self.runTest

        def runTest(self, msec=100, **kwargs):
            test = getattr(sys.modules[self.__class__.__module__], self.moduleName + "Test")()
            test.runTest(**kwargs)

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent
            self.layout = parent.layout()
            self.moduleName = self.__class__.__name__[:-len("Widget")]

        def setup(self):
            pass  # the developer-mode Reload/Test section is not faked

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.moduleName = self.__class__.__name__[:-len("Logic")]
            self.isSingletonParameterNode = True

        def getParameterNode(self):
            node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is None:
                node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
                node.UnRegister(None)
                node.SetSingletonTag(self.moduleName)
                node.SetAttribute("ModuleName", self.moduleName)
                node = slicer.mrmlScene.AddNode(node)
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def runTest(self):
            pass

        def delayDisplay(self, message, msec=1000):
            slicer.util.delayDisplay(message, msec)

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(m, cls.__name__, cls)
    sys.modules["slicer.ScriptedLoadableModule"] = m
    slicer.ScriptedLoadableModule = m


# ---- module and effect loaders ------------------------------------------------------------------

def load_source_as_module(module_name, path, version):
    """Base/QTCore/qSlicerScriptedUtils.cxx::loadSourceAsModule: ``importlib`` into ``sys.modules``
    (5.10+), ``imp.load_source`` (5.8: executes into an existing module of that name)."""
    if version >= (5, 10):
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        return sys.modules[module_name]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import imp  # noqa: the loader Slicer 5.8 uses

        return imp.load_source(module_name, str(path))


def load_module(path, version):
    """The scripted-module factory and qSlicerScriptedLoadableModule::setPythonSource."""
    folder = os.path.dirname(os.path.abspath(path))
    if folder not in sys.path:
        sys.path.append(folder)  # ctkFactoryScriptedItem::load appends the module's folder
    name = Path(path).stem
    module_py = sys.modules.get(name) or load_source_as_module(name, path, version)
    parent = types.SimpleNamespace(path=str(path), icon=None)
    instance = getattr(module_py, name)(parent)
    setattr(slicer_module(), name + "Instance", instance)
    setattr(slicer_module().modules, name.lower(), ModuleHandle(module_py, name))
    return module_py, parent


def slicer_module():
    import slicer

    return slicer


class EffectFactory:
    """qSlicerSegmentEditorEffectFactory: effects registered at startup, cloned for each editor."""

    registered: list = []

    @classmethod
    def instance(cls):
        return cls

    @classmethod
    def registerEffect(cls, effect):
        cls.registered.append(effect)


def install_effect_api(slicer):
    version = (slicer.app.majorVersion, slicer.app.minorVersion)
    editor_logic = slicer.vtkSlicerSegmentEditorLogic

    class ScriptedEffect:
        """qSlicerSegmentEditorScriptedEffect: the loader of setPythonSource, and the host API
        (qSlicerSegmentEditorAbstractEffect) an effect calls, delegating to vtkSlicerSegmentEditorLogic
        as Slicer >= 5.10 does."""

        def __init__(self, parent=None):
            self._self = None
            self.name, self.perSegment, self.requireSegments = "", False, False
            self.host = None

        def setPythonSource(self, source):
            module_name = Path(source).parent.name  # "Use parent directory name as module name"
            class_name = Path(source).name.split(".")[0]
            class_name = class_name if class_name.endswith("Effect") else class_name + "Effect"
            module = sys.modules.get(module_name)
            if version < (5, 10) and module is None:  # PyImport_AddModule
                module = sys.modules[module_name] = types.ModuleType(module_name)
            if module is None or not hasattr(module, class_name):
                module = load_source_as_module(module_name, source, version)
            self._self = getattr(module, class_name)(self)
            setattr(slicer, module_name, self._self)  # setModuleAttribute("slicer", moduleName, self)
            return True

        def self(self):
            return self._self

        # host API, bound by EditorHost
        def parameterSetNode(self):
            return self.host.node

        def addLabeledOptionsWidget(self, label, widget):
            self.host.form.addRow(label, widget)

        def addOptionsWidget(self, item):  # a widget or a layout, as the C++ overloads take
            self.host.form.addRow(item)

        def saveStateForUndo(self):
            self.host.logic.SaveStateForUndo()

        def sourceVolumeImageData(self):
            self.host.logic.UpdateAlignedSourceVolume()
            return self.host.logic.GetAlignedSourceVolume()

        def modifySegmentByLabelmap(self, segmentation_node, segment_id, modifier, mode, bypass_masking=False):
            self.host.logic.ModifySegmentByLabelmap(segmentation_node, segment_id, modifier, mode,
                                                    self.perSegment, bypass_masking)

    effects = types.ModuleType("qSlicerSegmentationsEditorEffectsPythonQt")
    effects.qSlicerSegmentEditorScriptedEffect = ScriptedEffect
    sys.modules[effects.__name__] = effects
    slicer.qSlicerSegmentEditorEffectFactory = EffectFactory
    slicer.qSlicerSegmentEditorAbstractEffect = types.SimpleNamespace(
        ModificationModeSet=editor_logic.ModificationModeSet, ModificationModeAdd=editor_logic.ModificationModeAdd,
        ModificationModeRemove=editor_logic.ModificationModeRemove)

    abstract = types.ModuleType("SegmentEditorEffects")

    class AbstractScriptedSegmentEditorEffect:
        def __init__(self, scriptedEffect):
            self.scriptedEffect = scriptedEffect

        def register(self):
            slicer.qSlicerSegmentEditorEffectFactory.instance().registerEffect(self.scriptedEffect)

    abstract.AbstractScriptedSegmentEditorEffect = AbstractScriptedSegmentEditorEffect
    sys.modules["SegmentEditorEffects"] = abstract


class SegmentEditorWidget:
    """The Segment Editor module's qMRMLSegmentEditorWidget (SegmentEditor.py: ``self.editor``) as
    Slicer >= 5.10 implements its Python API: one vtkSlicerSegmentEditorLogic on the module's
    singleton parameter node (SegmentEditor.py::selectParameterNode); saveStateForUndo, undo and redo
    call that logic (qMRMLSegmentEditorWidget.cxx). ``stroke`` is what a Paint stroke does."""

    def __init__(self, slicer):
        scene = slicer.mrmlScene
        node = scene.GetSingletonNode("SegmentEditor", "vtkMRMLSegmentEditorNode")
        if node is None:
            node = scene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
            node.UnRegister(None)
            node.SetSingletonTag("SegmentEditor")
            node = scene.AddNode(node)
        self.node = node
        self.logic = slicer.vtkSlicerSegmentEditorLogic()
        self.logic.SetMRMLScene(scene)
        self.logic.SetSegmentEditorNode(node)

    def segmentationNode(self):
        return self.logic.GetSegmentationNode()

    def setSegmentationNode(self, node):
        self.logic.SetSegmentationNode(node)

    def saveStateForUndo(self):
        self.logic.SaveStateForUndo()

    def undo(self):
        self.logic.Undo()

    def redo(self):
        self.logic.Redo()

    def stroke(self, segmentation_node, volume_node, name, region):
        """Add segment (if new) and paint ``region`` into it, each step after saving its undo state."""
        import slicer
        from MedVLSMSlicerLib import mrml_glue as glue

        self.setSegmentationNode(segmentation_node)
        self.saveStateForUndo()  # qMRMLSegmentEditorWidget::onAddSegment saves first
        segmentation = segmentation_node.GetSegmentation()
        sid = segmentation.GetSegmentIdBySegmentName(name) or segmentation.AddEmptySegment("", name)
        self.logic.ModifySegmentByLabelmap(segmentation_node, sid,
                                           glue._mask_in_segmentation_frame(region, volume_node, segmentation_node),
                                           slicer.vtkSlicerSegmentEditorLogic.ModificationModeSet, False, False)
        return sid


class SegmentEditorModule:
    """``slicer.modules.segmenteditor``: its widget is built on the first widgetRepresentation()."""

    def __init__(self, slicer):
        self.slicer, self._representation = slicer, None

    def widgetRepresentation(self):
        if self._representation is None:
            widget = types.SimpleNamespace(editor=SegmentEditorWidget(self.slicer))
            self._representation = types.SimpleNamespace(self=lambda: widget)
        return self._representation


def segment_editor_widget(slicer) -> SegmentEditorWidget:
    return slicer.modules.segmenteditor.widgetRepresentation().self().editor


class EditorHost:
    """The Segment Editor module with one effect active: the module's widget (its singleton node and
    logic, ``segment_editor_widget``) and an options frame (qMRMLSegmentEditorWidget: effects are
    clones of the registered ones)."""

    def __init__(self, slicer, segmentation_node, volume_node, effect_name):
        from Qt import QtWidgets

        self.widget = segment_editor_widget(slicer)
        node, self.logic = self.widget.node, self.widget.logic
        self.node = node
        node.SetAndObserveSegmentationNode(segmentation_node)
        node.SetAndObserveSourceVolumeNode(volume_node)
        self.logic.SetSegmentationNode(segmentation_node)
        self.logic.SetSourceVolumeNode(volume_node)
        self.frame = QtWidgets.QWidget()
        self.form = QtWidgets.QFormLayout(self.frame)
        (registered,) = [e for e in EffectFactory.registered if e.name == effect_name]
        self.effect = registered.self().clone()
        self.effect.host = self
        self.effect.self().setupOptionsFrame()

    def select(self, segment_id):
        self.node.SetSelectedSegmentID(segment_id)

    def activate(self):
        self.effect.self().activate()

    def undo(self):
        self.widget.undo()


def hold_gil_event_loop(until, timeout_s):
    """PythonQt's main loop: Qt waits for events in C++ *holding the GIL*; Python runs only in slots.
    A ctypes.PyDLL call keeps the GIL, so sleeping through it is an idle Qt; processEvents fires the
    due QTimers, whose Python slots are the only moments other threads can run."""
    sleep_holding_gil = ctypes.PyDLL(None).usleep
    sleep_holding_gil.argtypes = [ctypes.c_uint]
    qapp = slicer_module().app.qapp
    deadline = time.perf_counter() + timeout_s
    while not until():
        if time.perf_counter() > deadline:
            raise TimeoutError("the run did not finish under the PythonQt event loop")
        sleep_holding_gil(10_000)
        qapp.processEvents()


# ---- layouts -------------------------------------------------------------------------------------

def cmake_install_layout(dest: Path) -> Path:
    """qt-scripted-modules/ as MedVLSMSlicer/CMakeLists.txt installs it: the module's SCRIPTS keep their
    relative paths; each install(DIRECTORY ../X ...) copies X next to them, minus its PATTERN excludes."""
    module_dir = ROOT / "MedVLSMSlicer"
    cmake = (module_dir / "CMakeLists.txt").read_text(encoding="utf-8")
    scripts = re.search(r"set\(MODULE_PYTHON_SCRIPTS(.*?)\)", cmake, re.S).group(1).split()
    for script in scripts:
        relative = script.replace("${MODULE_NAME}", "MedVLSMSlicer")
        (dest / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(module_dir / relative, dest / relative)
    for source, excludes in re.findall(r"install\(DIRECTORY \$\{CMAKE_CURRENT_SOURCE_DIR\}/\.\./(\S+)(.*?)\)",
                                       cmake, re.S):
        ignore = shutil.ignore_patterns(*re.findall(r'PATTERN "([^"]+)" EXCLUDE', excludes))
        shutil.copytree(ROOT / source, dest / Path(source).name, ignore=ignore)
    return dest / "MedVLSMSlicer.py"


def module_file(layout: str) -> Path:
    if layout == "checkout":
        return ROOT / "MedVLSMSlicer" / "MedVLSMSlicer.py"
    # a path with spaces, as Slicer's default Windows install folder has
    return cmake_install_layout(Path(tempfile.mkdtemp(prefix="Slicer 5 ")) / "lib" / "qt-scripted-modules")


# ---- scenarios -----------------------------------------------------------------------------------

def start(layout, version, answer_confirm=True):
    """Slicer's start-up: load the module, then startupCompleted (the effect registers)."""
    hide_project_install()
    qapp = install_qt()
    slicer = install_slicer(qapp, version, answer_confirm)
    path = module_file(layout)
    module_py, parent = load_module(path, version)
    slicer.app.emit("startupCompleted()")
    REPORT["module_help"] = parent.helpText
    REPORT["icon"] = parent.icon is not None
    REPORT["effects"] = [e.name for e in EffectFactory.registered]
    return slicer, module_py, path


def volume_node(slicer, shape, seed, name):
    """A CT-like int16 volume node: air, a soft-tissue body and bright ellipsoids."""
    import numpy as np

    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    array = np.where(k**2 + j**2 + i**2 < 0.8, 40.0, -1000.0)
    for _ in range(4):
        c, r = rng.uniform(-0.5, 0.5, 3), rng.uniform(0.15, 0.35, 3)
        array[((k - c[0]) / r[0]) ** 2 + ((j - c[1]) / r[1]) ** 2 + ((i - c[2]) / r[2]) ** 2 < 1] = rng.uniform(100, 900)
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.CreateDefaultDisplayNodes()
    slicer.util.updateVolumeFromArray(node, (array + rng.normal(0, 5, shape)).astype(np.int16))
    node.SetSpacing(0.8, 0.8, 2.5)
    return node


def tiny_model_folder():
    from medvlsm.models.clipseg import CLIPSeg

    folder = tempfile.mkdtemp(prefix="medvlsm-tiny-")
    CLIPSeg.random("tiny", seed=0).save_pretrained(folder)
    return folder


def scenario_startup(args):
    slicer, module_py, path = start(args.layout, args.version)
    import MedVLSMSlicerLib.session  # noqa: F401  what the panel, logic and effect import
    import medvlsm

    widget = slicer.modules.medvlsmslicer.widgetRepresentation().self()
    REPORT["lib_is_package"] = hasattr(sys.modules["MedVLSMSlicerLib"], "__path__")
    REPORT["medvlsm_inside_layout"] = Path(medvlsm.__file__).resolve().is_relative_to(path.parent.parent.resolve())
    REPORT["panel_built"] = getattr(widget, "controller", None) is not None
    REPORT["slicer_attribute"] = sorted(a for a in vars(slicer) if a.startswith("SegmentEditorTextPrompt"))


def scenario_old_slicer(args):
    slicer, module_py, path = start(args.layout, args.version)
    widget = slicer.modules.medvlsmslicer.widgetRepresentation().self()
    REPORT["panel_built"] = getattr(widget, "controller", None) is not None


def scenario_install(args):
    """Requirements missing: the user is asked, pip runs through Slicer's helper with the constraints."""
    slicer, module_py, path = start("install", args.version)
    requirements = path.parent / "Resources" / "requirements.txt"
    requirements.write_text(requirements.read_text() + "medvlsm-harness-absent==1.0\n")
    REPORT["ready"] = module_py.ensure_requirements()
    REPORT["requirements_path"] = str(requirements)


def scenario_restart_check(args):
    """pip changed a dependency (not a requirement itself) whose module is already imported: its
    distribution name is not its module name (PyYAML -> yaml)."""
    slicer, module_py, path = start(args.layout, args.version)
    import yaml  # noqa: F401  (transformers imports it)

    REPORT["stale"] = module_py.needs_restart({"PyYAML": "5.0", "medvlsm-absent": "1"},
                                              {"PyYAML": "6.0", "medvlsm-absent": "2"})


def scenario_install_testing(args):
    """Slicer --testing: slicer.packaging installs nothing; the module must not ask for a restart."""
    slicer, module_py, path = start("install", args.version)
    slicer.app.testing = True
    requirements = path.parent / "Resources" / "requirements.txt"
    requirements.write_text(requirements.read_text() + "medvlsm-harness-absent==1.0\n")
    REPORT["ready"] = module_py.ensure_requirements()


def scenario_torch_install_fails(args):
    """No PyTorch yet, and its install fails (offline): one line with the fix, no traceback in the UI."""
    slicer, module_py, path = start(args.layout, args.version)
    sys.modules["torch"] = None  # `import torch` raises ImportError, as without PyTorch
    utils = types.ModuleType("PyTorchUtils")

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation=True, **kwargs):
            raise OSError("Could not reach download.pytorch.org")

    utils.PyTorchUtilsLogic = PyTorchUtilsLogic
    sys.modules["PyTorchUtils"] = utils
    REPORT["ready"] = module_py.ensure_requirements()


def scenario_effect_before_setup(args):
    """The Text prompt effect used before the panel's set-up: it offers the same set-up."""
    slicer, module_py, path = start("install", args.version, answer_confirm=False)
    requirements = path.parent / "Resources" / "requirements.txt"
    requirements.write_text(requirements.read_text() + "medvlsm-harness-absent==1.0\n")
    volume, segmentation, host, manual, target, drawn = effect_setup(slicer, (8, 32, 32))
    effect = host.effect.self()
    effect.onRunOrCancel()
    REPORT["status"] = effect.statusLabel.property("text")
    REPORT["running"] = effect.timer.isActive()


def scenario_selftest(args):
    slicer, module_py, path = start(args.layout, args.version)
    slicer.modules.medvlsmslicer.widgetRepresentation()
    module_py.MedVLSMSlicerTest().runTest()
    REPORT["passed"] = True


def scenario_selftest_without_torch(args):
    """A build factory's generic tests: Slicer without the PyTorch extension."""
    slicer, module_py, path = start(args.layout, args.version)
    sys.modules["torch"] = None  # `import torch` raises ImportError
    module_py.MedVLSMSlicerTest().runTest()
    REPORT["passed"] = True


def measure_free_running(session, node, settings):
    t0 = time.perf_counter()
    job = session.start(node, settings)
    job.wait()
    assert job.error is None, job.error
    return time.perf_counter() - t0


GIL_SHAPE = (320, 48, 48)  # a run of a few seconds: the poll period is small beside it
WARM_SHAPE = (16, 48, 48)  # loads the model and warms the kernels before anything is timed


def scenario_gil_panel(args):
    """A whole-volume run from the panel under the GIL-holding loop vs the same run free-running."""
    slicer, module_py, path = start(args.layout, args.version)
    from MedVLSMSlicerLib.session import Settings

    panel = slicer.modules.medvlsmslicer.widgetRepresentation().self().controller
    folder = tiny_model_folder()
    warm = volume_node(slicer, WARM_SHAPE, 0, "warm")
    free, looped = (volume_node(slicer, GIL_SHAPE, seed, f"CT{seed}") for seed in (1, 2))
    settings = Settings(model=folder, prompts=["lung"], device="cpu")
    measure_free_running(panel.session, warm, settings)  # loads the model, warms the kernels
    REPORT["free_s"] = measure_free_running(panel.session, free, settings)
    panel.add_model_folder(folder)
    panel.w("deviceCombo").setCurrentIndex(panel.w("deviceCombo").findText("cpu"))
    panel.w("volumeCombo").setCurrentIndex(panel.w("volumeCombo").findText(looped.GetName()))
    panel.w("promptsEdit").setPlainText("lung")
    t0 = time.perf_counter()
    panel.run_or_cancel()
    hold_gil_event_loop(lambda: not panel.running, timeout_s=30 * REPORT["free_s"] + 30)
    REPORT["loop_s"] = time.perf_counter() - t0
    REPORT["preview"] = panel.session.preview is not None


def effect_setup(slicer, shape=(48, 64, 64)):
    import numpy as np
    from MedVLSMSlicerLib import mrml_glue as glue

    volume = volume_node(slicer, shape, 7, "CT")
    segmentation = glue.new_segmentation(slicer.mrmlScene, volume, "seg")
    drawn = np.zeros(shape, bool)
    drawn[10:30, 20:40, 20:40] = True
    (manual,) = glue.write_masks(segmentation, volume, drawn[None], ["manual edit"])
    target = segmentation.GetSegmentation().AddEmptySegment("", "lung")
    host = EditorHost(slicer, segmentation, volume, "Text prompt")
    host.select(target)
    host.activate()
    return volume, segmentation, host, manual, target, drawn


def scenario_gil_effect(args):
    slicer, module_py, path = start(args.layout, args.version)
    from MedVLSMSlicerLib import mrml_glue as glue
    from MedVLSMSlicerLib.session import Settings, shared_session

    folder = tiny_model_folder()
    Settings(model=folder, device="cpu").save(glue.parameter_node(slicer.mrmlScene))
    volume, segmentation, host, manual, target, drawn = effect_setup(slicer, GIL_SHAPE)
    session = shared_session(slicer.mrmlScene)
    settings = Settings(model=folder, prompts=["lung"], device="cpu")
    measure_free_running(session, volume_node(slicer, WARM_SHAPE, 8, "warm"), settings)
    REPORT["free_s"] = measure_free_running(session, volume_node(slicer, GIL_SHAPE, 9, "free"), settings)
    effect = host.effect.self()
    t0 = time.perf_counter()
    effect.onRunOrCancel()
    hold_gil_event_loop(lambda: not effect.timer.isActive(), timeout_s=30 * REPORT["free_s"] + 30)
    REPORT["loop_s"] = time.perf_counter() - t0
    REPORT["status"] = effect.statusLabel.property("text")


def scenario_effect(args):
    """Segment, change the selection mid-run, re-threshold, undo: the run's segment only."""
    import numpy as np

    slicer, module_py, path = start(args.layout, args.version)
    from MedVLSMSlicerLib import mrml_glue as glue
    from MedVLSMSlicerLib.session import Settings

    folder = tiny_model_folder()
    Settings(model=folder, device="cpu").save(glue.parameter_node(slicer.mrmlScene))
    volume, segmentation, host, manual, target, drawn = effect_setup(slicer)
    host.node.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteNone)  # "Allow overlap"
    effect = host.effect.self()
    REPORT["prompt_default"] = effect.promptEdit.property("text")
    effect.onRunOrCancel()
    host.select(manual)  # the user clicks another segment while the model runs
    hold_gil_event_loop(lambda: not effect.timer.isActive(), timeout_s=120)
    REPORT["status"] = effect.statusLabel.property("text")
    first = glue.read_segment(segmentation, target, volume)
    REPORT["target_voxels"] = int(first.sum())
    REPORT["manual_unchanged"] = bool(np.array_equal(glue.read_segment(segmentation, manual, volume), drawn))
    # a random model may cover most of the volume or little of it: move the threshold the way that must
    # change the segment, to a value the slider can show
    result = effect.run.result
    quantile = 0.7 if first.mean() > 0.5 else 0.3
    value = min(99, max(1, int(round(float(np.quantile(result.probabilities[0], quantile)) / 255 * 100))))
    effect.thresholdSlider.setValue(value)  # tracking off: as on release
    second = glue.read_segment(segmentation, target, volume)
    REPORT["rethreshold_voxels"] = int(second.sum())
    REPORT["rethreshold_is_the_result_at_the_slider"] = bool(np.array_equal(second, result.masks(value / 100)[0]))
    host.undo()
    REPORT["undo_restores_first"] = bool(np.array_equal(glue.read_segment(segmentation, target, volume), first))
    REPORT["undo_manual_unchanged"] = bool(np.array_equal(glue.read_segment(segmentation, manual, volume), drawn))


def panel_run(slicer, panel, volume, prompt, folder):
    """Type a prompt, choose the volume, Run, and let PythonQt's loop run it to the preview."""
    panel.add_model_folder(folder)
    panel.w("deviceCombo").setCurrentIndex(panel.w("deviceCombo").findText("cpu"))
    panel.w("volumeCombo").setCurrentIndex(panel.w("volumeCombo").findText(volume.GetName()))
    panel.w("promptsEdit").setPlainText(prompt)
    panel.run_or_cancel()
    hold_gil_event_loop(lambda: not panel.running, timeout_s=120)


def scenario_close_scene(args):
    """A preview left pending, File > Close Scene, the next patient: the user creates a segmentation
    (it gets the preview's old ID) and paints; then Discard, and a new Run: nothing of theirs goes."""
    import numpy as np

    slicer, module_py, path = start(args.layout, args.version)
    from MedVLSMSlicerLib import mrml_glue as glue

    panel = slicer.modules.medvlsmslicer.widgetRepresentation().self().controller
    folder = tiny_model_folder()
    first = volume_node(slicer, (8, 32, 32), 1, "patient1")
    panel_run(slicer, panel, first, "liver", folder)
    REPORT["preview_before_close"] = panel.session.preview is not None
    preview_id = panel.session.preview.node.GetID()
    slicer.mrmlScene.Clear(False)  # File > Close Scene (qSlicerCoreApplication: mrmlScene()->Clear(false))
    REPORT["apply_enabled_after_close"] = panel.w("applyButton").isEnabled()
    REPORT["discard_enabled_after_close"] = panel.w("discardButton").isEnabled()
    second = volume_node(slicer, (8, 32, 32), 2, "patient2")
    users = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")  # Segment Editor: new segmentation
    users.CreateDefaultDisplayNodes()
    REPORT["id_reused"] = users.GetID() == preview_id
    drawn = np.zeros((8, 32, 32), bool)
    drawn[2:5, 5:20, 5:20] = True
    segment_editor_widget(slicer).stroke(users, second, "tumour", drawn)
    panel.discard()
    panel_run(slicer, panel, second, "kidney", folder)  # Run replaces any preview
    panel.discard()
    REPORT["users_node_kept"] = bool(slicer.mrmlScene.IsNodePresent(users))
    REPORT["users_display_kept"] = users.GetDisplayNode() is not None
    sid = users.GetSegmentation().GetSegmentIdBySegmentName("tumour")
    REPORT["users_stroke_kept"] = bool(sid) and bool(np.array_equal(glue.read_segment(users, sid, second), drawn))


def scenario_interleaved_undo(args):
    """Apply from the panel, a Segment Editor stroke, then Undo in the panel, Undo and Redo in the
    Segment Editor: one history, the last edit first, whichever tool made it."""
    import numpy as np

    slicer, module_py, path = start(args.layout, args.version)
    from MedVLSMSlicerLib import mrml_glue as glue

    panel = slicer.modules.medvlsmslicer.widgetRepresentation().self().controller
    editor = segment_editor_widget(slicer)
    volume = volume_node(slicer, (8, 32, 32), 3, "CT")
    target = glue.new_segmentation(slicer.mrmlScene, volume, "seg")
    panel.refresh_nodes()
    panel.w("segmentationCombo").setCurrentIndex(panel.w("segmentationCombo").findText("seg"))
    panel_run(slicer, panel, volume, "liver", tiny_model_folder())
    panel.apply()

    def names():
        segmentation = target.GetSegmentation()
        return sorted(segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments()))

    stroke = np.zeros((8, 32, 32), bool)
    stroke[1:4, :6, :6] = True
    editor.stroke(target, volume, "stroke", stroke)
    REPORT["after_apply_and_stroke"] = names()
    panel.undo()
    REPORT["after_panel_undo"] = names()
    editor.undo()
    REPORT["after_editor_undo"] = names()
    editor.redo()
    REPORT["after_editor_redo"] = names()
    editor.redo()
    REPORT["after_second_redo"] = names()
    sid = target.GetSegmentation().GetSegmentIdBySegmentName("stroke")
    REPORT["stroke_restored"] = bool(np.array_equal(glue.read_segment(target, sid, volume), stroke))


def scenario_prefetch(args):
    """Typing a prompt encodes the slices under PythonQt's GIL-holding loop as fast as free-running
    (the GUI timer gives the prefetch the GIL); the Run that follows decodes only."""
    slicer, module_py, path = start(args.layout, args.version)
    from MedVLSMSlicerLib.session import Settings

    panel = slicer.modules.medvlsmslicer.widgetRepresentation().self().controller
    folder = tiny_model_folder()
    settings = Settings(model=folder, prompts=["lung"], device="cpu", plane="all")
    measure_free_running(panel.session, volume_node(slicer, WARM_SHAPE, 0, "warm"), settings)  # loads, warms
    free = volume_node(slicer, PREFETCH_SHAPE, 1, "free")
    t0 = time.perf_counter()
    panel.session.prefetch(free, settings).wait()
    REPORT["free_s"] = time.perf_counter() - t0
    volume = volume_node(slicer, PREFETCH_SHAPE, 2, "CT")
    panel.add_model_folder(folder)
    panel.w("deviceCombo").setCurrentIndex(panel.w("deviceCombo").findText("cpu"))
    panel.w("volumeCombo").setCurrentIndex(panel.w("volumeCombo").findText(volume.GetName()))
    panel.w("planeCombo").setCurrentIndex(panel.w("planeCombo").findText("all three (slower)"))
    t0 = time.perf_counter()
    panel.w("promptsEdit").setPlainText("lung")  # typing: the prefetch starts
    REPORT["prefetch_started"] = panel.prefetch_job is not None
    hold_gil_event_loop(lambda: panel.prefetch_job.done, timeout_s=30 * REPORT["free_s"] + 30)
    REPORT["loop_s"] = time.perf_counter() - t0
    REPORT["prefetch_error"] = repr(panel.prefetch_job.error) if panel.prefetch_job.error else ""
    REPORT["timer_stopped"] = not panel.timer.isActive()
    panel.run_or_cancel()
    hold_gil_event_loop(lambda: not panel.running, timeout_s=120)
    REPORT["from_cache"] = panel.session.last_result.from_cache


PREFETCH_SHAPE = (96, 48, 48)  # all three planes: 192 slices to encode while the prompt is typed


def scenario_cleanup(args):
    """Slicer exits (or the module is unloaded) during a run: the timer stops, the run is cancelled
    and its thread ends, the session stops observing the scene."""
    slicer, module_py, path = start(args.layout, args.version)
    widget = slicer.modules.medvlsmslicer.widgetRepresentation().self()
    panel = widget.controller
    volume = volume_node(slicer, (320, 48, 48), 5, "CT")
    panel.add_model_folder(tiny_model_folder())
    panel.w("deviceCombo").setCurrentIndex(panel.w("deviceCombo").findText("cpu"))
    panel.w("volumeCombo").setCurrentIndex(panel.w("volumeCombo").findText(volume.GetName()))
    panel.w("promptsEdit").setPlainText("lung")
    panel.run_or_cancel()
    job = panel.job
    hold_gil_event_loop(lambda: job.progress[0] > 0, timeout_s=120)  # the run is under way
    widget.cleanup()
    REPORT["timer_active"] = panel.timer.isActive()
    REPORT["thread_alive"] = not job.done
    REPORT["cancelled"] = job.cancelled
    REPORT["observers"] = len(panel.session._observers)


def scenario_teach(args):
    """Teach from the panel under PythonQt's GIL-holding loop: a segmentation labelled on a few axial
    slices, Adapt for 2 epochs, the curve in plot nodes, the new model selected and used by the next Run."""
    import numpy as np

    slicer, module_py, path = start(args.layout, args.version)
    import qt
    from MedVLSMSlicerLib import mrml_glue as glue

    widget = slicer.modules.medvlsmslicer.widgetRepresentation().self()
    panel, teach = widget.controller, widget.teach
    teach.models_folder = str(Path(tempfile.mkdtemp(prefix="medvlsm-taught-")))
    volume = volume_node(slicer, (10, 32, 36), 3, "patient1")
    segmentation = glue.new_segmentation(slicer.mrmlScene, volume, "patient1 labels")
    liver = np.zeros((10, 32, 36), bool)
    for k in (1, 3, 5, 7):
        liver[k, 6:16, 6:18] = True
    glue.write_masks(segmentation, volume, liver[None], ["liver"])
    folder = tiny_model_folder()
    panel.add_model_folder(folder)
    panel.w("deviceCombo").setCurrentIndex(panel.w("deviceCombo").findText("cpu"))
    teach.ui["teachEpochsSpin"].setValue(2)
    teach.ui["teachCasesList"].item(0).setCheckState(qt.Qt.Checked)
    t0 = time.perf_counter()
    teach.teach_or_cancel()
    hold_gil_event_loop(lambda: not teach.running, timeout_s=120)
    REPORT["teach_s"] = time.perf_counter() - t0
    REPORT["status"] = teach.ui["teachStatusLabel"].property("text")
    REPORT["selected"] = panel.w("modelCombo").property("currentText")
    REPORT["taught"] = str(teach.folder)
    REPORT["curve_rows"] = teach.curve.table.GetTable().GetNumberOfRows()
    REPORT["charts_shown"] = [chart.GetName() for chart in slicer.modules.plots.shown]
    panel.w("volumeCombo").setCurrentIndex(panel.w("volumeCombo").findText(volume.GetName()))
    panel.w("promptsEdit").setPlainText("liver")
    panel.run_or_cancel()
    hold_gil_event_loop(lambda: not panel.running, timeout_s=120)
    REPORT["run_model"] = panel.session.last_result.model_name


SCENARIOS = {"teach": scenario_teach, "restart-check": scenario_restart_check, "selftest-without-torch": scenario_selftest_without_torch, "install-testing": scenario_install_testing, "torch-install-fails": scenario_torch_install_fails,
             "effect-before-setup": scenario_effect_before_setup, "close-scene": scenario_close_scene, "prefetch": scenario_prefetch, "cleanup": scenario_cleanup, "interleaved-undo": scenario_interleaved_undo,
             "startup": scenario_startup, "old-slicer": scenario_old_slicer, "install": scenario_install,
             "selftest": scenario_selftest, "gil-panel": scenario_gil_panel, "gil-effect": scenario_gil_effect,
             "effect": scenario_effect}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("--layout", choices=("checkout", "install"), default="checkout")
    parser.add_argument("--slicer", default="5.12")
    args = parser.parse_args(argv)
    args.version = tuple(int(x) for x in args.slicer.split("."))
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        SCENARIOS[args.scenario](args)
        REPORT["ok"] = True
    except BaseException as e:  # reported, so the test shows what a user would have met
        import traceback

        REPORT["ok"] = False
        REPORT["exception"] = f"{type(e).__name__}: {e}"
        REPORT["traceback"] = traceback.format_exc()[-3000:]
    print("SLICER_APP_REPORT " + json.dumps(REPORT, default=str))


if __name__ == "__main__":
    main()
