"""Choosing Serve's HTTP ingress before a local Ray starts, HAProxy's stats and metrics on loopback and the
endpoint's queue bounded in HAProxy, and the refusal of an endpoint beyond loopback without a token."""

import json
import os
import re
import signal
import subprocess

import pytest

import serving.http_proxy
from cli.main import main
from runtime.config import ConfigError
from serving.haproxy_wrapper import QUEUE_ENV, REAL_BINARY_ENV, loopback_config, rewrite, write_wrapper
from serving.http_proxy import HAPROXY_ENV, HAPROXY_PATHS, HAPROXY_PORTS, PROXY_PATIENCE_ENV, set_ingress_environment
from serving.settings import TOKEN_ENV, ServeSettings, ServeSettingsError, haproxy_queue


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No RAY_SERVE_* settings, and whatever the test sets removed after it; HAProxy's directories under tmp_path."""
    monkeypatch.setattr(serving.http_proxy, "HAPROXY_ROOT", str(tmp_path / "pneumonia-haproxy"))
    for key in [*HAPROXY_ENV, *HAPROXY_PORTS, *HAPROXY_PATHS, *PROXY_PATIENCE_ENV, "RAY_SERVE_HAPROXY_BINARY_PATH",
                REAL_BINARY_ENV, QUEUE_ENV]:
        monkeypatch.setenv(key, "")  # records the value before the test (or its absence), restored after it
        monkeypatch.delenv(key)
    return monkeypatch


def test_ray_serve_bundles_an_haproxy_binary(clean_env):
    binary = serving.http_proxy.haproxy_binary()
    assert binary and os.access(binary, os.X_OK)


