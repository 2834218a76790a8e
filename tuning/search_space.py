"""The define-by-run search space: Optuna picks a family first, then only that family's parameters.

A trial's parameters are dotted overrides of the base ``TrainConfig`` (``model.depth``, ``learning_rate``...),
so a sampled trial is exactly ``pneumonia train --set ...`` with those values.
"""

from __future__ import annotations

from typing import Any

from models.registry import families, family
from tuning.config import SearchSpace

CUE_AUGMENTATIONS = ("augment_black_level", "augment_gamma", "augment_blur", "augment_noise")


class DefineByRun:
    """``f(optuna_trial) -> dict`` for ``OptunaSearch(space=f)``; a class so the searcher can be pickled
    into the experiment state (what ``--resume`` restores)."""

    def __init__(self, space: SearchSpace):
        self.space = space

    def __call__(self, trial) -> dict[str, Any]:
        space = self.space
        name = trial.suggest_categorical("model.family", list(space.families))
        params: dict[str, Any] = {
            "model.family": name,
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
        for cue in CUE_AUGMENTATIONS:  # [0, 0] in the config = off, not searched
            low, high = getattr(space, cue)
            params[f"data.{cue}"] = trial.suggest_float(f"data.{cue}", low, high) if high > low else low
        return {**params, **family(name).suggest(trial, space.section(name))}  # the family's own: models/families/


def random_space(space: SearchSpace) -> dict[str, Any]:
    """The same space as Tune domains, for the random-search baseline (families sampled uniformly; each
    family's own keys, ``<its prefix>.<field>``, are sampled for every trial and used by that family alone)."""
    from ray import tune

    shared = {
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
        "data.intensity": tune.choice(list(space.intensity)),
        **{f"data.{cue}": tune.uniform(*getattr(space, cue)) for cue in CUE_AUGMENTATIONS},
    }
    own = {}
    for name in space.families:
        own.update(family(name).domains(space.section(name)))
    return {**shared, **own}


def to_overrides(params: dict[str, Any]) -> list[str]:
    """Sampled parameters -> ``key=value`` overrides of TrainConfig: the trial's family's own keys
    (``lite.image_size``) become ``model.`` keys (``model.image_size``), other families' are dropped."""
    prefixes = {declared.prefix for declared in families().values()}
    chosen = family(params.get("model.family", "cnn")).prefix
    overrides = []
    for key, value in params.items():
        prefix, _, field = key.partition(".")
        if prefix in prefixes:
            if prefix != chosen:
                continue
            key = f"model.{field}"
        overrides.append(f"{key}={value}")
    return overrides
