"""Checks an image must pass before the model sees it: is it a chest film at all?

The model's out-of-distribution gate (``models.ood``) judges what the network's embedding says, and some
inputs that are plainly not films get past it: a uniformly black PNG, at 1x1 or 300x300 pixels, was
classified PNEUMONIA at 0.985, and every inverted film got through. These are properties of the pixels, so
they are checked on the pixels, each with its own reason:

- ``too_small``: the shorter side below a quarter of the training films' shortest side: too little of a film
  to read, whatever it shows (and whatever the model's input size).
- ``aspect``: width / height beyond the range the training films span, widened ``ASPECT_MARGIN`` times
  either way (films are cropped and padded differently; a 1x5000 strip is not a film).
- ``blank``: near-constant at any grey level: the spread (standard deviation) of the grey values below a
  ``SPREAD_FRACTION`` of the smallest spread among the training films.
- ``inverted``: bone dark and air bright (a film turned by 90 degrees scores the same way): a logistic regression (scikit-learn, no intercept) on the film's
  standardised ``THUMBNAIL`` x ``THUMBNAIL`` thumbnail, fitted on training films against their negatives.
  Without an intercept its score on standardised pixels is exactly antisymmetric: a film's negative gets
  the opposite score, and a score above 0 is refused.

Fitted by the evaluation on training films (never test), kept in the package's metadata and applied by the
same :meth:`FilmChecks.refusal` in the evaluation's out-of-distribution table and in the endpoint. The grey
image checked is the model's input before its intensity normalisation (which would stretch a blank image).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

THUMBNAIL = 16
SPREAD_FRACTION = 0.25
ASPECT_MARGIN = 2.5
MIN_SIDE_FRACTION = 0.25
REASONS = ("too_small", "aspect", "blank", "inverted")


@dataclasses.dataclass(frozen=True)
class FilmChecks:
    """The fitted checks, as a package's metadata records them."""

    min_side: int  # pixels of the shorter side, as sent
    aspect_range: list[float]  # [lowest, highest] width / height accepted
    min_spread: float  # standard deviation of grey values in [0, 1], at the model's input size
    inversion_weights: list[float]  # THUMBNAIL * THUMBNAIL coefficients, row-major
    fitted_on: str
    training_spread_min: float = 0.0
    training_aspect_range: list[float] = dataclasses.field(default_factory=lambda: [1.0, 1.0])

    def refusal(self, width: int, height: int, gray: np.ndarray) -> tuple[str, str] | None:
        """(reason, what is wrong) for an image of ``width`` x ``height`` pixels as sent, whose grey model
        input (before intensity normalisation, values in [0, 1]) is ``gray``; None when it passes."""
        if min(width, height) < self.min_side:
            return "too_small", (f"image of {width}x{height} pixels: a chest film needs at least {self.min_side} "
                                 f"pixels on its shorter side")
        aspect = width / height
        low, high = self.aspect_range
        if not low <= aspect <= high:
            return "aspect", (f"image of {width}x{height} pixels (width/height {aspect:.3g}): chest films here lie "
                              f"between {low:.3g} and {high:.3g}")
        spread = float(np.std(np.asarray(gray, dtype=np.float64)))
        if spread < self.min_spread:
            return "blank", (f"the image is nearly uniform (grey-level spread {spread:.4f} < {self.min_spread:.4f}, "
                             f"a quarter of the least varied training film's): there is no film to read")
        score = inversion_score(gray, self.inversion_weights)
        if score > 0:
            return "inverted", (f"its light and dark areas lie opposite to a frontal film's (inversion score {score:.3g} "
                                f"> 0): an inverted or rotated film? Send frontal films upright, as stored "
                                f"(MONOCHROME2: bone bright)")
        return None


def thumbnail(gray: np.ndarray) -> np.ndarray:
    """The grey image averaged down to THUMBNAIL x THUMBNAIL (box filter), standardised to mean 0, std 1."""
    from PIL import Image

    pixels = np.asarray(gray, dtype=np.float32).reshape(np.shape(gray)[:2])
    small = np.asarray(Image.fromarray(pixels, mode="F").resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BOX),
                       dtype=np.float64).reshape(-1)
    small = small - small.mean()
    return small / max(float(small.std()), 1e-6)


def inversion_score(gray: np.ndarray, weights: list[float]) -> float:
    """Above 0: the image looks like an inverted film; a film and its negative get opposite scores."""
    return float(thumbnail(gray) @ np.asarray(weights, dtype=np.float64))


def fit_film_checks(films: Iterable[tuple[int, int, np.ndarray]], fitted_on: str) -> FilmChecks:
    """Fit on training films, each (width, height as stored, grey model input before intensity normalisation)."""
    from sklearn.linear_model import LogisticRegression

    sizes, spreads, thumbnails = [], [], []
    for width, height, gray in films:
        sizes.append((width, height))
        spreads.append(float(np.std(np.asarray(gray, dtype=np.float64))))
        thumbnails.append(thumbnail(gray))
    if len(thumbnails) < 2:
        raise ValueError(f"fitting the film checks needs training films; got {len(thumbnails)}")
    x = np.stack(thumbnails)
    classifier = LogisticRegression(fit_intercept=False, C=0.1, max_iter=2000)
    classifier.fit(np.r_[x, -x], np.r_[np.zeros(len(x)), np.ones(len(x))])  # 1 = inverted
    aspects = [w / h for w, h in sizes]
    shortest = min(min(size) for size in sizes)
    return FilmChecks(
        min_side=max(1, int(MIN_SIDE_FRACTION * shortest)),
        aspect_range=[min(aspects) / ASPECT_MARGIN, max(aspects) * ASPECT_MARGIN],
        min_spread=SPREAD_FRACTION * min(spreads),
        inversion_weights=[float(w) for w in classifier.coef_[0]],
        fitted_on=fitted_on,
        training_spread_min=min(spreads),
        training_aspect_range=[min(aspects), max(aspects)],
    )


class NotAFilm(ValueError):
    """An image a :class:`FilmChecks` refused; ``reason`` is one of REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def model_input(image, image_size: int, intensity: str = "none", checks: FilmChecks | None = None) -> np.ndarray:
    """A decoded image ((H, W) or (H, W, C), uint8/uint16/float) -> the model input (S, S, 1) float32, through
    the one preprocessing; with ``checks``, raises :class:`NotAFilm` first for an image that is not a film.
    Equal, bit for bit, to ``preprocess(image, image_size, intensity)``: the checks look at the grey image
    before the intensity normalisation, which is then applied to that same image."""
    from data.preprocessing import normalize_intensity, preprocess_one

    gray = preprocess_one(image, image_size)
    if checks is not None:
        height, width = np.shape(image)[:2]
        refused = checks.refusal(int(width), int(height), gray.numpy())
        if refused is not None:
            raise NotAFilm(*refused)
    return normalize_intensity(gray, intensity).numpy()
