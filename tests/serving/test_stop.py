"""Stopping as a service manager does: SIGTERM to the process group of a serving `pneumonia serve` and of a
`pneumonia run` in its search; SIGTERM then SIGKILL, then the next server on the same port. Each process is
found by what marks it as this run's: its Ray session dir, its HAProxy config dir. Beside them, the Ray clusters
a workstation keeps: a `ray start --head` recorded where a bare ``ray.init()`` looks, and a killed head's record
left behind; without --address a `pneumonia` command starts a Ray of its own whatever the machine recorded."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from cli.main import main
from serving.http_proxy import free_port, our_haproxy
from serving.settings import is_loopback
from tests.services import BIN, LocalRayCluster, group_alive, stop_group

pytestmark = pytest.mark.slow
TINY = ["model.image_size=32", "model.depth=2", "model.base_filters=4", "model.dense_units=8", "batch_size=8",
        "mixed_precision=float32", "epochs=1"]


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    from tests.conftest import write_split

    root = tmp_path_factory.mktemp("stop")
    write_split(root / "data" / "train", patients=12, seed=1)
    write_split(root / "data" / "test", patients=4, seed=2, offset=500)
    assert main(["train", "--data", str(root / "data"), "--output", str(root / "model"),
                 *[a for s in TINY for a in ("--set", s)]]) == 0
    assert main(["evaluate", "--model", str(root / "model"), "--reports", str(root / "reports"),
                 "--artifacts", str(root / "artifacts"), "--ood-method", "none"]) == 0
    (pkg,) = (root / "artifacts").iterdir()
    return pkg, root / "data"


def _ray_processes(temp: Path) -> list[int]:
    """Live processes of the Ray whose temp dir is ``temp`` (their command lines name its session dir)."""
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        if process.info["status"] != psutil.STATUS_ZOMBIE and str(temp) in " ".join(process.info["cmdline"] or []):
            found.append(process.pid)
    return found


def _start(args: list[str], tmp_path: Path, name: str, temp: Path | None = None,
           env: dict | None = None) -> tuple[subprocess.Popen, Path, Path]:
    """`pneumonia ARGS` in its own process group; its Ray's default temp dir is ``temp``/ray (RAY_TMPDIR)."""
    temp = temp or Path(f"/tmp/rs-{os.getpid()}-{name}")  # short: Ray's socket paths must stay under 107 bytes
    log = tmp_path / f"{name}.log"
    env = {**os.environ, "RAY_TMPDIR": str(temp), "RAY_AUTH_MODE": "disabled", **(env or {})}
    process = subprocess.Popen([str(BIN / "pneumonia"), *args], cwd=tmp_path, env=env, stdout=open(log, "w"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    return process, temp, log


@pytest.fixture
def recorded_head(tmp_path):
    """A `ray start --head` of the test's own, under token auth, recorded in ROOT/ray/ray_current_cluster: where a
    bare ``ray.init()`` of a process with RAY_TMPDIR=ROOT looks, as /tmp/ray records a workstation's head."""
    root = Path(f"/tmp/rh-{os.getpid()}")
    head = LocalRayCluster(tmp_path, cpus=1, gpus=0, workers=0, temp_root=root, head_name="ray").start()
    try:
        yield head, root
    finally:
        head.stop()


def _listening(pid: int, session: Path, port: int) -> list[tuple[str, int, str]]:
    """(address, port, process) of every TCP socket a serving run listens on: the `pneumonia` process and its
    children, its Ray's processes (named by its session dir) and theirs (workers, agents), its HAProxy."""
    import psutil

    processes = {}
    for root in [pid, *_ray_processes(session), *(p.pid for p in our_haproxy(port))]:
        try:
            root = psutil.Process(root)
            processes.update({p.pid: p for p in [root, *root.children(recursive=True)]})
        except psutil.NoSuchProcess:  # a worker that came and went
            continue
    found = []
    for process in processes.values():
        try:
            name, sockets = process.name(), process.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        found += [(s.laddr.ip, s.laddr.port, f"{name} ({process.pid})") for s in sockets
                  if s.status == psutil.CONN_LISTEN]
    return sorted(found, key=lambda s: (s[2], s[1]))


# one method of each kind of Ray server (GCS, raylet, object manager, core worker, agent, Serve replica)
RAY_METHODS = ("/ray.rpc.NodeInfoGcsService/CheckAlive", "/ray.rpc.NodeManagerService/GetSystemConfig",
               "/ray.rpc.ObjectManagerService/Pull", "/ray.rpc.CoreWorkerService/NumPendingTasks",
               "/ray.rpc.ReporterService/HealthCheck", "/ray.serve.ASGIService/HandleRequest")


def _refuses_without_token(address: str, port: int) -> bool:
    """Whether what listens there is a gRPC server under Ray's token auth: called without the token, one of
    Ray's methods answers UNAUTHENTICATED (those it does not serve: UNIMPLEMENTED; an HTTP server: neither)."""
    import grpc

    host = "127.0.0.1" if address in ("0.0.0.0", "::") else f"[{address}]" if ":" in address else address
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        for method in RAY_METHODS:
            try:
                channel.unary_unary(method)(b"", timeout=10)
                return False  # answered without a token
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                    return True
                if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                    return False
    return False


def _check_listening(pid: int, session: Path, port: int) -> None:
    """Nothing of the run listens beyond 127.0.0.1 (the host asked for) but Ray's token-protected gRPC servers:
    Ray 2.60 binds a Serve replica's inter-deployment gRPC server to [::]. HAProxy's stats page and Prometheus
    exporter are on loopback (serving/haproxy_wrapper.py), as are the local Ray's Prometheus servers and agents
    (runtime.local_ray.loopback_node)."""
    sockets = _listening(pid, session, port)
    print("\n".join(f"listening {address}:{number}  {process}" for address, number, process in sockets))
    assert ("127.0.0.1", port) in {(address, number) for address, number, _ in sockets}  # the endpoint
    haproxy = [s for s in sockets if s[2].startswith("haproxy")]  # (a reload's old process may still hold them)
    assert len({number for _, number, _ in haproxy}) == 3, haproxy  # the endpoint, stats, metrics
    assert all(address == "127.0.0.1" for address, _, _ in haproxy), haproxy
    beyond = [s for s in sockets if not is_loopback(s[0])]
    unprotected = [s for s in beyond if not _refuses_without_token(s[0], s[1])]
    assert not unprotected, f"listening beyond 127.0.0.1 without Ray's token auth: {unprotected}"
    assert all(process.startswith("ray::ServeReplica") for _, _, process in beyond), beyond


def _serve_actors(cluster: LocalRayCluster) -> list[str]:
    return [a["class_name"] for a in cluster.actors() if "Serve" in a["class_name"] or "Classifier" in a["class_name"]]


def _wait(condition, what: str, process: subprocess.Popen, log: Path, timeout: float = 400.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, f"exited while waiting for {what}: {log.read_text()[-3000:]}"
        assert time.time() < deadline, f"no {what} after {timeout:.0f} s: {log.read_text()[-3000:]}"
        time.sleep(0.5)


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metadata", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def _stopped_cleanly(process: subprocess.Popen, temp: Path, port: int, log: Path) -> float:
    """SIGTERM to the group; returns seconds to exit; checks one stop line, no dumps, nothing left behind."""
    started = time.time()
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=120)
    seconds = time.time() - started
    deadline = time.time() + 60  # processes the run stopped may take a moment to be reaped
    while (_ray_processes(temp) or our_haproxy(port)) and time.time() < deadline:
        time.sleep(0.5)
    output = log.read_text()
    assert output.count("stopping (Ctrl-C again to stop at once)") == 1 and "stopped" in output, output[-3000:]
    assert "SIGTERM received" not in output and "Traceback" not in output, output[-3000:]
    assert not _ray_processes(temp) and not our_haproxy(port), "processes of the stopped run are still running"
    print(f"exited {seconds:.1f} s after SIGTERM")
    return seconds


def test_sigterm_stops_a_serving_pneumonia_serve_and_leaves_nothing(package, recorded_head, tmp_path):
    """With a live head recorded on the machine (whose token it holds, so joining would work), `pneumonia serve`
    without --address starts a Ray of its own, deploys nothing into the head's cluster, listens nowhere beyond
    127.0.0.1 but on Ray's token-protected ports, and its stop leaves that cluster running. Once the head is
    killed, --address auto (its record) and --address at it fail in seconds."""
    head, root = recorded_head
    token = {key: head.env[key] for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    head_session = (root / "ray" / "session_latest").resolve()
    port = free_port()
    process, _, log = _start(["serve", "--model", str(package[0]), "--port", str(port)], tmp_path, "serve",
                             temp=root, env=token)
    try:
        _wait(lambda: _healthy(port) and "serving until Ctrl-C" in log.read_text(), "endpoint", process, log)
        session = (root / "ray" / "session_latest").resolve()  # this run's Ray, beside the head's session
        assert session != head_session and _ray_processes(session) and our_haproxy(port)
        _check_listening(process.pid, session, port)
        assert not _serve_actors(head), "the application was deployed into the recorded cluster"
        assert process.returncode is None
        _stopped_cleanly(process, session, port, log)
        assert process.returncode == 130
    finally:
        stop_group(process)
    assert not _healthy(port) and len(head.alive_nodes()) == 1 and not _serve_actors(head)

    os.killpg(head.nodes["ray"].pid, signal.SIGKILL)  # a crashed head: its record stays behind
    head.nodes["ray"].wait(timeout=60)
    assert (root / "ray" / "ray_current_cluster").read_text().strip().endswith(f":{head.port}")  # (the node's IP)
    for address in ("auto", head.address):
        started = time.time()
        failed = subprocess.run([str(BIN / "pneumonia"), "serve", "--model", str(package[0]), "--port", str(port),
                                 "--address", address], env={**os.environ, "RAY_TMPDIR": str(root), **token},
                                capture_output=True, text=True, timeout=60)
        assert failed.returncode == 2, failed.stdout[-2000:] + failed.stderr[-2000:]
        assert failed.stderr.startswith("error: no Ray cluster answers at "), failed.stderr[-2000:]
        assert f":{head.port}" in failed.stderr.splitlines()[0]
        print(f"--address {address} at a killed head: exit 2 after {time.time() - started:.1f} s")


def test_sigterm_stops_pneumonia_run_in_its_search_and_leaves_nothing(package, tmp_path):
    port = free_port()
    sets = ["num_samples=4", "max_concurrent=2", "train.epochs=200", "grace_period=200", "space.families=[cnn]",
            "space.cnn.image_sizes=[32]", "space.cnn.depth=[2,2]", "space.cnn.base_filters=[4]",
            "points_to_evaluate=[]", f"storage_path={tmp_path / 'results'}", "train.mixed_precision=float32"]
    process, temp, log = _start(["run", "--data", str(package[1]), "--port", str(port),
                                 *[a for s in sets for a in ("--set", s)]], tmp_path, "run")
    try:
        _wait(lambda: " epoch 1/200" in log.read_text(), "a trial's first epoch", process, log)
        _stopped_cleanly(process, temp, port, log)
    finally:
        stop_group(process)


def test_after_sigterm_then_sigkill_the_next_server_on_that_port_comes_up(package, tmp_path):
    """As a service manager gives up: SIGTERM, then SIGKILL 2 s later (the 2 s are the scenario, not a wait
    for a condition). Whatever of the first server survives must not keep the port from the second."""
    port = free_port()
    # what a head killed with SIGKILL leaves where a bare ray.init() looks: its record, naming a dead address
    (Path(f"/tmp/rs-{os.getpid()}-first") / "ray").mkdir(parents=True, exist_ok=True)
    (Path(f"/tmp/rs-{os.getpid()}-first") / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
    first, temp, log = _start(["serve", "--model", str(package[0]), "--port", str(port)], tmp_path, "first")
    try:
        _wait(lambda: _healthy(port) and "serving until Ctrl-C" in log.read_text(), "first endpoint", first, log)
        os.killpg(first.pid, signal.SIGTERM)
        time.sleep(2)
        if group_alive(first.pid):
            os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        stop_group(first)
    second, temp2, log2 = _start(["serve", "--model", str(package[0]), "--port", str(port)], tmp_path, "second")
    try:
        _wait(lambda: _healthy(port) and "serving until Ctrl-C" in log2.read_text(), "second endpoint on the same port",
              second, log2)
        _stopped_cleanly(second, temp2, port, log2)
    finally:
        stop_group(second)
    deadline = time.time() + 60  # the first server's Ray went down with its killed driver
    while _ray_processes(temp) and time.time() < deadline:
        time.sleep(0.5)
    assert not _ray_processes(temp)
