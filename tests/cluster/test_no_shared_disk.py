"""A two-node Ray whose worker node cannot see the driver's disk (its own mount namespace, an empty tmpfs over the
folder that holds the packages), as a KubeRay pod or a launcher node sees the head's: a replica on either node
must load the package, shipped with the deployment or fetched from S3, and answer as the offline evaluation did."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cli.main import main
from serving.http_proxy import free_port
from tests.numerics import PROBABILITY_ABS
from tests.services import BIN, LocalRayCluster, MotoS3, stop_group

pytestmark = pytest.mark.slow
TOKEN = "no-shared-disk-token"
TINY = ["model.image_size=32", "model.depth=2", "model.base_filters=4", "model.dense_units=8", "batch_size=8",
        "mixed_precision=float32", "epochs=1"]


def _wait_for(condition, what: str, timeout: float = 300):
    deadline = time.time() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.time() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(1)


def _post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/predict", data=body, method="POST", headers={
        "Content-Type": "image/jpeg", "Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, {}
    except OSError:
        return 0, {}


def _replica_nodes(cluster: LocalRayCluster) -> list[str]:
    """The nodes of the alive replicas of the classifier."""
    return sorted(actor["node_id"] for actor in cluster.actors()
                  if actor["state"] == "ALIVE" and "Classifier" in (actor.get("class_name") or ""))


def _answers(url: str, films: list[dict], rounds: int = 3) -> list[tuple[dict, dict]]:
    """Each film sent ``rounds`` times (Serve spreads them over both replicas): (row, answer) for each."""
    answers = []
    for _ in range(rounds):
        for row in films:
            status, body = _post(url, Path(row["path"]).read_bytes())
            assert status == 200, (status, body)
            answers.append((row, body))
    return answers


def _serve(cluster: LocalRayCluster, package: str, port: int, log: Path) -> subprocess.Popen:
    """`pneumonia serve --model PACKAGE --address HEAD --replicas 2`, as a user joins a cluster."""
    env = {**cluster.env, "PNEUMONIA_API_TOKEN": TOKEN}
    with open(log, "w") as out:  # the child keeps its own copy of the file
        return subprocess.Popen([str(BIN / "pneumonia"), "serve", "--model", package, "--address", cluster.address,
                                 "--replicas", "2", "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _deploy(cluster: LocalRayCluster, port: int, package: str, swap_to: str | None = None) -> str:
    """`serve deploy` of the app for ``package`` (its args, as on KubeRay), and with ``swap_to`` the deployment's
    user_config naming another package: a light update that each replica loads in place. Returns serve's output."""
    deployment = f"""
    deployments:
      - name: Classifier
        user_config: {{package: "{swap_to}"}}""" if swap_to else ""
    config = Path(cluster.root) / "serve.yaml"
    config.write_text(f"""
proxy_location: EveryNode
http_options: {{host: 127.0.0.1, port: {port}}}
applications:
  - name: pneumonia
    route_prefix: /
    import_path: serving.app:build_app
    args: {{package: "{package}", replicas: 2, auth_token: {TOKEN}}}{deployment}
""")
    deployed = subprocess.run([str(BIN / "serve"), "deploy", str(config), "-a", cluster.dashboard], env=cluster.env,
                              capture_output=True, text=True, timeout=300, check=False)
    assert deployed.returncode == 0, deployed.stdout[-2000:] + deployed.stderr[-2000:]
    return deployed.stdout + deployed.stderr


