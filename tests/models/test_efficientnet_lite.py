"""EfficientNet-Lite: the torch-free checkpoint reader, the weight conversion (checked against ImageNet classes of
scikit-image's sample photos, and shown to break when a tensor is mis-mapped) and the pneumonia model built on it.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import sys
import types

import keras
import numpy as np
import pytest
import skimage.data
from PIL import Image

from models.config import ModelConfig
from models.families import efficientnet_lite as lite
from models.families.efficientnet_lite import (
    LITE_VARIANTS,
    ConversionError,
    build_efficientnet_lite,
    build_imagenet_classifier,
    checkpoint_path,
    convert_state_dict,
    imagenet_weights,
)
from models.gradcam import gradcam
from models.head import WeightsUnavailableError
from models.package import file_sha256
from models.torch_checkpoint import MAGIC_NUMBER, PROTOCOL_VERSION, CheckpointError, load_state_dict

ESPRESSO = 967
CATS = slice(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh cache for this module, so the conversion itself is tested (once per variant)."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("pneumonia_cache")
        patch.setenv("PNEUMONIA_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def lite0_state():
    return load_state_dict(checkpoint_path("efficientnet_lite0"))


def _center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """TF EfficientNet's eval crop: the central size/(size+32) of the short side, bicubic to size x size."""
    h, w = image.shape[:2]
    crop = int(size / (size + 32) * min(h, w))
    top, left = (h - crop + 1) // 2, (w - crop + 1) // 2
    patch = Image.fromarray(image[top : top + crop, left : left + crop])
    return np.asarray(patch.resize((size, size), Image.BICUBIC), np.float32)


def _predict(model, x: np.ndarray) -> np.ndarray:
    """Eager inference: faster than predict_on_batch for one batch, which first traces a graph."""
    return keras.ops.convert_to_numpy(model(x, training=False))


def _photos(size: int) -> np.ndarray:
    return np.stack([_center_crop(skimage.data.coffee(), size), _center_crop(skimage.data.chelsea(), size)])


# --- the checkpoint reader ------------------------------------------------------------------------------------------


def _legacy_file(path, main_pickle: bytes, keys=(), storages=()) -> None:
    head = b"".join(pickle.dumps(obj, protocol=2) for obj in (MAGIC_NUMBER, PROTOCOL_VERSION, {"little_endian": True}))
    tail = pickle.dumps(list(keys), protocol=2)
    tail += b"".join(np.int64(s.size).tobytes() + s.tobytes() for s in storages)
    path.write_bytes(head + main_pickle + tail)


def test_reader_refuses_a_pickle_that_names_another_global(tmp_path):
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pth"
    _legacy_file(path, pickle.dumps({"weight": Exploit()}, protocol=2))
    with pytest.raises(CheckpointError, match=r"refusing global (posix|os)\.system"):
        load_state_dict(path)
    assert not marker.exists()


def test_reader_applies_shapes_strides_and_offsets(tmp_path, monkeypatch):
    """A hand-written legacy file with shared, transposed and offset views, pickled as torch would."""
    fake_torch, fake_utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("only pickled, never called")

    for module, name, value in ((fake_torch, "FloatStorage", type("FloatStorage", (), {})),
                                (fake_torch, "LongStorage", type("LongStorage", (), {})),
                                (fake_utils, "_rebuild_tensor_v2", _rebuild_tensor_v2)):
        value.__module__, value.__qualname__ = module.__name__, name
        setattr(module, name, value)
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    monkeypatch.setitem(sys.modules, "torch._utils", fake_utils)

    @dataclasses.dataclass
    class Storage:
        key: str
        kind: type
        data: np.ndarray

    class Tensor:
        def __init__(self, storage, offset, shape, stride):
            self.args = (storage, offset, shape, stride, False, collections.OrderedDict())

        def __reduce__(self):
            return _rebuild_tensor_v2, self.args

    class TorchPickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                return "storage", obj.kind, obj.key, "cpu", obj.data.size, None
            return None

    floats = Storage("0", fake_torch.FloatStorage, np.arange(24, dtype="<f4"))
    longs = Storage("1", fake_torch.LongStorage, np.array([7, -3], "<i8"))
    state = collections.OrderedDict(
        block=Tensor(floats, 0, (2, 3, 4), (12, 4, 1)),
        transposed=Tensor(floats, 0, (4, 3), (1, 4)),
        strided=Tensor(floats, 5, (3,), (2,)),
        counter=Tensor(longs, 1, (), ()),
    )
    buffer = io.BytesIO()
    TorchPickler(buffer, protocol=2).dump(state)
    path = tmp_path / "views.pth"
    _legacy_file(path, buffer.getvalue(), ["0", "1"], [floats.data, longs.data])

    tensors = load_state_dict(path)
    np.testing.assert_array_equal(tensors["block"], np.arange(24).reshape(2, 3, 4))
    np.testing.assert_array_equal(tensors["transposed"], np.arange(12).reshape(3, 4).T)
    np.testing.assert_array_equal(tensors["strided"], [5, 7, 9])
    assert tensors["counter"].dtype == np.int64 and tensors["counter"] == -3
    assert tensors["block"].dtype == np.float32 and tensors["transposed"].flags.c_contiguous

    path.write_bytes(path.read_bytes()[:-4])  # truncated storage
    with pytest.raises(CheckpointError, match="ends inside storage"):
        load_state_dict(path)


