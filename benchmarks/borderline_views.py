"""Validation evidence for the borderline band's rule and for test-time averaging (the test split is never loaded).

For one model (a checkpoint or an evaluated package) and each set of views (the film itself, and small shifts
and zooms of its model input, P averaged over them): every validation film is scored from its own bytes and
from the six re-encodings of ``evaluation.stability``, through the served decode path; calibration (Platt) and
the threshold (plateau rule) are refitted on validation for that view set, as an evaluation would. Reported:

- stability per re-encoding (label flips, p99 |dP|) with one view and with each view set;
- the cost: images/s of the model call per view set, in the same run (a ratio to one view);
- the band's rule held out *within* validation: validation patients split in two halves (by patient, seeded), the
  band fitted on one half's moves and checked on the other's (firm share, flips among firm answers), both ways,
  for each candidate (coverage, margin).

Usage: python -m benchmarks.borderline_views --model DIR --data ../shared/data/chest_xray [--films N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

PAD = 16  # px of edge replication around a model input, so a shifted or zoomed-out view has no black border
VIEW_SETS = {
    "1 view": [(0, 0, 1.0)],
    "4 views (identity, 2 % zoom, +-4 px)": [(0, 0, 1.0), (0, 0, 1.02), (4, 4, 1.0), (-4, -4, 1.0)],
    "8 views (identity, +-2 % zoom, +-4 px in x and y, 2 diagonals)": [
        (0, 0, 1.0), (0, 0, 1.02), (0, 0, 0.98), (4, 0, 1.0), (-4, 0, 1.0), (0, 4, 1.0), (0, -4, 1.0), (4, 4, 1.0)],
}
RULES = [(coverage, margin) for coverage in (0.99, 1.0) for margin in (1.0, 1.5, 2.0)]


def view(batch: np.ndarray, dx: int, dy: int, zoom: float) -> np.ndarray:
    """``batch`` (N, H, W, 1) shifted by (dx, dy) px and zoomed by ``zoom`` about its centre, bilinear, edges
    replicated."""
    import tensorflow as tf

    if (dx, dy, zoom) == (0, 0, 1.0):
        return batch
    size = batch.shape[1]
    padded = np.pad(batch, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)), mode="edge")
    full = size + 2 * PAD
    half = size / zoom / 2
    centre_y, centre_x = PAD + size / 2 - dy, PAD + size / 2 - dx
    box = [(centre_y - half) / full, (centre_x - half) / full, (centre_y + half) / full, (centre_x + half) / full]
    boxes = np.tile(np.asarray(box, np.float32), (len(batch), 1))
    return tf.image.crop_and_resize(padded, boxes, np.arange(len(batch)), (size, size)).numpy()


def raw_views(predictor, contract, encoded: list[bytes], views: list[tuple], batch: int = 32) -> np.ndarray:
    """(films, views) raw P of each encoded film under each view, through the served decode path."""
    from data.film_checks import model_input
    from data.preprocessing import decode_image

    out = []
    for start in range(0, len(encoded), batch):
        inputs = np.stack([model_input(decode_image(data), contract.image_size, contract.intensity)
                           for data in encoded[start:start + batch]])
        columns = []
        for v in views:
            outputs = predictor.predict_on_batch(view(inputs, *v))
            columns.append(np.asarray(outputs[0] if isinstance(outputs, (list, tuple)) else outputs).reshape(-1))
        out.append(np.stack(columns, axis=1))
    return np.concatenate(out)


def fitted(labels, raw):
    """Platt calibration and the plateau threshold on validation, as ``pneumonia evaluate`` fits them."""
    from evaluation.evaluate import choose_threshold
    from models.calibration import fit_platt

    calibration = fit_platt(labels, raw)
    threshold, _, _ = choose_threshold(labels, calibration.apply(raw), None, "plateau")
    return calibration, threshold


def images_per_second(predictor, size: int, views: int, repeats: int = 5) -> float:
    batch = np.random.default_rng(0).random((32, size, size, 1), dtype=np.float32)
    predictor.predict_on_batch(batch)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(views):
            predictor.predict_on_batch(batch)
        times.append(time.perf_counter() - started)
    return 32 / float(np.median(times))


def patient_halves(split, seed: int = 0) -> np.ndarray:
    """A boolean mask: the films of a seeded half of validation's patients."""
    unique = np.unique(split.patients)
    chosen = set(np.random.default_rng(seed).permutation(unique)[: len(unique) // 2])
    return np.array([p in chosen for p in split.patients])


def main() -> None:
    from evaluation.borderline import fit_band
    from evaluation.evaluate import load_evaluation_data, served_model
    from evaluation.stability import PERTURBATIONS, FilmMoves, _encoded_films, perturbed, summarize
    from models.config import TrainConfig
    from models.package import load_model_dir
    from runtime.config import from_dict
    from runtime.tensorflow_setup import configure_tensorflow

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--films", type=int, default=0, help="a stratified subset of validation (a smoke run; 0 = all)")
    parser.add_argument("--json")
    args = parser.parse_args()
    configure_tensorflow(0, "float32")
    model, metadata = load_model_dir(args.model)
    predictor = served_model(model)
    config = from_dict(TrainConfig, metadata.config)
    val = load_evaluation_data(config, args.data, metadata.data.get("fingerprint")).val  # the test split: never
    if args.films:
        from data.dataset import stratified_subset

        val = stratified_subset(val, args.films, seed=0)
    films = _encoded_films(val)
    variants = [perturbed(data) for data in films]
    distinct = sorted({v for views in VIEW_SETS.values() for v in views})
    started = time.perf_counter()
    raw = {"own bytes": raw_views(predictor, metadata.input, films, distinct)}
    for name in PERTURBATIONS:
        raw[name] = raw_views(predictor, metadata.input, [variant[name] for variant in variants], distinct)
    print(f"scored {len(films)} validation films x {len(raw)} encodings x {len(distinct)} views in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    half = patient_halves(val)
    speed_one = images_per_second(predictor, metadata.image_size, 1)
    results = {"model": args.model, "films": len(films), "view_sets": {}}
    for set_name, views in VIEW_SETS.items():
        columns = [distinct.index(v) for v in views]
        mean = {name: values[:, columns].mean(axis=1) for name, values in raw.items()}
        calibration, threshold = fitted(val.labels, mean["own bytes"])
        calibrated = {name: calibration.apply(values) for name, values in mean.items()}
        moves = FilmMoves("val", calibrated["own bytes"], {k: v for k, v in calibrated.items() if k != "own bytes"})
        from sklearn.metrics import roc_auc_score

        row = {"views": len(views), "auc": float(roc_auc_score(val.labels, calibrated["own bytes"])),
               "threshold": threshold, "slope": calibration.slope,
               "stability": summarize(moves, threshold, log=lambda line: None)["perturbations"],
               "images_per_second": speed_one if len(views) == 1 else images_per_second(
                   predictor, metadata.image_size, len(views)),
               "rules": {}}
        for coverage, margin in RULES:
            checks = []
            for fit_mask in (half, ~half):
                part = FilmMoves("val", moves.base[fit_mask], {k: v[fit_mask] for k, v in moves.moved.items()})
                other = FilmMoves("val", moves.base[~fit_mask], {k: v[~fit_mask] for k, v in moves.moved.items()})
                band = fit_band(part, threshold, coverage, margin)
                held = summarize(other, threshold, band, log=lambda line: None)
                checks.append({"half_width": band.half_width, "band": [band.low, band.high],
                               "held_out_firm_share": held["firm_share"],
                               "held_out_firm_flips": sum(r["firm_flips"] for r in held["perturbations"].values())})
            whole = fit_band(moves, threshold, coverage, margin)
            own = summarize(moves, threshold, whole, log=lambda line: None)
            row["rules"][f"coverage {coverage}, margin {margin}"] = {
                "half_width": whole.half_width, "band": [whole.low, whole.high], "firm_share": own["firm_share"],
                "held_out": checks}
        results["view_sets"][set_name] = row
        flips = ", ".join(f"{k} {v['flips']}/{v['p99']:.3f}" for k, v in row["stability"].items())
        print(f"{set_name}: AUC {row['auc']:.4f}, threshold {threshold:.3f}, {row['images_per_second']:.0f} films/s "
              f"(x{row['images_per_second'] / speed_one:.2f}); flips/p99: {flips}", flush=True)
        for rule, measured in row["rules"].items():
            held = measured["held_out"]
            print(f"    {rule}: half-width {measured['half_width']:.3f}, band {measured['band'][0]:.3f}-"
                  f"{measured['band'][1]:.3f}, firm {measured['firm_share']:.1%}; held-out halves: firm "
                  + " / ".join(f"{h['held_out_firm_share']:.1%}" for h in held) + ", firm flips "
                  + " / ".join(str(h["held_out_firm_flips"]) for h in held), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
