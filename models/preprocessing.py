"""The one preprocessing function: image -> grayscale float32 in [0, 1] at the model's size.

Training (tf.data), evaluation and serving all call :func:`preprocess` (and :func:`decode_image`
for encoded bytes), so a served prediction sees exactly the pixels an evaluated one saw.
"""

from __future__ import annotations

import dataclasses

LUMA_WEIGHTS = (0.299, 0.587, 0.114)


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


def decode_image(data):
    """Encoded JPEG/PNG/BMP/GIF bytes (a scalar string tensor) -> float32 (H, W, 3) in [0, 1].

    Always 3 channels (gray is repeated, alpha dropped), so every file takes the same path.
    """
    import tensorflow as tf

    image = tf.io.decode_image(data, channels=3, dtype=tf.float32, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def preprocess(images, image_size: int):
    """uint8/uint16/float [0, 1] images -> float32 (..., S, S, 1) in [0, 1].

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
    return tf.clip_by_value(images, 0.0, 1.0)
