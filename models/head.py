"""What every model family shares: the pooling layer its feature extractor ends in, the classification head
on it, and a pretrained backbone's weights read from a file (or a plain error saying why they cannot be had)."""

from __future__ import annotations

from pathlib import Path

from runtime.errors import PneumoniaError

# Every family pools its last feature maps with :func:`pool`: Grad-CAM (models.gradcam) takes the maps going in,
# the OOD gate (models.ood) the pooled embedding coming out, both by this name.
POOL_LAYER = "pool"


class WeightsUnavailableError(PneumoniaError):
    """Pretrained weights were asked for but cannot be had."""


def pool(features):
    """Global average pooling of a family's last feature maps, under the name Grad-CAM and the OOD gate look for."""
    import keras

    return keras.layers.GlobalAveragePooling2D(name=POOL_LAYER)(features)


def head(x, config):
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
