"""``serving.client``: a 503 (a full queue) is retried after its Retry-After, every other error is final; against a
tiny local HTTP server that the test starts and stops."""

from __future__ import annotations

import json
import threading
import urllib.error
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from serving import client
from serving.client import RETRY_CAP_S, classify, retry_delay


class Scripted(ThreadingHTTPServer):
    """Answers each POST with the next (status, headers[, JSON body]) of ``script``, the last one forever after."""

    def __init__(self, script: list[tuple[int, dict]]):
        super().__init__(("127.0.0.1", 0), Handler)
        self.script, self.bodies = script, []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # http.server calls it by this name
        self.server.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
        status, headers, *answer = self.server.script[min(len(self.server.bodies), len(self.server.script)) - 1]
        body = json.dumps(answer[0] if answer else {"label": "NORMAL"} if status == 200 else {"detail": "busy"}).encode()
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(request):
    scripted = Scripted(request.param)
    thread = threading.Thread(target=scripted.serve_forever, daemon=True)
    thread.start()
    yield scripted
    scripted.shutdown()
    scripted.server_close()
    thread.join()


@pytest.fixture
def delays(monkeypatch):
    """The retry waits, recorded instead of slept."""
    waited: list[float] = []
    monkeypatch.setattr(client.time, "sleep", waited.append)
    return waited


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 32)
    return path


@pytest.mark.parametrize("server", [[(503, {"Retry-After": "3"}), (503, {}), (200, {})]], indirect=True)
def test_a_503_is_retried_after_its_retry_after_then_with_backoff(server, delays, image):
    assert classify(image, server.url) == {"label": "NORMAL"}
    assert len(server.bodies) == 3 and len(set(server.bodies)) == 1  # the same image each time
    first, second = delays
    assert 3 <= first <= 3 * 1.25  # never sooner than the server asked
    assert client.RETRY_BASE_S * 2 <= second <= client.RETRY_BASE_S * 2 * 1.25  # the backoff's second step


@pytest.mark.parametrize("server", [[(503, {"Retry-After": "1"})]], indirect=True)
def test_a_503_that_stays_is_raised_after_the_last_attempt(server, delays, image):
    with pytest.raises(urllib.error.HTTPError) as error:
        classify(image, server.url, attempts=3)
    assert error.value.code == 503 and len(server.bodies) == 3 and len(delays) == 2


@pytest.mark.parametrize("server", [[(429, {"Retry-After": "1"}), (200, {})]], indirect=True)
def test_other_errors_are_not_retried(server, delays, image):
    with pytest.raises(urllib.error.HTTPError) as error:
        classify(image, server.url)
    assert error.value.code == 429 and len(server.bodies) == 1 and delays == []


def test_the_delay_honours_retry_after_up_to_a_cap_and_ignores_a_date():
    assert 2 <= retry_delay("2", 0) <= 2.5
    assert RETRY_CAP_S <= retry_delay("3600", 0) <= RETRY_CAP_S * 1.25
    assert RETRY_CAP_S <= retry_delay(None, 30) <= RETRY_CAP_S * 1.25
    assert retry_delay("Wed, 21 Oct 2026 07:28:00 GMT", 1) == pytest.approx(client.RETRY_BASE_S * 2, rel=0.25)


REFUSED = {"detail": "the image is nearly uniform: there is no film to read", "reason": "blank"}


@pytest.mark.parametrize("server", [[(422, {}, REFUSED)]], indirect=True)
def test_a_refusal_before_the_model_is_one_line_with_its_reason_and_not_retried(server, tmp_path, capsys):
    image = tmp_path / "blank.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n")
    assert client.predict_files([str(image)], server.url) == 1
    assert capsys.readouterr().err == f"{image}\trefused (blank): {REFUSED['detail']}\n"
    assert len(server.bodies) == 1


ANSWERS = [{"label": "PNEUMONIA", "probability": 0.74, "threshold": 0.725, "model_version": "v", "certainty": "borderline",
            "borderline_band": [0.55, 0.85]},
           {"label": "NORMAL", "probability": 0.04, "threshold": 0.725, "model_version": "v", "certainty": "firm",
            "borderline_band": [0.55, 0.85]}]


@pytest.mark.parametrize("server", [[(200, {}, ANSWERS[0]), (200, {}, ANSWERS[1])]], indirect=True)
def test_a_borderline_answer_is_marked_with_its_band_after_the_columns_scripts_read(server, image, capsys):
    assert client.predict_files([str(image), str(image)], server.url) == 0
    near, far = capsys.readouterr().out.splitlines()
    assert near.split("\t")[:3] == [str(image), "PNEUMONIA", "0.7400"]
    assert near.split("\t")[4].startswith("BORDERLINE (P inside 0.550-0.850")
    assert far.split("\t")[1:3] == ["NORMAL", "0.0400"] and far.split("\t")[4] == "firm"
