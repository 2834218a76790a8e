"""The ensemble of a search's best trials: one model directory that averages its members."""

import json

import numpy as np
import pytest

from models.config import ModelConfig, TrainConfig
from models.package import EnsembleMember, PackageMetadata, load_model_dir, save_model_dir
from models.registry import build_model
from runtime.config import to_dict
from tuning.config import CONFIG_DIR, TuneConfig
from tuning.ensemble import build_ensemble

SIZE = 32


def _member(tmp_path, name: str, family: str, depth: int, seed: int) -> EnsembleMember:
    import keras

    keras.utils.set_random_seed(seed)
    config = TrainConfig(name=name, model=ModelConfig(family=family, image_size=SIZE, depth=depth, base_filters=4,
                                                      dense_units=8))
    model = build_model(config.model)
    metadata = PackageMetadata.for_training(to_dict(config), SIZE, best_epoch=3, validation={"auc": 0.9})
    save_model_dir(model, metadata, tmp_path / name)
    return EnsembleMember(name, family, SIZE, 0.9, str(tmp_path / name))


def test_ensemble_predicts_the_mean_of_its_members_and_reloads(tmp_path):
    members = [_member(tmp_path, "a", "cnn", 2, 1), _member(tmp_path, "b", "cnn", 3, 2)]
    build_ensemble(members, tmp_path / "ensemble")
    ensemble, metadata = load_model_dir(tmp_path / "ensemble")  # checksums and Keras safe mode, as served
    x = np.random.default_rng(0).random((4, SIZE, SIZE, 1), dtype=np.float32)
    alone = [np.asarray(load_model_dir(m.checkpoint)[0].predict_on_batch(x)) for m in members]
    assert not np.allclose(alone[0], alone[1])  # two different members, or the test proves nothing
    np.testing.assert_allclose(ensemble.predict_on_batch(x), np.mean(alone, axis=0), atol=1e-6)
    assert [m.trial_id for m in metadata.ensemble] == ["a", "b"]
    assert metadata.image_size == SIZE and metadata.best_epoch is None and metadata.validation == {}
    assert metadata.config["name"] == "a"  # the best member's


def test_gradcam_of_an_ensemble_is_the_mean_of_its_members_maps(tmp_path):
    from models.gradcam import gradcam

    members = [_member(tmp_path, "a", "cnn", 2, 1), _member(tmp_path, "b", "cnn", 3, 2)]
    ensemble, _ = load_model_dir(build_ensemble(members, tmp_path / "ensemble"))
    image = np.random.default_rng(1).random((SIZE, SIZE, 1), dtype=np.float32)
    maps = [gradcam(load_model_dir(m.checkpoint)[0], image) for m in members]
    np.testing.assert_allclose(gradcam(ensemble, image), np.mean(maps, axis=0), atol=1e-5)


def test_ensemble_size_is_validated():
    from runtime.config import ConfigError, load_config

    assert TuneConfig().ensemble == 1
    with pytest.raises((ConfigError, ValueError), match="ensemble must be >= 1"):
        load_config(TuneConfig, overrides=["ensemble=0"])
    with pytest.raises(ConfigError, match=r"ensemble \(6\) cannot exceed seeds \(5\)"):
        load_config(TuneConfig, CONFIG_DIR / "seed-ensemble.yaml", ["ensemble=6"])
    with pytest.raises(ConfigError, match="stop_after_epochs in 0..train.epochs"):
        load_config(TuneConfig, CONFIG_DIR / "seed-ensemble.yaml", ["stop_after_epochs=11"])
    with pytest.raises(ConfigError, match="target_sensitivity must lie in"):
        load_config(TuneConfig, overrides=["target_sensitivity=1.5"])


def test_evaluate_refuses_an_ensemble_of_zero_or_of_one_model_dir(tmp_path, capsys):
    from cli.main import main

    (tmp_path / "best.json").write_text(json.dumps({"checkpoint_path": str(tmp_path)}))
    assert main(["evaluate", "--experiment", str(tmp_path), "--ensemble", "0"]) == 2
    assert "ensemble must be >= 1" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tmp_path), "--ensemble", "3"]) == 2
    assert "use --experiment DIR with --ensemble" in capsys.readouterr().err
