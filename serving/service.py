"""What one classifier replica does, as plain Python: read and check a request, decode it, call the model, shape
the answer. No Ray here, so it is unit-tested in milliseconds; ``serving.app`` wraps it in a Serve deployment
that adds batching, autoscaling and hot swaps.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hmac
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import HTTPException, Request

from data.film_checks import REASONS, FilmChecks, NotAFilm
from models.gradcam import gradcam
from models.inference import batch_predictor, recorded_runtime
from models.ood import OodScorer, with_embedding
from models.package import PackageMetadata, load_model_dir, load_ood_scorer
from serving.decode import ACCEPTED_TYPES, InvalidImage, decode_request, sniff_content_type
from serving.overlay import overlay_png
from serving.package_source import local_path
from serving.settings import ServeSettings

Loader = Callable[[str], tuple[Any, PackageMetadata, OodScorer | None]]  # package -> (model, metadata, gate)
Scored = tuple[float, float | None, int]  # (probability, OOD score or None, batch size)
BatchedCall = Callable[[np.ndarray], Awaitable[Scored]]
log = logging.getLogger(__name__)
NO_GATE = {"method": None, "note": "no out-of-distribution gate: this package was made before packages carried one; "
                                   "every decodable image is classified"}


def load_package(package: str) -> tuple[Any, PackageMetadata, OodScorer | None]:
    """The verified model, its metadata and its fitted OOD scorer (None for a package without a gate), from
    wherever this node finds the package (``serving.package_source``: a folder, shipped, or in storage)."""
    directory = local_path(package)
    model, metadata = load_model_dir(directory)
    return model, metadata, load_ood_scorer(directory, metadata)


class Refused(Exception):
    """An image the endpoint will not classify (HTTP 422): ``reason`` names the check (a metrics label),
    ``body`` is the JSON answer."""

    reason = "refused"

    def __init__(self, detail: str, **fields: Any):
        super().__init__(detail)
        self.body = {"detail": detail, "reason": self.reason, **fields}


class OutOfDistribution(Refused):
    """The gate refused the image: it does not look like the films the model was trained on."""

    reason = "ood_gate"

    def __init__(self, score: float, threshold: float):
        super().__init__("not a chest radiograph like the training data (frontal pediatric chest film); "
                         "?force=true classifies it anyway, for research use", ood_score=score, ood_threshold=threshold)


class NotAChestFilm(Refused):
    """A check before the model refused the image (``data.film_checks``): blank, too small, a strip, inverted.
    Not overridden by ``?force=true``: there is no film to classify."""

    def __init__(self, refused: NotAFilm):
        self.reason = refused.reason
        super().__init__(str(refused))


def film_checks_info(checks: FilmChecks | None) -> dict[str, Any] | None:
    """What /metadata says of the checks before the model (their thumbnail weights left out)."""
    if checks is None:
        return None
    return {**{k: v for k, v in dataclasses.asdict(checks).items() if k != "inversion_weights"}, "reasons": list(REASONS)}


class LoadedPackage:
    """A verified model package in memory: the model (with its embedding output when the package has an OOD
    gate, so one call gives both) run by the runtime that computed the package's numbers (``models.inference``:
    ONNX Runtime for a package evaluated with it, Keras for one made before packages recorded it), its metadata,
    its gate, and what every answer reports. Grad-CAM needs gradients, so it runs the Keras classifier itself."""

    def __init__(self, package: str, loader: Loader = load_package):
        self.classifier, self.metadata, self.scorer = loader(package)
        # what a batch goes through: the package's runtime, unless $PNEUMONIA_INFERENCE_RUNTIME says otherwise
        evaluated = recorded_runtime(self.metadata.runtime)
        self.model = batch_predictor(self.classifier if self.scorer is None else with_embedding(self.classifier),
                                     evaluated)
        served = getattr(self.model, "runtime", evaluated)
        if served.split()[0] != evaluated:
            log.warning(f"{package}: its numbers came from {evaluated}, it is served by {served}: the served numbers "
                        f"differ from the evaluated ones by that runtime's rounding (models/inference.py)")
        size = self.metadata.image_size
        self.predict([np.zeros((size, size, 1), np.float32)])  # warm up before taking traffic
        self.version = self.metadata.version or Path(str(package).rstrip("/")).name
        ood = self.metadata.ood
        self.info = {
            "model_version": self.version,
            "class_names": self.metadata.class_names,
            "input": self.metadata.to_dict()["input"],
            "threshold": self.metadata.threshold,
            "threshold_method": self.metadata.threshold_method,
            "calibration": None if self.metadata.calibration is None else dataclasses.asdict(self.metadata.calibration),
            "test_metrics": self.metadata.test_metrics,
            "ood": NO_GATE if ood is None else dataclasses.asdict(ood),
            "film_checks": film_checks_info(self.metadata.film_checks),
            "borderline": None if self.metadata.borderline is None else dataclasses.asdict(self.metadata.borderline),
        }

    def predict(self, images: list[np.ndarray]) -> list[tuple[float, float | None]]:
        """(P(PNEUMONIA) calibrated as the package says, OOD score or None) of preprocessed images, in one call."""
        outputs = self.model.predict_on_batch(np.stack(images))
        if self.scorer is None:
            return [(float(p), None) for p in self.metadata.probabilities(outputs)]
        raw, embeddings = (np.asarray(o) for o in outputs)
        scores = self.scorer.score(embeddings, raw)
        return [(float(p), float(s)) for p, s in zip(self.metadata.probabilities(raw), scores)]

    def answer(self, probability: float, ood_score: float | None, force: bool = False) -> dict[str, Any]:
        """The answer's fields; raises OutOfDistribution above the gate unless ``force``."""
        threshold = float(self.metadata.threshold)
        result = {"label": self.metadata.class_names[int(probability >= threshold)], "probability": float(probability),
                  "threshold": threshold, "model_version": self.version}
        band = self.metadata.borderline
        if band is not None:
            result.update(certainty=band.certainty(probability), borderline_band=[band.low, band.high])
        if ood_score is not None:
            refused = ood_score > self.metadata.ood.threshold
            if refused and not force:
                raise OutOfDistribution(ood_score, self.metadata.ood.threshold)
            result.update(ood_score=ood_score, ood_threshold=self.metadata.ood.threshold, out_of_distribution=refused)
        return result

    def explain(self, image: np.ndarray) -> str:
        """The Grad-CAM overlay of one preprocessed image, as base64 PNG."""
        return base64.b64encode(overlay_png(image, gradcam(self.classifier, image))).decode()


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

    def __init__(self, settings: ServeSettings, loader: Loader = load_package):
        self.settings = settings
        self.loader = loader
        self.token = settings.token()
        self.loaded: LoadedPackage | None = None
        self.swap_error: str | None = None

    def load(self, package: str) -> None:
        """Load (or swap to) ``package``; the old one serves until the new one is ready. A replica that cannot load
        its first package fails to start, with the error naming the package; a swap that fails leaves the package
        it had serving, logs the error and shows it in /metadata (``swap_error``) until a swap succeeds."""
        try:
            loaded = LoadedPackage(str(package), self.loader)
        except Exception as exc:
            if self.loaded is None:
                raise
            self.swap_error = f"{package}: {exc}"
            log.error(f"swap to {package} failed; {self.loaded.version} keeps serving: {exc}")
            return
        self.loaded, self.swap_error = loaded, None

    def check_health(self) -> None:
        if self.loaded is None:
            raise RuntimeError("no model loaded")

    def info(self) -> dict[str, Any]:
        return {**self.loaded.info, "security": self.settings.security(), "swap_error": self.swap_error}

    def predict_batch(self, images: list[np.ndarray]) -> list[Scored]:
        """One model call for a batch of preprocessed images: (probability, OOD score, batch size) for each."""
        return [(p, score, len(images)) for p, score in self.loaded.predict(images)]

    async def predict(self, request: Request, explain: bool, batched: BatchedCall,
                      force: bool = False) -> tuple[dict[str, Any], int]:
        """Authorize, read, decode (in a thread), check that it is a film, classify through ``batched``; returns
        (answer, batch size). Raises NotAChestFilm for an image the package's film checks refuse, and
        OutOfDistribution for one its gate refuses, unless ``force``."""
        authorize(request.headers.get("authorization"), self.token)
        body, content_type = await read_image(request, self.settings.max_body_bytes)
        loaded = self.loaded  # one package for the whole request, even across a hot swap
        try:
            contract = loaded.metadata.input
            image = await asyncio.to_thread(decode_request, body, content_type, contract.image_size,
                                            self.settings.max_pixels, contract.intensity, loaded.metadata.film_checks)
        except InvalidImage as exc:
            raise HTTPException(400, str(exc)) from None
        except NotAFilm as refused:
            raise NotAChestFilm(refused) from None
        probability, ood_score, batch_size = await batched(image)
        result = loaded.answer(probability, ood_score, force)
        if explain:  # rare and costlier: outside the batch, in a thread
            result["heatmap_png"] = await asyncio.to_thread(loaded.explain, image)
        return result, batch_size
