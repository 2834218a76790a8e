"""``pneumonia predict IMAGE... [--url URL]``: one line per image; non-zero exit on any error."""

from __future__ import annotations

import base64
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from serving.decode import sniff_content_type

EXTENSION_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".dcm": "application/dicom"}


def classify(path: str | Path, url: str, token: str = "", explain: bool = False, timeout: float = 60.0,
             force: bool = False) -> dict:
    """POST one file to ``/predict``; raises ``urllib.error.HTTPError`` on a 4xx (422: refused by the gate)."""
    body = Path(path).read_bytes()
    content_type = sniff_content_type(body) or EXTENSION_TYPES.get(Path(path).suffix.lower(), "application/octet-stream")
    query = "&".join(name for name, on in (("explain=true", explain), ("force=true", force)) if on)
    query = f"?{query}" if query else ""
    request = urllib.request.Request(f"{url.rstrip('/')}/predict{query}", data=body, method="POST",
                                     headers={"Content-Type": content_type})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


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
    if error.code == 422 and "ood_score" in body:
        return (f"{path}\trefused: {body['detail']} (out-of-distribution score {body['ood_score']:.4g} > "
                f"threshold {body['ood_threshold']:.4g})")
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
