"""Stable answers: does P(pneumonia) move when the same film is re-encoded in ways that change nothing a
reader would see?

A hospital's PACS, a browser or a client library re-encodes films all the time; a clinician who gets two
answers for one film stops trusting the tool. Each film is re-encoded benignly (``PERTURBATIONS``), every
version goes through the endpoint's own path (bytes -> ``models.preprocessing.decode_image`` ->
``models.film_checks.model_input`` -> the served model and calibration), and the change in P against the
film's own bytes is reported: mean, 99th percentile and largest |change|, and how many labels flip at the
package's threshold. No label of the data is read, only the images.

    pneumonia stability --package artifacts/VERSION [--split val] [--split test]
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np

from models.dataset import Split
from models.film_checks import model_input
from models.preprocessing import decode_image

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


def measure(model, metadata, split: Split, log: Callable[[str], None] = print) -> dict:
    """|change in P| and label flips of every film of ``split`` under each perturbation."""
    films = _encoded_films(split)
    base = served_probabilities(model, metadata, films)
    variants = [perturbed(data) for data in films]
    threshold = float(metadata.threshold)
    rows = {}
    for name in PERTURBATIONS:
        moved = served_probabilities(model, metadata, [variant[name] for variant in variants])
        change = np.abs(moved - base)
        flips = int(np.sum((moved >= threshold) != (base >= threshold)))
        rows[name] = {"mean": float(change.mean()), "p99": float(np.quantile(change, 0.99)),
                      "max": float(change.max()), "flips": flips}
        log(f"stability, {split.name} ({len(films)} films), {name}: mean |dP| {change.mean():.4f}, p99 "
            f"{rows[name]['p99']:.4f}, max {change.max():.4f}, {flips} label flips")
    return {"films": len(films), "threshold": threshold, "perturbations": rows}


def stability_report(model, metadata, splits: list[Split], command: str, log: Callable[[str], None] = print) -> dict:
    """``report.json``'s ``stability``: per split, per perturbation; ``command`` reproduces it."""
    return {"command": command, "perturbations": PERTURBATIONS,
            "splits": {split.name: measure(model, metadata, split, log) for split in splits}}
