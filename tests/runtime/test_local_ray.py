"""The project's own local Ray: its workers run at normal priority unless the operator says otherwise."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import os, ray
from runtime.local_ray import start_ray, stop_ray
assert start_ray() is True
print("NICE", ray.get(ray.remote(lambda: os.nice(0)).remote()))
stop_ray()
"""


@pytest.mark.services
@pytest.mark.parametrize("setting, expected", [(None, 0), ("7", 7)])
def test_a_local_rays_workers_run_at_normal_priority_unless_the_environment_says(setting, expected):
    """Ray's default is nice 15: beside a busy loop per core a trial trained 40x slower and Serve's proxy missed
    its readiness checks."""
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_worker_niceness", "RAY_ADDRESS")}
    if setting is not None:
        env["RAY_worker_niceness"] = setting
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"NICE {expected}" in done.stdout
