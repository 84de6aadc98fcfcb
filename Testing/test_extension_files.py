"""The Slicer extension is complete enough for the extension factory (static checks: the desktop
application itself cannot run here; MedVLSMSlicerTest runs inside Slicer)."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "MedVLSMSlicer"


def cmake(path):
    return (path / "CMakeLists.txt").read_text(encoding="utf-8")


def test_top_level_cmake_has_the_extension_metadata():
    text = cmake(ROOT)
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf"set\({key} ", text), key
    assert '"Segmentation"' in text and '"PyTorch"' in text
    assert "add_subdirectory(MedVLSMSlicer)" in text and "Slicer_EXTENSION_CPACK" in text


def test_every_script_and_resource_ships():
    text = cmake(MODULE)
    listed = set(re.findall(r"\$\{MODULE_NAME\}(Lib/\w+\.py|\.py)", text))
    on_disk = {"Lib/" + p.name for p in (MODULE / "MedVLSMSlicerLib").glob("*.py")} | {".py"}
    assert listed == on_disk
    assert "WITH_GENERIC_TESTS" in text
    for resource in re.findall(r"Resources/[\w/${}.]+", text):
        resource = resource.replace("${MODULE_NAME}", "MedVLSMSlicer")
        if "." in Path(resource).name:
            assert (ROOT / resource).is_file(), resource
    assert "Logic/medvlsm" in text  # the package ships with the module


def classes(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.name: [ast.unparse(b) for b in n.bases] for n in tree.body if isinstance(n, ast.ClassDef)}


def test_module_classes_and_effect_base():
    found = classes(MODULE / "MedVLSMSlicer.py")
    assert found["MedVLSMSlicer"] == ["ScriptedLoadableModule"]
    assert found["MedVLSMSlicerWidget"] == ["ScriptedLoadableModuleWidget", "VTKObservationMixin"]
    assert found["MedVLSMSlicerLogic"] == ["ScriptedLoadableModuleLogic"]
    assert found["MedVLSMSlicerTest"] == ["ScriptedLoadableModuleTest"]
    effect = classes(MODULE / "MedVLSMSlicerLib" / "SegmentEditorEffect.py")
    assert effect["SegmentEditorEffect"] == ["AbstractScriptedSegmentEditorEffect"]
    source = (MODULE / "MedVLSMSlicerLib" / "SegmentEditorEffect.py").read_text(encoding="utf-8")
    assert "modifySelectedSegmentByLabelmap" in source and "saveStateForUndo" in source


def test_heavy_imports_are_lazy():
    """Loading the module must not import torch/transformers (Slicer starts fast)."""
    for path in [MODULE / "MedVLSMSlicer.py", *(MODULE / "MedVLSMSlicerLib").glob("*.py")]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = {a.name.split(".")[0] for n in top for a in n.names} | {
            (n.module or "").split(".")[0] for n in top if isinstance(n, ast.ImportFrom)}
        assert not names & {"torch", "transformers", "monai"}, path.name


def test_logic_package_imports_neither_slicer_nor_qt():
    for path in (ROOT / "Logic" / "medvlsm").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"^\s*(import|from)\s+(slicer|qt|Qt|PySide6|vtk)\b", text, re.M), path
