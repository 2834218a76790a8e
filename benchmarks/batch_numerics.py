"""How far one image's served numbers move with the batch it shares, against how far a real preprocessing skew
moves them: the tolerances of the served == offline tests rest on these figures.

TensorFlow on a CPU does not promise the same float32 result for one image in batches of another size or
composition (oneDNN picks kernels by shape). For a package: validation films and the OOD check set, decoded and
preprocessed as the endpoint does, scored (calibrated P(PNEUMONIA), OOD score) by the replica's own call
(``serving.service.LoadedPackage.predict``) alone, in the evaluation's batches of 64, and in random batches of
other sizes and compositions. Beside that spread, what two real skews do to P: every pixel one grey level
brighter, and a resize without antialiasing. No test read: validation films and generated images only.

Usage: python -m benchmarks.batch_numerics --package artifacts/VERSION [--films 64] [--rounds 12] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

BATCH_SIZES = (2, 3, 8, 17, 32, 63)


def _inputs(package: str, films: int):
    """(names, encoded bytes, preprocessed arrays, contract) of up to ``films`` validation films, then the OOD
    check set."""
    from data.dataset import load_splits
    from data.preprocessing import decode_image, preprocess
    from evaluation.ood_set import ood_images
    from evaluation.report import films_to_transform
    from models.package import read_metadata

    metadata = read_metadata(package)
    data = metadata.config["data"]
    val = load_splits(data["path"], data["val_fraction"], data["seed"], validation=data["validation"]).val
    encoded = [(f"film {Path(p).name}", Path(p).read_bytes()) for p in val.paths[:films]]
    encoded += [(f"{i.kind}: {i.name}", i.png) for i in ood_images(films_to_transform(val))]
    contract = metadata.input
    arrays = [preprocess(decode_image(body), contract.image_size, contract.intensity).numpy() for _, body in encoded]
    return [name for name, _ in encoded], [body for _, body in encoded], arrays, contract


def _skewed(bodies: list[bytes], contract, skew: str) -> list[np.ndarray]:
    """The model input under a real preprocessing difference (what the served == offline checks must catch)."""
    import tensorflow as tf

    from data.preprocessing import decode_image, preprocess

    out = []
    for body in bodies:
        image = decode_image(body)
        if skew == "one grey level brighter":
            image = tf.clip_by_value(image + 1 / 255, 0.0, 1.0)
        else:  # bilinear without antialias to the model's size first; the shared resize is then the identity
            image = tf.image.resize(image, (contract.image_size, contract.image_size), antialias=False)
        out.append(preprocess(image, contract.image_size, contract.intensity).numpy())
    return out


def _score(loaded, arrays: list[np.ndarray], batches: list[np.ndarray]) -> np.ndarray:
    """(P, OOD score) per image, each image scored inside the batch of indices that holds it."""
    result = np.full((len(arrays), 2), np.nan)
    for batch in batches:
        for index, (p, s) in zip(batch, loaded.predict([arrays[i] for i in batch])):
            result[index] = (p, np.nan if s is None else s)
    return result


def measure(package: str, films: int, rounds: int, seed: int = 0) -> dict:
    from serving.service import LoadedPackage

    names, bodies, arrays, contract = _inputs(package, films)
    films = sum(name.startswith("film ") for name in names)
    loaded = LoadedPackage(package)
    n = len(arrays)
    alone = _score(loaded, arrays, [np.array([i]) for i in range(n)])
    layouts = {"evaluation's batches of 64": [np.arange(n)[i:i + 64] for i in range(0, n, 64)]}
    rng = np.random.default_rng(seed)
    for round_ in range(rounds):  # every image once per round, in batches of one size, shuffled with others
        size = BATCH_SIZES[round_ % len(BATCH_SIZES)]
        order = rng.permutation(n)
        layouts[f"random batches of {size} (round {round_})"] = [order[i:i + size] for i in range(0, n, size)]
    spread = {"probability_abs": 0.0, "ood_score_rel": 0.0, "ood_score_abs": 0.0}
    for batches in layouts.values():
        scored = _score(loaded, arrays, batches)
        spread["probability_abs"] = max(spread["probability_abs"], float(np.max(np.abs(scored[:, 0] - alone[:, 0]))))
        if not np.isnan(alone[:, 1]).all():
            delta = np.abs(scored[:, 1] - alone[:, 1])
            spread["ood_score_abs"] = max(spread["ood_score_abs"], float(np.max(delta)))
            spread["ood_score_rel"] = max(spread["ood_score_rel"], float(np.max(delta / np.abs(alone[:, 1]))))
    skews = {}
    for skew in ("one grey level brighter", "bilinear resize without antialias"):
        moved = _score(loaded, _skewed(bodies, contract, skew), [np.array([i]) for i in range(n)])
        delta = np.abs(moved[:films, 0] - alone[:films, 0])  # the chest films: what the skew checks are about
        relative = np.abs(moved[:films, 1] - alone[:films, 1]) / np.abs(alone[:films, 1])
        skews[skew] = {"median": float(np.median(delta)), "max": float(np.max(delta)), "min": float(np.min(delta)),
                       "ood_score_rel_median": float(np.median(relative)), "ood_score_rel_min": float(np.min(relative))}
    return {"package": package, "image_size": contract.image_size, "family": loaded.metadata.config["model"]["family"],
            "images": n, "films": films, "layouts": len(layouts), "batch_spread": spread, "skews": skews}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", action="append", required=True)
    parser.add_argument("--films", type=int, default=64, help="validation films (the OOD check set comes on top)")
    parser.add_argument("--rounds", type=int, default=12, help="random batch layouts")
    parser.add_argument("--json")
    args = parser.parse_args()
    from runtime.tensorflow_setup import configure_tensorflow

    configure_tensorflow(0, "float32")
    results = [measure(p, args.films, args.rounds) for p in args.package]
    print("| package | images x layouts | batches: max abs dP | batches: max rel d(OOD score) | +1 grey: median / min "
          "abs dP | +1 grey: median / min rel d(OOD) | no antialias: median / min abs dP | no antialias: median / min "
          "rel d(OOD) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        s, skews = r["batch_spread"], r["skews"]
        g, a = skews["one grey level brighter"], skews["bilinear resize without antialias"]
        print(f"| {r['family']} {r['image_size']} px | {r['images']} x {r['layouts']} | {s['probability_abs']:.2e} | "
              f"{s['ood_score_rel']:.2e} | {g['median']:.2e} / {g['min']:.2e} | {g['ood_score_rel_median']:.2e} / "
              f"{g['ood_score_rel_min']:.2e} | {a['median']:.2e} / {a['min']:.2e} | {a['ood_score_rel_median']:.2e} / "
              f"{a['ood_score_rel_min']:.2e} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
