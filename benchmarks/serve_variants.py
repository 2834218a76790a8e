"""The endpoint under deployment variants at one concurrency, in one run: what serving/settings.py should say.

``benchmarks/serve_load.py`` measures one replica of 1 CPU against the in-process ceiling. This
script reuses its servers and ``wrk`` load (HAProxy ingress, Serve's default here; closed loop) for variants:
replicas x CPUs each (``ServeSettings`` fields) and the inference runtime (``runtime=keras`` sets
``$PNEUMONIA_INFERENCE_RUNTIME`` for that server, ``models.inference``), each against the in-process ceiling of
the runtime it runs: decode + preprocessing + the served model (probability and embedding) on batches of 32,
with every core of the machine. Requests/s counts answered requests (errors apart); per core, over the
machine's cores.

Usage: python -m benchmarks.serve_variants --package artifacts/VERSION --image TRAIN.jpeg [--seconds 15]
       [--concurrency 32] [--variant NAME:replicas=2,num_cpus=1[,runtime=keras]] ... [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from benchmarks.serve_load import ceiling as serve_load_ceiling
from benchmarks.serve_load import (
    cpu_by_process,
    cpu_spent,
    post_script,
    run_wrk,
    serve_command,
    start_server,
    stop_server,
    wait_ready,
)
from serving.http_proxy import HAPROXY_ENV, HAPROXY_PORTS, free_port

DEFAULT_VARIANTS = ("keras 1x1:replicas=1,num_cpus=1,runtime=keras", "1x1:replicas=1,num_cpus=1",
                    "1x2:replicas=1,num_cpus=2", "2x1:replicas=2,num_cpus=1")
# the closed-loop throughput setting the serving targets were measured with: every client's request admitted
DEFAULT_BASE = "max_queued_requests=-1,queue_timeout_ms=0"


def parse_variant(text: str, base: str = "") -> tuple[str, dict, str]:
    """``NAME:key=value,...`` over ``base`` (``key=value,...``) -> (name, ServeSettings fields, runtime)."""
    name, _, spec = text.partition(":")
    fields: dict = {}
    runtime = "onnxruntime"
    spec = f"{base},{spec}"
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key == "runtime":
            runtime = value
        else:
            fields[key] = float(value) if key == "num_cpus" else int(value)
    return name, fields, runtime


def measure(command: list[str], env: dict, port: int, image: Path, script: Path, connections: int, seconds: int,
            log: Path) -> dict:
    """Start one server, load it at ``connections`` for ``seconds`` after as long a warm-up at the same load (so
    every replica has joined HAProxy's backend, which takes two health checks, and has seen every batch size),
    stop it."""
    process = start_server(command, env, log)
    try:
        url = f"http://127.0.0.1:{port}/predict"
        wait_ready(url, image.read_bytes())
        run_wrk(url, script, connections, seconds)
        before = cpu_by_process(process.pid)
        row = run_wrk(url, script, connections, seconds)
        row["server_cpu_seconds"] = cpu_spent(before, cpu_by_process(process.pid))
    finally:
        stop_server(process)
    return row


def ceiling(package: str, image: Path, runtime: str, seconds: float) -> float:
    """``serve_load``'s in-process ceiling (every core) with the model call run by ``runtime``."""
    from models.inference import RUNTIME_ENV

    before = os.environ.get(RUNTIME_ENV)
    os.environ[RUNTIME_ENV] = runtime
    try:
        return serve_load_ceiling(package, image, seconds)["images_per_sec"]
    finally:
        if before is None:
            del os.environ[RUNTIME_ENV]
        else:
            os.environ[RUNTIME_ENV] = before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--variant", action="append", help=f"default: {', '.join(DEFAULT_VARIANTS)}")
    parser.add_argument("--base", default=DEFAULT_BASE, help="ServeSettings fields of every variant (default: "
                        "%(default)s, the unbounded queue of the serving targets; serving/settings.py's defaults "
                        "bound it, and a closed loop of 32 clients then gets mostly 503s)")
    parser.add_argument("--json")
    args = parser.parse_args()
    package, image = str(Path(args.package).resolve()), Path(args.image).resolve()
    variants = [parse_variant(v, args.base) for v in args.variant or DEFAULT_VARIANTS]
    cores = os.cpu_count()
    ceilings = {runtime: ceiling(package, image, runtime, args.seconds) for runtime in sorted({v[2] for v in variants})}
    for runtime, value in ceilings.items():
        print(f"ceiling, {runtime}: {value:.1f} images/s", flush=True)
    results: dict = {"machine": f"{cores} CPUs", "seconds": args.seconds, "concurrency": args.concurrency,
                     "ceilings": ceilings, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        script = post_script(Path(tmp), image)
        for name, fields, runtime in variants:
            port = free_port()
            env = {**os.environ, **HAPROXY_ENV, **{key: str(free_port()) for key in HAPROXY_PORTS},
                   "PNEUMONIA_INFERENCE_RUNTIME": runtime}
            row = measure(serve_command(package, port, fields), env, port, image, script, args.concurrency,
                          args.seconds, Path(tmp) / "server.log")
            answered = row["rps"] * (row["requests"] - row["errors"]) / max(row["requests"], 1)  # 200s only
            row.update(settings=fields, runtime=runtime, answered_rps=answered,
                       share_of_ceiling=answered / ceilings[runtime], rps_per_core=answered / cores)
            results["variants"][name] = row
            print(f"{name:14} {answered:7.1f} req/s ({100 * row['share_of_ceiling']:5.1f} % of the {runtime} "
                  f"ceiling, {row['rps_per_core']:.1f} per core)  p50 {row['p50_ms']:.1f} ms  p99 {row['p99_ms']:.1f}  "
                  f"errors {row['errors']}", flush=True)
            print(f"      server CPU s by process: {row['server_cpu_seconds']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
