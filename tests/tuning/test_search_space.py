"""The search space and the tuning config: what a trial samples and which configs are refused."""

import optuna
import pytest

from runtime.config import ConfigError, load_config
from tuning.config import TuneConfig
from tuning.experiment import StorageError, check_storage, join_uri, study_storage_url
from tuning.search_space import DefineByRun, random_space, to_overrides
from tuning.trainable import trial_config


def test_define_by_run_picks_a_family_then_only_its_parameters():
    config = load_config(TuneConfig, overrides=["space.augment=[0.75, 1.5]"])
    space = DefineByRun(config.space)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0), direction="maximize")
    seen = set()
    for _ in range(12):
        trial = study.ask()
        params = space(trial)
        family = params["model.family"]
        seen.add(family)
        if family == "cnn":
            assert "model.depth" in params and "model.trainable_blocks" not in params
            assert params["model.image_size"] in config.space.cnn.image_sizes
        else:
            assert "model.trainable_blocks" in params and "model.depth" not in params
            assert params["model.image_size"] >= 75
        assert 0.75 <= params["data.augment"] <= 1.5  # the configured floor holds
        trained = trial_config({}, params)  # every sample is a valid TrainConfig
        assert trained.model.family == family and trained.model.image_size == params["model.image_size"]
        study.tell(trial, 0.5)
    assert seen == {"cnn", "inception"}


def test_the_pretrained_family_samples_its_own_sizes_blocks_and_imagenet_weights():
    config = load_config(TuneConfig, overrides=[
        "space.families=[efficientnet_lite0, cnn]", "space.lite.image_sizes=[160, 224]",
        "space.lite.trainable_blocks=[1, 3]", "space.intensity=[none, percentile, equalize]",
        "space.augment_gamma=[0.0, 0.4]", "space.augment_black_level=[0.0, 0.1]", "space.optimizers=[adamw, adam]"])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    seen = set()
    for _ in range(16):
        trial = study.ask()
        params = DefineByRun(config.space)(trial)
        trained = trial_config({}, params)
        seen.add((trained.model.family, trained.data.intensity))
        assert 0.0 <= trained.data.augment_gamma <= 0.4 and trained.data.augment_blur == 0.0  # [0, 0]: off
        assert trained.optimizer in ("adamw", "adam")
        if trained.model.family == "efficientnet_lite0":
            assert trained.model.image_size in (160, 224) and trained.model.trainable_blocks in (1, 3)
            assert trained.model.weights == "imagenet" and "model.depth" not in params
        study.tell(trial, 0.5)
    assert {family for family, _ in seen} == {"cnn", "efficientnet_lite0"}
    assert {intensity for _, intensity in seen} == {"none", "percentile", "equalize"}
    # the random baseline resolves a Lite trial's own keys the same way
    sampled = {"model.family": "efficientnet_lite1", "lite.image_size": 192, "lite.trainable_blocks": 2,
               "lite.weights": "imagenet", "cnn.image_size": 64, "inception.image_size": 96,
               "inception.trainable_blocks": 8}
    trained = trial_config({}, sampled)
    assert (trained.model.image_size, trained.model.trainable_blocks, trained.model.weights) == (192, 2, "imagenet")


def test_random_space_resolves_the_family_image_size():
    params = {"model.family": "inception", "cnn.image_size": 64, "inception.image_size": 96, "learning_rate": 1e-3}
    assert sorted(to_overrides(params)) == ["learning_rate=0.001", "model.family=inception", "model.image_size=96"]
    assert set(random_space(load_config(TuneConfig).space)) >= {"model.family", "cnn.image_size"}
    narrowed = random_space(load_config(TuneConfig, overrides=["space.optimizers=[adam]"]).space)
    assert narrowed["optimizer"].categories == ["adam"]


def test_multi_node_with_local_storage_is_refused_up_front():
    config = load_config(TuneConfig, overrides=["storage_path=/tmp/x"])
    check_storage(config, 1)
    with pytest.raises(StorageError, match="local path.*2 nodes.*s3://"):
        check_storage(config, 2)
    check_storage(load_config(TuneConfig, overrides=["storage_path=s3://b/x"]), 3)
    check_storage(load_config(TuneConfig, overrides=["storage_path=/nfs/x", "shared_storage=true"]), 3)


def test_uris_keep_their_query_last_and_study_defaults_beside_local_experiments(tmp_path):
    uri = "s3://bucket/exp?endpoint_override=127.0.0.1:5055&scheme=http"
    assert join_uri(uri, "quick", "best.json") == "s3://bucket/exp/quick/best.json?endpoint_override=127.0.0.1:5055&scheme=http"
    config = load_config(TuneConfig, overrides=[f"storage_path={tmp_path}", "name=n"])
    assert study_storage_url(config) == f"sqlite:///{tmp_path}/n-optuna.db"


@pytest.mark.parametrize("path", ["tuning/configs/quick.yaml", "tuning/configs/full-cpu.yaml",
                                  "tuning/configs/gpu-cluster.yaml", "tuning/configs/full-cpu-pretrained.yaml",
                                  "tuning/configs/full-cpu-finetune.yaml"])
def test_shipped_tune_configs_load(path):
    config = load_config(TuneConfig, path)
    assert config.num_samples >= 1 and config.train.epochs >= config.grace_period


def test_bad_tune_config_is_refused():
    with pytest.raises(ConfigError, match="grace_period"):
        load_config(TuneConfig, overrides=["train.epochs=2", "grace_period=3"])
    with pytest.raises(ConfigError, match="families"):
        load_config(TuneConfig, overrides=["space.families=[resnet]"])
    with pytest.raises(ConfigError, match="optimizers must be a non-empty subset of adamw, adam, sgd"):
        load_config(TuneConfig, overrides=["space.optimizers=[lion]"])
    with pytest.raises(ConfigError, match="augment must be"):
        load_config(TuneConfig, overrides=["space.augment=[1.0, 0.5]"])


def test_the_sampler_is_built_as_the_config_says_and_gp_without_pytorch_is_a_clear_error(monkeypatch):
    import sys

    from tuning.experiment import SearchError
    from tuning.search import make_sampler

    today = make_sampler(load_config(TuneConfig))
    assert isinstance(today, optuna.samplers.TPESampler) and today._n_startup_trials == 10
    tuned = make_sampler(load_config(TuneConfig, overrides=["sampler.n_startup_trials=4", "sampler.group=true"]))
    assert tuned._n_startup_trials == 4 and tuned._group and tuned._constant_liar
    with pytest.raises(ConfigError, match="sampler.group needs sampler.multivariate"):
        load_config(TuneConfig, overrides=["sampler.group=true", "sampler.multivariate=false"])
    gp = load_config(TuneConfig, overrides=["sampler.kind=gp"])
    monkeypatch.setitem(sys.modules, "torch", None)  # as on a machine without PyTorch
    with pytest.raises(SearchError, match="sampler.kind: gp needs PyTorch"):
        make_sampler(gp)
