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
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from twinproxy.dashboard.servers import ServerAdmin, ServerError, split_address, with_deadline

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


class _StatsProtocol(Protocol):
    def __init__(self, result: defer.Deferred) -> None:
        self.result = result
        self.buffer = b""

    def connectionMade(self) -> None:
        self.transport.write(b"stats\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if self.result.called:
            return
        if len(self.buffer) > MAX_STATS:
            self.result.errback(ServerError(f"the stats answer is larger than {MAX_STATS} bytes"))
        elif self.buffer.endswith(b"END\r\n") or b"ERROR" in self.buffer:
            stats: Dict[str, str] = {}
            for line in self.buffer.decode("utf-8", "replace").split("\r\n"):
                parts = line.split(" ", 2)
                if len(parts) == 3 and parts[0] == "STAT":
                    stats[parts[1]] = parts[2]
            self.result.callback(stats)
        else:
            return
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:
        if not self.result.called:
            self.result.errback(ServerError("connection closed before the stats answer ended"))


class _StatsFactory(ClientFactory):
    noisy = False

    def __init__(self, result: defer.Deferred) -> None:
        self.result = result

    def buildProtocol(self, addr: Any) -> Protocol:
        return _StatsProtocol(self.result)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if not self.result.called:
            self.result.errback(ServerError(reason.getErrorMessage()))


def memcache_stats(reactor: Any, address: str, timeout: float) -> defer.Deferred:
    """A memcached's ``stats`` as {name: value} (ServerError naming it otherwise)."""
    result: defer.Deferred = defer.Deferred()
    host, port = split_address(address)
    connector = reactor.connectTCP(host, port, _StatsFactory(result), timeout=timeout)

    def named(value: Any) -> Any:
        if isinstance(value, Failure):
            raise ServerError(f"{address}: {value.getErrorMessage()}")
        return value

    return with_deadline(reactor, result, connector, timeout, f"no stats within {timeout:g}s").addBoth(named)


class BackendPoller:
    """``info[addr]``: the latest backend object of every address ``addresses()`` names."""

    _log = Logger()

    def __init__(self, reactor: Any, protocol: str, addresses: Callable[[], Iterable[str]], timeout: float,
                 period: float = PERIOD) -> None:
        self._reactor = reactor
        self._protocol = protocol
        self._addresses = addresses
        self._timeout = timeout
        self._period = period
        self._admin = ServerAdmin(reactor, timeout)
        self._busy: Dict[str, defer.Deferred] = {}
        self._loop: Optional[LoopingCall] = None
        self._stopped = False
        self.info: Dict[str, Dict[str, Any]] = {}

    def start(self) -> None:
        self._stopped = False
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._reactor
        self._loop.start(self._period, now=True)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        self._stopped = True
        self._admin.close()

    def _tick(self) -> None:
        try:
            self.poll()
        except Exception:  # noqa: BLE001 - logged; a LoopingCall whose call raises stops for good
            self._log.failure("backend INFO poll")

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
