import csv
import json

import pytest

from tests.services import free_port

pytestmark = pytest.mark.slow


def test_main_job_tunes_evaluates_serves_and_answers_like_the_evaluation(tmp_path, monkeypatch):
    """`pneumonia run` in-process on generated films: tune (2 trials), evaluate, export, serve, query."""
    import ray
    from ray import serve

    from tests.conftest import write_split
    from tuning.main_job import run_main_job

    data = tmp_path / "data"
    write_split(data / "train", patients=16, seed=1)
    write_split(data / "test", patients=4, seed=2, offset=500)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    lines = []
    overrides = ["num_samples=2", "max_concurrent=2", "train.epochs=1", "grace_period=1", "space.families=[cnn]",
                 "space.cnn_image_sizes=[32]", "space.cnn_depth=[2,2]", "space.cnn_base_filters=[4]",
                 "points_to_evaluate=[]", f"storage_path={tmp_path / 'results'}", "train.data.max_train_images=0",
                 "train.mixed_precision=float32"]
    try:
        summary = run_main_job(None, None, str(data), overrides, port=free_port(), block=False, log=lines.append)
    finally:
        serve.shutdown()
        ray.shutdown()
    printed = "\n".join(lines)
    for label in ("experiment:", "best config:", "test metrics:", "report:", "endpoint:", "curl -X POST"):
        assert label in printed
    rows = {r["path"]: r for r in csv.DictReader(open(f"{summary['report_dir']}/predictions.csv"))}
    assert len(rows) == 16
    assert summary["answer"]["probability"] == pytest.approx(float(rows[summary["sample"]]["prob_pneumonia"]), abs=1e-5)
    metadata = json.loads((tmp_path / summary["package_dir"] / "metadata.json").read_text())
    assert summary["answer"]["model_version"] == metadata["version"]
