"""Test-split evaluation of one chosen model: threshold on validation, test scored once, report, package.

Usage: ``pneumonia evaluate --model runs/cnn-128`` or ``pneumonia evaluate --experiment ~/ray_results/NAME``
(the command line has ``tuning.ensemble.resolve_experiment`` turn an experiment into the model directory).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from data.dataset import DataSplits, Split, load_splits, stratified_subset
from data.film_checks import FilmChecks
from data.pipeline import make_dataset
from data.preprocessing import InputContract
from evaluation.borderline import firm_report, fit_band
from evaluation.films import fit_checks
from evaluation.metrics import PLATEAU_TOLERANCE, sensitivity_threshold, youden_plateau, youden_threshold
from evaluation.report import build_report, ood_report, write_report
from evaluation.stability import FilmMoves, film_moves, stability_report
from models.borderline import BorderlineBand
from models.calibration import Calibration, fit_platt
from models.config import TrainConfig
from models.inference import Predictor, batch_predictor
from models.ood import OodGate, OodScorer, fit_gate, with_embedding
from models.package import PackageMetadata, file_sha256, load_model_dir, package_versions, write_package
from models.package_store import publish
from runtime.config import from_dict
from runtime.errors import PneumoniaError
from runtime.paths import display_path
from runtime.tensorflow_setup import configure_tensorflow

PREDICT_BATCH_SIZE = 64


class EvaluationError(PneumoniaError, ValueError):
    """The model or experiment cannot be evaluated as asked."""


@dataclasses.dataclass
class Evaluation:
    report: dict
    report_dir: Path
    package_dir: Path
    package_uri: str | None = None  # where it was published in storage, when it was

    @property
    def package(self) -> str:
        """What to serve: the published package on a cluster's storage, else the local folder."""
        return self.package_uri or str(self.package_dir)


THRESHOLD_RULES = ("plateau", "youden")
OOD_TRAIN_IMAGES = 2000  # training films the OOD gate is fitted on (a stratified subset: their embeddings cost)


@dataclasses.dataclass(frozen=True)
class EvaluationOptions:
    """How the operating point and the OOD gate are chosen, all on validation (train for the gate's fit)."""

    target_sensitivity: float | None = None  # set: the highest threshold keeping validation sensitivity >= it
    threshold_rule: str = "plateau"  # or "youden"
    calibrate: bool = True  # Platt scaling fitted on validation
    ood_method: str = "mahalanobis"  # see models.ood; "none" = no gate
    ood_quantile: float = 0.995  # the gate's threshold: this quantile of the validation films' scores
    film_checks: bool = True  # checks before the model (data.film_checks), fitted on training films
    stability: bool = True  # re-encode every validation and test film benignly; report how far P moves
    borderline: bool = True  # with stability: the borderline band fitted on validation's moves (evaluation.borderline)
    stability_films: int = 0  # > 0: stability and the band on a fixed stratified sample of this many films per split


@dataclasses.dataclass(frozen=True)
class Scores:
    """Calibrated P(PNEUMONIA) on validation and test, the threshold chosen from validation alone, and the
    embeddings the OOD gate scores."""

    val: np.ndarray
    test: np.ndarray
    threshold: float
    method: str
    val_uncalibrated: np.ndarray
    test_uncalibrated: np.ndarray
    calibration: Calibration | None
    plateau: tuple[float, float] | None  # the near-optimal J interval the plateau rule took the centre of
    val_embeddings: np.ndarray
    test_embeddings: np.ndarray


def predict_with_embedding(model: Predictor, split: Split, contract: InputContract) -> tuple[np.ndarray, np.ndarray]:
    """The model's P(PNEUMONIA) and embedding for every image of ``split``, in order, through the shared
    preprocessing. ``model``: :func:`served_model`'s, or anything with Keras' ``predict_on_batch`` and those two
    outputs."""
    dataset = make_dataset(split, contract.image_size, PREDICT_BATCH_SIZE, intensity=contract.intensity)
    outputs = [model.predict_on_batch(x) for x, _ in dataset]
    return (np.concatenate([np.asarray(p).reshape(-1) for p, _ in outputs]),
            np.concatenate([np.asarray(e) for _, e in outputs]))


