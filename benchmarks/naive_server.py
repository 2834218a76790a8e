"""The naive baseline most projects ship: one uvicorn process, FastAPI, ``model.predict`` once per request.

PNEUMONIA_PACKAGE=artifacts/VERSION uvicorn benchmarks.naive_server:app --host 127.0.0.1 --port 8001
(Used by benchmarks/serve_load.py; the decoding is the project's own, so only the serving design differs.)
"""

import os
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, HTTPException, Request

from serving.decode import InvalidImage, decode_request

loaded: dict = {}


@asynccontextmanager
async def lifespan(app: FastAPI):
    """The model is loaded when the server starts, not when this module is imported."""
    from models.package import load_model_dir
    from runtime.tensorflow_setup import configure_tensorflow

    configure_tensorflow(0, "float32")
    loaded["model"], loaded["metadata"] = load_model_dir(os.environ["PNEUMONIA_PACKAGE"])
    yield
    loaded.clear()


app = FastAPI(lifespan=lifespan)


@app.post("/predict")
async def predict(request: Request) -> dict:
    model, metadata = loaded["model"], loaded["metadata"]
    body = await request.body()
    try:
        image = decode_request(body, request.headers.get("content-type", "image/jpeg"), metadata.image_size, 40_000_000,
                               metadata.input.intensity)
    except InvalidImage as exc:
        raise HTTPException(400, str(exc)) from None
    probability = float(metadata.probabilities(model.predict(image[np.newaxis], verbose=0))[0])
    return {"label": metadata.class_names[int(probability >= metadata.threshold)], "probability": probability}
