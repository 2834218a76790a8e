"""``pneumonia serve``: start (or join) Ray, deploy the app for one model package, keep serving."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve_model(package: str, replicas: int = 0, address: str | None = None, host: str = "127.0.0.1",
                port: int = 8000, block: bool = True, log: Callable[[str], None] = print) -> str:
    """Deploy ``package``; returns the endpoint URL. With ``block`` it serves until Ctrl-C, then shuts down."""
    import ray
    from ray import serve

    from models.package import verify_model_dir
    from serving.app import build_app

    verify_model_dir(package)  # a clear error here beats a replica failing to start
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=None if address else False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app({"package": os.path.abspath(package), "replicas": replicas}), name="pneumonia",
              route_prefix="/")
    url = f"http://{host}:{port}"
    log(f"serving {package} at {url}  (OpenAPI: {url}/docs)")
    log(f"curl -X POST -H 'Content-Type: image/jpeg' --data-binary @IMAGE.jpeg {url}/predict")
    if block:
        serve_forever(address, log)
    return url


def serve_forever(address: str | None = None, log: Callable[[str], None] = print) -> None:
    """Block until Ctrl-C or SIGTERM, then shut Serve (and a Ray this process started) down."""
    import ray
    from ray import serve

    # Ctrl-C or a plain `kill` both end in a clean shutdown (a background shell job ignores SIGINT).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log("shutting down")
    finally:
        serve.shutdown()
        if not address:
            ray.shutdown()
