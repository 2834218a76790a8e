"""Clinical metrics of a set of probabilities, computed by scikit-learn and SciPy (PNEUMONIA is positive).

Thresholds are chosen from validation data only; :func:`binary_report` then scores a split at a given one.
"""

from __future__ import annotations

import numpy as np

CI_METRICS = ("accuracy", "auc", "sensitivity", "specificity")
PLATEAU_TOLERANCE = 0.01  # the plateau threshold rule: Youden's J within this of its best


def _as_arrays(labels, probabilities) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(int).reshape(-1)
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    if labels.shape != probabilities.shape:
        raise ValueError(f"{labels.size} labels but {probabilities.size} probabilities")
    return labels, probabilities


def youden_threshold(labels, probabilities) -> float:
    """The ROC threshold that maximises Youden's J = sensitivity + specificity - 1."""
    from sklearn.metrics import roc_curve

    fpr, tpr, thresholds = roc_curve(*_as_arrays(labels, probabilities))
    finite = np.isfinite(thresholds)
    best = np.argmax(np.where(finite, tpr - fpr, -np.inf))
    return float(thresholds[best])


def youden_plateau(labels, probabilities, tolerance: float = PLATEAU_TOLERANCE) -> tuple[float, float, float]:
    """(threshold, low, high): the centre of the thresholds whose Youden's J lies within ``tolerance`` of the
    best, contiguous with the best. When J is flat over a wide range, as on a validation split the model
    separates well, the single best point is close to arbitrary; the centre of the plateau is not."""
    from sklearn.metrics import roc_curve

    fpr, tpr, thresholds = roc_curve(*_as_arrays(labels, probabilities), drop_intermediate=False)
    finite = np.isfinite(thresholds)
    j = np.where(finite, tpr - fpr, -np.inf)
    best = int(np.argmax(j))
    near = j >= j[best] - tolerance
    first = last = best  # thresholds descend with the index
    while first > 0 and near[first - 1]:
        first -= 1
    while last < len(j) - 1 and near[last + 1]:
        last += 1
    high, low = float(thresholds[first]), float(thresholds[last])
    return (high + low) / 2, low, high


def youden_curve(labels, probabilities) -> tuple[np.ndarray, np.ndarray]:
    """(thresholds, J) at every distinct score: for the J-curve plot."""
    from sklearn.metrics import roc_curve

    fpr, tpr, thresholds = roc_curve(*_as_arrays(labels, probabilities), drop_intermediate=False)
    finite = np.isfinite(thresholds)
    return thresholds[finite], (tpr - fpr)[finite]


def sensitivity_threshold(labels, probabilities, target: float) -> float:
    """The highest threshold whose sensitivity is still >= ``target`` (screening use)."""
    from sklearn.metrics import roc_curve

    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must lie in (0, 1], got {target}")
    _, tpr, thresholds = roc_curve(*_as_arrays(labels, probabilities), drop_intermediate=False)
    ok = (tpr >= target) & np.isfinite(thresholds)
    return float(thresholds[ok].max())


def binary_report(labels, probabilities, threshold: float) -> dict:
    """Every metric of the evaluation report at ``threshold``; confusion matrix as [[tn, fp], [fn, tp]]."""
    from sklearn.metrics import (
        accuracy_score,
        average_precision_score,
        balanced_accuracy_score,
        brier_score_loss,
        confusion_matrix,
        f1_score,
        precision_score,
        recall_score,
        roc_auc_score,
    )

    labels, probabilities = _as_arrays(labels, probabilities)
    predictions = (probabilities >= threshold).astype(int)
    return {
        "threshold": float(threshold),
        "accuracy": float(accuracy_score(labels, predictions)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predictions)),
        "auc": float(roc_auc_score(labels, probabilities)),
        "pr_auc": float(average_precision_score(labels, probabilities)),
        "sensitivity": float(recall_score(labels, predictions, pos_label=1, zero_division=0)),
        "specificity": float(recall_score(labels, predictions, pos_label=0, zero_division=0)),
        "precision": float(precision_score(labels, predictions, pos_label=1, zero_division=0)),
        "npv": float(precision_score(labels, predictions, pos_label=0, zero_division=0)),
        "f1": float(f1_score(labels, predictions, pos_label=1, zero_division=0)),
        "brier": float(brier_score_loss(labels, probabilities)),
        "confusion_matrix": confusion_matrix(labels, predictions, labels=[0, 1]).tolist(),
    }


def bootstrap_intervals(labels, probabilities, threshold: float, resamples: int = 1000, seed: int = 0,
                        level: float = 0.95) -> dict[str, list[float]]:
    """Percentile bootstrap CIs (scipy.stats.bootstrap, images resampled in pairs) of the headline metrics."""
    from scipy.stats import bootstrap
    from sklearn.metrics import accuracy_score, recall_score, roc_auc_score

    labels, probabilities = _as_arrays(labels, probabilities)
    statistics = {
        "accuracy": lambda y, p: accuracy_score(y, p >= threshold),
        "auc": lambda y, p: roc_auc_score(y, p) if len(np.unique(y)) == 2 else np.nan,
        "sensitivity": lambda y, p: recall_score(y, p >= threshold, pos_label=1, zero_division=0),
        "specificity": lambda y, p: recall_score(y, p >= threshold, pos_label=0, zero_division=0),
    }
    intervals = {}
    for name in CI_METRICS:
        result = bootstrap((labels, probabilities), statistics[name], paired=True, vectorized=False,
                           n_resamples=resamples, confidence_level=level, method="percentile",
                           random_state=np.random.default_rng(seed))
        intervals[name] = [float(result.confidence_interval.low), float(result.confidence_interval.high)]
    return intervals


def subgroup_rates(labels, probabilities, groups, threshold: float) -> list[dict]:
    """Per subgroup: images, how many are called correctly at ``threshold`` (with a Wilson 95 % interval),
    and the median P(PNEUMONIA). Shows where the errors fall, e.g. which series of normal films is over-called."""
    from scipy.stats import binomtest

    labels, probabilities = _as_arrays(labels, probabilities)
    groups = np.asarray(groups).reshape(-1)
    if groups.shape != labels.shape:
        raise ValueError(f"{labels.size} labels but {groups.size} subgroups")
    correct = (probabilities >= threshold).astype(int) == labels
    rows = []
    for group in sorted(set(groups.tolist())):
        member = groups == group
        n, k = int(member.sum()), int(correct[member].sum())
        interval = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        rows.append({"group": group, "images": n, "correct": k, "rate": k / n,
                     "ci": [float(interval.low), float(interval.high)],
                     "median_probability": float(np.median(probabilities[member]))})
    return rows
