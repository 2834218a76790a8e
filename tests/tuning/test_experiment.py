"""Experiment names: a fresh run gets its own experiment and study, resuming is explicit, results are read
even while a trial is still writing them."""

import pytest

from runtime.config import load_config
from tuning.config import TuneConfig
from tuning.experiment import (
    SearchError,
    experiment_names,
    name_experiment,
    parse_result_lines,
    read_trial_results,
    remote_storage,
    study_storage_url,
)


def _config(tmp_path, *extra):
    return load_config(TuneConfig, overrides=[f"storage_path={tmp_path}", "name=quick", *extra])


def test_each_fresh_run_gets_its_own_experiment_and_study(tmp_path):
    config = _config(tmp_path)
    first, said = name_experiment(config, resume=False)
    assert first.name.startswith("quick-") and len(first.name) == len("quick-20261127-130501")
    assert "new experiment" in said and "fresh Optuna study" in said
    (tmp_path / first.name).mkdir()
    (tmp_path / "quick-20260101-000000").mkdir()  # an older run
    (tmp_path / "quickly").mkdir()  # another config's experiment
    (tmp_path / "quick-29990101-000000").mkdir()
    assert experiment_names(config) == ["quick-20260101-000000", first.name, "quick-29990101-000000"]
    resumed, said = name_experiment(config, resume=True)
    assert resumed.name == "quick-29990101-000000" and said.startswith("resuming experiment quick-29990101-000000")
    assert study_storage_url(first) != study_storage_url(resumed)  # one study each


def test_continuing_a_study_is_explicit_and_an_exact_name_is_never_reused(tmp_path):
    continued, said = name_experiment(_config(tmp_path, "study_name=quick-20260101-000000"), resume=False)
    assert "continuing the Optuna study quick-20260101-000000" in said
    assert study_storage_url(continued).endswith("/quick-20260101-000000-optuna.db")
    exact = _config(tmp_path, "unique_name=false")
    assert name_experiment(exact, resume=False)[0].name == "quick"
    (tmp_path / "quick").mkdir()
    with pytest.raises(SearchError, match="already exists.*--resume to continue it"):
        name_experiment(exact, resume=False)
    with pytest.raises(SearchError, match="nothing to resume"):
        name_experiment(_config(tmp_path / "empty"), resume=True)


def test_a_result_file_being_written_is_read_up_to_its_last_complete_line(tmp_path):
    assert parse_result_lines('{"epoch": 1}\n{"epoch": 2}\n{"epo') == [{"epoch": 1}, {"epoch": 2}]
    (tmp_path / "cnn_a").mkdir()
    (tmp_path / "cnn_a" / "result.json").write_text("")  # a trial that reported nothing yet
    (tmp_path / "cnn_b").mkdir()
    (tmp_path / "cnn_b" / "result.json").write_text('{"epoch": 1}\n{"epoch": 2, "val')
    assert read_trial_results(tmp_path) == {"cnn_b": [{"epoch": 1}]}


def test_a_remote_experiment_publishes_its_package_beside_it_and_a_local_one_nowhere():
    from models.package_store import package_uri

    experiment = "s3://bucket/exp/quick-20261207-225909?endpoint_override=127.0.0.1:5055&scheme=http"
    assert remote_storage(experiment) == "s3://bucket/exp?endpoint_override=127.0.0.1:5055&scheme=http"
    assert package_uri(remote_storage(experiment), "cnn-1-2") == (
        "s3://bucket/exp/packages/cnn-1-2?endpoint_override=127.0.0.1:5055&scheme=http")
    assert remote_storage("/root/ray_results/quick-20261207-225909") is None and remote_storage(None) is None
