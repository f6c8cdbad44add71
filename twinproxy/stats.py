"""Counters the proxy keeps, and the nutcracker-shaped document built from them.

Owns: :class:`ServerCounters` and :class:`PoolCounters` (plain attributes,
bumped on the hot path with no call), the latency :class:`Histogram`, the
field names and descriptions of nutcracker's stats port (``FIELDS``), and
:func:`snapshot`, which reads counters and gauges of running pools into one
ordered document.  Knows nothing of sockets or HTTP; ``metrics.py`` and the
stats listener render what this produces.
"""

from __future__ import annotations

import socket
from bisect import bisect_left
from typing import Any, Dict, List, Sequence, Tuple

from twinproxy import __version__

# Upper bounds, in seconds, of the latency histogram's buckets (+Inf is implied).
LATENCY_BUCKETS: Tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    """Counts of observations per latency bucket, and their sum."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds

    def add(self, other: "Histogram") -> None:
        for index, count in enumerate(other.counts):
            self.counts[index] += count
        self.total += other.total

    @property
    def count(self) -> int:
        return sum(self.counts)


class ServerCounters:
    """What happened on one server's connections since start."""

    __slots__ = ("server_eof", "server_err", "server_timedout", "requests", "request_bytes", "responses",
                 "response_bytes", "connections_made", "latency")

    def __init__(self) -> None:
        self.server_eof = 0
        self.server_err = 0
        self.server_timedout = 0
        self.requests = 0
        self.request_bytes = 0
        self.responses = 0
        self.response_bytes = 0
        self.connections_made = 0
        self.latency = Histogram()


class CommandCounters:
    """One command's requests in one pool: calls, error replies the client got, and their latency.

    ``calls`` (at dispatch) and ``errors`` (``FrontendProtocol._flush``,
    the server's error replies and the proxy's) count client requests.
    ``latency`` is bumped by the backend as it reads the reply: from
    sending the request to its server to the reply, one observation per
    client request answered by a server (a split request once: from its
    fragments' send to the last fragment's reply); replies the proxy makes
    itself are not timed.
    """

    __slots__ = ("calls", "errors", "latency")

    def __init__(self) -> None:
        self.calls = 0
        self.errors = 0
        self.latency = Histogram()


# A Redis pool's counters of the command families that are more than routing by key (fan-outs, scans,
# scripts, blocking commands): (field, Prometheus type, what it counts).  This table is their only
# definition; PoolCounters, the stats document, ``-D`` and /metrics all read it.
REDIS_POOL_FIELDS = (
    ("fanouts", "counter", "requests sent to every server, or to one chosen server, and answered from their "
     "replies (INFO, SCAN, KEYS, DBSIZE, SCRIPT LOAD, CONFIG GET, ...)"),
    ("scans", "counter", "SCAN requests (each step of a client's scan, one server each)"),
    ("script_loads", "counter", "SCRIPT LOAD requests (each loaded on every live server)"),
    ("scripts_healed", "counter", "EVALSHA calls a server answered NOSCRIPT (its script cache was empty) and the "
     "proxy healed: it loaded the body it knew and sent the call again"),
    ("blocked_clients", "gauge", "clients waiting now for the reply to a blocking command (BLPOP, BLMOVE, "
     "BZPOPMIN, XREAD ... BLOCK, ...): their later requests wait with them"),
    ("blocking_commands", "counter", "blocking commands run on a server, each alone on a connection leased for it"),
    ("transactions", "counter", "MULTI/EXEC transactions sent to servers (a cross-server one once, however many "
     "servers)"),
    ("transactions_refused", "counter", "EXECs refused by the proxy at EXEC: keys on more than one server or slot, "
     "or not on the server of the WATCHed keys (EXECABORT, nothing written)"),
    ("watch_leases", "counter", "WATCHes that leased a connection of their own (one per WATCH that starts a pin)"),
)
# A Redis pool's servers, after the fields of SERVER_FIELDS: their connections lent to one client each
# (field, Prometheus type, what it counts), read from the server's link (lease_values).
LEASE_FIELDS = (
    ("leased_connections", "gauge", "connections lent to one client each now (a WATCH pins one; a blocking "
     "command runs on one), counted in server_connections too"),
    ("leased_idle", "gauge", "leased connections given back clean and kept open for the next lease"),
    ("leases_refused", "counter", "leases refused: server_leased_connections were all in use, or the server was "
     "leaving the pool"),
)


def lease_values(link: Any) -> Dict[str, int]:
    """The LEASE_FIELDS of one server's link, by field name."""
    leases = link.leases
    return {"leased_connections": leases.in_use_count, "leased_idle": leases.idle_count,
            "leases_refused": leases.refused}


