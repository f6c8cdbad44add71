"""The dashboard's ``/metrics``: the whole cluster's counters (sums and per proxy), and its own gauges.

Owns :class:`StatsPoller` (every :data:`POLL_SECONDS`, one connection to
each registered proxy's stats port — its registration's ``admin`` address —
which sends one JSON document and closes, nutcracker style; bounded in
time and size, never more than one fetch per proxy at a time, all in the
reactor without blocking it) and :func:`render` (Prometheus text from the
last documents and the controller's status).

The proxy counters are read from the pools of each document that belong to
this cluster (a pool document whose ``cluster`` field names it), summed
over the pool's servers where they are per server.  Families:

- ``twinproxy_dashboard_<field>{cluster}``: the sum over every proxy;
- ``twinproxy_dashboard_proxy_<field>{cluster,proxy}``: each proxy's value;
- ``twinproxy_dashboard_proxy_up`` (its last stats fetch worked),
  ``..._proxy_generation`` (applied, from its registration),
  ``..._proxy_last_seen_timestamp_seconds``;
- the cluster's gauges: ``generation``, ``proxies``, ``proxies_lagging``,
  ``groups``, ``offline_slots``, ``group_slots{group}``,
  ``server_up{group,server,role}``, ``writable``, ``ready``.

A proxy's last good document counts in the sums until its registration
goes, so one missed fetch does not make the sums dip.  The names differ
from the proxies' own (``twinproxy_pool_*``), so scraping both never
counts a request twice.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.internet import task
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
POLL_SECONDS = 2.0
FETCH_TIMEOUT = 1.5
MAX_DOCUMENT = 8 * 1024 * 1024

# (field, help, counter?) read from a pool document
POOL_FIELDS: Tuple[Tuple[str, str, bool], ...] = (
    ("client_connections", "Client connections open now", False),
    ("client_eof", "Client connections closed by the client", True),
    ("client_err", "Client connections that failed or broke the protocol", True),
    ("forward_error", "Requests answered with an error because their server failed", True),
    ("server_ejects", "Servers ejected from a ring", True),
    ("fragments", "Sub-requests made by splitting multi-key requests", True),
    ("client_output_limit_closed", "Clients closed for passing client_output_hard_limit", True),
)
# (field, help, counter?) summed over the servers of a pool document
SERVER_FIELDS: Tuple[Tuple[str, str, bool], ...] = (
    ("requests", "Requests sent to the servers", True),
    ("request_bytes", "Bytes of requests sent to the servers", True),
    ("responses", "Replies received from the servers", True),
    ("response_bytes", "Bytes of replies received from the servers", True),
    ("server_eof", "Server connections the servers closed", True),
    ("server_err", "Server connections that failed", True),
    ("server_timedout", "Server connections closed on a reply timeout", True),
    ("server_connections", "Connections to the servers open now", False),
    ("in_queue", "Requests waiting for a server connection", False),
    ("out_queue", "Requests sent and awaiting a reply", False),
)


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


def cluster_counters(document: Dict[str, Any], cluster: str) -> Dict[str, float]:
    """The counters of ``cluster``'s pools in one stats document, summed over those pools."""
    totals: Dict[str, float] = {name: 0 for name, _, _ in (*POOL_FIELDS, *SERVER_FIELDS)}
    for pool in document.values():
        if not isinstance(pool, dict) or pool.get("cluster") != cluster:
            continue
        for name, _, _ in POOL_FIELDS:
            totals[name] += _number(pool.get(name)) or 0
        for server in pool.values():
            if isinstance(server, dict):
                for name, _, _ in SERVER_FIELDS:
                    totals[name] += _number(server.get(name)) or 0
    return totals


def split_admin(admin: str, fallbacks: Tuple[Optional[str], ...] = ()) -> Tuple[str, int]:
    """(host, port) to reach a stats port at ``admin``; a wildcard host is replaced by a fallback's host."""
    host, _, port = admin.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
        for fallback in fallbacks:
            if fallback:
                other = fallback.rpartition(":")[0].strip("[]") if ":" in fallback else fallback
                if other and other not in ("0.0.0.0", "::"):
                    host = other
                    break
    return host, int(port)


class _ReadAll(Protocol):
    """Reads until the stats port closes; the factory gets the bytes (or why not)."""

    def connectionMade(self) -> None:
        self.chunks: List[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > MAX_DOCUMENT:
            self.factory.finish(None, f"the stats document is larger than {MAX_DOCUMENT} bytes")
            self.transport.abortConnection()
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Any) -> None:
        self.factory.finish(b"".join(self.chunks), None)


