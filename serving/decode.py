"""Request bytes -> model input, through the training preprocessing; every failure is an InvalidImage
whose message says what is wrong (the endpoint turns it into a 4xx)."""

from __future__ import annotations

import io

import numpy as np

from data.film_checks import FilmChecks, model_input
from data.preprocessing import decode_image

IMAGE_TYPES = {"image/jpeg": "JPEG", "image/png": "PNG"}
DICOM_TYPE = "application/dicom"
ACCEPTED_TYPES = (*IMAGE_TYPES, DICOM_TYPE)


class InvalidImage(ValueError):
    """The request's bytes are not an image this endpoint can classify."""


def sniff_content_type(body: bytes) -> str | None:
    """The content type the bytes themselves announce (for uploads sent as application/octet-stream)."""
    if body[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if body[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if body[128:132] == b"DICM":
        return DICOM_TYPE
    return None


def _dicom_pixels(body: bytes, max_pixels: int) -> np.ndarray:
    """DICOM -> float32 (H, W, 1) in [0, 1]: modality LUT (rescale), VOI LUT / window as stored, scaled by
    the stored bit depth (so an 8-bit film gives the values its JPEG gives; min-max only when the LUTs
    leave that range), MONOCHROME1 inverted so that bone is bright as in the training films."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        dataset = pydicom.dcmread(io.BytesIO(body))
        rows, columns = int(dataset.Rows), int(dataset.Columns)
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: pydicom raises anything on a malformed file
        raise InvalidImage(f"malformed DICOM: {exc}") from None
    if rows * columns > max_pixels:
        raise InvalidImage(f"image of {columns}x{rows} pixels exceeds the limit of {max_pixels} pixels")
    try:
        pixels = dataset.pixel_array
        if pixels.ndim != 2:
            raise InvalidImage(f"DICOM pixel data of shape {pixels.shape}: expected one grayscale frame")
        pixels = apply_voi_lut(apply_modality_lut(pixels, dataset), dataset).astype(np.float64)
    except InvalidImage:
        raise
    except Exception as exc:  # noqa: BLE001 - the pixel codecs raise anything on malformed data
        raise InvalidImage(f"malformed DICOM pixel data: {exc}") from None
    top = float(2 ** int(getattr(dataset, "BitsStored", 8)) - 1)
    low, high = float(pixels.min()), float(pixels.max())
    if 0.0 <= low and high <= top:
        scaled = pixels / top
    else:
        scaled = (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)
    if str(getattr(dataset, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        scaled = 1.0 - scaled
    return scaled.astype(np.float32)[..., np.newaxis]


def decode_request(body: bytes, content_type: str, image_size: int, max_pixels: int,
                   intensity: str = "none", checks: FilmChecks | None = None) -> np.ndarray:
    """Request bytes -> the model input (S, S, 1) float32, through the training preprocessing (the package's
    input contract gives ``image_size`` and ``intensity``); ``checks`` (the package's) raise
    ``data.film_checks.NotAFilm`` for a decodable image that is not a film."""
    if not body:
        raise InvalidImage("empty request body: send the image bytes")
    pixels = _dicom_pixels(body, max_pixels) if content_type == DICOM_TYPE else _decoded(body, content_type, max_pixels)
    return model_input(pixels, image_size, intensity, checks)


def _decoded(body: bytes, content_type: str, max_pixels: int):
    """JPEG or PNG bytes -> float32 (H, W, 3) in [0, 1]; the size is checked on the header before decoding."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(body)) as header:  # the header only: the size is known before decoding
            width, height = header.size
            kind = header.format
    except (UnidentifiedImageError, OSError) as exc:
        raise InvalidImage(f"the body is not a readable image ({content_type}): {exc}") from None
    if width * height > max_pixels:
        raise InvalidImage(f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels")
    if kind != IMAGE_TYPES.get(content_type):
        raise InvalidImage(f"the body is {kind} but was sent as {content_type}")
    try:
        return decode_image(body)
    except Exception as exc:  # noqa: BLE001 - a truncated or corrupt stream fails in the decoder
        raise InvalidImage(f"the image could not be decoded (truncated or corrupt?): {exc}") from None
