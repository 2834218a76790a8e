"""The out-of-distribution check set: images that are not frontal pediatric chest films, from what packages ship.

Kinds: photos (scikit-image's and scikit-learn's sample images), documents (a scanned page, text, a logo),
other imaging (microscopy, a retina, a CT phantom, the moon...), synthetic (noise, gradients, checkerboards),
blank (uniform or nearly uniform at grey levels from black to white, from 1x1 to 300x300 pixels and as a
1x5000 strip), and chest films transformed into invalid input (rotated 90 degrees, inverted, cropped to one
corner, tiled 2x2, shrunk to a thumbnail, cut to a strip). Every image is encoded as PNG and decoded by the
one preprocessing path, exactly as the endpoint would receive it.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np

PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket", "clock", "coins", "brick", "grass", "gravel",
          "hubble_deep_field", "stereo_motorcycle")
DOCUMENTS = ("page", "text", "logo", "colorwheel")
OTHER_IMAGING = ("cell", "immunohistochemistry", "microaneurysms", "retina", "shepp_logan_phantom", "moon")
CHEST_TRANSFORMS = ("rotated 90 degrees", "inverted", "corner crop", "tiled 2x2", "tiny", "strip")
BLANK_LEVELS = (0, 1, 64, 128, 192, 254, 255)
BLANK_SHAPES = ((1, 1), (16, 16), (300, 300), (1, 5000), (224, 224))  # (height, width)


@dataclasses.dataclass(frozen=True)
class OodImage:
    kind: str  # photo, document, other imaging, synthetic, or a chest transform
    name: str
    png: bytes


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    pixels = np.asarray(pixels)
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8) * 255
    elif pixels.dtype != np.uint8:
        low, high = float(pixels.min()), float(pixels.max())
        pixels = ((pixels - low) / (high - low or 1.0) * 255).astype(np.uint8)
    if pixels.ndim == 3 and pixels.shape[-1] == 4:
        pixels = pixels[..., :3]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _synthetic(size: int = 224, seed: int = 0) -> list[OodImage]:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size)
    y, x = np.mgrid[:size, :size]
    radius = np.hypot(y - size / 2, x - size / 2)
    images = {
        "uniform noise": rng.integers(0, 256, (size, size), dtype=np.uint8),
        "gaussian noise": np.clip(rng.normal(128, 40, (size, size)), 0, 255).astype(np.uint8),
        "colour noise": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        "horizontal gradient": np.tile(ramp, (size, 1)).astype(np.uint8),
        "vertical gradient": np.tile(ramp[:, None], (1, size)).astype(np.uint8),
        "radial gradient": (255 * radius / radius.max()).astype(np.uint8),
        "checkerboard 8 px": (((y // 8 + x // 8) % 2) * 255).astype(np.uint8),
        "checkerboard 32 px": (((y // 32 + x // 32) % 2) * 255).astype(np.uint8),
    }
    return [OodImage("synthetic", name, _png(pixels)) for name, pixels in images.items()]


def _blank(seed: int = 0) -> list[OodImage]:
    """Uniform images at every level and shape, and 300x300 ones with +-1 grey level of noise."""
    rng = np.random.default_rng(seed)
    images = [OodImage("blank", f"{level} at {h}x{w}", _png(np.full((h, w), level, np.uint8)))
              for level in BLANK_LEVELS for h, w in BLANK_SHAPES]
    for level in BLANK_LEVELS:
        noisy = np.clip(level + rng.integers(-1, 2, (300, 300)), 0, 255).astype(np.uint8)
        images.append(OodImage("blank", f"{level} +-1 at 300x300", _png(noisy)))
    return images


def _bundled(names: tuple[str, ...], kind: str) -> list[OodImage]:
    import skimage.data

    images = []
    for name in names:
        pixels = getattr(skimage.data, name)()
        images.append(OodImage(kind, name, _png(pixels[0] if isinstance(pixels, tuple) else pixels)))  # stereo: left
    return images


def chest_transforms(films: list[np.ndarray]) -> list[OodImage]:
    """Each (H, W) uint8 chest film made invalid six ways: rotated, inverted, a corner, tiled, shrunk to
    16x16 (box filter), cut to a strip of a tenth of its height (alternately a row band and a column band)."""
    from PIL import Image

    images = []
    for i, film in enumerate(films):
        h, w = film.shape
        band = max(1, h // 10)
        variants = {
            "rotated 90 degrees": np.rot90(film),
            "inverted": 255 - film,
            "corner crop": film[: h // 4, : w // 4],
            "tiled 2x2": np.block([[film, film], [film, film]]),
            "tiny": np.asarray(Image.fromarray(film).resize((16, 16), Image.Resampling.BOX)),
            "strip": film[h // 2: h // 2 + band, :] if i % 2 == 0 else film[:, w // 2: w // 2 + band],
        }
        images += [OodImage(kind, f"{kind} #{i}", _png(pixels)) for kind, pixels in variants.items()]
    return images


def ood_images(chest_films: list[np.ndarray]) -> list[OodImage]:
    """The whole check set; ``chest_films`` (gray uint8) are the in-distribution films to transform."""
    from sklearn.datasets import load_sample_images

    samples = load_sample_images()
    photos = _bundled(PHOTOS, "photo") + [
        OodImage("photo", f"scikit-learn {name.rsplit('/', 1)[-1]}", _png(image))
        for name, image in zip(samples.filenames, samples.images)]
    return [*photos, *_bundled(DOCUMENTS, "document"), *_bundled(OTHER_IMAGING, "other imaging"), *_synthetic(),
            *_blank(), *chest_transforms(chest_films)]


def read_gray(paths) -> list[np.ndarray]:
    from PIL import Image

    films = []
    for path in paths:
        with Image.open(path) as image:
            films.append(np.asarray(image.convert("L")))
    return films
