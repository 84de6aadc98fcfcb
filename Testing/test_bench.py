"""The benchmark keeps working: quick mode end to end (no timing assertions; figures are for docs/benchmarks.md)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

pytestmark = pytest.mark.models


def test_bench_quick_mode_runs(tmp_path):
    import bench_engine

    # a small volume and model: this checks that the benchmark runs end to end; its figures (full size)
    # come from bench/ runs
    results = bench_engine.main(["--quick", "--depth", "8", "--size", "128", "--naive-slices", "4", "--model-size",
                                 "small", "--precision", "auto", "--json", str(tmp_path / "bench.json")])
    saved = json.loads((tmp_path / "bench.json").read_text(encoding="utf-8"))
    assert saved["volume"] == "8x128x128" and saved["machine"]
    engine = saved["cases"]["engine_auto"]
    for key in ("seconds_per_slice", "reprompt_seconds", "preview_seconds", "peak_rss_mb", "speedup_vs_naive",
                "reprompt_speedup"):
        assert engine[key] > 0, key
    assert results["cases"]["naive"]["slices"] == 4


def test_server_load_bench_runs_and_nothing_is_mixed_up(tmp_path):
    import bench_server

    report = bench_server.main(["--clients", "3", "--requests", "2", "--depth", "3", "--size", "32",
                                "--json", str(tmp_path / "load.json")])
    assert report["answered"] == report["asked"] == 6 and report["mismatched"] == 0 and not report["errors"]
    assert report["p95_s"] >= report["p50_s"] > 0


def test_the_readme_figure_is_regenerated_by_its_script(tmp_path):
    """`python bench/readme_figure.py` (README): here with one epoch, a small input and another output."""
    from conftest import SHARED_DATA

    if not (SHARED_DATA / "pyradiomics" / "brain1_image.nrrd").is_file():
        pytest.skip("../shared/data/pyradiomics is absent (the shared real-data folder beside the checkout)")
    import readme_figure

    result = readme_figure.main(["--epochs", "1", "--input-size", "96", "--output", str(tmp_path / "figure.png")])
    assert (tmp_path / "figure.png").stat().st_size > 10_000 and 0.0 <= result["dice"] <= 1.0


def test_the_teach_bench_and_figure_run(tmp_path):
    """`python bench/teach.py` and `python bench/teach_figure.py` (README): smoke runs, the tiny model."""
    from conftest import SHARED_DATA

    import teach

    results = teach.main(["--quick", "--json", str(tmp_path / "teach.json"), "--figure", str(tmp_path / "curves.png")])
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert {(r["mode"], r["labelled_slices"]) for r in results["runs"]} == {("adapt", 2), ("finetune", 2)}
    assert all(0 <= r["held_out_dice"] <= 1 and set(r["own_dice"]) == {"liver", "spleen"} for r in results["runs"])
    if not (SHARED_DATA / "pyradiomics" / "lung1_image.nrrd").is_file():
        pytest.skip("../shared/data/pyradiomics is absent (the shared real-data folder beside the checkout)")
    import teach_figure

    made = teach_figure.main(["--epochs", "1", "--size", "tiny", "--output", str(tmp_path / "teach.png")])
    assert made["status"].startswith("Taught ") and (tmp_path / "teach.png").stat().st_size > 50_000
