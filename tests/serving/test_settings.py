"""``ServeSettings``' overload settings: what reaches Serve and HAProxy, and the combinations refused when the app
is built."""

from __future__ import annotations

import pytest

from serving.haproxy_wrapper import parse_queues
from serving.settings import MAX_BATCH_SIZE, QUEUE_GUARD_BATCHES, QUEUE_TIMEOUT_MS, ServeSettings, ServeSettingsError


def test_a_replica_takes_two_batches_at_once_and_scales_up_when_its_batches_are_full():
    settings = ServeSettings.parse({"package": "p"})
    options = settings.deployment_options()
    assert settings.batch == MAX_BATCH_SIZE and options["max_ongoing_requests"] == 2 * MAX_BATCH_SIZE
    assert options["autoscaling_config"]["target_ongoing_requests"] == MAX_BATCH_SIZE
    assert options["max_queued_requests"] == MAX_BATCH_SIZE  # the Python ingress's count bound: one batch waiting
    assert options["backpressure_config"] == {"status_code": 503, "retry_after_s": 1.0}
    small = ServeSettings.parse({"package": "p", "max_batch_size": 8}).deployment_options()
    assert small["max_ongoing_requests"] == 16 and small["autoscaling_config"]["target_ongoing_requests"] == 8


def test_haproxy_gets_the_waiting_budget_and_a_generous_length_guard():
    settings = ServeSettings.parse({"package": "p", "retry_after_s": 2})
    (bound,) = parse_queues(settings.haproxy_queue("pneumonia")).values()
    assert bound == (2 * MAX_BATCH_SIZE, QUEUE_GUARD_BATCHES * MAX_BATCH_SIZE, 2.0, QUEUE_TIMEOUT_MS, MAX_BATCH_SIZE)
    count = ServeSettings.parse({"package": "p", "replicas": 1, "max_ongoing_requests": 2, "max_queued_requests": 1,
                                 "queue_timeout_ms": 0})
    assert parse_queues(count.haproxy_queue("a")) == {"a": (2, 1, 1.0, 0, 2)}  # a count bound, as before the budget
    unbounded = ServeSettings.parse({"package": "p", "max_queued_requests": -1, "queue_timeout_ms": 0})
    assert unbounded.haproxy_queue("pneumonia") is None and unbounded.deployment_options()["max_queued_requests"] == -1


@pytest.mark.parametrize("args, problem", [
    ({"max_queued_requests": 0}, "max_queued_requests: .*-1 \\(no bound\\) or at least 1"),
    ({"max_queued_requests": -2}, "max_queued_requests"),
    ({"max_ongoing_requests": 0}, "max_ongoing_requests"),
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"queue_timeout_ms": -1}, "queue_timeout_ms"),
    ({"retry_after_s": -1}, "retry_after_s"),
    ({"max_ongoing_requests": 4, "autoscaling": {"target_ongoing_requests": 4}}, "must be below max_ongoing_requests"),
    ({"max_ongoing_requests": 32}, "target_ongoing_requests \\(32\\) must be below max_ongoing_requests \\(32\\)"),
])
def test_a_bound_serve_would_refuse_or_that_stops_autoscaling_is_refused_naming_the_key(args, problem):
    with pytest.raises(ServeSettingsError, match=problem):
        ServeSettings.parse({"package": "p", **args})


def test_a_fixed_replica_count_may_take_any_target():
    settings = ServeSettings.parse({"package": "p", "replicas": 1, "max_ongoing_requests": 1})
    assert settings.deployment_options()["num_replicas"] == 1 and settings.batch == 1
