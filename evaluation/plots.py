"""The four evaluation plots, drawn by scikit-learn's display classes on matplotlib's Agg backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data.dataset import CLASS_NAMES
from evaluation.metrics import youden_curve


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(5.5, 5), dpi=120)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_plots(labels: np.ndarray, probabilities: np.ndarray, operating: dict, title: str, out: Path) -> list[Path]:
    """confusion_matrix.png, roc.png, pr.png, calibration.png; ``operating`` = the report at the chosen threshold."""
    from sklearn.calibration import CalibrationDisplay
    from sklearn.metrics import ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay

    threshold = operating["threshold"]
    predictions = (probabilities >= threshold).astype(int)
    paths = []

    plt, fig, ax = _figure()
    ConfusionMatrixDisplay.from_predictions(labels, predictions, labels=[0, 1], display_labels=CLASS_NAMES,
                                            cmap="Blues", colorbar=False, ax=ax)
    ax.set_title(f"{title}\nconfusion matrix at threshold {threshold:.3f}")
    paths.append(_save(plt, fig, out / "confusion_matrix.png"))

    plt, fig, ax = _figure()
    RocCurveDisplay.from_predictions(labels, probabilities, name="test", ax=ax, plot_chance_level=True)
    ax.plot(1 - operating["specificity"], operating["sensitivity"], "o", color="crimson", markersize=9,
            label=f"operating point (t = {threshold:.3f}): sens {operating['sensitivity']:.3f}, "
                  f"spec {operating['specificity']:.3f}")
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(f"{title}\nROC curve, AUC {operating['auc']:.3f}")
    ax.legend(loc="lower right", fontsize=8)
    paths.append(_save(plt, fig, out / "roc.png"))

    plt, fig, ax = _figure()
    PrecisionRecallDisplay.from_predictions(labels, probabilities, name="test", ax=ax, plot_chance_level=True)
    ax.plot(operating["sensitivity"], operating["precision"], "o", color="crimson", markersize=9,
            label=f"operating point (t = {threshold:.3f})")
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision (PPV)")
    ax.set_title(f"{title}\nprecision-recall, average precision {operating['pr_auc']:.3f}")
    ax.legend(loc="lower left", fontsize=8)
    paths.append(_save(plt, fig, out / "pr.png"))

    plt, fig, ax = _figure()
    CalibrationDisplay.from_predictions(labels, probabilities, n_bins=10, strategy="uniform", name="test", ax=ax)
    ax.set_xlabel("mean predicted probability of pneumonia")
    ax.set_ylabel("fraction with pneumonia")
    ax.set_title(f"{title}\ncalibration, Brier score {operating['brier']:.3f}")
    ax.legend(loc="upper left", fontsize=8)
    paths.append(_save(plt, fig, out / "calibration.png"))
    return paths


def write_validation_plots(labels: np.ndarray, uncalibrated: np.ndarray, calibrated: np.ndarray, threshold: float,
                           plateau: tuple[float, float] | None, title: str, out: Path) -> list[Path]:
    """validation_j.png (Youden's J against the threshold, the plateau and the chosen threshold marked) and
    reliability.png (validation reliability before and after calibration): how the operating point was chosen."""
    from sklearn.calibration import CalibrationDisplay

    paths = []
    plt, fig, ax = _figure()
    thresholds, j = youden_curve(labels, calibrated)
    ax.step(thresholds, j, where="post", color="steelblue", label="Youden's J = sensitivity + specificity - 1")
    if plateau is not None:
        ax.axvspan(plateau[0], plateau[1], color="gold", alpha=0.3, label="within 0.01 of the best J")
    ax.axvline(threshold, color="crimson", label=f"chosen threshold {threshold:.3f}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("threshold on the (calibrated) probability of pneumonia")
    ax.set_ylabel("Youden's J on the validation split")
    ax.set_title(f"{title}\nvalidation J curve")
    ax.legend(loc="lower center", fontsize=8)
    paths.append(_save(plt, fig, out / "validation_j.png"))

    plt, fig, ax = _figure()
    CalibrationDisplay.from_predictions(labels, uncalibrated, n_bins=10, strategy="quantile", name="model output",
                                        ax=ax)
    if calibrated is not uncalibrated:
        CalibrationDisplay.from_predictions(labels, calibrated, n_bins=10, strategy="quantile", name="calibrated",
                                            ax=ax)
    ax.set_xlabel("mean predicted probability of pneumonia")
    ax.set_ylabel("fraction with pneumonia")
    ax.set_title(f"{title}\nvalidation reliability, before and after calibration")
    ax.legend(loc="upper left", fontsize=8)
    paths.append(_save(plt, fig, out / "reliability.png"))
    return paths
