"""The extension loaded the way 3D Slicer loads it (``Testing/slicer_app.py``: real MRML from
slicer-core, real Qt widgets and .ui; faked only what exists solely in the desktop application).

Each scenario runs in a fresh Python, as a Slicer start-up does, with this checkout's editable
install hidden (Slicer's Python has no ``medvlsm``)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("slicer", reason="the slicer-core wheel is part of Testing/requirements.txt")
pytest.importorskip("PySide6", reason="PySide6 is part of Testing/requirements.txt")
pytestmark = pytest.mark.slicer

HARNESS = Path(__file__).with_name("slicer_app.py")


def slicer_app(*args):
    done = subprocess.run([sys.executable, str(HARNESS), *args], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "QT_QPA_PLATFORM": "offscreen"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("SLICER_APP_REPORT ")]
    assert lines, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads(lines[-1].split(" ", 1)[1])
    assert report["ok"], report.get("traceback")
    return report


@pytest.mark.parametrize("layout", ["checkout", "install"])
def test_module_loads_registers_the_effect_and_builds_the_panel(layout):
    """Registering the effect must not hide MedVLSMSlicerLib; medvlsm is found in either layout."""
    report = slicer_app("startup", "--layout", layout)
    assert report["effects"] == ["Text prompt"]
    assert report["lib_is_package"], "sys.modules['MedVLSMSlicerLib'] was replaced by the effect file"
    assert report["medvlsm_inside_layout"], "medvlsm came from outside the extension"
    assert report["panel_built"] and report["icon"]
    assert report["slicer_attribute"] == ["SegmentEditorTextPromptLib"]
    assert not report["errors"] and not report["confirms"]


def test_slicer_older_than_5_10_gets_a_message_not_a_traceback():
    report = slicer_app("old-slicer", "--slicer", "5.8")  # 5.8's imp.load_source loader
    assert "5.10 or newer" in report["module_help"]
    assert report["effects"] == [] and not report["panel_built"]


def test_first_use_install_goes_through_slicer_packaging_with_shipped_packages_pinned():
    report = slicer_app("install", "--slicer", "5.12")
    (call,) = report["pip"]
    assert call["requester"] == "MedVLSM" and "medvlsm-harness-absent==1.0" in call["pip_ensure"]
    assert call["prompt_restart"] is False and call["prompt_install"] is False  # one question each, ours
    pinned = dict(line.split("==") for line in call["constraints_text"].split())
    assert {"torch", "numpy", "SimpleITK", "scipy", "pydicom"} <= set(pinned)
    assert len(report["confirms"]) == 1 and report["ready"] is False
    assert "restart Slicer" in report["infos"][0]


def test_first_use_install_on_5_10_passes_pip_a_list_that_keeps_spaces():
    report = slicer_app("install", "--slicer", "5.10")
    (call,) = report["pip"]
    argv = call["pip_install"]
    assert argv[:2] == ["-r", report["requirements_path"]] and " " in argv[1] and argv[2] == "-c"


def test_in_slicer_self_test_passes():
    report = slicer_app("selftest")
    assert report["passed"] and report["delay"] == ["MedVLSM: Run, Apply, Undo passed; the drawn segment is unchanged"]


def test_effect_writes_the_segment_chosen_at_run_and_rethreshold_is_undoable():
    report = slicer_app("effect")
    assert report["prompt_default"] == "lung"
    assert report["status"].startswith("Done in") and "random (untrained) weights" in report["status"]
    assert report["target_voxels"] > 0 and report["rethreshold_voxels"] != report["target_voxels"], report
    assert report["rethreshold_is_the_result_at_the_slider"]
    assert report["manual_unchanged"] and report["undo_manual_unchanged"]
    assert report["undo_restores_first"]


@pytest.mark.parametrize("scenario", ["gil-panel", "gil-effect"])
def test_worker_runs_at_full_speed_under_pythonqts_gil_holding_event_loop(scenario):
    """Without the GUI timer's wait the worker is starved (~10x slower). The loop's time also holds
    fixed costs the free run has not (the preview drawn into MRML, the first poll): 0.5 s of slack on
    top of 1.5x keeps a ~1.5 s run on a loaded 2-core machine from failing by noise."""
    report = slicer_app(scenario)
    assert report["loop_s"] <= 1.5 * report["free_s"] + 0.5, report


def test_closing_the_scene_with_a_pending_preview_never_removes_the_next_patients_work():
    report = slicer_app("close-scene")
    assert report["preview_before_close"] and report["id_reused"], report
    assert not report["apply_enabled_after_close"] and not report["discard_enabled_after_close"]
    assert report["users_node_kept"] and report["users_display_kept"] and report["users_stroke_kept"], report


def test_panel_and_segment_editor_share_one_undo_history():
    report = slicer_app("interleaved-undo")
    assert report["after_apply_and_stroke"] == ["liver", "stroke"]
    assert report["after_panel_undo"] == ["liver"]  # the stroke, the last edit: Apply stays
    assert report["after_editor_undo"] == []  # then the Apply
    assert report["after_editor_redo"] == ["liver"] and report["after_second_redo"] == ["liver", "stroke"]
    assert report["stroke_restored"]


def test_typing_prefetches_under_pythonqts_loop_and_the_run_decodes_only():
    report = slicer_app("prefetch")
    assert report["prefetch_started"] and report["prefetch_error"] == "", report
    assert report["loop_s"] <= 2 * report["free_s"] + 1.0, report  # near free-running; starved, it took ~9x
    assert report["timer_stopped"] and report["from_cache"]


def test_teach_under_pythonqts_loop_selects_the_new_model_and_the_next_run_uses_it():
    report = slicer_app("teach")
    assert report["status"].startswith("Taught ") and "held-out Dice" in report["status"], report
    assert report["selected"] == report["taught"] and report["run_model"] == Path(report["taught"]).name
    assert report["curve_rows"] == 2  # one row per epoch
    assert len(report["charts_shown"]) == 1 and report["charts_shown"][0].endswith("learning curve")


def test_cleanup_stops_the_timer_and_cancels_the_run():
    report = slicer_app("cleanup")
    assert not report["timer_active"] and not report["thread_alive"] and report["cancelled"], report
    assert report["observers"] == 0


def test_requirements_are_ranges_that_keep_what_other_extensions_installed():
    """Slicer's Python is shared: no exact pins; an installed version inside the range is not missing."""
    requirements = HARNESS.parents[1] / "Resources" / "requirements.txt"
    lines = [line.split("#")[0].strip() for line in requirements.read_text().splitlines()]
    assert all(">=" in line and "==" not in line for line in lines if line), lines


def test_testing_mode_installs_nothing_and_asks_for_no_restart():
    report = slicer_app("install-testing")
    assert report["ready"] is False and not report["infos"], report  # no "restart Slicer"
    assert "testing mode" in report["errors"][0] and "\n" not in report["errors"][0]


def test_a_failed_pytorch_install_is_one_line_with_the_fix():
    report = slicer_app("torch-install-fails")
    assert report["ready"] is False and len(report["errors"]) == 1, report
    assert "Installing PyTorch failed (OSError" in report["errors"][0] and "internet" in report["errors"][0]


def test_the_effect_before_set_up_offers_the_set_up():
    report = slicer_app("effect-before-setup")
    assert len(report["confirms"]) == 1 and "medvlsm-harness-absent" in report["confirms"][0], report
    assert "not ready" in report["status"] and not report["running"]


def test_the_self_test_on_a_build_factory_without_pytorch_is_skipped_not_failed():
    report = slicer_app("selftest-without-torch")
    assert report["passed"] and "skipped: torch not installed" in report["delay"][0], report


def test_a_changed_dependency_already_loaded_asks_for_a_restart():
    assert slicer_app("restart-check")["stale"] == ["PyYAML"]
