"""Training throughput, measured side by side in one process (ratios, not absolute timings, are the result).

1. Model: training images/s of each family at the sizes the configs use, float32 vs mixed bfloat16
   (``runtime.precision.compare_precisions``: train_on_batch on in-memory batches, rounds in turn, what
   ``mixed_precision: auto`` measures), and what auto picks for each on this machine.
2. Input pipeline: images/s of the training tf.data pipeline (cold: decode + preprocess; warm: cached,
   shuffled, augmented) against the model's images/s, to show the pipeline is not the bottleneck.

Usage: python -m benchmarks.train_throughput --data ../shared/data/chest_xray [--steps 12] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time


def pipeline_images_per_sec(split, image_size: int, batch_size: int, augment: float) -> dict[str, float]:
    from data.pipeline import make_dataset

    ds = make_dataset(split, image_size, batch_size, training=True, augment=augment)
    rates = {}
    for label in ("cold", "warm"):  # cold fills the cache (read + decode + preprocess); warm reads it
        start = time.perf_counter()
        n = sum(int(x.shape[0]) for x, _ in ds)
        rates[label] = n / (time.perf_counter() - start)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    from data.dataset import load_splits
    from models.config import ModelConfig, TrainConfig
    from runtime.config import load_config
    from runtime.precision import compare_precisions
    from runtime.tensorflow_setup import available_cpus, configure_tensorflow

    runtime = configure_tensorflow(0, "float32")
    cnn = load_config(TrainConfig, "tuning/configs/train-cnn.yaml").model
    inception = load_config(TrainConfig, "tuning/configs/train-inception.yaml").model
    families = {  # the configs' sizes: train-*.yaml, and full-cpu-pretrained.yaml's Lite0 trials
        "cnn": cnn, "inception": inception,
        "lite0-all": ModelConfig(family="efficientnet_lite0", image_size=224, trainable_blocks=-1),
        "lite0-last3": ModelConfig(family="efficientnet_lite0", image_size=192, trainable_blocks=3),
    }
    results: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {available_cpus()} CPUs, TF threads {runtime['threads']}",
        "batch_size": args.batch_size,
        "model": {},
    }
    for name, config in families.items():
        rates = compare_precisions(config, batch_size=args.batch_size, steps=args.steps)
        rates["bfloat16_over_float32"] = rates["bfloat16"] / rates["float32"]
        rates["auto_picks"] = "bfloat16" if rates["bfloat16"] > rates["float32"] else "float32"
        results["model"][f"{name}-{config.image_size}"] = rates
        print(f"{name} {config.image_size}px: float32 {rates['float32']:.1f} img/s, bfloat16 "
              f"{rates['bfloat16']:.1f} img/s, ratio {rates['bfloat16_over_float32']:.2f}, auto picks "
              f"{rates['auto_picks']}", flush=True)

    splits = load_splits(args.data)
    pipeline = pipeline_images_per_sec(splits.train, cnn.image_size, args.batch_size, augment=1.0)
    fastest_model = max(results["model"][f"cnn-{cnn.image_size}"][p] for p in ("float32", "bfloat16"))
    results["pipeline"] = {
        "image_size": cnn.image_size,
        "train_images": len(splits.train),
        **pipeline,
        "warm_over_fastest_model": pipeline["warm"] / fastest_model,
    }
    print(f"pipeline {cnn.image_size}px over {len(splits.train)} train images: cold {pipeline['cold']:.0f} img/s, "
          f"warm (cached, augmented) {pipeline['warm']:.0f} img/s = {pipeline['warm'] / fastest_model:.1f}x "
          f"the fastest model ({fastest_model:.0f} img/s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
