"""The checks before the model: fitted on film-like images, they refuse blank, tiny, strip-shaped and inverted
images with a reason, pass the films, and leave the model input bit for bit what the preprocessing gives."""

import numpy as np
import pytest

from data.film_checks import NotAFilm, fit_film_checks, inversion_score, model_input
from data.preprocessing import preprocess

SIZE = 32


def _film(rng, height=64, width=64) -> np.ndarray:
    """A uint8 film-like image: noise around a bright middle column (spine, mediastinum) and dark lungs."""
    pixels = rng.normal(90, 20, (height, width))
    pixels[:, 3 * width // 8: 5 * width // 8] += 60
    pixels[height // 5: 4 * height // 5, width // 8: 3 * width // 8] -= 30
    pixels[height // 5: 4 * height // 5, 5 * width // 8: 7 * width // 8] -= 30
    return pixels.clip(0, 255).astype(np.uint8)


def _gray(image: np.ndarray) -> np.ndarray:
    return preprocess(image, SIZE).numpy()


@pytest.fixture(scope="module")
def checks():
    rng = np.random.default_rng(0)
    films = [_film(rng, 64, int(rng.integers(56, 80))) for _ in range(60)]
    films[0] = _film(rng, 64, 56)  # the shortest side any film has
    return fit_film_checks(((f.shape[1], f.shape[0], _gray(f)) for f in films), "60 generated films")


def _reason(image: np.ndarray, checks) -> str | None:
    try:
        model_input(image, SIZE, "none", checks)
    except NotAFilm as refused:
        assert str(refused)  # a detail that says what is wrong
        return refused.reason
    return None


def test_films_pass_and_what_is_no_film_is_refused_with_its_reason(checks):
    rng = np.random.default_rng(1)
    films = [_film(rng) for _ in range(20)]
    assert [_reason(film, checks) for film in films] == [None] * 20
    assert all(_reason(255 - film, checks) == "inverted" for film in films)
    for level in (0, 1, 128, 254, 255):
        assert _reason(np.full((300, 300), level, np.uint8), checks) == "blank"
        noisy = np.clip(level + rng.integers(-1, 2, (300, 300)), 0, 255).astype(np.uint8)
        assert _reason(noisy, checks) == "blank"
        assert _reason(np.full((1, 1), level, np.uint8), checks) == "too_small"
        assert _reason(np.full((1, 5000), level, np.uint8), checks) == "too_small"
    assert _reason(films[0][:, :5], checks) == "too_small"
    assert _reason(np.tile(films[0], (1, 4)), checks) == "aspect"  # 64 x 256: wider than 2.5x the widest film
    assert _reason(np.tile(films[0], (4, 1)), checks) == "aspect"
    assert _reason(films[0][::4, ::4], checks) is None  # 16 x 16: above a quarter of the shortest training side
    assert _reason(films[0][::5, ::5], checks) == "too_small"  # 13 x 13: below it


def test_the_thresholds_come_from_the_training_films(checks):
    assert checks.min_side == 56 // 4
    low, high = checks.training_aspect_range
    assert checks.aspect_range == pytest.approx([low / 2.5, high * 2.5])
    assert 56 / 64 <= low <= high < 80 / 64
    assert checks.min_spread == pytest.approx(checks.training_spread_min / 4)


def test_a_film_and_its_negative_get_opposite_inversion_scores(checks):
    film = _gray(_film(np.random.default_rng(2)))
    assert inversion_score(film, checks.inversion_weights) < 0
    assert inversion_score(1.0 - film, checks.inversion_weights) == pytest.approx(
        -inversion_score(film, checks.inversion_weights), rel=1e-6)  # float32 thumbnails


@pytest.mark.parametrize("intensity", ["none", "percentile", "equalize"])
def test_the_model_input_is_the_preprocessing_bit_for_bit(checks, intensity):
    film = _film(np.random.default_rng(3), 70, 90)
    np.testing.assert_array_equal(model_input(film, SIZE, intensity, checks), preprocess(film, SIZE, intensity).numpy())


def test_fitting_needs_films():
    with pytest.raises(ValueError, match="needs training films"):
        fit_film_checks([], "nothing")
