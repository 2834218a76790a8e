"""TPE + ASHA (this project's default) vs random search + FIFO at an equal trial budget, in one run.

Both searches get the same space, the same number of trials, the same concurrency and the same data, one
after the other on one local in-process Ray. Reported per search: the best validation AUC reached, the
wall time, the epochs trained in all, and the wall time until some trial first reached each of a few fixed
validation AUCs (``--targets``); the JSON keeps each search's best-so-far curve.

Usage: python -m benchmarks.search_strategies --data ../shared/data/chest_xray [--trials 12] [--targets 0.85,0.9] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from models.package import METRIC
from tuning.experiment import read_trial_results

REPO = Path(__file__).resolve().parents[1]

STRATEGIES = {"tpe+asha": ["searcher=optuna", "scheduler=asha"], "random+fifo": ["searcher=random", "scheduler=fifo"]}


def summarize(trials: list[list[dict]], started: float, wall: float, targets: list[float]) -> dict:
    results = sorted((row for rows in trials for row in rows if METRIC in row), key=lambda row: row["timestamp"])
    curve, best = [], 0.0  # best validation AUC so far, against seconds since the search started
    for row in results:
        if row[METRIC] > best:
            best = row[METRIC]
            curve.append((round(row["timestamp"] - started, 1), best))
    return {
        "trials": len(trials),
        "best_val_auc": best,
        "epochs_trained": len(results),
        "wall_seconds": wall,
        "seconds_to": {str(t): next((s for s, auc in curve if auc >= t), None) for t in targets},
        "best_so_far": curve,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--config", default=str(REPO / "tuning" / "configs" / "quick.yaml"))
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--targets", default="0.85,0.9,0.95", help="validation AUCs for the time-to-target figures")
    parser.add_argument("--set", action="append", default=[], help="extra overrides for both searches")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args(argv)
    targets = [float(t) for t in args.targets.split(",")]

    import time

    import ray

    from models.config import load_config
    from tuning.config import TuneConfig
    from tuning.search import run_search

    ray.init(address="local", include_dashboard=False, log_to_driver=False)  # ours, not a recorded cluster
    figures = {}
    with tempfile.TemporaryDirectory() as storage:
        for name, strategy in STRATEGIES.items():
            overrides = [*strategy, f"name={name.replace('+', '-')}", f"num_samples={args.trials}",
                         f"storage_path={storage}", "points_to_evaluate=[]", "time_budget_s=0",
                         f"train.data.path={Path(args.data).resolve()}", *args.set]
            config = load_config(TuneConfig, args.config, overrides)
            started = time.time()
            best = run_search(config, log=lambda line: None)
            wall = time.time() - started
            trials = list(read_trial_results(best["experiment"]).values())
            figures[name] = summarize(trials, started, wall, targets)
            print(name, json.dumps({k: v for k, v in figures[name].items() if k != "best_so_far"}), flush=True)
    ray.shutdown()
    print("\n| search | trials | epochs trained | best val AUC | wall s | "
          + " | ".join(f"s to val AUC >= {t}" for t in targets) + " |")
    print("|---|---|---|---|---|" + "---|" * len(targets))
    for name, f in figures.items():
        reached = [f"{s:.0f}" if s is not None else "not reached" for s in f["seconds_to"].values()]
        print(f"| {name} | {f['trials']} | {f['epochs_trained']} | {f['best_val_auc']:.4f} | {f['wall_seconds']:.0f} | "
              + " | ".join(reached) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "figures": figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
