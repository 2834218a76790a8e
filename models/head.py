"""What every model family shares: the classification head it ends in, and a pretrained backbone's weights
read from a file (or a plain error saying why they cannot be had)."""

from __future__ import annotations

from pathlib import Path

from models.config import ModelConfig
from models.errors import PneumoniaError


class WeightsUnavailableError(PneumoniaError):
    """Pretrained weights were asked for but cannot be had."""


def head(x, config: ModelConfig):
    """Dropout, dense, dropout, and the float32 sigmoid P(PNEUMONIA) on pooled features ``x``."""
    import keras

    x = keras.layers.Dropout(config.dropout, name="head_dropout_1")(x)
    x = keras.layers.Dense(config.dense_units, activation="relu", name="head_dense")(x)
    x = keras.layers.Dropout(config.dropout, name="head_dropout_2")(x)
    # float32 output keeps probabilities and the loss exact under bfloat16/float16 policies.
    return keras.layers.Dense(1, activation="sigmoid", dtype="float32", name="pneumonia_probability")(x)


def load_backbone_weights(backbone, weights: str, what: str) -> None:
    """``model.weights`` as a file path: load it into ``backbone``, or say plainly why not."""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(
            f"model.weights={weights!r} is neither 'imagenet', 'none' nor an existing weights file"
        )
    try:
        backbone.load_weights(str(path))
    except Exception as exc:
        raise WeightsUnavailableError(f"{path} does not hold {what}: {exc}") from exc
