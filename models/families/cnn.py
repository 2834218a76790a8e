"""``cnn``: the custom deep CNN, ``depth`` blocks of (conv, batch norm, ReLU) x ``convs_per_block`` + max pooling."""

from __future__ import annotations

import dataclasses

from models.family import Family
from models.head import head, pool


def build_cnn(config):
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
    return keras.Model(inputs, head(pool(x), config), name="cnn")


@dataclasses.dataclass(frozen=True)
class CnnSpace:
    """``space.cnn``: the sizes, [low, high] depth and first-block filters a search draws from."""

    image_sizes: list[int] = dataclasses.field(default_factory=lambda: [64, 96, 128])
    depth: list[int] = dataclasses.field(default_factory=lambda: [3, 6])
    base_filters: list[int] = dataclasses.field(default_factory=lambda: [8, 16, 32])

    def __post_init__(self) -> None:
        if len(self.depth) != 2 or not 1 <= self.depth[0] <= self.depth[1]:
            raise ValueError(f"depth must be a [low, high] range of at least 1, got {self.depth}")


def suggest(trial, space: CnnSpace) -> dict:
    return {"model.image_size": trial.suggest_categorical("cnn.image_size", list(space.image_sizes)),
            "model.depth": trial.suggest_int("model.depth", *space.depth),
            "model.base_filters": trial.suggest_categorical("model.base_filters", list(space.base_filters)),
            "model.separable": trial.suggest_categorical("model.separable", [False, True])}


def domains(space: CnnSpace) -> dict:
    from ray import tune

    return {"cnn.image_size": tune.choice(list(space.image_sizes)),
            "cnn.depth": tune.randint(space.depth[0], space.depth[1] + 1),
            "cnn.base_filters": tune.choice(list(space.base_filters)), "cnn.separable": tune.choice([False, True])}


FAMILIES = [Family("cnn", build_cnn, min_image_size=16, blocks=11, search_space=CnnSpace, suggest=suggest,
                   domains=domains, precision_fields=("separable",))]