class PoolCounters:
    """What happened to one pool's clients and routing since start."""

    __slots__ = ("client_eof", "client_err", "server_ejects", "forward_error", "fragments", "clients_accepted",
                 "commands", "client_output_limit_closed", *(name for name, *_ in REDIS_POOL_FIELDS))

    def __init__(self) -> None:
        for name, *_ in REDIS_POOL_FIELDS:
            setattr(self, name, 0)
        self.client_eof = 0
        self.client_err = 0
        self.server_ejects = 0
        self.forward_error = 0
        self.fragments = 0
        self.clients_accepted = 0
        self.commands: Dict[str, CommandCounters] = {}
        self.client_output_limit_closed = 0


# nutcracker's fields, in its order, with what each counts.
TOP_FIELDS = (
    ("service", "the proxy's name"),
    ("source", "the host it runs on"),
    ("version", "the proxy's version"),
    ("uptime", "seconds since the proxy started"),
    ("timestamp", "when this document was made, seconds since the epoch"),
    ("total_connections", "connections ever made: listeners, clients, servers"),
    ("curr_connections", "connections open now: listeners, clients, servers"),
    ("config_generation", "the pool file's configuration serving now: 1 at start, +1 per applied reload"),
    ("reloads", "reloads applied (SIGHUP, POST /reload)"),
    ("reload_failures", "reloads refused: the file did not validate or could not be applied; nothing changed"),
    # lists, never mappings: tools that take every top-level mapping for a pool read the document as before
    ("latency", "per server: [{pool, server, buckets}], buckets the cumulative counts of replies within each "
     "latency bound (0.1 ms ... 5 s, then +Inf) from sending to the server to its reply"),
    ("commands", "per command: [{pool, command, calls, errors, buckets}], errors the error replies clients got, "
     "buckets cumulative as in latency, the same span: from sending to the server to its reply, "
     "a split request once (to its last fragment's reply)"),
)
POOL_FIELDS = (
    ("client_eof", "client connections closed by the client"),
    ("client_err", "client connections that failed or sent bytes that are not the protocol"),
    ("client_connections", "client connections open now"),
    ("server_ejects", "times a server was ejected from the ring"),
    ("forward_error", "requests answered with an error because their server failed or none was live"),
    ("fragments", "sub-requests made by splitting multi-key requests"),
    # twinproxy's own, after nutcracker's
    ("client_output_limit_closed", "clients closed because their unread replies passed client_output_hard_limit"),
)
# A Redis pool's pub/sub, per pool after the fields above: (field, Prometheus type, what it
# counts, the SubscriberHub attribute it reads).  The stats document, ``-D`` and /metrics
# (twinproxy_pool_<field>) are all made from this table.
PUBSUB_FIELDS = (
    ("subscribers", "gauge", "clients subscribed to a channel, pattern or shard channel now", "subscribers"),
    ("subscriber_connections", "gauge", "subscriber connections to servers open now (one per client and server "
     "it subscribes on)", "connection_count"),
    ("messages_relayed", "counter", "pub/sub messages relayed to subscribed clients", "messages"),
    ("subscriptions_refused", "counter", "subscriptions refused: a server's server_subscriber_connections was reached",
     "refused"),
    ("subscribers_closed", "counter", "subscribed clients closed because a subscriber connection failed (the "
     "server went away, no ack within timeout)", "lost"),
)
SERVER_FIELDS = (
    ("server_eof", "connections the server closed"),
    ("server_err", "connections that failed: refused, reset, or a reply that is not the protocol"),
    ("server_timedout", "connections closed because a reply did not come within timeout"),
    ("server_connections", "connections to the server open now"),
    ("server_ejected_at", "when the server was last ejected, microseconds since the epoch (0: never)"),
    ("requests", "requests sent to the server"),
    ("request_bytes", "bytes of requests sent to the server"),
    ("responses", "replies received from the server"),
    ("response_bytes", "bytes of replies received from the server"),
    ("in_queue", "requests waiting for a connection to the server"),
    ("in_queue_bytes", "bytes of requests waiting for a connection"),
    ("out_queue", "requests sent and awaiting their reply"),
    ("out_queue_bytes", "bytes of requests sent and awaiting their reply"),
)
# A Sentinel pool's servers (shards) have these too.
SENTINEL_FIELDS = (
    ("address", "the shard's master now (host:port; empty before the first discovery)"),
    ("sentinel_epoch", "the Sentinel config epoch of that master"),
    ("switches", "master switches followed since the start (the first discovery is not one)"),
    ("last_switch", "when the master last switched, seconds since the epoch (0: never)"),
    ("role", "master, or unconfirmed while no master is confirmed (requests wait failover_hold, then TRYAGAIN)"),
    ("replicas_healthy", "replicas that reads may go to now"),
    ("replica_reads", "reads sent to replicas"),
    ("held", "requests waiting for a confirmed master"),
)


