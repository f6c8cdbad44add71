"""``twinproxy-dashboard`` and ``twistd twinproxy-dashboard`` as real processes, driven by the real
``twinproxy-admin``: a file coordinator in the test's directory, real redis-servers, and (for /metrics)
a real cluster proxy.

Covers: the verbs against a live dashboard and ``status --json``'s contract shape; writes refused
without the token or without a token file; the HTTP errors of the real Site (404, 405, 400, 413);
a second dashboard for the same cluster refusing; ``kill -9`` and a successor taking over at once
(the file coordinator's lock is an flock); ``--wait`` and a clean SIGTERM (lock released, exit 0);
/metrics summing a proxy's counters; twistd.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest

from tests.conftest import REPO, stop_proxy
from tests.servers import LOOPBACK, Process, free_port, wait_until

BIN = Path(sys.executable).parent
TOKEN = "t0ken-for-tests"


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class Dashboards:
    """Dashboard processes of one test on one file coordinator; ``start`` waits until one serves."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.url = f"file://{tmp_path}/coordinator"
        self.token_file = tmp_path / "token"
        self.token_file.write_text(f"  {TOKEN}\n")
        self.processes: List[Process] = []

    def spawn(self, *extra: str, token: bool = True, cluster: str = "shop", twistd: bool = False,
              port: Optional[int] = None) -> Process:
        port = port or free_port()
        options = ["--coordinator", self.url, "--cluster", cluster, "--listen", f"{LOOPBACK}:{port}",
                   "--ack-timeout", "5", *(["--token-file", str(self.token_file)] if token else []), *extra]
        if twistd:
            argv = [str(BIN / "twistd"), "--nodaemon", "--pidfile=", "twinproxy-dashboard", *options]
        else:
            argv = [str(BIN / "twinproxy-dashboard"), *options]
        process = Process(argv, self.tmp_path / f"dashboard{len(self.processes)}.log", env=_env())
        process.address = f"{LOOPBACK}:{port}"
        process.spawn()
        self.processes.append(process)
        return process

    def start(self, *extra: str, **options: Any) -> Process:
        process = self.spawn(*extra, **options)
        wait_ready(process)
        return process

    def stop(self) -> None:
        for process in self.processes:
            process.stop()


def http(address: str, method: str, path: str, body: Any = None, token: Optional[str] = None,
         raw: Optional[bytes] = None) -> Tuple[int, Any]:
    """(status, JSON answer) of one request to a dashboard, error statuses included."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(f"http://{address}{path}", data=data, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read())


def wait_ready(process: Process, timeout: float = 20.0) -> None:
    def ready() -> bool:
        if not process.alive:
            raise AssertionError(f"the dashboard exited ({process.proc.returncode}):\n{process.output()}")
        try:
            return http(process.address, "GET", "/api/status")[0] == 200
        except OSError:
            return False

    try:
        wait_until(ready, timeout=timeout, what=f"the dashboard on {process.address}")
    except AssertionError as err:
        raise AssertionError(f"{err}\n{process.output()}") from None


def admin(process: Process, *args: str, token_file: Optional[Path] = None) -> subprocess.CompletedProcess:
    argv = [str(BIN / "twinproxy-admin"), "--dashboard", process.address]
    if token_file is not None:
        argv += ["--token-file", str(token_file)]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=30, env=_env())


def wait_exit(process: Process, timeout: float = 20.0) -> int:
    wait_until(lambda: not process.alive, timeout=timeout, what=f"pid {process.proc.pid} to exit")
    return process.proc.returncode


@pytest.fixture
def dashboards(tmp_path: Path):
    made = Dashboards(tmp_path)
    yield made
    made.stop()


def check_status_shape(status: Dict[str, Any]) -> None:
    """The contract's /api/status fields (§5) and their types."""
    for key in ("cluster", "protocol", "generation", "groups", "slots", "offline_slots", "slots_per_group",
                "proxies", "sentinels", "dashboard", "change"):
        assert key in status, key
    assert isinstance(status["cluster"], str) and isinstance(status["generation"], int)
    for group in status["groups"]:
        assert isinstance(group["id"], int)
        for server in group["servers"]:
            assert isinstance(server["addr"], str) and server["role"] in ("master", "replica")
            assert isinstance(server["up"], bool)
    covered = 0
    for run in status["slots"]:
        assert run["first"] == covered and run["last"] >= run["first"]
        assert run["group"] is None or isinstance(run["group"], int)
        assert isinstance(run["state"], str)
        covered = run["last"] + 1
    assert covered == 1024
    for proxy in status["proxies"]:
        for key in ("id", "addr", "admin", "generation", "last_seen", "pid", "host"):
            assert key in proxy, key
    assert set(status["dashboard"]) >= {"addr", "pid", "host", "start"}


