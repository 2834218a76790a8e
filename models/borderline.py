"""The borderline band of a package: where an answer is too close to the threshold to hold.

Why: re-encoding a film in ways no reader would see (a JPEG save, one grey level, a 2 % resize) moves
P(PNEUMONIA) a little; for a film far from the threshold that changes nothing, for one near it the label flips.
The band is the interval of calibrated P around the threshold inside which such a move was seen to flip a
label on validation (``evaluation.borderline`` fits it); an answer inside it is ``borderline``, outside it
``firm``. It is a band in logit space, so it is symmetric where the calibration's logistic curve is steep and
wide in P where it is flat. Serving and the evaluation's report read it through :meth:`BorderlineBand.certainty`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

FIRM, BORDERLINE = "firm", "borderline"


@dataclasses.dataclass(frozen=True)
class BorderlineBand:
    """``low < P < high`` is borderline: P within ``half_width`` in logit from the threshold."""

    low: float
    high: float
    half_width: float  # in logit units of the calibrated P
    rule: str = ""  # how it was chosen
    fitted_on: str = ""  # e.g. "validation split (746 films x 6 re-encodings)"

    def __post_init__(self) -> None:
        if not 0.0 <= self.low <= self.high <= 1.0:
            raise ValueError(f"a borderline band needs 0 <= low <= high <= 1, got [{self.low}, {self.high}]")

    def is_borderline(self, probabilities) -> np.ndarray:
        p = np.asarray(probabilities, dtype=np.float64)
        return (p > self.low) & (p < self.high)

    def certainty(self, probability: float) -> str:
        return BORDERLINE if self.low < probability < self.high else FIRM


def band_around(threshold: float, half_width: float, rule: str = "", fitted_on: str = "") -> BorderlineBand:
    """The band of ``half_width`` logit units on each side of ``threshold``."""
    from models.calibration import logit

    centre = float(logit(threshold))
    low, high = (float(1.0 / (1.0 + np.exp(-z))) for z in (centre - half_width, centre + half_width))
    return BorderlineBand(low, high, float(half_width), rule, fitted_on)
