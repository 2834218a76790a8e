"""Clinical metrics of a set of probabilities, computed by scikit-learn (PNEUMONIA is positive)."""

from __future__ import annotations

import numpy as np


def clinical_metrics(labels: np.ndarray, probabilities: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Loss, accuracy, ROC AUC, sensitivity and specificity at ``threshold``."""
    from sklearn.metrics import accuracy_score, log_loss, recall_score, roc_auc_score

    labels = np.asarray(labels).astype(int).reshape(-1)
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    predictions = (probabilities >= threshold).astype(int)
    both_classes = len(np.unique(labels)) == 2
    return {
        "loss": float(log_loss(labels, probabilities, labels=[0, 1])),
        "accuracy": float(accuracy_score(labels, predictions)),
        "auc": float(roc_auc_score(labels, probabilities)) if both_classes else float("nan"),
        "sensitivity": float(recall_score(labels, predictions, pos_label=1, zero_division=0)),
        "specificity": float(recall_score(labels, predictions, pos_label=0, zero_division=0)),
    }
