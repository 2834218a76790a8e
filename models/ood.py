"""The out-of-distribution gate: is an input a chest film like the ones the model was trained on?

The served model gets a second output, the embedding that feeds its classifier head (the pooled features;
an ensemble's members' side by side), so one batched call gives both the probability and what the gate
scores. Scores, higher = less like the training films:

- ``mahalanobis`` (Lee et al. 2018): the smallest Mahalanobis distance of the embedding to a class mean, with
  one covariance shared by both classes (scikit-learn's Ledoit-Wolf estimate, stable when dimensions rival
  samples). Fitted on the training split's embeddings.
- ``knn`` (Sun et al. 2022): the distance to the k-th nearest training embedding, both L2-normalised.
- ``msp`` (Hendrycks & Gimpel 2017) and ``energy`` (Liu et al. 2020) need only the probability; for one
  sigmoid output both are functions of |logit| and rank inputs identically.

The threshold is a high quantile of the validation films' scores, so about 1 - quantile of in-distribution
films are refused. ``benchmarks/ood_scores.py`` compares the scores; the package keeps one.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np

from models.head import POOL_LAYER

METHODS = ("mahalanobis", "knn", "msp", "energy")
KNN_K = 10


def with_embedding(model):
    """``model`` with two outputs, [P(PNEUMONIA), embedding], sharing its weights: one call gives both. An
    ensemble (members nested, no pooling layer of its own) averages its members' probabilities, as it does alone,
    and concatenates their embeddings."""
    import keras

    members = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if members and not any(layer.name == POOL_LAYER for layer in model.layers):
        image = keras.Input(model.input_shape[1:], name="image")
        outputs = [with_embedding(member)(image) for member in members]
        probability = keras.layers.Average(name="pneumonia_probability", dtype="float32")([o[0] for o in outputs])
        embedding = keras.layers.Concatenate(name="embedding", dtype="float32")([o[1] for o in outputs])
        return keras.Model(image, [probability, embedding], name=f"{model.name}_with_embedding")
    features = keras.layers.Activation("linear", dtype="float32", name="embedding")(model.get_layer(POOL_LAYER).output)
    return keras.Model(model.inputs, [model.output, features], name=f"{model.name}_with_embedding")


def _binary_logit(probabilities) -> np.ndarray:
    p = np.clip(np.asarray(probabilities, dtype=np.float64).reshape(-1), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


@dataclasses.dataclass
class OodScorer:
    """A fitted score; ``arrays`` hold what it needs (class means and precision, or training embeddings)."""

    method: str
    arrays: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def score(self, embeddings: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
        if self.method == "msp":
            p = np.asarray(probabilities, dtype=np.float64).reshape(-1)
            return -np.maximum(p, 1 - p)
        if self.method == "energy":  # logits [-z/2, z/2]: -logsumexp = -(|z|/2 + log1p(exp(-|z|)))
            z = np.abs(_binary_logit(probabilities))
            return -(z / 2 + np.log1p(np.exp(-z)))
        x = np.asarray(embeddings, dtype=np.float64)
        if self.method == "mahalanobis":
            precision, means = self.arrays["precision"], self.arrays["means"]
            distances = [((x - mean) @ precision * (x - mean)).sum(axis=1) for mean in means]
            return np.min(distances, axis=0)
        if self.method == "knn":
            train = self.arrays["train"]
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
            distances = np.sqrt(np.maximum(2 - 2 * x @ train.T, 0.0))
            return np.sort(distances, axis=1)[:, min(KNN_K, train.shape[0]) - 1]
        raise ValueError(f"unknown OOD score {self.method!r}; known: {', '.join(METHODS)}")

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, **{k: v.astype(np.float32) for k, v in self.arrays.items()})
        return buffer.getvalue()

    @classmethod
    def load(cls, method: str, path: str | Path) -> OodScorer:
        with np.load(path) as data:
            return cls(method, {k: data[k].astype(np.float64) for k in data.files})


def fit_scorer(method: str, embeddings: np.ndarray, labels: np.ndarray) -> OodScorer:
    """Fit ``method`` on the training split's embeddings and labels."""
    if method in ("msp", "energy"):
        return OodScorer(method)
    x = np.asarray(embeddings, dtype=np.float64)
    if method == "knn":
        return OodScorer(method, {"train": x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)})
    if method != "mahalanobis":
        raise ValueError(f"unknown OOD score {method!r}; known: {', '.join(METHODS)}")
    from sklearn.covariance import LedoitWolf

    labels = np.asarray(labels).reshape(-1)
    means = np.stack([x[labels == c].mean(axis=0) for c in (0, 1)])
    centred = x - means[labels]
    return OodScorer(method, {"means": means, "precision": LedoitWolf(assume_centered=True).fit(centred).precision_})


@dataclasses.dataclass(frozen=True)
class OodGate:
    """What a package's metadata says about its gate; the fitted arrays are in ``file`` beside the model."""

    method: str
    threshold: float  # scores above it are refused
    quantile: float  # of the validation films' scores the threshold sits at
    validation_refusal_rate: float  # share of the validation films above the threshold
    fitted_on: str  # e.g. "training split (2000 of 4466 films)"
    file: str = "ood.npz"


def fit_gate(method: str, train: tuple[np.ndarray, np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
             quantile: float, fitted_on: str) -> tuple[OodScorer, OodGate]:
    """Fit on the training films' (embeddings, probabilities, labels); threshold at the ``quantile`` of the
    validation films' (embeddings, probabilities) scores."""
    if not 0.5 < quantile < 1.0:
        raise ValueError(f"the OOD quantile must lie in (0.5, 1), got {quantile}")
    embeddings, _, labels = train
    scorer = fit_scorer(method, embeddings, labels)
    scores = scorer.score(*val)
    threshold = float(np.quantile(scores, quantile))
    return scorer, OodGate(method, threshold, quantile, float(np.mean(scores > threshold)), fitted_on)
