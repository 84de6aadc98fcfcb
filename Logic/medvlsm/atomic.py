"""The one way medvlsm writes a file: to a temporary name in the target folder, flushed to disk,
renamed into place only when complete.

An error, an interrupt (Ctrl-C, SIGTERM: the CLI turns it into ``KeyboardInterrupt``) or a full disk
leaves the path exactly as it was and no temporary file behind. Files are created 0644 (a model or a
result on a shared drive is readable by colleagues).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from pathlib import Path

FILE_MODE = 0o644
_staging = threading.local()  # inside together(): the (temporary, final) paths waiting for the commit


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside ``path`` with the same extension (writers that choose their
    format from the name, such as SimpleITK, keep working); renames it to ``path`` on success.

    Example::

        with atomic_path("out.nii.gz") as tmp:
            sitk.WriteImage(image, str(tmp))
    """
    from .io import extension

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{extension(path)}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        _fsync(tmp)
        os.chmod(tmp, FILE_MODE)
        staged = getattr(_staging, "files", None)
        if staged is None:
            os.replace(tmp, path)
        else:
            staged.append((tmp, path))
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


class PartialCommit(OSError):
    """Renaming one run's complete files into place failed after some were renamed (``replaced``)."""

    def __init__(self, replaced: list, error: OSError):
        super().__init__(f"{error}; already replaced: {', '.join(map(str, replaced)) or 'none'}")
        self.replaced = replaced


@contextlib.contextmanager
def together():
    """One run's outputs commit together: every ``atomic_path`` completed inside the block is renamed
    into place only when the whole block succeeds; on any failure none is, and no temporary file is
    left. Only a failing rename (rare: the files are complete and beside their targets) can leave some
    replaced: ``PartialCommit`` names them."""
    if getattr(_staging, "files", None) is not None:  # nested: the outer block commits
        yield
        return
    _staging.files = staged = []
    try:
        yield
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise
    finally:
        _staging.files = None
    replaced = []
    try:
        for tmp, path in staged:
            os.replace(tmp, path)
            replaced.append(path)
    except OSError as e:
        for tmp, _ in staged[len(replaced):]:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise PartialCommit(replaced, e) from e


@contextlib.contextmanager
def atomic_open(path, mode: str = "w", **kwargs):
    """``open`` for writing, atomically (text files: reports, CSV, JSON)."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


@contextlib.contextmanager
def atomic_files(folder, last: str = ""):
    """Yields a temporary folder beside ``folder``; on success each file written there (0644) replaces
    its namesake in ``folder`` by a rename, ``last`` after all others — so a reader that checks for
    ``last`` (a model's ``medvlsm.json``) never sees a half-written set. Other files of ``folder``
    (a training log, a checkpoint) are kept. On failure nothing in ``folder`` changes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        yield tmp
        files = sorted((f for f in tmp.rglob("*") if f.is_file()), key=lambda f: f.name == last)
        for file in files:
            _fsync(file)
            os.chmod(file, FILE_MODE)
        for file in files:
            target = folder / file.relative_to(tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(file, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
