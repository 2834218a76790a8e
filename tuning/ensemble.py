"""An ensemble of a search's best trials: one Keras model whose output is the mean of their P(PNEUMONIA).

Why: the leading trials of a search all reach a validation AUC near 1 on a split carved from train, so
picking the single best among them is close to a coin toss, while each one makes its own mistakes on films
unlike the training ones. Averaging a few is the standard way to gain robustness without looking at test.
Members are the best trials by validation AUC that share the best trial's input size, so the one
preprocessing function feeds them all; the result is an ordinary model directory that evaluation, export
and serving take as they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Member:
    trial_id: str
    family: str
    image_size: int
    val_auc: float
    checkpoint: str


def top_members(experiment: str, size: int) -> list[Member]:
    """The ``size`` best trials of ``experiment`` (local dir or storage URI) by their best validation AUC,
    each with its best checkpoint, among those taking the best trial's input size."""
    from ray.tune import ExperimentAnalysis

    from models.download import default_cache_dir
    from models.package import read_metadata
    from tuning.run import METRIC, MODE, is_remote  # what the search ranked its trials by

    analysis = ExperimentAnalysis(experiment, default_metric=METRIC, default_mode=MODE)
    ranked = []
    for trial in analysis.trials:
        best_auc = trial.metric_analysis.get(METRIC, {}).get(MODE)
        checkpoint = analysis.get_best_checkpoint(trial) if best_auc is not None else None
        if checkpoint is None:
            continue
        path = checkpoint.path
        if is_remote(experiment):
            path = checkpoint.to_directory(str(default_cache_dir() / "checkpoints" / trial.trial_id / Path(path).name))
        model_config = read_metadata(path)["config"]["model"]
        ranked.append(Member(trial.trial_id, model_config["family"], int(model_config["image_size"]),
                             float(best_auc), str(path)))
    ranked.sort(key=lambda member: member.val_auc, reverse=True)
    if not ranked:
        raise ValueError(f"no trial of {experiment} reported a checkpoint with {METRIC}")
    return [m for m in ranked if m.image_size == ranked[0].image_size][:size]


def build_ensemble(members: list[Member], directory: str | Path) -> Path:
    """Write a model directory whose model averages the members' outputs; its metadata is the best
    member's (class names, input, config) plus the member list."""
    import keras

    from models.package import load_model_dir, save_model_dir

    models, metadata = [], None
    for i, member in enumerate(members):
        model, member_metadata = load_model_dir(member.checkpoint)
        model.name = f"member{i}_{member.family}_{member.trial_id}"  # nested layer names must be unique
        models.append(model)
        metadata = metadata or member_metadata
    size = members[0].image_size
    image = keras.Input((size, size, 1), name="image")
    mean = keras.layers.Average(name="pneumonia_probability", dtype="float32")([m(image) for m in models])
    ensemble = keras.Model(image, mean, name="ensemble")
    metadata = {**metadata, "ensemble": [dataclasses.asdict(m) for m in members]}
    for key in ("best_epoch", "validation", "history", "runtime"):  # the best member's own, not the ensemble's
        metadata.pop(key, None)
    return save_model_dir(ensemble, metadata, directory)


def ensemble_from_experiment(experiment: str, best_json: Path, size: int,
                             log: Callable[[str], None] = print) -> tuple[Path, list[Member]]:
    """Build the top-``size`` ensemble of a finished search beside its ``best.json`` (a few seconds; rebuilt
    each time, so it always matches the trials and the code)."""
    members = top_members(experiment, size)
    directory = build_ensemble(members, best_json.parent / f"ensemble-top{size}-{members[0].trial_id}")
    log(f"ensemble of {len(members)} trial(s) at {members[0].image_size} px: "
        + ", ".join(f"{m.trial_id} ({m.family}, val AUC {m.val_auc:.4f})" for m in members))
    return directory, members
