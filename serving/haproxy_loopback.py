"""HAProxy's statistics page and Prometheus exporter on loopback, for the HAProxy Ray Serve starts.

Ray 2.60's HAProxy template binds ``listen stats`` to ``*:STATS_PORT`` and ``frontend prometheus`` to
``:METRICS_PORT``: all interfaces, without authentication, and no setting changes that address. Ray does take
the binary from ``RAY_SERVE_HAPROXY_BINARY_PATH`` and talks to HAProxy only through its admin socket, so
``serving.ingress.set_ingress_environment`` points that setting at a wrapper in the run's HAProxy directory
(:func:`write_wrapper`) that calls :func:`main`: it rewrites those bind lines of the config Ray passes with
``-f`` to 127.0.0.1, in place and under the lock Ray writes that file under, then execs the real HAProxy
(``$PNEUMONIA_HAPROXY_BINARY``) with Ray's arguments unchanged. The process keeps its pid (Ray reloads it
with ``-sf PID``) and its command line (Ray and ``serving.ingress`` know their HAProxy by its config path).
A config in which either section's bind line is not found is not started: HAProxy would otherwise put the
page on every interface. Only the standard library here: it runs at every HAProxy start and reload.
"""

from __future__ import annotations

import fcntl
import os
import re
import sys
from pathlib import Path

REAL_BINARY_ENV = "PNEUMONIA_HAPROXY_BINARY"  # the HAProxy the wrapper execs
WRAPPER_NAME = "haproxy-loopback"
SECTIONS = ("listen stats", "frontend prometheus")  # HAProxy's stats page, its Prometheus exporter
LOOPBACK = "127.0.0.1"
_BIND = re.compile(r"^(\s*bind\s+)(\S*?):(\d+)(\s.*)?$")  # bind [ADDRESS]:PORT [options]


def loopback_config(text: str, host: str = LOOPBACK) -> str:
    """``text`` (an HAProxy config) with every ``bind ADDRESS:PORT`` of the stats and Prometheus sections on
    ``host``; a ValueError when a section or its bind line is missing."""
    lines, section, rewritten = [], None, set()
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if stripped and line[0] not in " \t" and not stripped.startswith("#"):
            section = " ".join(stripped.split()[:2])  # a section header: `listen stats`, `frontend NAME`, ...
        elif section in SECTIONS:
            match = _BIND.match(line.rstrip("\r\n"))
            if match:
                line = f"{match[1]}{host}:{match[3]}{match[4] or ''}\n"
                rewritten.add(section)
        lines.append(line)
    missing = [name for name in SECTIONS if name not in rewritten]
    if missing:
        raise ValueError(f"no `bind ADDRESS:PORT` line found in {' or '.join(missing)}")
    return "".join(lines)


def rewrite_in_place(config: str, host: str = LOOPBACK) -> None:
    """Put ``config``'s stats and metrics binds on ``host``, under the lock file Ray writes it under."""
    with open(config + ".lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            text = Path(config).read_text()
            rewritten = loopback_config(text, host)
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
                         "# HAProxy for Ray Serve, its stats and metrics on loopback: serving/haproxy_loopback.py\n"
                         f"import sys\nsys.path.insert(0, {str(root)!r})\n"
                         f"from serving.haproxy_loopback import main\nmain()\n")
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
            rewrite_in_place(args[args.index("-f") + 1])
    except (OSError, ValueError) as exc:
        print(f"{WRAPPER_NAME}: not starting HAProxy with its stats page on all interfaces: {exc}", file=sys.stderr)
        sys.exit(1)
    os.execv(real, [real, *args])
