"""Serving throughput: this Serve endpoint vs a naive FastAPI server vs the in-process ceiling, in one run.

Closed-loop HTTP load from ``wrk`` (one thread, a Lua script posting one JPEG) at concurrency 1, 8 and 32
for a fixed time against (a) the Serve app (1 classifier replica; behind Serve's Python proxy, and with
``--haproxy`` also behind HAProxy, Serve's high-throughput mode), (b) benchmarks/naive_server.py (uvicorn,
``model.predict`` per request), and (c) the ceiling: the same decode, preprocessing and model called
in-process on full batches of 32. Reports requests/s, p50/p95/p99 latency, errors, and the client's CPU share.

Usage: python -m benchmarks.serve_load --package artifacts/VERSION --image X.jpeg [--seconds 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from serving.http_proxy import HAPROXY_ENV, HAPROXY_PORTS, free_port

REPO = Path(__file__).resolve().parents[1]
# The endpoint with no bound on its queue, in time or length (benchmarks/open_loop.py measures the bound)
UNBOUNDED = {"max_queued_requests": -1, "queue_timeout_ms": 0}
LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "image/jpeg"
local f = assert(io.open("{image}", "rb"))
wrk.body = f:read("*all")
f:close()
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %d %d %d %.3f %.3f %.3f\\n", summary.requests, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.duration, 0, latency:percentile(50) / 1000, latency:percentile(95) / 1000,
    latency:percentile(99) / 1000))
end
"""


def wait_ready(url: str, image: bytes, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            request = urllib.request.Request(url, data=image, method="POST", headers={"Content-Type": "image/jpeg"})
            with urllib.request.urlopen(request, timeout=30) as response:
                if response.status == 200:
                    return
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(1)


def run_wrk(url: str, script: Path, connections: int, seconds: int) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s", "-s", str(script),
                           url], capture_output=True, text=True, timeout=seconds + 120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}) against {url}: {done.stdout[-2000:]} {done.stderr[-2000:]}")
    out = done.stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    fields = next(line for line in out.splitlines() if line.startswith("RESULT")).split()[1:]
    requests, status_errors, socket_errors, duration_us = (int(x) for x in fields[:4])
    p50, p95, p99 = (float(x) for x in fields[5:8])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    wall = duration_us / 1e6
    return {"connections": connections, "rps": requests / wall, "p50_ms": p50, "p95_ms": p95, "p99_ms": p99,
            "errors": status_errors + socket_errors, "requests": requests,
            "client_cpu_share": cpu / (wall * os.cpu_count())}


