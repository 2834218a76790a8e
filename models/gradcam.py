"""Grad-CAM: where in the film the model looked for pneumonia (Selvaraju et al. 2017).

The map is taken at the feature maps that feed the global pooling (the last conv block of ``cnn``, the
InceptionV3 backbone's output of ``inception``) and returned as a PNG overlay on the input film. An
ensemble's map is the mean of its members' maps.
"""

from __future__ import annotations

import io

import numpy as np


POOL_LAYER = "pool"  # both families end their feature extractor with GlobalAveragePooling2D(name="pool")


def feature_maps(model):
    """The feature maps feeding the global pooling: the last spatial layer of either family.

    Their resolution bounds the map's: InceptionV3's last maps are input/37 (2x2 at 96 px, 8x8 at 299 px).
    """
    return model.get_layer(POOL_LAYER).input


def gradcam(model, image: np.ndarray) -> np.ndarray:
    """Heat map in [0, 1] at the input's size for one preprocessed image (S, S, 1)."""
    import keras
    import tensorflow as tf

    members = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if members and not any(layer.name == POOL_LAYER for layer in model.layers):
        return np.mean([gradcam(member, image) for member in members], axis=0)

    probe = keras.Model(model.inputs, [feature_maps(model), model.output])
    batch = tf.convert_to_tensor(image[np.newaxis].astype(np.float32))
    with tf.GradientTape() as tape:
        features, probability = probe(batch, training=False)
        score = tf.cast(probability[:, 0], tf.float32)
    grads = tf.cast(tape.gradient(score, features), tf.float32)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * tf.cast(features, tf.float32), axis=-1))[0]
    cam = cam / (tf.reduce_max(cam) + 1e-8)
    size = image.shape[:2]
    return tf.image.resize(cam[..., tf.newaxis], size, method="bilinear")[..., 0].numpy().clip(0, 1)


def overlay_png(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> bytes:
    """The film in gray with the heat map in the 'jet' colours on top, as PNG bytes."""
    from matplotlib import colormaps
    from PIL import Image

    gray = np.repeat(image[..., :1], 3, axis=-1)
    colours = colormaps["jet"](heatmap)[..., :3]
    blended = (1 - alpha * heatmap[..., None]) * gray + alpha * heatmap[..., None] * colours
    buffer = io.BytesIO()
    Image.fromarray((blended.clip(0, 1) * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
