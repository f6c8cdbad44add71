"""The dashboard's 1-second sample of the proxies' stats documents: rates and percentiles (docs/web-dashboard.md).

Owns :class:`Sampler`: each ``sample()`` looks at the last document the
:class:`~twinproxy.dashboard.metrics.StatsPoller` fetched from each
registered proxy and computes, from the difference between that proxy's
last two documents, its requests per second (the calls of the top-level
``commands`` list, this cluster's pools only, as the proxy's own page
counts; a document without it: the servers' requests), its error rate, each server's requests per second
and the p50/p99 of the per-server and per-command latency buckets when the
document carries them (``latency`` / ``commands``; otherwise null).  A
proxy whose document did not change during a sample has missed it
(``missed``); after :data:`STALE_AFTER` misses in a row it is ``stale``
and leaves the sums (its last good document counts until then).  Every
sample adds a point to the :class:`~twinproxy.web.series.Series`.  Pure
apart from the clock: no reactor, no I/O (the tests drive it by hand).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from twinproxy.web.series import Series, add_counts, bucket_deltas, per_bucket, percentiles, rate

STALE_AFTER = 3
PERIOD = 1.0

ServerKey = Tuple[str, str]      # (pool, server name as the proxy's stats name it)


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0
    return value


def cluster_pools(document: Optional[Dict[str, Any]], cluster: str) -> Dict[str, Dict[str, Any]]:
    """The pool documents of ``cluster`` in one stats document, by pool name."""
    if not document:
        return {}
    return {name: pool for name, pool in document.items()
            if isinstance(pool, dict) and pool.get("cluster") == cluster}


def pool_servers(pool: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    return {name: server for name, server in pool.items() if isinstance(server, dict)}


def _histograms(document: Optional[Dict[str, Any]], key: str, pools: Any, name: str) -> Dict[Tuple[str, str], Any]:
    """``document[key]``'s entries of ``pools`` by (pool, entry[name]): the whole entries."""
    found: Dict[Tuple[str, str], Any] = {}
    items = (document or {}).get(key)
    if not isinstance(items, list):
        return found
    for item in items:
        if isinstance(item, dict) and item.get("pool") in pools and isinstance(item.get(name), str) \
                and isinstance(item.get("buckets"), list):
            found[(item["pool"], item[name])] = item
    return found


def command_calls(document: Optional[Dict[str, Any]], pools: Any) -> Optional[Dict[Tuple[str, str], float]]:
    """``document["commands"]``'s calls of ``pools`` by (pool, command); None without that top-level list."""
    items = (document or {}).get("commands")
    if not isinstance(items, list):
        return None
    return {(item["pool"], item["command"]): _number(item.get("calls")) for item in items
            if isinstance(item, dict) and item.get("pool") in pools and isinstance(item.get("command"), str)}


def calls_since(before: Optional[Dict[Tuple[str, str], float]], after: Dict[Tuple[str, str], float]) -> float:
    """Command calls made from ``before`` to ``after``: a row new or gone down (restart) counts its calls alone."""
    total = 0.0
    for key, calls in after.items():
        old = before.get(key) if before is not None else None
        total += calls - old if old is not None and old <= calls else calls
    return total


@dataclass
class ProxyTrack:
    """One proxy's last two good documents (and when they came) and its misses."""

    before: Optional[Dict[str, Any]] = None
    before_time: float = 0.0
    last: Optional[Dict[str, Any]] = None
    last_time: float = 0.0
    missed: int = 0
    stale: bool = False
    values: Dict[str, Any] = field(default_factory=dict)   # what the last difference gave

    def seen(self, document: Dict[str, Any], when: float) -> None:
        self.before, self.before_time = self.last, self.last_time
        self.last, self.last_time = document, when
        self.missed = 0
        self.stale = False


