"""The batched model call that serving and evaluation share: a Keras model run by ONNX Runtime.

Why: on the CPUs this project serves from, the same float32 graph converted with tf2onnx and run by ONNX Runtime
gives EfficientNet-Lite0 1.6x the images/s of Keras' ``predict_on_batch`` at batch 32 on one thread (3.5x at
batch 1, 2.6x at batch 32 on two threads; the 128 px CNN 1.2-1.4x), and one film the same numbers whatever the
batch and thread count (``benchmarks/inference_runtimes.py``, BENCHMARKS.md "Inference runtimes"). XLA
(``jit_compile=True``: 0.07x) and a ``tf.function`` with fixed batch shapes (0.95-1.3x) were measured beside it;
OpenVINO's float32 was slower than ONNX Runtime, and its default bfloat16 moves P by ~6e-2.

The model package stays the Keras file: the ONNX graph is converted from the loaded model when a predictor is
made (2.8 s for Lite0 here, in memory), checked against Keras on a probe batch, and used only if both agree.
If anything fails (tf2onnx or onnxruntime missing, an op it cannot convert, a model computing in bfloat16,
whose graph ONNX Runtime's CPU kernels refuse) the predictor is Keras' own ``predict_on_batch``, with one log
line saying why.

The evaluation and the endpoint both call :func:`batch_predictor`: the evaluation with ONNX Runtime, recording
in the package which runtime computed its numbers (threshold, calibration, OOD gate), and the endpoint with the
runtime the package records, so served == offline holds exactly (ONNX Runtime gives one film the same numbers
in any batch and at 1 or 2 threads). A package made before packages recorded it is served by Keras, which
computed its numbers: ONNX Runtime's float32 rounding differs from Keras' by ~1e-6 in P, but a model whose
probabilities sit at 1 - 2e-5 behind a steep Platt calibration amplifies that to ~1e-2 (BENCHMARKS.md).
``$PNEUMONIA_INFERENCE_RUNTIME`` overrides both: ``keras`` switches ONNX Runtime off everywhere (a measurement's
"before", a runtime suspected of a fault), ``onnxruntime`` serves an older package with it once its numbers
are shown to agree (``benchmarks/inference_runtimes.py``).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)

RUNTIME_ENV = "PNEUMONIA_INFERENCE_RUNTIME"
RUNTIMES = ("onnxruntime", "keras")
DEFAULT_RUNTIME = "onnxruntime"
OPSET = 17
PROBE_TOLERANCE = 1e-4  # of an output's scale: far above float32 rounding (~1e-6), far below a wrong graph (>1e-2)


class Predictor(Protocol):
    """What serving and evaluation call: Keras' ``predict_on_batch`` contract (one array for a one-output
    model, else a list in the model's output order)."""

    runtime: str

    def predict_on_batch(self, batch: Any) -> Any: ...


class KerasPredictor:
    """Keras' own call: the reference, and the fallback."""

    runtime = "keras"

    def __init__(self, model):
        self.model = model

    def predict_on_batch(self, batch: Any) -> Any:
        return self.model.predict_on_batch(batch)


