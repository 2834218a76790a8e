"""An ensemble of a search's best trials: one Keras model whose output is the mean of their P(PNEUMONIA).

Why: the leading trials of a search all reach a validation AUC near 1 on a split carved from train, so
picking the single best among them is close to a coin toss, while each one makes its own mistakes on films
unlike the training ones. Averaging a few is the standard way to gain robustness without looking at test.
Members are the best trials by validation AUC that share the best trial's input contract (size and
intensity normalisation), so the one preprocessing function feeds them all; the result is an ordinary model
directory that evaluation, export and serving take as they are. :func:`resolve_experiment` is what a finished
search hands on: its best trial's checkpoint, or this ensemble, with where it came from.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from models.package import METRIC, MODE, EnsembleMember, load_model_dir, read_metadata, save_model_dir
from runtime.paths import default_cache_dir, display_path
from runtime.tensorflow_setup import configure_tensorflow
from tuning.experiment import SearchError, is_remote


def top_members(experiment: str, size: int) -> list[EnsembleMember]:
    """The ``size`` best trials of ``experiment`` (local dir or storage URI) by their best validation AUC,
    each with its best checkpoint, among those taking the best trial's input (size and intensity normalisation)."""
    from ray.tune import ExperimentAnalysis

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
        metadata = read_metadata(path)
        ranked.append((EnsembleMember(trial.trial_id, metadata.config["model"]["family"], metadata.image_size,
                                      float(best_auc), str(path)), metadata.input))
    ranked.sort(key=lambda pair: pair[0].val_auc, reverse=True)
    if not ranked:
        raise SearchError(f"no trial of {experiment} reported a checkpoint with {METRIC}")
    best_input = ranked[0][1]  # one preprocessing (size, intensity normalisation) feeds every member
    return [member for member, contract in ranked if contract == best_input][:size]


def build_ensemble(members: list[EnsembleMember], directory: str | Path) -> Path:
    """Write a model directory whose model averages the members' outputs; its metadata is the best
    member's (class names, input, config) plus the member list."""
    configure_tensorflow(0, "float32")  # before Keras: TensorFlow's start-up quiet, threads set once
    import keras

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
    # the best member's class names, input and config; its own epoch, metrics and runtime are not the ensemble's
    metadata = metadata.replace(ensemble=list(members), best_epoch=None, validation={}, history=[], runtime={})
    return save_model_dir(ensemble, metadata, directory)


def ensemble_from_experiment(experiment: str, best_json: Path, size: int,
                             log: Callable[[str], None] = print) -> tuple[Path, list[EnsembleMember]]:
    """Build the top-``size`` ensemble of a finished search beside its ``best.json`` (a few seconds; rebuilt
    each time, so it always matches the trials and the code)."""
    members = top_members(experiment, size)
    directory = build_ensemble(members, best_json.parent / f"ensemble-top{size}-{members[0].trial_id}")
    log(f"ensemble of {len(members)} trial(s) at {members[0].image_size} px: "
        + ", ".join(f"{m.trial_id} ({m.family}, val AUC {m.val_auc:.4f})" for m in members))
    return directory, members


def resolve_experiment(experiment: str, ensemble: int = 1,
                       log: Callable[[str], None] = print) -> tuple[Path, dict]:
    """The model directory a finished search hands on to evaluation, and where it came from (``produced_by``
    in the report and package): its best trial's checkpoint (``best.json``), or for ``ensemble`` > 1 the
    ensemble of its best trials."""
    if ensemble < 1:
        raise SearchError(f"ensemble must be >= 1, got {ensemble}")
    best_path = Path(experiment) / "best.json"
    if not best_path.is_file():
        raise SearchError(f"{best_path} not found: is {experiment} a finished tuning experiment?")
    best = json.loads(best_path.read_text())
    produced_by = {
        "kind": "tuning experiment",
        "experiment": display_path(experiment),
        "trial_id": best.get("trial_id"),
        "validation": best.get("metrics"),
    }
    if ensemble == 1:
        return Path(best["checkpoint_path"]), produced_by
    # A remote experiment's best.json sits in a local cache dir; its trials are read from storage.
    source = best["experiment"] if is_remote(best.get("experiment", "")) else str(experiment)
    directory, members = ensemble_from_experiment(source, best_path, ensemble, log)
    shown = [{**dataclasses.asdict(m), "checkpoint": display_path(m.checkpoint)} for m in members]
    return directory, {**produced_by, "ensemble": shown}
