"""A plain proxy's side of the web dashboard: its ``/api/state`` document, the 1-second sampler, its events.

Owns :class:`ProxyWebState`: every ``period`` seconds (a LoopingCall on
the injected reactor, running only while the HTTP endpoint does) it takes
a :func:`take_snapshot` of the pools' counters, keeps the one before it,
adds a point (ops/s, p99) to a :class:`~twinproxy.web.series.Series`, and
turns what changed between the two into events (a server down or up
again, a Sentinel master switch).  Ejections and returns come straight
from the pool (``ServerPool.health_listeners``); each server's own INFO or
stats from a :class:`~twinproxy.dashboard.backendinfo.BackendPoller` per
protocol (the cluster dashboard's, every 3 s); reloads from the
:class:`~twinproxy.reload.Reloader`.  :func:`state_document` builds the
contract's ``"kind": "proxy"`` document (docs/web-dashboard.md) from two
snapshots; it and the snapshots are plain data, so tests hand-make them.

A snapshot's ``servers`` rows are those of the pools now plus the removed
servers still draining; states, in order: ``draining`` (a reload removed it
and its connections still answer what they were sent), ``ejected`` (out of
the ring until ``ejected_until``: ejected_at + server_retry_timeout),
``down`` (its last connection failed, was closed by the server or timed
out, and none has been made since: ``Server.up`` is False), else ``up``.
"""

from __future__ import annotations

import socket
from typing import Any, Callable, Dict, List, Optional, Sequence

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from twinproxy import __version__
from twinproxy.dashboard.backendinfo import BackendPoller
from twinproxy.web.events import EventLog
from twinproxy.web.series import Series, add_counts, bucket_deltas, percentiles, rate

PERIOD = 1.0
BACKEND_TIMEOUT = 1.0
Snapshot = Dict[str, Any]


def _server_row(service: Any, link: Any, state: Optional[str] = None) -> Dict[str, Any]:
    server = link.server
    counters = server.counters
    in_queue, _, out_queue, _ = link.queue_stats()
    shard = link.shard
    role = None
    switches = 0
    addr = server.spec.address
    if shard is not None:   # Sentinel: the shard's master now
        shard_stats = shard.stats()
        addr = shard_stats["address"] or addr
        role = "master" if shard_stats["role"] == "master" else None
        switches = shard_stats["switches"]
    if state is None:
        state = "ejected" if server.ejected else ("up" if server.up else "down")
    return {
        "pool": service.name, "name": server.spec.stats_name, "addr": addr, "role": role, "state": state,
        "ejected_until": server.ejected_until if state == "ejected" else None,
        "weight": server.spec.weight, "connections": link.connection_count, "in_flight": in_queue + out_queue,
        "requests": counters.requests, "errors": counters.server_err + counters.server_eof,
        "timeouts": counters.server_timedout, "latency": list(counters.latency.counts),
        "switches": switches, "sentinel": shard is not None,
    }


def take_snapshot(services: Sequence[Any], now: float, counters: Any = None) -> Snapshot:
    """What the document and the next rates need, read from the running pools (no I/O)."""
    servers = []
    commands = []
    requests = clients = 0
    for service in services:
        clients += len(service.factory.clients)
        for link in service.links:
            servers.append(_server_row(service, link))
        for link in getattr(service.runtime, "retiring_links", ()):
            servers.append(_server_row(service, link, "draining"))
        for name, counted in sorted(service.pool.counters.commands.items()):
            requests += counted.calls
            commands.append({"pool": service.name, "command": name, "calls": counted.calls,
                             "errors": counted.errors, "latency": list(counted.latency.counts)})
    return {"time": now, "requests": requests, "clients": clients,
            "generation": counters.generation if counters is not None else None,
            "servers": servers, "commands": commands}


def _by_key(rows: Sequence[Dict[str, Any]], *fields: str) -> Dict[tuple, Dict[str, Any]]:
    return {tuple(row[f] for f in fields): row for row in rows}


def sample_figures(before: Optional[Snapshot], after: Snapshot) -> Dict[str, Any]:
    """ops/s and p99 (ms) over the sample from ``before`` to ``after`` (no ``before``: 0 and None).

    p99 is over every command's latency (sent to its server until the reply; proxy-made replies are not timed).
    """
    if before is None:
        return {"ops_per_second": 0.0, "p99_ms": None}
    seconds = after["time"] - before["time"]
    old = _by_key(before["commands"], "pool", "command")
    counts: Optional[List[int]] = None
    for key, row in _by_key(after["commands"], "pool", "command").items():
        counts = add_counts(counts, bucket_deltas(old[key]["latency"] if key in old else None, row["latency"]))
    return {"ops_per_second": round(rate(before["requests"], after["requests"], seconds), 1),
            "p99_ms": percentiles(counts)[1]}


