"""`ray up` + `ray submit` with the cluster launcher's `local` provider over SSH to an sshd on loopback.

Ray has no ssh_port setting, so the sshd listens on 127.0.0.1:22; it is this test's own sshd (own config,
host key, authorized key), started in its own process group and stopped by it. `ray down` is not used: it
runs a bare `ray stop`, which would stop every Ray process on the machine; the head is stopped by its group.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sysconfig
import time
from pathlib import Path

import pytest
import yaml

from serving.http_proxy import free_port
from tests.conftest import REAL_DATA, write_split
from tests.services import BIN, group_alive, stop_group, stop_ray_node, system_binary

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def sshd(tmp_path):
    sshd_bin = system_binary("sshd", "/usr/sbin/sshd", "openssh-server")
    assert not _port_open(22), "something else already listens on 127.0.0.1:22"
    root = tmp_path / "ssh"
    root.mkdir()
    for name in ("client_key", "host_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)], check=True)
    (root / "authorized_keys").write_text((root / "client_key.pub").read_text())
    token = tmp_path / "auth_token"
    token.write_text(os.urandom(32).hex())
    # The login shell's python is not the virtual environment's: give it the project and its packages.
    python_path = f"{REPO}:{sysconfig.get_paths()['purelib']}"
    (root / "sshd_config").write_text(
        "ListenAddress 127.0.0.1\nPort 22\n"
        f"HostKey {root / 'host_key'}\nAuthorizedKeysFile {root / 'authorized_keys'}\nPidFile {root / 'sshd.pid'}\n"
        "StrictModes no\nUsePAM no\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        f"SetEnv PYTHONPATH={python_path} RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={token}\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)
    process = subprocess.Popen([sshd_bin, "-D", "-e", "-f", str(root / "sshd_config")],
                               stdout=open(root / "sshd.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 30
    while not _port_open(22):
        assert process.poll() is None and time.time() < deadline, (root / "sshd.log").read_text()
        time.sleep(0.2)
    try:
        yield root / "client_key", token
    finally:
        stop_group(process)


def test_ray_up_and_ray_submit_a_tiny_search(sshd, tmp_path):
    key, token = sshd
    name = f"pneumonia-submit-{os.getpid()}"
    port, dashboard = free_port(), free_port()
    temp = Path(f"/tmp/rs-{os.getpid()}")
    pgid_file = tmp_path / "head.pgid"
    env_prefix = f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={token}"
    launcher = {
        "cluster_name": name,
        "provider": {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []},
        "auth": {"ssh_user": "root", "ssh_private_key": str(key)},
        "min_workers": 0,
        "max_workers": 0,
        "head_start_ray_commands": [
            (f"{env_prefix} setsid {BIN / 'ray'} start --head --block --port {port} --dashboard-port {dashboard} "
             f"--dashboard-host 127.0.0.1 --temp-dir {temp} --num-cpus 2 --ray-client-server-port 20401 "
             f"> {tmp_path / 'head.log'} 2>&1 < /dev/null & echo $! > {pgid_file}"),
            f"until {env_prefix} {BIN / 'ray'} status --address 127.0.0.1:{port} > /dev/null 2>&1; do sleep 1; done",
        ],
        "worker_start_ray_commands": [],
    }
    config_path = tmp_path / "local-cluster.yaml"
    config_path.write_text(yaml.safe_dump(launcher))
    if REAL_DATA:
        data = str(Path(REAL_DATA).resolve())
    else:
        data = str(tmp_path / "generated")
        write_split(Path(data) / "train", patients=20, size=64, seed=1)
        write_split(Path(data) / "test", patients=3, size=64, seed=2, offset=900)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    home = Path.home()
    created = [home / "ray_bootstrap_config.yaml", home / "ray_bootstrap_key.pem", home / "search.py"]
    try:
        up = subprocess.run([str(BIN / "ray"), "up", "-y", "--no-config-cache", str(config_path)], env=env,
                            capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        storage = tmp_path / "results"
        sets = ["num_samples=2", "max_concurrent=2", "train.epochs=1", "grace_period=1", "space.families=[cnn]",
                "space.cnn.image_sizes=[64]", "space.cnn.depth=[2,3]", "space.cnn.base_filters=[8]",
                "train.data.max_train_images=96", "train.data.max_val_images=64", "points_to_evaluate=[]",
                f"storage_path={storage}", "name=submitted", "unique_name=false", "train.mixed_precision=float32"]
        submit = subprocess.run(
            [str(BIN / "ray"), "submit", str(config_path), str(REPO / "tuning" / "search.py"), "--",
             "--address", f"127.0.0.1:{port}", "--data", data, *[a for s in sets for a in ("--set", s)]],
            env=env, capture_output=True, text=True, timeout=900)
        assert submit.returncode == 0, submit.stdout[-5000:] + submit.stderr[-3000:]
        best = json.loads((storage / "submitted" / "best.json").read_text())
        assert best["trials"] == 2 and best["errors"] == 0 and best["family"] == "cnn"
    finally:
        pgid = int(pgid_file.read_text()) if pgid_file.exists() else None
        if pgid:
            stop_ray_node(pgid)
        for path in created:
            path.unlink(missing_ok=True)
        for path in Path("/tmp/ray").glob(f"cluster-{name}*"):
            path.unlink(missing_ok=True)
        shutil.rmtree(temp, ignore_errors=True)
    assert pgid and not group_alive(pgid)
