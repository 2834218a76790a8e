"""The endpoint's own metrics, through Ray's metrics API, so they are exported where Ray exports its own: in
Prometheus text on each node's metrics export port (``ray.nodes()[i]["MetricsExportPort"]``, or Ray's
``/tmp/ray/prom_metrics_service_discovery.json`` on a head with a dashboard), every name prefixed ``ray_`` by
Ray, each series tagged with its Serve ``application`` (and by Ray with the replica's ``WorkerId``).

- ``pneumonia_requests_total{outcome}``: every ``/predict`` answered by a replica: the label (NORMAL,
  PNEUMONIA), the refusal's ``reason`` (``ood_gate`` and the checks before the model), ``bad_input`` (400,
  413, 415), ``unauthorized`` (401), ``error`` (anything else). A 503 of a full queue never reaches the
  replica: Serve counts it, ``ray_serve_num_http_requests_total{status_code="503"}``.
- ``pneumonia_model_call_latency_ms`` and ``pneumonia_batch_size``: one observation per batched model call.
- ``pneumonia_ood_score_relative``: each scored film's OOD score relative to the gate's threshold, so that
  1 is the threshold and above it is refused, whatever the score's scale (the Mahalanobis distance of one
  package is in the thousands, of another in the tens): ``1 + (score - threshold) / |threshold|``, which is
  ``score / threshold`` for the distance scores.
- ``pneumonia_refusal_share`` and ``pneumonia_positive_share``: gauges over a window of the last
  ``WINDOW`` films each replica gave a verdict on (a label or a refusal), not a time window: a quiet night
  keeps the last day's shares instead of dividing by zero. Refusals among those verdicts; PNEUMONIA among
  the labelled ones. A shift of either is the first sign of a new kind of input. Ray drops a gauge not set
  for two export intervals (20 s by default), so a thread sets them again every ``GAUGE_REFRESH_S``.
- Histograms' ``_sum`` is Ray's estimate: it adds each observation's bucket midpoint, not its value.

Ray is imported when a replica builds :class:`EndpointMetrics`; the rest is plain Python, unit-tested.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

WINDOW = 500
GAUGE_REFRESH_S = 5.0
BAD_INPUT, UNAUTHORIZED, ERROR = "bad_input", "unauthorized", "error"
LATENCY_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64]
OOD_RELATIVE = [0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2, 4, 10]


def outcome_of_status(status: int) -> str:
    """The outcome of a request the replica answered with an error status."""
    if status == 401:
        return UNAUTHORIZED
    return BAD_INPUT if status in (400, 413, 415) else ERROR


def relative_ood_score(score: float, threshold: float) -> float:
    """1 at the gate's threshold, above 1 refused, for thresholds of either sign (msp and energy scores are
    negative)."""
    return 1 + (score - threshold) / max(abs(threshold), 1e-12)


class RollingShares:
    """Shares over the last ``size`` verdicts: refusals among them, positive calls among the labelled ones."""

    def __init__(self, size: int = WINDOW):
        self.verdicts: deque[str] = deque(maxlen=size)  # "positive", "negative" or "refused"

    def add(self, verdict: str) -> None:
        self.verdicts.append(verdict)

    def refusal_share(self) -> float:
        return self.verdicts.count("refused") / max(1, len(self.verdicts))

    def positive_share(self) -> float | None:
        """None until a film has been labelled in the window."""
        labelled = len(self.verdicts) - self.verdicts.count("refused")
        return self.verdicts.count("positive") / labelled if labelled else None


class EndpointMetrics:
    """One replica's metrics (build it inside the replica: Ray metrics record through its worker)."""

    def __init__(self, application: str, window: int = WINDOW, refresh_s: float = GAUGE_REFRESH_S):
        from ray.util.metrics import Counter, Gauge, Histogram

        tags = {"application": application}
        self.requests = Counter("pneumonia_requests", "/predict requests answered by a replica, by outcome: the "
                                "label, the refusal's reason, bad_input, unauthorized, error",
                                tag_keys=("application", "outcome")).set_default_tags(tags)
        self.latency = Histogram("pneumonia_model_call_latency_ms", "one batched model call (decoded images in, "
                                 "probabilities and OOD scores out), ms", LATENCY_MS,
                                 tag_keys=("application",)).set_default_tags(tags)
        self.batch = Histogram("pneumonia_batch_size", "images per model call", BATCH_SIZES,
                               tag_keys=("application",)).set_default_tags(tags)
        self.ood = Histogram("pneumonia_ood_score_relative", "OOD score of each scored film relative to the "
                             "gate's threshold: 1 = the threshold, above = refused", OOD_RELATIVE,
                             tag_keys=("application",)).set_default_tags(tags)
        self.refusal_gauge = Gauge("pneumonia_refusal_share", f"refusals among this replica's last {window} "
                                   "verdicts (labels and refusals)", tag_keys=("application",)).set_default_tags(tags)
        self.positive_gauge = Gauge("pneumonia_positive_share", f"PNEUMONIA among the labelled films of this "
                                    f"replica's last {window} verdicts",
                                    tag_keys=("application",)).set_default_tags(tags)
        self.shares = RollingShares(window)
        self._current: tuple[float | None, float | None] = (None, None)  # (refusal, positive): what the gauges say
        self._stop = threading.Event()
        threading.Thread(target=self._keep_gauges, args=(refresh_s,), name="pneumonia-gauges", daemon=True).start()

    def labelled(self, label: str, positive: bool) -> None:
        self._verdict(label, "positive" if positive else "negative")

    def refused(self, reason: str) -> None:
        self._verdict(reason, "refused")

    def failed(self, status: int) -> None:
        self.requests.inc(tags={"outcome": outcome_of_status(status)})

    def model_call(self, seconds: float, scored: list[tuple[Any, float | None, int]], threshold: float | None) -> None:
        """One batch: its duration, its size, and each film's OOD score (when the package has a gate)."""
        self.latency.observe(seconds * 1000)
        self.batch.observe(len(scored))
        if threshold is not None:
            for _, score, _ in scored:
                if score is not None:
                    self.ood.observe(relative_ood_score(score, threshold))

    def close(self) -> None:
        """Stop setting the gauges again (the replica is going away)."""
        self._stop.set()

    def _verdict(self, outcome: str, verdict: str) -> None:
        self.requests.inc(tags={"outcome": outcome})
        self.shares.add(verdict)
        self._current = (self.shares.refusal_share(), self.shares.positive_share())  # one assignment: atomic
        self._set_gauges()

    def _set_gauges(self) -> None:
        refusal, positive = self._current
        if refusal is not None:
            self.refusal_gauge.set(refusal)
        if positive is not None:
            self.positive_gauge.set(positive)

    def _keep_gauges(self, period: float) -> None:
        while not self._stop.wait(period):
            self._set_gauges()
