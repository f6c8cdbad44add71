"""The dashboard's /metrics (twinproxy/dashboard/metrics.py): sums and per-proxy values, the cluster
gauges, and the stats fetch itself (on a MemoryReactorClock and a StringTransport: no sockets)."""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from twinproxy.dashboard.metrics import (
    FETCH_TIMEOUT,
    MAX_DOCUMENT,
    StatsPoller,
    _Fetch,
    cluster_counters,
    render,
    split_admin,
)


def stats_document(requests: int, clients: int, cluster: str = "shop") -> Dict[str, Any]:
    """A proxy's stats port document (nutcracker layout), one cluster pool over two servers + another pool."""
    server = {"requests": requests, "responses": requests, "server_err": 1, "server_connections": 1,
              "request_bytes": 10, "response_bytes": 20}
    return {"service": "twinproxy", "uptime": 3, "curr_connections": 9,
            "shop-pool": {"cluster": cluster, "cluster_generation": 4, "client_connections": clients,
                          "client_err": 2, "forward_error": 1, "client_eof": 0, "127.0.0.1:6379": dict(server),
                          "127.0.0.1:6380": dict(server)},
            "plain": {"client_connections": 100, "127.0.0.1:1": {"requests": 1000}}}


STATUS = {"cluster": "shop", "generation": 5, "offline_slots": 512, "slots_per_group": {"1": 512},
          "writable": True, "lagging": ["b"],
          "groups": [{"id": 1, "servers": [{"addr": "127.0.0.1:6379", "role": "master", "up": True},
                                           {"addr": "127.0.0.1:6380", "role": "replica", "up": False}]}],
          "proxies": [{"id": "a", "addr": "127.0.0.1:19000", "admin": "127.0.0.1:22222", "generation": 5,
                       "last_seen": 1000.0},
                      {"id": "b", "addr": "127.0.0.1:19001", "admin": "127.0.0.1:22223", "generation": 4,
                       "last_seen": 1001.0}]}


def samples(text: bytes) -> Dict[tuple, float]:
    found = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_cluster_counters_read_only_this_clusters_pools():
    totals = cluster_counters(stats_document(7, 3), "shop")
    assert totals["requests"] == 14 and totals["client_connections"] == 3 and totals["server_err"] == 2
    assert totals["client_err"] == 2 and totals["forward_error"] == 1
    assert cluster_counters(stats_document(7, 3, cluster="other"), "shop")["requests"] == 0


def test_sums_per_proxy_values_and_cluster_gauges():
    poller = StatsPoller(MemoryReactorClock(), lambda: STATUS["proxies"])
    poller.documents = {"a": stats_document(7, 3), "b": stats_document(5, 1)}
    poller.up = {"a": True, "b": False}           # b's last fetch failed: its last document still counts
    poller.failures = {"b": 2}
    found = samples(render("shop", lambda: STATUS, poller))
    shop = (("cluster", "shop"),)
    assert found[("twinproxy_dashboard_requests_total", shop)] == 24
    assert found[("twinproxy_dashboard_client_connections", shop)] == 4
    assert found[("twinproxy_dashboard_proxy_requests_total", (("cluster", "shop"), ("proxy", "a")))] == 14
    assert found[("twinproxy_dashboard_proxy_client_connections", (("cluster", "shop"), ("proxy", "b")))] == 1
    assert found[("twinproxy_dashboard_proxy_up", (("cluster", "shop"), ("proxy", "b")))] == 0
    assert found[("twinproxy_dashboard_proxy_stats_failures_total", (("cluster", "shop"), ("proxy", "b")))] == 2
    assert found[("twinproxy_dashboard_proxy_generation", (("cluster", "shop"), ("proxy", "b")))] == 4
    assert found[("twinproxy_dashboard_generation", shop)] == 5
    assert found[("twinproxy_dashboard_proxies", shop)] == 2
    assert found[("twinproxy_dashboard_proxies_lagging", shop)] == 1
    assert found[("twinproxy_dashboard_groups", shop)] == 1
    assert found[("twinproxy_dashboard_offline_slots", shop)] == 512
    assert found[("twinproxy_dashboard_group_slots", (("cluster", "shop"), ("group", "1")))] == 512
    assert found[("twinproxy_dashboard_server_up", (("cluster", "shop"), ("group", "1"), ("role", "replica"),
                                                    ("server", "127.0.0.1:6380")))] == 0
    assert found[("twinproxy_dashboard_ready", shop)] == 1


