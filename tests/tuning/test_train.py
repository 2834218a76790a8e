"""``pneumonia train``: one configuration trained on each layout into a model directory."""

import json

import numpy as np
import pytest

from cli.main import main
from data.pipeline import make_dataset
from models.config import TrainConfig
from models.package import load_model_dir
from runtime.config import load_config

TINY = ["model.image_size=32", "model.depth=2", "model.base_filters=4", "model.dense_units=8",
        "batch_size=8", "mixed_precision=float32"]


def _sets(*items):
    return [arg for item in items for arg in ("--set", item)]


def test_train_cli_writes_a_model_directory(mendeley_dir, tmp_path, capsys):
    out = tmp_path / "model"
    code = main(["train", "--data", str(mendeley_dir), "--output", str(out), *_sets(*TINY, "epochs=2")])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.count("val_auc") == 2 and "img/s" in printed and "overlap 0" in printed
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert metadata["input"]["image_size"] == 32 and metadata["input"]["channels"] == 1
    assert metadata["config"]["model"]["depth"] == 2 and metadata["config"]["epochs"] == 2
    assert [e["epoch"] for e in metadata["history"]] == [1, 2]
    for key in ("loss", "accuracy", "val_auc", "val_sensitivity", "val_specificity", "images_per_sec"):
        assert key in metadata["history"][0]
    assert metadata["best_epoch"] in (1, 2)
    assert len(metadata["data"]["fingerprint"]) == 16
    assert {"tensorflow", "keras", "numpy"} <= set(metadata["versions"])
    assert metadata["runtime"] == {"threads": metadata["runtime"]["threads"], "precision": "float32",
                                   "precision_reason": "as configured"}

    # the saved model is the best epoch's and predicts like a fresh load of the validation images
    model, _ = load_model_dir(out)
    config = load_config(TrainConfig, overrides=[f"data.path={mendeley_dir}", *TINY])
    from tuning.train import load_data

    val = load_data(config).val
    probabilities = model.predict(make_dataset(val, 32, 64), verbose=0).ravel()
    assert probabilities.shape == (len(val),)


def test_train_config_file_plus_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nmodel:\n  family: cnn\n  depth: 3\nepochs: 5\n")
    config = load_config(TrainConfig, path, ["model.depth=4", "learning_rate=3e-4", "data.class_balance=oversample"])
    assert (config.name, config.model.depth, config.epochs) == ("x", 4, 5)
    assert config.learning_rate == pytest.approx(3e-4)
    assert config.data.class_balance == "oversample"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "epochz=3"], "unknown key epochz"),
        (["--set", "model.family=vgg"], "unknown model family 'vgg'"),
        (["--set", "batch_size=big"], "batch_size: expected an integer"),
        (["--set", "epochs"], "not of the form key=value"),
        (["--config", "/nonexistent.yaml"], "config file not found"),
        (["--set", "epochs=2", "--set", "warmup_epochs=2"], "warmup_epochs must lie in [0, epochs=2)"),
        (["--set", "warmup_epochs=1", "--set", "lr_schedule=constant"], "warmup_epochs needs lr_schedule: cosine"),
        (["--set", "ema_momentum=1"], "ema_momentum must lie in [0, 1)"),
        (["--set", "data.augment_jpeg=2"], "augment_jpeg is a share of films, at most 1"),
    ],
)
def test_bad_configs_exit_2_with_a_clear_message(args, message, mendeley_dir, capsys):
    assert main(["train", "--data", str(mendeley_dir), *args]) == 2
    assert message in capsys.readouterr().err


def test_warm_up_rises_linearly_to_the_learning_rate_then_cosine_decays_to_one_percent():
    from tuning.train import make_optimizer

    schedule = make_optimizer(TrainConfig(epochs=4, learning_rate=1e-3, warmup_epochs=1), steps_per_epoch=10)._learning_rate
    rates = [float(schedule(step)) for step in (0, 5, 10, 25, 40)]
    assert rates == pytest.approx([1e-5, 5.05e-4, 1e-3, 5.05e-4, 1e-5], rel=1e-3)
    plain = make_optimizer(TrainConfig(epochs=4, learning_rate=1e-3), steps_per_epoch=10)._learning_rate
    assert float(plain(0)) == pytest.approx(1e-3) and float(plain(40)) == pytest.approx(1e-5)


