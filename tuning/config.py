"""The config of one training run: data, model and optimisation, as one typed, YAML-loadable object."""

from __future__ import annotations

import dataclasses
from typing import Literal

from models.config import DataConfig, ModelConfig


@dataclasses.dataclass
class TrainConfig:
    name: str = "cnn"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    epochs: int = 10
    batch_size: int = 32
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    label_smoothing: float = 0.0
    mixed_precision: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    threads: int = 0  # TF intra-op threads; 0 = the CPUs this process is given
    seed: int = 42
    output_dir: str = "runs"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if self.learning_rate <= 0 or self.weight_decay < 0:
            raise ValueError("learning_rate must be > 0 and weight_decay >= 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5), got {self.label_smoothing}")
