"""Tune's overhead per trial, and trials/hour on 1 vs 2 local nodes, measured in one run.

The same fixed search (a small CNN config, FIFO, no early stopping) runs twice on clusters started by
``cluster/local-cluster.sh``: one node with 1 CPU, then two nodes with 1 CPU each. Per trial, the driver's
wall time (trial start to completion) is split into the training loop (``loop_seconds``, reported by the
trial), the trial's own set-up (``setup_seconds``: TF start, data listing, model build) and the rest, which
is Tune's: actor launch, result and checkpoint handling.

Usage: python -m benchmarks.tune_scaling --data ../shared/data/chest_xray [--trials 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from benchmarks.local_cluster import search_on_local_cluster
from tuning.experiment import read_trial_results


def search_args(data: str, trials: int, storage: Path, name: str) -> list[str]:
    sets = [
        f"name={name}", "unique_name=false", f"storage_path={storage}", "shared_storage=true", f"num_samples={trials}",
        "max_concurrent=4", "scheduler=fifo", "cpus_per_trial=1", "train.epochs=2", "points_to_evaluate=[]",
        "space.families=[cnn]", "space.cnn.image_sizes=[64]", "space.cnn.depth=[3,3]", "space.cnn.base_filters=[16]",
        "space.batch_sizes=[32]", "train.data.max_train_images=1024", "train.data.max_val_images=256",
        "train.mixed_precision=float32",
    ]
    return ["--data", data, *[a for s in sets for a in ("--set", s)]]


def run_on_cluster(nodes: int, data: str, trials: int, workdir: Path) -> dict:
    _, wall = search_on_local_cluster(nodes, 1, 0, search_args(data, trials, workdir, f"nodes{nodes}"),
                                      Path(f"/tmp/pb-{os.getpid()}-{nodes}"), port=6400 + nodes,
                                      dashboard_port=8300 + nodes)
    per_trial = []
    for rows in read_trial_results(workdir / f"nodes{nodes}").values():
        last = rows[-1]
        # Tune's own wall clock of the trial, from its first to its last result, plus the time to its first
        # result; time_total_s is measured by Tune inside the trial actor from the function's start.
        per_trial.append({"time_total_s": last["time_total_s"], "loop_seconds": last["loop_seconds"],
                          "setup_seconds": last["setup_seconds"]})
    n = len(per_trial)
    mean = {k: sum(t[k] for t in per_trial) / n for k in per_trial[0]}
    return {"nodes": nodes, "trials": n, "wall_seconds": wall, "trials_per_hour": 3600 * n / wall,
            "mean_per_trial": mean,
            "driver_wall_per_trial_slot": wall * min(nodes, n) / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--json")
    args = parser.parse_args()
    data = str(Path(args.data).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        one = run_on_cluster(1, data, args.trials, Path(tmp))
        two = run_on_cluster(2, data, args.trials, Path(tmp))
    for r in (one, two):
        m = r["mean_per_trial"]
        slot = r["driver_wall_per_trial_slot"]
        print(f"{r['nodes']} node(s): {r['trials']} trials in {r['wall_seconds']:.0f} s = {r['trials_per_hour']:.0f} "
              f"trials/h; per trial: wall per slot {slot:.1f} s, in-trial {m['time_total_s']:.1f} s "
              f"(set-up {m['setup_seconds']:.1f} s, training loop {m['loop_seconds']:.1f} s), "
              f"outside the training loop {slot - m['loop_seconds']:.1f} s, of which Tune "
              f"{slot - m['time_total_s']:.1f} s")
    print(f"trials/hour, 2 nodes / 1 node: {two['trials_per_hour'] / one['trials_per_hour']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"one_node": one, "two_nodes": two}, indent=2))


if __name__ == "__main__":
    main()
