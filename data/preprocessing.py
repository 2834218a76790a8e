"""The one preprocessing function: image -> grayscale float32 in [0, 1] at the model's size.

Training (tf.data), evaluation and serving all call :func:`preprocess` (and :func:`decode_image`
for encoded bytes), so a served prediction sees exactly the pixels an evaluated one saw. The intensity
normalisation a model was trained with is part of its :class:`InputContract`, recorded in its package.
"""

from __future__ import annotations

import dataclasses
import functools

LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# none: as decoded. percentile: each film's 1st-99th percentile stretched to [0, 1], so its black level
# (which differs between the classes in Kermany's train split) carries no signal. equalize: histogram
# equalisation of each film (Keras' Equalization layer, 256 bins).
INTENSITY_METHODS = ("none", "percentile", "equalize")
PERCENTILES = (0.01, 0.99)


@dataclasses.dataclass(frozen=True)
class InputContract:
    """What the model takes, as recorded in a package's metadata: clients and serving read it from there."""

    image_size: int
    decode: str = "tf.io.decode_image to 3 channels, 8- or 16-bit, scaled to float32 [0, 1]"
    color: str = "RGB -> grayscale (ITU-R 601 luma); alpha dropped"
    resize: str = "bilinear with antialias to image_size x image_size (aspect ratio not kept)"
    value_range: list[float] = dataclasses.field(default_factory=lambda: [0.0, 1.0])
    channels: int = 1
    dtype: str = "float32"
    intensity: str = "none"  # one of INTENSITY_METHODS, applied after the resize


def decode_image(data):
    """Encoded JPEG/PNG/BMP/GIF bytes (a scalar string tensor) -> float32 (H, W, 3) in [0, 1].

    Always 3 channels (gray is repeated, alpha dropped), so every file takes the same path.
    """
    import tensorflow as tf

    image = tf.io.decode_image(data, channels=3, dtype=tf.float32, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


@functools.cache
def _equalizer():
    import keras

    return keras.layers.Equalization(value_range=(0.0, 1.0), bins=256, dtype="float32")


def normalize_intensity(images, method: str):
    """Per-film intensity normalisation of float32 (..., S, S, 1) images in [0, 1] (see INTENSITY_METHODS)."""
    import tensorflow as tf

    if method == "none":
        return images
    if method == "equalize":  # one film at a time: the layer pools the histogram over a batch
        if images.shape.rank == 4:
            return tf.map_fn(_equalizer(), images)
        return _equalizer()(images)
    if method != "percentile":
        raise ValueError(f"intensity must be one of {', '.join(INTENSITY_METHODS)}, got {method!r}")
    pixels = tf.sort(tf.reshape(images, tf.concat([tf.shape(images)[:-3], [-1]], axis=0)), axis=-1)
    last = tf.cast(tf.shape(pixels)[-1] - 1, tf.float32)
    low, high = (pixels[..., tf.cast(tf.round(q * last), tf.int32)] for q in PERCENTILES)
    low, high = low[..., tf.newaxis, tf.newaxis, tf.newaxis], high[..., tf.newaxis, tf.newaxis, tf.newaxis]
    return tf.clip_by_value((images - low) / tf.maximum(high - low, 1e-3), 0.0, 1.0)


def preprocess(images, image_size: int, intensity: str = "none"):
    """uint8/uint16/float [0, 1] images -> float32 (..., S, S, 1) in [0, 1], intensity-normalised.

    Takes one (H, W) grayscale image, or (H, W, C) / (N, H, W, C) with C = 1, 3 or 4.
    """
    import tensorflow as tf

    images = tf.convert_to_tensor(images)
    if images.shape.rank == 2:
        images = images[..., tf.newaxis]
    if images.shape.rank not in (3, 4) or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected (H, W), (H, W, C) or (N, H, W, C) with C in 1, 3, 4; got shape {images.shape}")
    images = tf.image.convert_image_dtype(images, tf.float32)
    channels = images.shape[-1]
    if channels == 4:
        images = images[..., :3]
    if channels in (3, 4):
        # ITU-R 601 luma; these weights sum to 1 (tf.image.rgb_to_grayscale's sum to 0.9999), so a gray
        # film stored as RGB gives exactly the values of the same film stored as one channel.
        images = tf.tensordot(images, tf.constant(LUMA_WEIGHTS), axes=[[-1], [0]])[..., tf.newaxis]
    images = tf.image.resize(images, (image_size, image_size), method="bilinear", antialias=True)
    return normalize_intensity(tf.clip_by_value(images, 0.0, 1.0), intensity)


@functools.cache
def _graph(image_size: int, channels: int, dtype: str):
    """:func:`preprocess` of one (H, W, ``channels``) image of ``dtype`` as a TensorFlow graph, any H and W."""
    import tensorflow as tf

    return tf.function(functools.partial(preprocess, image_size=image_size),
                       input_signature=[tf.TensorSpec((None, None, channels), dtype)])


def preprocess_one(image, image_size: int):
    """One image ((H, W) or (H, W, C), uint8/uint16/float) -> float32 (S, S, 1) in [0, 1] (no intensity
    normalisation): :func:`preprocess` run as one graph instead of op by op. Why: eagerly its dozen ops cost a
    served request about 1.7 ms of dispatch on this project's CPUs, as a graph about 0.8 ms, through the same
    kernels, so the result is equal bit for bit (tests/data/test_preprocessing.py; BENCHMARKS.md
    "Inference runtimes"). The training and evaluation pipelines run it as a graph too (``tf.data``)."""
    import tensorflow as tf

    image = tf.convert_to_tensor(image)
    if image.shape.rank == 2:
        image = image[..., tf.newaxis]
    if image.shape.rank != 3 or image.shape[-1] not in (1, 3, 4):
        return preprocess(image, image_size)  # preprocess says what is wrong with the shape
    return _graph(image_size, int(image.shape[-1]), image.dtype.name)(image)
