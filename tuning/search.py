"""The search: Ray Tune + Optuna (TPE) + ASHA over the model families, ending in ``best.json``.

What ``ray job submit`` and ``ray submit`` run; ``pneumonia tune`` is the same:

    python -m tuning.search --config tuning/configs/quick.yaml [--set key=value ...] [--address ADDR] [--resume]

Joins the cluster at ``--address`` / ``$RAY_ADDRESS`` (``auto``: the one ``ray start`` recorded on this machine),
else starts a new local Ray in-process. At the end it writes ``best.json`` (trial, family, config, validation
metrics, checkpoint) into the experiment dir.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from models.package import METRIC, MODE, read_metadata
from runtime.config import load_config, to_dict
from runtime.local_ray import resolve_address, run_command, start_ray
from runtime.paths import default_cache_dir
from tuning.config import DEFAULT_CONFIG, TuneConfig
from tuning.dashboard import watch_lines
from tuning.experiment import (
    BEST_SO_FAR,
    SearchError,
    check_storage,
    experiment_path,
    is_remote,
    join_uri,
    local_storage,
    name_experiment,
    study_name,
    study_storage_url,
)
from tuning.search_space import DefineByRun, random_space
from tuning.trainable import train_trial, trial_dirname


def make_sampler(config: TuneConfig):
    """The Optuna sampler ``config.sampler`` describes, seeded with ``config.seed``."""
    import optuna

    settings = config.sampler
    if settings.kind == "gp":
        try:
            import torch  # noqa: F401  (Optuna's GPSampler fits its Gaussian process with PyTorch)
        except ImportError as exc:
            raise SearchError("sampler.kind: gp needs PyTorch (pip install -e '.[gp]', or pip install torch); "
                              "or use sampler.kind: tpe") from exc
        return optuna.samplers.GPSampler(seed=config.seed, n_startup_trials=settings.n_startup_trials)
    return optuna.samplers.TPESampler(seed=config.seed, n_startup_trials=settings.n_startup_trials,
                                      multivariate=settings.multivariate, group=settings.group,
                                      constant_liar=settings.constant_liar)


def seed_repeats(config: TuneConfig):
    """No search: ``train`` once per seed, each trial to its last epoch (a seed ensemble's members)."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    seeds = [config.train.seed + i for i in range(config.seeds)]
    space = {"model.family": config.train.model.family, "seed": tune.grid_search(seeds)}
    return BasicVariantGenerator(max_concurrent=config.max_concurrent), FIFOScheduler(), space


def make_search(config: TuneConfig):
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter

    from tuning.scheduler import ResumableASHA  # Ray Tune at import, as above

    if config.seeds:
        return seed_repeats(config)
    if config.scheduler == "asha":
        scheduler = ResumableASHA(metric=METRIC, mode=MODE, time_attr="training_iteration", max_t=config.epochs_run,
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
        metric=BEST_SO_FAR,
        mode=MODE,
        sampler=make_sampler(config),
        study_name=study_name(config),
        storage=optuna.storages.RDBStorage(study_storage_url(config)),
        points_to_evaluate=config.points_to_evaluate or None,
    )
    return ConcurrencyLimiter(searcher, max_concurrent=config.max_concurrent), scheduler, {}


def make_trainable(config: TuneConfig):
    from ray import tune

    trainable = tune.with_parameters(train_trial, base=to_dict(config.train), checkpoint_every=config.checkpoint_every,
                                     last_epoch=config.epochs_run)
    resources = {"cpu": config.cpus_per_trial}
    if config.gpus_per_trial:
        resources["gpu"] = config.gpus_per_trial
    return tune.with_resources(trainable, resources)


def run_config(config: TuneConfig):
    from ray import tune

    from tuning.progress import SearchProgress  # Ray Tune at import: loaded only for a search

    return tune.RunConfig(
        name=config.name,
        storage_path=local_storage(config.storage_path),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=config.num_to_keep, checkpoint_score_attribute=METRIC,
                                                checkpoint_score_order=MODE),
        failure_config=tune.FailureConfig(max_failures=config.max_failures),
        sync_config=tune.SyncConfig(sync_artifacts=True),  # each trial's trial.log lands in its trial dir
        callbacks=[SearchProgress(config.trials, config.epochs_run, config.time_budget_s)],
        stop={"training_iteration": config.stop_after_epochs} if config.stop_after_epochs else None,
        verbose=0,
    )


