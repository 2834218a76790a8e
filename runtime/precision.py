"""``mixed_precision: auto``: the precision that trains this model faster on this machine, by measurement.

A CPU's bfloat16 flags do not say which precision is faster: on AVX512-BF16 without AMX, oneDNN has fast
bfloat16 dense convolutions but no fast bfloat16 depthwise ones, so the CNN trains 1.26x faster in bfloat16
and EfficientNet-Lite 0.67-0.74x as fast (BENCHMARKS.md, "Precision"). So on such a CPU ``auto`` times a few
training steps of the configured model in both precisions, in turn, once, and caches the answer per (family,
image size, trainable part, what else the family names, CPU model, TensorFlow version) in
``<cache>/precision/``. A GPU gets mixed float16 and
a CPU without bfloat16 instructions float32, unmeasured.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from runtime.paths import default_cache_dir

PRECISIONS = ("float32", "bfloat16", "float16")
MEASURE_BATCH = 16
MEASURE_STEPS = 3


@dataclasses.dataclass(frozen=True)
class Workload:
    """What ``auto`` measures: a network to train (``models.registry.precision_workload`` makes one from a
    ModelConfig), and what decides which precision trains it faster (``key``: its family's layers)."""

    key: dict
    image_size: int
    build: Callable[[], Any]  # a fresh uncompiled Keras model under Keras' current dtype policy
    description: str  # "efficientnet_lite0 at 224 px"


Measurer = Callable[[Workload], dict[str, float]]  # workload -> training images/s per precision


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line for line in f if line.startswith("flags")), "").split()[2:])
    except OSError:
        return frozenset()


@lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("model name")), "")
        return line.partition(":")[2].strip() or platform.processor() or platform.machine()
    except OSError:
        return platform.processor() or platform.machine()


def cpu_supports_bfloat16() -> bool:
    """True on CPUs with native bfloat16 math (AMX or AVX512-BF16), where oneDNN has bfloat16 kernels."""
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def compare_precisions(model: Workload, precisions: tuple[str, ...] = ("float32", "bfloat16"),
                       batch_size: int = MEASURE_BATCH, steps: int = MEASURE_STEPS, rounds: int = 3,
                       warmup: int = 2) -> dict[str, float]:
    """Training images/s of ``model`` under each precision: one network per precision, ``train_on_batch`` on
    random in-memory batches (the input pipeline is not timed), ``warmup`` steps to trace, then ``rounds`` of
    ``steps`` timed steps taken in turn, the best round of each kept, so load that comes and goes on a shared
    machine (trials measuring at once) falls on both alike. Leaves Keras' global dtype policy as it was."""
    import keras

    before = keras.mixed_precision.global_policy().name
    rng = np.random.default_rng(0)
    x = rng.random((batch_size, model.image_size, model.image_size, 1), dtype=np.float32)
    y = (np.arange(batch_size) % 2).astype(np.float32)
    networks = {}
    try:
        for precision in precisions:
            keras.mixed_precision.set_dtype_policy("float32" if precision == "float32" else f"mixed_{precision}")
            network = model.build()
            network.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="binary_crossentropy", jit_compile=False)
            for _ in range(warmup):
                network.train_on_batch(x, y)
            networks[precision] = network
    finally:
        keras.mixed_precision.set_dtype_policy(before)
    rates = dict.fromkeys(precisions, 0.0)
    for _ in range(rounds):
        for precision, network in networks.items():
            start = time.perf_counter()
            for _ in range(steps):
                network.train_on_batch(x, y)
            rates[precision] = max(rates[precision], steps * batch_size / (time.perf_counter() - start))
    return rates


def measurement_key(model: Workload) -> dict:
    """What decides which precision is faster: the layers (family, size, how much trains, what else the family
    names), the CPU and the TensorFlow build."""
    import tensorflow as tf

    return {**model.key, "cpu": cpu_model(), "tensorflow": tf.__version__}


def choose_precision(model: Workload | None, measure: Measurer | None = None,
                     cache_dir: Path | None = None) -> tuple[str, str]:
    """(precision, why) for ``auto``: float16 on a GPU, float32 on a CPU without bfloat16 math, else whichever
    of float32 and bfloat16 trains ``model`` faster here, measured once and cached."""
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return "float16", "auto on a GPU: mixed float16"
    if not cpu_supports_bfloat16():
        return "float32", "auto on a CPU without bfloat16 instructions"
    if model is None:  # nothing to measure (evaluation, serving): inference stays in float32 there anyway
        return "bfloat16", "auto on a CPU with bfloat16 instructions (no model to measure)"
    key = measurement_key(model)
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = (cache_dir or default_cache_dir() / "precision") / f"{name}.json"
    try:
        known = json.loads(path.read_text())
        cached = True
    except (OSError, ValueError):
        rates = (measure or compare_precisions)(model)
        known = {**key, "images_per_sec": rates, "precision": max(rates, key=rates.get),
                 "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")  # trials measuring at once: the last rename wins
        partial.write_text(json.dumps(known, indent=2))
        partial.replace(path)
        cached = False
    rates = known["images_per_sec"]
    why = (f"auto: {known['precision']} trained {model.description} faster here "
           f"(float32 {rates['float32']:.1f}, bfloat16 {rates['bfloat16']:.1f} images/s"
           f"{', measured ' + known['measured_at'] + ', cached in ' + str(path) if cached else ', just measured'})")
    return known["precision"], why