def test_the_wheel_checkpoint_reads_completely(lite0_state):
    floats = sum(a.size for k, a in lite0_state.items() if not k.endswith("num_batches_tracked"))
    assert floats == 4_694_024
    assert lite0_state["_conv_stem.weight"].shape == (32, 3, 3, 3)


# --- the conversion -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(LITE_VARIANTS))
def test_converted_classifier_recognises_imagenet_classes(cache, variant):
    model = build_imagenet_classifier(variant)
    coffee, cat = _predict(model, _photos(LITE_VARIANTS[variant].resolution))
    assert coffee.argmax() == ESPRESSO and coffee[ESPRESSO] > 0.45  # lite0 0.95, lite1 0.54, lite2 0.89
    assert CATS.start <= cat.argmax() < CATS.stop and cat[CATS].sum() > 0.7  # 0.92, 0.82, 0.83
    assert (cache / "weights" / f"{variant}_imagenet.weights.h5").is_file()


def _swap(state, a, b):
    return {**state, a: state[b], b: state[a]}


@pytest.mark.parametrize(
    "mis_map",
    [
        lambda s: {k: v.transpose(0, 1, 3, 2) if "_depthwise_conv" in k else v for k, v in s.items()},  # kh <-> kw
        lambda s: _swap(s, "_blocks.12._bn1.weight", "_blocks.12._bn1.bias"),  # gamma <-> beta in one block
        lambda s: _swap(s, "_blocks.5._bn1.running_mean", "_blocks.5._bn1.running_var"),  # mean <-> var in one BN
    ],
    ids=["depthwise-kernels-transposed", "gamma-beta-swapped", "mean-var-swapped"],
)
def test_a_mis_mapped_tensor_breaks_the_prediction(lite0_state, mis_map):
    """The recognition test above can fail: one wrong tensor mapping takes espresso from 0.95 to < 0.1 (or NaN)."""
    model = build_imagenet_classifier("efficientnet_lite0", weights=None)
    images = _photos(224)[:1]
    convert_state_dict(lite0_state, model)
    assert _predict(model, images)[0, ESPRESSO] > 0.9
    convert_state_dict(mis_map(lite0_state), model)
    assert not _predict(model, images)[0, ESPRESSO] > 0.5  # NaN counts as broken


def test_conversion_refuses_a_checkpoint_that_does_not_fit(lite0_state):
    model = build_imagenet_classifier("efficientnet_lite0", image_size=64, weights=None)
    with pytest.raises(ConversionError, match="not used.*_extra"):
        convert_state_dict({**lite0_state, "_extra.weight": np.zeros(3, np.float32)}, model)
    with pytest.raises(ConversionError, match="_blocks.4._bn0.running_var is missing"):
        convert_state_dict({k: v for k, v in lite0_state.items() if k != "_blocks.4._bn0.running_var"}, model)
    with pytest.raises(ConversionError, match=r"predictions <- _fc: shapes"):
        convert_state_dict({**lite0_state, "_fc.weight": lite0_state["_fc.weight"].T}, model)  # not transposed
    lite1 = load_state_dict(checkpoint_path("efficientnet_lite1"))
    with pytest.raises(ConversionError):
        convert_state_dict(lite1, model)


def test_conversion_is_cached_and_verified(tmp_path, monkeypatch):
    monkeypatch.setenv("PNEUMONIA_CACHE", str(tmp_path))
    path = imagenet_weights("efficientnet_lite0")
    sidecar = path.with_name(path.name + ".sha256")
    assert path.parent == tmp_path / "weights" and sidecar.read_text().split()[0] == file_sha256(path)
    stamp = path.stat().st_mtime_ns
    assert imagenet_weights("efficientnet_lite0") == path and path.stat().st_mtime_ns == stamp  # reused
    with open(path, "r+b") as handle:  # a damaged cache file is converted again
        handle.seek(-100, os.SEEK_END)
        handle.write(b"\0" * 100)
    imagenet_weights("efficientnet_lite0")
    assert sidecar.read_text().split()[0] == file_sha256(path) and path.stat().st_mtime_ns != stamp
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_a_changed_or_missing_wheel_is_refused(monkeypatch):
    spec = LITE_VARIANTS["efficientnet_lite0"]
    monkeypatch.setitem(LITE_VARIANTS, "efficientnet_lite0", dataclasses.replace(spec, sha256="0" * 64))
    with pytest.raises(WeightsUnavailableError, match="SHA-256"):
        checkpoint_path("efficientnet_lite0")
    monkeypatch.setitem(LITE_VARIANTS, "efficientnet_lite0", dataclasses.replace(spec, package="no_such_wheel_here"))
    with pytest.raises(WeightsUnavailableError, match="not installed"):
        checkpoint_path("efficientnet_lite0")


