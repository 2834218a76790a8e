"""TensorFlow process set-up: thread pools sized to the CPUs we were given, and the precision policy.

Both must happen before TensorFlow runs its first op, so every entry point calls
:func:`configure_tensorflow` first.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache

log = logging.getLogger(__name__)


def quiet_tensorflow() -> None:
    """Keep TensorFlow's C++ start-up chatter off the console; must run before TensorFlow is imported."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def available_cpus() -> int:
    """CPUs this process may use: Ray's OMP_NUM_THREADS for a task, else the affinity mask."""
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    return len(os.sched_getaffinity(0))


@lru_cache(maxsize=1)
def cpu_supports_bfloat16() -> bool:
    """True on CPUs with native bfloat16 math (AMX or AVX512-BF16), where oneDNN makes it fast."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return False
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def resolve_precision(requested: str) -> str:
    """``auto`` -> bfloat16 on capable CPUs, float16 on GPUs, float32 otherwise."""
    if requested != "auto":
        if requested not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"mixed_precision must be auto, float32, bfloat16 or float16, got {requested!r}")
        return requested
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return "float16"
    return "bfloat16" if cpu_supports_bfloat16() else "float32"


def configure_tensorflow(threads: int = 0, precision: str = "float32") -> dict:
    """Set TF's intra/inter-op threads, GPU memory growth and Keras' dtype policy; returns what was set."""
    import keras
    import tensorflow as tf

    threads = threads or available_cpus()
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError:  # TF already initialised in this process; keep what it has
        log.warning("TensorFlow was already initialised; thread and GPU settings left as they are")
        threads = tf.config.threading.get_intra_op_parallelism_threads() or threads
    resolved = resolve_precision(precision)
    keras.mixed_precision.set_dtype_policy("float32" if resolved == "float32" else f"mixed_{resolved}")
    return {"threads": threads, "precision": resolved}
