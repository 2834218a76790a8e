"""``pneumonia serve``: start (or join) Ray, deploy the app for one model package, keep serving."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable

from models.package import verify_model_dir
from models.package_store import check_published, is_uri
from runtime.local_ray import joined_cluster, on_stop, resolve_address, start_ray, stop_ray
from serving.http_proxy import claim_port, set_ingress_environment, start_watchdog, stop_haproxy
from serving.package_source import runtime_env

APP_NAME = "pneumonia"  # the Serve application `pneumonia serve` and `pneumonia run` deploy


def serve_model(package: str, replicas: int = 0, address: str | None = None, host: str = "127.0.0.1",
                port: int = 8000, block: bool = True, log: Callable[[str], None] = print,
                ingress: str = "auto", allow_unauthenticated: bool = False) -> str:
    """Deploy ``package`` (a local folder, or a package URI in storage: ``s3://.../packages/VERSION``); returns
    the endpoint URL. A local folder given to a cluster this process joins is shipped to the replicas' nodes in
    this job's ``runtime_env`` (``serving.package_source``). With ``block`` it serves until Ctrl-C or SIGTERM, then
    stops (``runtime.local_ray.stop_ray``). A ``host`` beyond loopback needs ``$PNEUMONIA_API_TOKEN`` or
    ``allow_unauthenticated`` (refused before Ray starts; a warning line when allowed)."""
    from serving.settings import TOKEN_ENV, ServeSettings  # pydantic (60 ms): kept off `pneumonia --help`

    # the token this process checks is the one the replicas use, also on a cluster joined without it
    stored = is_uri(package)
    settings = ServeSettings.parse({"package": package if stored else os.path.abspath(package), "replicas": replicas,
                                    "auth_token": os.environ.get(TOKEN_ENV, ""),
                                    "allow_unauthenticated": allow_unauthenticated})
    settings.check_exposure(host)  # refused here, before Ray starts; the warning comes with the deployment
    if stored:  # a clear error here beats a replica failing to start
        check_published(package)
    else:
        verify_model_dir(package)

    import ray
    from ray import serve

    from serving.app import application  # Ray Serve at import: loaded only when serving

    address = resolve_address(address)
    local = not address and not ray.is_initialized()
    # a local folder given to a cluster travels with this job: its nodes share no disk with this one
    shipped = runtime_env(settings.package) if address and not stored and not ray.is_initialized() else None
    if local:
        claim_port(port, log, host)
        log(f"HTTP ingress: {set_ingress_environment(ingress, port, settings.haproxy_queue(APP_NAME))}")
    start_ray(address, shipped, log=log)
    if not address:
        on_stop(functools.partial(stop_haproxy, port))  # this run's HAProxy goes down with its local Ray
        start_watchdog(port)
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(application(settings, log), name=APP_NAME, route_prefix="/")
    except KeyboardInterrupt:  # stopped while deploying: nothing half-deployed stays on a joined cluster
        remove_from_joined_cluster(log)
        raise
    url = f"http://{host}:{port}"
    log(f"serving {package} at {url}  (OpenAPI: {url}/docs)")
    if block:
        serve_forever(log)
    return url


def serve_forever(log: Callable[[str], None] = print) -> None:
    """Serve until Ctrl-C or SIGTERM (``runtime.tensorflow_setup.install_stop_handlers``), then stop: a local Ray and its
    HAProxy go down with this process; on a joined cluster this application is deleted and the cluster stays."""
    log("serving until Ctrl-C")
    try:
        while True:
            time.sleep(3600)
    finally:
        remove_from_joined_cluster(log)
        stop_ray()


def remove_from_joined_cluster(log: Callable[[str], None] = print) -> None:
    """On a cluster this process joined, delete this application (ours only: the cluster and its other
    applications stay); a local Ray goes down whole with :func:`runtime.local_ray.stop_ray`."""
    from ray import serve

    joined = joined_cluster()
    if joined:
        serve.delete(APP_NAME)
        log(f"removed the application `{APP_NAME}` from the Ray cluster at {joined}")