def test_admin_drives_a_real_dashboard(dashboards, redis_servers):
    master, replica = redis_servers(2)
    dashboard = dashboards.start()
    token = dashboards.token_file

    def ok(*args: str) -> str:
        done = admin(dashboard, *args, token_file=token)
        assert done.returncode == 0, f"{args}: {done.returncode} {done.stderr}"
        return done.stdout

    assert ok("group", "add", "1").startswith("ok: group 1 added (generation 1)")
    assert "as its master" in ok("server", "add", "1", master.address)
    assert "as its replica" in ok("server", "add", "1", replica.address)
    wait_until(lambda: replica.client().info("replication").get("master_port") == master.port, timeout=10,
               what="the replica to be told REPLICAOF its master")
    ok("slots", "assign", "0-511", "1")

    status = json.loads(ok("status", "--json"))
    check_status_shape(status)
    assert list(status) == list(http(dashboard.address, "GET", "/api/status")[1])   # the API's object, as is
    assert (status["cluster"], status["protocol"], status["generation"]) == ("shop", "redis", 4)
    assert [s["addr"] for s in status["groups"][0]["servers"]] == [master.address, replica.address]
    assert [s["role"] for s in status["groups"][0]["servers"]] == ["master", "replica"]
    assert status["slots"] == [{"first": 0, "last": 511, "group": 1, "state": "stable"},
                               {"first": 512, "last": 1023, "group": None, "state": "stable"}]
    assert (status["offline_slots"], status["slots_per_group"], status["proxies"]) == (512, {"1": 512}, [])
    assert status["dashboard"]["addr"] == dashboard.address and status["dashboard"]["pid"] == dashboard.proc.pid

    # The health poll finds both servers up; the human status says so.
    wait_until(lambda: all(s["up"] for s in http(dashboard.address, "GET", "/api/status")[1]["groups"][0]["servers"]),
               timeout=10, what="both servers up")
    text = ok("status")
    assert text.startswith("cluster shop (redis), generation 4")
    assert any(line.split()[:3] == ["master", "up", master.address] for line in text.splitlines())
    assert any(line.split()[:3] == ["replica", "up", replica.address] for line in text.splitlines())
    assert "slots (512 offline):" in text
    assert ok("slots", "show", "500-520").split() == ["500-511", "group", "1", "512-520", "offline"]
    assert json.loads(ok("proxy", "list", "--json")) == {"proxies": []}

    # Refused by state or unknown: exit 1 with the API's reason; nothing changed.
    done = admin(dashboard, "group", "remove", "1", token_file=token)
    assert done.returncode == 1 and done.stderr.startswith("twinproxy-admin: ") and "slot" in done.stderr
    done = admin(dashboard, "server", "add", "9", "127.0.0.1:1", token_file=token)
    assert done.returncode == 1 and "9" in done.stderr
    done = admin(dashboard, "slots", "assign", "0-2000", "1", token_file=token)
    assert done.returncode == 2
    assert json.loads(ok("status", "--json"))["generation"] == 4


def test_writes_refused_without_the_token(dashboards):
    dashboard = dashboards.start()
    done = admin(dashboard, "group", "add", "1")
    assert done.returncode == 1 and "Bearer" in done.stderr and "--token-file" in done.stderr
    wrong = dashboards.tmp_path / "wrong"
    wrong.write_text("guess\n")
    done = admin(dashboard, "group", "add", "1", token_file=wrong)
    assert (done.returncode, done.stderr) == (1, "twinproxy-admin: wrong token: it is not the content of the "
                                                 "dashboard's --token-file\n")
    assert admin(dashboard, "status").returncode == 0
    assert "refused (403): writes need" in dashboard.output() and "refused (403): wrong token" in dashboard.output()

    # The real Site's own answers: unknown path, wrong method, bad JSON, a body over the limit.
    assert http(dashboard.address, "GET", "/api/nothing")[0] == 404
    assert http(dashboard.address, "GET", "/api/groups")[0] == 405
    assert http(dashboard.address, "POST", "/api/groups", raw=b"{", token=TOKEN)[0] == 400
    status, body = http(dashboard.address, "POST", "/api/groups", raw=b" " * (65 * 1024) + b"{}", token=TOKEN)
    assert status == 413 and "larger" in body["error"]
    assert http(dashboard.address, "GET", "/api/status")[1]["generation"] == 0

    without = dashboards.start(token=False, cluster="other")
    done = admin(without, "group", "add", "1", token_file=dashboards.token_file)
    assert done.returncode == 1 and "writes are disabled" in done.stderr and "--token-file" in done.stderr
    assert admin(without, "status").returncode == 0


