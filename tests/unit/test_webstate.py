"""The proxy's dashboard document, sampler and events (twinproxy/webstate.py), and the per-command counters.

Hand-made snapshots for the arithmetic; a PoolRuntime on a MemoryReactorClock
with StringTransports for the sampler, the events and the counting.
"""

from __future__ import annotations

from typing import Any, Dict, List

import pytest
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger

from twinproxy import stats
from twinproxy.config import load_text
from twinproxy.protocols.resp import encode_command
from twinproxy.reload import ReloadResult
from twinproxy.runtime import PoolRuntime
from twinproxy.stats import LATENCY_BUCKETS
from twinproxy.webstate import ProxyWebState, health_events, sample_figures, state_document

pytestmark = pytest.mark.timeout(30)

POOL = """\
alpha:
  listen: 127.0.0.1:22121
  redis: true
  timeout: 400
  auto_eject_hosts: true
  server_failure_limit: 1
  server_retry_timeout: 5000
  servers:
   - 10.0.0.1:6379:1 a
   - 10.0.0.2:6379:2 b
"""


def counts(**at: int) -> List[int]:
    """Per-bucket counts with ``b<index>=n`` set."""
    buckets = [0] * (len(LATENCY_BUCKETS) + 1)
    for name, value in at.items():
        buckets[int(name[1:])] = value
    return buckets


def server(name: str, requests: int, latency: List[int], state: str = "up", **more: Any) -> Dict[str, Any]:
    row = {"pool": "alpha", "name": name, "addr": f"10.0.0.1:{name}", "role": None, "state": state,
           "ejected_until": None, "weight": 1, "connections": 1, "in_flight": 0, "requests": requests,
           "errors": 0, "timeouts": 0, "latency": latency, "switches": 0, "sentinel": False}
    row.update(more)
    return row


def snapshot(time: float, requests: int, servers: list, commands: list, generation: int = 1) -> dict:
    return {"time": time, "requests": requests, "clients": 2, "generation": generation, "servers": servers,
            "commands": commands}


def test_rates_and_percentiles_come_from_the_last_sample() -> None:
    before = snapshot(100.0, 1000, [server("a", 500, counts(b3=500))],
                      [{"pool": "alpha", "command": "get", "calls": 1000, "errors": 0, "latency": counts(b3=1000)}])
    after = snapshot(102.0, 3000, [server("a", 1500, counts(b3=500, b5=1000))],
                     [{"pool": "alpha", "command": "get", "calls": 3000, "errors": 4,
                       "latency": counts(b3=1000, b5=2000)}])
    document = state_document(before, after, "host", started=90.0)
    assert document["kind"] == "proxy" and document["uptime"] == 12.0 and document["admin"] is False
    overview = document["overview"]
    assert overview["ops_per_second"] == 1000.0 and overview["requests"] == 3000 and overview["generation"] == 1
    # All of the sample's 2000 requests were in bucket 5 (2.5 ms .. 5 ms): p99 near its top.
    assert 2.5 < overview["p99_ms"] <= 5.0
    row = document["servers"][0]
    assert row["requests_per_second"] == 500.0 and 2.5 < row["p50_ms"] < row["p99_ms"] <= 5.0
    # Commands: since start, beside their totals.
    (get,) = document["commands"]
    assert get["calls"] == 3000 and get["errors"] == 4 and get["p99_ms"] <= 5.0


def test_no_request_in_the_sample_gives_zero_and_null() -> None:
    rows = [server("a", 10, counts(b2=10))]
    commands = [{"pool": "alpha", "command": "get", "calls": 10, "errors": 0, "latency": counts(b2=10)}]
    document = state_document(snapshot(1.0, 10, rows, commands), snapshot(2.0, 10, rows, commands), "h", 0.0)
    assert document["overview"]["ops_per_second"] == 0.0 and document["overview"]["p99_ms"] is None
    assert document["servers"][0]["p99_ms"] is None
    assert sample_figures(None, snapshot(2.0, 10, rows, commands)) == {"ops_per_second": 0.0, "p99_ms": None}


def test_ejected_down_and_draining_rows_alerts_and_counts() -> None:
    rows = [server("a", 0, counts(), state="ejected", ejected_until=130.0), server("b", 0, counts(), state="down"),
            server("c", 0, counts()), server("gone", 0, counts(), state="draining")]
    document = state_document(None, snapshot(100.0, 0, rows, []), "h", 0.0)
    assert [(a["kind"], a["subject"]) for a in document["alerts"]] == [("ejected", "alpha/a"), ("down", "alpha/b")]
    assert document["servers"][0]["ejected_until"] == 130.0
    assert (document["overview"]["servers_up"], document["overview"]["servers_total"]) == (1, 3)


