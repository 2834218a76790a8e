"""``ServeSettings``' queue bound: what reaches Serve, and the combinations refused when the app is built."""

from __future__ import annotations

import pytest

from serving.settings import MAX_ONGOING, MAX_QUEUED, ServeSettings, ServeSettingsError


def test_the_queue_bound_and_retry_after_reach_the_deployment():
    options = ServeSettings.parse({"package": "p"}).deployment_options()
    assert options["max_ongoing_requests"] == MAX_ONGOING and options["max_queued_requests"] == MAX_QUEUED > 0
    assert options["backpressure_config"] == {"status_code": 503, "retry_after_s": 1.0}
    assert options["autoscaling_config"]["target_ongoing_requests"] < MAX_ONGOING  # or it would never scale up
    unbounded = ServeSettings.parse({"package": "p", "max_ongoing_requests": 32, "max_queued_requests": -1,
                                     "retry_after_s": 5}).deployment_options()
    assert unbounded["max_queued_requests"] == -1 and unbounded["backpressure_config"]["retry_after_s"] == 5
    assert unbounded["autoscaling_config"]["target_ongoing_requests"] == 16  # the endpoint's target before the bound


@pytest.mark.parametrize("args, problem", [
    ({"max_queued_requests": 0}, "max_queued_requests: .*-1 \\(no bound\\) or at least 1"),
    ({"max_queued_requests": -2}, "max_queued_requests"),
    ({"max_ongoing_requests": 0}, "max_ongoing_requests"),
    ({"retry_after_s": -1}, "retry_after_s"),
    ({"max_ongoing_requests": 4, "autoscaling": {"target_ongoing_requests": 4}}, "must be below max_ongoing_requests"),
])
def test_a_bound_serve_would_refuse_or_that_stops_autoscaling_is_refused_naming_the_key(args, problem):
    with pytest.raises(ServeSettingsError, match=problem):
        ServeSettings.parse({"package": "p", **args})


def test_a_fixed_replica_count_may_take_any_target():
    settings = ServeSettings.parse({"package": "p", "replicas": 1, "max_ongoing_requests": 1})
    assert settings.deployment_options()["num_replicas"] == 1
