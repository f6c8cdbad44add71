"""Stats port, /metrics, /health, logs and the nutcracker command line, against real servers."""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO, in_reactor, key_on, pool_yaml
from tests.servers import LOOPBACK, Process, bound_addresses, port_of, wait_until
from twinproxy import cli
from twinproxy.stats import LEASE_FIELDS, POOL_FIELDS, PUBSUB_FIELDS, REDIS_POOL_FIELDS

SAMPLE = json.loads((REPO / "tests" / "data" / "nutcracker-stats-sample.json").read_text())


@pytest.fixture
def admin(reactor):
    """``admin(pool_services)`` starts the stats port and the HTTP endpoint over running pools."""
    from twinproxy.admin import HttpService, StatsPortService

    started = []

    def start(services):
        def build():
            made = []
            for kind in (StatsPortService, HttpService):
                service = kind(lambda: services, reactor.seconds(), reactor, LOOPBACK, 0)
                service.startService()
                made.append(service)
            return made

        made = in_reactor(reactor, build)
        started.extend(made)
        return made

    yield start
    for service in started:
        in_reactor(reactor, service.stopService)


def read_stats(port: int) -> dict:
    with socket.create_connection((LOOPBACK, port), timeout=5) as sock:
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


def http_get(port: int, path: str):
    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_stats_document_has_nutcrackers_shape_and_right_numbers(redis_servers, proxy, admin) -> None:
    backends = redis_servers(2)
    service = proxy(pool_yaml(backends))
    stats_port, http = admin([service])
    key, near, far = key_on(service, 1), key_on(service, 1, "m"), key_on(service, 0, "m")
    client = redis.Redis(host=LOOPBACK, port=service.port_number, protocol=2, socket_timeout=5)
    for _ in range(25):
        client.set(key, "v")
    client.mget(far, near)
    doc = read_stats(stats_port.port_number)
    # Field by field against a document captured from nutcracker 0.5.0.
    assert list(doc)[:7] == list(SAMPLE)[:7]
    # nutcracker's top-level fields keep their types; twinproxy's own rows are lists, never mappings,
    # so tools that take every top-level mapping for a pool read the document as before.
    own_rows = {"latency": list, "commands": list}
    assert {k: type(v) for k, v in doc.items() if not isinstance(v, dict)} == \
        {**{k: type(v) for k, v in SAMPLE.items() if not isinstance(v, dict)}, **own_rows}
    assert [k for k, v in doc.items() if isinstance(v, dict)] == ["alpha"]
    latency = {row["server"]: row["buckets"] for row in doc["latency"] if row["pool"] == "alpha"}
    assert len(latency) == 2 and all(len(b) == 16 and b == sorted(b) for b in latency.values())
    commands = {row["command"]: row for row in doc["commands"] if row["pool"] == "alpha"}
    assert commands["set"]["calls"] == 25 and commands["set"]["errors"] == 0
    # one latency observation per split request, not per fragment
    assert commands["set"]["buckets"][-1] == 25 and commands["mget"]["buckets"][-1] == 1
    pool = doc["alpha"]
    sample_pool = SAMPLE["alpha"]
    pool_fields = [k for k, v in sample_pool.items() if not isinstance(v, dict)]
    # nutcracker's fields in its order, then twinproxy's own (client_output_limit_closed), then a Redis pool's
    own = [name for name, _ in POOL_FIELDS if name not in pool_fields] + [name for name, *_ in REDIS_POOL_FIELDS] \
        + [name for name, *_ in PUBSUB_FIELDS]
    assert [k for k, v in pool.items() if not isinstance(v, dict)] == pool_fields + own
    sample_server = next(v for v in sample_pool.values() if isinstance(v, dict))
    names = [s.spec.stats_name for s in service.pool.servers]
    assert [k for k, v in pool.items() if isinstance(v, dict)] == names
    for name in names:   # nutcracker's, then a Redis pool's leased connections
        assert list(pool[name]) == list(sample_server) + [field for field, *_ in LEASE_FIELDS]
    busy, other = pool[names[1]], pool[names[0]]
    assert busy["requests"] == 26 and busy["responses"] == 26
    assert other["requests"] == 1 and other["responses"] == 1
    from twinproxy.protocols.resp import encode_command

    assert busy["request_bytes"] == 25 * len(encode_command([b"SET", key.encode(), b"v"])) + \
        len(encode_command([b"MGET", near.encode()]))
    assert busy["response_bytes"] == 25 * len(b"+OK\r\n") + len(b"*1\r\n$-1\r\n")
    assert busy["server_connections"] == 1 and busy["out_queue"] == 0
    assert pool["fragments"] == 2 and pool["client_connections"] == 1
    assert doc["curr_connections"] >= 1 + 1 + 2
    assert doc["service"] == "twinproxy" and doc["version"]
    status, text = http_get(http.port_number, "/stats")
    assert status == 200 and json.loads(text)["alpha"][names[1]]["requests"] == 26