class OnnxPredictor:
    """The model's float32 graph in an ONNX Runtime session: dynamic batch, ``threads`` intra-op threads that
    sleep between calls (no spinning: the replica's event loop and decode threads share those CPUs)."""

    def __init__(self, model, threads: int):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(to_onnx(model), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.single_output = len(model.outputs) == 1
        self.runtime = f"onnxruntime {onnxruntime.__version__}, {threads} thread{'s' * (threads > 1)}"

    def predict_on_batch(self, batch: Any) -> Any:
        outputs = self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
        return outputs[0] if self.single_output else outputs


def to_onnx(model) -> bytes:
    """The inference graph of a Keras model (``training=False``) as a serialized ONNX model, any batch size."""
    import tensorflow as tf
    import tf2onnx

    spec = [tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name="image")]
    function = tf.function(lambda image: model(image, training=False), input_signature=spec)
    logger = logging.getLogger("tf2onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)  # it logs every rewrite at INFO
    try:
        proto, _ = tf2onnx.convert.from_function(function, input_signature=spec, opset=OPSET)
    finally:
        logger.setLevel(level)
    return proto.SerializeToString()


def probe_batch(input_shape: tuple) -> np.ndarray:
    """Four deterministic inputs in [0, 1] (gradients, a checkerboard, mid-grey): enough structure that a
    wrongly converted graph answers differently."""
    height, width, channels = input_shape[1:]
    y, x = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    images = [y, x * y, ((np.arange(height)[:, None] // 4 + np.arange(width)[None] // 4) % 2) * 1.0,
              np.full((height, width), 0.5)]
    return np.stack([np.repeat(image[..., None], channels, axis=-1) for image in images]).astype(np.float32)


def disagreement(reference: Any, candidate: Any) -> float:
    """The largest difference between two predictors' outputs, each output scaled by max(1, its largest value)."""
    pairs = zip(reference, candidate) if isinstance(reference, list | tuple) else [(reference, candidate)]
    worst = 0.0
    for ref, got in pairs:
        ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
        if ref.shape != got.shape:
            return float("inf")
        worst = max(worst, float(np.max(np.abs(ref - got))) / max(1.0, float(np.max(np.abs(ref)))))
    return worst


def default_threads() -> int:
    """The replica's or process's TensorFlow intra-op threads (``runtime.tensorflow_setup.configure_tensorflow``)."""
    from runtime.tensorflow_setup import available_cpus, import_tensorflow

    return import_tensorflow().config.threading.get_intra_op_parallelism_threads() or available_cpus()


def recorded_runtime(runtime: dict) -> str:
    """The runtime a package's numbers (threshold, calibration, OOD gate, test metrics) came from, as its
    metadata's ``runtime`` records it (``{"inference": "onnxruntime 1.32.0, 2 threads"}``): ``keras`` for a
    package made before packages recorded it."""
    return str(runtime.get("inference") or "keras").split()[0]


def batch_predictor(model, runtime: str | None = None, threads: int | None = None,
                    warn: Callable[[str], object] = log.warning) -> Predictor:
    """The predictor of ``model`` for ``runtime``: ``$PNEUMONIA_INFERENCE_RUNTIME`` (an operator's choice) if
    set, else ``runtime`` (a package's record, :func:`recorded_runtime`), else onnxruntime. ONNX Runtime is used
    when the conversion works and agrees with Keras on a probe batch, else Keras; an object that is not a Keras
    model (a test's stand-in) is returned as it is."""
    runtime = os.environ.get(RUNTIME_ENV) or runtime or DEFAULT_RUNTIME
    if runtime not in RUNTIMES:
        raise ValueError(f"{RUNTIME_ENV} and a package's runtime must be one of {', '.join(RUNTIMES)}, "
                         f"got {runtime!r}")
    keras = sys.modules.get("keras")  # not imported: ``model`` cannot be a Keras model
    if keras is None or not isinstance(model, keras.Model):
        return model
    if runtime == "keras":
        return KerasPredictor(model)
    try:
        fast = OnnxPredictor(model, threads or default_threads())
        probe = probe_batch(model.input_shape)
        gap = disagreement(model.predict_on_batch(probe), fast.predict_on_batch(probe))
    except Exception as exc:  # noqa: BLE001 - an ImportError, a conversion or session error: Keras still answers
        warn(f"ONNX Runtime unavailable for {model.name} ({type(exc).__name__}: {str(exc)[:300]}); "
             f"using Keras' predict_on_batch")
        return KerasPredictor(model)
    if not gap <= PROBE_TOLERANCE:
        warn(f"ONNX Runtime's {model.name} differs from Keras by {gap:.3g} on the probe batch (tolerance "
             f"{PROBE_TOLERANCE}); using Keras' predict_on_batch")
        return KerasPredictor(model)
    log.info(f"{model.name}: {fast.runtime} (agrees with Keras to {gap:.2g} on the probe batch)")
    return fast
