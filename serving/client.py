"""``pneumonia predict IMAGE... [--url URL]``: one line per image; non-zero exit on any error.

A 503 is an endpoint that would have kept the request waiting past its budget (``queue_timeout_ms``): it is
retried a few times, never sooner than its ``Retry-After`` says, with an exponential backoff capped at
``RETRY_CAP_S`` and a little jitter so that clients turned away together do not come back together. Every other
error is final.
"""

from __future__ import annotations

import base64
import json
import os
import random
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from serving.decode import sniff_content_type

EXTENSION_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".dcm": "application/dicom"}
ATTEMPTS = 4  # one request and three retries of a 503
RETRY_BASE_S, RETRY_CAP_S = 0.25, 8.0


def retry_delay(retry_after: str | None, attempt: int) -> float:
    """Seconds to wait before retry ``attempt`` (0 = the first retry): the larger of the server's
    ``Retry-After`` (seconds; a date or garbage counts as absent) and ``RETRY_BASE_S * 2**attempt``, capped at
    ``RETRY_CAP_S``, plus up to 25 % jitter."""
    asked = float(retry_after) if retry_after and retry_after.strip().isdigit() else 0.0
    return min(RETRY_CAP_S, max(asked, RETRY_BASE_S * 2 ** attempt)) * random.uniform(1.0, 1.25)


def classify(path: str | Path, url: str, token: str = "", explain: bool = False, timeout: float = 60.0,
             force: bool = False, attempts: int = ATTEMPTS) -> dict:
    """POST one file to ``/predict``; raises ``urllib.error.HTTPError`` on a 4xx (422: refused by the gate), and
    on a 503 still there after ``attempts`` tries (:func:`retry_delay` apart)."""
    body = Path(path).read_bytes()
    content_type = sniff_content_type(body) or EXTENSION_TYPES.get(Path(path).suffix.lower(), "application/octet-stream")
    query = "&".join(name for name, on in (("explain=true", explain), ("force=true", force)) if on)
    query = f"?{query}" if query else ""
    request = urllib.request.Request(f"{url.rstrip('/')}/predict{query}", data=body, method="POST",
                                     headers={"Content-Type": content_type})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            if error.code != 503 or attempt == attempts - 1:
                raise
            error.close()
            time.sleep(retry_delay(error.headers.get("Retry-After"), attempt))
    raise ValueError(f"attempts must be at least 1, got {attempts}")


def certainty_text(result: dict) -> str:
    """``firm``, or ``BORDERLINE`` with the band: what a reader should know before acting on the label."""
    if result["certainty"] != "borderline":
        return "firm"
    low, high = result["borderline_band"]
    return f"BORDERLINE (P inside {low:.3f}-{high:.3f}: a re-encoded copy of this film could get the other label)"


def _explain_path(explain: str, index: int, count: int) -> Path:
    """``out.png`` for one image; ``out-1.png``, ``out-2.png``... for several."""
    path = Path(explain)
    return path if count == 1 else path.with_name(f"{path.stem}-{index + 1}{path.suffix or '.png'}")


def _error_line(path: str, error: urllib.error.HTTPError) -> str:
    text = error.read().decode(errors="replace")
    try:
        body = json.loads(text)
    except ValueError:
        return f"{path}\terror {error.code}: {text}"
    if error.code == 422 and isinstance(body, dict) and body.get("ood_score") is not None:
        return (f"{path}\trefused: {body['detail']} (out-of-distribution score {body['ood_score']:.4g} > "
                f"threshold {body['ood_threshold']:.4g})")
    if error.code == 422 and isinstance(body, dict) and "reason" in body:  # a check before the model
        return f"{path}\trefused ({body['reason']}): {body['detail']}"
    return f"{path}\terror {error.code}: {body.get('detail', text) if isinstance(body, dict) else text}"


def predict_files(paths: list[str], url: str, token: str = "", explain: str | None = None, force: bool = False) -> int:
    """Classify each file; with ``explain``, also write the Grad-CAM overlay PNG(s) there. Non-zero exit when
    any file failed or was refused by the out-of-distribution gate."""
    token = token or os.environ.get("PNEUMONIA_API_TOKEN", "")
    failures = 0
    for index, path in enumerate(paths):
        try:
            result = classify(path, url, token, explain=bool(explain), force=force)
            line = (f"{path}\t{result['label']}\t{result['probability']:.4f}\t(threshold {result['threshold']:.4f}, "
                    f"model {result['model_version']})")
            if result.get("certainty"):
                line += "\t" + certainty_text(result)
            if result.get("out_of_distribution"):
                line += f"\tOUT OF DISTRIBUTION (score {result['ood_score']:.4g} > {result['ood_threshold']:.4g})"
            if explain:
                target = _explain_path(explain, index, len(paths))
                target.write_bytes(base64.b64decode(result["heatmap_png"]))
                line += f"\tGrad-CAM: {target}"
            print(line)
        except urllib.error.HTTPError as error:
            print(_error_line(path, error), file=sys.stderr)
            failures += 1
        except (OSError, ValueError) as error:
            print(f"{path}\terror: {error}", file=sys.stderr)
            failures += 1
    return 1 if failures else 0
