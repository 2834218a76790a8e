"""Validation evidence for a seed ensemble (the test split is never loaded): 1, 3 and 5 members side by side.

For each size N, the ensemble ``pneumonia evaluate --experiment EXP --ensemble N`` would build (the N best members
by validation AUC, averaged in one Keras model) is scored on every validation film from its own bytes and from
the six re-encodings of ``evaluation.stability``, through the served decode path and runtime. Calibration
(Platt) is fitted on validation as the evaluation fits it; then:

- validation AUC, and stability per re-encoding (label flips, p99 |dP|) at the plateau threshold;
- the operating point under each rule: the plateau rule, and the highest threshold keeping validation
  sensitivity >= S for a few S (sensitivity and specificity on validation at each);
- the borderline band of ``evaluation.borderline`` and the share of validation films it leaves firm;
- the cost: films/s of the model call (N members are N network passes), in the same run.

Usage: python -m benchmarks.seed_ensemble --experiment ~/ray_results/seed-ensemble --data DIR [--sizes 1,3,5]
       [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np

TARGETS = (0.95, 0.97, 0.98, 0.99)


def operating_points(labels: np.ndarray, calibrated: np.ndarray) -> dict:
    from evaluation.evaluate import choose_threshold
    from evaluation.metrics import binary_report

    points = {}
    for name, target in [("plateau", None), *((f"sensitivity >= {t}", t) for t in TARGETS)]:
        threshold, _, _ = choose_threshold(labels, calibrated, target, "plateau")
        report = binary_report(labels, calibrated, threshold)
        points[name] = {"threshold": threshold, "sensitivity": report["sensitivity"],
                        "specificity": report["specificity"], "accuracy": report["accuracy"]}
    return points


def main() -> None:
    from benchmarks.borderline_views import images_per_second, raw_views
    from evaluation.borderline import fit_band
    from evaluation.evaluate import load_evaluation_data, served_model
    from evaluation.stability import PERTURBATIONS, FilmMoves, _encoded_films, perturbed, summarize
    from models.calibration import fit_platt
    from models.config import TrainConfig
    from models.package import load_model_dir
    from runtime.config import from_dict
    from runtime.tensorflow_setup import configure_tensorflow
    from tuning.ensemble import build_ensemble, top_members

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--sizes", default="1,3,5")
    parser.add_argument("--json")
    args = parser.parse_args()
    configure_tensorflow(0, "float32")
    sizes = [int(size) for size in args.sizes.split(",")]
    ranked = top_members(args.experiment, max(sizes))
    print("members by validation AUC: " + ", ".join(f"{m.trial_id} {m.val_auc:.4f}" for m in ranked), flush=True)
    results = {"experiment": args.experiment, "members": [m.__dict__ for m in ranked], "sizes": {}}
    val = films = variants = None
    for size in sizes:
        with tempfile.TemporaryDirectory() as directory:
            model, metadata = load_model_dir(build_ensemble(ranked[:size], directory))
        predictor = served_model(model)
        if val is None:
            config = from_dict(TrainConfig, metadata.config)
            val = load_evaluation_data(config, args.data, metadata.data.get("fingerprint")).val
            films = _encoded_films(val)
            variants = [perturbed(data) for data in films]
        started = time.perf_counter()
        one = [(0, 0, 1.0)]
        raw = {"own": raw_views(predictor, metadata.input, films, one)[:, 0]}
        for name in PERTURBATIONS:
            raw[name] = raw_views(predictor, metadata.input, [v[name] for v in variants], one)[:, 0]
        scored_s = time.perf_counter() - started
        calibration = fit_platt(val.labels, raw["own"])
        calibrated = {name: calibration.apply(values) for name, values in raw.items()}
        from sklearn.metrics import roc_auc_score

        points = operating_points(val.labels, calibrated["own"])
        threshold = points["plateau"]["threshold"]
        moves = FilmMoves("val", calibrated["own"], {k: v for k, v in calibrated.items() if k != "own"})
        band = fit_band(moves, threshold)
        stability = summarize(moves, threshold, band, log=lambda line: None)
        row = {"auc": float(roc_auc_score(val.labels, calibrated["own"])), "calibration_slope": calibration.slope,
               "operating_points": points, "stability": stability,
               "band": {"low": band.low, "high": band.high, "half_width": band.half_width},
               "films_per_second": images_per_second(predictor, metadata.image_size, 1), "scored_seconds": scored_s}
        results["sizes"][size] = row
        flips = ", ".join(f"{k} {v['flips']}/{v['p99']:.3f}" for k, v in stability["perturbations"].items())
        print(f"{size} member(s): val AUC {row['auc']:.4f}, {row['films_per_second']:.1f} films/s; plateau "
              f"threshold {threshold:.3f}; flips/p99 at it: {flips}; band {band.low:.3f}-{band.high:.3f}, firm "
              f"{stability['firm_share']:.1%}", flush=True)
        for name, point in points.items():
            print(f"    {name}: threshold {point['threshold']:.4f}, sensitivity {point['sensitivity']:.4f}, "
                  f"specificity {point['specificity']:.4f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)


if __name__ == "__main__":
    main()