class _Fetch(ClientFactory):
    """One fetch of one stats document: ``done(document_or_None, problem_or_None)`` exactly once."""

    protocol = _ReadAll
    noisy = False

    def __init__(self, reactor: Any, done: Callable[[Optional[Dict[str, Any]], Optional[str]], None]) -> None:
        self._done: Optional[Callable[..., None]] = done
        self.connector: Any = None
        self._timer = reactor.callLater(FETCH_TIMEOUT, self._overdue)

    def _overdue(self) -> None:
        self.finish(None, f"no complete stats document within {FETCH_TIMEOUT:g}s")
        if self.connector is not None:
            self.connector.disconnect()

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        self.finish(None, f"cannot connect: {reason.getErrorMessage()}")

    def finish(self, data: Optional[bytes], problem: Optional[str]) -> None:
        done, self._done = self._done, None
        if done is None:
            return
        if self._timer.active():
            self._timer.cancel()
        if problem is None:
            try:
                document = json.loads((data or b"").decode("utf-8"))
                if not isinstance(document, dict):
                    raise ValueError("not a JSON object")
            except (UnicodeDecodeError, ValueError) as err:
                done(None, f"the stats port sent no JSON document: {err}")
                return
            done(document, None)
        else:
            done(None, problem)


class StatsPoller:
    """The proxies' latest stats documents, fetched every ``period`` seconds from ``proxies()``."""

    _log = Logger()

    def __init__(self, reactor: Any, proxies: Callable[[], List[Dict[str, Any]]], period: float = POLL_SECONDS,
                 ) -> None:
        self._reactor = reactor
        self._proxies = proxies
        self.period = period
        self.documents: Dict[str, Dict[str, Any]] = {}   # proxy id -> its last good document
        self.received: Dict[str, float] = {}             # proxy id -> when that document came (reactor seconds)
        self.up: Dict[str, bool] = {}                    # proxy id -> did its last fetch work
        self.failures: Dict[str, int] = {}
        self._busy: Dict[str, Any] = {}
        self._problems: Dict[str, str] = {}
        self._loop: Optional[task.LoopingCall] = None

    def start(self) -> None:
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self._reactor
        self._loop.start(self.period, now=True).addErrback(
            lambda failure: self._log.failure("the stats poll stopped", failure))

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        for fetch in list(self._busy.values()):
            fetch.finish(None, "the dashboard is stopping")
        self._busy.clear()

    def _tick(self) -> None:
        try:
            self.poll()
        except Exception:  # noqa: BLE001 - logged; the next round tries again (a LoopingCall would stop)
            self._log.failure("stats poll")

    def poll(self) -> None:
        """One round: forget the proxies that left, fetch from the others (not those still fetching)."""
        proxies = {p["id"]: p for p in self._proxies() if isinstance(p.get("id"), str)}
        for gone in set(self.documents) | set(self.up) | set(self.failures):
            if gone not in proxies:
                self.documents.pop(gone, None)
                self.received.pop(gone, None)
                self.up.pop(gone, None)
                self.failures.pop(gone, None)
                self._problems.pop(gone, None)
        for proxy_id, proxy in proxies.items():
            admin = proxy.get("admin")
            if not isinstance(admin, str) or not admin:
                self.up[proxy_id] = False
                continue
            if proxy_id not in self._busy:
                self._fetch(proxy_id, admin, proxy)

    def _fetch(self, proxy_id: str, admin: str, proxy: Dict[str, Any]) -> None:
        try:
            host, port = split_admin(admin, (proxy.get("addr"), proxy.get("host")))
        except ValueError:
            self._result(proxy_id, None, f"admin address {admin!r} is not host:port")
            return

        def done(document: Optional[Dict[str, Any]], problem: Optional[str]) -> None:
            self._busy.pop(proxy_id, None)
            self._result(proxy_id, document, problem)

        fetch = _Fetch(self._reactor, done)
        self._busy[proxy_id] = fetch
        fetch.connector = self._reactor.connectTCP(host, port, fetch, timeout=FETCH_TIMEOUT)

    def _result(self, proxy_id: str, document: Optional[Dict[str, Any]], problem: Optional[str]) -> None:
        if document is not None:
            self.documents[proxy_id] = document
            self.received[proxy_id] = self._reactor.seconds()
            self.up[proxy_id] = True
            if self._problems.pop(proxy_id, None) is not None:
                self._log.info("proxy {proxy}: its stats port answers again", proxy=proxy_id)
            return
        self.up[proxy_id] = False
        self.failures[proxy_id] = self.failures.get(proxy_id, 0) + 1
        if self._problems.get(proxy_id) != problem:
            # Once per change of reason, not every 2 seconds.
            self._problems[proxy_id] = problem or "?"
            self._log.info("proxy {proxy}: no stats ({reason})", proxy=proxy_id, reason=problem)