def describe() -> str:
    """The text of ``--describe-stats``."""
    lines = ["top-level stats:"]
    lines += [f"  {name:<20}\"{text}\"" for name, text in TOP_FIELDS]
    lines += ["", "pool stats:"]
    lines += [f"  {name:<20}\"{text}\"" for name, text in POOL_FIELDS]
    lines += ["", "pool stats in a Redis pool, besides those:"]
    lines += [f"  {name:<20}\"{text}\"" for name, _, text in REDIS_POOL_FIELDS]
    lines += [f"  {name:<20}\"{text}\"" for name, _, text, _ in PUBSUB_FIELDS]
    lines += ["", "server stats:"]
    lines += [f"  {name:<20}\"{text}\"" for name, text in SERVER_FIELDS]
    lines += ["", "server stats in a Redis pool, besides those:"]
    lines += [f"  {name:<20}\"{text}\"" for name, _, text in LEASE_FIELDS]
    lines += ["", "server stats in a Sentinel pool, besides those:"]
    lines += [f"  {name:<20}\"{text}\"" for name, text in SENTINEL_FIELDS]
    return "\n".join(lines) + "\n"


def server_document(server: Any, link: Any, redis: bool = False) -> Dict[str, Any]:
    counters = server.counters
    in_queue, in_bytes, out_queue, out_bytes = link.queue_stats()
    document: Dict[str, Any] = {
        "server_eof": counters.server_eof,
        "server_err": counters.server_err,
        "server_timedout": counters.server_timedout,
        "server_connections": link.connection_count,
        "server_ejected_at": int(server.ejected_at * 1_000_000),
        "requests": counters.requests,
        "request_bytes": counters.request_bytes,
        "responses": counters.responses,
        "response_bytes": counters.response_bytes,
        "in_queue": in_queue,
        "in_queue_bytes": in_bytes,
        "out_queue": out_queue,
        "out_queue_bytes": out_bytes,
    }
    if redis:
        document.update(lease_values(link))
    if link.shard is not None:   # Sentinel mode: where the master is, and its history
        document.update(link.shard.stats())
    return document


def pool_document(service: Any) -> Dict[str, Any]:
    counters = service.pool.counters
    document: Dict[str, Any] = {
        "client_eof": counters.client_eof,
        "client_err": counters.client_err,
        "client_connections": len(service.factory.clients),
        "server_ejects": counters.server_ejects,
        "forward_error": counters.forward_error,
        "fragments": counters.fragments,
        "client_output_limit_closed": counters.client_output_limit_closed,
    }
    redis = service.config.redis
    if redis:
        for name, *_ in REDIS_POOL_FIELDS:
            document[name] = getattr(counters, name)
    document.update(pubsub_values(service))
    table = service.config.slots if service.config.cluster_mode else None
    if service.config.cluster_mode:
        document.update(cluster_fields(service.config))
    for link in service.links:
        server = server_document(link.server, link, redis)
        if table is not None:
            server["slots"] = sum(1 for owner in table.owners if owner == link.server.name)
        document[link.server.spec.stats_name] = server
    return document


def pubsub_values(service: Any) -> Dict[str, int]:
    """A Redis pool's PUBSUB_FIELDS, by field name; empty for a memcached pool."""
    hub = getattr(service, "subscribers", None)
    if hub is None:
        return {}
    return {name: getattr(hub, attribute) for name, _, _, attribute in PUBSUB_FIELDS}


def cluster_fields(config: Any) -> Dict[str, Any]:
    """A cluster pool's own fields: which cluster, the generation applied, the session, the slots."""
    table = config.slots
    if table is None:
        return {"cluster": config.cluster, "cluster_generation": 0, "coordinator_session": "not loaded",
                "slots_offline": 1024, "slots_held": 0, "slots_migrating": 0}
    fields = {"cluster": config.cluster, "cluster_generation": table.generation,
              "coordinator_session": table.session, "slots_offline": 1024 - table.online,
              "slots_held": len(table.held), "slots_migrating": len(table.migrating)}
    if table.legacy is not None:
        # An adopted pool: where each of its servers' keys are (legacy, moving, done).
        fields["adopted"] = dict(zip(table.legacy_names, table.adopt_states))
    return fields


def connection_counts(services: Sequence[Any]) -> Tuple[int, int]:
    """(ever made, open now), counting listeners, clients and server connections, as nutcracker does."""
    total = current = 0
    for service in services:
        listening = 1 if service.port is not None else 0
        clients = len(service.factory.clients)
        servers = sum(link.connection_count for link in service.links)
        hub = getattr(service, "subscribers", None)
        subscribers, subscribers_made = (hub.connection_count, hub.opened) if hub is not None else (0, 0)
        current += listening + clients + servers + subscribers
        total += 1 + service.pool.counters.clients_accepted + subscribers_made + sum(
            link.server.counters.connections_made for link in service.links)
    return total, current


