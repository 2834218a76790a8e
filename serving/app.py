"""Ray Serve application: a FastAPI ingress in front of a batched classifier serving one model package.

    serve run serving.app:build_app package=artifacts/VERSION
    serve deploy serving/config.yaml           # the package path is the classifier's user_config

Decoding and resizing run in the classifier replica before it joins a batch, with the same preprocessing
training used; only the model call is batched (``@serve.batch``). A new ``package`` in the user_config
swaps the model on live replicas (``reconfigure``).
"""


import asyncio
import io
import os
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

ACCEPTED_TYPES = ("image/jpeg", "image/png")
DEFAULT_MAX_BODY_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000  # above this a small file is a decompression bomb, not an X-ray


class InvalidImage(ValueError):
    """The request's bytes are not an image this endpoint can classify."""


def decode_request(body: bytes, content_type: str, image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Request bytes -> the model input (S, S, 1) float32, through the training preprocessing."""
    from PIL import Image, UnidentifiedImageError

    from models.preprocessing import decode_image, preprocess

    if not body:
        raise InvalidImage("empty request body: send the image bytes")
    try:
        with Image.open(io.BytesIO(body)) as header:  # reads the header only: size before any decoding
            width, height = header.size
            kind = header.format
    except (UnidentifiedImageError, OSError) as exc:
        raise InvalidImage(f"the body is not a readable image ({content_type}): {exc}") from None
    if width * height > max_pixels:
        raise InvalidImage(f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels")
    if kind not in ("JPEG", "PNG"):
        raise InvalidImage(f"unsupported image format {kind}; send JPEG or PNG")
    try:
        return preprocess(decode_image(body), image_size).numpy()
    except Exception as exc:  # a truncated or corrupt stream fails in the decoder
        raise InvalidImage(f"the image could not be decoded (truncated or corrupt?): {exc}") from None


@serve.deployment(
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=32,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16},
    health_check_period_s=10,
)
class Classifier:
    """Holds one verified model package; batches concurrent requests into one model call."""

    def __init__(self, max_pixels: int = DEFAULT_MAX_PIXELS):
        from models.runtime import configure_tensorflow

        cpus = int(os.environ.get("OMP_NUM_THREADS") or 1)  # Ray sets it to the replica's num_cpus
        configure_tensorflow(cpus, "float32")
        self.max_pixels = max_pixels
        self.model = None
        self.metadata: dict[str, Any] = {}

    def reconfigure(self, user_config: dict) -> None:
        """Load (or swap to) the package at ``user_config['package']``; checksums verified, safe mode."""
        from models.package import load_model_dir

        model, metadata = load_model_dir(user_config["package"])
        size = metadata["input"]["image_size"]
        model.predict_on_batch(np.zeros((1, size, size, 1), np.float32))  # warm up before taking traffic
        self.model, self.metadata = model, {**metadata, "package": user_config["package"]}

    def check_health(self) -> None:
        if self.model is None:
            raise RuntimeError("no model loaded")

    def info(self) -> dict:
        m = self.metadata
        return {
            "model_version": m.get("version", os.path.basename(str(m.get("package", "")).rstrip("/"))),
            "class_names": m.get("class_names"),
            "input": m.get("input"),
            "threshold": m.get("threshold"),
            "threshold_method": m.get("threshold_method"),
            "test_metrics": m.get("test_metrics"),
        }

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _predict(self, images: "list[np.ndarray]") -> "list[tuple[float, int]]":
        probabilities = np.asarray(self.model.predict_on_batch(np.stack(images))).reshape(-1)
        return [(float(p), len(images)) for p in probabilities]

    async def predict(self, body: bytes, content_type: str) -> dict:
        size = self.metadata["input"]["image_size"]
        image = await asyncio.to_thread(decode_request, body, content_type, size, self.max_pixels)
        probability, batch_size = await self._predict(image)
        threshold = float(self.metadata["threshold"])
        names = self.metadata["class_names"]
        return {
            "label": names[int(probability >= threshold)],
            "probability": probability,
            "threshold": threshold,
            "model_version": self.info()["model_version"],
            "batch_size": batch_size,
        }


api = FastAPI(title="Pneumonia classifier", description="Chest X-ray pneumonia classification (research use only).")


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(api)
class Api:
    def __init__(self, classifier: DeploymentHandle, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.classifier = classifier
        self.max_body_bytes = max_body_bytes

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/metadata")
    async def metadata(self) -> dict:
        return await self.classifier.info.remote()

    @api.post("/predict")
    async def predict(self, request: Request, response: Response) -> dict:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in ACCEPTED_TYPES:
            raise HTTPException(415, f"unsupported Content-Type {content_type or '(none)'!r}; send one of "
                                     f"{', '.join(ACCEPTED_TYPES)}")
        declared = int(request.headers.get("content-length") or 0)
        if declared > self.max_body_bytes:
            raise HTTPException(413, f"body of {declared} bytes exceeds the limit of {self.max_body_bytes}")
        body = await request.body()
        if len(body) > self.max_body_bytes:
            raise HTTPException(413, f"body of {len(body)} bytes exceeds the limit of {self.max_body_bytes}")
        try:
            result = await self.classifier.predict.remote(body, content_type)
        except InvalidImage as exc:
            raise HTTPException(400, str(exc)) from None
        response.headers["X-Batch-Size"] = str(result.pop("batch_size"))
        return result


def build_app(args: dict) -> serve.Application:
    """Builder for ``serve run`` / ``serve deploy``: ``args`` = {package, max_body_bytes?, max_pixels?}."""
    if "package" not in args:
        raise ValueError("serving needs args.package: the model package directory (artifacts/VERSION)")
    classifier = Classifier.options(user_config={"package": str(args["package"])}).bind(
        int(args.get("max_pixels", DEFAULT_MAX_PIXELS)))
    return Api.bind(classifier, int(args.get("max_body_bytes", DEFAULT_MAX_BODY_BYTES)))
