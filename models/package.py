"""The model directory format: ``model.keras`` + ``metadata.json`` + ``SHA256SUMS``.

``metadata.json`` is the contract between training and serving (class names, input size and
preprocessing, threshold); the checksums make a swapped or damaged file fail loudly at load time.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from importlib import metadata as importlib_metadata
from pathlib import Path

MODEL_FILE = "model.keras"
METADATA_FILE = "metadata.json"
CHECKSUM_FILE = "SHA256SUMS"


class PackageError(ValueError):
    """A model directory that is missing files or fails its checksums."""


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in ("tensorflow", "keras", "numpy", "ray", "optuna", "scikit-learn", "pillow"):
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            pass
    return versions


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    return _sha256(Path(path))


def _finish(directory: Path, metadata: dict) -> Path:
    (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str) + "\n")
    sums = "".join(f"{_sha256(directory / name)}  {name}\n" for name in (MODEL_FILE, METADATA_FILE))
    (directory / CHECKSUM_FILE).write_text(sums)
    return directory


def save_model_dir(model, metadata: dict, directory: str | Path) -> Path:
    """Write the model, its metadata and their checksums into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save(directory / MODEL_FILE)
    return _finish(directory, metadata)


def write_package(source_dir: str | Path, metadata: dict, directory: str | Path) -> Path:
    """A deployable package: the verified ``model.keras`` of ``source_dir`` byte for byte, new metadata."""
    source_dir, directory = Path(source_dir), Path(directory)
    verify_model_dir(source_dir)
    if directory.exists():
        raise FileExistsError(f"{directory} already exists; packages are never overwritten")
    directory.mkdir(parents=True)
    shutil.copyfile(source_dir / MODEL_FILE, directory / MODEL_FILE)
    return _finish(directory, metadata)


def verify_model_dir(directory: str | Path) -> None:
    directory = Path(directory)
    sums_path = directory / CHECKSUM_FILE
    for name in (MODEL_FILE, METADATA_FILE, CHECKSUM_FILE):
        if not (directory / name).is_file():
            raise PackageError(f"{directory} is not a model directory: {name} is missing")
    for line in sums_path.read_text().splitlines():
        expected, _, name = line.partition("  ")
        if _sha256(directory / name) != expected:
            raise PackageError(
                f"checksum mismatch for {directory / name}: the file changed after the package was written; "
                "refusing to load it"
            )


def read_metadata(directory: str | Path) -> dict:
    return json.loads((Path(directory) / METADATA_FILE).read_text())


def load_model_dir(directory: str | Path, compile: bool = False):
    """Verify the checksums, then load with Keras' safe mode (no arbitrary code). Returns (model, metadata).

    ``compile=True`` also restores the optimizer and its state (to resume training).
    """
    import keras

    verify_model_dir(directory)
    model = keras.models.load_model(Path(directory) / MODEL_FILE, compile=compile, safe_mode=True)
    return model, read_metadata(directory)
