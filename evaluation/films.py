"""The checks before the model (``data.film_checks``) in an evaluation: fitted on training films, applied to
validation, test and the out-of-distribution set exactly as the endpoint applies them (the same decoder, the
same ``data.film_checks.model_input``)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from data.dataset import Split
from data.film_checks import FilmChecks, NotAFilm, fit_film_checks, model_input
from data.preprocessing import decode_image, preprocess


def stored_films(split: Split) -> Iterator[np.ndarray]:
    """Each image of ``split`` decoded as the endpoint decodes its bytes (files), or as stored (arrays)."""
    if split.paths is not None:
        for path in split.paths:
            with open(path, "rb") as f:
                yield decode_image(f.read())
    else:
        yield from split.images


def fit_checks(split: Split, image_size: int, fitted_on: str) -> FilmChecks:
    """The film checks fitted on ``split`` (training films)."""
    films = ((np.shape(image)[1], np.shape(image)[0], preprocess(image, image_size).numpy())
             for image in stored_films(split))
    return fit_film_checks(films, fitted_on)


def refusal_reason(image, image_size: int, checks: FilmChecks) -> str | None:
    """The check that refuses a decoded image, or None."""
    try:
        model_input(image, image_size, "none", checks)
    except NotAFilm as refused:
        return refused.reason
    return None


def split_refusals(split: Split, image_size: int, checks: FilmChecks) -> list[str | None]:
    """For each film of ``split``, the check that refuses it, or None."""
    return [refusal_reason(image, image_size, checks) for image in stored_films(split)]