def served_model(model) -> Predictor:
    """What the endpoint calls for a Keras classifier: probability and embedding in one pass
    (``models.ood.with_embedding``), run by the runtime the endpoint runs (``models.inference``), so the
    threshold, calibration and OOD gate fitted here hold for the served numbers."""
    return batch_predictor(with_embedding(model))


def predict_split(model, split: Split, contract: InputContract) -> np.ndarray:
    """The model's P(PNEUMONIA) for every image of ``split``, in order, through the shared preprocessing."""
    return predict_with_embedding(served_model(model), split, contract)[0]


def default_name(config: TrainConfig, produced_by: dict) -> str:
    """``ensemble3-<best trial>``, ``<family>-<trial>`` for a search's best, else the training config's name."""
    members = produced_by.get("ensemble")
    if members:
        return f"ensemble{len(members)}-{members[0]['trial_id']}"
    if produced_by.get("trial_id"):
        return f"{config.model.family}-{produced_by['trial_id']}"
    return config.name


def choose_threshold(labels: np.ndarray, probabilities: np.ndarray, target_sensitivity: float | None,
                     rule: str = "plateau") -> tuple[float, str, tuple[float, float] | None]:
    """(threshold, how it was chosen, the J plateau where the plateau rule was used), from validation only."""
    if target_sensitivity is not None:
        if not 0.0 < target_sensitivity <= 1.0:
            raise EvaluationError(f"--target-sensitivity must lie in (0, 1], got {target_sensitivity}")
        threshold = sensitivity_threshold(labels, probabilities, target_sensitivity)
        return threshold, f"highest threshold keeping validation sensitivity >= {target_sensitivity}", None
    if rule == "youden":
        return youden_threshold(labels, probabilities), "Youden's J on the validation split", None
    if rule != "plateau":
        raise EvaluationError(f"threshold rule must be one of {', '.join(THRESHOLD_RULES)}, got {rule!r}")
    threshold, low, high = youden_plateau(labels, probabilities, PLATEAU_TOLERANCE)
    return threshold, (f"centre of the thresholds within {PLATEAU_TOLERANCE} of the best Youden's J on the "
                       f"validation split ({low:.4f}-{high:.4f})"), (low, high)


def load_evaluation_data(config: TrainConfig, data: str | None, trained_fingerprint: str | None) -> DataSplits:
    """The splits the model was trained on; other data is refused (its validation could hold training images)."""
    d = config.data
    splits = load_splits(data or d.path or None, d.val_fraction, d.seed, validation=d.validation)
    if trained_fingerprint and splits.fingerprint != trained_fingerprint:
        raise EvaluationError(
            f"the data at {splits.source} (fingerprint {splits.fingerprint}) is not the data this model was "
            f"trained on (fingerprint {trained_fingerprint}); its validation split could hold training "
            "images, so a threshold chosen on it would be biased. Pass --data with the training data."
        )
    return splits


def score(model, splits: DataSplits, contract: InputContract, options: EvaluationOptions,
          log: Callable[[str], None]) -> Scores:
    """Calibration and threshold from validation, then the one read of the test split. ``model`` has the
    embedding output (``models.ood.with_embedding``)."""
    raw, val_embeddings = predict_with_embedding(model, splits.val, contract)
    calibration = None
    if options.calibrate:
        calibration = fit_platt(splits.val.labels, raw, f"validation split ({len(splits.val)} images)")
    val = raw if calibration is None else calibration.apply(raw)
    threshold, method, plateau = choose_threshold(splits.val.labels, val, options.target_sensitivity,
                                                  options.threshold_rule)
    if calibration is not None:
        method += f", on probabilities calibrated there (Platt: slope {calibration.slope:.3f}, " \
                  f"intercept {calibration.intercept:.3f})"
        log(f"calibration: Platt scaling on validation, slope {calibration.slope:.3f}, "
            f"intercept {calibration.intercept:.3f}")
    log(f"threshold {threshold:.4f} ({method}; {len(splits.val)} validation images)")
    test, test_embeddings = predict_with_embedding(model, splits.test, contract)  # the one read of the test split
    return Scores(val, test if calibration is None else calibration.apply(test), threshold, method, raw, test,
                  calibration, plateau, val_embeddings, test_embeddings)


