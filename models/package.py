"""The model directory format: ``model.keras`` + ``metadata.json`` + ``SHA256SUMS``.

:class:`PackageMetadata` is the one typed contract between training, evaluation and serving (class names,
input contract, threshold, where the model came from); every producer writes it and the Serve replica reads
it. The checksums make a swapped or damaged file fail loudly at load time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np

from data.dataset import CLASS_NAMES
from data.film_checks import FilmChecks
from data.preprocessing import InputContract
from models.borderline import BorderlineBand
from models.calibration import Calibration
from models.ood import OodGate, OodScorer
from runtime.config import ConfigError, from_dict
from runtime.errors import PneumoniaError

MODEL_FILE = "model.keras"
METADATA_FILE = "metadata.json"
CHECKSUM_FILE = "SHA256SUMS"
SCHEMA_VERSION = 2  # 1: the untyped dicts written before PackageMetadata (no schema_version key)
# What a model is chosen by (its best epoch, a search's best trial, an ensemble's members): validation ROC AUC,
# higher is better; a key of the validation metrics in metadata and best.json
METRIC, MODE = "val_auc", "max"


class PackageError(PneumoniaError, ValueError):
    """A model directory that is missing files, fails its checksums or holds metadata this code cannot read."""


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in ("tensorflow", "keras", "numpy", "ray", "optuna", "scikit-learn", "pillow"):
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            pass
    return versions


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclasses.dataclass(frozen=True)
class EnsembleMember:
    """One trial averaged into an ensemble, ranked by its best validation AUC."""

    trial_id: str
    family: str
    image_size: int
    val_auc: float
    checkpoint: str


@dataclasses.dataclass(frozen=True)
class PackageMetadata:
    """``metadata.json``: what a model directory holds and how to feed it.

    A training checkpoint has the required fields and its training history; evaluation adds the version,
    the threshold chosen on validation, the test metrics and the source; an ensemble lists its members.
    """

    class_names: list[str]
    positive_class: str
    input: InputContract
    config: dict  # the TrainConfig (models.config) that trained it, as a mapping
    threshold: float
    threshold_method: str
    created_at: str
    version: str = ""  # set when evaluation exports a deployable package
    data: dict = dataclasses.field(default_factory=dict)  # source, layout, fingerprints, counts
    runtime: dict = dataclasses.field(default_factory=dict)  # training: threads, precision; package: inference runtime
    best_epoch: int | None = None
    validation: dict = dataclasses.field(default_factory=dict)  # metrics at the best epoch
    history: list[dict] = dataclasses.field(default_factory=list)
    ensemble: list[EnsembleMember] = dataclasses.field(default_factory=list)
    test_metrics: dict = dataclasses.field(default_factory=dict)
    test_confusion_matrix: list[list[int]] = dataclasses.field(default_factory=list)
    confidence_intervals: dict = dataclasses.field(default_factory=dict)
    source: dict = dataclasses.field(default_factory=dict)  # experiment, trial, model sha256
    calibration: Calibration | None = None  # fitted on validation by evaluation; None = the model's own output
    ood: OodGate | None = None  # the out-of-distribution gate fitted by evaluation; None = every input is classified
    film_checks: FilmChecks | None = None  # checks before the model, fitted by evaluation; None = none
    borderline: BorderlineBand | None = None  # answers too near the threshold to hold; fitted by evaluation
    versions: dict = dataclasses.field(default_factory=package_versions)
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def for_training(cls, config: dict, contract: InputContract | int, **fields: Any) -> PackageMetadata:
        """A checkpoint's metadata: threshold 0.5 until evaluation chooses one on validation."""
        contract = contract if isinstance(contract, InputContract) else InputContract(contract)
        return cls(class_names=list(CLASS_NAMES), positive_class=CLASS_NAMES[1], input=contract,
                   config=config, threshold=0.5, threshold_method="default 0.5 (not yet chosen on validation)",
                   created_at=utc_now(), **fields)

    @property
    def image_size(self) -> int:
        return self.input.image_size

    def probabilities(self, model_output) -> np.ndarray:
        """What evaluation scores and serving answers: the model's P(PNEUMONIA), calibrated if fitted."""
        raw = np.asarray(model_output, dtype=np.float64).reshape(-1)
        return raw if self.calibration is None else self.calibration.apply(raw)

    def replace(self, **changes: Any) -> PackageMetadata:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = METADATA_FILE) -> PackageMetadata:
        """Refuses missing required fields and unknown ones, naming them; reads schema 1 (no version key)."""
        if not isinstance(data, dict):
            raise PackageError(f"{where}: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        schema = data.setdefault("schema_version", 1)
        if schema not in (1, SCHEMA_VERSION):
            raise PackageError(f"{where}: schema_version {schema} is not one this code reads (1 or {SCHEMA_VERSION}); "
                               "upgrade the project to load it")
        data["schema_version"] = SCHEMA_VERSION  # schema 1 has the same fields, untyped
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise PackageError(f"{where} lacks required field(s): {', '.join(missing)}")
        try:
            return from_dict(cls, data)
        except ConfigError as exc:
            raise PackageError(f"{where}: {exc}") from None

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / METADATA_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        return path

    @classmethod
    def read(cls, directory: str | Path) -> PackageMetadata:
        path = Path(directory) / METADATA_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise PackageError(f"{directory} is not a model directory: {METADATA_FILE} is missing") from None
        except json.JSONDecodeError as exc:
            raise PackageError(f"{path} is not valid JSON: {exc}") from None
        return cls.from_dict(data, str(path))


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _finish(directory: Path, metadata: PackageMetadata) -> Path:
    metadata.write(directory)
    names = [MODEL_FILE, METADATA_FILE, *([metadata.ood.file] if metadata.ood else [])]
    sums = "".join(f"{file_sha256(directory / name)}  {name}\n" for name in names)
    (directory / CHECKSUM_FILE).write_text(sums)
    return directory


def save_model_dir(model, metadata: PackageMetadata, directory: str | Path) -> Path:
    """Write the model, its metadata and their checksums into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save(directory / MODEL_FILE)
    return _finish(directory, metadata)


def write_package(source_dir: str | Path, metadata: PackageMetadata, directory: str | Path,
                  ood: OodScorer | None = None) -> Path:
    """A deployable package: the verified ``model.keras`` of ``source_dir`` byte for byte, new metadata, and
    the fitted OOD scorer that ``metadata.ood`` describes."""
    source_dir, directory = Path(source_dir), Path(directory)
    verify_model_dir(source_dir)
    if (ood is None) != (metadata.ood is None):
        raise ValueError("an OOD scorer and metadata.ood go together")
    if directory.exists():
        raise PackageError(f"{directory} already exists; packages are never overwritten")
    directory.mkdir(parents=True)
    shutil.copyfile(source_dir / MODEL_FILE, directory / MODEL_FILE)
    if ood is not None:
        (directory / metadata.ood.file).write_bytes(ood.to_bytes())
    return _finish(directory, metadata)


def verify_model_dir(directory: str | Path) -> None:
    directory = Path(directory)
    for name in (MODEL_FILE, METADATA_FILE, CHECKSUM_FILE):
        if not (directory / name).is_file():
            raise PackageError(f"{directory} is not a model directory: {name} is missing")
    for line in (directory / CHECKSUM_FILE).read_text().splitlines():
        expected, _, name = line.partition("  ")
        if not (directory / name).is_file():
            raise PackageError(f"{directory} is not a whole package: {name} is missing")
        if file_sha256(directory / name) != expected:
            raise PackageError(
                f"checksum mismatch for {directory / name}: the file changed after the package was written; "
                "refusing to load it"
            )


def read_metadata(directory: str | Path) -> PackageMetadata:
    return PackageMetadata.read(directory)


def load_ood_scorer(directory: str | Path, metadata: PackageMetadata) -> OodScorer | None:
    """The package's fitted OOD scorer (checksummed with the rest), or None for a package without a gate."""
    if metadata.ood is None:
        return None
    return OodScorer.load(metadata.ood.method, Path(directory) / metadata.ood.file)


def load_model_dir(directory: str | Path, compile: bool = False):
    """Verify the checksums, then load with Keras' safe mode (no arbitrary code). Returns (model, metadata).

    ``compile=True`` also restores the optimizer and its state (to resume training).
    """
    import keras

    verify_model_dir(directory)
    metadata = read_metadata(directory)
    model = keras.models.load_model(Path(directory) / MODEL_FILE, compile=compile, safe_mode=True)
    return model, metadata