def state_document(before: Optional[Snapshot], after: Snapshot, name: str, started: float) -> Dict[str, Any]:
    """The ``"kind": "proxy"`` document of ``GET /api/state`` from the last two snapshots."""
    seconds = after["time"] - before["time"] if before is not None else 0.0
    old_servers = _by_key(before["servers"], "pool", "name") if before is not None else {}
    rows = []
    alerts = []
    for row in after["servers"]:
        key = (row["pool"], row["name"])
        previous = old_servers.get(key)
        delta = bucket_deltas(previous["latency"] if previous is not None else None, row["latency"]) \
            if previous is not None else [0] * len(row["latency"])
        p50, p99 = percentiles(delta)
        subject = f"{row['pool']}/{row['name']}"
        if row["state"] == "ejected":
            alerts.append({"kind": "ejected", "subject": subject,
                           "text": f"{subject} ({row['addr']}) is ejected from the ring until "
                                   f"{_clock_text(row['ejected_until'])}"})
        elif row["state"] == "down":
            alerts.append({"kind": "down", "subject": subject,
                           "text": f"{subject} ({row['addr']}): its last connection failed"})
        if row["sentinel"] and row["role"] is None and row["state"] != "draining":
            alerts.append({"kind": "sentinel", "subject": subject,
                           "text": f"{subject}: no master confirmed by the sentinels"})
        rows.append({
            "pool": row["pool"], "name": row["name"], "addr": row["addr"], "group": None, "role": row["role"],
            "state": row["state"], "ejected_until": row["ejected_until"], "weight": row["weight"],
            "connections": row["connections"], "in_flight": row["in_flight"],
            "requests_per_second": round(rate(previous["requests"] if previous else None, row["requests"],
                                              seconds), 1),
            "errors": row["errors"], "timeouts": row["timeouts"],
            "p50_ms": p50, "p99_ms": p99,
            "backend": None,        # filled in by ProxyWebState from its INFO / stats polls
        })
    commands = []
    for row in after["commands"]:
        p50, p99 = percentiles(row["latency"])   # since start, like calls and errors beside them
        commands.append({"pool": row["pool"], "command": row["command"], "calls": row["calls"],
                         "errors": row["errors"], "p50_ms": p50, "p99_ms": p99})
    figures = sample_figures(before, after)
    counted = [row for row in rows if row["state"] != "draining"]
    now = after["time"]
    return {
        "kind": "proxy", "name": name, "version": __version__, "uptime": round(now - started, 3),
        "now": round(now, 3), "admin": False, "poll_seconds": PERIOD,
        "overview": {
            "coordinator": None, "generation": after["generation"],
            "ops_per_second": figures["ops_per_second"], "requests": after["requests"],
            "clients": after["clients"], "servers_up": sum(1 for row in counted if row["state"] == "up"),
            "servers_total": len(counted), "p99_ms": figures["p99_ms"],
        },
        "alerts": alerts,
        "servers": rows,
        "commands": commands,
    }


def health_events(before: Optional[Snapshot], after: Snapshot) -> List[Dict[str, str]]:
    """What the sampler tells the event log: servers down or up again, and Sentinel master switches.

    (Ejections and returns are told by the pool as they happen.)
    """
    if before is None:
        return []
    old = _by_key(before["servers"], "pool", "name")
    found = []
    for row in after["servers"]:
        previous = old.get((row["pool"], row["name"]))
        if previous is None:
            continue
        subject = f"{row['pool']}/{row['name']}"
        if row["state"] == "down" and previous["state"] == "up":
            found.append({"kind": "down", "subject": subject,
                          "text": f"{subject} ({row['addr']}): connection failed"})
        elif row["state"] == "up" and previous["state"] == "down":
            found.append({"kind": "up", "subject": subject, "text": f"{subject} ({row['addr']}): connected again"})
        if row["switches"] > previous["switches"]:
            found.append({"kind": "switch-master", "subject": subject,
                          "text": f"{subject}: the master is now {row['addr']}"})
    return found


def _clock_text(seconds: Optional[float]) -> str:
    import time

    return time.strftime("%H:%M:%S", time.localtime(seconds)) if seconds else "-"


def backend_addresses(services: Sequence[Any], snapshot: Snapshot) -> Dict[str, List[str]]:
    """The servers' addresses of ``snapshot`` to poll, by protocol (no redis_auth pools, no unix sockets)."""
    protocols = {}
    for service in services:
        config = getattr(service, "config", None)
        if config is not None and not config.redis_auth:
            protocols[service.name] = config.protocol
    polled: Dict[str, List[str]] = {"redis": [], "memcache": []}
    for row in snapshot["servers"]:
        protocol = protocols.get(row["pool"])
        if protocol is not None and row["addr"] and not row["addr"].startswith("/") and row["state"] != "draining":
            polled[protocol].append(row["addr"])
    return polled


