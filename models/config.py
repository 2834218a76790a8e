"""Typed configs: dataclasses filled from a small YAML file plus ``key=value`` overrides.

One loader serves every stage (``pneumonia train``, the Tune trainable, serving), so a config
that trained a model can be written into its metadata and read back unchanged.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from models.errors import PneumoniaError

T = TypeVar("T")


class ConfigError(PneumoniaError, ValueError):
    """A config file or override that does not fit its dataclass."""


@dataclasses.dataclass
class DataConfig:
    """Where the images are and how the training pipeline feeds them."""

    path: str = ""  # data dir or .npz; empty = $PNEUMONIA_DATA
    val_fraction: float = 0.15  # carved from train by patient; rounded to 1/k (k folds)
    # grouped: a seeded patient-grouped fold; block: the lowest-numbered patients of each series, next to the
    # test split's block (see models.dataset.block_split)
    validation: Literal["grouped", "block"] = "grouped"
    seed: int = 42
    augment: float = 1.0  # strength of rotation/shift/zoom/brightness/contrast; 0 = off
    # cue-breaking augmentations (models.pipeline.Augmentation), 0 = off: the largest black-level lift, the
    # largest |log gamma|, the largest Gaussian blur sigma in pixels, the noise standard deviation
    augment_black_level: float = 0.0
    augment_gamma: float = 0.0
    augment_blur: float = 0.0
    augment_noise: float = 0.0
    # the share of training films re-encoded as JPEG at a random quality in [70, 100] each epoch: the benign
    # re-encodings a film meets between a PACS and the endpoint should not move the answer (issue 21)
    augment_jpeg: float = 0.0
    # per-film intensity normalisation in the one preprocessing function (models.preprocessing), recorded in
    # the package's input contract: none, percentile (1st-99th percentile stretch) or equalize (histogram)
    intensity: Literal["none", "percentile", "equalize"] = "none"
    class_balance: Literal["class_weight", "oversample", "none"] = "class_weight"
    max_train_images: int = 0  # stratified subset of train for smoke runs; 0 = all
    max_val_images: int = 0  # stratified subset of val for smoke runs; 0 = all

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction <= 0.5:
            raise ConfigError(f"val_fraction must lie in (0, 0.5], got {self.val_fraction}")
        amounts = {name: getattr(self, name) for name in ("augment", "augment_black_level", "augment_gamma",
                                                           "augment_blur", "augment_noise", "augment_jpeg")}
        for name, value in amounts.items():
            if value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value}")
        if self.augment_jpeg > 1:
            raise ConfigError(f"augment_jpeg is a share of films, at most 1, got {self.augment_jpeg}")
        if self.augment_black_level >= 1:
            raise ConfigError(f"augment_black_level must be < 1, got {self.augment_black_level}")
        if self.max_train_images < 0 or self.max_val_images < 0:
            raise ConfigError("max_train_images and max_val_images must be >= 0")


@dataclasses.dataclass
class ModelConfig:
    """One network of either family; fields a family does not use are ignored by it."""

    family: Literal["cnn", "inception", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"] = "cnn"
    image_size: int = 128
    dropout: float = 0.3
    dense_units: int = 128
    # cnn
    depth: int = 4  # conv blocks, each followed by pooling
    base_filters: int = 32
    filter_growth: float = 2.0  # filters of block i = base_filters * filter_growth**i
    convs_per_block: int = 2
    kernel_size: int = 3
    separable: bool = False
    # pretrained families (inception, efficientnet_lite*)
    weights: str = "none"  # "imagenet", "none" or a local weights file path
    # last N blocks of the backbone train (InceptionV3's 11 "mixed" blocks, Lite's 7 stages); -1 = all, 0 = frozen
    trainable_blocks: int = -1
    # both: moving-average momentum of every batch norm. Keras' 0.99 leaves the statistics that validation
    # (inference mode) uses unsettled for a few hundred steps, so early epochs score as constant outputs and
    # ASHA prunes on noise; 0.9 settles within tens of steps.
    bn_momentum: float = 0.9

    def __post_init__(self) -> None:
        minimum = {"inception": 75, "cnn": 16}.get(self.family, 32)  # Lite downsamples 32x
        if self.image_size < minimum:
            raise ConfigError(f"image_size must be >= {minimum} for {self.family}, got {self.image_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.depth < 1 or self.base_filters < 1 or self.convs_per_block < 1 or self.kernel_size < 1:
            raise ConfigError("depth, base_filters, convs_per_block and kernel_size must be >= 1")
        if self.image_size >> self.depth < 1:
            raise ConfigError(f"depth {self.depth} pools a {self.image_size} px image below 1 px")
        if not 0.0 <= self.bn_momentum < 1.0:
            raise ConfigError(f"bn_momentum must lie in [0, 1), got {self.bn_momentum}")
        blocks = {"inception": 11, "cnn": 11}.get(self.family, 7)
        if not -1 <= self.trainable_blocks <= blocks:
            raise ConfigError(f"trainable_blocks must lie in -1..{blocks} for {self.family}, got {self.trainable_blocks}")


OPTIMIZERS = ("adamw", "adam", "sgd")  # TrainConfig.optimizer's values


@dataclasses.dataclass
class TrainConfig:
    """The config of one training run: data, model and optimisation. ``pneumonia train``, every trial of a
    search and evaluation read it; each model package's metadata stores it (``PackageMetadata.config``)."""

    name: str = "cnn"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    epochs: int = 10
    batch_size: int = 32
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    # cosine only: the learning rate rises linearly from 1 % to learning_rate over this many epochs first, so
    # fine-tuning every layer of a pretrained network does not start with its largest steps on a fresh head
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    # > 0: the weights validated, kept and exported are an exponential moving average of the trained ones
    # (Keras' optimizer ``use_ema``; 0.99 averages about the last 100 steps), which moves less between
    # neighbouring inputs than the last step's weights; 0 = off
    ema_momentum: float = 0.0
    mixed_precision: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    threads: int = 0  # TF intra-op threads; 0 = the CPUs this process is given
    seed: int = 42
    output_dir: str = "runs"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch_size must be >= 1")
        if self.learning_rate <= 0 or self.weight_decay < 0:
            raise ConfigError("learning_rate must be > 0 and weight_decay >= 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must lie in [0, 0.5), got {self.label_smoothing}")
        if not 0.0 <= self.ema_momentum < 1.0:
            raise ConfigError(f"ema_momentum must lie in [0, 1), got {self.ema_momentum}")
        if not 0.0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(f"warmup_epochs must lie in [0, epochs={self.epochs}), got {self.warmup_epochs}")
        if self.warmup_epochs and self.lr_schedule != "cosine":
            raise ConfigError("warmup_epochs needs lr_schedule: cosine")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(hint, value, prefix=f"{where}.")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1]
        return origin(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build ``cls`` from a mapping, refusing unknown keys and values of the wrong type."""
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]!s}; known keys here: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from exc


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (values parsed as YAML scalars) to a nested mapping."""
    data = yaml.safe_load(yaml.safe_dump(data)) or {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. model.family=cnn)")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> T:
    """Defaults of ``cls``, then the YAML file (if any), then the overrides."""
    data = read_yaml(path) if path else {}
    try:
        return from_dict(cls, apply_overrides(data, overrides))
    except ConfigError as exc:
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}{exc}") from None
