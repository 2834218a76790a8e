"""The model families: one module each, listed here; ``build_model(config)`` builds any of them.

Adding a family is writing its module (``models.family`` says what it declares) and adding it to
``FAMILY_MODULES``. A family kept outside this project is named in ``$PNEUMONIA_FAMILY_MODULES``
(comma-separated module paths); a local Ray's workers inherit the variable, a cluster's get it through the job's
``runtime_env`` ``env_vars``.
"""

from __future__ import annotations

import importlib
import os
from functools import lru_cache
from typing import TYPE_CHECKING

from models.family import Family
from runtime.config import ConfigError

if TYPE_CHECKING:
    from runtime.precision import Workload

FAMILY_MODULES = (
    "models.families.cnn",
    "models.families.inception",
    "models.families.efficientnet_lite",
)
EXTRA_MODULES_ENV = "PNEUMONIA_FAMILY_MODULES"


@lru_cache(maxsize=8)
def _families(extra: str) -> dict[str, Family]:
    found: dict[str, Family] = {}
    for path in (*FAMILY_MODULES, *(m.strip() for m in extra.split(",") if m.strip())):
        try:
            module = importlib.import_module(path)
        except ImportError as exc:
            raise ConfigError(f"model family module {path} cannot be imported ({exc}); check "
                              f"{EXTRA_MODULES_ENV}") from exc
        for family in getattr(module, "FAMILIES", []):
            found[family.name] = family
    return found


def families() -> dict[str, Family]:
    """Every family by name: this project's and those ``$PNEUMONIA_FAMILY_MODULES`` names."""
    return _families(os.environ.get(EXTRA_MODULES_ENV, ""))


def family(name: str) -> Family:
    known = families()
    if name not in known:
        raise ConfigError(f"unknown model family {name!r}; known: {', '.join(known)}")
    return known[name]


def build_model(config):
    """One uncompiled Keras model of ``config.family`` (a ``models.config.ModelConfig``)."""
    return family(config.family).build(config)


def precision_workload(config) -> Workload:
    """What ``mixed_precision: auto`` times for this network (``runtime.precision``)."""
    from runtime.precision import Workload

    chosen = family(config.family)
    key = {"family": config.family, "image_size": config.image_size, "trainable_blocks": config.trainable_blocks,
           **{name: getattr(config, name) for name in chosen.precision_fields}}
    return Workload(key, config.image_size, lambda: chosen.build(config), f"{config.family} at {config.image_size} px")
