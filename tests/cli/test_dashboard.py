"""Watching a search: `pneumonia dashboard` serves optuna-dashboard on a study while it is written, and a real
search on a local Ray shows in its Ray dashboard and in optuna-dashboard, in Debian's Chromium. Every process a
test starts runs in its own process group and is stopped by it."""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cli.main import main
from serving.http_proxy import free_port
from tests.services import BIN, group_alive, stop_group, system_binary
from tests.tuning.test_search import TINY_SEARCH

REPO = Path(__file__).resolve().parents[2]


def _study(storage: Path, name: str, values: list[float]):
    """A study as a search leaves it beside its experiment (STORAGE/NAME-optuna.db), with finished trials."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{storage / (name + '-optuna.db')}",
                                direction="maximize", load_if_exists=True)
    for value in values:
        trial = study.ask()
        trial.suggest_float("learning_rate", 1e-4, 3e-3, log=True)
        study.tell(trial, value)
    return study


def _start(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "pneumonia"), *args], cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}, start_new_session=True)


def _wait_for_line(pattern: str, process: subprocess.Popen, log: Path, timeout: float = 300.0) -> re.Match:
    deadline = time.time() + timeout
    while True:
        found = re.search(pattern, log.read_text())
        if found:
            return found
        assert process.poll() is None, f"exited before printing {pattern!r}:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"no {pattern!r} after {timeout:.0f} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def _get(url: str, token: str = "") -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, b""


def _listening(pid: int) -> set[tuple[str, int]]:
    import psutil

    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections("inet") if c.status == "LISTEN"}


def _gone(pgid: int, timeout: float = 30.0) -> bool:
    deadline = time.time() + timeout
    while group_alive(pgid) and time.time() < deadline:
        time.sleep(0.2)
    return not group_alive(pgid)


def _stop_and_check_gone(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM to the process group, as a terminal's Ctrl-C or a service manager's stop; nothing of it may be
    left after ``timeout``."""
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=timeout)
    assert _gone(process.pid, timeout), "processes of the stopped command are still running"


def _one_error_line(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_no_study_yet_is_one_error_line(tmp_path, capsys):
    assert "no Optuna study under" in _one_error_line(["dashboard", "--storage-path", str(tmp_path)], capsys)


def test_an_unknown_experiment_is_one_error_line_naming_the_studies_there(tmp_path, capsys):
    _study(tmp_path, "quick-20261201-090000", [0.7])
    err = _one_error_line(["dashboard", "quick-20261127-145222", "--storage-path", str(tmp_path)], capsys)
    assert "no Optuna study 'quick-20261127-145222'" in err and "quick-20261201-090000" in err


@pytest.mark.services
def test_dashboard_serves_the_newest_study_while_it_is_written(tmp_path):
    """Without EXPERIMENT it opens the study written last, on 127.0.0.1 only; a trial finished while it serves
    shows within 10 s; a SIGTERM leaves nothing behind."""
    _study(tmp_path, "quick-20261201-090000", [0.7, 0.8])
    newest = _study(tmp_path, "quick-20261202-090000", [0.6])
    port = free_port()
    log = tmp_path / "dashboard.log"
    process = _start(["dashboard", "--storage-path", str(tmp_path), "--port", str(port)], log)
    try:
        url = _wait_for_line(r"optuna-dashboard of study quick-20261202-090000 .*: (http://\S+)", process, log,
                             timeout=120).group(1)
        assert url.startswith(f"http://127.0.0.1:{port}/dashboard/studies/")
        api = f"http://127.0.0.1:{port}/api/studies/{url.rsplit('/', 1)[1]}"
        assert len(json.loads(_get(api)[1])["trials"]) == 1
        assert _listening(process.pid) == {("127.0.0.1", port)}  # loopback alone
        trial = newest.ask()  # as a search's trial finishing, from another process's connection
        trial.suggest_float("learning_rate", 1e-4, 3e-3, log=True)
        newest.tell(trial, 0.9)
        deadline = time.time() + 10
        while len(json.loads(_get(api)[1])["trials"]) < 2:
            assert time.time() < deadline, "the finished trial did not show within 10 s"
            time.sleep(0.2)
        _stop_and_check_gone(process)
        assert "stopped" in log.read_text() and "Traceback" not in log.read_text()
    finally:
        stop_group(process)


def _completed_trials(storage_url: str, study: str) -> set[int]:
    import optuna

    try:
        loaded = optuna.load_study(study_name=study, storage=storage_url)
    except KeyError:  # not created yet
        return set()
    return {t.number for t in loaded.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))}


