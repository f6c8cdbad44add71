"""Prometheus exposition of the proxy's counters.

Owns: a ``prometheus_client`` collector that reads the pools' counters at
scrape time (so the hot path only bumps integers), in a registry of its own
(never the library's global one), and the text it renders.  The collector
is synchronous and reads only in-memory numbers, so calling it in the
reactor thread is cheap and never blocks.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, List, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from twinproxy.stats import (
    LATENCY_BUCKETS,
    LEASE_FIELDS,
    PUBSUB_FIELDS,
    REDIS_POOL_FIELDS,
    Histogram,
    cluster_fields,
    lease_values,
    merged_latency,
    pubsub_values,
)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _buckets(histogram: Histogram) -> List[List[Any]]:
    cumulative = 0
    buckets = []
    for bound, count in zip((*LATENCY_BUCKETS, float("inf")), histogram.counts):
        cumulative += count
        buckets.append(["+Inf" if bound == float("inf") else repr(bound), cumulative])
    return buckets


_KINDS = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily}


def _family(name: str, kind: str, text: str, labels: List[str]) -> Metric:
    """The metric family of one field of a stats table: ``kind`` "gauge" (how many now) or "counter"."""
    return _KINDS[kind](name, text[:1].upper() + text[1:], labels=labels)


class ProxyCollector:
    """Yields every metric of every pool; ``services`` is read at each scrape."""

    def __init__(self, services: Callable[[], Sequence[Any]], started: float, clock: Any,
                 counters: Any = None) -> None:
        self._services = services
        self._started = started
        self._clock = clock
        self._counters = counters

    def describe(self) -> List[Metric]:
        return []  # computed at collect time only; nothing to register up front

    def collect(self) -> Iterator[Metric]:
        services = list(self._services())
        uptime = GaugeMetricFamily("twinproxy_uptime_seconds", "Seconds since the proxy started")
        uptime.add_metric([], self._clock.seconds() - self._started)
        yield uptime
        counters = self._counters
        if counters is not None:
            reloads = CounterMetricFamily("twinproxy_reloads", "Reloads of the pool file applied")
            reloads.add_metric([], counters.reloads)
            failures = CounterMetricFamily("twinproxy_reload_failures", "Reloads refused (nothing changed)")
            failures.add_metric([], counters.reload_failures)
            generation = GaugeMetricFamily("twinproxy_config_generation", "The configuration serving now "
                                           "(1 at start, +1 per applied reload)")
            generation.add_metric([], counters.generation)
            yield reloads
            yield failures
            yield generation

        pool_labels = ["pool"]
        server_labels = ["pool", "server"]
        families = {
            "client_eof": CounterMetricFamily("twinproxy_pool_client_eof", "Client connections closed by the "
                                              "client", labels=pool_labels),
            "client_err": CounterMetricFamily("twinproxy_pool_client_err", "Client connections that failed or "
                                              "broke the protocol", labels=pool_labels),
            "server_ejects": CounterMetricFamily("twinproxy_pool_server_ejects", "Servers ejected from the ring",
                                                 labels=pool_labels),
            "forward_error": CounterMetricFamily("twinproxy_pool_forward_error", "Requests answered with an error "
                                                 "because their server failed", labels=pool_labels),
            "fragments": CounterMetricFamily("twinproxy_pool_fragments", "Sub-requests made by splitting "
                                             "multi-key requests", labels=pool_labels),
            "client_output_limit_closed": CounterMetricFamily(
                "twinproxy_pool_client_output_limit_closed", "Clients closed because their unread replies passed "
                "client_output_hard_limit", labels=pool_labels),
        }
        redis_families = {name: _family(f"twinproxy_pool_{name}", kind, text, pool_labels)
                          for name, kind, text in REDIS_POOL_FIELDS}
        lease_families = {name: _family(f"twinproxy_server_{name}", kind, text, ["pool", "server"])
                          for name, kind, text in LEASE_FIELDS}
        clients = GaugeMetricFamily("twinproxy_pool_client_connections", "Client connections open now",
                                    labels=pool_labels)
        live = GaugeMetricFamily("twinproxy_pool_live_servers", "Servers in the ring now", labels=pool_labels)
        command_labels = ["pool", "command"]
        commands = CounterMetricFamily("twinproxy_pool_commands", "Requests received, by command",
                                       labels=command_labels)
        command_errors = CounterMetricFamily("twinproxy_pool_command_errors", "Error replies sent to clients "
                                             "(the server's or the proxy's), by command", labels=command_labels)
        command_latency = HistogramMetricFamily("twinproxy_pool_command_latency_seconds", "Time from "
                                                "sending a request to its server to the reply (a split "
                                                "request once, to its last fragment's reply), by command",
                                                labels=command_labels)
        pool_latency = HistogramMetricFamily("twinproxy_pool_request_latency_seconds", "Time from sending a "
                                             "request to a server to its reply, over the pool's servers",
                                             labels=pool_labels)
        server_counters = {
            name: CounterMetricFamily(f"twinproxy_server_{name}", text, labels=server_labels)
            for name, text in (
                ("eof", "Connections the server closed"),
                ("err", "Connections that failed"),
                ("timedout", "Connections closed on a reply timeout"),
                ("requests", "Requests sent to the server"),
                ("request_bytes", "Bytes of requests sent to the server"),
                ("responses", "Replies received from the server"),
                ("response_bytes", "Bytes of replies received from the server"),
            )
        }
        server_gauges = {
            name: GaugeMetricFamily(f"twinproxy_server_{name}", text, labels=server_labels)
            for name, text in (
                ("connections", "Connections to the server open now"),
                ("ejected", "1 while the server is ejected from the ring"),
                ("up", "0 after a failed connection or a timeout, until a connection succeeds"),
                ("in_queue", "Requests waiting for a connection"),
                ("in_queue_bytes", "Bytes of requests waiting for a connection"),
                ("out_queue", "Requests sent and awaiting a reply"),
                ("out_queue_bytes", "Bytes of requests sent and awaiting a reply"),
            )
        }
        server_latency = HistogramMetricFamily("twinproxy_server_latency_seconds", "Time from sending a request "
                                               "to the server to its reply", labels=server_labels)
        for service in services:
            pool = service.pool
            counters = pool.counters
            name = service.name
            for field, family in families.items():
                family.add_metric([name], getattr(counters, field))
            redis = service.config.redis
            if redis:
                for field, family in redis_families.items():
                    family.add_metric([name], getattr(counters, field))
            clients.add_metric([name], len(service.factory.clients))
            live.add_metric([name], len(pool.live_servers))
            for command, counted in sorted(counters.commands.items()):
                labels = [name, command]
                commands.add_metric(labels, counted.calls)
                command_errors.add_metric(labels, counted.errors)
                command_latency.add_metric(labels, _buckets(counted.latency), counted.latency.total)
            histograms = []
            for link in service.links:
                server = link.server
                labels = [name, server.spec.stats_name]
                sc = server.counters
                for field, value in (("eof", sc.server_eof), ("err", sc.server_err),
                                     ("timedout", sc.server_timedout), ("requests", sc.requests),
                                     ("request_bytes", sc.request_bytes), ("responses", sc.responses),
                                     ("response_bytes", sc.response_bytes)):
                    server_counters[field].add_metric(labels, value)
                in_queue, in_bytes, out_queue, out_bytes = link.queue_stats()
                for field, value in (("connections", link.connection_count), ("ejected", int(server.ejected)),
                                     ("up", int(server.up)), ("in_queue", in_queue),
                                     ("in_queue_bytes", in_bytes), ("out_queue", out_queue),
                                     ("out_queue_bytes", out_bytes)):
                    server_gauges[field].add_metric(labels, value)
                server_latency.add_metric(labels, _buckets(sc.latency), sc.latency.total)
                if redis:
                    for field, value in lease_values(link).items():
                        lease_families[field].add_metric(labels, value)
                histograms.append(sc.latency)
            merged = merged_latency(histograms)
            pool_latency.add_metric([name], _buckets(merged), merged.total)
        yield from families.values()
        yield from redis_families.values()
        yield clients
        yield live
        yield commands
        yield command_errors
        yield command_latency
        yield pool_latency
        yield from server_counters.values()
        yield from server_gauges.values()
        yield server_latency
        yield from lease_families.values()
        yield from _sentinel_metrics(services)
        yield from _cluster_metrics(services)
        yield from _pubsub_metrics(services)


def _pubsub_metrics(services: Sequence[Any]) -> Iterator[Metric]:
    """Per Redis pool: PUBSUB_FIELDS as twinproxy_pool_<field>."""
    families = {name: _family(f"twinproxy_pool_{name}", kind, text, ["pool"])
                for name, kind, text, _ in PUBSUB_FIELDS}
    found = False
    for service in services:
        for name, value in pubsub_values(service).items():
            found = True
            families[name].add_metric([service.name], value)
    if found:
        yield from families.values()


def _cluster_metrics(services: Sequence[Any]) -> Iterator[Metric]:
    """Per cluster pool: the generation applied, the coordinator session, slots per group."""
    generation = GaugeMetricFamily("twinproxy_cluster_generation", "The cluster topology generation applied",
                                   labels=["pool", "cluster"])
    session = GaugeMetricFamily("twinproxy_cluster_coordinator_session", "1 for the coordinator session's state",
                                labels=["pool", "cluster", "state"])
    slots = GaugeMetricFamily("twinproxy_cluster_slots", "Slots served per group (group 'offline': by none), "
                              "and held", labels=["pool", "cluster", "group", "state"])
    found = False
    for service in services:
        config = service.config
        if not config.cluster_mode:
            continue
        found = True
        fields = cluster_fields(config)
        names = [service.name, config.cluster]
        generation.add_metric(names, fields["cluster_generation"])
        session.add_metric([*names, fields["coordinator_session"]], 1)
        table = config.slots
        if table is not None:
            for group, count in sorted(table.slots_per_group().items()):
                slots.add_metric([*names, group, "serving"], count)
            slots.add_metric([*names, "all", "held"], len(table.held))
    if found:
        yield from (generation, session, slots)


def _sentinel_metrics(services: Sequence[Any]) -> Iterator[Metric]:
    """Per shard of a Sentinel pool: where its master is, its epoch, its switches, its replicas."""
    labels = ["pool", "server"]
    master = GaugeMetricFamily("twinproxy_sentinel_master", "1 for the node serving as a shard's master, "
                               "with its address and role (unconfirmed: none yet)",
                               labels=[*labels, "address", "role"])
    epoch = GaugeMetricFamily("twinproxy_sentinel_epoch", "The Sentinel config epoch of the shard's master",
                              labels=labels)
    switches = CounterMetricFamily("twinproxy_sentinel_switches", "Master switches followed", labels=labels)
    last = GaugeMetricFamily("twinproxy_sentinel_last_switch_timestamp_seconds", "When the master last "
                             "switched (0: never)", labels=labels)
    replicas = GaugeMetricFamily("twinproxy_sentinel_replicas_healthy", "Replicas reads may go to now",
                                 labels=labels)
    reads = CounterMetricFamily("twinproxy_sentinel_replica_reads", "Reads sent to replicas", labels=labels)
    found = False
    for service in services:
        for link in service.links:
            shard = link.shard
            if shard is None:
                continue
            found = True
            document = shard.stats()
            names = [service.name, link.server.spec.stats_name]
            master.add_metric([*names, document["address"], document["role"]], 1)
            epoch.add_metric(names, document["sentinel_epoch"])
            switches.add_metric(names, document["switches"])
            last.add_metric(names, document["last_switch"])
            replicas.add_metric(names, document["replicas_healthy"])
            reads.add_metric(names, document["replica_reads"])
    if found:
        yield from (master, epoch, switches, last, replicas, reads)


def render(services: Callable[[], Sequence[Any]], started: float, clock: Any, counters: Any = None) -> bytes:
    """The exposition text for the pools ``services()`` returns now."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(services, started, clock, counters))
    return generate_latest(registry)
