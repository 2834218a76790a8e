"""The search's console: each trial's precision named once, with its first epoch."""

from types import SimpleNamespace

from tuning.progress import SearchProgress


def test_each_trial_names_its_precision_once(capsys):
    progress = SearchProgress(2, 3, live=False)
    trials = [SimpleNamespace(trial_id=t, config={"model.family": "cnn"}) for t in ("a1", "b2")]
    for epoch in (1, 2):
        for trial, precision in zip(trials, ("bfloat16", "float32")):
            progress.on_trial_result(0, trials, trial, {"epoch": epoch, "val_auc": 0.9, "precision": precision})
    lines = capsys.readouterr().out.splitlines()
    assert [line.endswith(", bfloat16") for line in lines] == [True, False, False, False]
    assert [line.endswith(", float32") for line in lines] == [False, True, False, False]
