"""The Ray this process starts or joins, and a clean stop of what it started; shared by the search and serving.

A local Ray started here (no address) belongs to this process and listens on loopback alone
(:func:`loopback_node`): a stop shuts it down, then runs what was registered with :func:`on_stop` (serving stops
the HAProxy it started for its ports). A joined cluster is left running: its Serve applications outlive the
job. Its dashboard listens on 127.0.0.1 under Ray's token, as a cluster's does, and the command prints its URL
(:func:`dashboard_line`; what it costs: benchmarks/ray_dashboard_cost.py). Ray itself is imported only inside
these functions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable

from runtime.errors import PneumoniaError
from runtime.tensorflow_setup import install_stop_handlers, quiet_tensorflow

_state = {"owned": False, "on_stop": [], "joined": None, "dashboard": None}
WORKER_NICENESS_ENV = "RAY_worker_niceness"  # read by the raylet when it starts a worker process


class RayUnavailableError(PneumoniaError):
    """An address was given (``--address`` / ``RAY_ADDRESS``) but no Ray cluster answers there."""


def resolve_address(address: str | None = None) -> str | None:
    """``--address``, else ``$RAY_ADDRESS``, else None: a new local Ray owned by this process. ``auto`` (Ray's word)
    joins the cluster ``ray start`` recorded on this machine; a bare ``ray.init()`` would join that one too."""
    return address or os.environ.get("RAY_ADDRESS") or None


def check_reachable(address: str, timeout: float = 3.0) -> str:
    """The host:port ``address`` stands for, once something listens there; else a :class:`RayUnavailableError`
    within seconds (``ray.init`` would retry for minutes, printing GCS warnings)."""
    from urllib.parse import urlsplit

    from ray._private.services import canonicalize_bootstrap_address

    local = "drop --address (and RAY_ADDRESS) to run a local Ray of this command's own"
    if address.startswith("ray://"):  # Ray Client
        parts = urlsplit(address)
        host, port = parts.hostname, parts.port or 10001
    else:
        try:
            host, _, port = canonicalize_bootstrap_address(address).rpartition(":")
        except ConnectionError:
            raise RayUnavailableError(f"--address {address}: no Ray cluster is recorded on this machine "
                                      f"(`ray start --head` records one); {local}") from None
        except ValueError as exc:
            raise RayUnavailableError(f"--address {address}: {exc}; give HOST:PORT of a Ray head") from None
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        where = f"{host}:{port}"
        if address == "auto":
            where += " (recorded by `ray start` on this machine)"
        elif address != where:
            where = f"{address} ({where})"
        raise RayUnavailableError(f"no Ray cluster answers at {where}: {exc.strerror or exc}. Start one there "
                                  f"(`ray start --head --port {port}`), or {local}") from None
    return f"{host}:{port}"


def start_ray(address: str | None = None, runtime_env: dict | None = None, log: Callable[[str], None] = print,
              dashboard: bool = True) -> bool:
    """Join ``address`` / ``$RAY_ADDRESS`` (checked first: a dead one fails in seconds), else start a new local
    Ray, whatever cluster the machine has recorded; returns whether this process owns it. ``runtime_env``: this
    job's, when it joins a cluster (what its actors need on every node; Ray uploads local folders in it).
    ``log`` gets one line with the dashboard's URL; ``dashboard=False`` starts a local Ray without one."""
    import ray

    address = resolve_address(address)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # no "Started Serve in namespace" INFO lines
    # a local Ray turns token auth on by itself (docs/cluster.md); not a warning for the user
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # a model package shipped in the runtime_env is meant to be uploaded whole: no "consider excluding" warning
    logging.getLogger("ray._private.runtime_env.packaging").setLevel(logging.ERROR)
    if not ray.is_initialized():
        joined = check_reachable(address) if address else None
        if not address:
            # Ray starts its workers at nice 15 (its worker_niceness), below everything else on the machine: beside
            # two busy loops a trial then trained at 1 image/s instead of 41 and Serve's proxy missed its readiness
            # checks (issue 23). A local Ray's trials and replicas are this command's own work: normal priority,
            # unless $RAY_worker_niceness says otherwise. A cluster's nodes keep what their `ray start` had.
            os.environ.setdefault(WORKER_NICENESS_ENV, "0")
        # A local Ray's processes inherit a blocked SIGTERM: a service manager's SIGTERM to this process group
        # then reaches this process alone, which shuts them down in order (no C++ stack dumps, 5 s not 8).
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}) if not address else None
        try:
            # workers log to their own files (a trial to its trial.log); the console gets this process's lines
            with contextlib.nullcontext() if address else loopback_node():
                # a local dashboard on loopback, as the node's other servers: 8265, else the next free port
                local = {} if address else {"include_dashboard": dashboard, "dashboard_host": "127.0.0.1"}
                context = ray.init(address=address or "local", log_to_driver=False, logging_level=logging.WARNING,
                                   runtime_env=runtime_env if address else None, **local)
        finally:
            if blocked is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        _state["owned"], _state["joined"] = not address, joined
        url = getattr(context, "dashboard_url", None)  # a Ray Client context may have none
        _state["dashboard"] = f"http://{url}" if url else None
        install_stop_handlers()  # after ray.init, which replaced the SIGTERM handler
        line = dashboard_line()
        if line:
            log(line)
    return _state["owned"]


