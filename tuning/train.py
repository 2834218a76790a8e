"""Training one configuration: the loop ``pneumonia train`` runs and the Tune trainable reuses.

Usage: ``pneumonia train --config tuning/configs/train-cnn.yaml --set epochs=3 --data DIR``
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from data.dataset import DataSplits, load_splits
from data.pipeline import Augmentation, class_weights, make_dataset
from data.preprocessing import InputContract
from models.config import TrainConfig
from models.package import METRIC, MODE, PackageMetadata, save_model_dir
from models.registry import build_model, precision_workload
from runtime.config import to_dict
from runtime.tensorflow_setup import configure_tensorflow

VAL_BATCH_SIZE = 64


@dataclasses.dataclass
class FitResult:
    model: object
    history: list[dict]
    best_epoch: int  # 1-based epoch whose weights the model holds
    runtime: dict  # threads and precision actually used


def load_data(config: TrainConfig) -> DataSplits:
    d = config.data
    return load_splits(d.path, d.val_fraction, d.seed, d.max_train_images, d.max_val_images,
                       validation=d.validation)


def clinical_metrics(labels, probabilities, threshold: float = 0.5) -> dict[str, float]:
    """Loss, accuracy, ROC AUC, sensitivity and specificity at ``threshold``: the per-epoch validation set
    (reported as ``val_<name>``; the search ranks by ``val_auc``)."""
    from sklearn.metrics import accuracy_score, log_loss, recall_score, roc_auc_score

    labels = np.asarray(labels).astype(int).reshape(-1)
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    predictions = (probabilities >= threshold).astype(int)
    both_classes = len(np.unique(labels)) == 2
    return {
        "loss": float(log_loss(labels, probabilities, labels=[0, 1])),
        "accuracy": float(accuracy_score(labels, predictions)),
        "auc": float(roc_auc_score(labels, probabilities)) if both_classes else float("nan"),
        "sensitivity": float(recall_score(labels, predictions, pos_label=1, zero_division=0)),
        "specificity": float(recall_score(labels, predictions, pos_label=0, zero_division=0)),
    }


def make_optimizer(config: TrainConfig, steps_per_epoch: int):
    import keras

    lr = config.learning_rate
    if config.lr_schedule == "cosine":
        total = max(1, config.epochs * steps_per_epoch)
        warmup = min(total - 1, round(config.warmup_epochs * steps_per_epoch))
        if warmup > 0:  # linear from 1 % to lr over the warm-up, then cosine down to 1 % of lr
            lr = keras.optimizers.schedules.CosineDecay(lr / 100, decay_steps=total - warmup, alpha=0.01,
                                                        warmup_target=lr, warmup_steps=warmup)
        else:
            lr = keras.optimizers.schedules.CosineDecay(lr, decay_steps=total, alpha=0.01)
    ema = {"use_ema": True, "ema_momentum": config.ema_momentum} if config.ema_momentum else {}
    if config.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate=lr, weight_decay=config.weight_decay, **ema)
    if config.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=lr, **ema)
    return keras.optimizers.SGD(learning_rate=lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay or None,
                                **ema)


def trained_weights_in_model(model) -> None:
    """After loading a checkpoint written with ``ema_momentum``: put the trained weights back in the model and
    the averages back in the optimizer. Why: each epoch's end swaps the averages into the model (``fit``), so a
    checkpoint holds them the other way round; training must go on from the trained weights."""
    optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)
    if not getattr(optimizer, "use_ema", False) or not hasattr(optimizer, "_model_variables_moving_average"):
        return
    for variable, average in zip(optimizer._trainable_variables, optimizer._model_variables_moving_average):
        trained = average.numpy()
        average.assign(variable.numpy())
        variable.assign(trained)


def compile_model(model, config: TrainConfig, steps_per_epoch: int) -> None:
    import keras

    model.compile(
        optimizer=make_optimizer(config, steps_per_epoch),
        loss=keras.losses.BinaryCrossentropy(label_smoothing=config.label_smoothing),
        metrics=[keras.metrics.BinaryAccuracy(name="accuracy")],
        jit_compile=False,  # XLA trained at 0.5-0.6x the speed of plain TF on this project's CPUs
    )


def _callbacks_module():
    import keras

    class Throughput(keras.callbacks.Callback):
        """Training images/s of each epoch, measured before validation starts."""

        def __init__(self, images_per_epoch: int):
            super().__init__()
            self.images_per_epoch = images_per_epoch

        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds = time.perf_counter() - self.start
            logs["train_seconds"] = seconds
            logs["images_per_sec"] = self.images_per_epoch / seconds

    class ValidationMetrics(keras.callbacks.Callback):
        """Validation loss, accuracy, AUC, sensitivity and specificity (scikit-learn) into the epoch logs."""

        def __init__(self, val_ds, labels: np.ndarray):
            super().__init__()
            self.val_ds, self.labels = val_ds, labels

        def on_epoch_end(self, epoch, logs=None):
            probabilities = self.model.predict(self.val_ds, verbose=0)
            logs.update({f"val_{k}": v for k, v in clinical_metrics(self.labels, probabilities).items()})

    class ProgressLine(keras.callbacks.Callback):
        """One compact line per epoch."""

        def __init__(self, epochs: int, log: Callable[[str], None]):
            super().__init__()
            self.epochs, self.log = epochs, log

        def on_epoch_end(self, epoch, logs=None):
            self.log(
                f"epoch {epoch + 1}/{self.epochs}  loss {logs['loss']:.4f}  acc {logs['accuracy']:.4f}  "
                f"val_loss {logs['val_loss']:.4f}  val_acc {logs['val_accuracy']:.4f}  "
                f"{METRIC} {logs[METRIC]:.4f}  val_sens {logs['val_sensitivity']:.3f}  "
                f"val_spec {logs['val_specificity']:.3f}  {logs['images_per_sec']:.0f} img/s  "
                f"{logs['train_seconds']:.0f}s"
            )

    return Throughput, ValidationMetrics, ProgressLine


def fit(
    config: TrainConfig,
    splits: DataSplits | None = None,
    model=None,
    initial_epoch: int = 0,
    callbacks: Sequence = (),
    log: Callable[[str], None] = print,
    runtime: dict | None = None,
) -> FitResult:
    """Train ``config`` (or continue ``model`` from ``initial_epoch``); the model returned holds the
    weights of the epoch with the best validation AUC."""
    import keras

    runtime = runtime or configure_tensorflow(config.threads, config.mixed_precision, precision_workload(config.model))
    keras.utils.set_random_seed(config.seed)
    splits = splits or load_data(config)
    d, m = config.data, config.model
    train_ds = make_dataset(splits.train, m.image_size, config.batch_size, training=True,
                            augment=Augmentation.from_config(d), class_balance=d.class_balance, seed=config.seed,
                            intensity=d.intensity)
    val_ds = make_dataset(splits.val, m.image_size, VAL_BATCH_SIZE, intensity=d.intensity)
    steps = math.ceil(len(splits.train) / config.batch_size)
    if model is None:
        model = build_model(m)
        compile_model(model, config, steps)
    Throughput, ValidationMetrics, ProgressLine = _callbacks_module()
    best = keras.callbacks.EarlyStopping(monitor=METRIC, mode=MODE, patience=config.epochs,
                                         restore_best_weights=True)
    history = keras.callbacks.History()
    # with EMA, the averaged weights are in the model from each epoch's end to the next one's start: validated,
    # kept as the best epoch's and checkpointed (Keras' SwapEMAWeights, first so the others see them)
    ema = [keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if config.ema_momentum else []
    weights = class_weights(splits.train.labels) if d.class_balance == "class_weight" else None
    model.fit(
        train_ds,
        epochs=config.epochs,
        initial_epoch=initial_epoch,
        class_weight=weights,
        verbose=0,
        shuffle=False,  # the dataset shuffles itself
        callbacks=[*ema, Throughput(len(splits.train)), ValidationMetrics(val_ds, splits.val.labels), best,
                   ProgressLine(config.epochs, log), *callbacks, history],
    )
    epochs = [
        {"epoch": initial_epoch + i + 1, **{k: float(v[i]) for k, v in history.history.items()}}
        for i in range(len(history.epoch))
    ]
    best_epoch = best.best_epoch + 1 if best.best_weights is not None else initial_epoch
    return FitResult(model=model, history=epochs, best_epoch=best_epoch, runtime=runtime)


def model_metadata(config: TrainConfig, splits: DataSplits, result: FitResult) -> PackageMetadata:
    """A checkpoint's metadata: the config, the data it saw, and the validation metrics of its best epoch."""
    best = next((e for e in result.history if e["epoch"] == result.best_epoch), result.history[-1])
    return PackageMetadata.for_training(
        to_dict(config),
        InputContract(config.model.image_size, intensity=config.data.intensity),
        data={
            "source": splits.source,
            "layout": splits.layout,
            "fingerprint": splits.fingerprint,
            "counts": {s.name: s.counts() for s in (splits.train, splits.val)},
        },
        runtime=result.runtime,
        best_epoch=result.best_epoch,
        validation={k[4:]: v for k, v in best.items() if k.startswith("val_")},
        history=result.history,
    )


def train(config: TrainConfig, output: str | Path | None = None, log: Callable[[str], None] = print) -> Path:
    """``pneumonia train``: fit one configuration and write its model directory."""
    splits = load_data(config)
    for path in splits.unreadable:
        log(f"skipped unreadable file: {path}")
    log(
        f"data {splits.source} ({splits.layout}): train {len(splits.train)} {splits.train.counts()}, "
        f"val {len(splits.val)} {splits.val.counts()} (patient-grouped, overlap {splits.patient_overlap})"
    )
    result = fit(config, splits, log=log)
    runtime = result.runtime
    log(f"runtime: {runtime['precision']} ({runtime['precision_reason']}), {runtime['threads']} threads; "
        f"best epoch {result.best_epoch}")
    directory = Path(output or Path(config.output_dir) / config.name)
    save_model_dir(result.model, model_metadata(config, splits, result), directory)
    log(f"model directory: {directory}")
    return directory
