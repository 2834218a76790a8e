"""``pneumonia serve``: start (or join) Ray, deploy the app for one model package, keep serving."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable

from models.local_ray import on_stop, start_ray, stop_ray
from models.package import verify_model_dir
from serving.ingress import claim_port, set_ingress_environment, start_watchdog, stop_haproxy


def serve_model(package: str, replicas: int = 0, address: str | None = None, host: str = "127.0.0.1",
                port: int = 8000, block: bool = True, log: Callable[[str], None] = print,
                ingress: str = "auto") -> str:
    """Deploy ``package``; returns the endpoint URL. With ``block`` it serves until Ctrl-C or SIGTERM, then
    stops (``models.local_ray.stop_ray``)."""
    import ray
    from ray import serve

    from serving.app import build_app  # Ray Serve at import: loaded only when serving
    from serving.settings import ServeSettings  # pydantic (60 ms): kept off `pneumonia --help`

    verify_model_dir(package)  # a clear error here beats a replica failing to start
    settings = ServeSettings.parse({"package": os.path.abspath(package), "replicas": replicas})
    address = address or os.environ.get("RAY_ADDRESS") or None
    local = not address and not ray.is_initialized()
    if local:
        claim_port(port, log, host)
        log(f"HTTP ingress: {set_ingress_environment(ingress, port)}")
    start_ray(address)
    if not address:
        on_stop(functools.partial(stop_haproxy, port))  # this run's HAProxy goes down with its local Ray
        start_watchdog(port)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(settings), name="pneumonia", route_prefix="/")
    url = f"http://{host}:{port}"
    log(f"serving {package} at {url}  (OpenAPI: {url}/docs)")
    if block:
        serve_forever(address, log)
    return url


def serve_forever(address: str | None = None, log: Callable[[str], None] = print) -> None:
    """Serve until Ctrl-C or SIGTERM (``models.runtime.install_stop_handlers``), then stop: a local Ray and its
    HAProxy go down with this process; on a joined cluster the application is shut down and the cluster stays."""
    from ray import serve

    log("serving until Ctrl-C")
    try:
        while True:
            time.sleep(3600)
    finally:
        if address:
            serve.shutdown()
        stop_ray()
