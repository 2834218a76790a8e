"""The HAProxy Ray Serve starts, through a wrapper that rewrites its config: stats and metrics on loopback, and
the endpoint's queue bounded in HAProxy itself.

Ray 2.60's HAProxy template binds ``listen stats`` to ``*:STATS_PORT`` and ``frontend prometheus`` to
``:METRICS_PORT``: all interfaces, without authentication, and no setting changes that address. Its servers
have no ``maxconn``, so HAProxy forwards every request at once and the replica turns the excess away itself
(Serve's ``max_queued_requests``): in Python, on the core that runs the model, and loosely (Ray's own note:
it may drop more than the bound, as it yields to its event loop between counting and checking).

Ray does take the binary from ``RAY_SERVE_HAPROXY_BINARY_PATH`` and talks to HAProxy only through its admin
socket, so ``serving.http_proxy.set_ingress_environment`` points that setting at a wrapper in the run's HAProxy
directory (:func:`write_wrapper`) that calls :func:`main`: it rewrites the config Ray passes with ``-f``, in
place and under the lock Ray writes that file under, then execs the real HAProxy (``$PNEUMONIA_HAPROXY_BINARY``)
with Ray's arguments unchanged. The process keeps its pid (Ray reloads it with ``-sf PID``) and its command line
(Ray and ``serving.http_proxy`` know their HAProxy by its config path). Two rewrites:

- :func:`loopback_config`: the stats and Prometheus binds on 127.0.0.1. A config in which either section's bind
  line is not found is not started: HAProxy would otherwise put the page on every interface.
- :func:`bounded_config`, for each application ``$PNEUMONIA_HAPROXY_QUEUE`` gives a bound: each replica server gets
  ``maxconn`` = ``max_ongoing_requests`` (HAProxy holds the rest in its own queue and hands each on as a slot
  frees); a request waits there at most the budget (``timeout queue``), and one that finds more requests ahead of
  it than the replicas drain in half the budget (``GATE_SHARE``) is answered 503 with ``Retry-After`` at once,
  before any Python runs.
  The drain rate is HAProxy's own count of requests handed to the replicas in the last second
  (``srv_sess_rate``), and never taken as less than one batch per replica per budget. A length bound per
  replica guards memory.

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
# the bounds HAProxy keeps: "APP=MAX_ONGOING,MAX_QUEUED,RETRY_AFTER_S,QUEUE_TIMEOUT_MS,BATCH;..."
QUEUE_ENV = "PNEUMONIA_HAPROXY_QUEUE"
WRAPPER_NAME = "haproxy-loopback"
SECTIONS = ("listen stats", "frontend prometheus")  # HAProxy's stats page, its Prometheus exporter
LOOPBACK = "127.0.0.1"
REPLICA_PREFIX = "SERVE_REPLICA"  # Ray's name for a replica's server line (its fallback proxy is a backup)
BOUND_MARK = "# pneumonia: queue bound"  # on the lines bounded_config adds: a reload does not add them twice
# A request is refused at once when the queue ahead of it takes more than this share of the budget to drain at the
# last second's rate; `timeout queue` at the whole budget catches one the drain slowed for (a 503 after the budget).
# Gated at the whole budget, the queue reached it: in a short run at 2x and 4x the 503s' p99 was the budget
# (502-504 ms).
GATE_SHARE = 0.5
_BIND = re.compile(r"^(\s*bind\s+)(\S*?):(\d+)(\s.*)?$")  # bind [ADDRESS]:PORT [options]


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


def parse_queues(value: str) -> dict[str, tuple[int, int, float, int, int]]:
    """``APP=MAX_ONGOING,MAX_QUEUED,RETRY_AFTER_S,QUEUE_TIMEOUT_MS,BATCH[;APP=...]`` (``$PNEUMONIA_HAPROXY_QUEUE``)
    as {app: bound}; a ValueError saying what is wrong."""
    form = "APP=MAX_ONGOING,MAX_QUEUED,RETRY_AFTER_S,QUEUE_TIMEOUT_MS,BATCH[;...]"
    queues = {}
    for part in filter(None, value.split(";")):
        try:
            app, numbers = part.split("=")
            ongoing, queued, retry_after, timeout_ms, batch = numbers.split(",")
            bound = int(ongoing), int(queued), float(retry_after), int(timeout_ms), int(batch)
        except ValueError:
            raise ValueError(f"${QUEUE_ENV} must be {form} (got {value!r})") from None
        ongoing, queued, retry_after, timeout_ms, batch = bound
        if not app or ongoing < 1 or queued == 0 or queued < -1 or retry_after < 0 or timeout_ms < 0 or batch < 1:
            raise ValueError(f"${QUEUE_ENV}: an application name, MAX_ONGOING and BATCH >= 1, MAX_QUEUED -1 or >= 1, "
                             f"RETRY_AFTER_S and QUEUE_TIMEOUT_MS >= 0 (got {value!r})")
        queues[app] = bound
    return queues


def _backend_rules(backend: str, servers: list[str], bound: tuple[int, int, float, int, int]) -> list[str]:
    """The lines that keep ``bound`` at the top of ``backend``, whose replica servers are ``servers``."""
    max_ongoing, max_queued, retry_after_s, timeout_ms, batch = bound
    retry_after = math.ceil(retry_after_s)
    body = json.dumps(json.dumps({"detail": f"the endpoint is at capacity: retry after {retry_after} s"}))
    refuse = f"status 503 content-type application/json string {body} hdr Retry-After {retry_after}"
    guard = max_queued * len(servers) if max_queued > 0 else None
    waiting = f"{timeout_ms} ms waiting at most" if timeout_ms else "no time bound"
    length = "no length bound" if guard is None else f"{guard} waiting in all at most"
    lines = [f"{BOUND_MARK}: {max_ongoing} at once per replica, {waiting}, {length}",
             f"http-error {refuse}"]  # also the answer to a request that waited out `timeout queue`
    if timeout_ms:
        drain, depth, floor = "txn.pneumonia_drain", "txn.pneumonia_depth", batch * len(servers)
        lines += [f"timeout queue {timeout_ms}ms",
                  f"http-request set-var({drain}) int(0)",
                  *(f"http-request set-var({drain}) srv_sess_rate({backend}/{server}),add({drain})"
                    for server in servers),
                  f"http-request set-var({depth}) var({drain}),mul({round(GATE_SHARE * timeout_ms)}),div(1000)",
                  f"http-request set-var({depth}) int({floor}) if {{ var({depth}) -m int lt {floor} }}",
                  f"http-request return {refuse} if {{ queue,sub({depth}) ge 0 }}"]
    if guard is not None:
        lines.append(f"http-request return {refuse} if {{ queue ge {guard} }}")
    return lines


def bounded_config(text: str, queues: dict[str, tuple[int, int, float, int, int]]) -> str:
    """``text`` with the queue of each Serve application in ``queues`` ({app: (max_ongoing, max_queued,
    retry_after_s, queue_timeout_ms, batch)}) kept by HAProxy: ``maxconn max_ongoing`` on each of its replica
    servers, and a 503 with ``Retry-After`` for a request that would wait longer than ``queue_timeout_ms`` or
    finds ``max_queued`` per replica waiting. Ray names an application's backend ``http-APP``. A config already
    bounded is returned as it is."""
    if BOUND_MARK in text:
        return text
    bounds = {f"http-{app}": bound for app, bound in queues.items()}
    servers: dict[str, list[str]] = {}  # backend -> its replica servers
    for section, _, line in _sections(text):
        if _backend(section) in bounds and _replica_server(line):
            servers.setdefault(_backend(section), []).append(line.split()[1])
    lines = []
    for section, header, line in _sections(text):
        backend = _backend(section)
        if backend in servers and _replica_server(line):
            line = f"{line.rstrip()} maxconn {bounds[backend][0]}\n"
        lines.append(line)
        if header and backend in servers:
            lines += [f"    {rule}\n" for rule in _backend_rules(backend, servers[backend], bounds[backend])]
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
