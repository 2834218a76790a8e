"""The define-by-run search space: Optuna picks a family first, then only that family's parameters.

A trial's parameters are dotted overrides of the base ``TrainConfig`` (``model.depth``, ``learning_rate``...),
so a sampled trial is exactly ``pneumonia train --set ...`` with those values.
"""

from __future__ import annotations

from typing import Any

from models.networks import LITE_FAMILIES
from tuning.config import SearchSpace


def _family_prefix(family: str) -> str:
    """The prefix of a family's own Optuna parameters: ``cnn.``, ``inception.``, ``lite.`` (all Lite sizes)."""
    return "lite" if family in LITE_FAMILIES else family


CUE_AUGMENTATIONS = ("augment_black_level", "augment_gamma", "augment_blur", "augment_noise")


class DefineByRun:
    """``f(optuna_trial) -> dict`` for ``OptunaSearch(space=f)``; a class so the searcher can be pickled
    into the experiment state (what ``--resume`` restores)."""

    def __init__(self, space: SearchSpace):
        self.space = space

    def __call__(self, trial) -> dict[str, Any]:
        space = self.space
        family = trial.suggest_categorical("model.family", list(space.families))
        params: dict[str, Any] = {
            "model.family": family,
            "learning_rate": trial.suggest_float("learning_rate", *space.learning_rate, log=True),
            "batch_size": trial.suggest_categorical("batch_size", list(space.batch_sizes)),
            "optimizer": trial.suggest_categorical("optimizer", list(space.optimizers)),
            "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-3, log=True),
            "model.dropout": trial.suggest_float("model.dropout", 0.0, 0.5),
            "model.dense_units": trial.suggest_categorical("model.dense_units", list(space.dense_units)),
            "label_smoothing": trial.suggest_float("label_smoothing", 0.0, space.label_smoothing),
            "data.augment": trial.suggest_float("data.augment", *space.augment),
            "data.class_balance": trial.suggest_categorical("data.class_balance", ["class_weight", "oversample"]),
            "data.intensity": trial.suggest_categorical("data.intensity", list(space.intensity)),
        }
        for name in CUE_AUGMENTATIONS:  # [0, 0] in the config = off, not searched
            low, high = getattr(space, name)
            params[f"data.{name}"] = trial.suggest_float(f"data.{name}", low, high) if high > low else low
        if family == "cnn":
            params["model.image_size"] = trial.suggest_categorical("cnn.image_size", list(space.cnn_image_sizes))
            params["model.depth"] = trial.suggest_int("model.depth", *space.cnn_depth)
            params["model.base_filters"] = trial.suggest_categorical("model.base_filters", list(space.cnn_base_filters))
            params["model.separable"] = trial.suggest_categorical("model.separable", [False, True])
        elif family == "inception":
            params["model.image_size"] = trial.suggest_categorical(
                "inception.image_size", list(space.inception_image_sizes))
            params["model.trainable_blocks"] = trial.suggest_categorical(
                "model.trainable_blocks", list(space.inception_trainable_blocks))
        else:  # an EfficientNet-Lite: ImageNet weights (space.lite_weights), partly fine-tuned
            params["model.image_size"] = trial.suggest_categorical("lite.image_size", list(space.lite_image_sizes))
            params["model.trainable_blocks"] = trial.suggest_categorical(
                "lite.trainable_blocks", list(space.lite_trainable_blocks))
            params["model.weights"] = space.lite_weights
        return params


def random_space(space: SearchSpace) -> dict[str, Any]:
    """The same space as Tune domains, for the random-search baseline (families sampled uniformly;
    family-specific keys are sampled for every trial and ignored by the other family)."""
    from ray import tune

    return {
        "model.family": tune.choice(list(space.families)),
        "learning_rate": tune.loguniform(*space.learning_rate),
        "batch_size": tune.choice(list(space.batch_sizes)),
        "optimizer": tune.choice(list(space.optimizers)),
        "weight_decay": tune.loguniform(1e-6, 1e-3),
        "model.dropout": tune.uniform(0.0, 0.5),
        "model.dense_units": tune.choice(list(space.dense_units)),
        "label_smoothing": tune.uniform(0.0, space.label_smoothing),
        "data.augment": tune.uniform(*space.augment),
        "data.class_balance": tune.choice(["class_weight", "oversample"]),
        "cnn.image_size": tune.choice(list(space.cnn_image_sizes)),
        "inception.image_size": tune.choice(list(space.inception_image_sizes)),
        "model.depth": tune.randint(space.cnn_depth[0], space.cnn_depth[1] + 1),
        "model.base_filters": tune.choice(list(space.cnn_base_filters)),
        "model.separable": tune.choice([False, True]),
        "model.trainable_blocks": tune.choice(list(space.inception_trainable_blocks)),
        "lite.image_size": tune.choice(list(space.lite_image_sizes)),
        "lite.trainable_blocks": tune.choice(list(space.lite_trainable_blocks)),
        "data.intensity": tune.choice(list(space.intensity)),
        **{f"data.{name}": tune.uniform(*getattr(space, name)) for name in CUE_AUGMENTATIONS},
    }


def to_overrides(params: dict[str, Any], lite_weights: str = "imagenet") -> list[str]:
    """Sampled parameters -> ``key=value`` overrides of TrainConfig (the family picks its own image size and,
    for a Lite, its trainable blocks and weights; the other families' keys are dropped)."""
    params = dict(params)
    family = params.get("model.family", "cnn")
    prefix = _family_prefix(family)
    size = params.pop(f"{prefix}.image_size", None)
    lite_blocks = params.pop("lite.trainable_blocks", None)
    for key in ("cnn.image_size", "inception.image_size", "lite.image_size"):
        params.pop(key, None)
    if size is not None:
        params["model.image_size"] = size
    if prefix == "lite" and lite_blocks is not None:
        params["model.trainable_blocks"] = lite_blocks
        params.setdefault("model.weights", lite_weights)
    return [f"{key}={value}" for key, value in params.items()]