def _metadata(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/metadata", timeout=60) as response:
        return json.loads(response.read())


def test_replicas_on_a_node_that_shares_no_disk_serve_a_local_and_a_stored_package(tmp_path, monkeypatch):
    from models.package_store import publish
    from tests.conftest import write_split

    # a tiny model, evaluated: its package and what the evaluation predicted for each test film
    data = tmp_path / "data"
    write_split(data / "train", patients=12, seed=1)
    write_split(data / "test", patients=4, seed=2, offset=500)
    hidden = tmp_path / "hidden"  # the folder the worker node cannot see
    assert main(["train", "--data", str(data), "--output", str(tmp_path / "model"),
                 *[a for s in TINY for a in ("--set", s)]]) == 0
    for name in ("first", "second"):
        assert main(["evaluate", "--model", str(tmp_path / "model"), "--data", str(data), "--name", name,
                     "--reports", str(tmp_path / "reports"), "--artifacts", str(hidden / name),
                     "--ood-method", "none", "--no-film-checks", "--no-calibration", "--no-stability"]) == 0
    (first,), (second,) = (hidden / "first").iterdir(), (hidden / "second").iterdir()
    with open(tmp_path / "reports" / "first" / "predictions.csv", newline="") as f:
        films = list(csv.DictReader(f))[:4]

    s3 = MotoS3(tmp_path).start()
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    # each node's package cache lies under the hidden folder too: the worker node makes its own copy
    cluster = LocalRayCluster(tmp_path, cpus=1, gpus=0, workers=0, env={**s3.env, "PNEUMONIA_CACHE": str(hidden / "cache")})
    server = None
    try:
        cluster.start()
        cluster.start_worker("worker0", hidden=[hidden])
        cluster.wait_for_nodes(2)
        nodes = {node["node_id"] for node in cluster.alive_nodes()}
        port = free_port()
        url = f"http://127.0.0.1:{port}"

        def serves(package: str, version: str) -> None:
            """Two replicas, one per node, each loaded ``version``; every answer is the offline one."""
            _wait_for(lambda: len(alive := _replica_nodes(cluster)) == 2 and set(alive) == nodes,
                      "two replicas, one on each node")
            film = Path(films[0]["path"]).read_bytes()
            _wait_for(lambda: all(_post(url, film)[1].get("model_version") == version for _ in range(8)),
                      f"answers from {version} alone")
            for row, answer in _answers(url, films):
                assert answer["model_version"] == version, answer
                assert answer["probability"] == pytest.approx(float(row["prob_pneumonia"]), abs=PROBABILITY_ABS)

        # a local package, shipped with the deployment through Ray's runtime_env
        server = _serve(cluster, str(first), port, tmp_path / "serve-local.log")
        serves(str(first), first.name)
        stop_group(server, timeout=120)
        _wait_for(lambda: not _replica_nodes(cluster), "the application removed")

        # the same model published to S3; the replicas fetch it into their node's cache
        uri = publish(first, s3.uri("results"))
        assert uri == s3.uri(f"results/packages/{first.name}")
        server = _serve(cluster, uri, port, tmp_path / "serve-s3.log")
        serves(uri, first.name)
        stop_group(server, timeout=120)  # it deletes its application, the cluster stays
        server = None
        _wait_for(lambda: not _replica_nodes(cluster), "the application removed")

        # as on KubeRay: `serve deploy` of a config whose args name the package in S3
        _deploy(cluster, port, uri)
        serves(uri, first.name)
        # a live swap (the deployment's user_config) to another published package reaches both nodes
        second_uri = publish(second, s3.uri("results"))
        _deploy(cluster, port, uri, swap_to=second_uri)
        serves(uri, second.name)
        # a swap to a package that is not there leaves the old one answering, on both nodes, and says why
        missing = s3.uri("results/packages/cnn-missing-20990101000000")
        _deploy(cluster, port, uri, swap_to=missing)
        _wait_for(lambda: all("cnn-missing-20990101000000" in (_metadata(url).get("swap_error") or "")
                              for _ in range(8)), "the failed swap in /metadata of both replicas")
        assert "not found" in _metadata(url)["swap_error"]
        for _, answer in _answers(url, films, rounds=2):
            assert answer["model_version"] == second.name
        assert sorted(set(_replica_nodes(cluster))) == sorted(nodes)
    finally:
        if server is not None:
            stop_group(server, timeout=120)
        cluster.stop()
        s3.stop()
        shutil.rmtree(hidden, ignore_errors=True)
