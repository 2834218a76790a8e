"""Both entry points report a user's mistake the same way (one line, exit 2) and let a bug keep its traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

import cli.main

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.services  # runs the search commands (they stop at the mistake, before Ray)
@pytest.mark.parametrize("entry", [["-m", "tuning.search"], ["-m", "cli.main", "tune"]])
def test_a_mistake_is_one_line_and_exit_code_2(entry, tmp_path):
    for args, named in ((["--config", str(tmp_path / "missing.yaml")], "config file not found"),
                        (["--set", "num_sample=3"], "unknown key num_sample"),
                        (["--data", str(tmp_path / "nowhere"), "--resume", "--set", f"storage_path={tmp_path}"],
                         "nothing to resume")):
        done = subprocess.run([sys.executable, *entry, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr[-2000:]
        assert done.stderr.strip().splitlines() == [done.stderr.strip()] and done.stderr.startswith("error: ")
        assert named in done.stderr


def test_a_bug_keeps_its_traceback(monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("a bug, not a user mistake")

    monkeypatch.setattr(cli.main, "load_splits", broken)
    with pytest.raises(KeyError, match="a bug"):
        cli.main.main(["data", "check", "--data", "anywhere"])
