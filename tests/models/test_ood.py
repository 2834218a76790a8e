"""The out-of-distribution gate: one call gives probability and embedding, the scores order what they should,
and the threshold refuses the share of validation films it was set to."""

import numpy as np
import pytest

from models.config import ModelConfig
from models.ood import METHODS, OodScorer, fit_gate, fit_scorer, with_embedding
from models.registry import build_model


def test_one_call_gives_the_same_probability_and_the_pooled_embedding():
    import keras

    model = build_model(ModelConfig(family="cnn", image_size=32, depth=2, base_filters=4, dense_units=8))
    x = np.random.default_rng(0).random((5, 32, 32, 1), dtype=np.float32)
    probability, embedding = with_embedding(model).predict_on_batch(x)
    np.testing.assert_allclose(probability, model.predict_on_batch(x), atol=1e-6)
    pooled = keras.Model(model.inputs, model.get_layer("pool").output).predict_on_batch(x)
    np.testing.assert_allclose(embedding, pooled, atol=1e-6)
    assert embedding.shape == (5, 8)  # the last block's filters: 4 * 2


def test_an_ensemble_averages_its_members_and_concatenates_their_embeddings(tmp_path):
    import keras

    members = [build_model(ModelConfig(family="cnn", image_size=32, depth=d, base_filters=4, dense_units=8))
               for d in (2, 3)]
    for i, member in enumerate(members):
        member.name = f"member{i}"
    image = keras.Input((32, 32, 1))
    ensemble = keras.Model(image, keras.layers.Average()([m(image) for m in members]))
    ensemble.save(tmp_path / "e.keras")
    loaded = keras.models.load_model(tmp_path / "e.keras", safe_mode=True)  # as served: nested members reloaded
    x = np.random.default_rng(1).random((3, 32, 32, 1), dtype=np.float32)
    probability, embedding = with_embedding(loaded).predict_on_batch(x)
    np.testing.assert_allclose(probability, ensemble.predict_on_batch(x), atol=1e-6)
    assert embedding.shape == (3, 8 + 16)


def _clusters(rng, n=400, dims=16):
    """Two in-distribution classes, and outliers far from both along directions the classes never vary in."""
    labels = np.repeat([0, 1], n // 2)
    centres = np.zeros((2, dims))
    centres[1, 0] = 4.0
    inside = centres[labels] + rng.normal(0, [1.0] * 4 + [0.05] * (dims - 4), (n, dims))
    outside = rng.normal(0, [1.0] * 4 + [1.5] * (dims - 4), (100, dims))
    return inside, labels, outside


@pytest.mark.parametrize("method", ["mahalanobis", "knn"])
def test_embedding_scores_rank_outliers_above_training_like_inputs(method):
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    train, labels, _ = _clusters(rng)
    val, _, outside = _clusters(rng)
    scorer = fit_scorer(method, train, labels)
    probabilities = np.full(len(val), 0.5)
    inside_scores = scorer.score(val, probabilities)
    outside_scores = scorer.score(outside, np.full(len(outside), 0.5))
    assert roc_auc_score(np.r_[np.zeros(len(val)), np.ones(len(outside))], np.r_[inside_scores, outside_scores]) > 0.99
    restored = OodScorer.load(method, _saved(scorer))
    np.testing.assert_allclose(restored.score(val, probabilities), inside_scores, rtol=1e-4)


def _saved(scorer: OodScorer):
    import io

    return io.BytesIO(scorer.to_bytes())


def test_msp_and_energy_rank_by_confidence_alike():
    probabilities = np.array([0.5, 0.6, 0.9, 0.99, 0.02, 0.3])
    msp, energy = (fit_scorer(m, None, None).score(None, probabilities) for m in ("msp", "energy"))
    assert np.array_equal(np.argsort(msp), np.argsort(energy))
    assert msp.argmax() == 0 and msp.argmin() == 3  # least confident = most suspicious


def test_the_threshold_refuses_the_share_of_validation_films_it_was_set_to():
    rng = np.random.default_rng(2)
    train, labels, _ = _clusters(rng, n=600)
    val, _, _ = _clusters(rng, n=1000)
    scorer, gate = fit_gate("mahalanobis", (train, None, labels), (val, np.full(len(val), 0.5)), 0.99, "synthetic")
    assert gate.validation_refusal_rate == pytest.approx(0.01, abs=0.002)
    assert np.mean(scorer.score(val, None) > gate.threshold) == pytest.approx(gate.validation_refusal_rate)
    with pytest.raises(ValueError, match="quantile"):
        fit_gate("mahalanobis", (train, None, labels), (val, None), 1.0, "x")
    with pytest.raises(ValueError, match="unknown OOD score"):
        fit_scorer("entropy", train, labels)
    assert set(METHODS) == {"mahalanobis", "knn", "msp", "energy"}