@pytest.mark.slow
def test_a_running_search_shows_in_the_ray_dashboard_and_in_optuna_dashboard_in_chromium(tmp_path, search_data):
    """`pneumonia tune` on a local Ray of its own prints its Ray dashboard's URL (on 127.0.0.1, under Ray's
    token) and the `pneumonia dashboard` command; in Chromium the Ray dashboard lists the trial actors, and
    optuna-dashboard, started as printed, shows each trial within 10 s (plus a busy machine's slack) of Optuna
    recording it finished, live, and all of them after the search. Everything started is stopped by its group."""
    from playwright.sync_api import sync_playwright

    chromium = system_binary("chromium", "/usr/bin/chromium", "Debian's chromium")
    token = secrets.token_hex(32)
    (tmp_path / "auth_token").write_text(token)
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "auth_token"), "RAY_ADDRESS": ""}
    storage = tmp_path / "results"
    sets = [*TINY_SEARCH, "num_samples=4", "train.epochs=3", "max_concurrent=1", "scheduler=fifo", "space.families=[cnn]",
            "points_to_evaluate=[]", f"storage_path={storage}", "name=live"]
    search_log, dashboard_log = tmp_path / "tune.log", tmp_path / "dashboard.log"
    search = _start(["tune", "--data", search_data, *[a for s in sets for a in ("--set", s)]], search_log,
                    env)
    dashboard = None
    try:
        ray_url = _wait_for_line(r"Ray dashboard (http://127\.0\.0\.1:\d+) .*ray get-auth-token", search, search_log)[1]
        command = _wait_for_line(r"watch the search: (pneumonia dashboard .*?)  \(", search, search_log)[1]
        assert command == f"pneumonia dashboard live --storage-path {storage}"
        assert f"tensorboard --logdir {storage / 'live'}" in search_log.read_text()
        assert _get(ray_url + "/api/version")[0] == 401  # Ray's token, as a cluster's dashboard
        assert _get(ray_url + "/api/version", token)[0] == 200

        port = free_port()
        dashboard = _start([*shlex.split(command)[1:], "--port", str(port)], dashboard_log)
        optuna_url = _wait_for_line(r"optuna-dashboard of study live .*: (http://\S+)", dashboard, dashboard_log)[1]
        storage_url = f"sqlite:///{storage / 'live-optuna.db'}"

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])
            try:
                context = browser.new_context(viewport={"width": 1280, "height": 800})
                # what the Ray dashboard's sign-in sets once the token is pasted (POST /api/authenticate)
                context.add_cookies([{"name": "ray-authentication-token", "value": token, "url": ray_url}])
                ray_page = context.new_page()
                ray_page.goto(ray_url + "/#/actors")
                ray_page.get_by_text(re.compile("ImplicitFunc|train_trial")).first.wait_for(timeout=180_000)
                ray_page.screenshot(path=str(tmp_path / "ray-dashboard-actors.png"))
                assert search.poll() is None, "the Ray dashboard was checked after the search, not during it"

                page = context.new_page()
                page.goto(optuna_url + "/trials")
                shown: dict[int, float] = {}
                live = 0  # trials shown while the search still ran
                while True:
                    finished = search.poll() is not None
                    for number in sorted(_completed_trials(storage_url, "live") - shown.keys()):
                        recorded = time.time()
                        item = page.get_by_role("button").filter(has=page.get_by_text(f"Trial {number}", exact=True))
                        # 10 s is optuna-dashboard's refresh; the rest is a busy 2-core machine's slack
                        item.filter(has_text="Complete").first.wait_for(timeout=30_000)
                        shown[number] = time.time() - recorded
                        live += search.poll() is None
                    if finished:
                        break
                    time.sleep(0.5)
                page.screenshot(path=str(tmp_path / "optuna-dashboard-trials.png"))
            finally:
                browser.close()
        assert search.returncode == 0, search_log.read_text()[-3000:]
        assert sorted(shown) == [0, 1, 2, 3] and live, (shown, live)
        print("seconds from Optuna's record to the page:", shown)
        assert _gone(search.pid), "the search's Ray left processes behind"
        _stop_and_check_gone(dashboard)  # still serving after the search: stopped here
    finally:
        if dashboard is not None:
            stop_group(dashboard)
        stop_group(search)
