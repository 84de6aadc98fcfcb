"""The commands the README and docs/ show stay true: every `medvlsm ...` line of their shell blocks
(continuation lines joined, usage brackets resolved to their first choice) and every inline
`medvlsm ...` command of their text is parsed by the real
argument parser — an option renamed or removed fails here. Links between the pages resolve. (The
commands are parsed, not run: running them needs the data and models they name; the runnable ones
— segment, demo, init, finetune, evaluate, serve — run in their own tests.)"""

import re
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
