"""The one preprocessing function: grayscale, resize, [0, 1] float32, whatever the input format."""

import io

import numpy as np
import pytest
from PIL import Image

from data.dataset import load_splits
from data.pipeline import class_weights, make_dataset
from data.preprocessing import decode_image, preprocess


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
    import keras

    keras.utils.set_random_seed(0)  # the global seed too: the draws must not depend on earlier tests
    splits = load_splits(npz_file)
    unbalanced = splits.train.subset(np.r_[np.flatnonzero(splits.train.labels == 0)[:4],
                                           np.flatnonzero(splits.train.labels == 1)])
    ds = make_dataset(unbalanced, 28, batch_size=12, training=True, class_balance="oversample", seed=0)
    labels = np.concatenate([y.numpy() for _ in range(10) for _, y in ds])
    assert len(labels) == 10 * len(unbalanced)
    assert 0.4 < labels.mean() < 0.6  # 4 NORMAL vs 20 PNEUMONIA, drawn 50/50, new draws every epoch
    first_epoch = np.concatenate([y.numpy() for _, y in ds])
    assert not np.array_equal(first_epoch, np.concatenate([y.numpy() for _, y in ds]))


def test_class_weights_are_balanced():
    weights = class_weights(np.array([0] * 1341 + [1] * 3875))
    assert weights[0] * 1341 == pytest.approx(weights[1] * 3875)
    assert weights[0] == pytest.approx(5216 / (2 * 1341))


@pytest.mark.parametrize("method", ["percentile", "equalize"])
def test_intensity_normalisation_removes_the_black_level(method):
    """The same film with its black lifted (as Kermany's pneumonia films in train are) normalises to nearly
    the same pixels, where the raw pixels differ by the lift."""
    rng = np.random.default_rng(0)
    film = rng.uniform(0.0, 0.9, (48, 48)).astype(np.float32)
    lifted = 0.08 + (1 - 0.08) * film
    plain = [preprocess(x[..., None], 32, "none").numpy() for x in (film, lifted)]
    normalised = [preprocess(x[..., None], 32, method).numpy() for x in (film, lifted)]
    assert np.abs(plain[0] - plain[1]).mean() > 0.03
    assert np.abs(normalised[0] - normalised[1]).mean() < 0.01
    assert normalised[0].min() == 0.0 and normalised[0].max() == pytest.approx(1.0)
    batch = preprocess(np.stack([film, lifted])[..., None], 32, method).numpy()  # per film, not per batch
    np.testing.assert_allclose(batch[1], normalised[1], atol=1e-6)
    with pytest.raises(ValueError, match="intensity must be one of"):
        preprocess(film[..., None], 32, "clahe")


@pytest.mark.parametrize("method", ["none", "percentile", "equalize"])
def test_serving_decodes_exactly_as_the_pipeline_preprocesses(mendeley_dir, method):
    """The skew check per intensity method: a file through serving's decoder equals the evaluation's batch."""
    from serving.decode import decode_request

    splits = load_splits(mendeley_dir)
    batch, _ = next(iter(make_dataset(splits.val, 24, batch_size=4, intensity=method)))
    served = decode_request(open(splits.val.paths[0], "rb").read(), "image/jpeg", 24, 10**6, method)
    np.testing.assert_allclose(served, batch[0].numpy(), atol=1e-6)


def test_cue_breaking_augmentations_change_what_they_claim():
    import tensorflow as tf

    from data.pipeline import Augmentation, augment_batch, tone_jitter

    dark = tf.zeros((64, 8, 8, 1))
    lifted = tone_jitter(dark, black_level=0.1, gamma=0.0, seed=1).numpy()
    assert 0.0 <= lifted.min() and lifted.max() <= 0.1 and lifted.reshape(64, -1).std(axis=1).max() < 1e-6
    assert np.unique(lifted[:, 0, 0, 0]).size > 32  # one lift per film
    ramp = tf.reshape(tf.linspace(0.0, 1.0, 64), (1, 8, 8, 1))
    bent = tone_jitter(tf.repeat(ramp, 16, axis=0), black_level=0.0, gamma=0.4, seed=2).numpy()
    assert np.abs(bent - ramp.numpy()).max() > 0.02 and bent[:, 0, 0, 0].max() == 0.0  # black stays black
    images = tf.random.uniform((8, 24, 24, 1), seed=3)
    for amounts in ({"blur": 1.0}, {"noise": 0.03}, {"black_level": 0.1, "gamma": 0.3}):
        out = augment_batch(Augmentation(**amounts), seed=4)(images).numpy()
        assert out.shape == images.shape and 0 <= out.min() and out.max() <= 1
        assert not np.allclose(out, images.numpy()), amounts
    with pytest.raises(ValueError, match=">= 0"):
        Augmentation(gamma=-0.1)


def test_jpeg_re_encoding_changes_the_share_of_films_asked_by_what_jpeg_loses():
    import io

    import tensorflow as tf
    from PIL import Image

    from data.dataset import Split
    from data.pipeline import Augmentation, jpeg_reencode, make_dataset

    film = tf.random.uniform((48, 48, 1), seed=5)
    assert np.array_equal(jpeg_reencode(0.0, seed=1)(film).numpy(), film.numpy())
    coded = jpeg_reencode(1.0, seed=1)(film).numpy()
    assert coded.shape == (48, 48, 1) and 0 <= coded.min() and coded.max() <= 1
    # what a JPEG round trip of that film at quality 70 (the lowest drawn) changes, at most: the same order
    pixels = np.round(film.numpy()[..., 0] * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=70)
    worst = np.abs(np.asarray(Image.open(buffer), np.float32) / 255 - film.numpy()[..., 0]).mean()
    assert 0.2 * worst < np.abs(coded - film.numpy()).mean() < 2 * worst

    rng = np.random.default_rng(0)
    split = Split("train", labels=np.arange(200) % 2, patients=np.arange(200),
                  images=rng.integers(0, 256, (200, 16, 16), dtype=np.uint8))
    plain = np.concatenate([x.numpy() for x, _ in make_dataset(split, 16, 50, training=True, seed=3)])
    half = np.concatenate([x.numpy() for x, _ in make_dataset(split, 16, 50, training=True, seed=3,
                                                             augment=Augmentation(jpeg=0.5))])
    changed = np.abs(half - plain).reshape(200, -1).max(axis=1) > 1 / 255
    assert 0.35 < changed.mean() < 0.65  # the same shuffle, half the films re-encoded
    with pytest.raises(ValueError, match="<= 1"):
        Augmentation(jpeg=1.5)


@pytest.mark.parametrize("shape, dtype", [((50, 40), np.uint8), ((37, 61, 1), np.uint16), ((224, 224, 3), np.float32),
                                          ((90, 120, 4), np.uint8), ((300, 200, 3), np.uint8)])
def test_one_image_as_a_graph_is_the_eager_preprocessing_bit_for_bit(shape, dtype):
    from data.preprocessing import preprocess_one

    rng = np.random.default_rng(sum(shape))
    image = rng.random(shape, dtype=np.float32) if dtype == np.float32 else \
        rng.integers(0, np.iinfo(dtype).max, shape, endpoint=True).astype(dtype)
    for size in (32, 96):
        np.testing.assert_array_equal(preprocess_one(image, size).numpy(), preprocess(image, size).numpy())
