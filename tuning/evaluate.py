"""Test-split evaluation of one chosen model: threshold on validation, test scored once, report, package.

Usage: ``pneumonia evaluate --model runs/cnn-128`` or ``pneumonia evaluate --experiment ~/ray_results/NAME``
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from models.config import from_dict
from models.dataset import CLASS_NAMES, DataSplits, Split, load_splits
from tuning.config import TrainConfig
from tuning.metrics import (
    binary_report,
    bootstrap_intervals,
    sensitivity_threshold,
    subgroup_rates,
    youden_threshold,
)

PREDICT_BATCH_SIZE = 64
BOOTSTRAP_RESAMPLES = 1000


class EvaluationError(ValueError):
    """The model or experiment cannot be evaluated as asked."""


@dataclasses.dataclass
class Evaluation:
    report: dict
    report_dir: Path
    package_dir: Path


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
        return Path(model_dir), {"kind": "model directory", "path": str(model_dir)}
    best_path = Path(experiment) / "best.json"
    if not best_path.is_file():
        raise EvaluationError(f"{best_path} not found: is {experiment} a finished tuning experiment?")
    best = json.loads(best_path.read_text())
    produced_by = {
        "kind": "tuning experiment",
        "experiment": str(experiment),
        "trial_id": best.get("trial_id"),
        "validation": best.get("metrics"),
    }
    if ensemble == 1:
        return Path(best["checkpoint_path"]), produced_by
    from tuning.ensemble import ensemble_from_experiment
    from tuning.run import is_remote

    # A remote experiment's best.json sits in a local cache dir; its trials are read from storage.
    source = best["experiment"] if is_remote(best.get("experiment", "")) else str(experiment)
    directory, members = ensemble_from_experiment(source, best_path, ensemble, log)
    return directory, {**produced_by, "ensemble": [dataclasses.asdict(m) for m in members]}


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
    threshold = sensitivity_threshold(labels, probabilities, target_sensitivity)
    return threshold, f"highest threshold keeping validation sensitivity >= {target_sensitivity}"


def _load_data(config: TrainConfig, data: str | None, trained_fingerprint: str | None) -> DataSplits:
    splits = load_splits(data or config.data.path or None, config.data.val_fraction, config.data.seed)
    if trained_fingerprint and splits.fingerprint != trained_fingerprint:
        raise EvaluationError(
            f"the data at {splits.source} (fingerprint {splits.fingerprint}) is not the data this model was "
            f"trained on (fingerprint {trained_fingerprint}); its validation split could hold training "
            "images, so a threshold chosen on it would be biased. Pass --data with the training data."
        )
    return splits


def subgroup_report(splits: DataSplits, probabilities: dict[str, np.ndarray], threshold: float) -> dict:
    """Correct calls per file-name subgroup on validation and test; empty when the names tell none."""
    report = {}
    for split in (splits.val, splits.test):
        groups = split.subgroups()
        if groups is not None:
            report[split.name] = subgroup_rates(split.labels, probabilities[split.name], groups, threshold)
    return report


def write_predictions(path: Path, split: Split, probabilities: np.ndarray, threshold: float) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "prob_pneumonia", "pred"])
        for i, (label, probability) in enumerate(zip(split.labels, probabilities)):
            item = split.paths[i] if split.paths is not None else f"{split.name}[{i}]"
            writer.writerow([item, CLASS_NAMES[label], repr(float(probability)),
                             CLASS_NAMES[int(probability >= threshold)]])


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
    from models.package import file_sha256, load_model_dir, package_versions, write_package
    from models.runtime import configure_tensorflow
    from tuning.model_card import render
    from tuning.plots import write_plots

    configure_tensorflow(0, "float32")
    source_dir, produced_by = resolve_source(model_dir, experiment, ensemble, log)
    model, metadata = load_model_dir(source_dir)
    config = from_dict(TrainConfig, metadata["config"])
    name = name or default_name(config, produced_by)
    size = config.model.image_size
    splits = _load_data(config, data, metadata.get("data", {}).get("fingerprint"))

    val_probabilities = predict_split(model, splits.val, size)
    threshold, method = choose_threshold(splits.val.labels, val_probabilities, target_sensitivity)
    log(f"threshold {threshold:.4f} ({method}; {len(splits.val)} validation images)")
    test_probabilities = predict_split(model, splits.test, size)  # the one read of the test split

    labels = splits.test.labels
    report = {
        "name": name,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "threshold": threshold,
        "threshold_method": method,
        "test": binary_report(labels, test_probabilities, threshold),
        "test_at_0_5": binary_report(labels, test_probabilities, 0.5),
        "validation_at_threshold": binary_report(splits.val.labels, val_probabilities, threshold),
        "subgroups": subgroup_report(splits, {"val": val_probabilities, "test": test_probabilities}, threshold),
        "confidence_intervals": bootstrap_intervals(labels, test_probabilities, threshold, BOOTSTRAP_RESAMPLES),
        "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
        "counts": {s.name: s.counts() for s in (splits.train, splits.val, splits.test)},
        "data": {"source": splits.source, "layout": splits.layout, "fingerprint": splits.fingerprint,
                 "test_fingerprint": splits.test_fingerprint},
        "model": {
            "source": str(source_dir),
            "sha256": file_sha256(source_dir / "model.keras"),
            "produced_by": produced_by,
            "config": metadata["config"],
            "best_epoch": metadata.get("best_epoch"),
            "validation": metadata.get("validation", {}),
        },
    }
    out = Path(reports_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_predictions(out / "predictions.csv", splits.test, test_probabilities, threshold)
    write_plots(labels, test_probabilities, report["test"], name, out)
    (out / "report.md").write_text(render(report))

    created = datetime.now(timezone.utc)
    version = f"{name}-{created:%Y%m%d%H%M%S}"
    package_metadata = {
        **{k: metadata[k] for k in ("class_names", "positive_class", "input", "config", "ensemble") if k in metadata},
        "version": version,
        "created_at": created.isoformat(timespec="seconds"),
        "threshold": threshold,
        "threshold_method": method,
        "test_metrics": {k: v for k, v in report["test"].items() if k != "confusion_matrix"},
        "test_confusion_matrix": report["test"]["confusion_matrix"],
        "confidence_intervals": report["confidence_intervals"],
        "source": {**produced_by, "model_sha256": report["model"]["sha256"]},
        "data": report["data"],
        "versions": package_versions(),
    }
    package_dir = write_package(source_dir, package_metadata, Path(artifacts_dir) / version)
    test = report["test"]
    log(f"test ({len(labels)} images): accuracy {test['accuracy']:.4f}, AUC {test['auc']:.4f}, "
        f"sensitivity {test['sensitivity']:.4f}, specificity {test['specificity']:.4f}")
    log(f"report: {out / 'report.md'}")
    log(f"package: {package_dir}")
    return Evaluation(report, out, package_dir)
