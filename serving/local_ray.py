"""The Ray this process starts or joins, and a clean stop of what it started.

A local Ray started here (no address) belongs to this process: a stop shuts it down, with the HAProxy this
project started for its ports. A joined cluster is left running: its Serve applications outlive the job.
"""

from __future__ import annotations

import logging
import os
import signal

_state = {"owned": False, "ports": set()}


def start_ray(address: str | None = None) -> bool:
    """Join ``address`` / ``$RAY_ADDRESS``, else start a local Ray; returns whether this process owns it."""
    import ray

    from models.runtime import install_stop_handlers

    address = address or os.environ.get("RAY_ADDRESS") or None
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # no "Started Serve in namespace" INFO lines
    # a local Ray turns token auth on by itself (README: Running on a Ray cluster); not a warning for the user
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    if not ray.is_initialized():
        # A local Ray's processes inherit a blocked SIGTERM: a service manager's SIGTERM to this process group
        # then reaches this process alone, which shuts them down in order (no C++ stack dumps, 5 s not 8).
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}) if not address else None
        try:
            # workers log to their own files (a trial to its trial.log); the console gets this process's lines
            ray.init(address=address, include_dashboard=None if address else False, log_to_driver=False,
                     logging_level=logging.WARNING)
        finally:
            if blocked is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        _state["owned"] = not address
        install_stop_handlers()  # after ray.init, which replaced the SIGTERM handler
    return _state["owned"]


def serving_port(port: int) -> None:
    """Record a port this process serves on: its HAProxy is stopped with the run."""
    _state["ports"].add(port)


def stop_ray() -> None:
    """Stop what this process started: the HAProxy of its ports, then its local Ray (a joined cluster is
    only disconnected from)."""
    import ray

    from serving.ingress import stop_haproxy

    owned = _state["owned"]
    if ray.is_initialized():
        if owned:
            _kill_at_once(ray._private.worker._global_node)
        ray.shutdown()  # first: a live Serve actor would start a new HAProxy for the one stopped
    if owned:
        for port in sorted(_state["ports"]):
            stop_haproxy(port)
    _state["owned"] = False


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