def test_with_ema_the_kept_weights_are_the_average_and_a_checkpoint_resumes_from_the_trained_ones(npz_file):
    import keras

    from models.registry import build_model
    from tuning.train import fit, load_data, trained_weights_in_model

    def trained(ema: float):
        config = load_config(TrainConfig, overrides=[*TINY, f"data.path={npz_file}", "epochs=1", "learning_rate=0.05",
                                                    "lr_schedule=constant", "data.augment=0", f"ema_momentum={ema}"])
        keras.utils.set_random_seed(config.seed)  # as fit does before it builds the model
        start = [w.numpy() for w in build_model(config.model).trainable_weights]
        model = fit(config, load_data(config), log=lambda line: None).model
        moved = sum(float(np.abs(w.numpy() - w0).sum()) for w, w0 in zip(model.trainable_weights, start))
        return model, moved

    plain, moved = trained(0.0)
    averaged, moved_on_average = trained(0.9)
    # 5 steps: the average keeps about 1 - 0.9 ** 5 = 41 % of the way the weights went (plus Adam's own path)
    assert moved_on_average < 0.75 * moved
    assert averaged.optimizer.use_ema and not plain.optimizer.use_ema
    # a checkpoint holds the averages in the model and the trained weights in the optimizer: swapped back
    optimizer = averaged.optimizer
    kept = [v.numpy() for v in averaged.trainable_weights]
    for variable, average in zip(optimizer._trainable_variables, optimizer._model_variables_moving_average):
        average.assign(variable.numpy() + 1.0)  # stand-in trained weights
    trained_weights_in_model(averaged)
    assert all(np.allclose(v.numpy(), k + 1.0) for v, k in zip(averaged.trainable_weights, kept))
    assert all(np.allclose(a.numpy(), k) for a, k in zip(optimizer._model_variables_moving_average, kept))


def test_bad_yaml_is_reported(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    assert main(["train", "--config", str(path)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_training_on_npz_with_oversampling(npz_file, tmp_path):
    out = tmp_path / "m"
    assert main(["train", "--data", str(npz_file), "--output", str(out),
                 *_sets(*TINY, "epochs=1", "data.class_balance=oversample", "data.augment=0.5")]) == 0
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["data"]["layout"] == "medmnist"
    assert metadata["data"]["counts"]["val"] == {"NORMAL": 5, "PNEUMONIA": 5}


def test_mixed_precision_auto_trains_in_the_precision_measured_faster_and_says_why(mendeley_dir, tmp_path,
                                                                                      monkeypatch):
    from runtime.precision import cpu_supports_bfloat16

    monkeypatch.setenv("PNEUMONIA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "m"
    args = [a for a in TINY if not a.startswith("mixed_precision")]
    assert main(["train", "--data", str(mendeley_dir), "--output", str(out),
                 *_sets(*args, "epochs=1", "mixed_precision=auto", "threads=1")]) == 0
    runtime = json.loads((out / "metadata.json").read_text())["runtime"]
    if not cpu_supports_bfloat16():
        assert runtime["precision"] == "float32" and "without bfloat16" in runtime["precision_reason"]
        return
    (measured,) = (tmp_path / "cache" / "precision").glob("*.json")
    winner = json.loads(measured.read_text())
    assert runtime["precision"] == winner["precision"] == max(winner["images_per_sec"], key=winner["images_per_sec"].get)
    assert runtime["precision_reason"].startswith(f"auto: {winner['precision']} trained cnn at 32 px faster")


@pytest.mark.real_data
def test_train_on_the_real_data_subset(real_data, tmp_path):
    out = tmp_path / "real"
    assert main(["train", "--data", str(real_data), "--output", str(out),
                 *_sets("model.image_size=64", "model.depth=3", "model.base_filters=8", "epochs=1",
                        "data.max_train_images=256", "data.max_val_images=128", "batch_size=32")]) == 0
    metadata = json.loads((out / "metadata.json").read_text())
    counts = metadata["data"]["counts"]
    assert sum(counts["train"].values()) == 256 and sum(counts["val"].values()) == 128
    assert metadata["data"]["layout"] == "mendeley"
    assert 0.0 <= metadata["validation"]["auc"] <= 1.0
    assert np.isfinite(metadata["validation"]["loss"])
