"""What one classifier replica does, as plain Python: read and check a request, decode it, call the model, shape
the answer. No Ray here, so it is unit-tested in milliseconds; ``serving.app`` wraps it in a Serve deployment
that adds batching, autoscaling and hot swaps.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import HTTPException, Request

from models.package import PackageMetadata, load_model_dir
from serving.decode import ACCEPTED_TYPES, InvalidImage, decode_request, sniff_content_type
from serving.settings import ServeSettings

Loader = Callable[[str], tuple[Any, PackageMetadata]]
BatchedCall = Callable[[np.ndarray], Awaitable[tuple[float, int]]]  # one image -> (probability, batch size)


class LoadedPackage:
    """A verified model package in memory: the model, its metadata and what every answer reports."""

    def __init__(self, package: str, loader: Loader = load_model_dir):
        self.model, self.metadata = loader(package)
        size = self.metadata.image_size
        self.model.predict_on_batch(np.zeros((1, size, size, 1), np.float32))  # warm up before taking traffic
        self.version = self.metadata.version or Path(str(package).rstrip("/")).name
        self.info = {
            "model_version": self.version,
            "class_names": self.metadata.class_names,
            "input": self.metadata.to_dict()["input"],
            "threshold": self.metadata.threshold,
            "threshold_method": self.metadata.threshold_method,
            "test_metrics": self.metadata.test_metrics,
        }

    def predict(self, images: list[np.ndarray]) -> np.ndarray:
        """P(PNEUMONIA) of preprocessed images, in one model call."""
        return np.asarray(self.model.predict_on_batch(np.stack(images))).reshape(-1)

    def answer(self, probability: float) -> dict[str, Any]:
        threshold = float(self.metadata.threshold)
        return {"label": self.metadata.class_names[int(probability >= threshold)], "probability": float(probability),
                "threshold": threshold, "model_version": self.version}

    def explain(self, image: np.ndarray) -> str:
        """The Grad-CAM overlay of one preprocessed image, as base64 PNG."""
        from models.gradcam import gradcam
        from serving.overlay import overlay_png

        return base64.b64encode(overlay_png(image, gradcam(self.model, image))).decode()


def authorize(authorization: str | None, token: str) -> None:
    """401 unless ``Authorization: Bearer <token>`` when a token is set. Compared as bytes: a header with
    non-ASCII characters is a wrong token, not a server error."""
    if not token:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


def media_type(header: str | None) -> str:
    return (header or "").split(";")[0].strip().lower()


async def read_image(request: Request, max_body_bytes: int) -> tuple[bytes, str]:
    """The image bytes and their content type, from the raw body or the multipart field ``file``."""
    content_type = media_type(request.headers.get("content-type"))
    declared = request.headers.get("content-length") or "0"
    if not declared.isdigit():
        raise HTTPException(400, f"Content-Length {declared!r} is not a byte count")
    if int(declared) > max_body_bytes:
        raise HTTPException(413, f"body of {declared} bytes exceeds the limit of {max_body_bytes}")
    if content_type == "multipart/form-data":
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise HTTPException(400, "missing multipart field 'file' (the image)")
        body = await upload.read()
        content_type = media_type(upload.content_type)
        if content_type not in ACCEPTED_TYPES:
            content_type = sniff_content_type(body) or content_type
    elif content_type in ACCEPTED_TYPES:
        body = await request.body()
    else:
        raise HTTPException(415, f"unsupported Content-Type {content_type or '(none)'!r}; send one of "
                                 f"{', '.join(ACCEPTED_TYPES)} or multipart/form-data with a 'file' field")
    if len(body) > max_body_bytes:
        raise HTTPException(413, f"body of {len(body)} bytes exceeds the limit of {max_body_bytes}")
    if content_type not in ACCEPTED_TYPES:
        raise HTTPException(415, f"unsupported upload type {content_type or '(none)'!r}; send one of "
                                 f"{', '.join(ACCEPTED_TYPES)}")
    return body, content_type


class ClassifierService:
    """The replica's state (settings, the loaded package) and its request handling."""

    def __init__(self, settings: ServeSettings, loader: Loader = load_model_dir):
        self.settings = settings
        self.loader = loader
        self.token = settings.token()
        self.loaded: LoadedPackage | None = None

    def load(self, package: str) -> None:
        """Load (or swap to) ``package``; the old one serves until the new one is ready."""
        self.loaded = LoadedPackage(str(package), self.loader)

    def check_health(self) -> None:
        if self.loaded is None:
            raise RuntimeError("no model loaded")

    def info(self) -> dict[str, Any]:
        return self.loaded.info

    def predict_batch(self, images: list[np.ndarray]) -> list[tuple[float, int]]:
        """One model call for a batch of preprocessed images: (probability, batch size) for each."""
        return [(float(p), len(images)) for p in self.loaded.predict(images)]

    async def predict(self, request: Request, explain: bool, batched: BatchedCall) -> tuple[dict[str, Any], int]:
        """Authorize, read, decode (in a thread), classify through ``batched``; returns (answer, batch size)."""
        authorize(request.headers.get("authorization"), self.token)
        body, content_type = await read_image(request, self.settings.max_body_bytes)
        loaded = self.loaded  # one package for the whole request, even across a hot swap
        try:
            image = await asyncio.to_thread(decode_request, body, content_type, loaded.metadata.image_size,
                                            self.settings.max_pixels)
        except InvalidImage as exc:
            raise HTTPException(400, str(exc)) from None
        probability, batch_size = await batched(image)
        result = loaded.answer(probability)
        if explain:  # rare and costlier: outside the batch, in a thread
            result["heatmap_png"] = await asyncio.to_thread(loaded.explain, image)
        return result, batch_size