# --- the pneumonia model --------------------------------------------------------------------------------------------


def _config(**overrides) -> ModelConfig:
    return ModelConfig(**{"family": "efficientnet_lite0", "image_size": 96, "dense_units": 8, **overrides})


def _backbone(model):
    return next(layer for layer in model.layers if isinstance(layer, keras.Model))


def test_pretrained_pneumonia_model(cache, tmp_path):
    model = build_efficientnet_lite(_config(weights="imagenet"))
    x = np.random.default_rng(0).random((3, 96, 96, 1), dtype=np.float32)
    probabilities = _predict(model, x)
    assert model.output_shape == (None, 1) and probabilities.shape == (3, 1)
    assert ((probabilities >= 0) & (probabilities <= 1)).all()
    assert model.get_layer("pneumonia_probability").dtype == "float32"

    # the backbone holds the converted weights, fed gray [0, 1] as the ImageNet model is fed RGB 0..255
    reference = build_imagenet_classifier("efficientnet_lite0", image_size=96)
    for ours, theirs in zip(_backbone(model).get_weights(), _backbone(reference).get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    features = _predict(keras.Model(model.input, model.get_layer("pool").output), x)
    expected = _predict(keras.Model(reference.input, reference.get_layer("pool").output), 255 * np.repeat(x, 3, -1))
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)
    assert model.get_layer("pool").input.shape == (None, 3, 3, 1280)  # Grad-CAM's feature maps
    heatmap = gradcam(model, x[0])
    assert heatmap.shape == (96, 96) and np.isfinite(heatmap).all()

    path = tmp_path / "lite.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_allclose(_predict(loaded, x), probabilities, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Skipping nested container")  # Keras' noise before it refuses the wrong file
def test_backbone_weights_file_round_trips_and_a_wrong_one_is_refused(tmp_path):
    donor = _backbone(build_efficientnet_lite(_config(image_size=64)))
    donor.save_weights(tmp_path / "backbone.weights.h5")
    model = build_efficientnet_lite(_config(image_size=64, weights=str(tmp_path / "backbone.weights.h5")))
    for ours, theirs in zip(_backbone(model).get_weights(), donor.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    with pytest.raises(WeightsUnavailableError, match="does not hold efficientnet_lite1 backbone weights"):
        build_efficientnet_lite(_config(family="efficientnet_lite1", image_size=64,
                                        weights=str(tmp_path / "backbone.weights.h5")))
    with pytest.raises(WeightsUnavailableError, match="neither"):
        build_efficientnet_lite(_config(weights=str(tmp_path / "absent.weights.h5")))


def _trainable_stages(model) -> set[int]:
    return {lite._stage_of(layer.name) for layer in _backbone(model).layers if layer.trainable_weights}


def test_trainable_blocks_freeze_the_earlier_stages_and_their_batch_norms():
    frozen = build_efficientnet_lite(_config(image_size=64, trainable_blocks=0))
    assert not _backbone(frozen).trainable_weights
    assert len(frozen.trainable_weights) == 4  # head_dense and pneumonia_probability

    everything = build_efficientnet_lite(_config(image_size=64, trainable_blocks=-1))
    assert _trainable_stages(everything) == set(range(9))  # stem, 7 stages, head conv

    model = build_efficientnet_lite(_config(image_size=64, trainable_blocks=2))
    assert _trainable_stages(model) == {6, 7, 8}
    frozen_bn, live_bn = _backbone(model).get_layer("block5c_dw_bn"), _backbone(model).get_layer("top_bn")
    before = [frozen_bn.moving_mean.numpy().copy(), live_bn.moving_mean.numpy().copy()]
    model(np.random.default_rng(1).random((4, 64, 64, 1), dtype=np.float32), training=True)
    np.testing.assert_array_equal(frozen_bn.moving_mean.numpy(), before[0])  # a frozen BN keeps its statistics
    assert not np.array_equal(live_bn.moving_mean.numpy(), before[1])
