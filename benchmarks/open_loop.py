"""Overload: open-loop load at 0.1x-4x the endpoint's capacity, for several server settings in one run.

A closed-loop client (``wrk``, ``benchmarks/serve_load.py``) waits for each answer before it sends the next
request, so it can never offer more than the server takes and never shows what overload does. Here requests
arrive at a fixed mean rate whatever the server answers (Poisson arrivals, each request its own asyncio task
on a keep-alive pool that opens a connection whenever none is idle), as real clients do.

For each server configuration (one Serve replica behind HAProxy, started as ``serve_load`` starts it): a closed
loop of ``--clients`` clients, then open loop at 0.1x, 0.5x, 1x, 2x and 4x the capacity (a phase below 1x lasts
long enough for ``--min-requests``). The capacity is the *first* configuration's (closed loop, ``--concurrency``
requests in flight, the same client), so every configuration meets the same absolute rates: put the unbounded
endpoint first. Per rate: requests sent, 200s, 503s (and how many carried ``Retry-After``), others (timeouts,
dropped connections, other statuses), goodput (200s per second within the phase), p50/p99 latency of the
accepted requests from their scheduled send time (so a late client does not hide server delay), the p99 time to
a 503, the mean batch size, and the client's CPU share. No assertion on time: the figures go to BENCHMARKS.md.

Usage: python -m benchmarks.open_loop --package artifacts/VERSION --image X.jpeg [--seconds 20]
           [--config NAME:key=value,key=value ...] [--json out.json]
(a ``--config`` holds ``ServeSettings`` fields, and ``bound=haproxy`` (default: HAProxy keeps the bound, as
``pneumonia serve`` has it, ``serving/haproxy_wrapper.py``) or ``bound=replica`` (only the replica turns the
excess away); default configs: ``unbounded`` (no bound at all), ``count`` (the default before the waiting-time
budget: 2 requests at once + 1 waiting per replica, no time bound), ``budget`` (the settings' defaults).)
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
from serving.http_proxy import HAPROXY_ENV, HAPROXY_PORTS, free_port

TIMEOUT_S = 30.0  # a request unanswered this long counts as "other" (a client gives up)
MULTIPLES = (0.1, 0.5, 1, 2, 4)
# the endpoint's default before the waiting-time budget: 2 requests at once and 1 waiting per replica, by count
COUNT_BOUND = {"max_ongoing_requests": 2, "max_queued_requests": 1, "queue_timeout_ms": 0}


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


async def closed_loop(url: str, body: bytes, concurrency: int, seconds: float) -> tuple[float, int, int]:
    """(200s per second, 200s, other answers) with ``concurrency`` clients, each sending its next request as soon
    as its last is answered; with an unbounded server, the capacity."""
    done = refused = 0
    async with session() as client:
        end = time.perf_counter() + seconds

        async def worker():
            nonlocal done, refused
            while time.perf_counter() < end:
                answer = await post(client, url, body, time.perf_counter())
                done += answer.status == 200
                refused += answer.status != 200
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - start), done, refused


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
            "refused_share": len(rejected) / max(1, len(answers)),
            "rejected_with_retry_after": sum(a.retry_after for a in rejected),
            "rejected_after_100ms": sum(a.seconds > 0.1 for a in rejected),  # waited in the queue (its timeout)
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
            log: Path, concurrency: int = 64, clients: int = 32, min_requests: int = 2000) -> dict:
    """One server configuration at MULTIPLES of ``capacity``, then ``clients`` closed-loop clients; ``capacity``
    None: measure this configuration's own first (closed loop, ``concurrency`` in flight)."""
    from serving.launch import APP_NAME
    from serving.settings import ServeSettings

    port = free_port()
    settings = dict(settings)
    where = settings.pop("bound", "haproxy")
    env = {**os.environ, **HAPROXY_ENV, **{key: str(free_port()) for key in HAPROXY_PORTS}}
    queue = ServeSettings.parse({"package": package, "replicas": 1, **settings}).haproxy_queue(APP_NAME)
    process = start_server(serve_command(package, port, settings, queue if where == "haproxy" else None), env, log)
    url = f"http://127.0.0.1:{port}/predict"
    body = image.read_bytes()
    try:
        wait_ready(url, body)
        run(closed_loop(url, body, 8, 3))  # warm-up
        if capacity is None:
            tries = sorted(run(closed_loop(url, body, concurrency, seconds))[0] for _ in range(3))
            capacity = tries[1]  # the median of three: two-core figures here move by 10-20 % from one to the next
            print(f"{name}: capacity {capacity:.1f} req/s (closed loop, {concurrency} in flight; median of "
                  f"{', '.join(f'{t:.1f}' for t in tries)})", flush=True)
        # before the open loop: an unbounded server still works through what a client gave up on after an overload
        per_s, ok, refused = run(closed_loop(url, body, clients, seconds))
        closed = {"clients": clients, "ok_per_s": per_s, "ok": ok, "refused": refused}
        print(f"{name}: {clients} closed-loop clients: {per_s:.1f} answered/s ({per_s / capacity:.2f}x capacity), "
              f"{ok} answered, {refused} refused", flush=True)
        rows = []
        for multiple in MULTIPLES:
            rate = capacity * multiple
            phase = max(seconds, min_requests / rate) if multiple < 1 else seconds
            row = {"multiple": multiple, "seconds": phase, **load_phase(url, body, rate, phase, process.pid)}
            rows.append(row)
            print(f"{name}: {multiple}x ({rate:.0f}/s, {phase:.0f} s) sent {row['sent']} ok {row['ok']} "
                  f"503 {row['rejected']} ({100 * row['refused_share']:.1f} %, Retry-After "
                  f"{row['rejected_with_retry_after']}, after 100 ms {row['rejected_after_100ms']}) "
                  f"other {row['other']} goodput {row['goodput']:.1f}/s "
                  f"({row['goodput'] / capacity:.2f}x capacity) p50 {row['p50_ms'] or float('nan'):.1f} "
                  f"p99 {row['p99_ms'] or float('nan'):.1f} ms, p99 to 503 {row['p99_to_503_ms'] or float('nan'):.1f} "
                  f"ms, batch {row['mean_batch']:.1f}, client CPU {100 * row['client_cpu_share']:.0f} %", flush=True)
            print(f"      server CPU s by process: {row['server_cpu_seconds']}", flush=True)
        kept_by = "none" if queue is None else where
        return {"settings": settings, "bound": kept_by, "capacity": capacity, "rates": rows, "closed_loop": closed}
    finally:
        stop_server(process)


