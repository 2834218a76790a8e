"""Which out-of-distribution score, measured before choosing (validation and the OOD check set; no test read).

For each model directory given: its embeddings and probabilities on a stratified subset of the training
films (to fit), the validation films (the threshold: their 99.5th percentile) and the OOD check set
(``evaluation.ood_set``: photos, documents, other imaging, synthetic images, transformed chest films). Per score
(``models.ood.METHODS``): AUROC of each OOD kind against the validation films, the share refused at the
threshold, and the validation refusal rate. Also the serving cost of the gate: the score's own time per image
next to the model call's.

Usage: python -m benchmarks.ood_scores --model runs/lite0 [--model runs/cnn ...] [--data DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def measure(model_dir: str, data: str | None, quantile: float, train_images: int) -> dict:
    from sklearn.metrics import roc_auc_score

    from data.dataset import stratified_subset
    from evaluation.evaluate import load_evaluation_data, predict_with_embedding
    from evaluation.ood_set import ood_images
    from evaluation.report import films_to_transform
    from models.config import TrainConfig
    from models.ood import METHODS, fit_gate, with_embedding
    from models.package import load_model_dir
    from runtime.config import from_dict

    model, metadata = load_model_dir(model_dir)
    served = with_embedding(model)
    config = from_dict(TrainConfig, metadata.config)
    splits = load_evaluation_data(config, data, metadata.data.get("fingerprint"))
    train = stratified_subset(splits.train, train_images, seed=0)
    train_p, train_e = predict_with_embedding(served, train, metadata.input)
    started = time.perf_counter()
    val_p, val_e = predict_with_embedding(served, splits.val, metadata.input)
    model_seconds = (time.perf_counter() - started) / len(splits.val)
    images = ood_images(films_to_transform(splits.val))
    from data.preprocessing import decode_image, preprocess

    batch = np.stack([preprocess(decode_image(i.png), metadata.image_size, metadata.input.intensity).numpy()
                      for i in images])
    ood_p, ood_e = (np.asarray(o) for o in served.predict_on_batch(batch))
    kinds = list(dict.fromkeys(i.kind for i in images))
    results = {"model": model_dir, "family": config.model.family, "image_size": metadata.image_size,
               "embedding": int(val_e.shape[1]), "model_ms_per_image": 1000 * model_seconds, "scores": {}}
    for method in METHODS:
        scorer, gate = fit_gate(method, (train_e, train_p, train.labels), (val_e, val_p), quantile, "benchmark")
        val = scorer.score(val_e, val_p)
        started = time.perf_counter()
        outside = scorer.score(ood_e, ood_p.reshape(-1))
        score_ms = 1000 * (time.perf_counter() - started) / len(images)
        per_kind = {}
        for kind in kinds:
            member = np.asarray([i.kind == kind for i in images])
            labels = np.r_[np.zeros(len(val)), np.ones(member.sum())]
            per_kind[kind] = {"auroc": float(roc_auc_score(labels, np.r_[val, outside[member]])),
                              "refused": float(np.mean(outside[member] > gate.threshold))}
        results["scores"][method] = {"validation_refusal": gate.validation_refusal_rate, "kinds": per_kind,
                                     "score_ms_per_image": score_ms,
                                     "mean_auroc": float(np.mean([k["auroc"] for k in per_kind.values()]))}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="a model directory or package")
    parser.add_argument("--data", help="default: the model's data.path")
    parser.add_argument("--quantile", type=float, default=0.995)
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--json")
    args = parser.parse_args()
    from runtime.tensorflow_setup import configure_tensorflow

    configure_tensorflow(0, "float32")
    everything = [measure(m, args.data, args.quantile, args.train_images) for m in args.model]
    for result in everything:
        print(f"\n{result['model']} ({result['family']}, {result['image_size']} px, embedding {result['embedding']}; "
              f"model {result['model_ms_per_image']:.1f} ms/image)")
        kinds = list(next(iter(result["scores"].values()))["kinds"])
        print("| score | validation refused | " + " | ".join(kinds) + " | mean AUROC | score ms/image |")
        print("|---|---|" + "---|" * len(kinds) + "---|---|")
        for method, row in result["scores"].items():
            cells = [f"{v['auroc']:.3f} / {100 * v['refused']:.0f} %" for v in row["kinds"].values()]
            print(f"| {method} | {100 * row['validation_refusal']:.1f} % | " + " | ".join(cells)
                  + f" | {row['mean_auroc']:.3f} | {row['score_ms_per_image']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=2))


if __name__ == "__main__":
    main()
