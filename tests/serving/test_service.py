"""The replica's request handling without Serve: auth, request reading, decoding and the answer's shape, with an
injected stand-in model (milliseconds per test). What only Serve shows is in test_app.py."""

import asyncio
import io
import re

import numpy as np
import pytest
from fastapi import HTTPException
from PIL import Image
from starlette.requests import Request

from models.ood import OodScorer
from models.package import PackageError, PackageMetadata
from serving.service import ClassifierService, authorize, read_image
from serving.settings import TOKEN_ENV, ServeSettings, ServeSettingsError

SIZE = 16


class MeanModel:
    """P(PNEUMONIA) = the mean pixel: bright films are 'pneumonia'; records each call's batch."""

    def __init__(self):
        self.calls = []

    def predict_on_batch(self, batch):
        self.calls.append(batch.shape)
        return batch.reshape(len(batch), -1).mean(axis=1, keepdims=True)


def _loader(package):
    return MeanModel(), PackageMetadata.for_training({}, SIZE).replace(version=f"v-{package}", threshold=0.4), None


def _service(**settings) -> ClassifierService:
    service = ClassifierService(ServeSettings(package="p1", **settings), loader=_loader)
    service.load("p1")
    return service


def _png(value: int, size: int = 24) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (size, size), value).save(buffer, format="PNG")
    return buffer.getvalue()


