"""What the embedded Ray's dashboard costs a local run (issue 36): ``start_ray()`` to ready, the Ray processes'
memory and CPU while idle, and what is left after a SIGTERM, with and without ``include_dashboard``.

    .venv/bin/python -m benchmarks.ray_dashboard_cost [--repeats 3] [--settle 10] [--json out.json]

Each measurement is a fresh driver process (``runtime.local_ray.start_ray`` under ``run_command``, as every
``pneumonia`` command runs it) in a session of its own; the two settings alternate. "ready" is ``start_ray``
returning and, with the dashboard, its first HTTP answer. Memory is summed over the driver's descendants (the
Ray processes, not the driver itself): RSS counts shared pages once per process, PSS splits them. The SIGTERM
goes to the driver's process group, as a terminal's Ctrl-C or a service manager's stop does; "left" counts
those processes still alive 30 s later.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LEFT_AFTER_S = 30.0


def _child(dashboard: bool) -> int:
    """The driver: start a local Ray, say when it is ready, then wait for the stop signal."""
    from runtime.local_ray import dashboard_url, run_command, start_ray

    def body() -> int:
        started = time.perf_counter()
        start_ray(dashboard=dashboard, log=lambda line: None)
        returned = time.perf_counter() - started
        url = dashboard_url()
        answered = None
        if url:
            import urllib.error
            import urllib.request

            deadline = time.time() + 120
            while answered is None and time.time() < deadline:
                try:
                    urllib.request.urlopen(url + "/api/version", timeout=5).close()
                    answered = time.perf_counter() - started
                except urllib.error.HTTPError:  # 401 without the token: the server answered
                    answered = time.perf_counter() - started
                except OSError:
                    time.sleep(0.1)
        print(json.dumps({"start_ray_s": returned, "ready_s": answered or returned, "url": url}), flush=True)
        while True:
            time.sleep(3600)

    return run_command(body)


def _processes(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _memory_mib(processes) -> tuple[float, float]:
    import psutil

    rss = pss = 0
    for process in processes:
        try:
            info = process.memory_full_info()
        except psutil.Error:
            continue
        rss, pss = rss + info.rss, pss + info.pss
    return rss / 2**20, pss / 2**20


def _cpu_seconds(processes) -> float:
    import psutil

    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def _alive(processes) -> list:
    import psutil

    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.Error:
            continue
    return alive


def measure(dashboard: bool, settle: float) -> dict:
    """One driver from start to stop; everything it started is killed at the end whatever happened."""
    driver = subprocess.Popen([sys.executable, "-m", "benchmarks.ray_dashboard_cost", "--child",
                               "--dashboard" if dashboard else "--no-dashboard"], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, start_new_session=True,
                              env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    processes = []
    try:
        line = driver.stdout.readline()
        if not line:
            raise RuntimeError(f"the driver exited with {driver.wait()} before Ray was ready")
        row = {"dashboard": dashboard, **json.loads(line)}
        time.sleep(settle)  # a measurement window, not a wait for a condition: idle Ray after start-up
        processes = _processes(driver.pid)
        cpu_before = _cpu_seconds(processes)
        row["processes"] = len(processes)
        row["rss_mib"], row["pss_mib"] = _memory_mib(processes)
        time.sleep(settle)
        row["idle_cpu_pct"] = 100 * (_cpu_seconds(_processes(driver.pid)) - cpu_before) / settle
        processes = _processes(driver.pid)
        stopped = time.perf_counter()
        os.killpg(driver.pid, signal.SIGTERM)
        driver.wait(timeout=LEFT_AFTER_S)
        row["driver_exit_s"] = time.perf_counter() - stopped
        deadline = stopped + LEFT_AFTER_S
        while _alive(processes) and time.perf_counter() < deadline:
            time.sleep(0.2)
        row["all_gone_s"] = None if _alive(processes) else time.perf_counter() - stopped
        row["left_after_30s"] = len(_alive(processes))
        return row
    finally:
        for process in _alive(processes):
            process.kill()
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()


def table(rows: list[dict]) -> list[str]:
    columns = [("start_ray_s", "start_ray() s", "{:.1f}"), ("ready_s", "ready s", "{:.1f}"),
               ("processes", "Ray processes", "{:.0f}"), ("rss_mib", "RSS MiB", "{:.0f}"),
               ("pss_mib", "PSS MiB", "{:.0f}"), ("idle_cpu_pct", "idle CPU %", "{:.1f}"),
               ("driver_exit_s", "exit after SIGTERM s", "{:.1f}"), ("left_after_30s", "left after 30 s", "{:.0f}")]
    lines = ["| dashboard | " + " | ".join(title for _, title, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for setting in (True, False):
        runs = [row for row in rows if row["dashboard"] is setting]
        cells = []
        for key, _, form in columns:
            values = [row[key] for row in runs]
            cells.append(f"{form.format(statistics.median(values))} ({', '.join(form.format(v) for v in values)})")
        lines.append(f"| {'on' if setting else 'off'} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settle", type=float, default=10.0, help="seconds idle before memory, and for idle CPU")
    parser.add_argument("--json", help="also write the runs here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dashboard", action=argparse.BooleanOptionalAction, default=True, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args.dashboard)
    rows = []
    for repeat in range(args.repeats):
        for dashboard in (True, False):
            rows.append(measure(dashboard, args.settle))
            print(json.dumps({"repeat": repeat, **rows[-1]}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nmedian (runs), {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}:")
    print("\n".join(table(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
