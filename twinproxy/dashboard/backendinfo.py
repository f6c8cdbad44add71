"""What each data server says about itself, for the web dashboard: memory, keys, hit ratio, evictions.

Owns :class:`BackendPoller`: every :data:`PERIOD` seconds, at most one
request in flight per server and each bounded by the command timeout, a
Redis server's ``INFO`` (its memory, stats, keyspace and replication
sections) or a memcached's ``stats``, reduced by :func:`redis_backend` /
:func:`memcache_backend` to the contract's ``backend`` object
(docs/web-dashboard.md) plus ``repl_offset`` (a master's
``master_repl_offset``, from which the dashboard shows each replica's lag in
bytes).  Slower than the health poll (once a second): these answers are
larger and change slowly.  Runs in the reactor, never blocking it.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Optional

from twisted.internet import defer

from twinproxy.credentials import Credentials
from twinproxy.dashboard.servers import Poller, ServerAdmin, ServerError, memcache_exchange

PERIOD = 3.0
MAX_STATS = 256 * 1024


def _fields(text: Any) -> Dict[str, str]:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    fields: Dict[str, str] = {}
    for line in str(text or "").splitlines():
        name, sep, value = line.partition(":")
        if sep and not line.startswith("#"):
            fields[name.strip()] = value.strip()
    return fields


def _int(value: Optional[str]) -> Optional[int]:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _ratio(hits: Optional[int], misses: Optional[int]) -> Optional[float]:
    if hits is None or misses is None or hits + misses <= 0:
        return None
    return round(hits / (hits + misses), 4)


def redis_backend(info: Any) -> Dict[str, Any]:
    """The backend object of a Redis ``INFO`` answer."""
    fields = _fields(info)
    keys: Optional[int] = None
    for name, value in fields.items():
        if name.startswith("db") and name[2:].isdigit():
            # db0:keys=12,expires=0,avg_ttl=0
            parts = dict(part.partition("=")[::2] for part in value.split(","))
            keys = (keys or 0) + (_int(parts.get("keys")) or 0)
    if keys is None and "used_memory" in fields:
        keys = 0          # INFO answered and lists no db: none holds a key
    role = {"master": "master", "slave": "replica"}.get(fields.get("role", ""), fields.get("role"))
    return {"role": role, "memory": _int(fields.get("used_memory")), "maxmemory": _int(fields.get("maxmemory")),
            "keys": keys, "hit_ratio": _ratio(_int(fields.get("keyspace_hits")), _int(fields.get("keyspace_misses"))),
            "evictions": _int(fields.get("evicted_keys")), "error": None,
            "repl_offset": _int(fields.get("master_repl_offset"))}


def memcache_backend(stats: Dict[str, str]) -> Dict[str, Any]:
    """The backend object of a memcached's ``stats`` answer (its ``STAT name value`` lines)."""
    return {"role": "master", "memory": _int(stats.get("bytes")), "maxmemory": _int(stats.get("limit_maxbytes")),
            "keys": _int(stats.get("curr_items")),
            "hit_ratio": _ratio(_int(stats.get("get_hits")), _int(stats.get("get_misses"))),
            "evictions": _int(stats.get("evictions")), "error": None, "repl_offset": None}


def failed_backend(error: str) -> Dict[str, Any]:
    return {"role": None, "memory": None, "maxmemory": None, "keys": None, "hit_ratio": None, "evictions": None,
            "error": error, "repl_offset": None}


def parse_stats(answer: bytes) -> Optional[Dict[str, str]]:
    """A memcached's ``stats`` answer as {name: value}; None while it is not whole."""
    if len(answer) > MAX_STATS:
        raise ServerError(f"the stats answer is larger than {MAX_STATS} bytes")
    if answer.startswith((b"ERROR", b"CLIENT_ERROR", b"SERVER_ERROR")) and answer.endswith(b"\r\n"):
        raise ServerError(answer.strip().decode("utf-8", "replace"))
    if not answer.endswith(b"END\r\n"):
        return None
    stats: Dict[str, str] = {}
    for line in answer.decode("utf-8", "replace").split("\r\n"):
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[0] == "STAT":
            stats[parts[1]] = parts[2]
    return stats


def memcache_stats(reactor: Any, address: str, timeout: float) -> defer.Deferred:
    """A memcached's ``stats`` as {name: value} (ServerError naming it otherwise)."""
    return memcache_exchange(reactor, address, b"stats\r\n", parse_stats, timeout)


class BackendPoller(Poller):
    """``info[addr]``: the latest backend object of every address ``addresses()`` names."""

    _what = "backend INFO poll"

    def __init__(self, reactor: Any, protocol: str, addresses: Callable[[], Iterable[str]], timeout: float,
                 period: float = PERIOD, auth: Optional[Credentials] = None) -> None:
        super().__init__(reactor, period, ServerAdmin(reactor, timeout, auth))
        self._protocol = protocol
        self._addresses = addresses
        self._timeout = timeout
        self._busy: Dict[str, defer.Deferred] = {}
        self.info: Dict[str, Dict[str, Any]] = {}

    def poll(self) -> None:
        addresses = set(self._addresses())
        for gone in [a for a in self.info if a not in addresses]:
            del self.info[gone]
        self._admin.forget(addresses)
        for address in sorted(addresses):
            if address not in self._busy:
                pending = self._poll_one(address)
                if not pending.called:
                    self._busy[address] = pending

    @defer.inlineCallbacks
    def _poll_one(self, address: str) -> Any:
        try:
            if self._protocol == "memcache":
                stats = yield memcache_stats(self._reactor, address, self._timeout)
                found = memcache_backend(stats)
            else:
                info = yield self._admin.command(address, b"INFO")
                found = redis_backend(info)
        except (ServerError, ValueError) as err:
            found = failed_backend(str(err))
        finally:
            self._busy.pop(address, None)
        if not self._stopped and address in set(self._addresses()):
            self.info[address] = found
