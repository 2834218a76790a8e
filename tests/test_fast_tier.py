"""The fast tier's guard refuses what would start Ray, Serve or a server, and lets everything else through."""

import subprocess
import sys

import pytest

from tests.fast_tier import StartsServices, starts_services


@pytest.mark.parametrize("argv", [
    ["/venv/bin/ray", "start", "--head"], [sys.executable, "-m", "tuning.search", "--config", "x.yaml"],
    ["/venv/bin/pneumonia", "serve", "--model", "p"], [sys.executable, "-m", "cli.main", "run"],
    [sys.executable, "-c", "from runtime.local_ray import start_ray; start_ray(None)"],
    ["/venv/bin/moto_server", "-p", "5000"], ["/usr/sbin/sshd", "-D"],
])
def test_what_starts_a_service_is_named(argv):
    assert starts_services(argv)


@pytest.mark.parametrize("argv", [
    [sys.executable, "-m", "cli.main", "train", "--data", "d"], ["/venv/bin/pneumonia", "predict", "x.png"],
    [sys.executable, "-c", "print(1)"], ["git", "status"],
])
def test_everything_else_runs(argv):
    assert starts_services(argv) is None


def test_a_fast_test_that_starts_ray_fails_with_the_mark_it_needs():
    import ray

    with pytest.raises(StartsServices, match="mark it @pytest.mark.services"):
        ray.init()
    with pytest.raises(StartsServices, match="tuning.search"):
        subprocess.Popen([sys.executable, "-m", "tuning.search"])
    assert subprocess.run([sys.executable, "-c", "print(2)"], capture_output=True, text=True).stdout == "2\n"
