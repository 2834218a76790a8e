"""What a tuning experiment is called and where it lives: the metric it ranks by, its storage path and study,
and its trials' results as written on disk. Shared by the search, ensembles and benchmarks.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path

from models.package import METRIC
from runtime.errors import PneumoniaError
from runtime.paths import default_cache_dir
from tuning.config import TuneConfig

BEST_SO_FAR = f"best_{METRIC}"  # a trial's best epoch so far: what Optuna learns from (it keeps the last report)


class StorageError(PneumoniaError, ValueError):
    """A storage path the cluster's nodes cannot all reach."""


class SearchError(PneumoniaError):
    """A search that cannot be run, resumed or ranked as asked."""


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


def remote_storage(experiment: str | None) -> str | None:
    """The storage path (s3://BUCKET/PATH?...) holding the experiment URI ``experiment``, None for a local one:
    where its package is published, beside it."""
    if not experiment or not is_remote(experiment):
        return None
    path, sep, query = experiment.partition("?")
    return path.rstrip("/").rsplit("/", 1)[0] + sep + query


def experiment_path(config: TuneConfig) -> str:
    return join_uri(local_storage(config.storage_path), config.name)


def study_name(config: TuneConfig) -> str:
    """The Optuna study: the experiment's own, unless the config names an earlier one to continue."""
    return config.study_name or config.name


STUDY_SUFFIX = "-optuna.db"  # a default study's sqlite file: STUDY-optuna.db


def study_dir(storage_path: str) -> Path:
    """Where the default sqlite studies of experiments in ``storage_path`` lie: beside local experiments, in the
    cache for remote storage."""
    return default_cache_dir() if is_remote(storage_path) else Path(local_storage(storage_path))


def study_storage_url(config: TuneConfig) -> str:
    """Optuna's RDB URL: the configured one, else a sqlite file named after the study, beside a local
    experiment (or in the cache for remote storage)."""
    if config.study_storage:
        return config.study_storage
    base = study_dir(config.storage_path)
    base.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{base / (study_name(config) + STUDY_SUFFIX)}"


STAMP = "%Y%m%d-%H%M%S"


def _stamped(name: str, base: str) -> bool:
    stamp = name[len(base) + 1:]
    if not name.startswith(base + "-") or len(stamp) != 15:
        return False
    try:
        datetime.strptime(stamp, STAMP)
    except ValueError:
        return False
    return True


def experiment_names(config: TuneConfig) -> list[str]:
    """Experiments in the storage that a run of this config made: NAME and NAME-<UTC time>, oldest first."""
    import pyarrow.fs

    base = config.name
    fs, root = pyarrow.fs.FileSystem.from_uri(local_storage(config.storage_path) if is_remote(config.storage_path)
                                              else Path(local_storage(config.storage_path)).as_uri())
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    except OSError:
        return []
    names = [info.base_name for info in infos if info.type == pyarrow.fs.FileType.Directory]
    return sorted(n for n in names if n == base or _stamped(n, base))


def name_experiment(config: TuneConfig, resume: bool) -> tuple[TuneConfig, str]:
    """(the config with the experiment's final name, a line saying what happens). A fresh run gets
    NAME-<UTC time> (``unique_name``) or exactly NAME, refused if that exists; ``resume`` takes the newest
    experiment of this config."""
    if resume:
        made = experiment_names(config)
        if not made:
            raise SearchError(f"nothing to resume: no experiment {config.name} or {config.name}-<time> under "
                              f"{local_storage(config.storage_path)}")
        named = dataclasses.replace(config, name=made[-1])
        return named, f"resuming experiment {made[-1]}" + (" (its Optuna study continues)" * config.uses_optuna)
    name = f"{config.name}-{datetime.now(UTC):{STAMP}}" if config.unique_name else config.name
    named = dataclasses.replace(config, name=name)
    if not config.unique_name and name in experiment_names(config):
        raise SearchError(f"experiment {name} already exists under {local_storage(config.storage_path)}: pass --resume "
                          "to continue it, or --set name=NEW for a new one (unique_name=true stamps the time)")
    if config.seeds:
        return named, f"new experiment {name}: {config.seeds} seeds of one configuration, no search"
    if not config.uses_optuna:
        return named, f"new experiment {name}: random search"
    study = study_name(named)
    said = f"new experiment {name}, " + (f"continuing the Optuna study {study} (study_name)" if config.study_name
                                         else "with a fresh Optuna study")
    return named, said


def parse_result_lines(text: str) -> list[dict]:
    """The complete JSON lines of a trial's ``result.json``; a last line still being written (or cut short
    by a killed process) is left out rather than failing the reader."""
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def read_trial_results(experiment: str | Path) -> dict[str, list[dict]]:
    """Each trial dir's reported results in order, by dir name; trials that reported nothing yet are left out."""
    results = {}
    for path in sorted(Path(experiment).glob("*/result.json")):
        try:
            rows = parse_result_lines(path.read_text())
        except OSError:
            continue
        if rows:
            results[path.parent.name] = rows
    return results