def cpu_by_process(pgid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds so far of the server's processes, by pid with a short title: its process group plus every
    Ray worker (``ray::ProxyActor``, ``ray::ServeReplica:...``; Ray starts workers in their own groups) and
    HAProxy. By pid, because a Ray worker's title changes with the method it runs."""
    ticks = os.sysconf("SC_CLK_TCK")
    usage: dict[int, tuple[str, float]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            head, tail = stat.read_text().rsplit(")", 1)
            fields = tail.split()
            title = (stat.parent / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            if int(fields[2]) != pgid and not title.startswith("ray::") and not title.endswith("haproxy"):
                continue
        except (OSError, ValueError, IndexError):
            continue
        name = title.split("/")[-1].split(".")[0][:60] if title else head.split("(", 1)[-1]
        usage[int(stat.parent.name)] = (name, (int(fields[11]) + int(fields[12])) / ticks)
    return usage


def cpu_spent(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds each process title spent between two ``cpu_by_process`` snapshots."""
    spent: dict[str, float] = {}
    for pid, (name, seconds) in after.items():
        spent[name] = spent.get(name, 0.0) + seconds - before.get(pid, (name, 0.0))[1]
    return {k: round(v, 2) for k, v in sorted(spent.items(), key=lambda kv: -kv[1]) if v > 0.05}


def post_script(directory: Path, image: Path) -> Path:
    """``wrk``'s Lua script posting ``image``, written into ``directory``."""
    script = directory / "post.lua"
    script.write_text(LUA.replace("{image}", str(image)))
    return script


def ceiling(package: str, image_path: Path, seconds: float, batch: int = 32) -> dict:
    """Decode + preprocess + the replica's own model call (``serving.service.LoadedPackage``: the runtime the
    package records, or ``$PNEUMONIA_INFERENCE_RUNTIME``) on full batches, in this process: all of a request's
    work minus HTTP."""
    from benchmarks.inference_runtimes import ceiling_rate
    from runtime.tensorflow_setup import configure_tensorflow
    from serving.decode import decode_request
    from serving.service import LoadedPackage

    configure_tensorflow(0, "float32")
    served = LoadedPackage(package)
    contract = served.metadata.input

    def decode(body: bytes):
        return decode_request(body, "image/jpeg", contract.image_size, 40_000_000, contract.intensity)

    rate = ceiling_rate(served.model.predict_on_batch, decode, image_path.read_bytes(), seconds, batch)
    return {"images_per_sec": rate, "batch": batch, "runtime": getattr(served.model, "runtime", "keras")}


def serve_command(package: str, port: int, settings: dict | None = None, haproxy_queue: str | None = None) -> list[str]:
    """A child process that serves ``package`` on a local Ray (2 CPUs) at ``port``: the Serve app with one
    replica, ``settings`` (``ServeSettings`` fields) over that; SIGTERM shuts Serve and its Ray down, so an
    HAProxy outside its process group stops too. With ``haproxy_queue`` (``serving.settings.haproxy_queue``)
    the ingress is set as ``pneumonia serve`` sets it: HAProxy through the project's wrapper, keeping that
    bound; without, the caller's environment chooses the ingress."""
    args = {"package": package, "replicas": 1, **(settings or {})}
    ingress = (f"from serving.http_proxy import set_ingress_environment\n"
               f"set_ingress_environment('haproxy', {port}, {haproxy_queue!r})\n") if haproxy_queue else ""
    code = (
        "import sys, time, ray\nfrom ray import serve\nfrom serving.app import build_app\n" + ingress +
        "ray.init(address=\"local\", num_cpus=2, include_dashboard=False, log_to_driver=False)\n"
        f"serve.start(http_options={{'host': '127.0.0.1', 'port': {port}}})\n"
        f"serve.run(build_app({args!r}), name='pneumonia', route_prefix='/')\n"
        "import signal\n"
        "def stop(*_):\n    serve.shutdown(); ray.shutdown(); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "print('ready', flush=True)\nwhile True: time.sleep(3600)\n")
    return [sys.executable, "-c", code]


def start_server(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    """``command`` in its own process group, from the repository root, its stderr in ``log``."""
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"),
                            start_new_session=True)


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM: the server shuts Serve and its Ray down; then its process group is stopped."""
    process.terminate()
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        pass
    for sig in (15, 9):
        try:
            os.killpg(process.pid, sig)
            time.sleep(2)
        except ProcessLookupError:
            break


def measure_server(command: list[str], env: dict, port: int, image: Path, script: Path, levels: list[int],
                   seconds: int, log: Path) -> list[dict]:
    """Start one server in its own process group, load it at each concurrency, stop it and its group."""
    process = start_server(command, env, log)
    rows = []
    try:
        url = f"http://127.0.0.1:{port}/predict"
        wait_ready(url, image.read_bytes())
        run_wrk(url, script, 4, 3)  # warm-up
        for connections in levels:
            before = cpu_by_process(process.pid)
            row = run_wrk(url, script, connections, seconds)
            row["server_cpu_seconds"] = cpu_spent(before, cpu_by_process(process.pid))
            rows.append(row)
    finally:
        stop_server(process)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--replica-cpus", type=int, default=1, help="CPUs (and TF threads) of the Serve replica")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--throughput-optimized", action="store_true",
                        help="also run the same app with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (Ray >= 2.55: direct "
                             "ingress, user code on the replica's loop, gRPC between proxy and replicas)")
    parser.add_argument("--haproxy", action="store_true",
                        help="also run it with RAY_SERVE_ENABLE_HA_PROXY=1 and RAY_SERVE_THROUGHPUT_OPTIMIZED=1: "
                             "HAProxy (bundled with ray[serve]) in front of replicas that serve HTTP themselves")
    parser.add_argument("--json")
    args = parser.parse_args()
    package, image = str(Path(args.package).resolve()), Path(args.image).resolve()
    levels = [int(c) for c in args.concurrency.split(",")]
    results: dict = {"machine": f"{os.cpu_count()} CPUs", "seconds": args.seconds, "replica_cpus": args.replica_cpus}
    with tempfile.TemporaryDirectory() as tmp:
        script = post_script(Path(tmp), image)

        # (c) the ceiling, alone on the machine
        results["ceiling"] = ceiling(package, image, args.seconds)
        print(f"ceiling (in-process, batches of 32, {results['ceiling']['runtime']}): "
              f"{results['ceiling']['images_per_sec']:.1f} images/s", flush=True)

        # (a) the Serve endpoint, in a child process so that its Ray is stopped with it
        def serve_server(extra_env: dict) -> tuple[list[str], int, dict]:
            port = free_port()
            settings = {"num_cpus": args.replica_cpus, **UNBOUNDED}
            return serve_command(package, port, settings), port, extra_env

        servers = {"serve": serve_server({})}
        if args.throughput_optimized:
            servers["serve-to"] = serve_server({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"})
        if args.haproxy:
            servers["serve-ha"] = serve_server({**HAPROXY_ENV, **{key: str(free_port()) for key in HAPROXY_PORTS}})
        naive_port = free_port()
        if not args.skip_naive:
            servers["naive"] = ([sys.executable, "-m", "uvicorn", "benchmarks.naive_server:app", "--host", "127.0.0.1",
                                "--port", str(naive_port), "--log-level", "warning"], naive_port, {})
        for name, (command, server_port, extra_env) in servers.items():
            env = {**os.environ, "PNEUMONIA_PACKAGE": package, **extra_env}
            results[name] = measure_server(command, env, server_port, image, script, levels, args.seconds,
                                           Path(tmp) / f"{name}.log")
            for row in results[name]:
                share = row["rps"] / results["ceiling"]["images_per_sec"]
                row["share_of_ceiling"] = share
                print(f"{name:8} c={row['connections']:<2} {row['rps']:7.1f} req/s ({100 * share:5.1f} % of ceiling)  "
                      f"p50 {row['p50_ms']:7.1f} ms  p95 {row['p95_ms']:7.1f}  p99 {row['p99_ms']:7.1f}  "
                      f"errors {row['errors']}  client CPU {100 * row['client_cpu_share']:.1f} %", flush=True)
                print(f"      server CPU s by process: {row['server_cpu_seconds']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
