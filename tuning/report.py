"""The evaluation report: ``report.json``, ``predictions.csv``, the plots and the model card of one evaluation.

Paths in a report are written relative to the working directory, or under ``~``, so a committed report does
not show the machine it was made on.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np

from models.dataset import CLASS_NAMES, DataSplits, Split
from models.package import utc_now
from tuning.metrics import binary_report, bootstrap_intervals, subgroup_rates

BOOTSTRAP_RESAMPLES = 1000


def display_path(path: str | os.PathLike) -> str:
    """``path`` relative to the working directory when it lies below or beside it, else with ``~`` for the
    home directory; URIs (s3://...) unchanged."""
    text = str(path)
    if "://" in text:
        return text
    absolute = os.path.abspath(text)
    relative = os.path.relpath(absolute)
    if not relative.startswith(os.path.join(os.pardir, os.pardir)):
        return relative
    home = os.path.expanduser("~")
    return "~" + absolute[len(home):] if absolute.startswith(home + os.sep) else absolute


def subgroup_report(splits: DataSplits, probabilities: dict[str, np.ndarray], threshold: float) -> dict:
    """Correct calls per file-name subgroup on validation and test; empty when the names tell none."""
    report = {}
    for split in (splits.val, splits.test):
        groups = split.subgroups()
        if groups is not None:
            report[split.name] = subgroup_rates(split.labels, probabilities[split.name], groups, threshold)
    return report


def build_report(name: str, splits: DataSplits, probabilities: dict[str, np.ndarray], threshold: float,
                 method: str, model: dict) -> dict:
    """Every figure of one evaluation; ``probabilities`` holds the ``val`` and ``test`` scores, ``model``
    says what was evaluated (source, sha256, produced_by, config, best epoch, validation metrics)."""
    labels = splits.test.labels
    test = probabilities["test"]
    return {
        "name": name,
        "created_at": utc_now(),
        "threshold": threshold,
        "threshold_method": method,
        "test": binary_report(labels, test, threshold),
        "test_at_0_5": binary_report(labels, test, 0.5),
        "validation_at_threshold": binary_report(splits.val.labels, probabilities["val"], threshold),
        "subgroups": subgroup_report(splits, probabilities, threshold),
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


def write_report(report: dict, test: Split, test_probabilities: np.ndarray, out: Path) -> Path:
    """``report.json``, ``predictions.csv``, the four plots and ``report.md`` into ``out``."""
    from tuning.model_card import render
    from tuning.plots import write_plots

    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_predictions(out / "predictions.csv", test, test_probabilities, report["threshold"])
    write_plots(test.labels, test_probabilities, report["test"], report["name"], out)
    (out / "report.md").write_text(render(report))
    return out
