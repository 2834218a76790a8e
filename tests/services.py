"""Real services on loopback for the tests: a multi-node Ray cluster and an S3 server (moto).

Each is started in its own process group and stopped by that group, never by a bare ``ray stop``.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serving.http_proxy import free_port

BIN = Path(sys.executable).parent


def system_binary(name: str, default: str, package: str) -> str:
    """The path of a system program a test needs (chromium, sshd). Missing, the test is skipped with the reason
    on a contributor's machine, and fails under ``CI=true``, where ``.ci/run`` installs it."""
    import pytest

    path = shutil.which(name) or default
    if not Path(path).exists():
        why = f"{name} is not installed ({package}; .ci/run installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    return path


def group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is in process group ``pgid``."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def stop_group(process: subprocess.Popen, timeout: float = 15.0) -> None:
    if process.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def stop_ray_node(pid: int, process: subprocess.Popen | None = None, timeout: float = 30.0) -> None:
    """Stop one `ray start --block` node, the leader of its process group, as `ray stop` would: SIGTERM to it
    alone, so it drains the node and stops the node's processes (~3 s); SIGTERM to the whole group kills the GCS
    first and leaves the head waiting 30 s on it. Whatever of the group is left after ``timeout`` gets SIGKILL."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.time() + timeout
    while group_alive(pid) and time.time() < deadline:
        if process is not None:
            process.poll()  # reap the leader: a zombie does not count as alive
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if process is not None:
        process.wait(timeout)


class LocalRayCluster:
    """``ray start --head`` plus worker nodes on one machine, each with its own temp dir, under token auth."""

    def __init__(self, root: Path, cpus: int = 1, gpus: int = 1, workers: int = 1, env: dict | None = None,
                 temp_root: Path | None = None, head_name: str = "head"):
        """Each node's temp dir is ``temp_root/NAME`` (the head's ``temp_root/head_name``), where ``ray start``
        also records the cluster (``ray_current_cluster``); ``temp_root`` defaults to a new short dir."""
        self.root = root
        self.head_name = head_name
        self.cpus, self.gpus, self.workers = cpus, gpus, workers
        self.port, self.dashboard_port = free_port(), free_port()
        token_path = root / "auth_token"
        token_path.write_text(secrets.token_hex(32))
        self.env = {**os.environ, **(env or {}), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path),
                    "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
        self.nodes: dict[str, subprocess.Popen] = {}
        # Ray's unix sockets live under each node's temp dir and must stay under 107 bytes: keep it short.
        self.temp_root = Path(temp_root or tempfile.mkdtemp(prefix="ray-", dir="/tmp"))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str], hidden: list[Path] = ()) -> None:
        temp = self.temp_root / name
        log = open(self.root / f"{name}.log", "w")
        command = [str(BIN / "ray"), "start", "--block", "--temp-dir", str(temp), "--num-cpus", str(self.cpus),
                   "--num-gpus", str(self.gpus), "--node-ip-address", "127.0.0.1",
                   # the default agent port (52365) may be held by another Ray on this machine; jobs need the head's
                   "--dashboard-agent-listen-port", str(free_port()), *args]
        if hidden:  # `exec`: the node stays the leader of its process group, stopped as the others are
            mounts = " && ".join(f"mount -t tmpfs tmpfs {shlex.quote(str(folder))}" for folder in hidden)
            command = ["unshare", "-m", "--propagation", "private", "sh", "-c", f"{mounts} && exec {shlex.join(command)}"]
        self.nodes[name] = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def start(self) -> LocalRayCluster:
        self._start(self.head_name, ["--head", "--port", str(self.port), "--dashboard-host", "127.0.0.1",
                             "--dashboard-port", str(self.dashboard_port), "--ray-client-server-port",
                             str(free_port() % 1000 + 20000), "--include-dashboard", "true"])
        self.wait_for_nodes(1)
        for i in range(self.workers):
            self.start_worker(f"worker{i}")
        self.wait_for_nodes(1 + self.workers)
        return self

    def start_worker(self, name: str, hidden: list[Path] = ()) -> None:
        """A worker node; with ``hidden``, in a mount namespace of its own with an empty tmpfs over each of those
        folders, as a pod or another machine sees the head's disk: its processes cannot read what lies there."""
        self._start(name, ["--address", self.address], hidden)

    def list_nodes(self) -> list[dict]:
        out = subprocess.run([str(BIN / "ray"), "list", "nodes", "--address", self.dashboard, "--format", "json",
                              "--detail"], env=self.env, capture_output=True, text=True, timeout=60)
        try:
            return json.loads(out.stdout) if out.returncode == 0 else []
        except json.JSONDecodeError:  # "No resource in the cluster" while nodes register
            return []

    def actors(self) -> list[dict]:
        """Every actor the cluster has seen (``ray list actors``), alive or dead."""
        out = subprocess.run([str(BIN / "ray"), "list", "actors", "--address", self.dashboard, "--format", "json",
                              "--limit", "1000"], env=self.env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        return [] if out.stdout.startswith("No resource") else json.loads(out.stdout)

    def alive_nodes(self) -> list[dict]:
        return [n for n in self.list_nodes() if n.get("state") == "ALIVE"]

    def wait_for_nodes(self, n: int, timeout: float = 120.0) -> list[dict]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, process in self.nodes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"ray node {name} exited: {(self.root / f'{name}.log').read_text()[-3000:]}")
            nodes = self.alive_nodes()
            if len(nodes) >= n:
                return nodes
            time.sleep(1)
        raise TimeoutError(f"{n} Ray nodes not alive after {timeout} s")

    def raylet_pid(self, name: str) -> int:
        """The raylet of node ``name`` (found by its temp dir on the command line)."""
        marker = str(self.temp_root / name)
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "/raylet" in cmdline.split(" ")[0] and marker in cmdline:
                return int(proc.name)
        raise LookupError(f"no raylet for {name}")

    def submit_job(self, entrypoint: list[str], options: list[str] = (), timeout: float = 1200.0,
                   agent_wait: float = 300.0) -> subprocess.CompletedProcess:
        """``ray job submit --address DASHBOARD [options] -- entrypoint``, waiting until the head's job agent
        is up (it registers a while after the node is alive, longer on a busy machine)."""
        deadline = time.time() + agent_wait
        while True:
            job = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", self.dashboard, *options, "--",
                                  *entrypoint], env=self.env, capture_output=True, text=True, timeout=timeout)
            if "No available agent to submit job" not in job.stdout + job.stderr or time.time() > deadline:
                return job
            time.sleep(3)

    def stop(self) -> None:
        for process in reversed(list(self.nodes.values())):
            stop_ray_node(process.pid, process)
        shutil.rmtree(self.temp_root, ignore_errors=True)


class MotoS3:
    """An S3-compatible server on loopback (moto_server) with one bucket."""

    def __init__(self, root: Path, bucket: str = "pneumonia-test"):
        self.port = free_port()
        self.bucket = bucket
        self.env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                    "AWS_DEFAULT_REGION": "us-east-1"}
        self.log = open(root / "moto.log", "w")
        self.process = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def uri(self, path: str) -> str:
        return f"s3://{self.bucket}/{path}?endpoint_override=127.0.0.1:{self.port}&scheme=http"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def start(self) -> MotoS3:
        deadline = time.time() + 60
        while True:
            try:
                self.client().create_bucket(Bucket=self.bucket)
                return self
            except Exception:
                if time.time() > deadline or self.process.poll() is not None:
                    raise
                time.sleep(0.5)

    def keys(self) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def stop(self) -> None:
        stop_group(self.process)
