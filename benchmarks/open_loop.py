"""Overload: open-loop load at 1x, 2x and 4x the endpoint's capacity, today's unbounded queue vs a bounded one.

A closed-loop client (``wrk``, ``benchmarks/serve_load.py``) waits for each answer before it sends the next
request, so it can never offer more than the server takes and never shows what overload does. Here requests
arrive at a fixed mean rate whatever the server answers (Poisson arrivals, each request its own asyncio task
on a keep-alive pool that opens a connection whenever none is idle), as real clients do.

For each server configuration (one Serve replica behind HAProxy, started as ``serve_load`` starts it):
the unloaded latency (open loop at a tenth of the capacity), then open loop at 1x, 2x and 4x the capacity.
The capacity is the *first* configuration's (closed loop, 32 requests in flight, the same client), so every
configuration meets the same absolute rates. Per rate: requests sent, 200s, 503s (and how many carried
``Retry-After``), others (timeouts, dropped connections, other statuses), p50/p99 latency of the accepted
requests from their scheduled send time (so a late client does not hide server delay), the p99 time to a 503,
the mean batch size, and the client's CPU share. No assertion on time: the figures go to BENCHMARKS.md.

Usage: python -m benchmarks.open_loop --package artifacts/VERSION --image X.jpeg [--seconds 20]
           [--config NAME:key=value,key=value ...] [--json out.json]
(a ``--config`` holds ``ServeSettings`` fields, and ``bound=haproxy`` (default: HAProxy keeps a bounded queue,
as ``pneumonia serve`` has it, ``serving/haproxy_wrapper.py``) or ``bound=replica`` (only the replica turns the
excess away, as before); default configs: ``before`` = the unbounded queue, ``after`` = the settings' defaults.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.serve_load import (
    UNBOUNDED,
    cpu_by_process,
    cpu_spent,
    serve_command,
    start_server,
    stop_server,
    wait_ready,
)
from serving.ingress import HAPROXY_ENV, HAPROXY_PORTS, free_port

TIMEOUT_S = 30.0  # a request unanswered this long counts as "other" (a client gives up)


@dataclass
class Answer:
    status: int  # HTTP status; 0: timed out; -1: connection failed
    seconds: float  # from the scheduled send time to the last byte of the answer
    done: float  # when the answer came, in seconds from the phase's start
    retry_after: bool = False
    batch: int = 0


async def post(session, url: str, body: bytes, scheduled: float, start: float = 0.0) -> Answer:
    import aiohttp

    status, retry_after, batch = -1, False, 0
    try:
        async with session.post(url, data=body, headers={"Content-Type": "image/jpeg"}) as response:
            await response.read()
            status, retry_after = response.status, "Retry-After" in response.headers
            batch = int(response.headers.get("X-Batch-Size", 0))
    except TimeoutError:
        status = 0
    except aiohttp.ClientError:
        pass
    now = time.perf_counter()
    return Answer(status, now - scheduled, now - start, retry_after, batch)


def session():
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=TIMEOUT_S))


async def open_loop(url: str, body: bytes, rate: float, seconds: float, seed: int = 0) -> list[Answer]:
    """Send at ``rate`` per second (exponential gaps) for ``seconds``, never waiting for an answer; then wait
    for every answer (each bounded by TIMEOUT_S)."""
    gaps = random.Random(seed)
    tasks = []
    async with session() as client:
        start = time.perf_counter()
        scheduled = start
        while scheduled - start < seconds:
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
            tasks.append(asyncio.create_task(post(client, url, body, scheduled, start)))
            scheduled += gaps.expovariate(rate)
        return list(await asyncio.gather(*tasks))


async def closed_loop(url: str, body: bytes, concurrency: int, seconds: float) -> float:
    """Answers per second with ``concurrency`` requests always in flight: the capacity."""
    done = 0
    async with session() as client:
        end = time.perf_counter() + seconds

        async def worker():
            nonlocal done
            while time.perf_counter() < end:
                answer = await post(client, url, body, time.perf_counter())
                done += answer.status == 200
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - start)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def summarise(answers: list[Answer], rate: float, seconds: float, client_cpu_s: float) -> dict:
    accepted = [a.seconds * 1000 for a in answers if a.status == 200]
    rejected = [a for a in answers if a.status == 503]
    p50, p99 = percentile(accepted, 50), percentile(accepted, 99)
    return {"rate": rate, "sent": len(answers), "ok": len(accepted), "rejected": len(rejected),
            "rejected_with_retry_after": sum(a.retry_after for a in rejected),
            "other": len(answers) - len(accepted) - len(rejected),
            "timeouts": sum(a.status == 0 for a in answers),
            "goodput": sum(a.status == 200 and a.done <= seconds for a in answers) / seconds,  # 200s/s in the phase
            "p50_ms": p50, "p99_ms": p99, "p99_to_503_ms": percentile([a.seconds * 1000 for a in rejected], 99),
            "mean_batch": sum(a.batch for a in answers if a.status == 200) / max(1, len(accepted)),
            "client_cpu_share": client_cpu_s / (seconds * (os.cpu_count() or 1))}


def run(coroutine):
    try:
        import uvloop

        return uvloop.run(coroutine)
    except ImportError:
        return asyncio.run(coroutine)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_phase(url: str, body: bytes, rate: float, seconds: float, server: int) -> dict:
    """One open-loop phase, with the CPU seconds each server process (of group ``server``) spent in it."""
    before, server_before = cpu_seconds(), cpu_by_process(server)
    answers = run(open_loop(url, body, rate, seconds))
    row = summarise(answers, rate, seconds, cpu_seconds() - before)
    row["server_cpu_seconds"] = cpu_spent(server_before, cpu_by_process(server))
    time.sleep(3)  # the server drains whatever the phase left before the next one starts
    return row


def measure(name: str, settings: dict, package: str, image: Path, seconds: float, capacity: float | None,
            log: Path) -> dict:
    """Unloaded latency and 1x, 2x, 4x ``capacity`` for one server configuration; ``capacity`` None: measure
    this configuration's own first (a bounded queue would answer a closed loop of 32 with 503s)."""
    from serving.launch import APP_NAME
    from serving.settings import ServeSettings

    port = free_port()
    settings = dict(settings)
    where = settings.pop("bound", "haproxy")
    env = {**os.environ, **HAPROXY_ENV, **{key: str(free_port()) for key in HAPROXY_PORTS}}
    queue = ServeSettings.parse({"package": package, **settings}).haproxy_queue(APP_NAME) if where == "haproxy" else None
    process = start_server(serve_command(package, port, settings, queue), env, log)
    url = f"http://127.0.0.1:{port}/predict"
    body = image.read_bytes()
    try:
        wait_ready(url, body)
        run(closed_loop(url, body, 8, 3))  # warm-up
        if capacity is None:
            capacity = run(closed_loop(url, body, 32, seconds))
            print(f"{name}: capacity {capacity:.1f} req/s (closed loop, 32 in flight)", flush=True)
        unloaded = load_phase(url, body, capacity / 10, seconds, process.pid)
        print(f"{name}: unloaded (0.1x) p50 {unloaded['p50_ms']:.1f} ms, p99 {unloaded['p99_ms']:.1f} ms", flush=True)
        rows = []
        for multiple in (1, 2, 4):
            rate = capacity * multiple
            row = {"multiple": multiple, **load_phase(url, body, rate, seconds, process.pid)}
            rows.append(row)
            print(f"{name}: {multiple}x ({rate:.0f}/s) sent {row['sent']} ok {row['ok']} 503 {row['rejected']} "
                  f"(Retry-After {row['rejected_with_retry_after']}) other {row['other']} "
                  f"p50 {row['p50_ms'] or float('nan'):.1f} p99 {row['p99_ms'] or float('nan'):.1f} ms "
                  f"(x{(row['p99_ms'] or float('nan')) / unloaded['p99_ms']:.2f} unloaded) "
                  f"p99 to 503 {row['p99_to_503_ms'] or float('nan'):.1f} ms batch {row['mean_batch']:.1f} "
                  f"client CPU {100 * row['client_cpu_share']:.0f} %", flush=True)
            print(f"      server CPU s by process: {row['server_cpu_seconds']}", flush=True)
        kept_by = "none" if settings.get("max_queued_requests") == -1 else where
        return {"settings": settings, "bound": kept_by, "capacity": capacity, "unloaded": unloaded, "rates": rows}
    finally:
        stop_server(process)


