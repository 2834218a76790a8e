"""Test-split evaluation of one chosen model: threshold on validation, test scored once, report, package.

Usage: ``pneumonia evaluate --model runs/cnn-128`` or ``pneumonia evaluate --experiment ~/ray_results/NAME``
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from models.config import from_dict
from models.dataset import DataSplits, Split, load_splits
from models.errors import PneumoniaError
from models.package import PackageMetadata, package_versions
from tuning.config import TrainConfig
from tuning.experiment import is_remote
from tuning.metrics import sensitivity_threshold, youden_threshold
from tuning.report import build_report, display_path, write_report

PREDICT_BATCH_SIZE = 64


class EvaluationError(PneumoniaError, ValueError):
    """The model or experiment cannot be evaluated as asked."""


@dataclasses.dataclass
class Evaluation:
    report: dict
    report_dir: Path
    package_dir: Path


@dataclasses.dataclass(frozen=True)
class Scores:
    """P(PNEUMONIA) on validation and test, and the threshold chosen from validation alone."""

    val: np.ndarray
    test: np.ndarray
    threshold: float
    method: str


def predict_split(model, split: Split, image_size: int) -> np.ndarray:
    """P(PNEUMONIA) for every image of ``split``, in order, through the shared preprocessing."""
    from models.pipeline import make_dataset

    dataset = make_dataset(split, image_size, PREDICT_BATCH_SIZE)
    return np.concatenate([np.asarray(model.predict_on_batch(x)).reshape(-1) for x, _ in dataset])


def resolve_source(model_dir: str | None, experiment: str | None, ensemble: int = 1,
                   log: Callable[[str], None] = print) -> tuple[Path, dict]:
    """The model directory to evaluate and a description of where it came from; for an experiment with
    ``ensemble`` > 1, the ensemble of its best trials (see ``tuning.ensemble``)."""
    if bool(model_dir) == bool(experiment):
        raise EvaluationError("give exactly one of --model DIR or --experiment DIR")
    if ensemble < 1:
        raise EvaluationError(f"ensemble must be >= 1, got {ensemble}")
    if model_dir:
        if ensemble > 1:
            raise EvaluationError("an ensemble is built from a search's trials: use --experiment DIR with --ensemble")
        return Path(model_dir), {"kind": "model directory", "path": display_path(model_dir)}
    best_path = Path(experiment) / "best.json"
    if not best_path.is_file():
        raise EvaluationError(f"{best_path} not found: is {experiment} a finished tuning experiment?")
    best = json.loads(best_path.read_text())
    produced_by = {
        "kind": "tuning experiment",
        "experiment": display_path(experiment),
        "trial_id": best.get("trial_id"),
        "validation": best.get("metrics"),
    }
    if ensemble == 1:
        return Path(best["checkpoint_path"]), produced_by
    from tuning.ensemble import ensemble_from_experiment

    # A remote experiment's best.json sits in a local cache dir; its trials are read from storage.
    source = best["experiment"] if is_remote(best.get("experiment", "")) else str(experiment)
    directory, members = ensemble_from_experiment(source, best_path, ensemble, log)
    shown = [{**dataclasses.asdict(m), "checkpoint": display_path(m.checkpoint)} for m in members]
    return directory, {**produced_by, "ensemble": shown}


def default_name(config: TrainConfig, produced_by: dict) -> str:
    """``ensemble3-<best trial>``, ``<family>-<trial>`` for a search's best, else the training config's name."""
    members = produced_by.get("ensemble")
    if members:
        return f"ensemble{len(members)}-{members[0]['trial_id']}"
    if produced_by.get("trial_id"):
        return f"{config.model.family}-{produced_by['trial_id']}"
    return config.name


def choose_threshold(labels: np.ndarray, probabilities: np.ndarray, target_sensitivity: float | None) -> tuple[float, str]:
    if target_sensitivity is None:
        return youden_threshold(labels, probabilities), "Youden's J on the validation split"
    if not 0.0 < target_sensitivity <= 1.0:
        raise EvaluationError(f"--target-sensitivity must lie in (0, 1], got {target_sensitivity}")
    threshold = sensitivity_threshold(labels, probabilities, target_sensitivity)
    return threshold, f"highest threshold keeping validation sensitivity >= {target_sensitivity}"


def load_evaluation_data(config: TrainConfig, data: str | None, trained_fingerprint: str | None) -> DataSplits:
    """The splits the model was trained on; other data is refused (its validation could hold training images)."""
    splits = load_splits(data or config.data.path or None, config.data.val_fraction, config.data.seed)
    if trained_fingerprint and splits.fingerprint != trained_fingerprint:
        raise EvaluationError(
            f"the data at {splits.source} (fingerprint {splits.fingerprint}) is not the data this model was "
            f"trained on (fingerprint {trained_fingerprint}); its validation split could hold training "
            "images, so a threshold chosen on it would be biased. Pass --data with the training data."
        )
    return splits


def score(model, splits: DataSplits, image_size: int, target_sensitivity: float | None,
          log: Callable[[str], None]) -> Scores:
    """The threshold from validation, then the one read of the test split."""
    val = predict_split(model, splits.val, image_size)
    threshold, method = choose_threshold(splits.val.labels, val, target_sensitivity)
    log(f"threshold {threshold:.4f} ({method}; {len(splits.val)} validation images)")
    test = predict_split(model, splits.test, image_size)
    return Scores(val, test, threshold, method)


def export_package(source_dir: Path, metadata: PackageMetadata, report: dict, artifacts_dir: Path) -> Path:
    """``artifacts/VERSION``: the evaluated model byte for byte, with the threshold and test metrics."""
    from models.package import write_package

    created = datetime.now(timezone.utc)
    version = f"{report['name']}-{created:%Y%m%d%H%M%S}"
    test = report["test"]
    package = metadata.replace(
        version=version,
        created_at=created.isoformat(timespec="seconds"),
        threshold=report["threshold"],
        threshold_method=report["threshold_method"],
        test_metrics={k: v for k, v in test.items() if k != "confusion_matrix"},
        test_confusion_matrix=test["confusion_matrix"],
        confidence_intervals=report["confidence_intervals"],
        source={**report["model"]["produced_by"], "model_sha256": report["model"]["sha256"]},
        data=report["data"],
        history=[],
        runtime={},
        versions=package_versions(),
    )
    return write_package(source_dir, package, artifacts_dir / version)


def evaluate(
    model_dir: str | None = None,
    experiment: str | None = None,
    data: str | None = None,
    target_sensitivity: float | None = None,
    reports_dir: str | Path = "reports",
    artifacts_dir: str | Path = "artifacts",
    name: str | None = None,
    log: Callable[[str], None] = print,
    ensemble: int = 1,
) -> Evaluation:
    """``pneumonia evaluate``: score, report, export; the test split is read once, by :func:`score`."""
    from models.package import file_sha256, load_model_dir
    from models.runtime import configure_tensorflow

    configure_tensorflow(0, "float32")
    source_dir, produced_by = resolve_source(model_dir, experiment, ensemble, log)
    model, metadata = load_model_dir(source_dir)
    config = from_dict(TrainConfig, metadata.config)
    name = name or default_name(config, produced_by)
    splits = load_evaluation_data(config, data, metadata.data.get("fingerprint"))
    scores = score(model, splits, metadata.image_size, target_sensitivity, log)
    data_path = metadata.config["data"]["path"]
    config_shown = {**metadata.config, "data": {**metadata.config["data"], "path": data_path and display_path(data_path)}}
    described = {"source": display_path(source_dir), "sha256": file_sha256(source_dir / "model.keras"),
                 "produced_by": produced_by, "config": config_shown, "best_epoch": metadata.best_epoch,
                 "validation": metadata.validation}
    report = build_report(name, splits, {"val": scores.val, "test": scores.test}, scores.threshold, scores.method,
                          described)
    out = write_report(report, splits.test, scores.test, Path(reports_dir) / name)
    package_dir = export_package(source_dir, metadata, report, Path(artifacts_dir))
    test = report["test"]
    log(f"test ({len(splits.test)} images): accuracy {test['accuracy']:.4f}, AUC {test['auc']:.4f}, "
        f"sensitivity {test['sensitivity']:.4f}, specificity {test['specificity']:.4f}")
    log(f"report: {out / 'report.md'}")
    log(f"package: {package_dir}")
    return Evaluation(report, out, package_dir)
