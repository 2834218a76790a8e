"""``serving.metrics``' plain parts: outcomes of error statuses, the relative OOD score, the rolling shares.
(That a running endpoint exports every metric is tests/serving/test_app.py's.)"""

from __future__ import annotations

import pytest

from serving.metrics import BAD_INPUT, ERROR, UNAUTHORIZED, RollingShares, outcome_of_status, relative_ood_score


def test_error_statuses_map_to_outcomes():
    assert [outcome_of_status(s) for s in (400, 401, 413, 415, 500)] == [BAD_INPUT, UNAUTHORIZED, BAD_INPUT,
                                                                         BAD_INPUT, ERROR]


@pytest.mark.parametrize("threshold", [34.1, 5104.7, -0.9])
def test_the_relative_ood_score_is_one_at_the_threshold_and_above_one_when_refused(threshold):
    assert relative_ood_score(threshold, threshold) == pytest.approx(1.0)
    above, below = threshold + abs(threshold) / 2, threshold - abs(threshold) / 2
    assert relative_ood_score(above, threshold) == pytest.approx(1.5)
    assert relative_ood_score(below, threshold) == pytest.approx(0.5)
    if threshold > 0:
        assert relative_ood_score(2 * threshold, threshold) == pytest.approx(2.0)  # score / threshold


def test_rolling_shares_count_the_last_verdicts_only():
    shares = RollingShares(size=4)
    assert shares.refusal_share() == 0 and shares.positive_share() is None
    for verdict in ("refused", "refused", "positive", "negative"):
        shares.add(verdict)
    assert shares.refusal_share() == 0.5 and shares.positive_share() == 0.5
    for verdict in ("positive", "positive"):  # both refusals leave the window
        shares.add(verdict)
    assert shares.refusal_share() == 0 and shares.positive_share() == 0.75
