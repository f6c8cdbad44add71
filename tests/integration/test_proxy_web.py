"""A plain proxy's web dashboard through the twinproxy command: the page, /api/state, /api/events, /metrics.

Real redis-servers and memcached; the proxy listens on ports the system
picks (``--bound-addresses`` says which).  Waits are deadlines on what the
proxy reports, never sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from pymemcache.client.base import Client as MemcacheClient

from tests.conftest import spawn_proxy, stop_proxy
from tests.servers import LOOPBACK, bound_addresses, port_of, wait_until
from twinproxy import __version__

pytestmark = pytest.mark.timeout(90)


def http(address: str, path: str, method: str = "GET"):
    request = urllib.request.Request(f"http://{address}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read().decode()


def state(address: str) -> dict:
    status, _, body = http(address, "/api/state")
    assert status == 200, body
    return json.loads(body)


def events(address: str, kind: str = None) -> list:
    status, _, body = http(address, "/api/events?format=json")
    assert status == 200, body
    found = json.loads(body)["events"]
    return [event for event in found if kind is None or event["kind"] == kind]


def row(document: dict, pool: str, server: str) -> dict:
    return next(r for r in document["servers"] if r["pool"] == pool and r["name"] == server)


def command(document: dict, pool: str, name: str) -> dict:
    return next(c for c in document["commands"] if c["pool"] == pool and c["command"] == name)


@pytest.fixture
def web_proxy(tmp_path: Path, redis_servers, memcached_servers):
    """A twinproxy with --http-port over two redis-servers (ejecting) and one memcached."""
    backends = redis_servers(2)
    caches = memcached_servers(1)
    config = tmp_path / "pools.yml"

    def write(retry_ms: int = 1000, extra_server: bool = False) -> None:
        servers = "".join(f"   - {b.address}:1 r{i}\n" for i, b in enumerate(backends))
        config.write_text(
            "alpha:\n  listen: 127.0.0.1:0\n  redis: true\n  timeout: 1000\n  auto_eject_hosts: true\n"
            f"  server_failure_limit: 1\n  server_retry_timeout: {retry_ms}\n  servers:\n" + servers
            + ("   - 127.0.0.1:1:1 extra\n" if extra_server else "")
            + f"beta:\n  listen: 127.0.0.1:0\n  timeout: 1000\n  servers:\n   - {caches[0].address}:1\n")

    write()
    bound_path = tmp_path / "bound.json"
    processes: list = []
    twinproxy = os.path.join(os.path.dirname(sys.executable), "twinproxy")
    process = spawn_proxy([twinproxy, "-c", str(config), "-s", "0", "-a", LOOPBACK, "--http-port", "0",
                           "--bound-addresses", str(bound_path)], tmp_path / "proxy.out", processes, bound_path)
    bound = bound_addresses(bound_path, process)
    env = {"process": process, "bound": bound, "http": bound["http"], "backends": backends, "caches": caches,
           "write": write, "bound_path": bound_path,
           "redis": redis.Redis(host=LOOPBACK, port=port_of(bound["pools"]["alpha"]), protocol=2,
                                socket_timeout=5),
           "memcache": MemcacheClient((LOOPBACK, port_of(bound["pools"]["beta"])), timeout=5)}
    yield env
    for each in processes:
        stop_proxy(each)


def test_page_is_served_with_the_version_at_root_and_dashboard(web_proxy) -> None:
    for path in ("/", "/dashboard/"):
        status, headers, body = http(web_proxy["http"], path)
        assert status == 200 and headers["content-type"].startswith("text/html")
        assert __version__ in body and "__TWINPROXY_VERSION__" not in body
    assert http(web_proxy["http"], "/metrics")[0] == 200   # the old routes stay
    assert http(web_proxy["http"], "/nothing-here.txt")[0] == 404


def test_state_shows_traffic_then_none_and_per_command_counts(web_proxy) -> None:
    address = web_proxy["http"]
    client = web_proxy["redis"]
    document = state(address)
    assert document["kind"] == "proxy" and document["admin"] is False and document["poll_seconds"] == 1.0
    assert document["overview"]["generation"] == 1 and document["overview"]["servers_total"] == 3
    assert {(r["pool"], r["state"]) for r in document["servers"]} == {("alpha", "up"), ("beta", "up")}

    def backends_known() -> bool:
        rows = state(address)["servers"]
        return all(r["backend"] is not None and r["backend"]["error"] is None for r in rows)
    # Each server's own INFO (redis) / stats (memcached) beside the proxy's counters, within a poll or two.
    wait_until(backends_known, timeout=15, what="the backends' INFO and stats in /api/state")
    rows = {r["pool"]: r["backend"] for r in state(address)["servers"]}
    assert rows["alpha"]["role"] == "master" and rows["alpha"]["memory"] > 0
    assert rows["beta"]["keys"] is not None and rows["beta"]["maxmemory"] > 0

    def busy() -> bool:
        for index in range(200):
            client.set(f"k{index}", "v")
            client.get(f"k{index}")
        return state(address)["overview"]["ops_per_second"] > 0

    wait_until(busy, timeout=20, what="ops/s above 0 under traffic")
    with pytest.raises(redis.ResponseError):
        client.execute_command("GET")             # wrong number of arguments: the proxy's error reply
    web_proxy["memcache"].set("m", "v")
    assert web_proxy["memcache"].get("m") == b"v"
    wait_until(lambda: state(address)["overview"]["ops_per_second"] == 0, timeout=10,
               what="ops/s back to 0 once traffic stopped")
    document = state(address)
    get, set_ = command(document, "alpha", "get"), command(document, "alpha", "set")
    assert get["calls"] >= 201 and get["errors"] == 1 and set_["calls"] >= 200 and set_["errors"] == 0
    assert get["p99_ms"] is not None and set_["p99_ms"] is not None and get["p50_ms"] <= get["p99_ms"]
    assert command(document, "beta", "get")["calls"] == 1
    assert document["overview"]["requests"] >= 403
    status, _, text = http(address, "/metrics")
    families = {family.name: family for family in text_string_to_metric_families(text)}
    errors = {(s.labels["pool"], s.labels["command"]): s.value
              for s in families["twinproxy_pool_command_errors"].samples if s.name.endswith("_total")}
    assert errors[("alpha", "get")] == 1 and errors[("alpha", "set")] == 0
    counts = {(s.labels["pool"], s.labels["command"]): s.value
              for s in families["twinproxy_pool_command_latency_seconds"].samples if s.name.endswith("_count")}
    assert counts[("alpha", "set")] == set_["calls"]   # every SET went to a server and was timed
    _, _, body = http(address, "/api/series?seconds=60")
    points = json.loads(body)["points"]
    assert points and any(p["ops_per_second"] > 0 for p in points)


def test_killed_backend_is_ejected_then_restored_with_events(web_proxy) -> None:
    address = web_proxy["http"]
    client = web_proxy["redis"]
    victim = web_proxy["backends"][0]
    web_proxy["write"](retry_ms=3000)
    assert json.loads(http(address, "/reload", "POST")[2])["ok"] is True
    victim.kill()

    def ejected():
        for index in range(50):   # some of these keys live on r0
            try:
                client.get(f"key{index}")
            except redis.RedisError:
                pass
        found = row(state(address), "alpha", "r0")
        return found if found["state"] == "ejected" else None

    found = wait_until(ejected, timeout=15, what="r0 ejected")
    assert found["ejected_until"] is not None and found["ejected_until"] > state(address)["now"] - 1
    document = state(address)
    assert any(a["kind"] == "ejected" and a["subject"] == "alpha/r0" for a in document["alerts"])
    assert document["overview"]["servers_up"] < document["overview"]["servers_total"]
    eject = events(address, "eject")
    assert eject and eject[-1]["subject"] == "alpha/r0"
    victim.restart()

    def up():
        for index in range(50):
            try:
                client.get(f"key{index}")
            except redis.RedisError:
                pass
        return row(state(address), "alpha", "r0")["state"] == "up"

    wait_until(up, timeout=20, what="r0 up again")
    assert any(e["subject"] == "alpha/r0" for e in events(address, "restore"))
    assert not [a for a in state(address)["alerts"] if a["subject"] == "alpha/r0"]


def test_reload_shows_in_events_and_generation(web_proxy) -> None:
    address = web_proxy["http"]
    web_proxy["write"](extra_server=True)
    process = web_proxy["process"]
    os.kill(process.proc.pid, signal.SIGHUP)   # SIGHUP's reloads are events too, not only POST /reload
    wait_until(lambda: state(address)["overview"]["generation"] == 2, timeout=15, what="generation 2")
    reloads = wait_until(lambda: events(address, "reload"), what="a reload event")
    assert reloads[-1]["generation"] == 2 and reloads[-1]["ok"] is True
    wait_until(lambda: any(r["name"] == "extra" for r in state(address)["servers"]), what="the added server")
    (web_proxy["bound_path"].parent / "pools.yml").write_text("alpha: [nonsense\n")
    status, _, _ = http(address, "/reload", "POST")
    assert status == 400
    refused = wait_until(lambda: [e for e in events(address, "reload") if not e["ok"]], what="a refused reload")
    assert refused[-1]["generation"] == 2
    # The SSE form carries the same events.
    with urllib.request.urlopen(f"http://{address}/api/events", timeout=5) as stream:
        assert stream.headers["content-type"] == "text/event-stream"
        seen = b""
        while b'"kind":"reload"' not in seen:
            seen += stream.readline()