def snapshot(services: Sequence[Any], started: float, now: float, counters: Any = None) -> Dict[str, Any]:
    """The stats port's document: nutcracker's layout, current values.

    ``counters`` (a ReloadCounters) adds the reload fields at the top level,
    beside nutcracker's: integers there, never a mapping, so tools that take
    every mapping for a pool read the document as before.
    """
    total, current = connection_counts(services)
    document: Dict[str, Any] = {
        "service": "twinproxy",
        "source": socket.gethostname(),
        "version": __version__,
        "uptime": int(now - started),
        "timestamp": int(now),
        "total_connections": total,
        "curr_connections": current,
    }
    if counters is not None:
        document["config_generation"] = counters.generation
        document["reloads"] = counters.reloads
        document["reload_failures"] = counters.reload_failures
    document["latency"] = latency_rows(services)
    document["commands"] = command_rows(services)
    for service in services:
        document[service.name] = pool_document(service)
    return document


def cumulative(histogram: Histogram) -> List[int]:
    """The histogram's counts as Prometheus's cumulative buckets: one per bound, then +Inf (the total)."""
    total = 0
    buckets = []
    for count in histogram.counts:
        total += count
        buckets.append(total)
    return buckets


def latency_rows(services: Sequence[Any]) -> List[Dict[str, Any]]:
    """The stats document's ``latency``: one row per (pool, server)."""
    return [{"pool": service.name, "server": link.server.spec.stats_name,
             "buckets": cumulative(link.server.counters.latency)}
            for service in services for link in service.links]


def command_rows(services: Sequence[Any]) -> List[Dict[str, Any]]:
    """The stats document's ``commands``: one row per (pool, command), commands sorted by name."""
    rows = []
    for service in services:
        for name, counted in sorted(service.pool.counters.commands.items()):
            rows.append({"pool": service.name, "command": name, "calls": counted.calls,
                         "errors": counted.errors, "buckets": cumulative(counted.latency)})
    return rows


# The top-level lists of rows, by what identifies a row; their other numbers are summed over workers.
_ROW_KEYS = {"latency": ("pool", "server"), "commands": ("pool", "command")}


def merge_rows(identity: Sequence[str], lists: Sequence[Any]) -> List[Dict[str, Any]]:
    """Sum rows with the same identity over the workers' lists (numbers and bucket lists, element-wise)."""
    merged: Dict[tuple, Dict[str, Any]] = {}
    for rows in lists:
        if not isinstance(rows, list):
            continue
        for row in rows:
            key = tuple(row.get(name) for name in identity)
            into = merged.get(key)
            if into is None:
                merged[key] = {k: (list(v) if isinstance(v, list) else v) for k, v in row.items()}
                continue
            for field, value in row.items():
                if field in identity:
                    continue
                if isinstance(value, list) and isinstance(into.get(field), list) and \
                        len(value) == len(into[field]):
                    into[field] = [a + b for a, b in zip(into[field], value)]
                elif isinstance(value, int) and isinstance(into.get(field), int):
                    into[field] += value
    return list(merged.values())


def merged_latency(histograms: List[Histogram]) -> Histogram:
    merged = Histogram()
    for histogram in histograms:
        merged.add(histogram)
    return merged


# Fields that are not counters: the first document's value (or the latest) stands.
_NOT_SUMMED = frozenset(("service", "source", "version", "uptime", "timestamp", "config_generation", "reloads",
                         "reload_failures"))


# The latest of the workers' values: each worker follows Sentinel itself.
_LATEST = frozenset(("server_ejected_at", "sentinel_epoch", "last_switch", "switches", "replicas_healthy",
                     "cluster_generation", "slots_offline", "slots_held", "slots_migrating", "slots"))


def merge_documents(documents: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Sum the workers' stats documents field by field (``server_ejected_at``: the latest).

    A key in any document is in the result: a pool or server one worker
    has (a reload it applied first) is not dropped.
    """
    if not documents:
        return {}
    merged: Dict[str, Any] = {}
    keys: Dict[str, None] = {}
    for document in documents:
        keys.update(dict.fromkeys(document))
    for key in keys:
        values = [d[key] for d in documents if key in d]
        first = values[0]
        if key in _ROW_KEYS and isinstance(first, list):
            merged[key] = merge_rows(_ROW_KEYS[key], values)
        elif isinstance(first, dict):
            merged[key] = merge_documents([v for v in values if isinstance(v, dict)])
        elif key in _NOT_SUMMED or not isinstance(first, int):
            merged[key] = first
        elif key in _LATEST:
            merged[key] = max(values)
        else:
            merged[key] = sum(values)
    return merged
