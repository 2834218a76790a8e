"""``pneumonia serve``: start (or join) Ray, deploy the app for one model package, keep serving."""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable

INGRESS_MODES = ("auto", "haproxy", "python")
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def choose_ingress(mode: str = "auto") -> str:
    """Pick Serve's HTTP ingress for a Ray this process is about to start (Ray's processes read it at start).

    ``haproxy``: Ray Serve's high-throughput mode: HAProxy in front of replicas that serve HTTP themselves,
    1.75x the requests/s of the Python proxy on 2 cores (BENCHMARKS.md); needs the ``haproxy`` binary.
    ``python``: Serve's Python HTTP proxy. ``auto``: haproxy when the binary is on PATH. A cluster that is
    joined keeps the ingress it was started with (see README: Serving).
    """
    if mode not in INGRESS_MODES:
        raise ValueError(f"ingress must be one of {', '.join(INGRESS_MODES)}; got {mode!r}")
    found = bool(shutil.which("haproxy") or os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH"))
    if mode == "auto":
        mode = "haproxy" if found else "python"
    if mode == "haproxy" and not found:
        raise ValueError("ingress haproxy needs the haproxy binary on PATH (apt install haproxy), "
                         "or RAY_SERVE_HAPROXY_BINARY_PATH; or use --ingress python")
    for key, value in HAPROXY_ENV.items():
        if mode == "haproxy":
            os.environ[key] = value
        else:
            os.environ.pop(key, None)
    return mode


def serve_model(package: str, replicas: int = 0, address: str | None = None, host: str = "127.0.0.1",
                port: int = 8000, block: bool = True, log: Callable[[str], None] = print,
                ingress: str = "auto") -> str:
    """Deploy ``package``; returns the endpoint URL. With ``block`` it serves until Ctrl-C, then shuts down."""
    import ray
    from ray import serve

    from models.package import verify_model_dir
    from serving.app import build_app

    verify_model_dir(package)  # a clear error here beats a replica failing to start
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not ray.is_initialized():
        if not address:
            log(f"HTTP ingress: {choose_ingress(ingress)}")
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
