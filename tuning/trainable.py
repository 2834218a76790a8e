"""The Tune function trainable: the training loop of ``pneumonia train`` for one sampled configuration.

Each epoch reports train and validation metrics with ``ray.tune.report``; a checkpoint (a model directory
with optimizer state, plus the epoch counter) goes with the report when validation AUC improves or every
``checkpoint_every`` epochs, so a trial restarted after a lost node resumes where it was.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from models.config import TrainConfig
from models.package import METRIC, load_model_dir, save_model_dir
from models.registry import precision_workload
from runtime.config import apply_overrides, from_dict
from runtime.tensorflow_setup import configure_tensorflow
from tuning.experiment import BEST_SO_FAR
from tuning.search_space import to_overrides
from tuning.train import FitResult, fit, load_data, model_metadata, trained_weights_in_model

STATE_FILE = "trainer_state.json"
TRIAL_LOG = "trial.log"
REPORTED = ("loss", "accuracy", "val_loss", "val_accuracy", METRIC, "val_sensitivity", "val_specificity",
            "images_per_sec", "train_seconds")


def trial_config(base: dict, params: dict[str, Any]):
    """The base TrainConfig with a trial's sampled parameters applied."""
    return from_dict(TrainConfig, apply_overrides(base, to_overrides(params)))


def _trial_cpus() -> int:
    from ray import tune

    resources = tune.get_context().get_trial_resources()
    cpus = sum(bundle.get("CPU", 0) for bundle in resources.bundles) if resources else 0
    return max(1, int(cpus))


@dataclasses.dataclass
class TrialState:
    """What a checkpoint carries besides the model: where the trial was, so a restart counts on."""

    epoch: int = 0
    best_auc: float = float("-inf")
    history: list[dict] = dataclasses.field(default_factory=list)


def restore_checkpoint(checkpoint):
    """(model with its optimizer state, TrialState) from a checkpoint this trainable reported."""
    with checkpoint.as_directory() as directory:
        state = TrialState(**json.loads((Path(directory) / STATE_FILE).read_text()))
        model, _ = load_model_dir(directory, compile=True)
    trained_weights_in_model(model)
    return model, state


def report_to_tune(config, splits, runtime: dict, state: TrialState, placement: dict, checkpoint_every: int,
                   entered: float, last_epoch: int):
    """A Keras callback reporting each epoch to Tune, with a checkpoint when validation AUC improves, every
    ``checkpoint_every`` epochs and at the last epoch."""
    import keras
    from ray import tune

    class ReportToTune(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.loop_start = time.perf_counter()
            placement["setup_seconds"] = self.loop_start - entered  # TF start, data listing, model build

        def on_epoch_end(self, epoch, logs=None):
            metrics = {k: float(logs[k]) for k in REPORTED if k in logs}
            metrics.update(placement, epoch=epoch + 1, loop_seconds=time.perf_counter() - self.loop_start)
            state.history.append(metrics)
            improved = metrics[METRIC] > state.best_auc
            state.best_auc = max(state.best_auc, metrics[METRIC])
            state.epoch = epoch + 1
            metrics[BEST_SO_FAR] = state.best_auc  # what Optuna learns from
            periodic = checkpoint_every and (epoch + 1) % checkpoint_every == 0
            if not (improved or periodic or epoch + 1 == last_epoch):
                tune.report(metrics)
                return
            result = FitResult(model=self.model, history=state.history, best_epoch=epoch + 1, runtime=runtime)
            with tempfile.TemporaryDirectory() as directory:
                save_model_dir(self.model, model_metadata(config, splits, result), directory)
                (Path(directory) / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state)))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))

    return ReportToTune()


def log(line: str) -> None:
    """A trial's own log: ``trial.log`` in its working dir, synced into its trial dir (the console shows the
    driver's progress lines instead)."""
    with open(TRIAL_LOG, "a") as f:
        f.write(f"[{time.strftime('%H:%M:%S')}] {line}\n")


def train_trial(params: dict[str, Any], base: dict, checkpoint_every: int = 0, last_epoch: int = 0) -> None:
    """Tune entry point: ``tune.with_parameters(train_trial, base=..., checkpoint_every=..., last_epoch=...)``;
    ``last_epoch``: the epoch a trial stops after (a search's ``stop_after_epochs``; 0 = the config's epochs)."""
    import ray
    from ray import tune

    entered = time.perf_counter()
    config = trial_config(base, params)
    config = dataclasses.replace(config, name=f"{config.model.family}-{tune.get_context().get_trial_id()}")
    log(f"trial {config.name}: " + ", ".join(f"{k}={v}" for k, v in sorted(params.items())))
    # Threads and GPU memory growth before any TF op; fractional GPUs then share a card.
    runtime = configure_tensorflow(_trial_cpus(), config.mixed_precision, precision_workload(config.model))
    log(f"precision: {runtime['precision']} ({runtime['precision_reason']})")
    splits = load_data(config)
    model, state = None, TrialState()
    if checkpoint := tune.get_checkpoint():
        model, state = restore_checkpoint(checkpoint)
        log(f"resuming trial from its checkpoint at epoch {state.epoch}")
        # stopped right after its last epoch (Tune's record of the end may not have been saved): nothing to train
        if state.epoch >= (last_epoch or config.epochs):
            return
    placement = {
        "node_id": ray.get_runtime_context().get_node_id(),
        "gpu_ids": ",".join(str(g) for g in ray.get_gpu_ids()),
        "start_epoch": state.epoch,  # > 0 after a restart from a checkpoint
        "precision": runtime["precision"],  # why: the trial's trial.log and its checkpoints' metadata
    }
    callback = report_to_tune(config, splits, runtime, state, placement, checkpoint_every, entered,
                              last_epoch or config.epochs)
    fit(config, splits, model=model, initial_epoch=state.epoch, callbacks=[callback], runtime=runtime, log=log)


def trial_dirname(trial) -> str:
    """Short trial dirs (Tune's default packs every parameter into the name)."""
    return f"{trial.config.get('model.family', 'trial')}_{trial.trial_id}"