def write_best(results, config: TuneConfig, log: Callable[[str], None]) -> dict:
    """best.json: the trial with the highest validation AUC and its best checkpoint, downloaded if remote."""
    if not any(METRIC in (result.metrics or {}) for result in results):
        first_error = next((str(e).strip().splitlines()[-1] for e in results.errors), "no error recorded")
        raise SearchError(f"no trial reported {METRIC}: {len(results.errors)} of {len(results)} trials failed "
                           f"(first error: {first_error}); each trial's error.txt under "
                           f"{experiment_path(config)} has the traceback")
    best = results.get_best_result(metric=METRIC, mode=MODE, scope="all")
    checkpoint = best.get_best_checkpoint(METRIC, MODE) or best.checkpoint
    if checkpoint is None:
        raise SearchError("no trial reported a checkpoint; nothing to evaluate")
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
        "config": read_metadata(checkpoint_path).config,
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
    log(f"best trial {summary['trial_id']} ({summary['family']}): {METRIC} {summary['metrics'].get(METRIC):.4f}")
    log(f"best.json: {join_uri(experiment_path(config), 'best.json')}")
    return summary


def run_search(config: TuneConfig, address: str | None = None, resume: bool = False,
               log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the search on the cluster at ``address`` or a local in-process Ray; returns best.json."""
    import ray
    from ray import tune

    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Ctrl-C / SIGTERM stop at once (see runtime.tensorflow_setup)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no boxes; tuning.progress reports
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created" is said by name_experiment
    # "The `on_step_begin` operation took 0.6 s": Tune's own loop on a busy machine, nothing a user can act on
    logging.getLogger("ray.tune.utils.util").setLevel(logging.ERROR)
    address = resolve_address(address)
    config, said = name_experiment(config, resume)  # before Ray starts: a mistake costs a second
    path = experiment_path(config)
    if resume and not tune.Tuner.can_restore(path):
        raise SearchError(f"nothing to resume at {path}: the experiment has no saved state")
    log(said)
    start_ray(address, log=log)  # trials log to their own trial.log; the console gets the progress lines
    alive = sum(1 for node in ray.nodes() if node.get("Alive"))
    check_storage(config, alive)
    resources = ray.cluster_resources()
    log(f"Ray: {alive} node(s), {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs; "
        f"experiment {experiment_path(config)}")
    started = time.time()
    trainable = make_trainable(config)
    if resume:
        log(f"resuming {path}: finished trials are kept, unfinished ones continue from their checkpoints")
        from tuning.scheduler import rebuild_rungs

        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
        for trial_id, (stop, last) in rebuild_rungs(tuner, path).items():
            if last > stop["training_iteration"]:  # let through by a resume that lost the rungs
                first = stop["training_iteration"] + 1
                extra = f"epoch {last}" if last == first else f"epochs {first}-{last}"
                log(f"ASHA's record stops trial {trial_id} at epoch {stop['training_iteration']} ({METRIC} "
                    f"{stop[METRIC]:.4f}); its {extra} ran only because an earlier resume lost that record, and it "
                    "does not train again")
    else:
        searcher, scheduler, param_space = make_search(config)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            # metric and mode live in the searcher and scheduler (Tune refuses them in both places)
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, trial_dirname_creator=trial_dirname,
                                        num_samples=1 if config.seeds else config.num_samples,
                                        time_budget_s=config.time_budget_s or None),
            run_config=run_config(config),
        )
    for line in watch_lines(config):  # now that the study exists: the command works as soon as it is shown
        log(line)
    results = tuner.fit()
    summary = write_best(results, config, log)
    summary["wall_seconds"] = time.time() - started
    log(f"{len(results)} trials ({len(results.errors)} errors) in {summary['wall_seconds']:.0f} s")
    return summary


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="python -m tuning.search", description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: tuning/configs/quick.yaml, as `pneumonia run`; see "
                                         "tuning/configs/)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. num_samples=4")
    parser.add_argument("--data", help="data dir or .npz on every node (default: train.data.path, $PNEUMONIA_DATA)")
    parser.add_argument("--address", help="Ray cluster to join: HOST:PORT of its head, or auto for the one `ray start` recorded on this machine (default: $RAY_ADDRESS, else a new local Ray of this command's own)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the newest experiment of this config (NAME or NAME-<time>) instead of a new one")
    return parser


def load_tune_config(args: argparse.Namespace) -> TuneConfig:
    overrides = list(args.set or [])
    data = args.data or os.environ.get("PNEUMONIA_DATA")
    if data:
        # Trials may run on other nodes and in other working dirs: pass an absolute path.
        overrides.append(f"train.data.path={data if '://' in data else Path(data).resolve()}")
    return load_config(TuneConfig, args.config or DEFAULT_CONFIG, overrides)


def tune_from_args(args: argparse.Namespace) -> int:
    """``pneumonia tune`` and ``python -m tuning.search``: the search for the parsed arguments."""
    run_search(load_tune_config(args), args.address, args.resume)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m tuning.search ...`` is ``pneumonia tune ...``: one parser, one way of reporting errors."""
    return run_command(tune_from_args, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
