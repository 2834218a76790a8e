"""TensorFlow process set-up: thread pools sized to the CPUs we were given, and the precision policy.

Both must happen before TensorFlow runs its first op, so every entry point calls
:func:`configure_tensorflow` first.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache

from runtime.precision import PRECISIONS, choose_precision

log = logging.getLogger(__name__)


# What TensorFlow's C++ start-up writes to stderr on a machine without a GPU: absl lines before its logging is
# initialised, the CUDA stub and cuInit failures (an "E" line that is not an error here), CPU feature notes.
STARTUP_NOISE = ("All log messages before absl::InitializeLog()", "cudart_stub.cc", "cuda_platform.cc",
                 "cpu_feature_guard.cc", "To enable the following instructions", "Unable to register cu",
                 "TF-TRT Warning", "computation placer already registered", "cuda_dnn.cc", "cuda_fft.cc",
                 "cuda_blas.cc", "oneDNN custom operations are on")


def quiet_tensorflow() -> None:
    """Keep TensorFlow's Python-level log lines off the console; must run before TensorFlow is imported.
    (Its C++ start-up lines ignore this: :func:`import_tensorflow` catches those.)"""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@lru_cache(maxsize=1)
def import_tensorflow():
    """Import TensorFlow and touch its devices with stderr (fd 2) caught, then write back every line that is
    not known start-up noise. TF_CPP_MIN_LOG_LEVEL does not reach the lines absl prints before its logging is
    initialised, nor the cuInit failure, so the descriptor itself is redirected."""
    import sys
    import tempfile

    quiet_tensorflow()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices("GPU")
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        sink.seek(0)
        captured = sink.read().decode(errors="replace")
    kept = [line for line in captured.splitlines() if line.strip() and not any(n in line for n in STARTUP_NOISE)]
    if kept:
        print("\n".join(kept), file=sys.stderr, flush=True)
    return tf


def available_cpus() -> int:
    """CPUs this process may use: Ray's OMP_NUM_THREADS for a task, else the affinity mask."""
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    return len(os.sched_getaffinity(0))


def resolve_precision(requested: str, model=None) -> tuple[str, str]:
    """(precision, why): as asked, or for ``auto`` what :func:`runtime.precision.choose_precision` measures."""
    if requested != "auto":
        if requested not in PRECISIONS:
            raise ValueError(f"mixed_precision must be auto, {', '.join(PRECISIONS)}, got {requested!r}")
        return requested, "as configured"
    return choose_precision(model)


_configured_threads: dict[str, int] = {}


def configure_tensorflow(threads: int = 0, precision: str = "float32", model=None) -> dict:
    """Set TF's intra/inter-op threads, GPU memory growth and Keras' dtype policy (for ``auto``, the one that
    trains ``model``, a ``runtime.precision.Workload``, faster here); returns what was set and why."""
    tf = import_tensorflow()
    import keras

    threads = threads or available_cpus()
    if _configured_threads.get("threads") != threads:  # a second call with the same threads (an ensemble is
        try:                                           # built, then evaluated) has nothing to change
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
            for gpu in tf.config.list_physical_devices("GPU"):
                tf.config.experimental.set_memory_growth(gpu, True)
            _configured_threads["threads"] = threads
        except RuntimeError:  # TF already initialised in this process; keep what it has
            log.warning("TensorFlow was already initialised; thread and GPU settings left as they are")
            threads = tf.config.threading.get_intra_op_parallelism_threads() or threads
    resolved, why = resolve_precision(precision, model)
    keras.mixed_precision.set_dtype_policy("float32" if resolved == "float32" else f"mixed_{resolved}")
    return {"threads": threads, "precision": resolved, "precision_reason": why}


_stop_signals = 0


def _on_stop_signal(signum, frame) -> None:
    global _stop_signals
    _stop_signals += 1
    if _stop_signals > 1:  # a second Ctrl-C or SIGTERM: no more waiting
        os.write(2, b"stopped at once\n")
        os._exit(130)
    os.write(2, b"stopping (Ctrl-C again to stop at once)\n")
    raise KeyboardInterrupt


def install_stop_handlers() -> None:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt once, for a clean stop; a second one exits at once.

    Call it again after ``ray.init``: Ray's core worker installs a SIGTERM handler of its own that prints a
    stack dump and dies without shutting anything down."""
    import signal

    signal.signal(signal.SIGINT, _on_stop_signal)
    signal.signal(signal.SIGTERM, _on_stop_signal)
