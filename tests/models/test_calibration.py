"""Platt scaling fitted on validation, and a package's probabilities through it."""

import numpy as np
import pytest

from models.calibration import Calibration, fit_platt, logit
from models.package import PackageMetadata


def test_platt_scaling_recovers_a_known_distortion_and_keeps_the_ranking():
    rng = np.random.default_rng(0)
    truth = rng.uniform(0.02, 0.98, 20_000)  # calibrated probabilities
    labels = (rng.random(truth.size) < truth).astype(int)
    overconfident = 1 / (1 + np.exp(-3.0 * logit(truth) - 1.0))  # slope 3, shifted
    calibration = fit_platt(labels, overconfident, "synthetic")
    assert calibration.slope == pytest.approx(1 / 3, rel=0.05)
    assert calibration.intercept == pytest.approx(-1 / 3, abs=0.05)
    np.testing.assert_allclose(calibration.apply(overconfident), truth, atol=0.02)
    order = np.argsort(overconfident)
    assert (np.diff(calibration.apply(overconfident)[order]) >= 0).all()  # monotone: AUC unchanged


def test_a_package_applies_its_calibration_and_none_is_the_identity():
    raw = np.array([0.01, 0.3, 0.5, 0.99])
    metadata = PackageMetadata.for_training({}, 32)
    np.testing.assert_array_equal(metadata.probabilities(raw), raw)
    calibrated = metadata.replace(calibration=Calibration("platt", 0.5, 0.2))
    expected = 1 / (1 + np.exp(-(0.5 * np.log(raw / (1 - raw)) + 0.2)))
    np.testing.assert_allclose(calibrated.probabilities(raw.reshape(-1, 1)), expected)
    assert Calibration().apply(raw) == pytest.approx(raw)


def test_one_class_cannot_be_calibrated():
    with pytest.raises(ValueError, match="both classes"):
        fit_platt([1, 1, 1], [0.2, 0.5, 0.9])