def test_health_events_from_two_samples() -> None:
    before = snapshot(1.0, 0, [server("a", 0, counts()), server("b", 0, counts(), state="down"),
                               server("s", 0, counts(), switches=1, sentinel=True, role="master")], [])
    after = snapshot(2.0, 0, [server("a", 0, counts(), state="down"), server("b", 0, counts()),
                              server("s", 0, counts(), switches=2, sentinel=True, role="master", addr="x:2")], [])
    assert [(e["kind"], e["subject"]) for e in health_events(before, after)] == \
        [("down", "alpha/a"), ("up", "alpha/b"), ("switch-master", "alpha/s")]
    assert health_events(None, after) == []


class FakeService:
    """What the web state reads of a PoolService, over a PoolRuntime."""

    def __init__(self, runtime: PoolRuntime) -> None:
        self.runtime = runtime
        self.name = runtime.name
        self.pool = runtime.pool
        self.factory = runtime.factory

    @property
    def links(self):
        return self.runtime.links


def harness():
    (config,) = load_text(POOL)
    reactor = MemoryReactorClock()
    reactor.advance(1000.0)
    runtime = PoolRuntime(config, reactor, outbox=None)
    service = FakeService(runtime)

    class Counters:
        generation = 1

    web = ProxyWebState(lambda: [service], 990.0, reactor, Counters(), name="test")
    return reactor, runtime, web


def answer_backends(reactor, replies: bytes) -> list:
    connections = []
    while reactor.tcpClients:
        _, _, factory, _, _ = reactor.tcpClients.pop(0)
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        connections.append(protocol)
    return connections


def test_sampler_feeds_the_series_and_ejection_events_with_ejected_until() -> None:
    reactor, runtime, web = harness()
    web.start()
    assert web.series.last()["ops_per_second"] == 0.0
    client = runtime.factory.buildProtocol(None)
    client.makeConnection(StringTransport())
    client.dataReceived(b"PING\r\n" * 30)
    reactor.advance(1.0)
    assert web.series.last()["ops_per_second"] == 30.0
    document = web.document()
    assert document["overview"]["requests"] == 30 and document["name"] == "test"
    assert [c["command"] for c in document["commands"]] == ["ping"]

    pool = runtime.pool
    victim = pool.servers[0]
    pool.record_failure(victim, "connection refused")
    (eject,) = web.events.since(0)
    assert eject["kind"] == "eject" and eject["subject"] == "alpha/a" and eject["until"] == 1006.0
    reactor.advance(1.0)
    row = web.document()["servers"][0]
    assert row["state"] == "ejected" and row["ejected_until"] == 1006.0
    assert web.document()["alerts"][0]["kind"] == "ejected"
    for _ in range(5):     # server_retry_timeout passes: back in the ring, and sampled since
        reactor.advance(1.0)
    assert [e["kind"] for e in web.events.since(eject["id"])] == ["restore"]
    assert web.document()["servers"][0]["state"] == "up"

    web.reload_done(ReloadResult(True, 200, 2, changes=["pool alpha: server c added"]))
    web.reload_done(ReloadResult(False, 400, 2, error="bad file"))
    reloads = [e for e in web.events.since(0) if e["kind"] == "reload"]
    assert [(e["ok"], e["generation"]) for e in reloads] == [(True, 2), (False, 2)]
    web.stop()
    assert web._health_changed not in pool.health_listeners
    calls = len(web.series.document(reactor.seconds(), 600, 1.0)["points"])
    reactor.advance(5.0)
    assert len(web.series.document(reactor.seconds(), 600, 1.0)["points"]) == calls   # stopped


def test_per_command_calls_errors_and_latency_through_the_frontend() -> None:
    reactor, runtime, _ = harness()
    client = runtime.factory.buildProtocol(None)
    out = StringTransport()
    client.makeConnection(out)
    key = next(b"k%d" % i for i in range(1000) if runtime.pool.server_for_key(b"k%d" % i).name == "a")
    client.dataReceived(encode_command([b"GET", key]) + encode_command([b"GET"]) + encode_command([b"GET", key]))
    (backend,) = answer_backends(reactor, b"")
    reactor.advance(0.002)
    backend.dataReceived(b"$1\r\nv\r\n-ERR from the server\r\n"[:7])
    backend.dataReceived(b"-ERR from the server\r\n")
    get = runtime.pool.counters.commands["get"]
    assert get.calls == 3
    assert get.errors == 2          # the proxy's (wrong arity) and the server's
    assert get.latency.count == 2   # the two the server answered, 2 ms each
    assert get.latency.counts[LATENCY_BUCKETS.index(0.0025)] == 2
    server_latency = runtime.pool.servers[0].counters.latency
    assert server_latency.counts == get.latency.counts   # the same span, measured once


