"""How a search's cost grows with image size, epochs and trials, from two measurements.

1. Image size: training images/s of the CNN of ``train-cnn.yaml`` at several sizes, side by side in one
   process (float32, in-memory batches): the per-epoch cost of a trial is train images / that rate.
2. Epochs and trials: from a finished experiment's own results (``--experiment``), each trial's set-up
   seconds, its seconds per epoch, and how the trial's loop time grows with the epochs it ran (ASHA stops
   trials at different epochs, so one search gives several points).

Usage: python -m benchmarks.search_cost [--sizes 64,128,192] [--experiment ~/ray_results/full-cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from tuning.experiment import read_trial_results

REPO = Path(__file__).resolve().parents[1]


def size_rates(sizes: list[int], steps: int, batch_size: int) -> dict[int, float]:
    import dataclasses

    from models.config import TrainConfig
    from runtime.config import load_config
    from runtime.precision import compare_precisions
    from runtime.tensorflow_setup import configure_tensorflow

    configure_tensorflow(0, "float32")
    base = load_config(TrainConfig, REPO / "tuning" / "configs" / "train-cnn.yaml").model
    sized = {size: dataclasses.replace(base, image_size=size) for size in sizes}
    return {size: compare_precisions(model, ("float32",), batch_size, steps)["float32"] for size, model in sized.items()}


def trial_costs(experiment: Path) -> list[dict]:
    rows = []
    for results in read_trial_results(experiment).values():
        last = results[-1]
        config = last.get("config", {})
        epochs = len(results)
        rows.append({
            "trial": f"{config.get('model.family')}_{last.get('trial_id')}",
            "family": config.get("model.family"),
            "image_size": config.get(f"{config.get('model.family')}.image_size", config.get("model.image_size")),
            "epochs": epochs,
            "setup_s": results[0].get("setup_seconds"),
            "loop_s": last.get("loop_seconds"),
            "s_per_epoch": last.get("loop_seconds", 0.0) / epochs,
            "trial_s": last.get("time_total_s"),
        })
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,128,192")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--experiment", help="a finished tuning experiment dir")
    parser.add_argument("--json")
    args = parser.parse_args()

    output: dict = {}
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if sizes:
        rates = size_rates(sizes, args.steps, args.batch_size)
        output["cnn_images_per_sec"] = rates
        smallest = min(rates)
        print("| CNN image size | train images/s | cost per image vs the smallest |")
        print("|---|---|---|")
        for size, rate in rates.items():
            print(f"| {size} px | {rate:.1f} | {rates[smallest] / rate:.2f}x |")
    if args.experiment:
        rows = trial_costs(Path(args.experiment).expanduser())
        output["trials"] = rows
        print("\n| trial | family | px | epochs | set-up s | s/epoch | trial s |")
        print("|---|---|---|---|---|---|---|")
        for r in sorted(rows, key=lambda r: (r["family"] or "", r["image_size"] or 0, r["epochs"])):
            print(f"| {r['trial']} | {r['family']} | {r['image_size']} | {r['epochs']} | {r['setup_s'] or 0:.1f} | "
                  f"{r['s_per_epoch']:.1f} | {r['trial_s'] or 0:.0f} |")
        for family in sorted({r["family"] for r in rows if r["family"]}):
            mine = [r for r in rows if r["family"] == family]
            print(f"{family}: {len(mine)} trials, median set-up {statistics.median(r['setup_s'] or 0 for r in mine):.1f} s, "
                  f"median {statistics.median(r['s_per_epoch'] for r in mine):.1f} s/epoch, "
                  f"{sum(r['epochs'] for r in mine)} epochs in all")
    if args.json:
        Path(args.json).write_text(json.dumps(output, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
