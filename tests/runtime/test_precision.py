"""``mixed_precision: auto`` picks what measures faster for the configured model, once per model and machine."""

import json

import keras
import pytest

import runtime.precision
from models.config import ModelConfig
from models.registry import precision_workload
from runtime.precision import choose_precision, compare_precisions
from runtime.tensorflow_setup import configure_tensorflow

LITE = precision_workload(ModelConfig(family="efficientnet_lite0", image_size=224, trainable_blocks=-1))
CNN = precision_workload(ModelConfig(family="cnn", image_size=128))


@pytest.fixture
def bf16_cpu(monkeypatch):
    """A CPU with bfloat16 instructions, whatever this one has."""
    monkeypatch.setattr(runtime.precision, "cpu_supports_bfloat16", lambda: True)


def _measurer(rates: dict, calls: list):
    def measure(model):
        family = model.key["family"]
        calls.extend((family, model.image_size, precision) for precision in rates[family])
        return rates[family]
    return measure


def test_auto_picks_float32_when_bfloat16_measures_slower_and_bfloat16_when_faster(bf16_cpu, tmp_path):
    rates = {"efficientnet_lite0": {"float32": 35.4, "bfloat16": 23.1}, "cnn": {"float32": 56.3, "bfloat16": 77.0}}
    calls = []
    precision, why = choose_precision(LITE, _measurer(rates, calls), tmp_path)
    assert precision == "float32" and "float32 35.4, bfloat16 23.1" in why and "just measured" in why
    assert choose_precision(CNN, _measurer(rates, calls), tmp_path)[0] == "bfloat16"
    assert len(calls) == 4  # both precisions of both models


def test_a_measurement_is_cached_per_model_and_machine(bf16_cpu, tmp_path):
    rates = {"efficientnet_lite0": {"float32": 35.4, "bfloat16": 23.1}}
    calls = []
    choose_precision(LITE, _measurer(rates, calls), tmp_path)
    precision, why = choose_precision(LITE, _measurer(rates, calls), tmp_path)
    assert precision == "float32" and len(calls) == 2 and "cached in" in why
    (record,) = tmp_path.glob("*.json")
    key = json.loads(record.read_text())
    assert key["family"] == "efficientnet_lite0" and key["image_size"] == 224 and key["cpu"] and key["tensorflow"]
    smaller = precision_workload(ModelConfig(family="efficientnet_lite0", image_size=192, trainable_blocks=3))
    choose_precision(smaller, _measurer(rates, calls), tmp_path)
    assert len(calls) == 4


def test_without_bfloat16_instructions_auto_is_float32_unmeasured(monkeypatch, tmp_path):
    monkeypatch.setattr(runtime.precision, "cpu_supports_bfloat16", lambda: False)
    precision, why = choose_precision(LITE, lambda model: pytest.fail("measured"), tmp_path)
    assert precision == "float32" and "without bfloat16" in why


def test_configure_tensorflow_sets_the_chosen_policy_and_says_why(bf16_cpu, monkeypatch, tmp_path):
    monkeypatch.setenv("PNEUMONIA_CACHE", str(tmp_path))
    monkeypatch.setattr(runtime.precision, "compare_precisions", lambda model: {"float32": 2.0, "bfloat16": 1.0})
    chosen = configure_tensorflow(1, "auto", LITE)
    assert chosen["precision"] == "float32" and chosen["precision_reason"].startswith("auto: float32")
    assert keras.mixed_precision.global_policy().name == "float32"
    assert configure_tensorflow(1, "bfloat16")["precision_reason"] == "as configured"
    assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"


def test_a_real_measurement_of_a_tiny_cnn_leaves_the_policy_as_it_was():
    tiny = precision_workload(ModelConfig(family="cnn", image_size=16, depth=2, base_filters=4, dense_units=8))
    rates = compare_precisions(tiny, batch_size=8, steps=2, rounds=2, warmup=1)
    assert set(rates) == {"float32", "bfloat16"} and all(rate > 0 for rate in rates.values())
    assert keras.mixed_precision.global_policy().name == "float32"