def test_before_the_dashboard_is_ready_only_ready_0():
    found = samples(render("shop", lambda: None, StatsPoller(MemoryReactorClock(), list)))
    assert found == {("twinproxy_dashboard_ready", (("cluster", "shop"),)): 0}


def test_split_admin_replaces_a_wildcard_host():
    assert split_admin("127.0.0.1:22222") == ("127.0.0.1", 22222)
    assert split_admin("[::1]:22222") == ("::1", 22222)
    assert split_admin("0.0.0.0:22222", ("10.0.0.5:19000", "h")) == ("10.0.0.5", 22222)
    assert split_admin("0.0.0.0:22222", ("0.0.0.0:19000", "proxyhost")) == ("proxyhost", 22222)
    assert split_admin("[::]:22222") == ("127.0.0.1", 22222)


class _Done:
    def __init__(self) -> None:
        self.calls: List[tuple] = []

    def __call__(self, document: Optional[Dict[str, Any]], problem: Optional[str]) -> None:
        self.calls.append((document, problem))


def _connected(fetch: _Fetch) -> Any:
    protocol = fetch.buildProtocol(None)
    protocol.makeConnection(StringTransport())
    return protocol


def test_fetch_reads_one_document_until_close():
    done = _Done()
    fetch = _Fetch(MemoryReactorClock(), done)
    protocol = _connected(fetch)
    text = json.dumps(stats_document(1, 1)).encode()
    protocol.dataReceived(text[:10])
    protocol.dataReceived(text[10:])
    protocol.connectionLost(Failure(ConnectionError("closed")))
    assert done.calls == [(stats_document(1, 1), None)]


def test_fetch_problems_each_reported_once():
    clock = MemoryReactorClock()
    done = _Done()
    fetch = _Fetch(clock, done)
    fetch.connector = type("Connector", (), {"disconnect": lambda self: None})()
    clock.advance(FETCH_TIMEOUT)
    assert done.calls == [(None, f"no complete stats document within {FETCH_TIMEOUT:g}s")]
    fetch.clientConnectionFailed(None, Failure(ConnectionRefusedError("refused")))
    assert len(done.calls) == 1

    done = _Done()
    protocol = _connected(_Fetch(clock, done))
    protocol.dataReceived(b"not json")
    protocol.connectionLost(Failure(ConnectionError("closed")))
    assert done.calls[0][0] is None and "no JSON" in done.calls[0][1]

    done = _Done()
    protocol = _connected(_Fetch(clock, done))
    protocol.dataReceived(b" " * (MAX_DOCUMENT + 1))
    assert done.calls[0][0] is None and "larger" in done.calls[0][1]


def test_poller_fetches_each_proxy_once_at_a_time_and_forgets_those_that_left():
    reactor = MemoryReactorClock()
    proxies = [dict(p) for p in STATUS["proxies"]] + [{"id": "c", "admin": None}]
    poller = StatsPoller(reactor, lambda: proxies)
    poller.poll()
    assert [(host, port) for host, port, *_ in reactor.tcpClients] == [("127.0.0.1", 22222), ("127.0.0.1", 22223)]
    assert poller.up == {"c": False}
    poller.poll()                                  # both still fetching: no second connection
    assert len(reactor.tcpClients) == 2
    factory = reactor.tcpClients[0][2]
    factory.finish(json.dumps(stats_document(1, 1)).encode(), None)
    assert poller.up["a"] is True and "a" in poller.documents
    del proxies[0]
    poller.poll()
    assert "a" not in poller.documents and "a" not in poller.up
