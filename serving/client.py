"""``pneumonia predict IMAGE... [--url URL]``: one line per image; non-zero exit on any error."""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from serving.decode import sniff_content_type

EXTENSION_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".dcm": "application/dicom"}


def classify(path: str | Path, url: str, token: str = "", timeout: float = 60.0) -> dict:
    body = Path(path).read_bytes()
    content_type = sniff_content_type(body) or EXTENSION_TYPES.get(Path(path).suffix.lower(), "application/octet-stream")
    request = urllib.request.Request(f"{url.rstrip('/')}/predict", data=body, method="POST",
                                     headers={"Content-Type": content_type})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def predict_files(paths: list[str], url: str, token: str = "") -> int:
    token = token or os.environ.get("PNEUMONIA_API_TOKEN", "")
    failures = 0
    for path in paths:
        try:
            result = classify(path, url, token)
            print(f"{path}\t{result['label']}\t{result['probability']:.4f}\t(threshold {result['threshold']:.4f}, "
                  f"model {result['model_version']})")
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")
            try:
                detail = json.loads(detail).get("detail", detail)
            except ValueError:
                pass
            print(f"{path}\terror {error.code}: {detail}", file=sys.stderr)
            failures += 1
        except (OSError, ValueError) as error:
            print(f"{path}\terror: {error}", file=sys.stderr)
            failures += 1
    return 1 if failures else 0
