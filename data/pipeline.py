"""tf.data input pipelines: parallel decode, the shared preprocessing, cache, shuffle, augment, prefetch."""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from data.dataset import Split
from data.preprocessing import decode_image, preprocess


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """What training perturbs, each 0 = off. ``strength`` scales the geometric and brightness/contrast layers;
    the others break cues that differ between the classes of the training films but not in what they show:
    ``black_level`` lifts a film's black by up to that much (x -> b + (1 - b) x), ``gamma`` bends its tone
    curve (x -> x ** exp(u), |u| <= gamma), ``blur`` is the largest Gaussian sigma in pixels, ``noise`` the
    standard deviation of added Gaussian noise, ``jpeg`` the share of films re-encoded as JPEG at a random
    quality in [``JPEG_QUALITY``] (before the others, as a film arrives re-encoded)."""

    strength: float = 0.0
    black_level: float = 0.0
    gamma: float = 0.0
    blur: float = 0.0
    noise: float = 0.0
    jpeg: float = 0.0

    def __post_init__(self) -> None:
        if min(dataclasses.astuple(self)) < 0 or self.jpeg > 1:
            raise ValueError(f"augmentation amounts must be >= 0 (jpeg a share <= 1), got {self}")

    @classmethod
    def from_config(cls, data) -> Augmentation:
        """From a ``DataConfig``: ``augment`` and the ``augment_*`` amounts."""
        return cls(data.augment, data.augment_black_level, data.augment_gamma, data.augment_blur, data.augment_noise,
                   data.augment_jpeg)


JPEG_QUALITY = (70, 100)


def jpeg_reencode(share: float, seed: int):
    """One film (S, S, 1) in [0, 1] -> with probability ``share``, the same film stored as 8-bit JPEG at a
    random quality in ``JPEG_QUALITY`` and read back; else the film unchanged."""
    import tensorflow as tf

    generator = tf.random.Generator.from_seed(seed)

    def apply(image):
        chosen = generator.uniform(()) < share
        quality = generator.uniform((), JPEG_QUALITY[0], JPEG_QUALITY[1] + 1, dtype=tf.int32)

        def reencode():
            return tf.image.adjust_jpeg_quality(tf.clip_by_value(image, 0.0, 1.0), quality)

        return tf.cond(chosen, reencode, lambda: image)

    return apply


def tone_jitter(images, black_level: float, gamma: float, seed: int):
    """Per film, a random gamma then a random black-level lift, on a batch (N, S, S, 1) in [0, 1]."""
    import tensorflow as tf

    shape = tf.stack([tf.shape(images)[0], 1, 1, 1])
    exponent = tf.exp(tf.random.uniform(shape, -gamma, gamma, seed=seed))
    lift = tf.random.uniform(shape, 0.0, black_level, seed=seed + 1)
    return lift + (1.0 - lift) * tf.pow(tf.clip_by_value(images, 0.0, 1.0), exponent)


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


def _images(split: Split, image_size: int, intensity: str):
    import tensorflow as tf

    autotune = tf.data.AUTOTUNE
    if split.paths is not None:
        files = tf.data.Dataset.from_tensor_slices(split.paths.astype(str))
        return files.map(
            lambda path: preprocess(decode_image(tf.io.read_file(path)), image_size, intensity),
            num_parallel_calls=autotune,
            deterministic=True,
        )
    images = tf.data.Dataset.from_tensor_slices(split.images)
    return images.map(lambda image: preprocess(image, image_size, intensity), num_parallel_calls=autotune)


def augment_batch(augmentation: Augmentation, seed: int):
    """The training-time perturbation of a batch: geometry, brightness and contrast, tone, blur, noise."""
    import keras

    geometric = augmenter(augmentation.strength, seed) if augmentation.strength > 0 else None
    blur = (keras.layers.RandomGaussianBlur(1.0, kernel_size=5, sigma=(0.01, augmentation.blur), value_range=(0, 1),
                                            seed=seed + 10, dtype="float32") if augmentation.blur > 0 else None)
    noise = keras.layers.GaussianNoise(augmentation.noise, seed=seed + 11, dtype="float32") if augmentation.noise else None

    def apply(images):
        import tensorflow as tf

        if geometric is not None:
            images = geometric(images, training=True)
        if augmentation.black_level or augmentation.gamma:
            images = tone_jitter(images, augmentation.black_level, augmentation.gamma, seed + 20)
        if blur is not None:
            images = blur(images, training=True)
        if noise is not None:
            images = noise(images, training=True)
        return tf.clip_by_value(images, 0.0, 1.0)

    return apply


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
    augment: Augmentation | float = 0.0,
    class_balance: Literal["class_weight", "oversample", "none"] = "none",
    seed: int = 42,
    intensity: str = "none",
):
    """Batches of (image, label); ``training`` adds shuffling, augmentation (an :class:`Augmentation`, or a
    float: its ``strength`` alone) and balanced sampling."""
    import tensorflow as tf

    autotune = tf.data.AUTOTUNE

    def cached_examples(part: Split):
        labels = tf.data.Dataset.from_tensor_slices(part.labels.astype(np.float32))
        return tf.data.Dataset.zip(_images(part, image_size, intensity), labels).cache()

    if not training:
        return cached_examples(split).batch(batch_size).prefetch(autotune)
    if class_balance == "oversample":  # each class cached on its own, then drawn 50/50
        per_class = [
            cached_examples(split.subset(np.flatnonzero(split.labels == c))).repeat().shuffle(2048, seed=seed + c)
            for c in (0, 1)
        ]
        examples = tf.data.Dataset.sample_from_datasets(per_class, weights=[0.5, 0.5], seed=seed,
                                                        rerandomize_each_iteration=True)  # new draws each epoch
        examples = examples.take(len(split))
    else:
        examples = cached_examples(split).shuffle(len(split), seed=seed, reshuffle_each_iteration=True)
    augmentation = augment if isinstance(augment, Augmentation) else Augmentation(strength=augment)
    if augmentation.jpeg:  # per film (JPEG codes one image), before the batch's perturbations
        reencode = jpeg_reencode(augmentation.jpeg, seed + 30)
        examples = examples.map(lambda x, y: (reencode(x), y))  # sequential: one generator, reproducible
    batches = examples.batch(batch_size)
    if any(dataclasses.astuple(dataclasses.replace(augmentation, jpeg=0.0))):
        perturb = augment_batch(augmentation, seed)
        batches = batches.map(lambda x, y: (perturb(x), y), num_parallel_calls=autotune)
    return batches.prefetch(autotune)
