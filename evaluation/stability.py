"""Stable answers: does P(pneumonia) move when the same film is re-encoded in ways that change nothing a
reader would see?

A hospital's PACS, a browser or a client library re-encodes films all the time; a clinician who gets two
answers for one film stops trusting the tool. Each film is re-encoded benignly (``PERTURBATIONS``), every
version goes through the endpoint's own path (bytes -> ``data.preprocessing.decode_image`` ->
``data.film_checks.model_input`` -> the served model and calibration), and the change in P against the
film's own bytes is reported: mean, 99th percentile and largest |change|, and how many labels flip at the
package's threshold; with the package's borderline band (``models.borderline``), how many films are answered
firm and how many of those flip. No label of the data is read, only the images.

    pneumonia stability --package artifacts/VERSION [--split val] [--split test]
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np

from data.dataset import Split
from data.film_checks import model_input
from data.preprocessing import decode_image
from models.borderline import BorderlineBand

# name -> what it does to a film (its pixels as Pillow decodes its bytes, 8-bit grey or RGB)
PERTURBATIONS = {
    "png (Pillow's pixels)": "the film's pixels as another decoder (Pillow) reads them, stored losslessly",
    "jpeg q95": "re-encoded as JPEG at quality 95 (Pillow)",
    "jpeg q85": "re-encoded as JPEG at quality 85 (Pillow)",
    "+1 grey level": "one grey level added to every pixel (PNG)",
    "-1 grey level": "one grey level taken from every pixel (PNG)",
    "resize 2 %": "enlarged by 2 % (Pillow, bicubic; PNG)",
}
BATCH = 32


def _encode(pixels: np.ndarray, kind: str, quality: int = 95) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    image = Image.fromarray(pixels)
    if kind == "JPEG":
        image.save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def perturbed(data: bytes) -> dict[str, bytes]:
    """The film's bytes re-encoded each way of ``PERTURBATIONS``."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        pixels = np.asarray(image.convert("L" if image.mode in ("L", "I;16", "I") else "RGB"))
    wide = pixels.astype(np.int16)
    height, width = pixels.shape[:2]
    with Image.fromarray(pixels) as image:
        resized = np.asarray(image.resize((round(width * 1.02), round(height * 1.02)), Image.Resampling.BICUBIC))
    return {
        "png (Pillow's pixels)": _encode(pixels, "PNG"),
        "jpeg q95": _encode(pixels, "JPEG", 95),
        "jpeg q85": _encode(pixels, "JPEG", 85),
        "+1 grey level": _encode(np.clip(wide + 1, 0, 255).astype(np.uint8), "PNG"),
        "-1 grey level": _encode(np.clip(wide - 1, 0, 255).astype(np.uint8), "PNG"),
        "resize 2 %": _encode(resized, "PNG"),
    }


def _encoded_films(split: Split) -> list[bytes]:
    """Each film's bytes as a client would send them: the file, or a lossless PNG of an in-memory image."""
    if split.paths is not None:
        return [Path(path).read_bytes() for path in split.paths]
    return [_encode(image if image.ndim == 2 or image.shape[-1] != 1 else image[..., 0], "PNG")
            for image in split.images]


def served_probabilities(model, metadata, encoded: list[bytes]) -> np.ndarray:
    """P(PNEUMONIA) of encoded images as the endpoint computes it (film checks not applied: every film is
    scored, so a change is measured even where a check would refuse)."""
    contract = metadata.input
    probabilities = []
    for start in range(0, len(encoded), BATCH):
        batch = np.stack([model_input(decode_image(data), contract.image_size, contract.intensity)
                          for data in encoded[start:start + BATCH]])
        outputs = model.predict_on_batch(batch)
        raw = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
        probabilities.append(metadata.probabilities(raw))
    return np.concatenate(probabilities)


@dataclasses.dataclass
class FilmMoves:
    """P(PNEUMONIA) of each film of a split from its own bytes (``base``) and from each re-encoding."""

    split: str
    base: np.ndarray
    moved: dict[str, np.ndarray]


def film_moves(model, metadata, split: Split) -> FilmMoves:
    """Every film of ``split`` scored from its own bytes and from each of ``PERTURBATIONS``."""
    films = _encoded_films(split)
    variants = [perturbed(data) for data in films]
    return FilmMoves(split.name, served_probabilities(model, metadata, films),
                     {name: served_probabilities(model, metadata, [variant[name] for variant in variants])
                      for name in PERTURBATIONS})


def summarize(moves: FilmMoves, threshold: float, band: BorderlineBand | None = None,
              log: Callable[[str], None] = print) -> dict:
    """|change in P| and label flips under each perturbation; with a ``band``, the share of films answered firm
    and the flips among them (a firm answer is one whose own bytes score outside the band)."""
    base, films = moves.base, len(moves.base)
    firm = np.ones(films, bool) if band is None else ~band.is_borderline(base)
    rows = {}
    for name, moved in moves.moved.items():
        change = np.abs(moved - base)
        flipped = (moved >= threshold) != (base >= threshold)
        rows[name] = {"mean": float(change.mean()), "p99": float(np.quantile(change, 0.99)),
                      "max": float(change.max()), "flips": int(flipped.sum())}
        said = f"{rows[name]['flips']} label flips"
        if band is not None:
            rows[name]["firm_flips"] = int((flipped & firm).sum())
            said += f", {rows[name]['firm_flips']} among firm answers"
        log(f"stability, {moves.split} ({films} films), {name}: mean |dP| {change.mean():.4f}, p99 "
            f"{rows[name]['p99']:.4f}, max {change.max():.4f}, {said}")
    measured = {"films": films, "threshold": float(threshold), "perturbations": rows}
    if band is not None:
        measured["firm"] = int(firm.sum())
        measured["firm_share"] = float(firm.mean())
        log(f"stability, {moves.split}: {firm.sum()} of {films} films answered firm ({firm.mean():.1%}), outside "
            f"the borderline band {band.low:.3f}-{band.high:.3f}")
    return measured


def measure(model, metadata, split: Split, log: Callable[[str], None] = print) -> dict:
    """|change in P| and label flips of every film of ``split`` under each perturbation, and with the
    package's borderline band the firm answers and their flips."""
    return summarize(film_moves(model, metadata, split), float(metadata.threshold), metadata.borderline, log)


def stability_report(model, metadata, splits: list[Split], command: str, log: Callable[[str], None] = print,
                     measured: dict[str, FilmMoves] | None = None) -> dict:
    """``report.json``'s ``stability``: per split, per perturbation; ``command`` reproduces it. ``measured``:
    splits whose moves are already measured (the evaluation fits the band on validation's)."""
    measured = measured or {}
    return {"command": command, "perturbations": PERTURBATIONS,
            "splits": {split.name: summarize(measured[split.name], float(metadata.threshold), metadata.borderline, log)
                       if split.name in measured else measure(model, metadata, split, log) for split in splits}}