def test_auto_picks_haproxy_only_when_there_is_a_binary(clean_env, tmp_path):
    clean_env.setattr(serving.http_proxy, "haproxy_binary", lambda: None)
    assert set_ingress_environment("auto") == "python"
    assert not any(key in os.environ for key in HAPROXY_ENV)
    clean_env.setattr(serving.http_proxy, "haproxy_binary", lambda: str(tmp_path / "haproxy"))
    assert set_ingress_environment("auto", 8000) == "haproxy"
    assert all(os.environ[key] == "1" for key in HAPROXY_ENV)
    # Ray runs the loopback wrapper in the port's own directory; it execs the binary found before
    assert os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"] == f"{tmp_path}/pneumonia-haproxy/8000/haproxy-loopback"
    assert os.access(os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"], os.X_OK)
    assert os.environ[REAL_BINARY_ENV] == str(tmp_path / "haproxy")
    stats, metrics = (int(os.environ[key]) for key in HAPROXY_PORTS)  # free ports, not Ray's fixed defaults
    assert stats != metrics and 8404 not in (stats, metrics)
    assert set_ingress_environment("python") == "python"  # and back: the settings are removed
    assert not any(key in os.environ for key in [*HAPROXY_ENV, "RAY_SERVE_HAPROXY_BINARY_PATH"])


@pytest.mark.parametrize("ingress", ["python", "haproxy"])
def test_either_ingress_gives_the_proxy_time_to_start_on_a_busy_machine_unless_the_operator_set_it(clean_env, ingress):
    clean_env.setenv("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "7")
    set_ingress_environment(ingress, 8000)
    # Serve's own default is 5 s from the actor's creation: too short beside a busy training run (issue 23)
    assert float(os.environ["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"]) >= 60
    assert os.environ["RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"] == "7"


def test_asking_for_haproxy_without_a_binary_says_how_to_get_one(clean_env, capsys):
    clean_env.setattr(serving.http_proxy, "haproxy_binary", lambda: None)
    with pytest.raises(ConfigError, match="apt install haproxy"):
        set_ingress_environment("haproxy")
    with pytest.raises(ConfigError, match="ingress must be one of"):
        set_ingress_environment("nginx")
    with pytest.raises(SystemExit):
        main(["serve", "--model", "x", "--ingress", "nginx"])
    assert "invalid choice: 'nginx'" in capsys.readouterr().err


def test_the_haproxy_behind_the_wrapper_is_the_real_one(clean_env, tmp_path):
    real = serving.http_proxy.haproxy_binary()
    set_ingress_environment("haproxy", 8000)
    assert serving.http_proxy.haproxy_binary() == real == os.environ[REAL_BINARY_ENV]  # never the wrapper itself
    set_ingress_environment("haproxy", 8000)  # a second call (pneumonia run, then its serve) keeps it
    assert os.environ[REAL_BINARY_ENV] == real


def _rays_template_sections() -> str:
    """Ray's HAProxy template with its ports filled in (the lines this project rewrites are literal there)."""
    from ray.serve._private.haproxy_templates import HAPROXY_CONFIG_TEMPLATE

    return (HAPROXY_CONFIG_TEMPLATE.replace("{{ config.stats_port }}", "8404")
            .replace("{{ config.metrics_port }}", "9101"))


def test_the_stats_and_metrics_binds_of_rays_template_go_to_loopback_and_nothing_else_changes():
    template = _rays_template_sections()
    assert "bind *:8404" in template and "bind :9101" in template  # Ray 2.60: all interfaces
    rewritten = loopback_config(template)
    changed = [(a, b) for a, b in zip(template.splitlines(), rewritten.splitlines()) if a != b]
    assert changed == [("    bind :9101", "    bind 127.0.0.1:9101"), ("  bind *:8404", "  bind 127.0.0.1:8404")]
    assert loopback_config(rewritten) == rewritten  # a reload rewrites an already rewritten file the same way


def test_the_wrapper_rewrites_the_config_in_place_then_runs_haproxy_and_refuses_a_config_it_cannot_fix(tmp_path):
    config = tmp_path / "node" / "haproxy.cfg"
    config.parent.mkdir()
    config.write_text("global\n    maxconn 10\nfrontend prometheus\n    bind :9101\n    mode http\n"
                      "frontend http_frontend\n    bind 0.0.0.0:8000\nlisten stats\n  bind *:8404\n  stats enable\n")
    wrapper = write_wrapper(tmp_path)
    env = {**os.environ, REAL_BINARY_ENV: "/bin/echo"}  # stands in for HAProxy: prints the arguments it got
    ran = subprocess.run([wrapper, "-db", "-f", str(config), "-sf", "123"], env=env, capture_output=True, text=True,
                         check=False, timeout=60)
    assert ran.returncode == 0 and ran.stdout.strip() == f"-db -f {config} -sf 123", ran.stderr  # Ray's arguments
    text = config.read_text()
    assert "bind 127.0.0.1:9101" in text and "bind 127.0.0.1:8404" in text
    assert "bind 0.0.0.0:8000" in text  # the endpoint's own host is Serve's http_options, not ours to change
    config.write_text("global\nlisten stats\n  stats enable\n")  # no bind line to fix: HAProxy is not started
    refused = subprocess.run([wrapper, "-db", "-f", str(config)], env=env, capture_output=True, text=True, timeout=60,
                             check=False)
    assert refused.returncode == 1 and not refused.stdout
    assert "not starting HAProxy" in refused.stderr and "no `bind ADDRESS:PORT` line found" in refused.stderr


def _rays_config(tmp_path, apps: dict[str, int]) -> str:
    """The config Ray 2.60's own code writes for HTTP applications {name: replicas} on one node."""
    from ray.serve._private.haproxy import BackendConfig, HAProxyApi, HAProxyConfig, ServerConfig

    backends = {app: BackendConfig(name=f"http-{app}", path_prefix=f"/{app}", app_name=app,
                                   servers=[ServerConfig(name=f"SERVE_REPLICA_{app}-Classifier-{i}", host="127.0.0.1",
                                                         port=30000 + 10 * n + i) for i in range(replicas)])
                for n, (app, replicas) in enumerate(apps.items())}
    config = tmp_path / "haproxy.cfg"
    HAProxyApi(HAProxyConfig(), backends, config_file_path=str(config))._generate_config_file_internal()
    return config.read_text()


@pytest.mark.services
def test_haproxy_keeps_the_bound_of_the_applications_given_it_and_its_config_stays_valid(clean_env, tmp_path):
    """`pneumonia serve`'s queue in HAProxy: at most max_ongoing requests in each replica, a waiting-time budget, a
    length guard per replica, the rest 503 with Retry-After from HAProxy itself; an application not named keeps
    Ray's config; HAProxy accepts the result."""
    text = _rays_config(tmp_path, {"pneumonia": 2, "other": 1})
    bounded = rewrite(text, f"{haproxy_queue('pneumonia', 64, 512, 1.5, 400, 32)};absent=1,1,1,0,1")
    assert rewrite(bounded, haproxy_queue("pneumonia", 64, 512, 1.5, 400, 32)) == bounded  # a reload of the same file
    servers = {line.split()[1]: line for line in bounded.splitlines() if line.strip().startswith("server ")}
    assert [name for name, line in servers.items() if line.endswith(" maxconn 64")] == [
        "SERVE_REPLICA_pneumonia-Classifier-0", "SERVE_REPLICA_pneumonia-Classifier-1"]
    assert "maxconn" not in servers["SERVE_REPLICA_other-Classifier-0"]
    backend = bounded.split("backend http-pneumonia\n")[1].split("\nbackend ")[0]
    assert "    timeout queue 400ms" in backend.splitlines()
    rules = [line.strip() for line in backend.splitlines() if "http-request return status 503" in line]
    assert rules[0].endswith("hdr Retry-After 2 if { queue,sub(txn.pneumonia_depth) ge 0 }")  # would wait too long
    assert rules[1].endswith("hdr Retry-After 2 if { queue ge 1024 }")  # the memory guard: 2 replicas x 512
    assert backend.count("srv_sess_rate(http-pneumonia/SERVE_REPLICA_pneumonia-Classifier-") == 2  # the drain rate
    assert "int(64) if" in backend  # never assumed below a batch per replica
    assert "timeout queue" not in bounded.split("backend http-other\n")[1]
    config = tmp_path / "bounded.cfg"
    config.write_text(bounded)
    checked = subprocess.run([serving.http_proxy.haproxy_binary(), "-c", "-f", str(config)], capture_output=True,
                             text=True, timeout=60, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert rewrite(text, None) == loopback_config(text)  # an unbounded endpoint: HAProxy bounds nothing
    count_only = rewrite(text, haproxy_queue("pneumonia", 2, 1, 1, 0, 2))  # no time bound: a count, as before
    assert "timeout queue" not in count_only and "if { queue ge 2 }" in count_only


class _HeldServer:
    """A replica stand-in: answers health checks at once and holds every POST until ``release`` is set."""

    def __init__(self):
        import http.server
        import threading

        self.release, self.arrived = threading.Event(), threading.Semaphore(0)
        held = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self._answer(b"success")

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                held.arrived.release()
                held.release.wait(120)
                self._answer(b'{"label": "NORMAL"}')

            def _answer(self, body):
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.server.shutdown()


def _haproxy_stat(socket_path: str, backend: str, server: str, field: str) -> int:
    """One field of HAProxy's `show stat` for ``server`` of ``backend`` (``BACKEND``: the backend itself)."""
    import socket

    with socket.socket(socket.AF_UNIX) as admin:
        admin.connect(socket_path)
        admin.sendall(b"show stat\n")
        text = b"".join(iter(lambda: admin.recv(65536), b"")).decode()
    header, *rows = text.splitlines()
    for row in rows:
        fields = dict(zip(header.lstrip("# ").split(","), row.split(",")))
        if fields.get("pxname") == backend and fields.get("svname") == server:
            return int(fields[field] or 0)
    raise LookupError(f"{backend}/{server} not in HAProxy's stats")


@pytest.mark.services
def test_a_real_haproxy_refuses_at_once_what_would_wait_too_long_and_answers_a_request_that_waited_out_the_budget(
        tmp_path):
    """One replica (held by the test) taking one request at once, a budget of 4 s: the first request is in the
    replica; the second waits in HAProxy's queue; a third finds as many waiting as the replica is taken to drain
    in the budget (a batch of 1: it drained nothing in the last second) and is refused at once, while the second
    still waits; the second is refused when it has waited the budget.
    Both refusals are HAProxy's JSON 503 with Retry-After, not Ray's 500 error file; the first is then answered."""
    import threading
    import time
    import urllib.error
    import urllib.request

    from serving.haproxy_wrapper import bounded_config, parse_queues
    from serving.http_proxy import free_port

    replica = _HeldServer()
    port, admin = free_port(), str(tmp_path / "admin.sock")
    (tmp_path / "500.http").write_text("HTTP/1.0 500 Internal Server Error\r\nContent-Type: text/plain\r\n\r\n"
                                      "Internal Server Error\r\n")  # as Ray normalises HAProxy's own 503s
    config = tmp_path / "haproxy.cfg"
    config.write_text(bounded_config(
        f"global\n    stats socket {admin} mode 600 level admin\ndefaults\n    mode http\n    timeout connect 5s\n"
        f"    timeout client 60s\n    timeout server 60s\n    errorfile 503 {tmp_path / '500.http'}\n"
        f"frontend http_frontend\n    bind 127.0.0.1:{port}\n    use_backend http-pneumonia\n"
        f"backend http-pneumonia\n    server SERVE_REPLICA_pneumonia-Classifier-0 127.0.0.1:{replica.port}\n",
        parse_queues(haproxy_queue("pneumonia", 1, 8, 1, 4000, 1))))
    haproxy = subprocess.Popen([serving.http_proxy.haproxy_binary(), "-db", "-f", str(config)], start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    answers: dict[str, tuple] = {}

    def post(name: str) -> None:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/predict", data=b"film", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                answers[name] = response.status, response.read(), response.headers.get("Retry-After")
        except urllib.error.HTTPError as error:
            answers[name] = error.code, error.read(), error.headers.get("Retry-After")

    def wait_for(condition, what: str) -> None:
        deadline = time.time() + 60
        while not condition():
            assert haproxy.poll() is None, haproxy.stderr.read().decode()
            assert time.time() < deadline, f"no {what} within 60 s"
            time.sleep(0.05)

    try:
        wait_for(lambda: os.path.exists(admin), "HAProxy admin socket")
        first = threading.Thread(target=post, args=("first",))
        first.start()
        assert replica.arrived.acquire(timeout=60), "the first request never reached the replica"
        # the replica's drain rate, HAProxy's count of requests handed to it in the last second, falls back to 0:
        # what it drains in the budget is then taken as the floor, one batch
        wait_for(lambda: _haproxy_stat(admin, "http-pneumonia", "SERVE_REPLICA_pneumonia-Classifier-0", "rate") == 0,
                 "a drain rate of 0")
        sent = time.monotonic()
        second = threading.Thread(target=post, args=("second",))
        second.start()
        wait_for(lambda: _haproxy_stat(admin, "http-pneumonia", "BACKEND", "qcur") == 1, "a request waiting in HAProxy")
        post("third")
        assert "second" not in answers  # the third was refused while the second still waited
        second.join(120)
        waited = time.monotonic() - sent
        for name in ("third", "second"):
            status, body, retry_after = answers[name]
            assert status == 503 and retry_after == "1", answers[name]
            assert json.loads(body) == {"detail": "the endpoint is at capacity: retry after 1 s"}
        assert waited >= 4.0  # HAProxy's `timeout queue`: the budget, not sooner
        replica.release.set()
        first.join(120)
        assert answers["first"][0] == 200
    finally:
        replica.close()
        os.killpg(haproxy.pid, signal.SIGKILL)
        haproxy.wait(60)


@pytest.mark.parametrize("value", ["3,1,1,0,1", "pneumonia=3,1,1", "pneumonia=0,1,1,0,1", "pneumonia=3,x,1,0,1",
                                   "=3,1,1,0,1", "pneumonia=3,0,1,0,1", "pneumonia=3,1,1,-5,1", "pneumonia=3,1,1,5,0"])
def test_a_queue_setting_the_wrapper_cannot_read_stops_haproxy_from_starting_with_the_reason(tmp_path, value):
    config = tmp_path / "haproxy.cfg"
    config.write_text(_rays_config(tmp_path, {"pneumonia": 1}))
    env = {**os.environ, REAL_BINARY_ENV: "/bin/echo", QUEUE_ENV: value}
    refused = subprocess.run([write_wrapper(tmp_path), "-f", str(config)], env=env, capture_output=True, text=True,
                             timeout=60, check=False)
    assert refused.returncode == 1 and not refused.stdout
    assert f"${QUEUE_ENV}" in refused.stderr and repr(value) in refused.stderr


def test_the_queue_bound_reaches_haproxy_only_through_the_haproxy_ingress(clean_env, tmp_path):
    default = ServeSettings.parse({"package": "p"}).haproxy_queue("pneumonia")
    assert set_ingress_environment("haproxy", 8000, default) == "haproxy"
    assert os.environ[QUEUE_ENV] == default == "pneumonia=64,512,1,500,32"  # serving/settings.py's defaults
    set_ingress_environment("haproxy", 8000, haproxy_queue("pneumonia", 64, -1, 1, 0))  # unbounded: nothing for HAProxy
    assert QUEUE_ENV not in os.environ
    os.environ[QUEUE_ENV] = default
    set_ingress_environment("python", 8000, default)
    assert QUEUE_ENV not in os.environ


@pytest.fixture
def signal_handlers():
    """main() installs its stop handlers (runtime.tensorflow_setup): the test process gets its own back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_serve_beyond_loopback_without_a_token_exits_2_before_ray_starts(monkeypatch, capsys, signal_handlers):
    import ray

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert main(["serve", "--model", "no-such-package", "--host", "0.0.0.0", "--port", "8093"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: the endpoint would listen on 0.0.0.0, beyond this machine, with no token")
    assert err.count("\n") == 1 and f"export {TOKEN_ENV}=" in err and "--allow-unauthenticated" in err
    assert not out and not ray.is_initialized()  # refused before the ingress, the port or Ray
    # with the flag it goes on (here to the missing package: no Ray either)
    assert main(["serve", "--model", "no-such-package", "--host", "0.0.0.0", "--allow-unauthenticated"]) == 2
    assert "no-such-package" in capsys.readouterr().err


def test_the_app_is_checked_against_the_host_serve_listens_on_and_warns_when_allowed(monkeypatch):
    import ray
    import ray.serve.context

    import serving.app

    class Client:  # what the running Serve controller says: a Serve config's default host
        class http_config:
            host = "0.0.0.0"

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray.serve.context, "_get_global_client", lambda **_: Client())
    assert serving.app.serve_http_host() == "0.0.0.0"
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ServeSettingsError, match="listen on 0.0.0.0"):
        serving.app.build_app({"package": "p"})
    warnings = []
    serving.app.application(ServeSettings(package="p", allow_unauthenticated=True), warnings.append)
    assert len(warnings) == 1 and re.match(r"warning: the endpoint listens on 0\.0\.0\.0 with no token", warnings[0])
    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    serving.app.application(ServeSettings(package="p"), warnings.append)
    assert len(warnings) == 1
