"""The Serve app on a real local Ray, on loopback: served probabilities equal the evaluation's, bad input
gets a 4xx with a reason, concurrent requests are batched."""

from __future__ import annotations

import csv
import io
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.services import free_port
from tuning.cli import main

pytestmark = pytest.mark.slow
TINY = ["model.image_size=32", "model.depth=2", "model.base_filters=4", "model.dense_units=8", "batch_size=8",
        "mixed_precision=float32", "epochs=1"]


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    from tests.conftest import write_split

    root = tmp_path_factory.mktemp("serve")
    data = root / "data"
    write_split(data / "train", patients=12, seed=1)
    write_split(data / "test", patients=4, seed=2, offset=500)
    model = root / "model"
    assert main(["train", "--data", str(data), "--output", str(model), *[a for s in TINY for a in ("--set", s)]]) == 0
    assert main(["evaluate", "--model", str(model), "--data", str(data), "--reports", str(root / "reports"),
                 "--artifacts", str(root / "artifacts")]) == 0
    (pkg,) = (root / "artifacts").iterdir()
    return pkg, root / "reports" / "cnn" / "predictions.csv"


@pytest.fixture(scope="module")
def endpoint(package):
    import ray
    from ray import serve

    from serving.app import build_app

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"package": str(package[0]), "max_body_bytes": 2_000_000, "max_pixels": 4_000_000}),
                  name="pneumonia", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _post(url: str, body: bytes, content_type: str | None = "image/jpeg") -> tuple[int, dict, dict]:
    request = urllib.request.Request(f"{url}/predict", data=body, method="POST")
    if content_type:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


def test_served_probabilities_equal_the_evaluation(endpoint, package):
    rows = list(csv.DictReader(open(package[1])))
    metadata = json.loads((package[0] / "metadata.json").read_text())
    for row in rows:
        status, body, _ = _post(endpoint, Path(row["path"]).read_bytes())
        assert status == 200, body
        assert body["probability"] == pytest.approx(float(row["prob_pneumonia"]), abs=1e-5)
        assert body["label"] == row["pred"]
        assert body["threshold"] == metadata["threshold"] and body["model_version"] == metadata["version"]
    # the same film as PNG (the pixels TensorFlow decodes from the JPEG) gives the same answer
    import tensorflow as tf

    row = rows[0]
    pixels = tf.io.decode_jpeg(Path(row["path"]).read_bytes(), channels=3).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    status, body, _ = _post(endpoint, buffer.getvalue(), "image/png")
    assert status == 200 and body["probability"] == pytest.approx(float(row["prob_pneumonia"]), abs=1e-5)


def test_health_and_metadata(endpoint, package):
    with urllib.request.urlopen(f"{endpoint}/healthz", timeout=30) as response:
        assert json.loads(response.read()) == {"status": "ok"}
    with urllib.request.urlopen(f"{endpoint}/metadata", timeout=30) as response:
        info = json.loads(response.read())
    assert info["model_version"] == package[0].name and info["input"]["image_size"] == 32
    assert info["class_names"] == ["NORMAL", "PNEUMONIA"] and "auc" in info["test_metrics"]


def test_bad_input_gets_a_4xx_with_a_reason_and_the_service_stays_up(endpoint, package):
    jpeg = next(Path(r["path"]) for r in csv.DictReader(open(package[1]))).read_bytes()
    bomb = io.BytesIO()
    Image.new("L", (3000, 3000)).save(bomb, format="PNG")
    cases = [
        (b"", "image/jpeg", 400, "empty"),
        (b"this is not an image", "image/jpeg", 400, "not a readable image"),
        (jpeg[: len(jpeg) // 2], "image/jpeg", 400, "could not be decoded"),
        (bomb.getvalue(), "image/png", 400, "exceeds the limit"),
        (b"x" * 2_100_000, "image/jpeg", 413, "exceeds the limit"),
        (jpeg, "text/plain", 415, "unsupported Content-Type"),
        (jpeg, None, 415, "unsupported Content-Type"),
    ]
    for body, content_type, code, reason in cases:
        status, answer, _ = _post(endpoint, body, content_type)
        assert status == code and reason in answer["detail"], (content_type, status, answer)
    status, _, _ = _post(endpoint, jpeg)
    assert status == 200


def test_concurrent_requests_are_batched(endpoint, package):
    paths = [Path(r["path"]) for r in csv.DictReader(open(package[1]))]
    bodies = [paths[i % len(paths)].read_bytes() for i in range(96)]
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda b: _post(endpoint, b), bodies))
    assert all(status == 200 for status, _, _ in results)
    sizes = [int(headers["x-batch-size"] if "x-batch-size" in headers else headers["X-Batch-Size"])
             for _, _, headers in results]
    assert max(sizes) > 1
