"""ASHA across resumed sittings, on a real local Ray: the rungs the trials' results rebuild stop what ASHA's
record stops, including a trial an earlier resume (which lost the rungs, ray-project/ray#30838) let through."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest

from tuning.experiment import read_trial_results
from tuning.progress import SearchProgress
from tuning.scheduler import ResumableASHA, rebuild_rungs

pytestmark = pytest.mark.slow

# rungs at epochs 2 and 4 of 6; "good" reports 0.9 every epoch, "poor" 0.5
AUC = {"good": 0.9, "poor": 0.5}


def scripted_trial(config):
    """Reports the AUC its name scripts, one checkpoint per epoch; raises (an interrupted sitting) before an
    epoch whose marker file exists."""
    from ray import tune

    checkpoint = tune.get_checkpoint()
    start = int(Path(checkpoint.path, "epoch").read_text()) if checkpoint else 0
    for epoch in range(start + 1, 7):
        if Path(config["markers"], f"{config['name']}-{epoch}").exists():
            raise RuntimeError(f"sitting interrupted before epoch {epoch}")
        folder = tempfile.mkdtemp()
        Path(folder, "epoch").write_text(str(epoch))
        tune.report({"val_auc": AUC[config["name"]], "epoch": epoch},
                    checkpoint=tune.Checkpoint.from_directory(folder))


def _epochs(experiment: Path) -> dict[str, list[int]]:
    """Trial name (from its config) -> the epochs it reported."""
    out = {}
    for rows in read_trial_results(experiment).values():
        out[rows[0]["config"]["name"]] = [row["epoch"] for row in rows]
    return out


def _wait_for_next_second(experiment: Path):
    """Tune's timestamps are whole seconds: the next sitting's results must sort after this one's."""
    last = max(row["timestamp"] for rows in read_trial_results(experiment).values() for row in rows)
    deadline = time.time() + 5
    while time.time() <= last + 1:
        assert time.time() < deadline
        time.sleep(0.05)


@pytest.fixture
def local_ray():
    import ray

    if ray.is_initialized():  # a Ray of this process's own from an earlier test: this one needs one CPU
        ray.shutdown()
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)  # one trial at a time
    try:
        yield
    finally:
        ray.shutdown()


def test_resume_stops_the_trial_asha_record_stops(local_ray, tmp_path, capsys):
    from ray import tune

    markers = tmp_path / "markers"
    markers.mkdir()
    trainable = tune.with_resources(scripted_trial, {"cpu": 1})
    experiment = tmp_path / "results" / "asha"

    # sitting 1: "good" runs all 6 epochs; "poor" is interrupted after epoch 1, before any rung
    (markers / "poor-2").touch()
    tune.Tuner(
        trainable,
        param_space={"name": tune.grid_search(["good", "poor"]), "markers": str(markers)},
        tune_config=tune.TuneConfig(scheduler=ResumableASHA(metric="val_auc", mode="max", max_t=6, grace_period=2,
                                                            reduction_factor=2)),
        run_config=tune.RunConfig(name="asha", storage_path=str(tmp_path / "results"), verbose=0,
                                  callbacks=[SearchProgress(2, 6, live=False)]),
    ).fit()
    assert _epochs(experiment) == {"good": [1, 2, 3, 4, 5, 6], "poor": [1]}

    # sitting 2, resumed as Tune resumes: the restored ASHA has empty rungs and lets "poor" past epoch 2
    (markers / "poor-2").unlink()
    (markers / "poor-4").touch()
    _wait_for_next_second(experiment)
    tune.Tuner.restore(str(experiment), trainable=trainable, resume_errored=True).fit()
    assert _epochs(experiment)["poor"] == [1, 2, 3], "Tune's resume kept ASHA's rungs: ray#30838 is fixed"

    # sitting 3, with the rungs rebuilt: the record stops "poor" at epoch 2, and it does not train again
    (markers / "poor-4").unlink()
    _wait_for_next_second(experiment)
    tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_errored=True)
    stopped = rebuild_rungs(tuner, str(experiment))
    assert [(row["config/name"], row["epoch"], last) for row, last in stopped.values()] == [("poor", 2, 3)]
    capsys.readouterr()
    results = tuner.fit()
    assert _epochs(experiment)["poor"] == [1, 2, 3]
    # the progress display counts on from where the last sitting stopped: "good" finished in the first
    assert "search: 2/2 trials done (1 stopped early, 0 errored), 0 running | best val AUC 0.9000" \
        in capsys.readouterr().out
    assert not results.errors
    assert sorted(result.metrics["epoch"] for result in results) == [3, 6]


def test_replay_keeps_asha_decisions_in_report_order():
    """Replayed results meet the rungs as they met them: a trial first at a rung passes it; a later, poorer one
    stops, and what it reported after that does not enter a later rung."""
    scheduler = ResumableASHA(metric="val_auc", mode="max", max_t=6, grace_period=2, reduction_factor=2)
    rows = [
        {"trial_id": "late", "timestamp": 20, "training_iteration": 2, "val_auc": 0.5},
        {"trial_id": "first", "timestamp": 10, "training_iteration": 2, "val_auc": 0.6},
        {"trial_id": "late", "timestamp": 21, "training_iteration": 4, "val_auc": 0.99},
        {"trial_id": "first", "timestamp": 11, "training_iteration": 4, "val_auc": 0.7},
        {"trial_id": "no_metric", "timestamp": 12, "training_iteration": 2, "val_auc": float("nan")},
    ]
    stopped = scheduler.replay(rows)
    assert list(stopped) == ["late"] and stopped["late"]["training_iteration"] == 2
    rungs = dict(scheduler._brackets[0]._rungs)
    assert set(rungs[4]) == {"first"} and set(rungs[2]) == {"first", "late"}


def test_replay_refuses_several_brackets():
    scheduler = ResumableASHA(metric="val_auc", mode="max", max_t=6, grace_period=2, brackets=2)
    with pytest.raises(ValueError, match="one bracket"):
        scheduler.replay([])
