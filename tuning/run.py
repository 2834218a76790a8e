"""The tuning job: Ray Tune + Optuna (TPE) + ASHA over both model families.

What ``ray job submit`` and ``ray submit`` run; ``pneumonia tune`` is the same:

    python -m tuning.run --config tuning/configs/quick.yaml [--set key=value ...] [--address ADDR] [--resume]

Joins the cluster at ``--address`` / ``$RAY_ADDRESS``, else starts a local Ray in-process. At the end it
writes ``best.json`` (trial, family, config, validation metrics, checkpoint) into the experiment dir.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from models.config import ConfigError, load_config, to_dict
from models.download import default_cache_dir
from tuning.config import TuneConfig

METRIC, MODE = "val_auc", "max"


class StorageError(ValueError):
    """A storage path the cluster's nodes cannot all reach."""


def is_remote(storage_path: str) -> bool:
    return "://" in storage_path


def local_storage(storage_path: str) -> str:
    return storage_path if is_remote(storage_path) else str(Path(storage_path).expanduser().resolve())


def check_storage(config: TuneConfig, alive_nodes: int) -> None:
    """Refuse a node-local storage path on a multi-node cluster before any trial starts."""
    if alive_nodes > 1 and not is_remote(config.storage_path) and not config.shared_storage:
        raise StorageError(
            f"storage_path {config.storage_path!r} is a local path, but this cluster has {alive_nodes} nodes: "
            "checkpoints reported by trials on worker nodes would be written where the head (and a restarted "
            "trial on another node) cannot read them. Use s3://BUCKET/PATH or gs://BUCKET/PATH, or an NFS "
            "path mounted on every node together with shared_storage=true."
        )


def join_uri(base: str, *parts: str) -> str:
    """Append path parts to a local path or URI, before any ``?query`` (s3://b/x?endpoint_override=...)."""
    path, sep, query = base.partition("?")
    return "/".join([path.rstrip("/"), *parts]) + sep + query


def experiment_path(config: TuneConfig) -> str:
    return join_uri(local_storage(config.storage_path), config.name)


def study_storage_url(config: TuneConfig) -> str:
    """Optuna's RDB URL: the configured one, else sqlite beside a local experiment (or in the cache)."""
    if config.study_storage:
        return config.study_storage
    if is_remote(config.storage_path):
        base = default_cache_dir()
    else:
        base = Path(local_storage(config.storage_path))
    base.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{base / (config.name + '-optuna.db')}"


def print_line(line: str) -> None:
    print(line, flush=True)


class CompactProgress:
    """One line per reported result instead of Tune's redrawn tables."""

    @staticmethod
    def make(log: Callable[[str], None]):
        """``log`` must pickle by reference (a module-level function): Tune pickles its callbacks with the
        experiment state, and a Ray job's patched ``print`` does not pickle."""
        from ray import tune

        class _Progress(tune.Callback):
            def on_trial_result(self, iteration, trials, trial, result, **info):
                config = trial.config
                log(
                    f"[{time.strftime('%H:%M:%S')}] {trial.trial_id} {config.get('model.family', '?'):<9} "
                    f"epoch {result.get('epoch', result.get('training_iteration'))}  "
                    f"val_auc {result.get('val_auc', float('nan')):.4f}  "
                    f"val_acc {result.get('val_accuracy', float('nan')):.4f}  "
                    f"loss {result.get('loss', float('nan')):.4f}  "
                    f"{result.get('images_per_sec', 0):.0f} img/s"
                )

            def on_trial_complete(self, iteration, trials, trial, **info):
                log(f"[{time.strftime('%H:%M:%S')}] {trial.trial_id} finished "
                    f"(best val_auc {trial.metric_analysis.get(METRIC, {}).get('max', float('nan')):.4f})")

            def on_trial_recover(self, iteration, trials, trial, **info):
                log(f"[{time.strftime('%H:%M:%S')}] {trial.trial_id} lost its worker or failed; retrying from its "
                    "last checkpoint")

            def on_trial_error(self, iteration, trials, trial, **info):
                log(f"[{time.strftime('%H:%M:%S')}] {trial.trial_id} failed for good (max_failures reached); "
                    f"see {trial.path}/error.txt")

        return _Progress()