def test_one_dashboard_per_cluster_and_taking_over(dashboards):
    first = dashboards.start()
    assert admin(first, "group", "add", "1", token_file=dashboards.token_file).returncode == 0

    log = dashboards.tmp_path / "second.log"
    second = dashboards.spawn("--log", str(log))
    assert wait_exit(second) == 1
    line = (f"twinproxy-dashboard: cluster 'shop' already has a dashboard at {first.address} "
            f"(pid {first.proc.pid} on host")
    assert second.output().startswith(line) and len(second.output().splitlines()) == 1   # stderr: one line
    assert line in log.read_text()                                                     # the log says it too
    assert admin(first, "status").returncode == 0

    # kill -9: the file coordinator's lock dies with the process, so a successor starts at once.
    first.kill()
    third = dashboards.start()
    status = json.loads(admin(third, "status", "--json").stdout)
    assert status["generation"] == 1 and status["dashboard"]["pid"] == third.proc.pid
    assert admin(third, "group", "add", "2", token_file=dashboards.token_file).returncode == 0

    # --wait: serves 503 (saying whom it waits for) until the holder stops; SIGTERM releases the lock.
    fourth = dashboards.spawn("--wait")
    wait_until(lambda: _answers(fourth) == 503, timeout=20, what="the waiting dashboard to answer 503")
    status, body = http(fourth.address, "GET", "/api/status")
    assert status == 503 and third.address in body["error"]
    done = admin(fourth, "status")
    assert done.returncode == 1 and "waiting for the lock" in done.stderr
    third.proc.send_signal(signal.SIGTERM)
    assert wait_exit(third) == 0
    wait_ready(fourth)
    assert json.loads(admin(fourth, "status", "--json").stdout)["generation"] == 2


def _answers(process: Process) -> Optional[int]:
    try:
        return http(process.address, "GET", "/api/status")[0]
    except OSError:
        return None


def test_metrics_sum_a_real_proxy(dashboards, redis_servers, tmp_path):
    (server,) = redis_servers(1)
    dashboard = dashboards.start()
    for command in (("group", "add", "1"), ("server", "add", "1", server.address), ("slots", "assign", "0-1023", "1")):
        assert admin(dashboard, *command, token_file=dashboards.token_file).returncode == 0
    port, stats_port = free_port(), free_port()
    config = tmp_path / "pools.yml"
    config.write_text(f"shop:\n  listen: {LOOPBACK}:{port}\n  redis: true\n  cluster: shop\n"
                      f"  coordinator: {dashboards.url}\n")
    proxy = Process([str(BIN / "twinproxy"), "-c", str(config), "-s", str(stats_port), "-a", LOOPBACK],
                    tmp_path / "proxy.log", env=_env())
    proxy.spawn()
    try:
        wait_until(lambda: any(p["generation"] == 3 for p in http(dashboard.address, "GET", "/api/status")[1]
                               ["proxies"]), timeout=30, what="the proxy registered at generation 3")
        import redis

        client = redis.Redis(host=LOOPBACK, port=port, socket_timeout=5, protocol=2)
        for index in range(20):
            assert client.set(f"k{index}", b"v")
        client.close()
        proxy_id = http(dashboard.address, "GET", "/api/proxies")[1]["proxies"][0]["id"]

        def metrics() -> Dict[str, float]:
            with urllib.request.urlopen(f"http://{dashboard.address}/metrics", timeout=5) as answer:
                text = answer.read().decode()
            return {line.rpartition(" ")[0]: float(line.rpartition(" ")[2]) for line in text.splitlines()
                    if line and not line.startswith("#")}

        each = f'twinproxy_dashboard_proxy_requests_total{{cluster="shop",proxy="{proxy_id}"}}'
        found = wait_until(lambda: (lambda m: m if m.get(each, 0) >= 20 else None)(metrics()), timeout=15,
                           what="the proxy's requests in the dashboard's /metrics")
        assert found['twinproxy_dashboard_requests_total{cluster="shop"}'] >= 20
        assert found[f'twinproxy_dashboard_proxy_up{{cluster="shop",proxy="{proxy_id}"}}'] == 1
        assert found['twinproxy_dashboard_proxies{cluster="shop"}'] == 1
        assert found['twinproxy_dashboard_generation{cluster="shop"}'] == 3
        assert found['twinproxy_dashboard_offline_slots{cluster="shop"}'] == 0
        assert found['twinproxy_dashboard_group_slots{cluster="shop",group="1"}'] == 1024
    finally:
        stop_proxy(proxy)


def test_twistd_twinproxy_dashboard(dashboards):
    dashboard = dashboards.start(twistd=True)
    assert admin(dashboard, "group", "add", "1", token_file=dashboards.token_file).returncode == 0
    refused = dashboards.spawn(twistd=True)
    assert wait_exit(refused) == 1
    assert "already has a dashboard" in refused.output()
    dashboard.proc.send_signal(signal.SIGTERM)
    # twistd ends by re-raising the signal that stopped it, after the clean shutdown.
    assert wait_exit(dashboard) in (0, -signal.SIGTERM)
    assert "Main loop terminated" in dashboard.output()
    assert json.loads(admin(dashboards.start(), "status", "--json").stdout)["generation"] == 1


def test_bad_options_exit_at_once(dashboards, tmp_path):
    for extra, words in ((("--token-file", str(tmp_path / "missing")), "cannot read the token file"),
                         (("--cluster", "bad name"), "cluster name"),
                         (("--coordinator", "nowhere://x"), "unknown scheme")):
        argv = [str(BIN / "twinproxy-dashboard"), "--coordinator", dashboards.url, "--cluster", "shop", *extra]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=_env())
        assert done.returncode == 1 and words in done.stderr, (extra, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1