def parse_config(text: str) -> tuple[str, dict]:
    """``NAME:key=value,key=value`` -> (NAME, {key: int, float or str})."""
    name, _, pairs = text.partition(":")
    settings = {}
    for pair in filter(None, pairs.split(",")):
        key, _, value = pair.partition("=")
        for kind in (int, float, str):
            try:
                settings[key] = kind(value)
                break
            except ValueError:
                continue
    return name, settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--config", action="append",
                        help="NAME:key=value,... (ServeSettings fields, and bound=haproxy|replica: where a bounded "
                             "queue is kept, HAProxy as `pneumonia serve` does, or only the replica as before)")
    parser.add_argument("--capacity", type=float, help="req/s measured before (default: measure it)")
    parser.add_argument("--json")
    args = parser.parse_args()
    configs = [parse_config(c) for c in args.config or []] or [("before", UNBOUNDED), ("after", {})]
    package, image = str(Path(args.package).resolve()), Path(args.image).resolve()
    results: dict = {"machine": f"{os.cpu_count()} CPUs", "seconds": args.seconds, "configs": {}}
    capacity = args.capacity
    with tempfile.TemporaryDirectory() as tmp:
        for name, settings in configs:
            result = measure(name, settings, package, image, args.seconds, capacity, Path(tmp) / f"{name}.log")
            results["configs"][name] = result
            capacity = result["capacity"]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