def _noise_png(size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _request(body: bytes, headers: dict[str, str | bytes]) -> Request:
    raw = [(k.lower().encode(), v if isinstance(v, bytes) else v.encode()) for k, v in headers.items()]
    if not any(k == b"content-length" for k, _ in raw):
        raw.append((b"content-length", str(len(body)).encode()))
    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": raw, "query_string": b""}

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(scope, receive)


def _multipart(data: bytes, content_type: str, field: str = "file") -> tuple[bytes, str]:
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"x\"\r\n"
            f"Content-Type: {content_type}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


async def _unbatched(service: ClassifierService, image: np.ndarray) -> tuple[float, int]:
    return service.predict_batch([image])[0]


def _predict(service: ClassifierService, body: bytes, headers: dict) -> dict:
    async def call():
        result, batch = await service.predict(_request(body, headers), False, lambda image: _unbatched(service, image))
        assert batch == 1
        return result

    return asyncio.run(call())


def test_an_answer_has_label_probability_threshold_and_version():
    service = _service()
    bright = _predict(service, _png(230), {"content-type": "image/png"})
    dark = _predict(service, _png(20), {"content-type": "image/png"})
    assert set(bright) == {"label", "probability", "threshold", "model_version"}
    assert bright["label"] == "PNEUMONIA" and bright["probability"] == pytest.approx(230 / 255, abs=1e-6)
    assert dark["label"] == "NORMAL" and dark["threshold"] == 0.4 and dark["model_version"] == "v-p1"
    assert service.loaded.model.calls[-1] == (1, SIZE, SIZE, 1)  # preprocessed to the package's input size


def test_an_answer_inside_the_packages_borderline_band_says_so_and_one_outside_says_firm():
    from models.borderline import band_around

    band = band_around(0.4, 0.5)  # P 0.288-0.524

    def loader(package):
        model, metadata, scorer = _loader(package)
        return model, metadata.replace(borderline=band), scorer

    service = ClassifierService(ServeSettings(package="p1"), loader=loader)
    service.load("p1")
    near = _predict(service, _png(115), {"content-type": "image/png"})  # P 0.451: over the threshold, in the band
    far = _predict(service, _png(230), {"content-type": "image/png"})
    assert near["label"] == "PNEUMONIA" and near["certainty"] == "borderline"
    assert far["label"] == "PNEUMONIA" and far["certainty"] == "firm"
    assert near["borderline_band"] == far["borderline_band"] == [band.low, band.high]
    assert service.info()["borderline"]["half_width"] == 0.5
    assert "certainty" not in _predict(_service(), _png(115), {"content-type": "image/png"})  # no band: no field


def test_a_batch_is_one_model_call_and_every_answer_knows_its_size():
    service = _service()
    images = [np.full((SIZE, SIZE, 1), v, np.float32) for v in (0.1, 0.5, 0.9)]
    assert service.predict_batch(images) == [(pytest.approx(v), None, 3) for v in (0.1, 0.5, 0.9)]
    assert service.loaded.model.calls[-1] == (3, SIZE, SIZE, 1)


def test_metadata_and_hot_swap():
    service = _service()
    assert service.info()["model_version"] == "v-p1" and service.info()["input"]["image_size"] == SIZE
    assert service.info()["ood"]["method"] is None and "no out-of-distribution gate" in service.info()["ood"]["note"]
    service.load("p2")
    assert service.info()["model_version"] == "v-p2"
    empty = ClassifierService(ServeSettings(package="p"), loader=_loader)
    with pytest.raises(RuntimeError, match="no model loaded"):
        empty.check_health()


def test_a_failed_swap_keeps_the_old_package_serving_and_says_why_but_a_first_package_must_load(caplog):
    def loader(package):
        if package == "missing":
            raise PackageError("model package missing: not found")
        return _loader(package)

    service = ClassifierService(ServeSettings(package="p1"), loader=loader)
    with pytest.raises(PackageError, match="missing: not found"):
        service.load("missing")  # a replica with nothing to serve fails to start, naming the package
    service.load("p1")
    with caplog.at_level("ERROR"):
        service.load("missing")
    assert service.info()["model_version"] == "v-p1" and service.predict_batch([np.zeros((SIZE, SIZE, 1))])
    assert service.info()["swap_error"] == "missing: model package missing: not found"
    assert "swap to missing failed; v-p1 keeps serving" in caplog.text
    service.load("p2")
    assert service.info()["model_version"] == "v-p2" and service.info()["swap_error"] is None


@pytest.mark.parametrize("header", [None, "", "Bearer wrong", "Basic c2VjcmV0", "Bearer", "bearer  s3cret  x",
                                    "Bearer s3cr\u00e9t", "Bearer \u00ff\u00fe", "Bearer s3cret\x00"])
def test_a_missing_wrong_or_odd_token_is_a_401(header):
    with pytest.raises(HTTPException) as raised:
        authorize(header, "s3cret")
    assert raised.value.status_code == 401 and raised.value.headers == {"WWW-Authenticate": "Bearer"}


def test_the_right_token_and_no_token_pass():
    authorize("Bearer s3cret", "s3cret")
    authorize("bearer   s3cret ", "s3cret")
    authorize(None, "")


def test_latin1_bytes_in_the_authorization_header_are_a_401_not_a_500():
    service = _service(auth_token="s3cret")
    with pytest.raises(HTTPException) as raised:
        _predict(service, _png(100), {"content-type": "image/png", "authorization": b"Bearer t\xe9st"})
    assert raised.value.status_code == 401
    assert _predict(service, _png(100), {"content-type": "image/png", "authorization": "Bearer s3cret"})


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "[::]", "example.org"])
def test_beyond_loopback_without_a_token_is_refused_unless_allowed(host, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ServeSettingsError, match=rf"listen on {re.escape(host)}, beyond this machine, with no token.*"
                                                 rf"export {TOKEN_ENV}=.*--allow-unauthenticated") as refused:
        ServeSettings(package="p").check_exposure(host)
    assert "\n" not in str(refused.value)  # one line: `error: ...`
    warning = ServeSettings(package="p", allow_unauthenticated=True).check_exposure(host)
    assert warning.startswith(f"warning: the endpoint listens on {host} with no token (--allow-unauthenticated)")
    assert ServeSettings(package="p", auth_token="s3cret").check_exposure(host) is None
    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    assert ServeSettings(package="p").check_exposure(host) is None


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.1.1", "localhost", "::1", "::ffff:127.0.0.1", None])
def test_loopback_needs_no_token(host, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert ServeSettings(package="p").check_exposure(host) is None


def test_metadata_says_whether_predict_needs_a_token_and_warns_when_allowed_without(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert _service(auth_token="s3cret").info()["security"] == {"authentication": True}
    assert _service().info()["security"] == {"authentication": False}
    security = _service(allow_unauthenticated=True).info()["security"]
    assert security["authentication"] is False and "anyone who reaches this endpoint" in security["warning"]
    assert _service().info()["model_version"] == "v-p1"  # the package's fields stay
    assert "s3cret" not in repr(ServeSettings(package="p", auth_token="s3cret"))


def _read(body: bytes, headers: dict, limit: int = 10_000):
    return asyncio.run(read_image(_request(body, headers), limit))


def test_raw_bodies_and_multipart_uploads_are_read():
    png = _png(90)
    assert _read(png, {"content-type": "image/png"}) == (png, "image/png")
    assert _read(png, {"content-type": "IMAGE/PNG; charset=binary"}) == (png, "image/png")
    body, content_type = _multipart(png, "image/png")
    assert _read(body, {"content-type": content_type}) == (png, "image/png")
    body, content_type = _multipart(png, "application/octet-stream")  # the bytes say what they are
    assert _read(body, {"content-type": content_type}) == (png, "image/png")


@pytest.mark.parametrize("body,headers,status,detail", [
    (b"x", {}, 415, "unsupported Content-Type '(none)'"),
    (b"x", {"content-type": "text/plain"}, 415, "unsupported Content-Type 'text/plain'"),
    (b"x", {"content-type": "\u00e9\u00ff/png"}, 415, "unsupported Content-Type"),
    (b"x" * 20_000, {"content-type": "image/png"}, 413, "exceeds the limit of 10000"),
    (b"x", {"content-type": "image/png", "content-length": "99999"}, 413, "99999 bytes exceeds"),
    (b"x", {"content-type": "image/png", "content-length": "12abc"}, 400, "is not a byte count"),
    (b"x", {"content-type": "image/png", "content-length": "-5"}, 400, "is not a byte count"),
    (b"x", {"content-type": "image/png", "content-length": "\u00b2"}, 400, "is not a byte count"),
    (*_multipart(b"x", "image/png", field="image")[:1], {}, 400, "missing multipart field 'file'"),
    (*_multipart(b"plain text", "text/plain")[:1], {}, 415, "unsupported upload type 'text/plain'"),
])
def test_bad_requests_get_a_4xx_naming_the_problem(body, headers, status, detail):
    if not headers:  # the multipart cases: their boundary
        headers = {"content-type": "multipart/form-data; boundary=b0undary"} if body.startswith(b"--") else {}
    with pytest.raises(HTTPException) as raised:
        _read(body, headers)
    assert raised.value.status_code == status and detail in raised.value.detail


@pytest.mark.parametrize("body,detail", [(b"", "empty request body"), (b"GIF89a nonsense", "not a readable image"),
                                         (_noise_png()[:2000], "could not be decoded"), (_png(1, size=400), "exceeds the limit")])
def test_undecodable_images_are_a_400_and_the_service_answers_after(body, detail):
    service = _service(max_pixels=100_000)
    with pytest.raises(HTTPException) as raised:
        _predict(service, body, {"content-type": "image/png"})
    assert raised.value.status_code == 400 and detail in raised.value.detail
    assert _predict(service, _png(200), {"content-type": "image/png"})["label"] == "PNEUMONIA"


def _gated_loader(package):
    """A real tiny Keras model (the gate needs its embedding) behind an MSP gate: refuse P near 0.5."""
    import keras

    from models.ood import OodGate

    keras.utils.set_random_seed(0)
    image = keras.Input((SIZE, SIZE, 1))
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(image)
    logit = keras.layers.Dense(1, kernel_initializer=keras.initializers.Constant(20.0),
                               bias_initializer=keras.initializers.Constant(-10.0))(pooled)
    model = keras.Model(image, keras.layers.Activation("sigmoid", dtype="float32")(logit))  # P = sigmoid(20 mean - 10)
    gate = OodGate("msp", threshold=-0.9, quantile=0.995, validation_refusal_rate=0.005, fitted_on="test")
    metadata = PackageMetadata.for_training({}, SIZE).replace(version="gated", threshold=0.5, ood=gate)
    return model, metadata, OodScorer("msp")


def test_the_gate_refuses_with_422_unless_forced_and_every_answer_carries_the_score():
    from serving.service import OutOfDistribution

    service = ClassifierService(ServeSettings(package="g"), loader=_gated_loader)
    service.load("g")
    confident = _predict(service, _png(250), {"content-type": "image/png"})  # mean ~0.98: P ~1, MSP score ~ -1
    assert confident["label"] == "PNEUMONIA" and confident["ood_score"] < -0.9 and confident["ood_threshold"] == -0.9
    assert confident["out_of_distribution"] is False
    with pytest.raises(OutOfDistribution) as refused:  # mean 0.5: P = 0.5, the least confident
        _predict(service, _png(128), {"content-type": "image/png"})
    body = refused.value.body
    assert set(body) == {"detail", "reason", "ood_score", "ood_threshold"} and body["reason"] == "ood_gate"
    assert "not a chest radiograph" in body["detail"]
    assert body["ood_score"] > body["ood_threshold"] == -0.9

    async def forced():
        request = _request(_png(128), {"content-type": "image/png"})
        return await service.predict(request, False, lambda image: _unbatched(service, image), force=True)

    answer, _ = asyncio.run(forced())
    assert answer["out_of_distribution"] is True and answer["ood_score"] == pytest.approx(body["ood_score"])
    assert _predict(service, _png(5), {"content-type": "image/png"})["label"] == "NORMAL"  # it answers after
    assert service.info()["ood"]["method"] == "msp" and service.info()["ood"]["threshold"] == -0.9


@pytest.mark.parametrize("recorded, runtime", [({"inference": "onnxruntime 1.32.0, 2 threads"}, "onnxruntime"),
                                               ({}, "keras")])
def test_a_package_is_served_by_the_runtime_that_computed_its_numbers(recorded, runtime, caplog):
    """A package the evaluation scored with ONNX Runtime is served with it; one made before packages recorded
    their runtime, by Keras, which scored it. The answers are the model's either way."""
    from models.config import ModelConfig
    from models.ood import with_embedding
    from models.registry import build_model

    model = build_model(ModelConfig(family="cnn", image_size=SIZE, depth=2, base_filters=4, dense_units=8))
    metadata = PackageMetadata.for_training({}, SIZE).replace(version="v", threshold=0.5, runtime=recorded)
    service = ClassifierService(ServeSettings(package="r"), loader=lambda package: (model, metadata, OodScorer("msp")))
    service.load("r")
    assert service.loaded.model.runtime.split()[0] == runtime
    assert "served by" not in caplog.text  # no warning: the runtime is the package's
    images = [np.random.default_rng(i).random((SIZE, SIZE, 1), dtype=np.float32) for i in range(3)]
    expected = with_embedding(model).predict_on_batch(np.stack(images))[0].reshape(-1)
    assert [p for p, _, _ in service.predict_batch(images)] == pytest.approx(expected.tolist(), abs=1e-6)


def test_serving_a_package_by_another_runtime_than_its_own_is_logged(monkeypatch, caplog):
    from models.config import ModelConfig
    from models.registry import build_model

    monkeypatch.setenv("PNEUMONIA_INFERENCE_RUNTIME", "keras")
    model = build_model(ModelConfig(family="cnn", image_size=SIZE, depth=2, base_filters=4, dense_units=8))
    metadata = PackageMetadata.for_training({}, SIZE).replace(version="v", threshold=0.5,
                                                              runtime={"inference": "onnxruntime 1.32.0, 2 threads"})
    service = ClassifierService(ServeSettings(package="r"), loader=lambda package: (model, metadata, None))
    with caplog.at_level("WARNING", logger="serving.service"):
        service.load("r")
    assert service.loaded.model.runtime == "keras"
    assert "its numbers came from onnxruntime, it is served by keras" in caplog.text
