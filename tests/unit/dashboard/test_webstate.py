"""The web dashboard's pure parts: the sampler's rates, staleness and percentiles; slot runs, alerts, events."""

from __future__ import annotations

import io
from typing import Any, Dict, List

import pytest
from twisted.internet import task

from twinproxy.cluster import migrations
from twinproxy.cluster.model import Topology
from twinproxy.dashboard.audit import Audit, body_text, topology_events
from twinproxy.dashboard.backendinfo import memcache_backend, redis_backend
from twinproxy.dashboard.sampler import STALE_AFTER, Sampler
from twinproxy.dashboard.webstate import alerts, slot_runs
from twinproxy.stats import LATENCY_BUCKETS
from twinproxy.web.events import EventLog

pytestmark = pytest.mark.timeout(30)
BUCKETS = len(LATENCY_BUCKETS) + 1


class Poller:
    def __init__(self) -> None:
        self.documents: Dict[str, Dict[str, Any]] = {}
        self.received: Dict[str, float] = {}


def stats(requests: int, clients: int = 2, errors: int = 0, latency: Any = None, commands: Any = None,
          cluster: str = "shop") -> Dict[str, Any]:
    document: Dict[str, Any] = {"service": "twinproxy", "timestamp": 0, "alpha": {
        "cluster": cluster, "client_connections": clients, "forward_error": errors,
        "shop-1": {"requests": requests * 3 // 4, "server_err": 1, "out_queue": 2},
        "shop-2": {"requests": requests - requests * 3 // 4}}}
    if latency is not None:
        document["latency"] = [{"pool": "alpha", "server": "shop-1", "buckets": latency}]
    if commands is not None:
        document["commands"] = commands
    return document


def buckets(**at: int) -> List[int]:
    """The stats document's cumulative buckets for ``b<index>=<count in that bucket>``."""
    counts = [0] * BUCKETS
    for index, count in at.items():
        counts[int(index[1:])] = count
    return [sum(counts[:index + 1]) for index in range(BUCKETS)]


@pytest.fixture
def setup():
    clock = task.Clock()
    clock.advance(1000)
    poller = Poller()
    proxies = [{"id": "p1"}]
    stale: List[Any] = []
    sampler = Sampler("shop", poller, lambda: proxies, clock.seconds, on_stale=lambda pid, n: stale.append(pid))

    def fetch(pid: str, document: Dict[str, Any]) -> None:
        poller.documents[pid] = document
        poller.received[pid] = clock.seconds()

    return clock, fetch, sampler, proxies, stale


def test_rates_come_from_the_difference_of_two_documents(setup):
    clock, fetch, sampler, proxies, _ = setup
    fetch("p1", stats(1000))
    first = sampler.sample()
    assert first["ops_per_second"] == 0.0 and first["requests"] == 1000 and first["clients"] == 2
    clock.advance(1)
    fetch("p1", stats(1400, errors=4))
    latest = sampler.sample()
    assert latest["ops_per_second"] == 400.0
    assert latest["servers"][("alpha", "shop-1")]["requests_per_second"] == 300.0
    assert latest["servers"][("alpha", "shop-2")]["requests_per_second"] == 100.0
    assert latest["proxies"]["p1"]["error_rate"] == 0.01 and latest["proxies"]["p1"]["ops_per_second"] == 400.0
    assert latest["p99_ms"] is None and latest["p50_ms"] is None          # no latency buckets in the document
    clock.advance(2)
    fetch("p1", stats(1400))
    assert sampler.sample()["ops_per_second"] == 0.0                      # traffic stopped
    assert [p["ops_per_second"] for p in sampler.series.document(clock.seconds(), 300, 1.0)["points"]] == \
        [0.0, 400.0, 0.0]


def test_ops_and_requests_are_command_calls_when_the_document_has_them(setup):
    # As the proxy's own page counts: one per client request (a split MGET is one, a reply the proxy made
    # counts); the servers' requests (fragments, no proxy replies) stay the per-server rates.
    clock, fetch, sampler, _, _ = setup

    def document(requests: int, commands: List[Dict[str, Any]]) -> Dict[str, Any]:
        found = stats(requests, commands=commands)
        found["alpha"]["shop-2"]["server_eof"] = 2
        found["beta"] = {"cluster": "other", "shop-9": {"requests": 5000}}
        return found

    fetch("p1", document(1000, [{"pool": "alpha", "command": "get", "calls": 300, "errors": 0, "buckets": []}]))
    first = sampler.sample()
    assert first["requests"] == 300 and first["ops_per_second"] == 0.0
    clock.advance(2)
    fetch("p1", document(1400, [{"pool": "alpha", "command": "get", "calls": 500, "errors": 0, "buckets": []},
                                {"pool": "alpha", "command": "ping", "calls": 40, "errors": 0, "buckets": []},
                                {"pool": "beta", "command": "get", "calls": 9000, "errors": 0, "buckets": []}]))
    latest = sampler.sample()
    assert latest["requests"] == 540                                  # this cluster's pools only
    assert latest["ops_per_second"] == 120.0                          # (200 more get + 40 new ping) / 2 s
    assert latest["proxies"]["p1"]["ops_per_second"] == 120.0
    assert latest["servers"][("alpha", "shop-1")]["requests_per_second"] == 150.0
    # errors as the proxy's page: server_err + server_eof
    assert latest["servers"][("alpha", "shop-1")]["errors"] == 1
    assert latest["servers"][("alpha", "shop-2")]["errors"] == 2


def test_other_clusters_pools_do_not_count(setup):
    clock, fetch, sampler, _, _ = setup
    fetch("p1", stats(100, cluster="other"))
    sampler.sample()
    clock.advance(1)
    fetch("p1", stats(500, cluster="other"))
    assert sampler.sample()["ops_per_second"] == 0.0 and sampler.latest["requests"] == 0


def test_stale_only_after_three_missed_samples_in_a_row(setup):
    clock, fetch, sampler, _, stale = setup
    fetch("p1", stats(0))
    sampler.sample()
    clock.advance(1)
    fetch("p1", stats(100))
    sampler.sample()
    for missed in range(1, STALE_AFTER):
        clock.advance(1)
        latest = sampler.sample()
        assert latest["proxies"]["p1"] == {**latest["proxies"]["p1"], "missed": missed, "stale": False}
        assert latest["ops_per_second"] == 100.0           # its last good document keeps counting
    clock.advance(1)
    latest = sampler.sample()
    assert latest["proxies"]["p1"]["stale"] is True and latest["proxies"]["p1"]["missed"] == STALE_AFTER
    assert latest["ops_per_second"] == 0.0 and latest["requests"] == 0 and stale == ["p1"]
    clock.advance(1)
    sampler.sample()
    assert stale == ["p1"]                                  # one event per stale spell
    fetch("p1", stats(200))
    latest = sampler.sample()
    assert latest["proxies"]["p1"]["stale"] is False and latest["proxies"]["p1"]["missed"] == 0


def test_p99_from_the_latency_buckets(setup):
    clock, fetch, sampler, _, _ = setup
    fetch("p1", stats(0, latency=buckets(b3=50), commands=[
        {"pool": "alpha", "command": "get", "calls": 10, "errors": 0, "buckets": buckets(b3=10)}]))
    sampler.sample()
    clock.advance(1)
    # 99 fast ones in bucket 3 and one slow one in bucket 10, since the last document.
    fetch("p1", stats(100, latency=buckets(b3=149, b10=1), commands=[
        {"pool": "alpha", "command": "get", "calls": 110, "errors": 2, "buckets": buckets(b3=110)},
        {"pool": "other", "command": "set", "calls": 5, "errors": 0, "buckets": buckets(b1=5)}]))
    latest = sampler.sample()
    low, high = LATENCY_BUCKETS[2], LATENCY_BUCKETS[3]
    p50 = round((low + (high - low) * 0.5 * 100 / 99) * 1000, 3)
    assert latest["p50_ms"] == p50 and latest["servers"][("alpha", "shop-1")]["p50_ms"] == p50
    assert latest["p99_ms"] == round(high * 1000, 3)
    assert latest["commands"] == [{"command": "get", "calls": 110, "errors": 2,
                                   "p50_ms": round((low + (high - low) * 0.5) * 1000, 3),
                                   "p99_ms": round((low + (high - low) * 0.99) * 1000, 3)}]
    clock.advance(1)
    fetch("p1", stats(100, latency=buckets(b3=149, b10=1)))
    assert sampler.sample()["p99_ms"] is None                # no request in the last sample


def test_a_proxy_that_leaves_is_forgotten(setup):
    clock, fetch, sampler, proxies, _ = setup
    fetch("p1", stats(0))
    sampler.sample()
    proxies.clear()
    assert sampler.sample()["proxies"] == {} and sampler.tracks == {}


def test_backend_info_of_redis_and_memcached():
    info = (b"# Memory\r\nused_memory:1024\r\nmaxmemory:0\r\n# Stats\r\nkeyspace_hits:3\r\nkeyspace_misses:1\r\n"
            b"evicted_keys:7\r\n# Replication\r\nrole:master\r\nmaster_repl_offset:99\r\n# Keyspace\r\n"
            b"db0:keys=5,expires=0,avg_ttl=0\r\ndb3:keys=2,expires=1,avg_ttl=0\r\n")
    assert redis_backend(info) == {"role": "master", "memory": 1024, "maxmemory": 0, "keys": 7, "hit_ratio": 0.75,
                                   "evictions": 7, "error": None, "repl_offset": 99}
    assert redis_backend(b"used_memory:5\r\nrole:slave\r\n")["keys"] == 0
    assert memcache_backend({"bytes": "10", "limit_maxbytes": "64", "curr_items": "2", "get_hits": "0",
                             "get_misses": "0", "evictions": "1"}) == {
        "role": "master", "memory": 10, "maxmemory": 64, "keys": 2, "hit_ratio": None, "evictions": 1,
        "error": None, "repl_offset": None}


def topology() -> Topology:
    t = Topology.empty("shop", "redis").add_group(1).add_server(1, "127.0.0.1:7001").add_group(2)
    t = t.add_server(2, "127.0.0.1:7002").add_server(2, "127.0.0.1:7003")
    return t.assign_slots(0, 1023, 1)


def test_slot_runs_sum_to_1024_and_show_migrations():
    t = topology()
    runs = slot_runs(t)
    assert runs == [{"from": 0, "to": 1023, "group": 1, "state": "stable", "target": None, "migration": None}]
    t = migrations.create(t, 0, 99, 2)
    t = migrations.advance(t, 1)
    runs = slot_runs(t)
    assert sum(run["to"] - run["from"] + 1 for run in runs) == 1024
    assert runs[0]["from"] == 0 and runs[0]["to"] == 99 and runs[0]["migration"] == 1 and runs[0]["target"] == 2
    assert runs[0]["state"] == "migrating" and runs[1]["state"] == "stable"
    offline = slot_runs(t.assign_slots(1000, 1023, None, True))
    assert offline[-1]["state"] == "offline" and offline[-1]["group"] is None


def test_topology_events():
    t = topology()
    queued = migrations.create(t, 0, 9, 2)
    events = topology_events(t, queued)
    assert [e[0] for e in events] == ["generation", "migration"] and "created" in events[1][2]
    failed = migrations.fail(queued, 1, "the target's Redis is older")
    events = topology_events(queued, failed)
    assert events[1][0] == "migration" and events[1][2].endswith("failed: the target's Redis is older")
    assert topology_events(None, t) == [] and topology_events(t, t) == []


def test_alerts():
    groups = [{"id": 1, "servers": [{"addr": "a:1", "expected_role": "master", "up": False, "link_up": None,
                                     "error": "refused"},
                                    {"addr": "a:2", "expected_role": "replica", "up": True, "link_up": False,
                                     "error": None}]}]
    found = alerts([], [{"id": "p1", "stale": True, "missed": 3}], groups, [{"addr": "s:1", "up": False,
                                                                             "error": "x"}],
                   {"migrations": [{"id": 4, "state": "failed", "error": "boom"}]}, ["p2"])
    assert [(a["kind"], a["subject"]) for a in found] == [("down", "a:1"), ("lagging", "a:2"), ("stale", "p1"),
                                                           ("stale", "p2"), ("migration_failed", "migration 4"),
                                                           ("sentinel", "s:1")]


def test_alerts_wait_for_a_first_poll():
    # "up": None is "not polled yet" (the dashboard just started): no alert, it is not known to be down.
    groups = [{"id": 1, "servers": [{"addr": "a:1", "expected_role": "master", "up": None, "link_up": None,
                                     "error": None}]}]
    assert alerts([], [], groups, [{"addr": "s:1", "up": None, "error": None}], {"migrations": []}, []) == []


def test_audit_records_the_body_capped():
    log = EventLog(lambda: 5.0)
    request = type("R", (), {"content": io.BytesIO(b'{"id": 1}')})()
    Audit(log).record("POST", "/api/groups", "127.0.0.1:5", body_text(request), 403, "wrong token")
    event = log.since(0)[0]
    assert (event["kind"], event["body"], event["status"], event["error"]) == ("audit", {"id": 1}, 403,
                                                                               "wrong token")
    big = type("R", (), {"content": io.BytesIO(b"x" * 5000)})()
    assert len(body_text(big)) == 2048 + 3


def test_a_write_to_a_read_only_document_is_405_and_audited() -> None:
    from twisted.web.test.requesthelper import DummyRequest

    from twinproxy.dashboard.webstate import WebState

    clock = task.Clock()
    web = WebState("shop", "redis", clock, Poller(), lambda: [], admin=True)
    leaves = web.resources(lambda: False)
    for name in (b"state", b"series", b"events"):
        request = DummyRequest([])
        request.method = b"POST"
        request.path = b"/api/" + name
        request.content = io.BytesIO(b'{"x": 1}')
        body = leaves[name].render(request)
        assert request.responseCode == 405 and b"not allowed" in body
    audits = [e for e in web.events.since(0) if e["kind"] == "audit"]
    assert [(e["path"], e["status"], e["body"]) for e in audits] == [
        ("/api/state", 405, {"x": 1}), ("/api/series", 405, {"x": 1}), ("/api/events", 405, {"x": 1})]
    web.stop()


def test_backend_poll_that_raises_does_not_stop_its_loop() -> None:
    from twinproxy.dashboard.backendinfo import BackendPoller

    clock = task.Clock()
    calls = []

    def addresses() -> List[str]:
        calls.append(1)
        raise RuntimeError("topology being replaced")
    poller = BackendPoller(clock, "redis", addresses, 1.0, period=3.0)
    poller.start()
    clock.advance(3.0)
    assert len(calls) == 2 and poller._loop.running
    poller.stop()
