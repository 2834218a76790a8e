"""Tuning on real Ray: a local in-process run with resume, and a 2-node loopback cluster (job submit under
token auth with S3 storage on moto, and a lost worker node). Every process is stopped by the test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from models.package import load_model_dir
from tests.services import BIN, LocalRayCluster, MotoS3, stop_group
from tuning.experiment import read_trial_results

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

TINY_SEARCH = [
    "space.families=[cnn, inception]", "max_concurrent=2", "train.epochs=2", "grace_period=1", "reduction_factor=2",
    "cpus_per_trial=1", "unique_name=false",
    "space.cnn.image_sizes=[64]", "space.inception.image_sizes=[75]", "space.inception.trainable_blocks=[0]",
    "space.cnn.depth=[2,3]", "space.cnn.base_filters=[8]", "space.batch_sizes=[32]",
    "train.data.max_train_images=128", "train.data.max_val_images=64", "train.mixed_precision=float32",
    "points_to_evaluate=[{model.family: cnn}, {model.family: inception}]",
]


def _sets(items):
    return [arg for item in items for arg in ("--set", item)]


def _run_driver(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tuning.search", *args], cwd=REPO, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def test_killed_driver_resumes_without_rerunning_finished_trials(search_data, tmp_path):
    storage = tmp_path / "results"
    args = ["--data", search_data, *_sets([*TINY_SEARCH, "num_samples=3", "max_concurrent=1", "scheduler=fifo",
                                           "space.families=[cnn]", "points_to_evaluate=[]", f"storage_path={storage}",
                                           "name=resume"])]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    driver = _run_driver(args, env, tmp_path / "first.log")
    experiment = storage / "resume"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:  # wait until one trial finished and the next has started
            results = read_trial_results(experiment)
            finished = [rows for rows in results.values() if rows and rows[-1].get("epoch") == 2]
            if finished and len(results) >= 2:
                break
            assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.5)
        else:
            pytest.fail("no trial finished in time")
    finally:
        stop_group(driver)  # SIGTERM then SIGKILL to the driver and its in-process Ray
    before = {name: len(rows) for name, rows in read_trial_results(experiment).items() if rows[-1].get("epoch") == 2}
    assert before and not (experiment / "best.json").exists()

    resumed = subprocess.run([sys.executable, "-m", "tuning.search", "--resume", *args], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    after = read_trial_results(experiment)
    assert len(after) == 3
    for name, count in before.items():
        assert len(after[name]) == count, f"finished trial {name} ran again"
    best = json.loads((experiment / "best.json").read_text())
    assert best["errors"] == 0
    load_model_dir(best["checkpoint_path"])


@pytest.fixture
def cluster(tmp_path):
    s3 = MotoS3(tmp_path).start()
    ray_cluster = LocalRayCluster(tmp_path, cpus=1, gpus=1, workers=1, env=s3.env)
    try:
        yield ray_cluster.start(), s3
    finally:
        ray_cluster.stop()
        s3.stop()


def test_job_submit_to_two_nodes_with_token_auth_and_s3_storage(cluster, search_data, tmp_path):
    ray_cluster, s3 = cluster
    node_ids = {n["node_id"] for n in ray_cluster.alive_nodes()}
    assert len(node_ids) == 2

    # Without the token the cluster's job API refuses the client.
    no_token = {k: v for k, v in ray_cluster.env.items() if not k.startswith("RAY_AUTH")}
    refused = subprocess.run([str(BIN / "ray"), "job", "list", "--address", ray_cluster.dashboard], env=no_token,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0

    storage = s3.uri("experiments")
    cache = tmp_path / "cache"
    entry = ["python", "-m", "tuning.search", "--data", search_data,
             *_sets([*TINY_SEARCH, "num_samples=6", "gpus_per_trial=1", f"storage_path={storage}", "name=jobtest"])]
    runtime_env = json.dumps({"env_vars": {**s3.env, "PNEUMONIA_CACHE": str(cache)}})
    job = ray_cluster.submit_job(entry, ["--working-dir", str(REPO), "--runtime-env-json", runtime_env], timeout=900)
    output = job.stdout + job.stderr
    assert job.returncode == 0, output[-5000:]
    assert "succeeded" in output.lower()

    keys = s3.keys()
    assert "experiments/jobtest/best.json" in keys
    best = json.loads(s3.client().get_object(Bucket=s3.bucket, Key="experiments/jobtest/best.json")["Body"].read())
    assert best["trials"] == 6 and best["errors"] == 0
    assert any("/checkpoint_" in k for k in keys)  # checkpoints from both nodes landed in the bucket

    rows = []
    for key in keys:
        if key.endswith("/result.json"):
            body = s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read().decode()
            rows.append([json.loads(line) for line in body.splitlines() if line.strip()])
    assert len(rows) == 6
    assert {r["node_id"] for trial in rows for r in trial} == node_ids  # trials ran on both nodes
    assert all(r["gpu_ids"] for trial in rows for r in trial)  # each trial was assigned a (logical) GPU
    families = {r["config"]["model.family"] for trial in rows for r in trial}
    assert families == {"cnn", "inception"}
    assert any(trial[-1]["epoch"] < 2 for trial in rows)  # ASHA stopped at least one trial early
    _, metadata = load_model_dir(best["checkpoint_path"])  # the best checkpoint restores
    assert metadata.config["model"]["family"] == best["family"]


def test_lost_worker_node_trial_resumes_from_its_checkpoint(tmp_path, search_data):
    ray_cluster = LocalRayCluster(tmp_path, cpus=1, gpus=0, workers=1).start()
    try:
        nodes = ray_cluster.alive_nodes()
        head_id = next(n["node_id"] for n in nodes if n["is_head_node"])
        storage = tmp_path / "shared"
        args = ["--address", ray_cluster.address, "--data", search_data,
                *_sets([*TINY_SEARCH, "num_samples=2", "scheduler=fifo", "space.families=[cnn]", "train.epochs=6",
                        "checkpoint_every=1", "max_failures=2", "train.data.max_train_images=512",
                        "points_to_evaluate=[]", f"storage_path={storage}", "shared_storage=true", "name=fault"])]
        driver = _run_driver(args, ray_cluster.env, tmp_path / "driver.log")
        experiment = storage / "fault"
        try:
            deadline = time.time() + 300
            victim = None
            while time.time() < deadline and victim is None:
                for name, rows in read_trial_results(experiment).items():
                    if rows and rows[-1]["node_id"] != head_id and 2 <= rows[-1]["epoch"] < 6:
                        victim = name
                assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
                time.sleep(0.3)
            assert victim, "no trial on the worker node reached epoch 2"
            os.kill(ray_cluster.raylet_pid("worker0"), 9)
            driver.wait(timeout=600)
        finally:
            stop_group(driver)
        log = (tmp_path / "driver.log").read_text()
        assert driver.returncode == 0, log[-5000:]
        rows = read_trial_results(experiment)[victim]
        epochs = [r["epoch"] for r in rows]
        restarted = [r for r in rows if r["start_epoch"] > 0]
        assert restarted, f"trial {victim} did not restart from a checkpoint: epochs {epochs}"
        assert restarted[0]["epoch"] == restarted[0]["start_epoch"] + 1 > 2  # counted on, not from 0
        assert restarted[0]["node_id"] == head_id
        assert epochs[-1] == 6
        best = json.loads((experiment / "best.json").read_text())
        assert best["errors"] == 0 and best["trials"] == 2
    finally:
        ray_cluster.stop()


def test_seed_ensemble_trains_one_configuration_per_seed_and_stops_each_at_its_epoch(search_data, tmp_path):
    storage = tmp_path / "results"
    args = ["--data", search_data, *_sets([
        "name=seeds", "unique_name=false", f"storage_path={storage}", "seeds=2", "stop_after_epochs=1",
        "ensemble=2", "max_concurrent=2", "cpus_per_trial=1", "train.epochs=3", "train.model.family=cnn",
        "train.model.image_size=64", "train.model.depth=2", "train.model.base_filters=8", "train.batch_size=32",
        "train.data.max_train_images=128", "train.data.max_val_images=64", "train.mixed_precision=float32",
        "train.seed=7"])]
    done = subprocess.run([sys.executable, "-m", "tuning.search", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"}, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 seeds of one configuration, no search" in done.stdout
    assert "optuna-dashboard" not in done.stdout  # no study to watch
    results = read_trial_results(storage / "seeds")
    assert sorted(len(rows) for rows in results.values()) == [1, 1]  # stopped after epoch 1 of the 3-epoch schedule
    configs = [json.loads(path.read_text()) for path in sorted((storage / "seeds").glob("*/params.json"))]
    assert sorted(config["seed"] for config in configs) == [7, 8]

    from tuning.ensemble import resolve_experiment

    directory, produced_by = resolve_experiment(str(storage / "seeds"), 2, log=lambda line: None)
    assert len(produced_by["ensemble"]) == 2
    seeds = {load_model_dir(member["checkpoint"].replace("~", str(Path.home()), 1))[1].config["seed"]
             for member in produced_by["ensemble"]}
    assert seeds == {7, 8}
    load_model_dir(directory)
