"""Evidence read on validation only (the test split is never loaded here), for choices made before a search.

``schemes``: do the two validation schemes tell the same story about the same model? Each model is trained on
train minus both validation sets (grouped and block), then scored on each; a block split that shows lower
specificity than the grouped one sees some of the shift a random split hides.

``variants``: what each change does, one at a time from a baseline, to validation AUC and specificity (at
the threshold keeping validation sensitivity >= 0.95, and at 0.5), on the block and the grouped validation
sets, trained the same way: pretrained vs scratch, intensity normalisation, each cue-breaking augmentation.
One seed each: read differences of a few hundredths as noise.

Usage: python -m benchmarks.validation_evidence schemes|variants --data ../shared/data/chest_xray [--epochs 3]
       [--only NAME,...] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

BASE = ["model.family=efficientnet_lite0", "model.weights=imagenet", "model.image_size=160",
        "model.trainable_blocks=2", "batch_size=32", "learning_rate=0.0005", "optimizer=adamw",
        "mixed_precision=float32"]
VARIANTS = {
    "baseline (Lite0 ImageNet, 160 px, last 2 stages tuned)": [],
    "from scratch (model.weights=none)": ["model.weights=none", "model.trainable_blocks=-1", "learning_rate=0.002"],
    "intensity percentile": ["data.intensity=percentile"],
    "intensity equalize": ["data.intensity=equalize"],
    "black-level lift 0.12": ["data.augment_black_level=0.12"],
    "gamma 0.4": ["data.augment_gamma=0.4"],
    "blur 1.0 px + noise 0.02": ["data.augment_blur=1.0", "data.augment_noise=0.02"],
}
SCHEME_MODELS = {
    "cnn 128 px, scratch": ["model.family=cnn", "model.image_size=128", "model.depth=5", "model.base_filters=16",
                            "learning_rate=0.002", "mixed_precision=float32"],
    "Lite0 160 px, ImageNet": BASE[:6] + ["mixed_precision=float32"],
}


def operating_points(labels: np.ndarray, probabilities: np.ndarray) -> dict:
    from evaluation.metrics import binary_report, sensitivity_threshold

    at_95 = binary_report(labels, probabilities, sensitivity_threshold(labels, probabilities, 0.95))
    at_half = binary_report(labels, probabilities, 0.5)
    return {"auc": at_95["auc"], "specificity_at_sens95": at_95["specificity"],
            "specificity_at_0.5": at_half["specificity"], "sensitivity_at_0.5": at_half["sensitivity"],
            "images": len(labels)}


def train_config(data: str, epochs: int, overrides: list[str]):
    from models.config import TrainConfig
    from runtime.config import load_config

    return load_config(TrainConfig, overrides=[f"data.path={data}", f"epochs={epochs}", *overrides])


def predict(model, split, config) -> np.ndarray:
    from data.preprocessing import InputContract
    from evaluation.evaluate import predict_split

    return predict_split(model, split, InputContract(config.model.image_size, intensity=config.data.intensity))


def held_out_splits(data: str):
    """(splits to train on: train minus both validation sets, val = both; the grouped splits; the block splits)."""
    from data.dataset import Split, load_splits

    grouped, block = load_splits(data, validation="grouped"), load_splits(data, validation="block")
    pool = [grouped.train, grouped.val]  # all of train
    merged = Split("train", np.concatenate([s.labels for s in pool]), np.concatenate([s.patients for s in pool]),
                   paths=np.concatenate([s.paths for s in pool]))
    held_out = np.isin(merged.paths, np.concatenate([grouped.val.paths, block.val.paths]))
    train = merged.subset(np.flatnonzero(~held_out), "train")
    both = merged.subset(np.flatnonzero(held_out), "val")  # picks the epoch; each part is scored on its own
    return dataclasses.replace(grouped, train=train, val=both), grouped, block


def measure(data: str, epochs: int, models: dict[str, list[str]], only: list[str]) -> dict:
    """Each model trained once on train minus both validation sets, then scored on each of them."""
    from tuning.train import fit

    splits, grouped, block = held_out_splits(data)
    results = {"train_images": len(splits.train), "grouped_val": len(grouped.val), "block_val": len(block.val),
               "models": {}}
    for name, overrides in models.items():
        if only and not any(name.startswith(o) for o in only):
            continue
        config = train_config(data, epochs, overrides)
        started = time.time()
        fitted = fit(config, splits, log=lambda line, name=name: print(f"  {name}: {line}", flush=True))
        results["models"][name] = {
            "block": operating_points(block.val.labels, predict(fitted.model, block.val, config)),
            "grouped": operating_points(grouped.val.labels, predict(fitted.model, grouped.val, config)),
            "best_epoch": fitted.best_epoch, "seconds": round(time.time() - started), "overrides": overrides,
        }
        print(name, json.dumps(results["models"][name]), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("schemes", "variants"))
    parser.add_argument("--data", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated names (prefixes) to run")
    parser.add_argument("--json")
    args = parser.parse_args()
    from runtime.tensorflow_setup import configure_tensorflow

    configure_tensorflow(0, "float32")
    data = str(Path(args.data).resolve())
    only = [o for o in args.only.split(",") if o]
    models = SCHEME_MODELS if args.what == "schemes" else {name: [*BASE, *extra] for name, extra in VARIANTS.items()}
    results = measure(data, args.epochs, models, only)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