class ClusterCollector:
    """Yields the dashboard's metrics from ``status()`` (None before it is ready) and the poller."""

    def __init__(self, cluster: str, status: Callable[[], Optional[Dict[str, Any]]], poller: StatsPoller) -> None:
        self._cluster = cluster
        self._status = status
        self._poller = poller

    def describe(self) -> List[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        cluster = self._cluster
        status = self._status()
        ready = GaugeMetricFamily("twinproxy_dashboard_ready", "1 once the dashboard holds its lock and serves",
                                  labels=["cluster"])
        ready.add_metric([cluster], 1 if status is not None else 0)
        yield ready
        if status is None:
            return
        yield from self._cluster_gauges(cluster, status)
        yield from self._proxy_metrics(cluster, status)

    def _cluster_gauges(self, cluster: str, status: Dict[str, Any]) -> Iterator[Metric]:
        def gauge(name: str, text: str, value: Any) -> Metric:
            family = GaugeMetricFamily(f"twinproxy_dashboard_{name}", text, labels=["cluster"])
            family.add_metric([cluster], value)
            return family

        groups = status.get("groups", [])
        yield gauge("generation", "The cluster topology's generation", status.get("generation", 0))
        yield gauge("proxies", "Proxies registered", len(status.get("proxies", [])))
        yield gauge("proxies_lagging", "Registered proxies behind the generation", len(status.get("lagging", [])))
        yield gauge("groups", "Server groups", len(groups))
        yield gauge("offline_slots", "Slots no group serves", status.get("offline_slots", 0))
        yield gauge("writable", "1 while the dashboard may write the topology", 1 if status.get("writable") else 0)
        slots = GaugeMetricFamily("twinproxy_dashboard_group_slots", "Slots per group", labels=["cluster", "group"])
        servers = GaugeMetricFamily("twinproxy_dashboard_server_up", "1 when the group's server answered the last "
                                    "health check", labels=["cluster", "group", "server", "role"])
        for group in groups:
            gid = str(group.get("id"))
            slots.add_metric([cluster, gid], status.get("slots_per_group", {}).get(gid, 0))
            for server in group.get("servers", []):
                servers.add_metric([cluster, gid, str(server.get("addr")), str(server.get("role"))],
                                   1 if server.get("up") else 0)
        yield slots
        yield servers

    def _proxy_metrics(self, cluster: str, status: Dict[str, Any]) -> Iterator[Metric]:
        poller = self._poller
        labels = ["cluster", "proxy"]
        up = GaugeMetricFamily("twinproxy_dashboard_proxy_up", "1 when the proxy's stats port answered the last "
                               "fetch", labels=labels)
        generation = GaugeMetricFamily("twinproxy_dashboard_proxy_generation", "The generation the proxy applied",
                                       labels=labels)
        seen = GaugeMetricFamily("twinproxy_dashboard_proxy_last_seen_timestamp_seconds", "When the proxy last "
                                 "updated its registration", labels=labels)
        failures = CounterMetricFamily("twinproxy_dashboard_proxy_stats_failures", "Stats fetches from the proxy "
                                       "that failed", labels=labels)
        fields = (*POOL_FIELDS, *SERVER_FIELDS)
        family = CounterMetricFamily, GaugeMetricFamily
        sums = {name: family[0 if counter else 1](f"twinproxy_dashboard_{name}", f"{text}, all proxies",
                                                  labels=["cluster"]) for name, text, counter in fields}
        each = {name: family[0 if counter else 1](f"twinproxy_dashboard_proxy_{name}", f"{text}, by proxy",
                                                  labels=labels) for name, text, counter in fields}
        totals = {name: 0.0 for name, _, _ in fields}
        for proxy in status.get("proxies", []):
            proxy_id = str(proxy.get("id"))
            names = [cluster, proxy_id]
            up.add_metric(names, 1 if poller.up.get(proxy_id) else 0)
            if _number(proxy.get("generation")) is not None:
                generation.add_metric(names, proxy["generation"])
            if _number(proxy.get("last_seen")) is not None:
                seen.add_metric(names, proxy["last_seen"])
            failures.add_metric(names, poller.failures.get(proxy_id, 0))
            document = poller.documents.get(proxy_id)
            if document is None:
                continue
            for name, value in cluster_counters(document, cluster).items():
                each[name].add_metric(names, value)
                totals[name] += value
        for name, value in totals.items():
            sums[name].add_metric([cluster], value)
        yield from (up, generation, seen, failures)
        yield from sums.values()
        yield from each.values()


def render(cluster: str, status: Callable[[], Optional[Dict[str, Any]]], poller: StatsPoller) -> bytes:
    """The exposition text, now."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClusterCollector(cluster, status, poller))
    return generate_latest(registry)
