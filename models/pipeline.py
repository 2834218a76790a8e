"""tf.data input pipelines: parallel decode, the shared preprocessing, cache, shuffle, augment, prefetch."""

from __future__ import annotations

from typing import Literal

import numpy as np

from models.dataset import Split
from models.preprocessing import decode_image, preprocess


def augmenter(strength: float, seed: int):
    """Augmentation suited to chest radiographs: small rotations, shifts, zoom, brightness, contrast.

    No flips: the heart sits on the left, and a mirrored film is not a plausible input.
    """
    import keras

    s = strength  # float32 layers: augmentation stays exact under a mixed-precision policy
    return keras.Sequential(
        [
            keras.layers.RandomRotation(0.025 * s, fill_mode="constant", seed=seed, dtype="float32"),  # about +-9 deg
            keras.layers.RandomTranslation(0.06 * s, 0.06 * s, fill_mode="constant", seed=seed + 1, dtype="float32"),
            keras.layers.RandomZoom((-0.1 * s, 0.1 * s), fill_mode="constant", seed=seed + 2, dtype="float32"),
            keras.layers.RandomBrightness(0.1 * s, value_range=(0.0, 1.0), seed=seed + 3, dtype="float32"),
            keras.layers.RandomContrast(0.15 * s, value_range=(0.0, 1.0), seed=seed + 4, dtype="float32"),
        ],
        name="augment",
    )


def _images(split: Split, image_size: int):
    import tensorflow as tf

    autotune = tf.data.AUTOTUNE
    if split.paths is not None:
        files = tf.data.Dataset.from_tensor_slices(split.paths.astype(str))
        return files.map(
            lambda path: preprocess(decode_image(tf.io.read_file(path)), image_size),
            num_parallel_calls=autotune,
            deterministic=True,
        )
    images = tf.data.Dataset.from_tensor_slices(split.images)
    return images.map(lambda image: preprocess(image, image_size), num_parallel_calls=autotune)


def class_weights(labels: np.ndarray) -> dict[int, float]:
    """'balanced' weights: each class contributes equally to the loss."""
    from sklearn.utils.class_weight import compute_class_weight

    classes = np.unique(labels)
    weights = compute_class_weight("balanced", classes=classes, y=labels)
    return {int(c): float(w) for c, w in zip(classes, weights)}


def make_dataset(
    split: Split,
    image_size: int,
    batch_size: int,
    training: bool = False,
    augment: float = 0.0,
    class_balance: Literal["class_weight", "oversample", "none"] = "none",
    seed: int = 42,
):
    """Batches of (image, label); ``training`` adds shuffling, augmentation and balanced sampling."""
    import tensorflow as tf

    autotune = tf.data.AUTOTUNE

    def cached_examples(part: Split):
        labels = tf.data.Dataset.from_tensor_slices(part.labels.astype(np.float32))
        return tf.data.Dataset.zip(_images(part, image_size), labels).cache()

    if not training:
        return cached_examples(split).batch(batch_size).prefetch(autotune)
    if class_balance == "oversample":  # each class cached on its own, then drawn 50/50
        per_class = [
            cached_examples(split.subset(np.flatnonzero(split.labels == c))).repeat().shuffle(2048, seed=seed + c)
            for c in (0, 1)
        ]
        examples = tf.data.Dataset.sample_from_datasets(per_class, weights=[0.5, 0.5], seed=seed)
        examples = examples.take(len(split))
    else:
        examples = cached_examples(split).shuffle(len(split), seed=seed, reshuffle_each_iteration=True)
    batches = examples.batch(batch_size)
    if augment > 0:
        layers = augmenter(augment, seed)
        batches = batches.map(lambda x, y: (layers(x, training=True), y), num_parallel_calls=autotune)
    return batches.prefetch(autotune)
