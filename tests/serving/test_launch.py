"""Choosing Serve's HTTP ingress before a local Ray starts."""

import os

import pytest

from serving.launch import HAPROXY_ENV, choose_ingress
from tuning.cli import main


@pytest.fixture
def bin_dir(tmp_path, monkeypatch):
    """A PATH holding only what the test puts there (and no RAY_SERVE_* settings)."""
    monkeypatch.setenv("PATH", str(tmp_path))
    for key in [*HAPROXY_ENV, "RAY_SERVE_HAPROXY_BINARY_PATH"]:
        monkeypatch.delenv(key, raising=False)
    return tmp_path


def test_auto_picks_haproxy_only_when_the_binary_is_there(bin_dir):
    assert choose_ingress("auto") == "python"
    assert not any(key in os.environ for key in HAPROXY_ENV)
    haproxy = bin_dir / "haproxy"
    haproxy.write_text("#!/bin/sh\n")
    haproxy.chmod(0o755)
    assert choose_ingress("auto") == "haproxy"
    assert all(os.environ[key] == "1" for key in HAPROXY_ENV)
    assert choose_ingress("python") == "python"  # and back: the settings are removed
    assert not any(key in os.environ for key in HAPROXY_ENV)


def test_asking_for_haproxy_without_the_binary_says_how_to_get_it(bin_dir, capsys):
    with pytest.raises(ValueError, match="apt install haproxy"):
        choose_ingress("haproxy")
    with pytest.raises(ValueError, match="ingress must be one of"):
        choose_ingress("nginx")
    with pytest.raises(SystemExit):
        main(["serve", "--model", str(bin_dir), "--ingress", "nginx"])
    assert "invalid choice: 'nginx'" in capsys.readouterr().err
