"""A cohort: ``medvlsm segment`` over a folder or a CSV of volumes, resumable, one progress bar.

A folder holds image files (NIfTI, NRRD, MHA ...) and/or one DICOM series per subfolder; a CSV has a
``path`` column (relative paths are read from the CSV's folder) and optionally ``name``. Each case's
result goes to ``OUTPUT/<name><format>``, written atomically: a case whose output exists is done and
is skipped when the run is started again (``--overwrite`` redoes it). ``OUTPUT/cohort.csv`` records
every case's state (done / skipped / failed with its one-line reason); a failed case does not stop
the others.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from . import io
from .atomic import atomic_open
from .errors import InputError, MedVLSMError

IMAGE_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
LOG = "cohort.csv"


@dataclass(frozen=True)
class Case:
    name: str
    path: Path


def is_cohort(path) -> bool:
    """A CSV, or a folder of volumes: image files or subfolders, and no DICOM file of its own (a folder
    of DICOM files is one series)."""
    path = Path(path)
    if io.extension(path) == ".csv":
        return True
    if not path.is_dir():
        return False
    entries = list(path.iterdir())
    return (not any(p.is_file() and io._looks_like_dicom(p) for p in entries)
            and any(p.is_dir() or io.extension(p) in IMAGE_EXTENSIONS for p in entries))


def cases(source) -> list[Case]:
    """The cohort's cases in a stable order; names are unique (they name the outputs)."""
    source = Path(source)
    if io.extension(source) == ".csv":
        found = _csv_cases(source)
    else:
        found = [Case(io.case_name(p) if p.is_file() else p.name, p) for p in sorted(source.iterdir())
                 if (p.is_file() and io.extension(p) in IMAGE_EXTENSIONS) or (p.is_dir() and any(p.iterdir()))]
    if not found:
        raise InputError(f"{source} holds no volumes", "Give a folder of NIfTI/NRRD/MHA files or DICOM series "
                         "folders, or a CSV with a 'path' column")
    names = [c.name for c in found]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"Several cases are named {', '.join(repeated[:3])}: their outputs would collide",
                         "Give each a unique 'name' in the CSV (or rename the files)")
    return found


def _csv_cases(path: Path) -> list[Case]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"Cannot read {path} as CSV ({e.__class__.__name__})", "Save it as UTF-8 CSV") from e
    if not rows or "path" not in rows[0]:
        raise InputError(f"{path} has no 'path' column", "Give a header line with 'path' (and optionally 'name')")
    out = []
    for row in rows:
        case = Path(row["path"].strip())
        case = case if case.is_absolute() else path.parent / case
        out.append(Case((row.get("name") or "").strip() or io.case_name(case), case))
    return out


def run(found: list[Case], output: Path, fmt: str, segment_one, *, overwrite=False, progress=None) -> dict:
    """``segment_one(case_path, output_path)`` per case not done yet; returns the count per state.
    ``progress(done, total)`` after each case."""
    output.mkdir(parents=True, exist_ok=True)
    states, log = {"done": 0, "skipped": 0, "failed": 0}, []
    for number, case in enumerate(found, start=1):
        target = output / f"{case.name}{fmt}"
        if target.exists() and not overwrite:
            state, reason = "skipped", "output exists (done before)"
        else:
            try:
                segment_one(case.path, target)
                state, reason = "done", ""
            except MedVLSMError as e:  # this case's problem, named; the cohort goes on
                state, reason = "failed", str(e)
        states[state] += 1
        log.append({"case": case.name, "input": str(case.path), "output": str(target), "state": state,
                    "reason": reason})
        _write_log(output / LOG, log)
        if progress is not None:
            progress(number, len(found))
    return states


def _write_log(path: Path, rows: list[dict]) -> None:
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
