"""A search driven on a local multi-node Ray from a benchmark: ``cluster/local-cluster.sh`` starts the nodes,
``python -m tuning.search --address`` runs on them, and the nodes are stopped whatever happens."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "cluster" / "local-cluster.sh"


def search_on_local_cluster(nodes: int, node_cpus: int, node_gpus: int, search_args: list[str], cluster_dir: Path,
                            port: int, dashboard_port: int) -> tuple[str, float]:
    """The search's console output and wall seconds on a head plus ``nodes - 1`` workers of ``node_cpus`` CPUs
    and ``node_gpus`` logical GPUs each; a failed search raises with the end of its output."""
    env = {**os.environ, "PNEUMONIA_CLUSTER_DIR": str(cluster_dir), "RAY_PORT": str(port),
           "RAY_DASHBOARD_PORT": str(dashboard_port), "RAY_AUTH_MODE": "token",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run(["bash", str(RECIPE), "start", str(nodes - 1), str(node_cpus), str(node_gpus)], env=env,
                   check=True, timeout=600)
    try:
        started = time.perf_counter()
        driver = subprocess.run([sys.executable, "-m", "tuning.search", "--address", f"127.0.0.1:{port}",
                                 *search_args], cwd=REPO, env=env, capture_output=True, text=True, timeout=3600,
                                check=False)
        wall = time.perf_counter() - started
    finally:
        subprocess.run(["bash", str(RECIPE), "stop"], env=env, timeout=300, check=False)
    if driver.returncode != 0:
        raise RuntimeError(driver.stdout[-3000:] + driver.stderr[-3000:])
    return driver.stdout, wall