def table(results: dict) -> str:
    """The run as a markdown table (BENCHMARKS.md): one row per server and load."""
    def ms(value):
        return "" if value is None else f"{value:.0f}"

    capacity = next(iter(results["configs"].values()))["capacity"]
    header = ("| server | load | sent | answered/s (x capacity) | refused (503) | timed out or failed | accepted p50 / "
              "p99 ms | 503 p99 ms | mean batch |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for name, result in results["configs"].items():
        for row in result["rates"]:
            lines.append(f"| {name} | {row['multiple']:g}x ({row['rate']:.0f}/s) | {row['sent']:,} | "
                         f"{row['goodput']:.0f} ({row['goodput'] / capacity:.2f}x) | "
                         f"{100 * row['refused_share']:.1f} % "
                         f"({row['rejected']:,}) | {row['other']:,} | {ms(row['p50_ms'])} / {ms(row['p99_ms'])} | "
                         f"{ms(row['p99_to_503_ms'])} | {row['mean_batch']:.1f} |")
    for name, result in results["configs"].items():
        closed = result["closed_loop"]
        lines.append(f"\n{name}: {closed['clients']} closed-loop clients: {closed['ok_per_s']:.0f} answered/s "
                     f"({closed['ok_per_s'] / capacity:.2f}x capacity), {closed['refused']:,} refused")
    return "\n".join(lines)


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
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight when measuring the capacity")
    parser.add_argument("--clients", type=int, default=32, help="closed-loop clients after the open-loop phases")
    parser.add_argument("--min-requests", type=int, default=2000, help="requests sent at least in a phase below 1x")
    parser.add_argument("--json")
    args = parser.parse_args()
    configs = [parse_config(c) for c in args.config or []] or [("unbounded", UNBOUNDED), ("count", COUNT_BOUND),
                                                                ("budget", {})]
    package, image = str(Path(args.package).resolve()), Path(args.image).resolve()
    results: dict = {"machine": f"{os.cpu_count()} CPUs", "seconds": args.seconds, "configs": {}}
    capacity = args.capacity
    with tempfile.TemporaryDirectory() as tmp:
        for name, settings in configs:
            result = measure(name, settings, package, image, args.seconds, capacity, Path(tmp) / f"{name}.log",
                             args.concurrency, args.clients, args.min_requests)
            results["configs"][name] = result
            capacity = result["capacity"]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