def fit_ood_gate(model, splits: DataSplits, contract: InputContract, scores: Scores, options: EvaluationOptions,
                 log: Callable[[str], None]) -> tuple[OodScorer, OodGate] | None:
    """The OOD gate: fitted on (a stratified subset of) the training films' embeddings, its threshold at the
    ``ood_quantile`` of the validation films' scores."""
    if options.ood_method == "none":
        return None
    train = stratified_subset(splits.train, OOD_TRAIN_IMAGES, seed=0)
    probabilities, embeddings = predict_with_embedding(model, train, contract)
    fitted_on = f"training split ({len(train)} of {len(splits.train)} films)"
    scorer, gate = fit_gate(options.ood_method, (embeddings, probabilities, train.labels),
                            (scores.val_embeddings, scores.val_uncalibrated), options.ood_quantile, fitted_on)
    log(f"OOD gate: {gate.method} score, threshold {gate.threshold:.4g} (validation quantile {gate.quantile}), "
        f"fitted on the {fitted_on}")
    return scorer, gate


def fit_film_checks(splits: DataSplits, contract: InputContract, options: EvaluationOptions,
                    log: Callable[[str], None]) -> FilmChecks | None:
    """The checks before the model, fitted on the same stratified subset of training films as the gate."""
    if not options.film_checks:
        return None
    train = stratified_subset(splits.train, OOD_TRAIN_IMAGES, seed=0)
    checks = fit_checks(train, contract.image_size, f"training split ({len(train)} of {len(splits.train)} films)")
    log(f"film checks: shorter side >= {checks.min_side} px, width/height {checks.aspect_range[0]:.3g}-"
        f"{checks.aspect_range[1]:.3g}, grey-level spread >= {checks.min_spread:.4f}, not inverted; fitted on the "
        f"{checks.fitted_on}")
    return checks


def export_package(source_dir: Path, metadata: PackageMetadata, report: dict, artifacts_dir: Path,
                   calibration: Calibration | None, ood: tuple[OodScorer, OodGate] | None,
                   checks: FilmChecks | None = None, inference: str = "keras",
                   band: BorderlineBand | None = None) -> Path:
    """``artifacts/VERSION``: the evaluated model byte for byte, with the threshold, calibration, OOD gate,
    borderline band and test metrics; its ``runtime`` says which inference runtime computed them (``models.inference``)."""
    created = datetime.now(UTC)
    version = f"{report['name']}-{created:%Y%m%d%H%M%S}"
    test = report["test"]
    package = metadata.replace(
        version=version,
        created_at=created.isoformat(timespec="seconds"),
        threshold=report["threshold"],
        threshold_method=report["threshold_method"],
        calibration=calibration,
        ood=None if ood is None else ood[1],
        film_checks=checks,
        borderline=band,
        test_metrics={k: v for k, v in test.items() if k != "confusion_matrix"},
        test_confusion_matrix=test["confusion_matrix"],
        confidence_intervals=report["confidence_intervals"],
        source={**report["model"]["produced_by"], "model_sha256": report["model"]["sha256"]},
        data=report["data"],
        history=[],
        runtime={"inference": inference},
        versions=package_versions(),
    )
    return write_package(source_dir, package, artifacts_dir / version, None if ood is None else ood[0])


def borderline_band(served: Predictor, evaluated: PackageMetadata, val: Split, options: EvaluationOptions,
                    log: Callable[[str], None]) -> tuple[dict[str, FilmMoves], BorderlineBand | None]:
    """Validation's films re-encoded (kept for the stability report) and the band fitted on them, when the
    options ask for the stability measurement and the band; no label is read, no test film."""
    if not options.stability:
        return {}, None
    moves = {val.name: film_moves(served, evaluated, val)}
    if not options.borderline:
        return moves, None
    band = fit_band(moves[val.name], evaluated.threshold)
    log(f"borderline band: P {band.low:.4f}-{band.high:.4f} ({band.half_width:.3f} logit on each side of the "
        f"threshold; {band.rule})")
    return moves, band


