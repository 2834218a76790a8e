import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.services import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]

# The job runs in its own process, as `pneumonia run` does, with its own in-process Ray (stopped at the end).
SCRIPT = """
import json, sys
import ray
from ray import serve
from tuning.main_job import run_main_job
data, storage, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
overrides = ["num_samples=2", "max_concurrent=2", "train.epochs=1", "grace_period=1", "space.families=[cnn]",
             "space.cnn_image_sizes=[32]", "space.cnn_depth=[2,2]", "space.cnn_base_filters=[4]",
             "points_to_evaluate=[]", f"storage_path={storage}", "train.data.max_train_images=0",
             "train.mixed_precision=float32"]
try:
    summary = run_main_job(None, None, data, overrides, port=port, block=False)
finally:
    serve.shutdown()
    ray.shutdown()
print("SUMMARY " + json.dumps(summary, default=str))
"""


def test_main_job_tunes_evaluates_serves_and_answers_like_the_evaluation(tmp_path):
    """`pneumonia run` on generated films: tune (2 trials), evaluate, export, serve, query once."""
    from tests.conftest import write_split

    data = tmp_path / "data"
    write_split(data / "train", patients=16, seed=1)
    write_split(data / "test", patients=4, seed=2, offset=500)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(data), str(tmp_path / "results"), str(free_port())],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    printed = result.stdout
    for label in ("experiment:", "best config:", "test metrics:", "report:", "endpoint:", "curl -X POST"):
        assert label in printed
    summary = json.loads(next(line for line in printed.splitlines() if line.startswith("SUMMARY "))[8:])
    rows = {r["path"]: r for r in csv.DictReader(open(tmp_path / summary["report_dir"] / "predictions.csv"))}
    assert len(rows) == 16
    assert summary["answer"]["probability"] == pytest.approx(float(rows[summary["sample"]]["prob_pneumonia"]), abs=1e-5)
    metadata = json.loads((tmp_path / summary["package_dir"] / "metadata.json").read_text())
    assert summary["answer"]["model_version"] == metadata["version"]
