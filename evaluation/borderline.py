"""The borderline band, fitted on validation, and what it does on a split: firm answers and their metrics.

The rule (fixed before any test read, ``docs/results/README.md``): each validation film is scored from its own
bytes and from the six benign re-encodings of ``evaluation.stability``; in logit space of the calibrated P,
its largest move is the largest |change| over the six. The band's half-width is the larger of

- the distance from the threshold of the farthest validation film whose label flipped under any re-encoding
  (the band holds every flip seen), and
- the ``coverage`` quantile of the films' largest moves (a film farther than that from the threshold would
  need a move larger than all but 1 - coverage of validation's to flip),

times ``margin``. Chosen on validation alone (``benchmarks/borderline_views.py``, BENCHMARKS.md): fitted on half
of validation's patients and checked on the other half, every candidate (coverage 0.99 or 1, margin 1 to 2)
left 0 firm answers flipping, and margin 1 kept the most answers firm (96.6 % of validation for the headline's
recipe, against 93.3 % at margin 1.5), so the defaults are coverage 0.99 and margin 1. Test films move more
than validation ones (1.3-2x the p99 |change| for the headline), which the report's firm flips on test show.
"""

from __future__ import annotations

import numpy as np

from evaluation.metrics import binary_report
from evaluation.stability import FilmMoves
from models.borderline import BorderlineBand, band_around
from models.calibration import logit

COVERAGE = 0.99
MARGIN = 1.0


def largest_moves(moves: FilmMoves) -> np.ndarray:
    """Each film's largest |change in logit(P)| over the re-encodings."""
    base = logit(moves.base)
    return np.max([np.abs(logit(moved) - base) for moved in moves.moved.values()], axis=0)


def flipped_any(moves: FilmMoves, threshold: float) -> np.ndarray:
    """Whether each film's label flips under at least one re-encoding."""
    side = moves.base >= threshold
    return np.any([(moved >= threshold) != side for moved in moves.moved.values()], axis=0)


def fit_band(moves: FilmMoves, threshold: float, coverage: float = COVERAGE, margin: float = MARGIN) -> BorderlineBand:
    """The band of the module's rule, from a validation split's moves."""
    if not 0.0 < coverage <= 1.0 or margin < 1.0:
        raise ValueError(f"coverage must lie in (0, 1] and margin be >= 1, got {coverage} and {margin}")
    distance = np.abs(logit(moves.base) - float(logit(threshold)))
    flips = flipped_any(moves, threshold)
    farthest_flip = float(distance[flips].max()) if flips.any() else 0.0
    quantile = float(np.quantile(largest_moves(moves), coverage))
    half_width = margin * max(farthest_flip, quantile)
    rule = (f"{margin:g} x the larger of the farthest validation flip from the threshold ({farthest_flip:.3f}) and "
            f"the {coverage:g} quantile of the films' largest move ({quantile:.3f}), in logit of the calibrated P")
    return band_around(threshold, half_width, rule,
                       f"{moves.split} split ({len(moves.base)} films x {len(moves.moved)} re-encodings)")


def firm_report(labels, probabilities, threshold: float, band: BorderlineBand) -> dict:
    """The metrics on the films answered firm, beside how many were borderline and how many of those were wrong."""
    labels, probabilities = np.asarray(labels).astype(int), np.asarray(probabilities, np.float64)
    borderline = band.is_borderline(probabilities)
    firm = ~borderline
    wrong = (probabilities >= threshold).astype(int) != labels
    report = {"films": len(labels), "firm": int(firm.sum()), "firm_share": float(firm.mean()),
              "borderline": int(borderline.sum()), "borderline_wrong": int((wrong & borderline).sum()),
              "band": [band.low, band.high]}
    if len(np.unique(labels[firm])) == 2:
        report["metrics"] = binary_report(labels[firm], probabilities[firm], threshold)
    return report
