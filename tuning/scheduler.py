"""ASHA that keeps its rung records when a search is resumed.

``Tuner.restore`` rebuilds the scheduler from the pickle Tune wrote when the experiment started, so ASHA's rungs
come back empty: Tune saves no scheduler state (ray-project/ray#30838). A resumed ASHA then compares a trial only
with the trials that reach the same rung after the resume, and lets through trials its record would have stopped.
``ResumableASHA.replay`` feeds the trials' saved results back through the rungs in the order they were reported.
A trial the record stops is stopped before it trains again, and reaches the searcher as ASHA would have sent it:
complete, with its result at the rung that stopped it.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Iterable
from types import SimpleNamespace

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

logger = logging.getLogger(__name__)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)


class ResumableASHA(ASHAScheduler):
    """``ASHAScheduler`` whose rungs can be rebuilt from saved results (``replay``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._stopped_by_record: dict[str, dict] = {}

    @classmethod
    def from_restored(cls, scheduler: ASHAScheduler) -> ResumableASHA:
        """The restored ``scheduler``'s own settings (metric, mode, milestones), with this class's replay."""
        resumable = cls.__new__(cls)
        resumable.__dict__.update(scheduler.__dict__)
        resumable._stopped_by_record = {}
        return resumable

    def replay(self, rows: Iterable[dict]) -> dict[str, dict]:
        """Record saved results (dicts with ``trial_id``, ``timestamp``, the time attribute and the metric) in the
        rungs, oldest first; returns trial id -> the result at which the record stops that trial."""
        if len(self._brackets) != 1:
            raise ValueError(f"replay needs ASHA with one bracket, not {len(self._brackets)}: Tune does not save "
                             "which bracket a trial was in")
        bracket = self._brackets[0]
        usable = [row for row in rows if _is_number(row.get(self._time_attr)) and _is_number(row.get(self._metric))]
        for row in sorted(usable, key=lambda row: (row.get("timestamp", 0), row[self._time_attr])):
            trial_id = str(row["trial_id"])
            if trial_id in self._stopped_by_record:
                continue  # what it reported after the record stopped it ran only because the record was lost
            action = bracket.on_result(SimpleNamespace(trial_id=trial_id), row[self._time_attr],
                                       self._metric_op * row[self._metric])
            if action == TrialScheduler.STOP and row[self._time_attr] < self._max_t:
                self._stopped_by_record[trial_id] = row
        return dict(self._stopped_by_record)

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        for trial in list(tune_controller.get_trials()):
            row = self._stopped_by_record.get(trial.trial_id)
            if row is not None and trial.status in (Trial.PENDING, Trial.PAUSED):
                logger.info("stopping trial %s: ASHA's record stops it at %s %s (%s %.4f)", trial.trial_id,
                            self._time_attr, row[self._time_attr], self._metric, row[self._metric])
                # before stop_trial, which would tell the searcher "no result" (Optuna: PRUNED)
                tune_controller.search_alg.on_trial_complete(trial.trial_id, result=row)
                tune_controller.stop_trial(trial)
                self._num_stopped += 1
        return super().choose_trial_to_run(tune_controller)


def rebuild_rungs(tuner, experiment: str) -> dict[str, tuple[dict, int]]:
    """Give a restored ``tuner`` whose scheduler is ASHA the rungs its trials' results in ``experiment`` rebuild;
    returns trial id -> (the result at which the record stops that trial, the last time it reported), empty for
    other schedulers."""
    # Tuner.restore takes no scheduler; the restored TuneConfig is the one place Tune reads it from.
    tune_config = getattr(getattr(tuner, "_local_tuner", None), "_tune_config", None)
    if tune_config is None or not isinstance(tune_config.scheduler, ASHAScheduler):
        return {}
    from ray.tune import ExperimentAnalysis

    rows = [row for frame in ExperimentAnalysis(experiment).trial_dataframes.values()
            for row in frame.to_dict("records")]
    scheduler = ResumableASHA.from_restored(tune_config.scheduler)
    stopped = scheduler.replay(rows)
    tune_config.scheduler = scheduler
    time_attr = scheduler._time_attr
    last = {}
    for row in rows:
        if str(row.get("trial_id")) in stopped and _is_number(row.get(time_attr)):
            last[str(row["trial_id"])] = max(last.get(str(row["trial_id"]), 0), int(row[time_attr]))
    return {trial_id: (row, last.get(trial_id, int(row[time_attr]))) for trial_id, row in stopped.items()}