def test_killed_backend_moves_err_ejects_and_forward_error(redis_servers, proxy, admin) -> None:
    backends = redis_servers(2)
    service = proxy(pool_yaml(backends, auto_eject_hosts="true", server_failure_limit="1",
                              server_retry_timeout="30000", timeout="1000"))
    stats_port, http = admin([service])
    key = key_on(service, 0)
    client = redis.Redis(host=LOOPBACK, port=service.port_number, protocol=2, socket_timeout=5)
    client.set(key, "v")
    backends[0].kill()
    with pytest.raises(redis.ResponseError):
        client.get(key)
    doc = read_stats(stats_port.port_number)
    name = service.pool.servers[0].spec.stats_name
    server = doc["alpha"][name]
    assert server["server_eof"] + server["server_err"] >= 1
    assert doc["alpha"]["server_ejects"] == 1
    assert doc["alpha"]["forward_error"] >= 1
    assert server["server_ejected_at"] > (time.time() - 60) * 1_000_000


def test_timeout_counts_server_timedout(redis_servers, proxy, admin) -> None:
    backends = redis_servers(1)
    service = proxy(pool_yaml(backends, timeout="200"))
    stats_port, _ = admin([service])
    client = redis.Redis(host=LOOPBACK, port=service.port_number, protocol=2, socket_timeout=5)
    client.ping()
    client.set("k", "v")
    backends[0].freeze()
    try:
        with pytest.raises(redis.ResponseError, match="timed out"):
            client.get("k")
    finally:
        backends[0].thaw()
    doc = read_stats(stats_port.port_number)
    assert doc["alpha"][service.pool.servers[0].spec.stats_name]["server_timedout"] == 1


def test_metrics_parse_and_health_flips(redis_servers, memcached_servers, proxy, admin) -> None:
    backends = redis_servers(1)
    caches = memcached_servers(1)
    redis_pool = proxy(pool_yaml(backends, timeout="500", preconnect="true"))
    cache_yaml = pool_yaml(caches, timeout="500").replace("alpha:", "beta:")
    cache_pool = proxy(cache_yaml)
    _, http = admin([redis_pool, cache_pool])
    client = redis.Redis(host=LOOPBACK, port=redis_pool.port_number, protocol=2, socket_timeout=5)
    for _ in range(10):
        client.get("x")
    client.mget("a", "b")
    status, text = http_get(http.port_number, "/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    commands = {tuple(sorted(s.labels.items())): s.value for s in families["twinproxy_pool_commands"].samples
                if s.name.endswith("_total")}
    assert commands[(("command", "get"), ("pool", "alpha"))] == 10
    requests = [s for s in families["twinproxy_server_requests"].samples if s.labels["pool"] == "alpha"]
    assert requests[0].value == 11
    latency = [s for s in families["twinproxy_server_latency_seconds"].samples
               if s.name.endswith("_count") and s.labels["pool"] == "alpha"]
    assert latency[0].value == 11
    assert "twinproxy_pool_request_latency_seconds" in families
    assert http_get(http.port_number, "/health")[0] == 200
    caches[0].kill()
    from pymemcache import Client
    from pymemcache.exceptions import MemcacheServerError

    with pytest.raises(MemcacheServerError):
        Client((LOOPBACK, cache_pool.port_number), timeout=5).get("x")
    status, text = http_get(http.port_number, "/health")
    assert status == 503
    assert "pool beta: no live server" in text and "pool alpha: ok" in text
    caches[0].restart()
    wait_until(lambda: Client((LOOPBACK, cache_pool.port_number), timeout=5).get("x") is None,
               what="memcached back")
    assert http_get(http.port_number, "/health")[0] == 200


def run_cli(args, tmp_path: Path, name: str = "cli") -> Process:
    """The twinproxy command on ``args`` plus ``--bound-addresses`` (``process.bound()`` reads it)."""
    twinproxy = os.path.join(os.path.dirname(sys.executable), "twinproxy")
    bound_path = tmp_path / f"{name}.bound.json"
    process = Process([twinproxy, *args, "--bound-addresses", str(bound_path)], tmp_path / f"{name}.out")
    process.bound_path = bound_path
    process.spawn()
    return process


def write_config(tmp_path: Path, backends) -> Path:
    """A one-pool Redis file on port 0: the system picks it, --bound-addresses tells it."""
    config = tmp_path / "pools.yml"
    config.write_text(f"alpha:\n  listen: {LOOPBACK}:0\n  redis: true\n  timeout: 1000\n  servers:\n" +
                      "".join(f"   - {b.address}:1\n" for b in backends))
    return config


