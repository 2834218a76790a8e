"""``pneumonia dashboard [EXPERIMENT]``: optuna-dashboard on a search's Optuna study, on 127.0.0.1, while the
search writes it and after; and the lines a search prints to watch it (this command, TensorBoard).

Ray 2.60's dashboard has no Tune view (docs/search.md): optuna-dashboard is the tool made to show a study
(history, parameter importances, intermediate values), so it is served as it comes, on the study the search
writes (``tuning.experiment.study_storage_url``). Optuna and optuna-dashboard are imported only to serve.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from runtime.config import ConfigError
from tuning.config import TuneConfig
from tuning.experiment import STUDY_SUFFIX, experiment_path, local_storage, study_dir, study_name

DEFAULT_PORT = 8080  # optuna-dashboard's own default
DEFAULT_STORAGE = TuneConfig.storage_path


@dataclasses.dataclass(frozen=True)
class StudyLocation:
    """The Optuna study of an experiment: its name and the RDB URL of the storage holding it."""

    experiment: str
    study: str
    storage_url: str


def _sqlite_file(url: str) -> Path | None:
    return Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None


def _studies_in(folder: Path) -> list[Path]:
    """The default sqlite studies in ``folder``, newest written first."""
    files = [path for path in folder.glob(f"*{STUDY_SUFFIX}") if path.is_file()] if folder.is_dir() else []
    return sorted(files, key=lambda path: path.stat().st_mtime, reverse=True)


def _newest_in_storage(url: str) -> str:
    import optuna

    summaries = optuna.get_all_study_summaries(url, include_best_trial=False)
    if not summaries:
        raise ConfigError(f"no Optuna study in {_display(url)} yet: a search creates its study as it starts")
    return max(summaries, key=lambda s: s.datetime_start or datetime.min).study_name  # one not started: oldest


def find_study(experiment: str | None = None, storage_path: str = DEFAULT_STORAGE, study: str = "",
               study_storage: str = "") -> StudyLocation:
    """Where ``experiment``'s study is: a name under ``storage_path`` or an experiment dir, with the search's
    ``study_name`` (``study``) and ``study_storage`` when it set them; None: the study written last."""
    if experiment and "/" in experiment:  # an experiment dir or URI: its parent is the storage path
        path, _, query = experiment.partition("?") if "://" in experiment else (experiment, "", "")
        storage_path, _, experiment = path.rstrip("/").rpartition("/")
        storage_path += f"?{query}" if query else ""
    folder = study_dir(storage_path)
    if study_storage:
        name = study or experiment or _newest_in_storage(study_storage)
        url = study_storage
    elif study or experiment:
        name = study or experiment
        url = f"sqlite:///{folder / (name + STUDY_SUFFIX)}"
    else:
        newest = _studies_in(folder)
        if not newest:
            raise ConfigError(f"no Optuna study under {folder} yet (STUDY{STUDY_SUFFIX}): start a search "
                              "(`pneumonia run` or `pneumonia tune`), or pass --storage-path where its storage_path is")
        name, url = newest[0].name.removesuffix(STUDY_SUFFIX), f"sqlite:///{newest[0]}"
    where = _sqlite_file(url)
    if where is not None and not where.is_file():
        known = ", ".join(path.name.removesuffix(STUDY_SUFFIX) for path in _studies_in(where.parent)[:5])
        raise ConfigError(f"no Optuna study {name!r}: {where} does not exist"
                          + (f"; the newest studies there: {known}" if known else f"; no study under {where.parent}")
                          + " (a search with searcher: random has none)")
    return StudyLocation(experiment or name, name, url)


def _display(url: str) -> str:
    """``url`` with any password hidden: it goes to the console."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:  # not a URL SQLAlchemy parses: shown as given
        return url


def serve_study(location: StudyLocation, port: int = DEFAULT_PORT, log: Callable[[str], None] = print) -> None:
    """Serve optuna-dashboard on ``location``'s storage at 127.0.0.1:``port`` until Ctrl-C or SIGTERM. It only
    reads the study: a running search keeps writing it, and its new trials show on the page's next refresh."""
    import socketserver
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    import optuna
    from optuna_dashboard import wsgi

    storage = optuna.storages.RDBStorage(location.storage_url, skip_table_creation=True)
    try:
        study_id = storage.get_study_id_from_name(location.study)
    except KeyError:
        raise ConfigError(f"no Optuna study {location.study!r} in {_display(location.storage_url)} yet") from None

    class Server(socketserver.ThreadingMixIn, WSGIServer):  # as optuna-dashboard's own CLI serves
        daemon_threads = True

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, *args) -> None:  # no line per request on the console
            pass

    try:
        server = make_server("127.0.0.1", port, wsgi(storage), server_class=Server, handler_class=QuietHandler)
    except OSError as exc:
        raise ConfigError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}; pass --port N") from None
    log(f"optuna-dashboard of study {location.study} ({_display(location.storage_url)}): "
        f"http://127.0.0.1:{port}/dashboard/studies/{study_id}")
    log("serving until Ctrl-C")
    try:
        server.serve_forever()
    finally:
        server.server_close()


def dashboard_command(config: TuneConfig) -> str:
    """The ``pneumonia dashboard`` command for ``config``'s experiment (its final name), with what it needs
    to find the study beyond the defaults."""
    args = ["pneumonia", "dashboard", config.name]
    if local_storage(config.storage_path) != local_storage(DEFAULT_STORAGE):
        args += ["--storage-path", local_storage(config.storage_path)]
    if config.study_name:
        args += ["--study", study_name(config)]
    command = shlex.join(args)
    if config.study_storage:
        command += f" --study-storage {shlex.quote(_display(config.study_storage))}"
    return command


def watch_lines(config: TuneConfig) -> list[str]:
    """What a search prints to watch it live: optuna-dashboard on its study, and TensorBoard on its trials."""
    from importlib.util import find_spec

    install = "" if find_spec("tensorboard") else "pip install tensorboard, then "
    study = [f"watch the search: {dashboard_command(config)}  (optuna-dashboard: trials, history, importances)"]
    return [*(study if config.uses_optuna else []),
            f"trial curves: {install}tensorboard --logdir {shlex.quote(experiment_path(config))}"]
