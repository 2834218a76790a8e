"""Choosing Serve's HTTP ingress before a local Ray starts."""

import os

import pytest

import serving.ingress
from cli.main import main
from models.config import ConfigError
from serving.ingress import HAPROXY_ENV, HAPROXY_PATHS, HAPROXY_PORTS, set_ingress_environment


@pytest.fixture
def clean_env(monkeypatch):
    """No RAY_SERVE_* settings, restored after the test."""
    for key in [*HAPROXY_ENV, *HAPROXY_PORTS, *HAPROXY_PATHS, "RAY_SERVE_HAPROXY_BINARY_PATH"]:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_ray_serve_bundles_an_haproxy_binary(clean_env):
    binary = serving.ingress.haproxy_binary()
    assert binary and os.access(binary, os.X_OK)


def test_auto_picks_haproxy_only_when_there_is_a_binary(clean_env, tmp_path):
    clean_env.setattr(serving.ingress, "haproxy_binary", lambda: None)
    assert set_ingress_environment("auto") == "python"
    assert not any(key in os.environ for key in HAPROXY_ENV)
    clean_env.setattr(serving.ingress, "haproxy_binary", lambda: str(tmp_path / "haproxy"))
    assert set_ingress_environment("auto") == "haproxy"
    assert all(os.environ[key] == "1" for key in HAPROXY_ENV)
    stats, metrics = (int(os.environ[key]) for key in HAPROXY_PORTS)  # free ports, not Ray's fixed defaults
    assert stats != metrics and 8404 not in (stats, metrics)
    assert set_ingress_environment("python") == "python"  # and back: the settings are removed
    assert not any(key in os.environ for key in HAPROXY_ENV)


def test_asking_for_haproxy_without_a_binary_says_how_to_get_one(clean_env, capsys):
    clean_env.setattr(serving.ingress, "haproxy_binary", lambda: None)
    with pytest.raises(ConfigError, match="apt install haproxy"):
        set_ingress_environment("haproxy")
    with pytest.raises(ConfigError, match="ingress must be one of"):
        set_ingress_environment("nginx")
    with pytest.raises(SystemExit):
        main(["serve", "--model", "x", "--ingress", "nginx"])
    assert "invalid choice: 'nginx'" in capsys.readouterr().err
