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


def test_every_script_ships_and_nothing_is_written_into_the_source_tree():
    text = cmake(MODULE)
    scripts = re.search(r"set\(MODULE_PYTHON_SCRIPTS(.*?)\)", text, re.S).group(1).split()
    listed = {s.replace("${MODULE_NAME}", "MedVLSMSlicer") for s in scripts}
    on_disk = {p.relative_to(MODULE).as_posix() for p in MODULE.rglob("*.py") if "__pycache__" not in p.parts}
    assert listed == on_disk
    assert "WITH_GENERIC_TESTS" in text
    assert "configure_file" not in text  # a configure must not create MedVLSMSlicer/Resources in the checkout
    assert "Logic/medvlsm" in text and "../Resources" in text  # the package and its data ship with the module


def test_the_effect_folder_holds_only_the_effect():
    """Slicer imports the effect file under its folder's name: nothing else may live (or be imported) there."""
    folder = MODULE / "SegmentEditorTextPromptLib"
    assert sorted(p.name for p in folder.iterdir() if p.name != "__pycache__") == ["SegmentEditorEffect.py"]
    for path in [*MODULE.rglob("*.py"), *(ROOT / "Testing").glob("test_*.py")]:
        assert not re.search(r"^\s*(from|import)\s+SegmentEditorTextPromptLib", path.read_text(encoding="utf-8"), re.M)


def test_minimum_slicer_version_is_declared():
    assert 'MEDVLSM_MINIMUM_SLICER_VERSION "5.10"' in cmake(ROOT)
    assert "MINIMUM_SLICER = (5, 10)" in (MODULE / "MedVLSMSlicer.py").read_text(encoding="utf-8")


def classes(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.name: [ast.unparse(b) for b in n.bases] for n in tree.body if isinstance(n, ast.ClassDef)}


def test_module_classes_and_effect_base():
    found = classes(MODULE / "MedVLSMSlicer.py")
    assert found["MedVLSMSlicer"] == ["ScriptedLoadableModule"]
    assert found["MedVLSMSlicerWidget"] == ["ScriptedLoadableModuleWidget", "VTKObservationMixin"]
    assert found["MedVLSMSlicerLogic"] == ["ScriptedLoadableModuleLogic"]
    assert found["MedVLSMSlicerTest"] == ["ScriptedLoadableModuleTest"]
    effect = classes(MODULE / "SegmentEditorTextPromptLib" / "SegmentEditorEffect.py")
    assert effect["SegmentEditorEffect"] == ["AbstractScriptedSegmentEditorEffect"]


def test_heavy_imports_are_lazy():
    """Loading the module must not import torch/transformers (Slicer starts fast)."""
    for path in MODULE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = {a.name.split(".")[0] for n in top for a in n.names} | {
            (n.module or "").split(".")[0] for n in top if isinstance(n, ast.ImportFrom)}
        assert not names & {"torch", "transformers", "monai"}, path.name


def test_logic_package_imports_neither_slicer_nor_qt():
    for path in (ROOT / "Logic" / "medvlsm").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"^\s*(import|from)\s+(slicer|qt|Qt|PySide6|vtk)\b", text, re.M), path
