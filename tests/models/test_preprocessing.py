"""The one preprocessing function: grayscale, resize, [0, 1] float32, whatever the input format."""

import io

import numpy as np
import pytest
from PIL import Image

from models.dataset import load_splits
from models.pipeline import class_weights, make_dataset
from models.preprocessing import decode_image, preprocess


def _encode(array: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format=fmt)
    return buffer.getvalue()


def test_preprocess_gives_grayscale_float_in_unit_range_at_the_model_size():
    rgb = np.random.default_rng(0).integers(0, 256, (50, 40, 3), dtype=np.uint8)
    out = preprocess(rgb, 32).numpy()
    assert out.shape == (32, 32, 1) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    batch = preprocess(np.stack([rgb, rgb]), 16).numpy()
    assert batch.shape == (2, 16, 16, 1)
    np.testing.assert_allclose(batch[0], preprocess(rgb, 16).numpy(), atol=1e-6)


def test_one_pixel_grid_gives_the_same_input_from_any_encoding():
    gray = np.random.default_rng(1).integers(0, 256, (24, 24), dtype=np.uint8)
    reference = preprocess(gray, 24).numpy()
    as_rgb = np.repeat(gray[..., None], 3, axis=-1)
    as_rgba = np.concatenate([as_rgb, np.full_like(gray[..., None], 255)], axis=-1)
    sixteen = (gray.astype(np.uint16) * 257)
    for data in (_encode(gray, "PNG"), _encode(as_rgb, "PNG"), _encode(as_rgba, "PNG"),
                 _encode(sixteen, "PNG")):
        np.testing.assert_allclose(preprocess(decode_image(data), 24).numpy(), reference, atol=2e-6)
    np.testing.assert_allclose(preprocess(sixteen[..., None], 24).numpy(), reference, atol=2e-6)


def test_preprocess_refuses_shapes_it_cannot_read():
    with pytest.raises(ValueError, match="expected"):
        preprocess(np.zeros((4, 4, 2), np.uint8), 8)


def test_eval_pipeline_equals_the_shared_preprocessing(mendeley_dir):
    splits = load_splits(mendeley_dir)
    batch, labels = next(iter(make_dataset(splits.val, 24, batch_size=4)))
    expected = preprocess(decode_image(open(splits.val.paths[0], "rb").read()), 24).numpy()
    np.testing.assert_array_equal(batch.numpy()[0], expected)
    assert labels.numpy().tolist() == splits.val.labels[:4].astype(float).tolist()


def test_training_pipeline_shuffles_augments_and_keeps_range(mendeley_dir):
    splits = load_splits(mendeley_dir)
    ds = make_dataset(splits.train, 24, batch_size=8, training=True, augment=1.0, seed=3)
    first = np.concatenate([y.numpy() for _, y in ds])
    second = np.concatenate([y.numpy() for _, y in ds])
    assert len(first) == len(splits.train)
    assert sorted(first) == sorted(second) and not np.array_equal(first, second)
    images = np.concatenate([x.numpy() for x, _ in ds])
    assert images.shape[1:] == (24, 24, 1) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    plain = np.concatenate([x.numpy() for x, _ in make_dataset(splits.train, 24, 64)])
    assert not np.allclose(np.sort(images.ravel()), np.sort(plain.ravel()))  # augmentation changed pixels


def test_oversampling_balances_classes(npz_file):
    splits = load_splits(npz_file)
    unbalanced = splits.train.subset(np.r_[np.flatnonzero(splits.train.labels == 0)[:4],
                                           np.flatnonzero(splits.train.labels == 1)])
    ds = make_dataset(unbalanced, 28, batch_size=12, training=True, class_balance="oversample", seed=0)
    labels = np.concatenate([y.numpy() for _ in range(10) for _, y in ds])
    assert len(labels) == 10 * len(unbalanced)
    assert 0.4 < labels.mean() < 0.6  # 4 NORMAL vs 20 PNEUMONIA, drawn 50/50


def test_class_weights_are_balanced():
    weights = class_weights(np.array([0] * 1341 + [1] * 3875))
    assert weights[0] * 1341 == pytest.approx(weights[1] * 3875)
    assert weights[0] == pytest.approx(5216 / (2 * 1341))
