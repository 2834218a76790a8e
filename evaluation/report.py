"""The evaluation report: ``report.json``, ``predictions.csv``, the plots and the model card of one evaluation.

Paths in a report are written relative to the working directory, or under ``~``, so a committed report does
not show the machine it was made on (``runtime.paths.display_path``).
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np

from data.dataset import CLASS_NAMES, DataSplits, Split
from data.film_checks import FilmChecks
from data.preprocessing import decode_image, preprocess
from evaluation.films import refusal_reason, split_refusals
from evaluation.metrics import binary_report, bootstrap_intervals, subgroup_rates
from evaluation.model_card import render
from evaluation.ood_set import ood_images, read_gray
from evaluation.plots import write_plots, write_validation_plots
from models.package import utc_now
from runtime.paths import display_path

BOOTSTRAP_RESAMPLES = 1000


def subgroup_report(splits: DataSplits, probabilities: dict[str, np.ndarray], threshold: float) -> dict:
    """Correct calls per file-name subgroup on validation and test; empty when the names tell none."""
    report = {}
    for split in (splits.val, splits.test):
        groups = split.subgroups()
        if groups is not None:
            report[split.name] = subgroup_rates(split.labels, probabilities[split.name], groups, threshold)
    return report


def build_report(name: str, splits: DataSplits, scores, model: dict) -> dict:
    """Every figure of one evaluation from its ``evaluation.evaluate.Scores``; ``model`` says what was evaluated
    (source, sha256, produced_by, config, best epoch, validation metrics)."""
    from sklearn.metrics import brier_score_loss

    labels = splits.test.labels
    test, threshold = scores.test, scores.threshold
    calibration = None
    if scores.calibration is not None:
        calibration = {**dataclasses.asdict(scores.calibration),
                       "validation_brier_before": float(brier_score_loss(splits.val.labels, scores.val_uncalibrated)),
                       "validation_brier_after": float(brier_score_loss(splits.val.labels, scores.val))}
    return {
        "name": name,
        "created_at": utc_now(),
        "threshold": threshold,
        "threshold_method": scores.method,
        "threshold_plateau": list(scores.plateau) if scores.plateau else None,
        "calibration": calibration,
        "test": binary_report(labels, test, threshold),
        "test_at_0_5": binary_report(labels, test, 0.5),
        "validation_at_threshold": binary_report(splits.val.labels, scores.val, threshold),
        "subgroups": subgroup_report(splits, {"val": scores.val, "test": test}, threshold),
        "confidence_intervals": bootstrap_intervals(labels, test, threshold, BOOTSTRAP_RESAMPLES),
        "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
        "counts": {s.name: s.counts() for s in (splits.train, splits.val, splits.test)},
        "data": {"source": display_path(splits.source), "layout": splits.layout, "fingerprint": splits.fingerprint,
                 "test_fingerprint": splits.test_fingerprint},
        "model": model,
    }


def write_predictions(path: Path, split: Split, probabilities: np.ndarray, threshold: float) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "prob_pneumonia", "pred"])
        for i, (label, probability) in enumerate(zip(split.labels, probabilities)):
            item = display_path(split.paths[i]) if split.paths is not None else f"{split.name}[{i}]"
            writer.writerow([item, CLASS_NAMES[label], repr(float(probability)),
                             CLASS_NAMES[int(probability >= threshold)]])


def write_report(report: dict, splits: DataSplits, scores, out: Path) -> Path:
    """``report.json``, ``predictions.csv``, the test plots, the validation plots (J curve, reliability before
    and after calibration) and ``report.md`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_predictions(out / "predictions.csv", splits.test, scores.test, report["threshold"])
    write_plots(splits.test.labels, scores.test, report["test"], report["name"], out)
    write_validation_plots(splits.val.labels, scores.val_uncalibrated, scores.val, report["threshold"],
                           scores.plateau, report["name"], out)
    (out / "report.md").write_text(render(report))
    return out


OOD_CHEST_FILMS = 25  # validation films transformed four ways into invalid input


def films_to_transform(split: Split) -> list[np.ndarray]:
    if split.paths is not None:
        return read_gray(split.paths[:OOD_CHEST_FILMS])
    images = split.images[:OOD_CHEST_FILMS]
    return [image if image.ndim == 2 else image[..., 0] for image in images]


def score_images(model, scorer, pngs: list[bytes], contract) -> np.ndarray:
    """OOD scores of encoded images, decoded and preprocessed as the endpoint does, in batches."""
    scores = []
    for start in range(0, len(pngs), 32):
        batch = np.stack([preprocess(decode_image(png), contract.image_size, contract.intensity).numpy()
                          for png in pngs[start:start + 32]])
        probabilities, embeddings = model.predict_on_batch(batch)
        scores.append(scorer.score(np.asarray(embeddings), np.asarray(probabilities)))
    return np.concatenate(scores)


def _refusals(reasons: list[str | None], gate_refused: np.ndarray) -> list[str | None]:
    """Per image, what the endpoint refuses it by: a film check (checked first), the gate, or nothing."""
    return [reason or ("ood_gate" if gated else None) for reason, gated in zip(reasons, gate_refused)]


def _counts(refused_by: list[str | None]) -> dict[str, int]:
    return {reason: refused_by.count(reason) for reason in dict.fromkeys(r for r in refused_by if r)}


def ood_report(model, splits: DataSplits, contract, scores, ood: tuple | None, checks: FilmChecks | None) -> dict:
    """What the endpoint refuses, as it refuses it: the film checks first (``data.film_checks``), then the
    gate (``ood``: (scorer, gate)). On in-distribution films (validation, test: refusing many of them is a
    failure) and on the check set (``evaluation.ood_set``): per kind, how many are refused and by what, and
    the AUROC of the gate's score against the test films."""
    from sklearn.metrics import roc_auc_score

    images = ood_images(films_to_transform(splits.val))
    if checks is None:
        val_checks, test_checks, image_checks = [None] * len(splits.val), [None] * len(splits.test), [None] * len(images)
    else:
        val_checks, test_checks = (split_refusals(split, contract.image_size, checks) for split in (splits.val, splits.test))
        image_checks = [refusal_reason(decode_image(image.png), contract.image_size, checks) for image in images]
    if ood is None:
        val = test = outside = None
        gated = {"val": np.zeros(len(splits.val), bool), "test": np.zeros(len(splits.test), bool),
                 "images": np.zeros(len(images), bool)}
        section = {"method": None}
    else:
        scorer, gate = ood
        val = scorer.score(scores.val_embeddings, scores.val_uncalibrated)
        test = scorer.score(scores.test_embeddings, scores.test_uncalibrated)
        outside = score_images(model, scorer, [image.png for image in images], contract)
        gated = {"val": val > gate.threshold, "test": test > gate.threshold, "images": outside > gate.threshold}
        section = {**dataclasses.asdict(gate), "gate_validation_refusal_rate": float(np.mean(gated["val"])),
                   "gate_test_refusal_rate": float(np.mean(gated["test"]))}
    val_by, test_by, image_by = (_refusals(c, gated[k]) for c, k in
                                 ((val_checks, "val"), (test_checks, "test"), (image_checks, "images")))
    kinds = []
    for kind in dict.fromkeys(image.kind for image in images):
        member = [i for i, image in enumerate(images) if image.kind == kind]
        refused = [image_by[i] for i in member]
        detected = float(np.mean([r is not None for r in refused]))
        auroc = None if ood is None else float(roc_auc_score(np.r_[np.zeros(len(test)), np.ones(len(member))],
                                                             np.r_[test, outside[member]]))
        kinds.append({"kind": kind, "images": len(member), "detection_rate": detected,
                      "by_checks": float(np.mean([r not in (None, "ood_gate") for r in refused])),
                      "by_gate": float(np.mean(gated["images"][member])), "auroc": auroc,
                      "verdict": "caught" if detected >= 0.9 else "missed" if detected < 0.5 else "partly caught"})
    return {
        **section,
        "film_checks": None if checks is None else {
            **{k: v for k, v in dataclasses.asdict(checks).items() if k != "inversion_weights"},
            "validation_refused": _counts(val_checks), "test_refused": _counts(test_checks)},
        "validation_refusal_rate": float(np.mean([r is not None for r in val_by])),
        "test_refusal_rate": float(np.mean([r is not None for r in test_by])),
        "test_refused": int(sum(r is not None for r in test_by)),
        "test_refused_by": _counts(test_by),
        "kinds": kinds,
        "images": [{"kind": image.kind, "name": image.name, "score": None if outside is None else float(outside[i]),
                    "refused": image_by[i] is not None, "refused_by": image_by[i]} for i, image in enumerate(images)],
    }
