"""Ray Serve application: one deployment, a FastAPI ingress and a batched classifier of one model package.

    serve run serving.app:build_app package=artifacts/VERSION
    serve deploy serving/config.yaml           # its args are ServeSettings (serving/settings.py)

The request handling lives in ``serving.service`` (plain Python); this module adds what only Serve does:
``@serve.batch`` around the model call, autoscaling, what a replica takes at once and Serve's own count bound
(the waiting-time bound is HAProxy's: ``serving.settings``), health checks, hot swaps of the
package through the deployment's ``user_config`` (``reconfigure``), and the metrics (``serving.metrics``).

(No ``from __future__ import annotations`` here: FastAPI must see the route parameters' real types.)
"""

import functools
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve

from runtime.tensorflow_setup import configure_tensorflow
from serving.metrics import EndpointMetrics
from serving.schema import PREDICT_REQUEST, Health, Metadata, Prediction, errors
from serving.service import ClassifierService, Refused
from serving.settings import AUTOSCALING, MAX_BATCH_SIZE, ServeSettings

api = FastAPI(title="Pneumonia classifier", description="Chest X-ray pneumonia classification (research use only).")


@functools.cache
def page_html() -> str:
    return (Path(__file__).parent / "static" / "index.html").read_text()


@serve.deployment(  # replicas, CPUs, the queue's bound and autoscaling: ServeSettings.deployment_options
    ray_actor_options={"num_cpus": 1},
    autoscaling_config=AUTOSCALING,
    health_check_period_s=10,
    # a replica replaced (a new package) or scaled down answers what it holds first, for up to 60 s: Serve's 20 s
    # default dropped a request in flight during a swap on a saturated machine (issue 23)
    graceful_shutdown_timeout_s=60,
)
@serve.ingress(api)
class Classifier:
    """The HTTP ingress and the model in one replica: it holds one verified model package and batches
    concurrent requests into one model call. (A separate ingress deployment cost a second hop, about a
    quarter of the server's CPU per request: see BENCHMARKS.md.)"""

    def __init__(self, settings: ServeSettings):
        cpus = int(os.environ.get("OMP_NUM_THREADS") or 1)  # Ray sets it to the replica's num_cpus
        configure_tensorflow(cpus, "float32")
        self.service = ClassifierService(settings)
        self.metrics = EndpointMetrics(serve.get_replica_context().app_name)
        # a batch never holds more than the requests the replica takes at once: with a full one it need not
        # wait out batch_wait_timeout_s for requests Serve will not let in
        self._predict_batch.set_max_batch_size(settings.batch)

    def reconfigure(self, user_config: dict) -> None:
        """Load (or swap to) the package at ``user_config['package']``; checksums verified, safe mode."""
        self.service.load(user_config["package"])

    def check_health(self) -> None:
        self.service.check_health()

    def __del__(self) -> None:  # Serve calls it when the replica shuts down
        if hasattr(self, "metrics"):
            self.metrics.close()

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=0.005)
    async def _predict_batch(self, images: "list[np.ndarray]") -> "list[tuple[float, float | None, int]]":
        start = time.perf_counter()
        scored = self.service.predict_batch(images)
        gate = self.service.loaded.metadata.ood
        self.metrics.model_call(time.perf_counter() - start, scored, gate.threshold if gate else None)
        return scored

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> str:
        """A small page: drop an X-ray, see the label, the probability against the threshold, Grad-CAM."""
        return page_html()

    @api.get("/healthz", response_model=Health)
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/metadata", response_model=Metadata)
    async def metadata(self) -> dict:
        """The package: version, input contract, threshold, calibration, test metrics, the OOD gate."""
        return self.service.info()

    @api.post("/predict", response_model=Prediction, response_model_exclude_none=True,
              openapi_extra=PREDICT_REQUEST, responses=errors(400, 401, 413, 415, 422))
    async def predict(self, request: Request, response: Response, explain: bool = False, force: bool = False):
        """Classify one chest film. The image as the raw body (image/jpeg, image/png, application/dicom) or
        the multipart field ``file``. An image unlike the training films is refused with 422 (its OOD score
        and the gate's threshold in the body); ``?force=true`` classifies it anyway, marked
        ``out_of_distribution``, for research use. ``?explain=true`` adds ``heatmap_png``, a base64 PNG of
        the Grad-CAM overlay. The header ``X-Batch-Size`` says how many requests shared the model call."""
        try:
            result, batch_size = await self.service.predict(request, explain, self._predict_batch, force)
        except Refused as refused:
            self.metrics.refused(refused.reason)
            return JSONResponse(refused.body, status_code=422)
        except HTTPException as error:
            self.metrics.failed(error.status_code)
            raise
        except Exception:
            self.metrics.failed(500)
            raise
        self.metrics.labelled(result["label"], result["label"] == self.service.loaded.metadata.positive_class)
        response.headers["X-Batch-Size"] = str(batch_size)
        return result


def build_app(args: "dict | ServeSettings") -> serve.Application:
    """Builder for ``serve run`` / ``serve deploy``: ``args`` are :class:`ServeSettings` (package required).

    Refused (``ServeSettingsError``) when Serve's HTTP host is beyond loopback and there is no token, unless
    ``allow_unauthenticated`` (:meth:`ServeSettings.check_exposure`; the host: :func:`serve_http_host`)."""
    return application(ServeSettings.parse(args), logging.getLogger(__name__).warning)


def application(settings: ServeSettings, warn: "Callable[[str], object]") -> serve.Application:
    """The classifier for ``settings``, once its exposure is checked against Serve's HTTP host; ``warn``
    gets the warning of an endpoint allowed to go without a token beyond loopback."""
    warning = settings.check_exposure(serve_http_host())
    if warning:
        warn(warning)
    return Classifier.options(**settings.deployment_options()).bind(settings)


def serve_http_host() -> "str | None":
    """The host Serve's HTTP ingress listens on, as the app is built: the running Serve controller's
    ``http_options`` (Ray 2.60). ``serve deploy CONFIG`` and ``serve run CONFIG`` build the app in a task on the
    cluster after Serve has started with the config's ``http_options`` (whose host defaults to 0.0.0.0; a
    Serve already running keeps its own), and ``pneumonia serve`` builds it after ``serve.start``. Only
    ``serve run serving.app:build_app ...`` builds before connecting to Ray: then the host Serve starts with,
    ``HTTPOptions()``'s default (127.0.0.1; all interfaces in HAProxy mode)."""
    import ray
    from ray.serve.config import HTTPOptions

    if ray.is_initialized():
        from ray.serve.context import _get_global_client  # the controller's handle, by its actor name

        client = _get_global_client(raise_if_no_controller_running=False)
        if client is not None:
            return client.http_config.host
    return HTTPOptions().host