class Sampler:
    """Samples ``poller`` (its ``documents`` and ``received``) for the proxies ``proxies()`` lists."""

    def __init__(self, cluster: str, poller: Any, proxies: Callable[[], List[Dict[str, Any]]],
                 clock: Callable[[], float], series: Optional[Series] = None,
                 on_stale: Optional[Callable[[str, int], None]] = None) -> None:
        self.cluster = cluster
        self._poller = poller
        self._proxies = proxies
        self._clock = clock
        self.series = series if series is not None else Series()
        self._on_stale = on_stale
        self.tracks: Dict[str, ProxyTrack] = {}
        self.latest: Dict[str, Any] = _empty()

    def sample(self) -> Dict[str, Any]:
        """One sample: update every proxy's track, recompute the cluster's figures, add a series point."""
        now = self._clock()
        registered = [p["id"] for p in self._proxies() if isinstance(p.get("id"), str)]
        for gone in [pid for pid in self.tracks if pid not in registered]:
            del self.tracks[gone]
        documents = getattr(self._poller, "documents", {})
        received = getattr(self._poller, "received", {})
        for pid in registered:
            track = self.tracks.setdefault(pid, ProxyTrack())
            document = documents.get(pid)
            if document is not None and document is not track.last:
                track.seen(document, received.get(pid, now))
                track.values = self._difference(track)
            else:
                track.missed += 1
                if track.missed >= STALE_AFTER and not track.stale:
                    track.stale = True
                    if self._on_stale is not None:
                        self._on_stale(pid, track.missed)
        self.latest = self._combine()
        self.series.add(now, self.latest["ops_per_second"], self.latest["p99_ms"])
        return self.latest

    def _difference(self, track: ProxyTrack) -> Dict[str, Any]:
        """What one proxy did between its last two documents."""
        before_pools = cluster_pools(track.before, self.cluster)
        after_pools = cluster_pools(track.last, self.cluster)
        seconds = track.last_time - track.before_time if track.before is not None else 0.0
        servers: Dict[ServerKey, Dict[str, Any]] = {}
        ops = errors = requests = 0.0
        clients = 0
        for pool_name, pool in after_pools.items():
            old_pool = before_pools.get(pool_name, {})
            clients += int(_number(pool.get("client_connections")))
            if track.before is not None:
                errors += rate(_number(old_pool.get("forward_error")), _number(pool.get("forward_error")), seconds)
            for name, server in pool_servers(pool).items():
                old = old_pool.get(name) if isinstance(old_pool.get(name), dict) else {}
                per_second = rate(_number(old.get("requests")), _number(server.get("requests")), seconds) \
                    if track.before is not None else 0.0
                ops += per_second
                requests += _number(server.get("requests"))
                servers[(pool_name, name)] = {"requests_per_second": per_second, "document": server}
        # ops/s and requests as the proxy's own page counts them, when the document has them: command calls
        # (one per client request, replies the proxy made included); the servers' requests count each
        # fragment of a split request and miss the proxy's replies.
        calls = command_calls(track.last, after_pools)
        if calls is not None:
            requests = sum(calls.values())
            ops = 0.0
            if track.before is not None and seconds > 0:
                ops = calls_since(command_calls(track.before, before_pools), calls) / seconds
        latency = self._deltas(track, "latency", "server", after_pools)
        commands = self._deltas(track, "commands", "command", after_pools)
        return {"ops_per_second": ops, "errors_per_second": errors, "requests": int(requests), "clients": clients,
                "servers": servers, "latency": latency, "commands": commands}

    def _deltas(self, track: ProxyTrack, key: str, name: str, pools: Any) -> Dict[Tuple[str, str], Any]:
        after = _histograms(track.last, key, pools, name)
        before = _histograms(track.before, key, pools, name) if track.before is not None else {}
        found = {}
        for item_key, item in after.items():
            old = before.get(item_key)
            # The document's buckets are cumulative (each counts the replies within its bound): per bucket here.
            found[item_key] = {"item": item, "delta": per_bucket(bucket_deltas(old["buckets"] if old else None,
                                                                               item["buckets"]))
                               if track.before is not None else None}
        return found

    def _combine(self) -> Dict[str, Any]:
        """The cluster's figures from every proxy not stale."""
        combined = _empty()
        all_buckets: Optional[List[int]] = None
        per_server: Dict[ServerKey, Dict[str, Any]] = {}
        per_command: Dict[str, Dict[str, Any]] = {}
        for pid in sorted(self.tracks):
            track = self.tracks[pid]
            values = track.values
            error_rate = 0.0
            ops = values.get("ops_per_second", 0.0)
            if ops > 0:
                error_rate = min(1.0, values.get("errors_per_second", 0.0) / ops)
            combined["proxies"][pid] = {"ops_per_second": round(ops, 1), "clients": values.get("clients", 0),
                                        "error_rate": round(error_rate, 4), "missed": track.missed,
                                        "stale": track.stale, "last_seen": track.last_time or None}
            if track.stale or not values:
                continue
            combined["ops_per_second"] += ops
            combined["requests"] += values["requests"]
            combined["clients"] += values["clients"]
            for key, server in values["servers"].items():
                row = per_server.setdefault(key, {"requests_per_second": 0.0, "errors": 0, "timeouts": 0,
                                                  "connections": 0, "in_flight": 0, "buckets": None,
                                                  "ejected_at": 0, "address": None})
                document = server["document"]
                row["requests_per_second"] += server["requests_per_second"]
                # as the proxy's page: the server's connections that failed or were closed by it
                row["errors"] += int(_number(document.get("server_err")) + _number(document.get("server_eof")))
                row["timeouts"] += int(_number(document.get("server_timedout")))
                row["connections"] += int(_number(document.get("server_connections")))
                row["in_flight"] += int(_number(document.get("out_queue")) + _number(document.get("in_queue")))
                row["ejected_at"] = max(row["ejected_at"], _number(document.get("server_ejected_at")) / 1e6)
                if isinstance(document.get("address"), str) and document["address"]:
                    row["address"] = document["address"]
            for key, entry in values["latency"].items():
                if entry["delta"] is not None:
                    row = per_server.setdefault(key, {"requests_per_second": 0.0, "errors": 0, "timeouts": 0,
                                                      "connections": 0, "in_flight": 0, "buckets": None,
                                                      "ejected_at": 0, "address": None})
                    row["buckets"] = add_counts(row["buckets"], entry["delta"])
                    all_buckets = add_counts(all_buckets, entry["delta"])
            for (_, command), entry in values["commands"].items():
                item = entry["item"]
                row = per_command.setdefault(command, {"command": command, "calls": 0, "errors": 0, "buckets": None})
                row["calls"] += int(_number(item.get("calls")))
                row["errors"] += int(_number(item.get("errors")))
                if entry["delta"] is not None:
                    row["buckets"] = add_counts(row["buckets"], entry["delta"])
        combined["ops_per_second"] = round(combined["ops_per_second"], 1)
        combined["p50_ms"], combined["p99_ms"] = percentiles(all_buckets)
        for row in per_server.values():
            row["p50_ms"], row["p99_ms"] = percentiles(row.pop("buckets"))
            row["requests_per_second"] = round(row["requests_per_second"], 1)
        combined["servers"] = per_server
        commands = []
        for command in sorted(per_command):
            row = per_command[command]
            row["p50_ms"], row["p99_ms"] = percentiles(row.pop("buckets"))
            commands.append(row)
        combined["commands"] = commands
        return combined


def _empty() -> Dict[str, Any]:
    return {"ops_per_second": 0.0, "requests": 0, "clients": 0, "p50_ms": None, "p99_ms": None,
            "proxies": {}, "servers": {}, "commands": []}