def test_cli_runs_like_nutcracker_with_pid_file_log_file_and_signals(redis_servers, tmp_path) -> None:
    backends = redis_servers(1)
    config = write_config(tmp_path, backends)
    pid_file, log_file = tmp_path / "tp.pid", tmp_path / "tp.log"
    process = run_cli(["-c", str(config), "-s", "0", "-a", LOOPBACK, "-p", str(pid_file),
                       "-o", str(log_file), "-v", "6"], tmp_path)
    try:
        bound = process.bound()
        port, stats_port = port_of(bound["pools"]["alpha"]), port_of(bound["stats"])
        client = redis.Redis(host=LOOPBACK, port=port, socket_timeout=5, socket_connect_timeout=1)
        assert client.ping()
        assert pid_file.read_text().strip() == str(process.proc.pid)
        if platform.python_implementation() == "PyPy" and "PYPY_GC_NURSERY" not in os.environ:
            # The command restarted itself, in the same process, with a bigger young generation.
            environ = Path(f"/proc/{process.proc.pid}/environ").read_bytes().split(b"\0")
            for name, value in cli.PYPY_GC_SETTINGS.items():
                assert f"{name}={value}".encode() in environ
        assert read_stats(stats_port)["alpha"]
        wait_until(lambda: "listening on" in log_file.read_text(), what="log lines")
        # logrotate: move the file away, SIGHUP, and the proxy writes a new one.
        log_file.rename(tmp_path / "tp.log.1")
        process.proc.send_signal(signal.SIGHUP)
        process.proc.send_signal(signal.SIGTTIN)  # to 7 (debug), then back to 6
        process.proc.send_signal(signal.SIGTTOU)
        backends[0].kill()
        with pytest.raises(redis.ResponseError):
            client.get("x")
        wait_until(lambda: log_file.exists() and "Connection" in log_file.read_text(), what="reopened log")
        process.proc.send_signal(signal.SIGTERM)
        assert process.proc.wait(10) == 0
        assert not pid_file.exists()
        assert "Traceback" not in log_file.read_text() + process.output()
    finally:
        process.stop()


def test_cli_daemonizes(redis_servers, tmp_path) -> None:
    backends = redis_servers(1)
    config = write_config(tmp_path, backends)
    pid_file, bound_file = tmp_path / "daemon.pid", tmp_path / "daemon.bound.json"
    twinproxy = os.path.join(os.path.dirname(sys.executable), "twinproxy")
    result = subprocess.run([twinproxy, "-d", "-c", str(config), "-s", "0", "-p", str(pid_file),
                             "--bound-addresses", str(bound_file)], timeout=20, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), what="daemon pid file")
    pid = int(pid_file.read_text())
    try:
        port = port_of(bound_addresses(bound_file, pid=pid)["pools"]["alpha"])
        client = redis.Redis(host=LOOPBACK, port=port, socket_timeout=5, socket_connect_timeout=1)
        assert client.ping()
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not pid_file.exists(), what="daemon to exit")


def test_twistd_takes_the_same_options(redis_servers, twistd, tmp_path) -> None:
    backends = redis_servers(1)
    config = write_config(tmp_path, backends)
    log_file = tmp_path / "twistd-o.log"
    process = twistd(config, "-s", "0", "-a", LOOPBACK, "--http-port", "0", "-o", str(log_file), "-v", "6")
    bound = process.bound()
    stats_port, http_port = port_of(bound["stats"]), port_of(bound["http"])
    assert read_stats(stats_port)["alpha"]
    assert http_get(http_port, "/health")[0] == 200
    assert "twinproxy_pool_client_connections" in http_get(http_port, "/metrics")[1]
    wait_until(lambda: "listening on" in log_file.read_text(), what="the -o log")


def test_workers_share_the_listener_and_sum_their_stats(redis_servers, tmp_path) -> None:
    backends = redis_servers(2)
    config = write_config(tmp_path, backends)
    pid_file = tmp_path / "master.pid"
    process = run_cli(["-c", str(config), "--workers", "2", "-s", "0", "-a", LOOPBACK, "-p", str(pid_file)],
                      tmp_path, "workers")
    try:
        # The master resolves the pool's port 0 once, for every worker, and writes the file.
        bound = process.bound()
        assert bound["pid"] == process.proc.pid
        port, stats_port = port_of(bound["pools"]["alpha"]), port_of(bound["stats"])
        wait_until(lambda: read_stats(stats_port)["curr_connections"] >= 2, timeout=20,
                   what=f"workers:\n{process.output()}")
        clients = [redis.Redis(host=LOOPBACK, port=port, protocol=2, socket_timeout=5) for _ in range(20)]
        for i, client in enumerate(clients):
            for j in range(10):
                assert client.set(f"w{i}:{j}", "v")
        doc = read_stats(stats_port)
        assert sum(server["requests"] for server in doc["alpha"].values() if isinstance(server, dict)) == 200
        assert doc["alpha"]["client_connections"] == 20
        assert pid_file.read_text().strip() == str(process.proc.pid)
        for client in clients:
            client.close()
        process.proc.send_signal(signal.SIGTERM)
        assert process.proc.wait(15) == 0
        assert not pid_file.exists()
        assert "Traceback" not in process.output()
        with pytest.raises(OSError):
            socket.create_connection((LOOPBACK, port), timeout=1).close()
    finally:
        process.stop()
