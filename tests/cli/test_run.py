"""``pneumonia run`` end to end: search, one evaluation on test, export, Serve, and the answers it serves."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serving.http_proxy import free_port
from tests.numerics import PROBABILITY_ABS

REPO = Path(__file__).resolve().parents[2]

# The job runs in its own process, as `pneumonia run` does, with its own in-process Ray (stopped at the end).
SCRIPT = """
import json, sys
import ray
from ray import serve
from cli.run import run_end_to_end
data, storage, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
overrides = ["num_samples=2", "max_concurrent=2", "train.epochs=1", "grace_period=1", "space.families=[cnn]",
             "space.cnn.image_sizes=[32]", "space.cnn.depth=[2,2]", "space.cnn.base_filters=[4]",
             "points_to_evaluate=[]", f"storage_path={storage}", "train.data.max_train_images=0",
             "train.mixed_precision=float32", "ensemble=2"]
try:
    summary = run_end_to_end(None, None, data, overrides, port=port, block=False)
finally:
    serve.shutdown()
    ray.shutdown()
print("SUMMARY " + json.dumps(summary, default=str))
"""


@pytest.mark.slow
def test_end_to_end_job_tunes_evaluates_serves_and_answers_like_the_evaluation(tmp_path):
    """`pneumonia run` on generated films: tune (2 trials), evaluate the ensemble of both, export, serve, query once."""
    from tests.conftest import write_split

    data = tmp_path / "data"
    write_split(data / "train", patients=16, seed=1)
    write_split(data / "test", patients=4, seed=2, offset=500)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(data), str(tmp_path / "results"), str(free_port())],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    printed = result.stdout
    for label in ("== pneumonia run: done ==", "\nexperiment   ", "\nmodel        the mean of 2 trials",
                  "\ntest split   ", "95 % CI", "\nreport       ", "\nendpoint     ", "curl -X POST"):
        assert label in printed, label
    assert "(train_trial pid=" not in printed and "cuInit" not in result.stderr  # no worker or TF start-up noise
    summary = json.loads(next(line for line in printed.splitlines() if line.startswith("SUMMARY "))[8:])
    rows = {r["path"]: r for r in csv.DictReader(open(tmp_path / summary["report_dir"] / "predictions.csv"))}
    assert len(rows) == 16
    expected = float(rows[summary["sample"]]["prob_pneumonia"])
    assert summary["answer"]["probability"] == pytest.approx(expected, abs=PROBABILITY_ABS)
    metadata = json.loads((tmp_path / summary["package_dir"] / "metadata.json").read_text())
    assert summary["answer"]["model_version"] == metadata["version"]
    members = [m["trial_id"] for m in metadata["ensemble"]]
    assert len(set(members)) == 2 and Path(summary["report_dir"]).name == f"ensemble2-{members[0]}"
    card = (tmp_path / summary["report_dir"] / "report.md").read_text()
    assert f"Produced by: trial `{members[0]}` of the tuning experiment" in card and "validation AUC" in card


@pytest.mark.slow
def test_job_submitted_to_a_cluster_serves_what_the_evaluation_predicted(real_data, tmp_path):
    """The main job on the shared data, as a user submits it: `ray job submit -- pneumonia run` to a local
    cluster (tiny budget: 2 trials, 1 epoch, 64/75 px, a subset of train; full validation and test splits),
    then real test films over HTTP must get the probabilities the evaluation wrote to predictions.csv."""
    import shlex
    import urllib.request

    from tests.services import BIN, LocalRayCluster

    cluster = LocalRayCluster(tmp_path, cpus=2, gpus=0, workers=0).start()
    try:
        port = free_port()
        sets = ["num_samples=2", "max_concurrent=2", "train.epochs=1", "grace_period=1",
                "space.cnn.image_sizes=[64]", "space.inception.image_sizes=[75]", "space.cnn.depth=[3,4]",
                "points_to_evaluate=[{model.family: cnn}, {model.family: inception}]",
                "train.data.max_train_images=600", "train.mixed_precision=float32", f"storage_path={tmp_path}/results"]
        command = [str(BIN / "pneumonia"), "run", "--data", str(real_data.resolve()), "--port", str(port),
                   *[arg for s in sets for arg in ("--set", s)]]
        entrypoint = f"cd {shlex.quote(str(tmp_path))} && {shlex.join(command)}"
        job = cluster.submit_job(["bash", "-c", entrypoint])
        output = job.stdout + job.stderr
        assert job.returncode == 0, output[-5000:]
        assert "succeeded" in output.lower() and "curl -X POST" in output

        (predictions,) = (tmp_path / "reports").glob("*/predictions.csv")
        rows = list(csv.DictReader(open(predictions)))
        assert len(rows) == 624  # the whole test split, predicted once
        (package,) = (tmp_path / "artifacts").iterdir()
        version = json.loads((package / "metadata.json").read_text())["version"]
        queried = [r for r in rows if "NORMAL" in r["path"]][:4] + [r for r in rows if "PNEUMONIA" in r["path"]][:4]
        for row in queried:  # the job has ended; its Serve application lives on in the cluster
            film = tmp_path / row["path"]  # paths in a report are relative to the job's working directory
            request = urllib.request.Request(f"http://127.0.0.1:{port}/predict", data=film.read_bytes(),
                                             headers={"Content-Type": "image/jpeg"})
            answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
            assert answer["model_version"] == version
            expected = float(row["prob_pneumonia"])
            assert answer["probability"] == pytest.approx(expected, abs=PROBABILITY_ABS), row["path"]
    finally:
        cluster.stop()


@pytest.mark.parametrize("layout", ["missing", "empty"])
def test_run_with_a_wrong_data_path_fails_fast_with_what_was_expected(tmp_path, capsys, layout):
    from cli.main import main

    data = tmp_path / "data"
    if layout == "empty":
        data.mkdir()
    assert main(["run", "--data", str(data)]) == 2
    error = capsys.readouterr().err
    assert str(data) in error and "expected DIR/train/{NORMAL,PNEUMONIA}" in error
