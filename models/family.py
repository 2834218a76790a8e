"""What a model family declares, in one module of its own (``models/families/``), listed by ``models.registry``.

A family module defines ``FAMILIES``, a list of :class:`Family` (one per ``model.family`` value it builds: the
Lite module declares three sizes). That is everything the rest of the project asks of it: the config checks its
image size and trainable blocks, the search draws its parameters, ``auto`` precision measures it, and Grad-CAM
and the OOD gate find its pooling layer because its builder ends in ``models.head.pool``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class NoSearchSpace:
    """The search section of a family that searches nothing of its own (its size comes from the base config)."""


@dataclasses.dataclass(frozen=True)
class Family:
    """One ``model.family``: how to build it, what it accepts, and its part of the search space.

    ``suggest(optuna_trial, section)`` returns the ``model.*`` values of one Optuna trial (parameter names are
    the family's own and must not change: an old study continues under them); ``domains(section)`` returns the
    same parameters as Ray Tune domains for the random search, each named ``<search_prefix>.<ModelConfig
    field>``. ``section`` is an instance of ``search_space``: the bounds under ``space.<search_prefix>`` in a
    search config.
    """

    name: str
    build: Callable[[Any], Any]  # ModelConfig -> an uncompiled Keras model: (S, S, 1) in [0, 1] -> float32 P(PNEUMONIA)
    min_image_size: int
    blocks: int  # the largest model.trainable_blocks (-1 = all, 0 = frozen)
    search_prefix: str = ""  # default: the name; sizes of one architecture share one (all Lite sizes: "lite")
    search_space: type = NoSearchSpace
    suggest: Callable[[Any, Any], dict[str, Any]] = lambda trial, section: {}
    domains: Callable[[Any], dict[str, Any]] = lambda section: {}
    # ModelConfig fields, besides the image size and trainable blocks, that decide which precision trains it faster
    precision_fields: tuple[str, ...] = ()

    @property
    def prefix(self) -> str:
        return self.search_prefix or self.name
