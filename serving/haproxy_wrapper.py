"""The HAProxy Ray Serve starts, through a wrapper that rewrites its config: stats and metrics on loopback, and
the endpoint's queue bounded in HAProxy itself.

Ray 2.60's HAProxy template binds ``listen stats`` to ``*:STATS_PORT`` and ``frontend prometheus`` to
``:METRICS_PORT``: all interfaces, without authentication, and no setting changes that address. Its servers
have no ``maxconn``, so HAProxy forwards every request at once and the replica turns the excess away itself
(Serve's ``max_queued_requests``): in Python, on the core that runs the model, and loosely (Ray's own note:
it may drop more than the bound, as it yields to its event loop between counting and checking).

Ray does take the binary from ``RAY_SERVE_HAPROXY_BINARY_PATH`` and talks to HAProxy only through its admin
socket, so ``serving.ingress.set_ingress_environment`` points that setting at a wrapper in the run's HAProxy
directory (:func:`write_wrapper`) that calls :func:`main`: it rewrites the config Ray passes with ``-f``, in
place and under the lock Ray writes that file under, then execs the real HAProxy (``$PNEUMONIA_HAPROXY_BINARY``)
with Ray's arguments unchanged. The process keeps its pid (Ray reloads it with ``-sf PID``) and its command line
(Ray and ``serving.ingress`` know their HAProxy by its config path). Two rewrites:

- :func:`loopback_config`: the stats and Prometheus binds on 127.0.0.1. A config in which either section's bind
  line is not found is not started: HAProxy would otherwise put the page on every interface.
- :func:`bounded_config`, for each application ``$PNEUMONIA_HAPROXY_QUEUE`` gives a bound: each replica server gets
  ``maxconn`` = ``max_ongoing_requests`` (HAProxy holds the rest in its own queue and hands each on as a slot
  frees), and a request that finds ``max_queued_requests`` per replica already waiting is answered 503 with
  ``Retry-After`` by HAProxy, before any Python runs. The replica's own bound stays behind it.

Only the standard library here: it runs at every HAProxy start and reload.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import sys
from pathlib import Path

REAL_BINARY_ENV = "PNEUMONIA_HAPROXY_BINARY"  # the HAProxy the wrapper execs
QUEUE_ENV = "PNEUMONIA_HAPROXY_QUEUE"  # "APP=MAX_ONGOING,MAX_QUEUED,RETRY_AFTER_S;...": bounds HAProxy keeps
WRAPPER_NAME = "haproxy-loopback"
SECTIONS = ("listen stats", "frontend prometheus")  # HAProxy's stats page, its Prometheus exporter
LOOPBACK = "127.0.0.1"
REPLICA_PREFIX = "SERVE_REPLICA"  # Ray's name for a replica's server line (its fallback proxy is a backup)
BOUND_MARK = "# pneumonia: queue bound"  # on the lines bounded_config adds: a reload does not add them twice
_BIND = re.compile(r"^(\s*bind\s+)(\S*?):(\d+)(\s.*)?$")  # bind [ADDRESS]:PORT [options]
_USE_BACKEND = re.compile(r"^(\s*)use_backend\s+(\S+)\s+if\s+is_(\S+)\s*$")  # Ray's path routing, one per app


def _sections(text: str):
    """(section, whether the line is its header, line) for each line of an HAProxy config, newlines kept; the
    section as its header's first two words (`listen stats`, `backend NAME`), None before the first."""
    section = None
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        header = bool(stripped) and line[0] not in " \t" and not stripped.startswith("#")
        if header:
            section = " ".join(stripped.split()[:2])
        yield section, header, line


def _backend(section: str | None) -> str | None:
    return section.split()[1] if section and section.startswith("backend ") else None


def _replica_server(line: str) -> bool:
    words = line.split()
    return words[:1] == ["server"] and len(words) > 1 and words[1].startswith(REPLICA_PREFIX)


def loopback_config(text: str, host: str = LOOPBACK) -> str:
    """``text`` (an HAProxy config) with every ``bind ADDRESS:PORT`` of the stats and Prometheus sections on
    ``host``; a ValueError when a section or its bind line is missing."""
    lines, rewritten = [], set()
    for section, header, line in _sections(text):
        if section in SECTIONS and not header:
            match = _BIND.match(line.rstrip("\r\n"))
            if match:
                line = f"{match[1]}{host}:{match[3]}{match[4] or ''}\n"
                rewritten.add(section)
        lines.append(line)
    missing = [name for name in SECTIONS if name not in rewritten]
    if missing:
        raise ValueError(f"no `bind ADDRESS:PORT` line found in {' or '.join(missing)}")
    return "".join(lines)


