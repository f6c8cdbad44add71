"""The cluster dashboard's web documents: ``GET /api/state``, ``/api/series``, ``/api/events`` (docs/web-dashboard.md).

Owns :class:`WebState`: the 1-second sampler (a LoopingCall on the
reactor over the :class:`~twinproxy.dashboard.metrics.StatsPoller`'s
documents, :class:`~twinproxy.dashboard.sampler.Sampler`), the backend
poll (:class:`~twinproxy.dashboard.backendinfo.BackendPoller`), Sentinel's view
of each group's master (:class:`~twinproxy.dashboard.sentinelwatch.SentinelWatch`), the event
log with its audit trail (:mod:`twinproxy.dashboard.audit`) and the
Server-Sent Events stream; :meth:`WebState.document` builds the state
document from the controller, the health poll and those; :meth:`resources`
are the three leaves ``make_site`` mounts under ``/api/``.  These reads need
no token.  Before the controller runs, ``/api/state`` answers 503 with the
reason (the page shows it disconnected).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.resource import Resource

from twinproxy import __version__
from twinproxy.dashboard import audit as auditing
from twinproxy.dashboard.backendinfo import BackendPoller
from twinproxy.dashboard.sampler import PERIOD, Sampler
from twinproxy.dashboard.sentinelwatch import SentinelWatch
from twinproxy.web.events import EventLog
from twinproxy.web.resources import EventStream, json_body, series_answer
from twinproxy.web.series import Series

_SESSION = {"connected": "connected", "connecting": "lost", "suspended": "suspended", "lost": "lost",
            "stopped": "lost"}


class WebState:
    """What the web page reads from one cluster dashboard."""

    _log = Logger()

    def __init__(self, cluster: str, protocol: str, reactor: Any, poller: Any,
                 proxies: Callable[[], List[Dict[str, Any]]], admin: bool) -> None:
        self.cluster = cluster
        self.protocol = protocol
        self._reactor = reactor
        self.admin = admin
        self.started = time.time()
        self.events = EventLog(time.time)
        self.series = Series()
        self.sampler = Sampler(cluster, poller, proxies, reactor.seconds, self.series, self._stale)
        self.stream = EventStream(self.events, reactor)
        self.audit = auditing.Audit(self.events)
        self.controller: Any = None
        self.coordinator: Any = None
        self.backends: Optional[BackendPoller] = None
        self.sentinel_watch: Optional[SentinelWatch] = None
        self.reason: Callable[[], str] = lambda: "the dashboard is starting"
        self._loop: Optional[LoopingCall] = None

    # -- life ---------------------------------------------------------------------

    def start(self, controller: Any, coordinator: Any) -> None:
        """The controller has started: wire its events, poll its servers' INFO, sample every second."""
        self.controller, self.coordinator = controller, coordinator
        auditing.wire(controller, self.events)
        self.backends = BackendPoller(self._reactor, controller.protocol, self._data_servers,
                                      controller.command_timeout, auth=controller.redis_auth)
        self.backends.start()
        self.sentinel_watch = SentinelWatch(self._reactor, self._sentinels, self._masters, controller.sentinels.name,
                                            controller.command_timeout, self.events.add)
        self.sentinel_watch.start()
        self._loop = LoopingCall(self._sample)
        self._loop.clock = self._reactor
        self._loop.start(PERIOD, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self.backends is not None:
            self.backends.stop()
        if self.sentinel_watch is not None:
            self.sentinel_watch.stop()
        self.stream.close()

    def _sample(self) -> None:
        try:
            self.sampler.sample()
        except Exception:  # noqa: BLE001 - logged; the next second samples again (a LoopingCall would stop)
            self._log.failure("web dashboard sample")

    def _stale(self, proxy_id: str, missed: int) -> None:
        self.events.add("stale", proxy_id, f"proxy {proxy_id}: no stats for {missed} samples in a row")

    def _data_servers(self) -> List[str]:
        topology = self.controller.topology if self.controller is not None else None
        return [] if topology is None else [address for group in topology.groups for address in group.servers]

    def _sentinels(self) -> List[str]:
        topology = self.controller.topology if self.controller is not None else None
        return [] if topology is None or topology.protocol != "redis" else list(topology.sentinels)

    def _masters(self) -> List[Tuple[int, Optional[str]]]:
        topology = self.controller.topology if self.controller is not None else None
        return [] if topology is None else [(group.id, group.master) for group in topology.groups]

    def record(self, method: str, path: str, client: str, request: Any, status: int, error: Optional[str]) -> None:
        """ApiState.audit: one write request and its outcome."""
        self.audit.record(method, path, client, auditing.body_text(request), status, error)

    # -- the state document ---------------------------------------------------------

    def document(self) -> Dict[str, Any]:
        ctl = self.controller
        topology = ctl.topology
        latest = self.sampler.latest
        health = ctl.health.health
        servers = self._servers(topology, latest, health)
        data = [row for row in servers if row["pool"] == (servers[0]["pool"] if servers else None)]
        up = sum(1 for row in data if row["state"] == "up")
        proxies = self._proxies(latest)
        groups, sentinel_alerts = self._groups(topology, health)
        # "up" is None until the first poll answered: not polled yet is not down.
        sentinels = [{"addr": a, "up": health[a].up if health.get(a) else None,
                      "error": health[a].error if health.get(a) else None} for a in topology.sentinels]
        migrations = ctl.migrations()
        return {
            "kind": "cluster", "name": self.cluster, "version": __version__,
            "uptime": round(time.time() - self.started, 1), "now": round(time.time(), 3), "admin": self.admin,
            "poll_seconds": PERIOD,
            "overview": {"coordinator": self._coordinator(), "generation": topology.generation,
                         "ops_per_second": latest["ops_per_second"], "requests": latest["requests"],
                         "clients": latest["clients"], "servers_up": up, "servers_total": len(data),
                         "p99_ms": latest["p99_ms"]},
            "alerts": alerts(data, proxies, groups, sentinels, migrations, ctl.acks.lagging(topology.generation))
            + sentinel_alerts,
            "servers": servers, "commands": latest["commands"], "proxies": proxies,
            "slots": {"runs": slot_runs(topology), "groups": self._slot_groups(topology, groups)},
            "migrations": migrations, "groups": groups, "sentinels": sentinels,
        }

    def _coordinator(self) -> Optional[Dict[str, Any]]:
        coordinator = self.coordinator
        if coordinator is None:
            return None
        parsed = getattr(coordinator, "parsed", None)
        kind = getattr(parsed, "scheme", None) or str(coordinator.url).split(":", 1)[0]
        kind = {"zk": "zookeeper"}.get(kind, kind)
        hosts = getattr(parsed, "hosts", None)
        address = ",".join(f"{h}:{p}" for h, p in hosts) if hosts else str(coordinator.url)
        return {"kind": kind, "address": address, "session": _SESSION.get(coordinator.state, coordinator.state)}

    def _servers(self, topology: Any, latest: Dict[str, Any], health: Dict[str, Any]) -> List[Dict[str, Any]]:
        """One row per (pool, server): every topology server, with what the proxies' pools say of it."""
        seen = latest["servers"]
        pools: List[Optional[str]] = sorted({pool for pool, _ in seen}) or [None]
        backends = self.backends.info if self.backends is not None else {}
        rows = []
        for pool in pools:
            for group in topology.groups:
                for index, address in enumerate(group.servers):
                    master = index == 0 or topology.protocol == "memcache"
                    name = (f"{self.cluster}-{group.id}" if topology.protocol == "redis"
                            else f"{self.cluster}-{group.id}-{address}")
                    figures = seen.get((pool, name)) if master else None
                    state = health.get(address)
                    backend = backends.get(address)
                    rows.append({
                        "pool": pool, "name": name if master else address, "addr": address, "group": group.id,
                        "role": ("master" if master else "replica") if topology.protocol == "redis" else None,
                        "state": "down" if state is not None and not state.up else "up",
                        "ejected_until": None, "weight": 1,
                        "connections": figures["connections"] if figures else 0,
                        "in_flight": figures["in_flight"] if figures else 0,
                        "requests_per_second": figures["requests_per_second"] if figures else 0.0,
                        "errors": figures["errors"] if figures else 0,
                        "timeouts": figures["timeouts"] if figures else 0,
                        "p50_ms": figures["p50_ms"] if figures else None,
                        "p99_ms": figures["p99_ms"] if figures else None,
                        "backend": None if backend is None else {k: v for k, v in backend.items()
                                                                 if k != "repl_offset"},
                    })
        return rows

    def _proxies(self, latest: Dict[str, Any]) -> List[Dict[str, Any]]:
        rows = []
        for proxy in self.controller.proxies():
            figures = latest["proxies"].get(proxy["id"]) or {"ops_per_second": 0.0, "clients": 0,
                                                             "error_rate": 0.0, "missed": 0, "stale": False}
            rows.append({"id": proxy["id"], "addr": proxy.get("addr"), "admin": proxy.get("admin"),
                         # The last stats document received; before any, the registration's own time.
                         "generation": proxy.get("generation"),
                         "last_seen": figures.get("last_seen") or proxy.get("last_seen"),
                         "ops_per_second": figures["ops_per_second"], "clients": figures["clients"],
                         "error_rate": figures["error_rate"], "missed": figures["missed"],
                         "stale": figures["stale"]})
        return rows

    def _groups(self, topology: Any, health: Dict[str, Any]) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
        """The groups' rows and the alerts of what Sentinel says of them."""
        counts = topology.slot_counts()
        groups = []
        found: List[Dict[str, Any]] = []
        watch = self.sentinel_watch if topology.sentinels and topology.protocol == "redis" else None
        for group in topology.groups:
            master_health = health.get(group.servers[0]) if group.servers else None
            servers = []
            for index, address in enumerate(group.servers):
                state = health.get(address)
                expected = "master" if index == 0 or topology.protocol == "memcache" else "replica"
                lag = None
                if state is not None and state.up and state.role == "replica" and master_health is not None \
                        and master_health.up and master_health.role == "master":
                    lag = max(0, master_health.offset - state.offset)
                servers.append({"addr": address, "expected_role": expected,
                                "actual_role": (state.role or ("master" if topology.protocol == "memcache"
                                                               and state.up else None)) if state else None,
                                "up": state.up if state is not None else None,
                                "link_up": state.link_up if state is not None and state.role == "replica" else None,
                                "lag_bytes": lag, "error": state.error if state else None})
            sentinel = None
            if watch is not None:
                sentinel, said = watch.group(group.id, group.master)
                found.extend(said)
            groups.append({"id": group.id, "slots": counts.get(group.id, 0), "servers": servers,
                           "sentinel": sentinel})
        return groups, found

    def _slot_groups(self, topology: Any, groups: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        backends = self.backends.info if self.backends is not None else {}
        found = []
        for group, entry in zip(topology.groups, groups):
            masters = group.servers[:1] if topology.protocol == "redis" else list(group.servers)
            infos = [backends.get(address) for address in masters]
            keys = None if not infos or any(i is None or i["keys"] is None for i in infos) else \
                sum(i["keys"] for i in infos)
            memory = None if not infos or any(i is None or i["memory"] is None for i in infos) else \
                sum(i["memory"] for i in infos)
            found.append({"id": group.id, "slots": entry["slots"], "keys": keys, "memory": memory})
        return found

    # -- HTTP -----------------------------------------------------------------------

    def resources(self, ready: Callable[[], bool]) -> Dict[bytes, Resource]:
        """``state``, ``series`` and ``events`` for ``make_site``'s ``web`` (``ready()``: the controller runs)."""
        refused = self._refused
        return {b"state": _Read(lambda request: self._state_answer(request, ready), refused),
                b"series": _Read(lambda request: series_answer(request, self.series, self._reactor.seconds(),
                                                                PERIOD), refused),
                b"events": _Read(self.stream.render, refused)}

    def _refused(self, request: Any, status: int, error: str) -> None:
        """A write request to a read-only document: refused, and in the audit log like every write."""
        address = request.getClientAddress()
        host, port = getattr(address, "host", None), getattr(address, "port", None)
        client = f"{host}:{port}" if host is not None else "?"
        self.record(request.method.decode("ascii", "replace").upper(), request.path.decode("utf-8", "replace"),
                    client, request, status, error)

    def _state_answer(self, request: Any, ready: Callable[[], bool]) -> bytes:
        if not ready() or self.controller is None or self.controller.topology is None:
            return json_body(request, 503, {"error": self.reason()})
        return json_body(request, 200, self.document())


class _Read(Resource):
    """A read-only leaf: GET (and HEAD) answered by ``answer(request)``, anything else 405."""

    isLeaf = True
    _log = Logger()

    def __init__(self, answer: Callable[[Any], Any],
                 refused: Optional[Callable[[Any, int, str], None]] = None) -> None:
        super().__init__()
        self._answer = answer
        self._refused = refused       # told of each write refused here (the audit log)

    def render(self, request: Any) -> Any:
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            error = (f"{request.method.decode('ascii', 'replace')} {request.path.decode('utf-8', 'replace')} "
                     "is not allowed here (allowed: GET, HEAD)")
            if self._refused is not None:
                try:
                    self._refused(request, 405, error)
                except Exception:  # noqa: BLE001 - the audit trail's bug must not change the answer
                    self._log.failure("the audit of a refused write failed")
            return json_body(request, 405, {"error": error})
        return self._answer(request)


def slot_runs(topology: Any) -> List[Dict[str, Any]]:
    """The slot table as runs of equal (group, state, migration target, migration id)."""
    migration_of: Dict[int, Any] = {}
    for m in topology.migrations:
        if not m.ended:
            for slot in range(m.first, m.last + 1):
                migration_of[slot] = m
    runs: List[Dict[str, Any]] = []
    last: Optional[Tuple[Any, ...]] = None
    for slot, (group, state) in enumerate(topology.slots):
        m = migration_of.get(slot)
        if group is None:
            shown = "offline"
        elif m is not None and state in ("held", "migrating"):
            shown = "migrating"
        else:
            shown = state
        key = (group, shown, m.to_group if m is not None and shown == "migrating" else None,
               m.id if m is not None and shown == "migrating" else None)
        if key == last:
            runs[-1]["to"] = slot
            continue
        last = key
        runs.append({"from": slot, "to": slot, "group": key[0], "state": key[1], "target": key[2],
                     "migration": key[3]})
    return runs


def alerts(servers: List[Dict[str, Any]], proxies: List[Dict[str, Any]], groups: List[Dict[str, Any]],
           sentinels: List[Dict[str, Any]], migrations: Dict[str, Any], lagging: List[str]) -> List[Dict[str, Any]]:
    """What the page flags: servers down, replicas not replicating, stale or lagging proxies, failed migrations,
    sentinels down."""
    found: List[Dict[str, Any]] = []
    down = set()
    for group in groups:
        for server in group["servers"]:
            if server["up"] is False:
                down.add(server["addr"])
                found.append({"kind": "down", "subject": server["addr"],
                              "text": f"server {server['addr']} of group {group['id']} is down: {server['error']}"})
            elif server["expected_role"] == "replica" and server["link_up"] is False:
                found.append({"kind": "lagging", "subject": server["addr"],
                              "text": f"replica {server['addr']} of group {group['id']} has no link to its master"})
    for row in servers:
        if row["state"] == "ejected" and row["addr"] not in down:
            found.append({"kind": "ejected", "subject": row["addr"], "text": f"server {row['addr']} is ejected"})
    for proxy in proxies:
        if proxy["stale"]:
            found.append({"kind": "stale", "subject": proxy["id"],
                          "text": f"proxy {proxy['id']}: no stats for {proxy['missed']} samples"})
    for proxy_id in lagging:
        found.append({"kind": "stale", "subject": proxy_id,
                      "text": f"proxy {proxy_id} has not applied the latest topology generation"})
    for m in migrations.get("migrations", []):
        if m.get("state") == "failed":
            found.append({"kind": "migration_failed", "subject": f"migration {m.get('id')}",
                          "text": f"migration {m.get('id')} failed: {m.get('error')}"})
    for sentinel in sentinels:
        if sentinel["up"] is False:
            found.append({"kind": "sentinel", "subject": sentinel["addr"],
                          "text": f"sentinel {sentinel['addr']} does not answer: {sentinel['error']}"})
    return found