def test_a_split_mget_is_one_latency_observation_and_its_error_still_counts() -> None:
    reactor, runtime, _ = harness()
    client = runtime.factory.buildProtocol(None)
    out = StringTransport()
    client.makeConnection(out)
    pool = runtime.pool
    on_a = next(b"k%d" % i for i in range(1000) if pool.server_for_key(b"k%d" % i).name == "a")
    on_b = next(b"k%d" % i for i in range(1000) if pool.server_for_key(b"k%d" % i).name == "b")
    client.dataReceived(encode_command([b"MGET", on_a, on_b]) + encode_command([b"MGET", on_a, on_b]))
    backends = {}
    while reactor.tcpClients:
        host, _, factory, _, _ = reactor.tcpClients.pop(0)
        backends[host] = factory.buildProtocol(None)
        backends[host].makeConnection(StringTransport())
    reactor.advance(0.002)
    backends["10.0.0.1"].dataReceived(b"*1\r\n$1\r\nx\r\n" * 2)
    reactor.advance(0.002)
    backends["10.0.0.2"].dataReceived(b"*1\r\n$1\r\ny\r\n-ERR from b\r\n")
    mget = pool.counters.commands["mget"]
    assert mget.calls == 2 and pool.counters.fragments == 4
    assert mget.latency.count == 2                       # one per MGET, not one per fragment
    assert mget.latency.counts[LATENCY_BUCKETS.index(0.005)] == 2   # to the last fragment's reply (4 ms)
    assert mget.errors == 1                              # the second MGET's merged reply is an error
    assert sum(s.counters.latency.count for s in pool.servers) == 4   # the servers time each fragment
    assert out.value().startswith(b"*2\r\n$1\r\nx\r\n$1\r\ny\r\n")


def test_a_sampler_error_is_logged_and_sampling_goes_on() -> None:
    reactor, runtime, _ = harness()
    calls = []

    def pools():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("one bad sample")
        return [FakeService(runtime)]

    web = ProxyWebState(pools, 990.0, reactor, name="test")
    logged = []
    web._log = Logger(observer=logged.append)
    web.start()
    reactor.advance(1.0)                                  # the one that raises
    assert len(logged) == 1 and logged[0]["log_failure"].check(RuntimeError)
    reactor.advance(1.0)
    reactor.advance(1.0)
    assert len(calls) == 4 and web._loop.running
    assert len(web.series.document(reactor.seconds(), 600, 1.0)["points"]) == 3
    web.stop()


def test_stats_rows_are_cumulative_and_summed_over_workers() -> None:
    histogram = stats.Histogram()
    histogram.observe(0.0003)
    histogram.observe(0.003)
    assert stats.cumulative(histogram)[:6] == [0, 0, 1, 1, 1, 2] and stats.cumulative(histogram)[-1] == 2
    one = {"service": "twinproxy", "latency": [{"pool": "p", "server": "s", "buckets": [1, 2]}],
           "commands": [{"pool": "p", "command": "get", "calls": 3, "errors": 1, "buckets": [1, 3]}],
           "p": {"client_eof": 1}}
    two = {"service": "twinproxy", "latency": [{"pool": "p", "server": "s", "buckets": [0, 5]},
                                               {"pool": "p", "server": "t", "buckets": [1, 1]}],
           "commands": [{"pool": "p", "command": "get", "calls": 2, "errors": 0, "buckets": [2, 2]}],
           "p": {"client_eof": 2}}
    merged = stats.merge_documents([one, two])
    assert merged["latency"] == [{"pool": "p", "server": "s", "buckets": [1, 7]},
                                 {"pool": "p", "server": "t", "buckets": [1, 1]}]
    assert merged["commands"] == [{"pool": "p", "command": "get", "calls": 5, "errors": 1, "buckets": [3, 5]}]
    assert merged["p"] == {"client_eof": 3}
    assert "latency" in stats.describe() and "commands" in stats.describe()


def test_backend_addresses_by_protocol_without_auth_pools_sockets_or_draining() -> None:
    from types import SimpleNamespace

    from twinproxy.webstate import backend_addresses

    def service(name: str, protocol: str, auth: str = None) -> SimpleNamespace:
        return SimpleNamespace(name=name, config=SimpleNamespace(protocol=protocol, redis_auth=auth))

    services = [service("r", "redis"), service("m", "memcache"), service("secret", "redis", "pw")]
    rows = [{"pool": "r", "addr": "127.0.0.1:6379", "state": "up"},
            {"pool": "r", "addr": "127.0.0.1:6380", "state": "draining"},
            {"pool": "m", "addr": "/tmp/mc.sock", "state": "up"},
            {"pool": "m", "addr": "127.0.0.1:11211", "state": "down"},
            {"pool": "secret", "addr": "127.0.0.1:6390", "state": "up"}]
    assert backend_addresses(services, {"servers": rows}) == {"redis": ["127.0.0.1:6379"],
                                                              "memcache": ["127.0.0.1:11211"]}
