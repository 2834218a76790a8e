"""How a model package reaches a node that shares no disk with the driver: Ray's runtime_env upload against a copy
through storage (S3), timed on a two-node local Ray whose worker node cannot see the package's folder.

- **runtime_env**: the driver joins with ``runtime_env={"py_modules": [PACKAGE]}`` (what ``pneumonia serve
  --model artifacts/VERSION --address HEAD`` does): Ray zips the folder and uploads it to the GCS at ``ray.init``;
  a task on the worker node then waits for Ray to download and unpack it before it starts.
- **storage**: ``models.package_store.publish`` to an S3 server on loopback (moto), then ``fetch`` in a task on the
  worker node: a copy into the node's cache, checksums verified (a second fetch finds the cached copy).

Each is timed as the driver sees it (seconds) and repeated ``--repeats`` times with a fresh cluster; the package
is whatever ``--package`` names (the Quickstart's: 23 MB).

Usage: python -m benchmarks.package_carrier --package artifacts/VERSION [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# run in a driver of its own per carrier (a job's runtime_env is set once, at ray.init)
DRIVER = r'''
import json, os, sys, time
sys.path.insert(0, {repo!r})
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
carrier, package, address, storage = {carrier!r}, {package!r}, {address!r}, {storage!r}
started = time.perf_counter()
env = {{"py_modules": [package]}} if carrier == "runtime_env" else None
ray.init(address=address, runtime_env=env, log_to_driver=False)
joined = time.perf_counter() - started
worker = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and not n["Resources"].get("node:__internal_head__"))
here = NodeAffinitySchedulingStrategy(worker, soft=False)
published = 0.0
if carrier == "storage":
    from models.package_store import publish
    start = time.perf_counter()
    uri = publish(package, storage)
    published = time.perf_counter() - start

@ray.remote(num_cpus=0, scheduling_strategy=here)
def load(name, uri=None):
    import time
    start = time.perf_counter()
    if uri:
        from models.package_store import fetch
        path = fetch(uri)
    else:
        from serving.package_source import shipped
        path = shipped(name)
    from models.package import verify_model_dir
    verify_model_dir(path)
    return str(path), time.perf_counter() - start

start = time.perf_counter()
name = os.path.basename(package)
path, inside = ray.get(load.remote(name, uri if carrier == "storage" else None))
first = time.perf_counter() - start
start = time.perf_counter()
_, again = ray.get(load.remote(name, uri if carrier == "storage" else None))
second = time.perf_counter() - start
print("RESULT " + json.dumps({{"carrier": carrier, "join_s": joined, "publish_s": published, "first_use_s": first,
                               "second_use_s": second, "path": path}}))
'''


def measure(carrier: str, package: Path, root: Path) -> dict:
    from tests.services import LocalRayCluster, MotoS3

    hidden = root / "hidden"
    hidden.mkdir(parents=True, exist_ok=True)
    copy = hidden / package.name
    shutil.copytree(package, copy)
    s3 = MotoS3(root).start()
    cluster = LocalRayCluster(root, cpus=1, gpus=0, workers=0, env={**s3.env, "PNEUMONIA_CACHE": str(hidden / "cache")})
    try:
        cluster.start()
        cluster.start_worker("worker0", hidden=[hidden])
        cluster.wait_for_nodes(2)
        code = DRIVER.format(repo=str(REPO), carrier=carrier, package=str(copy), address=cluster.address,
                             storage=s3.uri("results"))
        ran = subprocess.run([sys.executable, "-c", code], env=cluster.env, capture_output=True, text=True,
                             timeout=600, check=False)
        lines = [line for line in ran.stdout.splitlines() if line.startswith("RESULT ")]
        if not lines:
            raise RuntimeError(ran.stdout[-2000:] + ran.stderr[-3000:])
        return json.loads(lines[-1][len("RESULT "):])
    finally:
        cluster.stop()
        s3.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    package = Path(args.package).resolve()
    size = sum(f.stat().st_size for f in package.iterdir()) / 2**20
    results = {"package": package.name, "mib": size, "runs": []}
    for repeat in range(args.repeats):
        for carrier in ("runtime_env", "storage"):
            with tempfile.TemporaryDirectory(prefix="carrier-", dir="/tmp") as tmp:
                row = measure(carrier, package, Path(tmp))
            results["runs"].append(row)
            print(f"{carrier} (run {repeat + 1}): join {row['join_s']:.2f} s, publish {row['publish_s']:.2f} s, first "
                  f"use on the worker node {row['first_use_s']:.2f} s, second {row['second_use_s']:.2f} s", flush=True)
    for carrier in ("runtime_env", "storage"):
        rows = [r for r in results["runs"] if r["carrier"] == carrier]
        total = [r["join_s"] + r["publish_s"] + r["first_use_s"] for r in rows]
        print(f"{carrier}: median {statistics.median(total):.2f} s from the driver's start to a verified package on "
              f"the worker node ({size:.1f} MiB)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    main()
