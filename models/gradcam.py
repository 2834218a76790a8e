"""Grad-CAM: where in the film the model looked for pneumonia (Selvaraju et al. 2017).

The map is taken at the feature maps that feed the global pooling (the last conv block of ``cnn``, the
backbone's output of the pretrained families) and returned as an array in [0, 1]; drawing it over the film
is serving's job (``serving.overlay``). An ensemble's map is the mean of its members' maps.
"""

from __future__ import annotations

import numpy as np

from models.head import POOL_LAYER


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
