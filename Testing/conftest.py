"""Shared fixtures. Models are real transformers architectures with random weights (no hub here);
that is the only stand-in: pretrained weights cannot exist on these machines."""

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub is reachable; fail fast instead of timing out

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def rotation(ax, ay, az):
    """A rotation matrix from angles in degrees about x, y, z."""
    ax, ay, az = np.deg2rad([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def blobs(shape, seed=0, count=4):
    """A smooth int16 CT-like volume [K, J, I] with a few bright ellipsoids on air/soft tissue."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    a = np.full(shape, -1000.0)
    a[(k**2 + j**2 + i**2) < 0.8] = 40.0
    for _ in range(count):
        c = rng.uniform(-0.5, 0.5, 3)
        r = rng.uniform(0.15, 0.35, 3)
        a[((k - c[0]) / r[0]) ** 2 + ((j - c[1]) / r[1]) ** 2 + ((i - c[2]) / r[2]) ** 2 < 1] = rng.uniform(100, 900)
    return (a + rng.normal(0, 5, shape)).astype(np.int16)


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def _return_freed_memory():
    """After each test, hand freed heap back to the system: full-size models and optimisers leave
    gigabytes in glibc's arenas that would otherwise stack up under the next test's peak."""
    yield
    try:
        resident = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: nothing to trim
        return
    if resident > 1.5 * 2**30:  # only after the heavy tests: a collection costs time
        import ctypes
        import gc

        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@pytest.fixture(scope="session")
def tiny_model():
    from medvlsm.models.clipseg import CLIPSeg

    return CLIPSeg.random("tiny", seed=0)


def assert_same_levels(a, b):
    """Two uint8 probability arrays (x 255) of the same computation in another order: at most one level apart."""
    assert a.dtype == b.dtype == np.uint8
    assert np.abs(a.astype(np.int16) - b.astype(np.int16)).max(initial=0) <= 1


@pytest.fixture
def engine(tiny_model):
    from medvlsm.engine import Engine

    return Engine(tiny_model, device="cpu", precision="fp32", batch_size=4)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("models") / "clipseg-tiny"
    tiny_model.save_pretrained(folder)
    return folder


# The Slicer module's Qt-free library is importable without Slicer (MedVLSMSlicerLib).
import sys  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "MedVLSMSlicer"))
