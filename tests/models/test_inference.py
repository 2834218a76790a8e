"""The shared batch predictor: ONNX Runtime where the conversion works and agrees with Keras, Keras otherwise,
with the same outputs either way, and one image's numbers independent of the batch it shares."""

import numpy as np
import pytest

from models.config import ModelConfig
from models.inference import KerasPredictor, OnnxPredictor, batch_predictor, recorded_runtime
from models.ood import with_embedding
from models.registry import build_model
from tests.numerics import PROBABILITY_ABS


def _model(depth: int = 2):
    return build_model(ModelConfig(family="cnn", image_size=32, depth=depth, base_filters=4, dense_units=8))


def _films(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 32, 32, 1), dtype=np.float32)


def test_onnx_runtime_gives_keras_numbers_for_probability_and_embedding():
    model = with_embedding(_model())
    predictor = batch_predictor(model, "onnxruntime", threads=1)
    assert isinstance(predictor, OnnxPredictor) and predictor.runtime.startswith("onnxruntime")
    x = _films(7)
    (p, e), (p_keras, e_keras) = predictor.predict_on_batch(x), model.predict_on_batch(x)
    assert p.shape == p_keras.shape == (7, 1) and e.shape == e_keras.shape == (7, 8)
    np.testing.assert_allclose(p, p_keras, atol=PROBABILITY_ABS / 10)
    np.testing.assert_allclose(e, e_keras, rtol=1e-5, atol=1e-6)


def test_a_one_output_model_keeps_keras_one_array_answer():
    model = _model()
    out = batch_predictor(model, "onnxruntime", threads=1).predict_on_batch(_films(3))
    assert isinstance(out, np.ndarray) and out.shape == (3, 1)


def test_one_image_gets_the_same_numbers_alone_and_in_any_batch():
    """What served == offline rests on: the endpoint batches 1..32 requests, the evaluation 64 films."""
    predictor = batch_predictor(with_embedding(_model(3)), "onnxruntime", threads=2)
    x = _films(64, seed=1)
    whole = predictor.predict_on_batch(x)
    for size in (1, 5, 32):
        parts = [predictor.predict_on_batch(x[i:i + size]) for i in range(0, 64, size)]
        np.testing.assert_allclose(np.concatenate([p for p, _ in parts]), whole[0], atol=1e-7)
        np.testing.assert_allclose(np.concatenate([e for _, e in parts]), whole[1], rtol=1e-6, atol=1e-7)


def test_an_ensemble_reloaded_as_served_converts(tmp_path):
    import keras

    members = [_model(d) for d in (2, 3)]
    for i, member in enumerate(members):
        member.name = f"member{i}"
    image = keras.Input((32, 32, 1))
    keras.Model(image, keras.layers.Average()([m(image) for m in members])).save(tmp_path / "e.keras")
    served = with_embedding(keras.models.load_model(tmp_path / "e.keras", safe_mode=True))
    predictor = batch_predictor(served, "onnxruntime", threads=1)
    assert isinstance(predictor, OnnxPredictor)
    x = _films(4)
    np.testing.assert_allclose(predictor.predict_on_batch(x)[0], served.predict_on_batch(x)[0], atol=1e-6)


def test_a_conversion_that_fails_falls_back_to_keras_and_says_why(monkeypatch):
    import models.inference

    def refuse(model):
        raise ValueError("op not supported")

    monkeypatch.setattr(models.inference, "to_onnx", refuse)
    warnings = []
    model = _model()
    predictor = batch_predictor(model, "onnxruntime", warn=warnings.append)
    assert isinstance(predictor, KerasPredictor) and predictor.model is model
    assert len(warnings) == 1 and "op not supported" in warnings[0] and "Keras" in warnings[0]


def test_a_converted_graph_that_disagrees_with_keras_is_not_used(monkeypatch):
    import models.inference

    run = OnnxPredictor.predict_on_batch
    monkeypatch.setattr(models.inference.OnnxPredictor, "predict_on_batch", lambda self, batch: run(self, batch) + 0.01)
    warnings = []
    predictor = batch_predictor(_model(), "onnxruntime", warn=warnings.append)
    assert isinstance(predictor, KerasPredictor)
    assert len(warnings) == 1 and "differs from Keras" in warnings[0]


def test_a_package_is_run_by_the_runtime_it_records_unless_the_environment_says_otherwise(monkeypatch):
    assert recorded_runtime({"inference": "onnxruntime 1.32.0, 2 threads"}) == "onnxruntime"
    assert recorded_runtime({}) == recorded_runtime({"inference": "keras"}) == "keras"  # made before the record
    model = _model()
    assert isinstance(batch_predictor(model), OnnxPredictor)  # the evaluation's default
    assert isinstance(batch_predictor(model, recorded_runtime({})), KerasPredictor)
    monkeypatch.setenv("PNEUMONIA_INFERENCE_RUNTIME", "keras")  # an operator switches it off everywhere
    assert isinstance(batch_predictor(model, "onnxruntime"), KerasPredictor)
    monkeypatch.setenv("PNEUMONIA_INFERENCE_RUNTIME", "onnxruntime")  # or serves an older package with it
    assert isinstance(batch_predictor(model, recorded_runtime({})), OnnxPredictor)
    monkeypatch.setenv("PNEUMONIA_INFERENCE_RUNTIME", "tensorrt")
    with pytest.raises(ValueError, match="must be one of onnxruntime, keras, got 'tensorrt'"):
        batch_predictor(model)


def test_a_stand_in_that_is_no_keras_model_is_called_as_it_is():
    class Constant:
        def predict_on_batch(self, batch):
            return np.full((len(batch), 1), 0.25)

    stand_in = Constant()
    assert batch_predictor(stand_in, "onnxruntime") is stand_in