def make_search(config: TuneConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter

    from tuning.search_space import DefineByRun, random_space

    if config.scheduler == "asha":
        scheduler = ASHAScheduler(metric=METRIC, mode=MODE, time_attr="training_iteration", max_t=config.train.epochs,
                                  grace_period=config.grace_period, reduction_factor=config.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    if config.searcher == "random":
        from ray.tune.search import BasicVariantGenerator

        return (BasicVariantGenerator(max_concurrent=config.max_concurrent, random_state=config.seed),
                scheduler, random_space(config.space))
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch(
        space=DefineByRun(config.space),
        # Optuna records a trial's last reported value: the best-so-far AUC makes that its best epoch's.
        metric="best_val_auc",
        mode=MODE,
        sampler=optuna.samplers.TPESampler(seed=config.seed),
        study_name=config.name,
        storage=optuna.storages.RDBStorage(study_storage_url(config)),
        points_to_evaluate=config.points_to_evaluate or None,
    )
    return ConcurrencyLimiter(searcher, max_concurrent=config.max_concurrent), scheduler, {}


def make_trainable(config: TuneConfig):
    from ray import tune

    from tuning.trainable import train_trial

    trainable = tune.with_parameters(train_trial, base=to_dict(config.train), checkpoint_every=config.checkpoint_every)
    resources = {"cpu": config.cpus_per_trial}
    if config.gpus_per_trial:
        resources["gpu"] = config.gpus_per_trial
    return tune.with_resources(trainable, resources)


def run_config(config: TuneConfig):
    from ray import tune

    return tune.RunConfig(
        name=config.name,
        storage_path=local_storage(config.storage_path),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=config.num_to_keep, checkpoint_score_attribute=METRIC,
                                                checkpoint_score_order=MODE),
        failure_config=tune.FailureConfig(max_failures=config.max_failures),
        callbacks=[CompactProgress.make(print_line)],
        verbose=0,
    )


def write_best(results, config: TuneConfig, log: Callable[[str], None]) -> dict:
    """best.json: the trial with the highest validation AUC and its best checkpoint, downloaded if remote."""
    from models.package import read_metadata

    if not any(METRIC in (result.metrics or {}) for result in results):
        first_error = next((str(e).strip().splitlines()[-1] for e in results.errors), "no error recorded")
        raise RuntimeError(f"no trial reported {METRIC}: {len(results.errors)} of {len(results)} trials failed "
                           f"(first error: {first_error}); each trial's error.txt under "
                           f"{experiment_path(config)} has the traceback")
    best = results.get_best_result(metric=METRIC, mode=MODE, scope="all")
    checkpoint = best.get_best_checkpoint(METRIC, MODE) or best.checkpoint
    if checkpoint is None:
        raise RuntimeError("no trial reported a checkpoint; nothing to evaluate")
    best_metrics = max(
        (row for row in best.metrics_dataframe.to_dict("records") if METRIC in row), key=lambda row: row[METRIC]
    )
    checkpoint_path = checkpoint.path
    if is_remote(config.storage_path):
        local = default_cache_dir() / "checkpoints" / config.name / Path(checkpoint.path).name
        checkpoint_path = checkpoint.to_directory(str(local))
    trial_id = Path(best.path).name
    summary = {
        "experiment": experiment_path(config),
        "trial_id": best.metrics.get("trial_id", trial_id),
        "family": best.config.get("model.family"),
        "params": best.config,
        "config": read_metadata(checkpoint_path)["config"],
        "metrics": {k: best_metrics[k] for k in best_metrics if k.startswith(("val_", "loss", "accuracy", "epoch"))},
        "checkpoint_path": str(checkpoint_path),
        "checkpoint_uri": checkpoint.path if is_remote(config.storage_path) else str(checkpoint_path),
        "trials": len(results),
        "errors": len(results.errors),
    }
    text = json.dumps(summary, indent=2, default=str) + "\n"
    if is_remote(config.storage_path):
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(join_uri(experiment_path(config), "best.json"))
        with fs.open_output_stream(path) as f:
            f.write(text.encode())
        local_copy = Path(checkpoint_path).parent / "best.json"
        local_copy.write_text(text)
        log(f"local copy for `pneumonia evaluate --experiment {local_copy.parent}`: {local_copy}")
    else:
        Path(experiment_path(config), "best.json").write_text(text)
    log(f"best trial {summary['trial_id']} ({summary['family']}): val_auc {summary['metrics'].get(METRIC):.4f}")
    log(f"best.json: {join_uri(experiment_path(config), 'best.json')}")
    return summary


def tune_experiment(config: TuneConfig, address: str | None = None, resume: bool = False,
                    log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the search on the cluster at ``address`` or a local in-process Ray; returns best.json."""
    import ray
    from ray import tune

    from tuning.trainable import trial_dirname

    address = address or os.environ.get("RAY_ADDRESS") or None
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=True, include_dashboard=None if address else False)
    alive = sum(1 for node in ray.nodes() if node.get("Alive"))
    check_storage(config, alive)
    resources = ray.cluster_resources()
    log(f"Ray: {alive} node(s), {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs; "
        f"experiment {experiment_path(config)}")
    started = time.time()
    path = experiment_path(config)
    trainable = make_trainable(config)
    if resume:
        if not tune.Tuner.can_restore(path):
            raise ValueError(f"nothing to resume at {path}")
        log(f"resuming {path}: finished trials are kept, unfinished ones continue from their checkpoints")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        searcher, scheduler, param_space = make_search(config)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            # metric and mode live in the searcher and scheduler (Tune refuses them in both places)
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, trial_dirname_creator=trial_dirname,
                                        num_samples=config.num_samples,
                                        time_budget_s=config.time_budget_s or None),
            run_config=run_config(config),
        )
    results = tuner.fit()
    summary = write_best(results, config, log)
    summary["wall_seconds"] = time.time() - started
    log(f"{len(results)} trials ({len(results.errors)} errors) in {summary['wall_seconds']:.0f} s")
    return summary


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="python -m tuning.run", description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML (tuning/configs/quick.yaml, full-cpu.yaml, gpu-cluster.yaml)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. num_samples=4")
    parser.add_argument("--data", help="data dir or .npz on every node (default: train.data.path, $PNEUMONIA_DATA)")
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted experiment of this name")
    return parser


def load_tune_config(args: argparse.Namespace) -> TuneConfig:
    overrides = list(args.set or [])
    data = args.data or os.environ.get("PNEUMONIA_DATA")
    if data:
        # Trials may run on other nodes and in other working dirs: pass an absolute path.
        overrides.append(f"train.data.path={data if '://' in data else Path(data).resolve()}")
    return load_config(TuneConfig, args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_tune_config(args)
        tune_experiment(config, args.address, args.resume)
    except (ConfigError, StorageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