class ProxyWebState:
    """The sampler, the series and the event log of one proxy process's HTTP endpoint."""

    _log = Logger()

    def __init__(self, pools: Callable[[], Sequence[Any]], started: float, reactor: Any, counters: Any = None,
                 period: float = PERIOD, name: Optional[str] = None) -> None:
        self._pools = pools
        self._started = started
        self._reactor = reactor
        self._counters = counters
        self.period = period
        self.name = name or socket.gethostname()
        self.events = EventLog(reactor.seconds)
        self.series = Series()
        self.before: Optional[Snapshot] = None
        self.after: Optional[Snapshot] = None
        self._loop: Optional[LoopingCall] = None
        self._watched: List[Any] = []
        # Each server's own INFO (Redis) or stats (memcached), every few seconds, beside the proxy's counters;
        # not for pools with redis_auth (the poll has no credentials) nor unix-socket servers.
        self._polled: Dict[str, List[str]] = {"redis": [], "memcache": []}
        self.backends = [BackendPoller(reactor, protocol, lambda protocol=protocol: self._polled[protocol],
                                       BACKEND_TIMEOUT) for protocol in ("redis", "memcache")]

    # -- lifetime -------------------------------------------------------------

    def start(self) -> None:
        for poller in self.backends:
            poller.start()
        self._loop = LoopingCall(self.sample)
        self._loop.clock = self._reactor
        self._loop.start(self.period, now=True).addErrback(
            lambda failure: self._log.failure("web dashboard sampler", failure=failure))

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        for poller in self.backends:
            poller.stop()
        for pool in self._watched:
            if self._health_changed in pool.health_listeners:
                pool.health_listeners.remove(self._health_changed)
        self._watched = []

    # -- sampling -------------------------------------------------------------

    def sample(self) -> None:
        """One sample, never raising: a LoopingCall whose call raises stops for good (no more samples)."""
        try:
            self._sample()
        except Exception:  # noqa: BLE001 - logged; the next period samples again
            self._log.failure("web dashboard sample")

    def _sample(self) -> None:
        """Take a snapshot; the one before it stays for the rates; add a point and the events it shows."""
        services = list(self._pools())
        self._watch(services)
        snapshot = take_snapshot(services, self._reactor.seconds(), self._counters)
        self.before, self.after = self.after, snapshot
        self._polled = backend_addresses(services, snapshot)
        figures = sample_figures(self.before, snapshot)
        self.series.add(snapshot["time"], figures["ops_per_second"], figures["p99_ms"])
        for event in health_events(self.before, snapshot):
            self.events.add(event["kind"], event["subject"], event["text"])

    def _watch(self, services: Sequence[Any]) -> None:
        """Hear every pool's ejections and returns (pools a reload added too)."""
        for service in services:
            pool = service.pool
            listeners = getattr(pool, "health_listeners", None)
            if listeners is not None and self._health_changed not in listeners:
                listeners.append(self._health_changed)
                self._watched.append(pool)

    def _health_changed(self, kind: str, pool: Any, server: Any) -> None:
        subject = f"{pool.name}/{server.spec.stats_name}"
        if kind == "eject":
            text = (f"{subject} ({server.spec.address}) ejected after {pool.config.server_failure_limit} "
                    f"consecutive failures, back at {_clock_text(server.ejected_until)}")
            self.events.add("eject", subject, text, until=round(server.ejected_until, 3))
        else:
            self.events.add("restore", subject, f"{subject} ({server.spec.address}) back in the ring")

    def reload_done(self, result: Any) -> None:
        """A :class:`~twinproxy.reload.ReloadResult` (applied or refused): one ``reload`` event."""
        if result.ok:
            summary = "; ".join(result.changes) if result.changes else "no change"
            text = f"configuration {result.generation} applied: {summary}"
        else:
            text = f"reload refused, configuration {result.generation} stays: {result.error}"
        self.events.add("reload", "proxy", text, ok=result.ok, generation=result.generation)

    # -- the document ---------------------------------------------------------

    def document(self) -> Dict[str, Any]:
        """``GET /api/state``: the last sample (taken now if there is none yet)."""
        if self.after is None:
            self.sample()
        document = state_document(self.before, self.after, self.name, self._started)
        known: Dict[str, Dict[str, Any]] = {}
        for poller in self.backends:
            known.update(poller.info)
        for row in document["servers"]:
            info = known.get(row["addr"])
            if info is not None:
                row["backend"] = {k: v for k, v in info.items() if k != "repl_offset"}
        if self._counters is not None:   # a reload shows at once, not at the next sample
            document["overview"]["generation"] = self._counters.generation
        return document
