"""What a tuning experiment is called and where it lives: the metric it ranks by, its storage path and study,
and its trials' results as written on disk. Shared by the search, evaluation, ensembles and benchmarks.
"""

from __future__ import annotations

import json
from pathlib import Path

from models.download import default_cache_dir
from models.errors import PneumoniaError
from tuning.config import TuneConfig

METRIC, MODE = "val_auc", "max"  # what trials are ranked by: validation ROC AUC, higher is better
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


def experiment_path(config: TuneConfig) -> str:
    return join_uri(local_storage(config.storage_path), config.name)


def study_storage_url(config: TuneConfig) -> str:
    """Optuna's RDB URL: the configured one, else sqlite beside a local experiment (or in the cache)."""
    if config.study_storage:
        return config.study_storage
    base = default_cache_dir() if is_remote(config.storage_path) else Path(local_storage(config.storage_path))
    base.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{base / (config.name + '-optuna.db')}"


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
