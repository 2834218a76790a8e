"""The data section of a training config: where the films are and how the training pipeline feeds them."""

from __future__ import annotations

import dataclasses
from typing import Literal

from runtime.config import ConfigError


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
