"""The model families: they build, train a step, follow their config, save and reload, and give Grad-CAM maps."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from models.config import ModelConfig, TrainConfig
from models.head import WeightsUnavailableError
from models.package import PackageError, PackageMetadata, load_model_dir, save_model_dir
from models.registry import build_model
from runtime.config import ConfigError, load_config
from tuning.train import compile_model


def _batch(size: int, n: int = 4):
    rng = np.random.default_rng(0)
    return rng.random((n, size, size, 1), dtype=np.float32), np.array([0, 1] * (n // 2), np.float32)


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig(family="cnn", image_size=32, depth=3, base_filters=4, dense_units=8),
        ModelConfig(family="cnn", image_size=32, depth=2, base_filters=4, dense_units=8, separable=True, kernel_size=5),
        ModelConfig(family="inception", image_size=75, dense_units=8, trainable_blocks=2),
        ModelConfig(family="efficientnet_lite0", image_size=64, dense_units=8, trainable_blocks=2),
    ],
    ids=["cnn", "cnn-separable", "inception", "efficientnet_lite0"],
)
def test_each_family_builds_and_takes_a_training_step(config):
    model = build_model(config)
    assert model.input_shape == (None, config.image_size, config.image_size, 1)
    assert model.output_shape == (None, 1)
    compile_model(model, TrainConfig(model=config), steps_per_epoch=1)
    x, y = _batch(config.image_size)
    before = [w.copy() for w in model.get_weights()]
    loss = model.train_on_batch(x, y)
    assert np.isfinite(loss).all()
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    probabilities = model.predict_on_batch(x)
    assert ((probabilities >= 0) & (probabilities <= 1)).all()
    norms = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    assert {layer.momentum for layer in norms} == {config.bn_momentum}  # a backbone's own norms included


def test_cnn_depth_and_filters_follow_the_config():
    model = build_model(ModelConfig(family="cnn", image_size=64, depth=3, base_filters=8, filter_growth=2.0,
                                    convs_per_block=1))
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [c.filters for c in convs] == [8, 16, 32]


def test_inception_trainable_blocks_freeze_the_rest():
    frozen = build_model(ModelConfig(family="inception", image_size=75, trainable_blocks=0))
    partly = build_model(ModelConfig(family="inception", image_size=75, trainable_blocks=1))
    full = build_model(ModelConfig(family="inception", image_size=75, trainable_blocks=-1))
    def trainable(layer_or_model) -> int:
        return sum(int(np.prod(w.shape)) for w in layer_or_model.trainable_weights)

    counts = [trainable(m) for m in (frozen, partly, full)]
    assert counts[0] < counts[1] < counts[2]
    assert counts[0] == trainable(frozen.get_layer("head_dense")) + trainable(frozen.get_layer("pneumonia_probability"))


def test_mixed_precision_keeps_a_float32_output():
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    model = build_model(ModelConfig(family="cnn", image_size=32, depth=2, base_filters=4, dense_units=8))
    assert model.get_layer("block0_conv0").compute_dtype == "bfloat16"
    assert model.output.dtype == "float32"


def test_saved_model_reloads_and_predicts_identically(tmp_path):
    model = build_model(ModelConfig(family="cnn", image_size=32, depth=2, base_filters=4, dense_units=8))
    x, _ = _batch(32, 6)
    written = PackageMetadata.for_training({"model": {"family": "cnn"}}, 32)
    save_model_dir(model, written, tmp_path / "m")
    loaded, metadata = load_model_dir(tmp_path / "m")
    assert metadata == written
    np.testing.assert_array_equal(loaded.predict_on_batch(x), model.predict_on_batch(x))


def test_tampered_model_dir_is_refused(tmp_path):
    model = build_model(ModelConfig(family="cnn", image_size=32, depth=1, base_filters=2, dense_units=2))
    directory = save_model_dir(model, PackageMetadata.for_training({}, 32), tmp_path / "m")
    (directory / "metadata.json").write_text('{"threshold": 0.01}')
    with pytest.raises(PackageError, match="checksum mismatch.*metadata.json"):
        load_model_dir(directory)
    (directory / "model.keras").unlink()
    with pytest.raises(PackageError, match="model.keras is missing"):
        load_model_dir(directory)


def test_inception_loads_backbone_weights_from_a_local_file(tmp_path):
    donor = keras.applications.InceptionV3(include_top=False, weights=None, input_shape=(75, 75, 3), pooling="avg")
    donor.set_weights([np.full_like(w, 0.01 * (i % 7)) for i, w in enumerate(donor.get_weights())])
    path = tmp_path / "inception_backbone.weights.h5"
    donor.save_weights(path)
    model = build_model(ModelConfig(family="inception", image_size=99, weights=str(path)))
    loaded = model.get_layer("inception_v3").get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(loaded, donor.get_weights()))
    with pytest.raises(WeightsUnavailableError, match="neither 'imagenet', 'none' nor an existing"):
        build_model(ModelConfig(family="inception", image_size=75, weights=str(tmp_path / "missing.h5")))


def test_imagenet_weights_offline_say_so_and_name_the_alternatives(tmp_path):
    """Keras' real download path, with the network cut (a proxy on a closed loopback port)."""
    code = (
        "from models.config import ModelConfig\n"
        "from models.registry import build_model\n"
        "build_model(ModelConfig(family='inception', image_size=75, weights='imagenet'))\n"
    )
    env = {**os.environ, "KERAS_HOME": str(tmp_path), "HTTPS_PROXY": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "WeightsUnavailableError" in result.stderr
    assert "could not get the ImageNet weights" in result.stderr
    assert "model.weights=none" in result.stderr and "weights.h5" in result.stderr


@pytest.mark.parametrize("family,size", [("cnn", 32), ("inception", 75)])
def test_batch_norm_momentum_follows_the_config(family, size):
    """One training step moves every moving mean (1 - momentum) of the way to the batch mean, in both
    families (InceptionV3's own batch norms included)."""
    momenta = (0.9, 0.5)
    models = [build_model(ModelConfig(family=family, image_size=size, depth=2, base_filters=4, dense_units=8,
                                      bn_momentum=m)) for m in momenta]
    models[1].set_weights(models[0].get_weights())
    x, y = _batch(size)
    first_norm_means = []
    for model, momentum in zip(models, momenta):
        compile_model(model, TrainConfig(model=ModelConfig(family=family, image_size=size)), steps_per_epoch=1)
        model.run_eagerly = True  # one step: tracing InceptionV3's train step into a graph costs ~25 s, eager ~2 s
        model.train_on_batch(x, y)
        norms = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
        assert norms and {layer.momentum for layer in norms} == {momentum}
        first_norm_means.append(np.asarray(norms[0].moving_mean))
    np.testing.assert_allclose(first_norm_means[1], 5 * first_norm_means[0], rtol=1e-4, atol=1e-7)


def test_model_config_refuses_bad_values():
    with pytest.raises(ConfigError, match="image_size must be >= 75 for inception"):
        load_config(ModelConfig, overrides=["family=inception", "image_size=64"])
    with pytest.raises(ConfigError, match="trainable_blocks must lie in -1..7 for efficientnet_lite1"):
        load_config(ModelConfig, overrides=["family=efficientnet_lite1", "trainable_blocks=8"])
    with pytest.raises(ConfigError, match="unknown model family 'resnet'"):
        load_config(ModelConfig, overrides=["family=resnet"])
    with pytest.raises(ConfigError, match="unknown key depht"):
        load_config(ModelConfig, overrides=["depht=3"])
    with pytest.raises(ConfigError, match=r"bn_momentum must lie in \[0, 1\)"):
        load_config(ModelConfig, overrides=["bn_momentum=1.0"])
    with pytest.raises(ConfigError, match="depth: expected an integer"):
        load_config(ModelConfig, overrides=["depth=deep"])


@pytest.mark.parametrize("config", [ModelConfig(family="cnn", image_size=32, depth=2, base_filters=4, dense_units=8),
                                    ModelConfig(family="inception", image_size=75, dense_units=8),
                                    ModelConfig(family="efficientnet_lite0", image_size=64, dense_units=8)],
                         ids=["cnn", "inception", "efficientnet_lite0"])
def test_gradcam_gives_a_heatmap_at_the_input_size(config):
    import io

    from PIL import Image

    from models.gradcam import feature_maps, gradcam
    from serving.overlay import overlay_png

    model = build_model(config)
    assert len(feature_maps(model).shape) == 4
    image, _ = _batch(config.image_size, 2)
    heatmap = gradcam(model, image[0])
    assert heatmap.shape == (config.image_size, config.image_size)
    assert 0.0 <= heatmap.min() and heatmap.max() <= 1.0
    with Image.open(io.BytesIO(overlay_png(image[0], heatmap))) as png:
        assert png.format == "PNG" and png.size == (config.image_size, config.image_size) and png.mode == "RGB"
