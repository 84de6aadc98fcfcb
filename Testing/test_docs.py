"""The commands the README and docs/ show stay true: every `medvlsm ...` line of their shell blocks
(continuation lines joined, usage brackets resolved to their first choice) and every inline
`medvlsm ...` command of their text is parsed by the real
argument parser — an option renamed or removed fails here. Links between the pages resolve. (The
commands are parsed, not run: running them needs the data and models they name; the runnable ones
— segment, demo, init, finetune, evaluate, serve — run in their own tests.)"""

import re
import sys
import shlex
from pathlib import Path

import pytest

from medvlsm.cli import _join_negative_values, build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def shell_commands(page: Path):
    text = page.read_text(encoding="utf-8")
    for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, re.S):
        for command in re.sub(r"\\\n\s*", " ", block).splitlines():
            command = command.split(" #", 1)[0].strip()
            if command.startswith("medvlsm ") and "..." not in command:
                yield command
    for command in re.findall(r"`(medvlsm [^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S)):
        if "..." not in command and len(command.split()) > 2:  # inline commands, not "`medvlsm serve`"
            yield command


def concrete(command: str) -> list[str]:
    """Usage notation -> one concrete command: [--opt a|b] -> --opt a."""
    command = re.sub(r"\[([^\[\]]*)\]", r"\1", command)
    command = re.sub(r"(\S+?)\|\S+", r"\1", command)
    return shlex.split(command)[1:]


COMMANDS = [(page.relative_to(ROOT).as_posix(), command) for page in PAGES for command in shell_commands(page)]


def test_the_pages_show_commands():
    assert len(COMMANDS) >= 15 and {c.split()[1] for _, c in COMMANDS} >= {"segment", "serve", "finetune", "evaluate"}


@pytest.mark.parametrize("page,command", COMMANDS, ids=[f"{p}:{c[:40]}" for p, c in COMMANDS])
def test_every_documented_command_parses(page, command):
    try:
        build_parser().parse_args(_join_negative_values(concrete(command)))
    except SystemExit:
        pytest.fail(f"{page}: `{command}` does not parse")


def test_links_between_the_pages_resolve():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if not target.startswith(("http://", "https://")):
                assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


# ---- the documented commands, run -----------------------------------------------------------------

# Commands that need what a test machine cannot hold or a process of their own run in these tests
# instead (the check below makes sure each still exists and runs that command).
RUN_ELSEWHERE = {
    "convert": ("test_cris.py", "test_biomedclipseg.py"),  # the original weights, written in their formats
    "serve": ("test_server_hostile.py", "test_ray_serve.py"),  # a server process / Ray replicas
    "NAME": ("test_cli.py",),  # `download NAME`: the placeholder; a real name runs below, from the cache
    "demo": ("test_cli.py",),
    "--server": ("test_server.py", "test_server_teach.py"),  # a client run against a served model
    "FOLDER_OR_CSV": ("test_server.py", "test_cli.py"),  # a cohort
    "--resume": ("test_finetune.py",),  # needs an interrupted run first
    "--size full": ("test_architectures.py",),  # full-size models: 600 MB each on disk
}


def run_elsewhere(command: str):
    """The ``RUN_ELSEWHERE`` key of a command (a word or words of its concrete form), or None."""
    words = f" {' '.join(concrete(command))} "
    return next((key for key in RUN_ELSEWHERE if f" {key} " in words), None)


def test_commands_run_elsewhere_are_run_there():
    for page, command in COMMANDS:
        key = run_elsewhere(command)
        if key is None:
            continue
        subcommand = command.split()[1]
        texts = [(ROOT / "Testing" / name).read_text(encoding="utf-8") for name in RUN_ELSEWHERE[key]]
        assert any(f'"{subcommand}"' in text or f"'{subcommand}'" in text for text in texts), (page, command)


def fake_hub_cache(cache: Path, model_dir: Path) -> None:
    """The Hugging Face cache as a first download leaves it, holding a tiny random-weight model under
    the registry's default name (the real 600 MB model cannot be downloaded here)."""
    import shutil

    from medvlsm.models import default_model_name, registry

    repo = registry()[default_model_name()].source[3:]
    commit = "0" * 40
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    shutil.copytree(model_dir, root / "snapshots" / commit)


def sandbox(folder: Path) -> None:
    """The files the documented commands name, small."""
    import json

    import numpy as np
    import SimpleITK as sitk
    from conftest import blobs
    from synthetic import two_object_images, write_split

    from medvlsm import io
    from medvlsm.volume import Volume

    ct = Volume(blobs((40, 32, 36)), (0.8, 0.8, 2.5))
    sitk.WriteImage(io.volume_to_sitk(ct), str(folder / "ct.nii.gz"))
    for name in ("data", "."):  # evaluate.md's data/ and the top-level images/ + masks/
        entries = two_object_images(folder / name, 3, size=64)
        write_split(folder, "train", entries[:4])
        write_split(folder, "val", entries[4:])
        write_split(folder, "test", entries[4:])
    mask = np.zeros((64, 64), np.uint8)
    mask[20:40, 10:30] = 255
    sitk.WriteImage(sitk.GetImageFromArray(mask), str(folder / "mask.png"))
    (folder / "attributes.json").write_text(json.dumps([{"class": "polyp", "shape": "round", "color": "pink"}]))
    for name in ("my_tool_masks", "reference"):
        (folder / name).mkdir()
        sitk.WriteImage(sitk.GetImageFromArray(mask), str(folder / name / "case1.png"))
    (folder / "volumes").mkdir()
    (folder / "segmentations").mkdir()
    for n in range(2):
        v = Volume(blobs((6, 24, 28), seed=n), (1.0, 1.0, 3.0))
        labels = np.zeros(v.shape, np.uint8)
        labels[1:4, 4:12, 4:12], labels[2:5, 14:22, 16:24] = 1, 2
        sitk.WriteImage(io.volume_to_sitk(v), str(folder / "volumes" / f"case{n}.nrrd"))
        io.write_labelmap(v, labels, folder / "segmentations" / f"case{n}.nrrd")


LOCAL = [(page, command) for page, command in COMMANDS if run_elsewhere(command) is None]


def test_the_documented_commands_run(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """Every documented command not listed in ``RUN_ELSEWHERE`` runs as written, in page order (the
    evaluate.md walk-through builds on its own outputs), in a folder holding small files of the names
    it uses; the registry's default model is a tiny random one in a stand-in Hugging Face cache. One
    change: ``finetune`` runs 2 epochs (the recipe's learning is tested in test_finetune.py)."""
    import huggingface_hub.constants

    from medvlsm.cli import main

    fake_hub_cache(tmp_path / "hub", tiny_model_dir)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = tmp_path / "work"
    work.mkdir()
    sandbox(work)
    monkeypatch.chdir(work)
    assert len(LOCAL) >= 12
    import time

    for page, command in LOCAL:
        start = time.perf_counter()
        argv = _join_negative_values(concrete(command))
        code = main(["--quiet", *argv, *(["--epochs", "2"] if argv[0] == "finetune" else [])])
        err = capsys.readouterr().err
        print(f"{time.perf_counter() - start:6.1f} s  {command[:90]}", file=sys.__stdout__)
        assert code == 0, f"{page}: `{command}` failed: {err[-600:]}"
