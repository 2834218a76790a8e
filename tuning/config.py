"""The config of a search: the search space and the tuning experiment (a trial's own config is
``models.config.TrainConfig``), and where the shipped YAML configs lie."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from data.preprocessing import INTENSITY_METHODS
from models.config import OPTIMIZERS, TrainConfig
from models.registry import families, family
from runtime.config import ConfigError

CONFIG_DIR = Path(__file__).parent / "configs"  # the YAML configs shipped with the package
DEFAULT_CONFIG = CONFIG_DIR / "quick.yaml"  # what `pneumonia run` and `pneumonia tune` search without --config


@dataclasses.dataclass
class CommonSearchSpace:
    """Bounds every family shares (the define-by-run space: tuning/search_space.py)."""

    families: list[str] = dataclasses.field(default_factory=lambda: ["cnn", "inception"])
    batch_sizes: list[int] = dataclasses.field(default_factory=lambda: [16, 32, 64])
    optimizers: list[str] = dataclasses.field(default_factory=lambda: ["adamw", "adam", "sgd"])
    learning_rate: list[float] = dataclasses.field(default_factory=lambda: [1e-4, 3e-3])  # log-uniform
    intensity: list[str] = dataclasses.field(default_factory=lambda: ["none"])  # data.intensity choices
    # [low, high] of each cue-breaking augmentation (data.pipeline.Augmentation); [0, 0] = off
    augment_black_level: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.0])
    augment_gamma: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.0])
    augment_blur: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.0])
    augment_noise: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.0])
    dense_units: list[int] = dataclasses.field(default_factory=lambda: [64, 128, 256])
    label_smoothing: float = 0.1  # upper bound; softer targets temper over-confidence on shifted data
    # data.augment range: a floor above 0 keeps a search from ranking an unaugmented model first on a
    # validation split that, carved from train, cannot show how the model copes with shifted films
    augment: list[float] = dataclasses.field(default_factory=lambda: [0.0, 1.5])

    def __post_init__(self) -> None:
        known = families()
        unknown = set(self.families) - set(known)
        if not self.families or unknown:
            raise ConfigError(f"families must be a non-empty subset of {', '.join(known)}; got {self.families}")
        if not self.optimizers or set(self.optimizers) - set(OPTIMIZERS):
            raise ConfigError(f"optimizers must be a non-empty subset of {', '.join(OPTIMIZERS)}; got {self.optimizers}")
        ranges = ("learning_rate", "augment", "augment_black_level", "augment_gamma", "augment_blur", "augment_noise")
        for name in ranges:
            value = getattr(self, name)
            if len(value) != 2 or value[0] > value[1]:
                raise ConfigError(f"{name} must be a [low, high] range, got {value}")
        bad = set(self.intensity) - set(INTENSITY_METHODS)
        if not self.intensity or bad:
            raise ConfigError(f"intensity must be a non-empty subset of {', '.join(INTENSITY_METHODS)}; got {self.intensity}")
        if not 0.0 <= self.augment[0] <= self.augment[1]:
            raise ConfigError(f"augment must be [low, high] with 0 <= low <= high, got {self.augment}")

    def section(self, family_name: str):
        """The bounds of ``family_name``'s own parameters: ``space.<its search prefix>``, else its defaults."""
        chosen = family(family_name)
        return getattr(self, chosen.prefix, None) or chosen.search_space()


def _search_space_class() -> type:
    """``SearchSpace``: the shared bounds plus one section per family prefix (``space.cnn``, ``space.lite``...),
    each the dataclass its family module declares, so a new family's bounds need no field here."""
    sections = {}
    for declared in families().values():
        sections.setdefault(declared.prefix, declared.search_space)
    fields = [(prefix, cls, dataclasses.field(default_factory=cls)) for prefix, cls in sections.items()]
    space = dataclasses.make_dataclass("SearchSpace", fields, bases=(CommonSearchSpace,))
    space.__module__ = __name__  # pickled by reference: a search's state (--resume) finds it here
    return space


SearchSpace = _search_space_class()


@dataclasses.dataclass
class SamplerConfig:
    """Optuna's sampler when ``searcher: optuna``: TPE or a Gaussian process (``gp``, needs PyTorch), and the
    settings ``benchmarks/search_strategies.py`` compares. TPE's defaults are Optuna 5's: multivariate,
    ``constant_liar`` (a running trial counts as a bad result, so parallel trials spread out), 10 random
    start-up trials; ``group`` models each family's own parameters together. On the proxy search (32 trials x 3
    seeds, BENCHMARKS.md "Samplers") every TPE search ended above every random one, and neither fewer start-up
    trials with ``group`` nor ``gp`` did better than these defaults."""

    kind: Literal["tpe", "gp"] = "tpe"
    n_startup_trials: int = 10  # random trials (seeded points_to_evaluate count) before the model proposes
    multivariate: bool = True
    group: bool = False
    constant_liar: bool = True

    def __post_init__(self) -> None:
        if self.n_startup_trials < 0:
            raise ConfigError(f"sampler.n_startup_trials must be >= 0, got {self.n_startup_trials}")
        if self.group and not self.multivariate:
            raise ConfigError("sampler.group needs sampler.multivariate: true")