def evaluate(
    model_dir: str | Path,
    data: str | None = None,
    reports_dir: str | Path = "reports",
    artifacts_dir: str | Path = "artifacts",
    name: str | None = None,
    log: Callable[[str], None] = print,
    options: EvaluationOptions = EvaluationOptions(),
    produced_by: dict | None = None,
    publish_to: str | None = None,
) -> Evaluation:
    """``pneumonia evaluate``: score, fit the OOD gate and the film checks, report, export; the test split is read once, by
    :func:`score`. ``produced_by`` says where the model came from (a search's trial or ensemble, see
    ``tuning.ensemble.resolve_experiment``); default: the model directory itself. ``publish_to``: a storage path
    (s3://, gs://) the package is also published to, in ``packages/VERSION``, for the nodes of a cluster."""
    configure_tensorflow(0, "float32")
    source_dir = Path(model_dir)
    produced_by = produced_by or {"kind": "model directory", "path": display_path(model_dir)}
    model, metadata = load_model_dir(source_dir)
    served = served_model(model)
    config = from_dict(TrainConfig, metadata.config)
    name = name or default_name(config, produced_by)
    splits = load_evaluation_data(config, data, metadata.data.get("fingerprint"))
    scores = score(served, splits, metadata.input, options, log)
    ood = fit_ood_gate(served, splits, metadata.input, scores, options, log)
    checks = fit_film_checks(splits, metadata.input, options, log)
    data_path = metadata.config["data"]["path"]
    config_shown = {**metadata.config, "data": {**metadata.config["data"], "path": data_path and display_path(data_path)}}
    described = {"source": display_path(source_dir), "sha256": file_sha256(source_dir / "model.keras"),
                 "produced_by": produced_by, "config": config_shown, "best_epoch": metadata.best_epoch,
                 "validation": metadata.validation}
    report = build_report(name, splits, scores, described)
    if ood is not None or checks is not None:
        report["ood"] = ood_report(served, splits, metadata.input, scores, ood, checks)
    evaluated = metadata.replace(threshold=scores.threshold, calibration=scores.calibration)
    # every film, or for a quick run a fixed sample (the same films each time)
    measured = [stratified_subset(split, options.stability_films, seed=0) for split in (splits.val, splits.test)]
    moves, band = borderline_band(served, evaluated, measured[0], options, log)
    package_dir = export_package(source_dir, metadata, report, Path(artifacts_dir), scores.calibration, ood, checks,
                                 served.runtime, band)
    if options.stability:
        command = f"pneumonia stability --package {display_path(package_dir)} --split val --split test"
        report["stability"] = stability_report(served, evaluated.replace(borderline=band), measured, command, log,
                                               moves)
        if options.stability_films:
            report["stability"]["sample"] = (f"a fixed stratified sample of at most {options.stability_films} films "
                                             "per split (stability_films), not every film")
    if band is not None:
        report["borderline"] = {**dataclasses.asdict(band),
                                **{split.name: firm_report(split.labels, probabilities, scores.threshold, band)
                                   for split, probabilities in ((splits.val, scores.val), (splits.test, scores.test))}}
        firm = report["borderline"]["test"]
        log(f"borderline band {band.low:.4f}-{band.high:.4f}: {firm['firm']} of {firm['films']} test films answered "
            f"firm ({firm['firm_share']:.1%})")
    out = write_report(report, splits, scores, Path(reports_dir) / name)
    test = report["test"]
    log(f"test ({len(splits.test)} images): accuracy {test['accuracy']:.4f}, AUC {test['auc']:.4f}, "
        f"sensitivity {test['sensitivity']:.4f}, specificity {test['specificity']:.4f}")
    log(f"report: {out / 'report.md'}")
    log(f"package: {package_dir}")
    uri = None
    if publish_to:
        uri = publish(package_dir, publish_to)
        log(f"package published: {uri}")
    return Evaluation(report, out, package_dir, uri)
