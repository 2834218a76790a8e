"""The borderline band: fitted on validation's re-encodings by its rule, and what it counts on a split."""

import numpy as np
import pytest

from evaluation.borderline import firm_report, fit_band, flipped_any, largest_moves
from evaluation.stability import FilmMoves, summarize
from models.borderline import BORDERLINE, FIRM, band_around
from models.calibration import logit


def _sigmoid(z):
    return 1 / (1 + np.exp(-np.asarray(z, np.float64)))


def _moves(base_logits, moved_logits: dict) -> FilmMoves:
    return FilmMoves("val", _sigmoid(base_logits), {k: _sigmoid(v) for k, v in moved_logits.items()})


def test_the_band_holds_every_validation_flip_and_the_quantile_of_the_moves_times_the_margin():
    # threshold 0.5 (logit 0); film 1 at logit 0.3 flips under "a"; the others move 0.1 at most
    moves = _moves([0.3, 2.0, -3.0, 5.0], {"a": [-0.2, 2.1, -3.0, 5.0], "b": [0.3, 1.9, -2.95, 5.05]})
    assert list(flipped_any(moves, 0.5)) == [True, False, False, False]
    assert largest_moves(moves) == pytest.approx([0.5, 0.1, 0.05, 0.05])
    band = fit_band(moves, 0.5, coverage=1.0, margin=1.5)  # max(0.3 farthest flip, 0.5 largest move) x 1.5
    assert band.half_width == pytest.approx(0.75)
    assert band.low == pytest.approx(_sigmoid(-0.75)) and band.high == pytest.approx(_sigmoid(0.75))
    assert "validation" not in band.fitted_on and band.fitted_on.startswith("val split (4 films x 2 re-encodings)")
    # a flip farther than every move's quantile widens the band to it
    assert fit_band(moves, 0.5, coverage=0.5, margin=1.0).half_width == pytest.approx(0.3)


def test_on_its_own_validation_no_firm_answer_flips_and_the_report_counts_them():
    rng = np.random.default_rng(0)
    base = rng.normal(0, 3, 400)
    moves = _moves(base, {name: base + rng.normal(0, 0.2, 400) for name in ("a", "b", "c")})
    band = fit_band(moves, 0.5)
    measured = summarize(moves, 0.5, band, log=lambda line: None)
    assert sum(row["flips"] for row in measured["perturbations"].values()) > 0
    assert all(row["firm_flips"] == 0 for row in measured["perturbations"].values())
    assert measured["firm"] == int((~band.is_borderline(moves.base)).sum()) and 0 < measured["firm_share"] < 1
    # a test split moving twice as much can flip a firm answer, and the count shows it
    wider = _moves(base, {"a": base + rng.normal(0, 2.0, 400)})
    assert summarize(wider, 0.5, band, log=lambda line: None)["perturbations"]["a"]["firm_flips"] > 0


def test_firm_metrics_are_the_metrics_of_the_films_outside_the_band():
    band = band_around(0.5, float(logit(0.6)))  # 0.4-0.6
    labels = np.array([0, 0, 0, 1, 0, 1])
    probabilities = np.array([0.1, 0.45, 0.55, 0.9, 0.95, 0.05])
    report = firm_report(labels, probabilities, 0.5, band)
    assert (report["firm"], report["borderline"], report["borderline_wrong"]) == (4, 2, 1)  # 0.55 is a normal called sick
    assert report["metrics"]["accuracy"] == pytest.approx(0.5)  # 0.1 and 0.9 right, 0.95 and 0.05 wrong
    assert [band.certainty(p) for p in (0.45, 0.59, 0.62)] == [BORDERLINE, BORDERLINE, FIRM]