def dashboard_url() -> str | None:
    """http://HOST:PORT of the dashboard of the Ray this process started or joined; None without one."""
    return _state["dashboard"]


def dashboard_line() -> str | None:
    """The console's line for the Ray dashboard: its URL and, under token auth, where its token comes from (the
    page asks for it once, and answers 401 without it)."""
    url = dashboard_url()
    if not url:
        return None
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    token = "; sign in with the token `ray get-auth-token` prints" if is_token_auth_enabled() else ""
    return f"Ray dashboard {url}  (jobs, trial and Serve actors, logs{token})"


@contextlib.contextmanager
def loopback_node():
    """While a local Ray of this process's own starts: its node IP is 127.0.0.1, so all its servers listen on
    loopback. On Linux Ray gives a new local node a routable IP, and then binds its unauthenticated Prometheus
    servers (the agent's metrics export port, the dashboard's 44227, the autoscaler's 44217) to all interfaces
    (its gRPC and agent ports refuse a client without the token, checked); Ray 2.60 maps an explicit
    ``_node_ip_address="127.0.0.1"`` back to that IP. Under ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, Ray's
    setting for a machine that forms no cluster, it takes 127.0.0.1. The processes started meanwhile inherit
    the setting; this process gets its own back after (a worker's `ray start --address` refuses to run under
    it), and it was read when Ray was imported, so Ray's copy of it is set for the while too."""
    from ray._private import ray_constants

    key = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_env, saved = os.environ.get(key), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[key], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
        if saved_env is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved_env


def joined_cluster() -> str | None:
    """host:port of the cluster this process joined, or None (a local Ray of its own, or no Ray yet)."""
    return _state["joined"]


def on_stop(cleanup: Callable[[], object]) -> None:
    """Run ``cleanup`` once, when :func:`stop_ray` stops the local Ray this process owns, after Ray is down."""
    _state["on_stop"].append(cleanup)


def stop_ray() -> None:
    """Stop what this process started: its local Ray, then what was registered with :func:`on_stop` (a
    joined cluster is only disconnected from)."""
    import ray

    owned = _state["owned"]
    if ray.is_initialized():
        if owned:
            _kill_at_once(ray._private.worker._global_node)
        ray.shutdown()  # first: a live Serve actor would start a new HAProxy for the one stopped
    _state["dashboard"] = None
    if owned:
        cleanups, _state["on_stop"] = _state["on_stop"], []
        for cleanup in cleanups:
            cleanup()
    _state["owned"] = False


def run_command(command: Callable[..., int], *args) -> int:
    """The body of an entry point (``pneumonia``, ``python -m tuning.search``): quiet TensorFlow, line-buffered
    output, Ctrl-C and SIGTERM as a clean stop. A :class:`PneumoniaError` (a user mistake: data, config,
    package, search) is one line on stderr and exit code 2; anything else is a bug and keeps its traceback."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress reaches logs and `ray job logs` as it happens
    quiet_tensorflow()
    install_stop_handlers()
    try:
        return command(*args)
    except PneumoniaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the first Ctrl-C or SIGTERM (runtime.tensorflow_setup.install_stop_handlers)
        joined = joined_cluster()
        if "ray" in sys.modules:  # a command that never started Ray (`pneumonia dashboard`) stops at once
            stop_ray()
        print("stopped" + (f"; the Ray cluster at {joined} keeps running" if joined else ""), file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # everything of ours is stopped; TensorFlow's and Ray's interpreter teardown would add about 3 s
        os._exit(130)


def _kill_at_once(node) -> None:
    """Make ``ray.shutdown`` end our local Ray's processes (and the workers and agents under its raylet) all
    at once after the driver has disconnected. Its own way waits up to 1 s for each process type to take a
    SIGTERM that ours block (see :func:`start_ray`): 5 s of an at most 10 s stop."""
    import subprocess

    import psutil

    def kill_all_processes(check_alive: bool = False, allow_graceful: bool = True, wait: bool = False) -> None:
        started = [info.process for infos in node.all_processes.values() for info in infos]
        processes = []
        for popen in started:
            try:
                parent = psutil.Process(popen.pid)
                processes += [*parent.children(recursive=True), parent]
            except psutil.NoSuchProcess:
                continue
        for process in processes:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(processes, timeout=5)
        for popen in started:  # reaped, not left as zombies
            try:
                popen.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass

    node.kill_all_processes = kill_all_processes
