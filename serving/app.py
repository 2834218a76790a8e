"""Ray Serve application: one deployment, a FastAPI ingress and a batched classifier of one model package.

    serve run serving.app:build_app package=artifacts/VERSION
    serve deploy serving/config.yaml           # the package path is the classifier's user_config

Decoding and resizing run in a thread of the replica before the request joins a batch, with the same
preprocessing training used; only the model call is batched (``@serve.batch``). A new ``package`` in the
user_config swaps the model on live replicas (``reconfigure``).

(No ``from __future__ import annotations`` here: FastAPI must see the route parameters' real types.)
"""

import asyncio
import base64
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import HTMLResponse
from ray import serve

from serving.decode import ACCEPTED_TYPES, InvalidImage, decode_request, sniff_content_type

DEFAULT_MAX_BODY_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000  # above this a small file is a decompression bomb, not an X-ray
TOKEN_ENV = "PNEUMONIA_API_TOKEN"
AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16}
PAGE = (Path(__file__).parent / "static" / "index.html").read_text()


api = FastAPI(title="Pneumonia classifier", description="Chest X-ray pneumonia classification (research use only).")


@serve.deployment(
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=32,
    autoscaling_config=AUTOSCALING,
    health_check_period_s=10,
)
@serve.ingress(api)
class Classifier:
    """The HTTP ingress and the model in one replica: it holds one verified model package and batches
    concurrent requests into one model call. (A separate ingress deployment cost a second hop, about a
    quarter of the server's CPU per request: see BENCHMARKS.md.)"""

    def __init__(self, max_pixels: int = DEFAULT_MAX_PIXELS, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 auth_token: str = ""):
        from models.runtime import configure_tensorflow

        cpus = int(os.environ.get("OMP_NUM_THREADS") or 1)  # Ray sets it to the replica's num_cpus
        configure_tensorflow(cpus, "float32")
        self.max_pixels = max_pixels
        self.max_body_bytes = max_body_bytes
        self.auth_token = auth_token or os.environ.get(TOKEN_ENV, "")
        self.model = None
        self.metadata: dict[str, Any] = {}
        self._info: dict[str, Any] = {}

    def reconfigure(self, user_config: dict) -> None:
        """Load (or swap to) the package at ``user_config['package']``; checksums verified, safe mode."""
        from models.package import load_model_dir

        model, metadata = load_model_dir(user_config["package"])
        size = metadata["input"]["image_size"]
        model.predict_on_batch(np.zeros((1, size, size, 1), np.float32))  # warm up before taking traffic
        package = str(user_config["package"])
        info = {  # what /metadata and every answer report, built once per package
            "model_version": metadata.get("version", os.path.basename(package.rstrip("/"))),
            "class_names": metadata.get("class_names"),
            "input": metadata.get("input"),
            "threshold": metadata.get("threshold"),
            "threshold_method": metadata.get("threshold_method"),
            "test_metrics": metadata.get("test_metrics"),
        }
        self.model, self.metadata, self._info = model, metadata, info  # swapped together

    def check_health(self) -> None:
        if self.model is None:
            raise RuntimeError("no model loaded")

    def info(self) -> dict:
        return self._info

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _predict(self, images: "list[np.ndarray]") -> "list[tuple[float, int]]":
        probabilities = np.asarray(self.model.predict_on_batch(np.stack(images))).reshape(-1)
        return [(float(p), len(images)) for p in probabilities]

    def _explain(self, image: np.ndarray) -> str:
        from models.gradcam import gradcam, overlay_png

        return base64.b64encode(overlay_png(image, gradcam(self.model, image))).decode()

    async def classify(self, body: bytes, content_type: str, explain: bool = False) -> dict:
        size = self.metadata["input"]["image_size"]
        image = await asyncio.to_thread(decode_request, body, content_type, size, self.max_pixels)
        probability, batch_size = await self._predict(image)
        threshold = float(self.metadata["threshold"])
        names = self.metadata["class_names"]
        result = {
            "label": names[int(probability >= threshold)],
            "probability": probability,
            "threshold": threshold,
            "model_version": self._info["model_version"],
            "batch_size": batch_size,
        }
        if explain:  # rare and costlier: outside the batch, in a thread
            result["heatmap_png"] = await asyncio.to_thread(self._explain, image)
        return result

    def _authorize(self, request: Request) -> None:
        if not self.auth_token:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip(), self.auth_token):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    async def _read_image(self, request: Request) -> tuple[bytes, str]:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        declared = int(request.headers.get("content-length") or 0)
        if declared > self.max_body_bytes:
            raise HTTPException(413, f"body of {declared} bytes exceeds the limit of {self.max_body_bytes}")
        if content_type == "multipart/form-data":
            form = await request.form()
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise HTTPException(400, "missing multipart field 'file' (the image)")
            body = await upload.read()
            content_type = (upload.content_type or "").lower()
            if content_type not in ACCEPTED_TYPES:
                content_type = sniff_content_type(body) or content_type
        elif content_type in ACCEPTED_TYPES:
            body = await request.body()
        else:
            raise HTTPException(415, f"unsupported Content-Type {content_type or '(none)'!r}; send one of "
                                     f"{', '.join(ACCEPTED_TYPES)} or multipart/form-data with a 'file' field")
        if len(body) > self.max_body_bytes:
            raise HTTPException(413, f"body of {len(body)} bytes exceeds the limit of {self.max_body_bytes}")
        if content_type not in ACCEPTED_TYPES:
            raise HTTPException(415, f"unsupported upload type {content_type or '(none)'!r}; send one of "
                                     f"{', '.join(ACCEPTED_TYPES)}")
        return body, content_type

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> str:
        """A small page: drop an X-ray, see the label, the probability against the threshold, Grad-CAM."""
        return PAGE

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/metadata")
    async def metadata(self) -> dict:
        return self.info()

    @api.post("/predict")
    async def predict(self, request: Request, response: Response, explain: bool = False) -> dict:
        """The image as the raw body (image/jpeg, image/png, application/dicom) or multipart field 'file';
        ``?explain=true`` adds ``heatmap_png``, a base64 PNG of the Grad-CAM overlay."""
        self._authorize(request)
        body, content_type = await self._read_image(request)
        try:
            result = await self.classify(body, content_type, explain)
        except InvalidImage as exc:
            raise HTTPException(400, str(exc)) from None
        response.headers["X-Batch-Size"] = str(result.pop("batch_size"))
        return result


def build_app(args: dict) -> serve.Application:
    """Builder for ``serve run`` / ``serve deploy``. ``args``: package (required), replicas (a fixed count
    instead of autoscaling), autoscaling (overrides of the classifier's autoscaling_config), num_cpus (per
    classifier replica, default 1), max_body_bytes,
    max_pixels, auth_token (else $PNEUMONIA_API_TOKEN)."""
    if not args.get("package"):
        raise ValueError("serving needs args.package: the model package directory (artifacts/VERSION)")
    options: dict[str, Any] = {"user_config": {"package": str(args["package"])}}
    if args.get("num_cpus"):  # per classifier replica; its TF threads follow
        options["ray_actor_options"] = {"num_cpus": float(args["num_cpus"])}
    if args.get("replicas"):
        options.update(num_replicas=int(args["replicas"]), autoscaling_config=None)
    elif args.get("autoscaling"):
        options["autoscaling_config"] = {**AUTOSCALING, **args["autoscaling"]}
    return Classifier.options(**options).bind(int(args.get("max_pixels", DEFAULT_MAX_PIXELS)),
                                              int(args.get("max_body_bytes", DEFAULT_MAX_BODY_BYTES)),
                                              str(args.get("auth_token", "")))
