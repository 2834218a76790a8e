"""``inception``: Keras' InceptionV3 backbone with the project's head; gray is repeated to RGB inside the model."""

from __future__ import annotations

import dataclasses

from models.family import Family
from models.head import WeightsUnavailableError, head, load_backbone_weights, pool

BLOCKS = 11  # InceptionV3's "mixed0" .. "mixed10"
MIN_IMAGE_SIZE = 75  # Keras' InceptionV3 refuses smaller inputs


def _backbone(config):
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
    if trainable_blocks < 0 or trainable_blocks >= BLOCKS:
        return
    if trainable_blocks == 0:
        backbone.trainable = False
        return
    last_frozen = f"mixed{BLOCKS - 1 - trainable_blocks}"
    frozen = True
    for layer in backbone.layers:
        layer.trainable = not frozen
        if layer.name == last_frozen:
            frozen = False


def build_inception(config):
    import keras

    inputs = keras.Input((config.image_size, config.image_size, 1), name="image")
    rgb = keras.layers.Concatenate(name="gray_to_rgb")([inputs, inputs, inputs])
    scaled = keras.layers.Rescaling(2.0, offset=-1.0, name="to_inception_range")(rgb)  # [0, 1] -> [-1, 1]
    backbone = _backbone(config)
    for layer in backbone.layers:  # keras.applications builds them with the 0.99 default
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = config.bn_momentum
    _freeze_blocks(backbone, config.trainable_blocks)
    features = backbone(scaled)  # the last feature maps stay visible for Grad-CAM
    return keras.Model(inputs, head(pool(features), config), name="inception")


@dataclasses.dataclass(frozen=True)
class InceptionSpace:
    """``space.inception``: the sizes and trainable mixed blocks a search draws from."""

    image_sizes: list[int] = dataclasses.field(default_factory=lambda: [75, 96, 128])
    trainable_blocks: list[int] = dataclasses.field(default_factory=lambda: [-1, 2, 4, 8])

    def __post_init__(self) -> None:
        if min(self.image_sizes) < MIN_IMAGE_SIZE:
            raise ValueError(f"image_sizes must all be >= {MIN_IMAGE_SIZE}, got {self.image_sizes}")


def suggest(trial, space: InceptionSpace) -> dict:
    return {"model.image_size": trial.suggest_categorical("inception.image_size", list(space.image_sizes)),
            "model.trainable_blocks": trial.suggest_categorical("model.trainable_blocks", list(space.trainable_blocks))}


def domains(space: InceptionSpace) -> dict:
    from ray import tune

    return {"inception.image_size": tune.choice(list(space.image_sizes)),
            "inception.trainable_blocks": tune.choice(list(space.trainable_blocks))}


FAMILIES = [Family("inception", build_inception, min_image_size=MIN_IMAGE_SIZE, blocks=BLOCKS,
                   search_space=InceptionSpace, suggest=suggest, domains=domains)]
