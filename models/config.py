"""The configs of a network and of one training run (``ModelConfig``, ``TrainConfig``), loaded by
``runtime.config.load_config`` from YAML plus overrides; each model package's metadata stores the training one."""

from __future__ import annotations

import dataclasses
from typing import Literal

from data.config import DataConfig
from models.registry import family
from runtime.config import ConfigError


@dataclasses.dataclass
class ModelConfig:
    """One network of any family; fields a family does not use are ignored by it."""

    family: str = "cnn"  # a family of models.registry: cnn, inception, efficientnet_lite0/1/2
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
    # last N blocks of the backbone train (InceptionV3's 11 "mixed" blocks, Lite's 7 stages: the family's
    # ``blocks``); -1 = all, 0 = frozen
    trainable_blocks: int = -1
    # both: moving-average momentum of every batch norm. Keras' 0.99 leaves the statistics that validation
    # (inference mode) uses unsettled for a few hundred steps, so early epochs score as constant outputs and
    # ASHA prunes on noise; 0.9 settles within tens of steps.
    bn_momentum: float = 0.9

    def __post_init__(self) -> None:
        declared = family(self.family)  # its own bounds (models/families/)
        minimum, blocks = declared.min_image_size, declared.blocks
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
