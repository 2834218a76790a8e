"""The evaluation report: ``report.json``, ``predictions.csv``, the plots and the model card of one evaluation.

Paths in a report are written relative to the working directory, or under ``~``, so a committed report does
not show the machine it was made on (``models.paths.display_path``).
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np

from evaluation.metrics import binary_report, bootstrap_intervals, subgroup_rates
from evaluation.model_card import render
from evaluation.ood_set import ood_images, read_gray
from evaluation.plots import write_plots, write_validation_plots
from models.dataset import CLASS_NAMES, DataSplits, Split
from models.package import utc_now
from models.paths import display_path
from models.preprocessing import decode_image, preprocess

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


def ood_report(model, splits: DataSplits, contract, scores, scorer, gate) -> dict:
    """The gate on in-distribution films (validation, test: refusing many of them is a failure) and on the
    check set (``evaluation.ood_set``): per kind, how many are refused at the threshold, and the AUROC of OOD
    images against the test films."""
    from sklearn.metrics import roc_auc_score

    val = scorer.score(scores.val_embeddings, scores.val_uncalibrated)
    test = scorer.score(scores.test_embeddings, scores.test_uncalibrated)
    images = ood_images(films_to_transform(splits.val))
    outside = score_images(model, scorer, [image.png for image in images], contract)
    kinds = []
    for kind in dict.fromkeys(image.kind for image in images):
        member = np.asarray([image.kind == kind for image in images])
        detected = float(np.mean(outside[member] > gate.threshold))
        auroc = roc_auc_score(np.r_[np.zeros(len(test)), np.ones(member.sum())], np.r_[test, outside[member]])
        kinds.append({"kind": kind, "images": int(member.sum()), "detection_rate": detected, "auroc": float(auroc),
                      "verdict": "caught" if detected >= 0.9 else "missed" if detected < 0.5 else "partly caught"})
    return {
        **dataclasses.asdict(gate),
        "validation_refusal_rate": float(np.mean(val > gate.threshold)),
        "test_refusal_rate": float(np.mean(test > gate.threshold)),
        "test_refused": int(np.sum(test > gate.threshold)),
        "kinds": kinds,
        "images": [{"kind": image.kind, "name": image.name, "score": float(score), "refused": bool(score > gate.threshold)}
                   for image, score in zip(images, outside)],
    }
