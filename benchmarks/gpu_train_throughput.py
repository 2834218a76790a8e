"""Training images/s of both families on a GPU, float32 vs mixed precision, in one process.

The GPU machine this was measured on has JAX but not TensorFlow, so this runs the project's own model code
(``models.registry.build_model``) on Keras 3's JAX backend, with numpy batches (no tf.data): it measures
the model's training step, which is what the GPU changes.

Usage (on a GPU machine with jax and keras): KERAS_BACKEND=jax python -m benchmarks.gpu_train_throughput
    [--steps 30] [--batch-size 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

CONFIGS = {  # the families at the sizes the GPU search config uses (tuning/configs/gpu-cluster.yaml)
    "cnn-224": {"family": "cnn", "image_size": 224, "depth": 6, "base_filters": 32, "filter_growth": 2.0},
    "inception-299": {"family": "inception", "image_size": 299, "weights": "none", "trainable_blocks": -1},
}


def images_per_sec(name: str, overrides: dict, policy: str, batch: int, steps: int) -> dict:
    import keras
    import numpy as np

    from models.config import ModelConfig
    from models.registry import build_model

    keras.mixed_precision.set_dtype_policy(policy)
    model = build_model(ModelConfig(**overrides))
    model.compile(optimizer=keras.optimizers.AdamW(1e-3, weight_decay=1e-4), loss="binary_crossentropy",
                  jit_compile=True)
    rng = np.random.default_rng(0)
    size = overrides["image_size"]
    x = rng.random((batch, size, size, 1), dtype=np.float32)
    y = (rng.random(batch) > 0.5).astype(np.float32)
    start = time.perf_counter()
    for _ in range(3):  # compile and warm up
        model.train_on_batch(x, y)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        loss = model.train_on_batch(x, y)
    float(np.asarray(loss))  # wait for the device
    rate = steps * batch / (time.perf_counter() - start)
    print(f"{name} {policy}: {rate:.0f} img/s (batch {batch}, compile+warm-up {compile_s:.0f} s)", flush=True)
    return {"images_per_sec": rate, "compile_seconds": compile_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--policies", default="float32,mixed_bfloat16,mixed_float16")
    parser.add_argument("--json")
    args = parser.parse_args()
    import jax
    import keras

    results = {"device": str(jax.devices()[0]), "backend": keras.backend.backend(), "keras": keras.__version__,
               "jax": jax.__version__, "batch_size": args.batch_size, "models": {}}
    print(results["device"], results["backend"], flush=True)
    for name, overrides in CONFIGS.items():
        rows = {p: images_per_sec(name, overrides, p, args.batch_size, args.steps) for p in args.policies.split(",")}
        for row in rows.values():
            row["over_float32"] = row["images_per_sec"] / rows["float32"]["images_per_sec"]
        results["models"][name] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
