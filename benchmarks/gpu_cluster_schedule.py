"""`gpu-cluster.yaml` on 1, 4 and 8 GPUs: what Tune runs at once, and the search's cost on paper.

1. Schedule: for each cluster shape, a local cluster of ``cluster/local-cluster.sh`` with logical GPUs (nodes
   shaped like ``cluster/aws-gpu.yaml``'s g5.xlarge workers: 4 CPUs, 1 GPU) runs the search of
   ``gpu-cluster.yaml`` with its own resources per trial (CPUs, fractional GPU) and ``max_concurrent``, on
   trials made cheap (a small CNN at 64 px on a few hundred films, 2 epochs) so that only scheduling is
   measured. The figure is the most trials Tune reported running at once (its progress lines), against what
   the config's arithmetic expects.
2. Input pipeline: images/s of the training tf.data pipeline (cold: decode + preprocess; warm: cached,
   augmented) at the space's largest sizes on 2 TF threads, the CPUs a trial gets: a GPU trial cannot train
   faster than its 2 CPUs feed it.
3. On paper: ASHA's expected epochs for the config's trials and rungs, each epoch at the slower of the GPU's
   share (the GPU rates measured on an H100, BENCHMARKS.md, passed in) and the pipeline, plus set-up; the
   expected wall time and trials/hour at the measured concurrency.

Usage: python -m benchmarks.gpu_cluster_schedule --data ../shared/data/chest_xray [--gpus 1,4,8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import tempfile
from pathlib import Path

from benchmarks.local_cluster import search_on_local_cluster
from benchmarks.train_throughput import pipeline_images_per_sec

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "tuning" / "configs" / "gpu-cluster.yaml"
NODE_CPUS, NODE_GPUS = 4, 1  # one g5.xlarge worker of cluster/aws-gpu.yaml
# Whole-GPU training images/s on one H100, float16 (BENCHMARKS.md "GPU: training images/s"): the space's
# largest sizes, so the paper figures are upper bounds on time.
GPU_RATES = {"cnn": (224, 3600.0), "inception": (299, 1707.0)}


def expected_concurrency(config, nodes: int) -> int:
    per_node = int(min(NODE_CPUS // config.cpus_per_trial, math.floor(NODE_GPUS / config.gpus_per_trial)))
    return min(config.max_concurrent, per_node * nodes)


def schedule(nodes: int, trials: int, data: str, workdir: Path) -> dict:
    """Run the cheap search on ``nodes`` local nodes; the most trials Tune had running at once."""
    sets = [f"name=gpu{nodes}", "unique_name=false", f"storage_path={workdir}", "shared_storage=true",
            f"num_samples={trials}", "grace_period=1", "train.epochs=2", "checkpoint_every=1",
            "space.families=[cnn]", "space.cnn.image_sizes=[64]", "space.cnn.depth=[3,3]",
            "space.cnn.base_filters=[16]", "space.batch_sizes=[32]", "train.data.max_train_images=256",
            "train.data.max_val_images=128", "train.mixed_precision=float32", "train.model.weights=none"]
    output, _ = search_on_local_cluster(nodes, NODE_CPUS, NODE_GPUS,
                                        ["--config", str(CONFIG), "--data", data, *[a for s in sets for a in ("--set", s)]],
                                        workdir / f"cluster{nodes}", port=6500 + nodes, dashboard_port=8400 + nodes)
    running = [int(n) for n in re.findall(r"(\d+) running", output)]
    resources = re.search(r"Ray: (\d+) node\(s\), (\S+) CPUs, (\S+) GPUs", output)
    return {"nodes": nodes, "cpus": float(resources[2]), "gpus": float(resources[3]), "trials": trials,
            "max_running": max(running)}


def asha_epochs(trials: int, grace: int, factor: int, max_t: int) -> float:
    """Expected epochs of a search under ASHA: a 1/factor share of the trials passes each rung."""
    rungs, rung = [], grace
    while rung < max_t:
        rungs.append(rung)
        rung *= factor
    rungs.append(max_t)
    epochs, previous = 0.0, 0
    for k, rung in enumerate(rungs):
        epochs += trials / factor**k * (rung - previous)
        previous = rung
    return epochs


def on_paper(config, pipeline: dict, setup_s: float, concurrency: int, train_images: int, val_images: int) -> dict:
    """Expected wall time of the search at ``concurrency``, families in equal shares, at the largest sizes."""
    epochs = asha_epochs(config.num_samples, config.grace_period, config.reduction_factor, config.train.epochs)
    per_family = {}
    for family, (size, rate) in GPU_RATES.items():
        share = rate * config.gpus_per_trial  # trials sharing a card share its rate
        warm = min(share, pipeline[size]["warm"])
        per_family[family] = {"size": size, "gpu_share_img_s": share, "pipeline_warm_img_s": pipeline[size]["warm"],
                              "img_s": warm, "bound": "GPU" if share <= pipeline[size]["warm"] else "CPU input pipeline",
                              "epoch_s": (train_images + val_images) / warm}
    epoch_s = sum(f["epoch_s"] for f in per_family.values()) / len(per_family)
    trial_seconds = config.num_samples * setup_s + epochs * epoch_s
    wall = trial_seconds / concurrency
    return {"asha_epochs": epochs, "mean_epoch_s": epoch_s, "families": per_family, "concurrency": concurrency,
            "wall_s": wall, "trials_per_hour": 3600 * config.num_samples / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--gpus", default="1,4,8", help="cluster sizes in GPUs (one g5.xlarge-like node per GPU)")
    parser.add_argument("--setup-seconds", type=float, default=30.0,
                        help="a trial's start before its first epoch on a GPU node (TF and CUDA start, model build)")
    parser.add_argument("--json")
    args = parser.parse_args()
    data = str(Path(args.data).resolve())

    from data.dataset import load_splits
    from runtime.config import load_config
    from runtime.tensorflow_setup import configure_tensorflow
    from tuning.config import TuneConfig

    config = load_config(TuneConfig, CONFIG)
    shapes = [int(g) for g in args.gpus.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        runs = [schedule(n, expected_concurrency(config, n) + 2, data, Path(tmp)) for n in shapes]
    for run in runs:
        run["expected"] = expected_concurrency(config, run["nodes"])
        print(f"{run['gpus']:g} GPUs ({run['nodes']} nodes, {run['cpus']:g} CPUs): Tune ran {run['max_running']} "
              f"trials at once, the config's arithmetic says {run['expected']}", flush=True)

    configure_tensorflow(2, "float32")
    splits = load_splits(data)
    pipeline = {size: pipeline_images_per_sec(splits.train, size, 32, augment=1.0) for size, _ in GPU_RATES.values()}
    for size, rates in pipeline.items():
        print(f"pipeline {size}px, 2 TF threads: cold {rates['cold']:.0f} img/s, warm {rates['warm']:.0f} img/s")
    paper = [on_paper(config, pipeline, args.setup_seconds, run["max_running"], len(splits.train), len(splits.val))
             for run in runs]
    for run, row in zip(runs, paper):
        print(f"{run['gpus']:g} GPUs: {row['concurrency']} at once, {row['asha_epochs']:.0f} epochs of "
              f"{row['mean_epoch_s']:.1f} s, wall {row['wall_s'] / 60:.0f} min, {row['trials_per_hour']:.0f} trials/h")
    if args.json:
        Path(args.json).write_text(json.dumps({"schedule": runs, "pipeline": pipeline, "paper": paper,
                                               "setup_seconds": args.setup_seconds}, indent=2))


if __name__ == "__main__":
    main()