def parse_queues(value: str) -> dict[str, tuple[int, int, float]]:
    """``APP=MAX_ONGOING,MAX_QUEUED,RETRY_AFTER_S[;APP=...]`` (``$PNEUMONIA_HAPROXY_QUEUE``) as {app: bound}; a
    ValueError saying what is wrong."""
    queues = {}
    for part in filter(None, value.split(";")):
        try:
            app, numbers = part.split("=")
            ongoing, queued, retry_after = numbers.split(",")
            bound = int(ongoing), int(queued), float(retry_after)
        except ValueError:
            raise ValueError(f"${QUEUE_ENV} must be APP=MAX_ONGOING,MAX_QUEUED,RETRY_AFTER_S[;...] (got {value!r})") from None
        if not app or bound[0] < 1 or bound[1] < 1 or bound[2] < 0:
            raise ValueError(f"${QUEUE_ENV}: an application name, MAX_ONGOING and MAX_QUEUED >= 1 and RETRY_AFTER_S "
                             f">= 0 (got {value!r})")
        queues[app] = bound
    return queues


def bounded_config(text: str, queues: dict[str, tuple[int, int, float]]) -> str:
    """``text`` with the queue of each Serve application in ``queues`` ({app: (max_ongoing, max_queued,
    retry_after_s)}) kept by HAProxy: ``maxconn max_ongoing`` on each of its replica servers, and a 503 with
    ``Retry-After`` for a request that finds ``max_queued`` per replica waiting. Ray names an application's
    backend ``http-APP``. A config already bounded is returned as it is."""
    if BOUND_MARK in text:
        return text
    bounds = {f"http-{app}": bound for app, bound in queues.items()}
    replicas: dict[str, int] = {}  # backend -> its replica servers
    for section, _, line in _sections(text):
        if _backend(section) in bounds and _replica_server(line):
            replicas[_backend(section)] = replicas.get(_backend(section), 0) + 1
    lines = []
    for section, _, line in _sections(text):
        if _backend(section) in replicas and _replica_server(line):
            line = f"{line.rstrip()} maxconn {bounds[_backend(section)][0]}\n"
        use = _USE_BACKEND.match(line.rstrip("\r\n")) if section and section.startswith("frontend ") else None
        if use and use[2] in replicas and use[3] == use[2]:
            backend = use[2]
            max_ongoing, max_queued, retry_after_s = bounds[backend]
            depth, retry_after = max_queued * replicas[backend], math.ceil(retry_after_s)
            body = json.dumps(json.dumps({"detail": f"the endpoint is at capacity: retry after {retry_after} s"}))
            lines.append(f"{use[1]}{BOUND_MARK}: {max_ongoing} at once per replica, {depth} waiting in all\n")
            lines.append(f"{use[1]}http-request return status 503 content-type application/json string {body} "
                         f"hdr Retry-After {retry_after} if is_{backend} {{ queue({backend}) ge {depth} }}\n")
        lines.append(line)
    return "".join(lines)


def rewrite(text: str, queue: str | None = None, host: str = LOOPBACK) -> str:
    """Both rewrites of a config Ray wrote: loopback binds, and the queue bound when ``queue`` gives one."""
    text = loopback_config(text, host)
    return bounded_config(text, parse_queues(queue)) if queue else text


def rewrite_in_place(config: str, queue: str | None = None, host: str = LOOPBACK) -> None:
    """:func:`rewrite` ``config``, under the lock file Ray writes it under."""
    with open(config + ".lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            text = Path(config).read_text()
            rewritten = rewrite(text, queue, host)
            if rewritten != text:
                temporary = f"{config}.{os.getpid()}.tmp"
                Path(temporary).write_text(rewritten)
                os.replace(temporary, config)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
def write_wrapper(directory: str | Path) -> str:
    """An executable in ``directory`` that runs :func:`main` with this interpreter; returns its path."""
    root = Path(__file__).resolve().parents[1]
    wrapper = Path(directory) / WRAPPER_NAME
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    temporary = wrapper.with_name(f".{WRAPPER_NAME}.{os.getpid()}")
    temporary.write_text(f"#!{sys.executable}\n"
                         "# HAProxy for Ray Serve, its stats and metrics on loopback: serving/haproxy_wrapper.py\n"
                         f"import sys\nsys.path.insert(0, {str(root)!r})\n"
                         f"from serving.haproxy_wrapper import main\nmain()\n")
    temporary.chmod(0o755)
    os.replace(temporary, wrapper)
    return str(wrapper)


def main(argv: list[str] | None = None) -> None:
    """Rewrite the config given with ``-f``, then become the real HAProxy; exit 1, saying why, if either fails."""
    args = sys.argv[1:] if argv is None else argv
    real = os.environ.get(REAL_BINARY_ENV, "")
    try:
        if not real or Path(real).name == WRAPPER_NAME:
            raise ValueError(f"${REAL_BINARY_ENV} must name the HAProxy binary (got {real!r})")
        if "-f" in args[:-1]:
            rewrite_in_place(args[args.index("-f") + 1], os.environ.get(QUEUE_ENV) or None)
    except (OSError, ValueError) as exc:
        print(f"{WRAPPER_NAME}: not starting HAProxy (its stats page would be on all interfaces, or its queue "
              f"unbounded): {exc}", file=sys.stderr)
        sys.exit(1)
    os.execv(real, [real, *args])
