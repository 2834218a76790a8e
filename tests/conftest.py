"""Shared fixtures: tiny generated X-ray folders and npz files, and the real data when PNEUMONIA_DATA is set."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REAL_DATA = os.environ.get("PNEUMONIA_DATA", "")
# Every Ray the tests start (in-process, `ray start` nodes, the CLI's subprocesses) runs its workers at normal
# priority, as the project's own local Ray does (runtime.local_ray.start_ray): at Ray's default nice 15 a busy
# machine starves them (issue 23), and a suite that passes only on an idle machine is a flaky one.
os.environ.setdefault("RAY_worker_niceness", "0")


@pytest.fixture(autouse=True)
def _fast_tier_guard(request, monkeypatch):
    """Tests not marked ``services`` or ``slow`` may start no Ray, Serve or server (tests/fast_tier.py)."""
    from tests import fast_tier

    if not any(request.node.get_closest_marker(mark) for mark in fast_tier.MARKS):
        fast_tier.install(monkeypatch)


def _image(label: int, rng: np.random.Generator, size: int) -> Image.Image:
    """A noisy gray film with a film's layout (a bright column in the middle, as the spine and mediastinum
    are, so a negative of it looks inverted); PNEUMONIA images carry a bright patch so a tiny model can learn
    something."""
    pixels = rng.normal(90, 25, (size, size)).clip(0, 255)
    pixels[:, 3 * size // 8 : 5 * size // 8] += 40
    if label:
        pixels[size // 4 : size // 2, size // 4 : 3 * size // 4] += 90
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).convert("RGB")


def _names(label: int, patients: int, per_patient: int, offset: int) -> list[str]:
    names = []
    for p in range(offset, offset + patients):
        for k in range(per_patient):
            names.append(f"person{p}_bacteria_{p * 10 + k}.jpeg" if label else f"IM-{p:04d}-{k + 1:04d}.jpeg")
    return names


def write_split(folder: Path, patients: int = 12, per_patient: int = 2, size: int = 32, seed: int = 0,
                offset: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for name in _names(label, patients, per_patient, offset):
            _image(label, rng, size).save(folder / cls / name, quality=95)


@pytest.fixture
def mendeley_dir(tmp_path: Path) -> Path:
    """train/ and test/ only: 12 patients x 2 images per class in train, 4 x 2 in test."""
    root = tmp_path / "chest_xray"
    write_split(root / "train", patients=12, seed=1)
    write_split(root / "test", patients=4, seed=2, offset=500)
    return root


@pytest.fixture
def npz_file(tmp_path: Path) -> Path:
    rng = np.random.default_rng(3)
    arrays = {}
    for split, n in (("train", 40), ("val", 10), ("test", 12)):
        labels = np.arange(n) % 2
        images = np.stack([np.asarray(_image(int(y), rng, 28).convert("L")) for y in labels])
        arrays[f"{split}_images"] = images.astype(np.uint8)
        arrays[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
    path = tmp_path / "pneumoniamnist_28.npz"
    np.savez(path, **arrays)
    return path


@pytest.fixture
def real_data() -> Path:
    """The shared Kermany data; these tests run whenever PNEUMONIA_DATA is set (as in CI)."""
    if not REAL_DATA:
        pytest.skip("PNEUMONIA_DATA is not set")
    path = Path(REAL_DATA)
    assert path.is_dir(), f"PNEUMONIA_DATA={REAL_DATA} does not exist"
    return path


@pytest.fixture(autouse=True)
def _float32_policy():
    """Tests that set a mixed-precision policy must not leak it into the next test."""
    yield
    import sys

    if "keras" in sys.modules:
        sys.modules["keras"].mixed_precision.set_dtype_policy("float32")


@pytest.fixture
def search_data(tmp_path) -> str:
    """The real data when PNEUMONIA_DATA is set (subsets are taken by the configs), else generated films."""
    if REAL_DATA:
        return str(Path(REAL_DATA).resolve())
    root = tmp_path / "generated"
    write_split(root / "train", patients=60, per_patient=3, size=80, seed=1)
    write_split(root / "test", patients=4, size=80, seed=2, offset=900)
    return str(root)