@dataclasses.dataclass
class TuneConfig:
    """A tuning experiment: ``python -m tuning.search --config tuning/configs/quick.yaml``."""

    name: str = "pneumonia"
    # a run without --resume gets its own experiment and Optuna study, NAME-<UTC time>; false = exactly NAME
    unique_name: bool = True
    study_name: str = ""  # an earlier experiment's name to continue its Optuna study; empty = a fresh study
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)  # every trial starts from this
    space: SearchSpace = dataclasses.field(default_factory=SearchSpace)
    searcher: Literal["optuna", "random"] = "optuna"
    sampler: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)
    scheduler: Literal["asha", "fifo"] = "asha"
    num_samples: int = 8
    max_concurrent: int = 2
    time_budget_s: float = 0.0  # 0 = no limit
    grace_period: int = 1  # epochs every trial gets before ASHA may stop it
    reduction_factor: int = 2
    seed: int = 0
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    storage_path: str = "~/ray_results"  # local dir, NFS path, s3://... or gs://...
    shared_storage: bool = False  # set when a local-looking storage_path is shared by every node (NFS)
    study_storage: str = ""  # Optuna RDB URL; empty = sqlite file beside the experiment (local storage)
    points_to_evaluate: list[dict] = dataclasses.field(default_factory=list)
    checkpoint_every: int = 0  # also checkpoint every N epochs (besides every val AUC improvement)
    num_to_keep: int = 2
    max_failures: int = 2
    ensemble: int = 1  # what `pneumonia run` evaluates and serves: the mean of the N best trials; 1 = the best alone
    # the operating point `pneumonia run` evaluates at, chosen on validation: target_sensitivity > 0 takes the
    # highest threshold keeping validation sensitivity >= it (`evaluate --target-sensitivity`), else threshold_rule
    threshold_rule: Literal["plateau", "youden"] = "plateau"
    target_sensitivity: float = 0.0
    stability_films: int = 0  # > 0: the evaluation's stability and borderline band on a fixed sample per split
    # > 0: no search. ``train`` is trained once per seed (train.seed, train.seed + 1, ...), no trial stopped early,
    # and ``ensemble: N`` averages N of them: a seed ensemble of one configuration (space and searcher unused)
    seeds: int = 0
    # > 0: every trial stops after this many epochs of ``train.epochs``' schedule (a checkpoint chosen at an
    # epoch of a longer cosine schedule is trained again exactly so); 0 = train.epochs
    stop_after_epochs: int = 0

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.max_concurrent < 1:
            raise ConfigError("num_samples and max_concurrent must be >= 1")
        if self.grace_period < 1 or self.grace_period > self.train.epochs:
            raise ConfigError(f"grace_period must lie in 1..train.epochs ({self.train.epochs})")
        if self.ensemble < 1:
            raise ConfigError(f"ensemble must be >= 1, got {self.ensemble}")
        if self.reduction_factor < 2:
            raise ConfigError("reduction_factor must be >= 2")
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0:
            raise ConfigError("cpus_per_trial must be > 0 and gpus_per_trial >= 0")
        if not 0.0 <= self.target_sensitivity <= 1.0:
            raise ConfigError(f"target_sensitivity must lie in [0, 1] (0 = threshold_rule), got {self.target_sensitivity}")
        if self.seeds < 0 or not 0 <= self.stop_after_epochs <= self.train.epochs:
            raise ConfigError(f"seeds must be >= 0 and stop_after_epochs in 0..train.epochs ({self.train.epochs}), "
                              f"got {self.seeds} and {self.stop_after_epochs}")
        if self.seeds and self.ensemble > self.seeds:
            raise ConfigError(f"ensemble ({self.ensemble}) cannot exceed seeds ({self.seeds})")

    @property
    def uses_optuna(self) -> bool:
        """Whether the experiment has an Optuna study (a seed ensemble and a random search have none)."""
        return self.searcher == "optuna" and not self.seeds

    @property
    def trials(self) -> int:
        """How many trials the experiment runs: one per seed, or ``num_samples``."""
        return self.seeds or self.num_samples

    @property
    def epochs_run(self) -> int:
        """The epochs each trial trains at most."""
        return self.stop_after_epochs or self.train.epochs
