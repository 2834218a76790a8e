"""Calibration of a model's P(PNEUMONIA), fitted on validation and stored in its package.

Platt scaling (Platt 1999): a logistic regression (scikit-learn, L2 with C = 1, which keeps the slope finite
on a nearly separable validation split) on the logit of the model's probability. Monotone, so the ranking
and the ROC AUC stay as they are; what changes is what a probability means, and so where a threshold sits.
Evaluation and serving apply it through :meth:`Calibration.apply`, so a served probability is the
evaluated one.
"""

from __future__ import annotations

import dataclasses

import numpy as np

EPSILON = 1e-7  # probabilities are clipped to [EPSILON, 1 - EPSILON] before the logit


def logit(probabilities) -> np.ndarray:
    p = np.clip(np.asarray(probabilities, dtype=np.float64), EPSILON, 1 - EPSILON)
    return np.log(p) - np.log1p(-p)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """calibrated = sigmoid(slope * logit(p) + intercept); the identity is slope 1, intercept 0."""

    method: str = "platt"
    slope: float = 1.0
    intercept: float = 0.0
    fitted_on: str = ""  # e.g. "validation split (750 images)"

    def apply(self, probabilities) -> np.ndarray:
        z = self.slope * logit(probabilities) + self.intercept
        return 1.0 / (1.0 + np.exp(-z))


def fit_platt(labels, probabilities, fitted_on: str = "") -> Calibration:
    from sklearn.linear_model import LogisticRegression

    labels = np.asarray(labels).astype(int).reshape(-1)
    if len(np.unique(labels)) != 2:
        raise ValueError("Platt scaling needs both classes in the validation split")
    model = LogisticRegression(C=1.0).fit(logit(probabilities).reshape(-1, 1), labels)
    return Calibration("platt", float(model.coef_[0, 0]), float(model.intercept_[0]), fitted_on)
