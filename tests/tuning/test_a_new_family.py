"""A model family is one module: this test module is one (``FAMILIES`` below), registered for the commands it runs
through ``$PNEUMONIA_FAMILY_MODULES`` alone, with no file of the project touched. ``pneumonia train`` builds and
trains it; a one-trial search draws its own search section, ``space.toy``."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.family import Family
from models.head import head, pool

REPO = Path(__file__).resolve().parents[2]


def build_toy(config):
    import keras

    inputs = keras.Input((config.image_size, config.image_size, 1), name="image")
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="toy_conv")(inputs)
    return keras.Model(inputs, head(pool(x), config), name="toy")


@dataclasses.dataclass(frozen=True)
class ToySpace:
    image_sizes: list[int] = dataclasses.field(default_factory=lambda: [24, 32])


def suggest(trial, space: ToySpace) -> dict:
    return {"model.image_size": trial.suggest_categorical("toy.image_size", list(space.image_sizes))}


FAMILIES = [Family("toy", build_toy, min_image_size=8, blocks=0, search_space=ToySpace, suggest=suggest)]


def _env() -> dict:
    return {**os.environ, "PNEUMONIA_FAMILY_MODULES": __name__, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}


def _run(args: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


SMALL = ["data.max_train_images=64", "data.max_val_images=32", "mixed_precision=float32", "batch_size=16"]


def test_pneumonia_train_builds_and_trains_a_family_declared_outside_the_project(mendeley_dir, tmp_path):
    out = tmp_path / "toy"
    sets = [arg for item in ["model.family=toy", "model.image_size=24", "epochs=1", *SMALL] for arg in ("--set", item)]
    _run(["-m", "cli.main", "train", "--data", str(mendeley_dir), "--output", str(out), *sets])
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["config"]["model"]["family"] == "toy" and metadata["input"]["image_size"] == 24


@pytest.mark.slow
def test_a_one_trial_search_draws_the_new_familys_own_section(search_data, tmp_path):
    sets = ["num_samples=1", "max_concurrent=1", "cpus_per_trial=1", "unique_name=false", "name=toy",
            f"storage_path={tmp_path}", "space.families=[toy]", "points_to_evaluate=[]", "space.toy.image_sizes=[32]",
            "space.batch_sizes=[16]", "train.epochs=1", "grace_period=1", *[f"train.{item}" for item in SMALL]]
    _run(["-m", "tuning.search", "--data", search_data, *[arg for item in sets for arg in ("--set", item)]])
    best = json.loads((tmp_path / "toy" / "best.json").read_text())
    assert best["family"] == "toy" and best["config"]["model"]["image_size"] == 32
