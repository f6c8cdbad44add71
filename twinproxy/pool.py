"""A server pool: which servers exist, which are live, and which owns a key.

Owns: the pool's :class:`Server` objects in configuration order, their
health (consecutive failures, ejection deadline), the continuum over the
live ones, ``server_for_key``, auto-ejection and the timed return of
ejected servers on an injected clock, and ``install``, which swaps in a
new configuration at runtime (a reload, a failover).  Knows no wire protocol,
no socket and not the global reactor.

Each :class:`Server` carries a ``send`` callable wired in by the service
(its backend connections); the frontend only ever calls ``send``.
"""

from __future__ import annotations

import platform
import types
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from twisted.logger import Logger

from twinproxy.cluster.slots import slot_of
from twinproxy.cluster.targets import SlotRouting
from twinproxy.config import PoolConfig, ServerSpec
from twinproxy.distribution import Continuum, build_continuum, ring_router
from twinproxy.hashing import HASH_FUNCTIONS, hash_tag_extractor
from twinproxy.request import Request
from twinproxy.stats import PoolCounters, ServerCounters

# Keys remembered before the route cache starts over, and the longest key it
# keeps: at most about 40 MB, and only as many keys as are in use.
ROUTE_CACHE_SIZE = 131072
ROUTE_CACHE_KEY_BYTES = 256
# Only CPython interprets a hash loop slowly enough for the cache to pay:
# PyPy compiles it, and there a dict of many keys costs more than the hash.
CACHE_PYTHON_HASHES = platform.python_implementation() == "CPython"


def _not_wired(request: Request) -> None:
    raise RuntimeError("server has no backend connections wired to it")


def _not_wired_error(request: Request, text: str, code: str = "ERR") -> None:
    raise RuntimeError(f"pool has no error replies wired to it ({text})")


class Server:
    """One backend of a pool: identity, health, and where to send requests."""

    __slots__ = ("spec", "name", "index", "failure_count", "ejected_until", "ejected_at", "ejects", "send",
                 "counters", "up", "link")

    def __init__(self, spec: ServerSpec, index: int) -> None:
        self.spec = spec
        self.name = spec.name
        self.index = index
        self.failure_count = 0
        self.ejected_until = 0.0
        self.ejected_at = 0.0
        self.ejects = 0
        self.send: Callable[[Request], None] = _not_wired
        self.link: Any = None     # its ServerLink, for connections outside the shared ones (leases)
        self.counters = ServerCounters()
        # False from a failed connection or timeout until a connection succeeds.
        self.up = True

    @property
    def ejected(self) -> bool:
        return self.ejected_until > 0

    def __repr__(self) -> str:
        return f"<Server {self.name} {self.spec.address}>"


class UnavailableServer:
    """What ``server_for_key`` gives when no server is live: it answers every
    request at once with an error, so callers need no special case."""

    __slots__ = ("name", "send")

    def __init__(self, name: str, send: Callable[[Request], None]) -> None:
        self.name = name
        self.send = send


class ServerPool:
    """Routing and health for one pool; the clock is injected (``seconds``, ``callLater``)."""

    _log = Logger()

    def __init__(self, config: PoolConfig, clock: Any) -> None:
        self.name = config.name
        self._clock = clock
        self._retry_call: Any = None
        self.servers: List[Server] = []
        self._live: List[Server] = []
        self._continuum: Optional[Continuum] = None
        # key -> server, valid until the ring changes: hashing in Python costs
        # microseconds per key, a dict hit tens of nanoseconds.
        self._routes: Dict[bytes, Server] = {}
        self.unavailable = UnavailableServer("-", _not_wired)
        self.counters = PoolCounters()
        # What codecs keep per pool across reloads (the Router protocol's codec_state).
        self.codec_state: Dict[str, Any] = {}
        # Told ``(kind, pool, server)`` of each ejection ("eject") and return to the ring ("restore").
        self.health_listeners: List[Callable[[str, "ServerPool", Server], None]] = []
        # Cluster mode: the slot table's targets; ``reply_error(request, text)``
        # (set by the runtime, which knows the codec) answers for stand-ins.
        self.reply_error: Callable[..., None] = _not_wired_error
        self.slots: Optional[SlotRouting] = (SlotRouting(config.cluster, clock, self._reply_error)
                                             if config.cluster_mode else None)
        # The slot of a key, for the codecs' one-slot checks; None outside cluster mode.
        self.slot_of: Optional[Callable[[bytes], int]] = slot_of if config.cluster_mode else None
        self.install(config)

    # -- routing --------------------------------------------------------------

    @property
    def live_servers(self) -> Sequence[Server]:
        return self._live

    @property
    def all_servers(self) -> Sequence[Server]:
        """Every server, ejected or not, in configuration order; in a cluster pool each group's
        master (``cluster_pool`` lists them by group id)."""
        return self.servers

    def server_for_key(self, key: bytes) -> Any:
        """The live server that owns ``key``, or ``self.unavailable`` if none is live."""
        return self.route(key)

    def servers_for_keys(self, keys: Sequence[bytes]) -> List[Any]:
        """``server_for_key`` of each key, in order: one call for a multi-key command."""
        return list(map(self.route, keys))

    def _cached_route(self, key: bytes) -> Any:
        server = self._routes.get(key)
        if server is not None:
            return server
        server = self._ring_route(key)
        if len(key) <= ROUTE_CACHE_KEY_BYTES:
            routes = self._routes
            if len(routes) >= ROUTE_CACHE_SIZE:
                routes.clear()
            routes[key] = server
        return server

    def _reply_error(self, request: Request, text: str, code: str = "ERR") -> None:
        self.counters.forward_error += 1
        self.reply_error(request, text, code)

    def _make_route(self) -> Callable[[bytes], Any]:
        """The fastest key -> server function for the ring as it is now.

        A hash in C (twinproxy._speedups), or in Python on PyPy, costs less
        than remembering its answer: the ring is a few hundred points, always
        in cache, where a route cache of many keys is not (measured on PyPy:
        MGET 23% less CPU without it).  A hash CPython interprets is remembered.
        """
        if self.slots is not None:
            table = self.config.slots
            if table is None:
                return self.slots.not_ready(self.config.slot_hold / 1000.0)
            return self.slots.install(table, {server.name: server for server in self.servers},
                                      self.config.slot_hold / 1000.0, self.config)
        live = self._live
        if not live:
            unavailable = self.unavailable
            return lambda key: unavailable
        if len(live) == 1:
            only = live[0]
            return lambda key: only
        hash_key = self._hash
        tag = self._tag
        continuum = self._continuum
        if self._random:
            lookup = continuum.lookup
            return lambda key: live[lookup(0)]
        ring_route = ring_router(live, continuum, hash_key, tag, bool(self.config.hash_tag))
        self._ring_route = ring_route
        if CACHE_PYTHON_HASHES and isinstance(hash_key, types.FunctionType):
            return self._cached_route
        return ring_route

    # -- topology -------------------------------------------------------------

    def install(self, config: PoolConfig, renamed: Sequence[Tuple[str, str]] = ()) -> List[Server]:
        """Route by ``config`` from now on: its servers, hash, hash tag and distribution.

        Servers are matched by name (what ketama hashes): one whose name is
        kept keeps its object, and so its health, counters and connections,
        even under a new address or weight.  The new ring replaces the old
        one in a single assignment of ``route``.  Returns the servers that
        are gone, for the caller to drain.
        """
        self.config = config
        if config.cluster_mode and self.slots is None:
            # A pool that joins a cluster in place (an adopted twemproxy pool): from now on by slots.
            self.slots = SlotRouting(config.cluster, self._clock, self._reply_error)
            self.slot_of = slot_of
        self._hash = HASH_FUNCTIONS[config.hash]
        self._tag = hash_tag_extractor(config.hash_tag)
        self._random = config.distribution == "random"
        old: Dict[str, Server] = {s.name: s for s in self.servers}
        for before, after in renamed:      # (old name, new name): the same server under a new name
            if before in old:
                old[after] = old.pop(before)
                old[after].name = after
        servers = []
        for index, spec in enumerate(config.servers):
            server = old.pop(spec.name, None)
            if server is None:
                server = Server(spec, index)
            else:
                server.spec = spec
                server.index = index
            if not config.ejects:
                server.ejected_until = 0.0
            servers.append(server)
        self.servers = servers
        self._rebuild()
        return list(old.values())

    def _rebuild(self) -> None:
        now = self._clock.seconds()
        for server in self.servers:
            if server.ejected_until and server.ejected_until <= now:
                server.ejected_until = 0.0
                self._log.info("pool {pool}: server {server} back in the ring after retry timeout",
                               pool=self.name, server=server.name)
                self._tell("restore", server)
        live = [s for s in self.servers if not s.ejected_until]
        self._live = live
        self._routes = {}
        # A cluster pool routes by its slot table, never by a ring.
        self._continuum = build_continuum(
            self.config.distribution, [(s.name, s.spec.weight) for s in live]) if live and self.slots is None else None
        # ``server_for_key`` as a plain function, rebuilt with the ring: the
        # frontend calls it once per request.
        self.route: Callable[[bytes], Any] = self._make_route()
        self._schedule_retry()

    def _schedule_retry(self) -> None:
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        pending = [s.ejected_until for s in self.servers if s.ejected_until]
        if pending:
            delay = max(0.0, min(pending) - self._clock.seconds())
            self._retry_call = self._clock.callLater(delay, self._retry_due)

    def _retry_due(self) -> None:
        self._retry_call = None
        self._rebuild()

    # -- health ---------------------------------------------------------------

    def record_success(self, server: Server) -> None:
        server.failure_count = 0

    def record_failure(self, server: Server, reason: str = "") -> None:
        """Count a failure; eject the server at ``server_failure_limit`` when auto-eject is on."""
        server.failure_count += 1
        config = self.config
        if not config.ejects or server.ejected_until:
            return
        if server.failure_count < config.server_failure_limit:
            return
        server.failure_count = 0
        now = self._clock.seconds()
        retry = config.server_retry_timeout / 1000.0
        server.ejected_until = now + retry if retry > 0 else now + 1e-9
        server.ejected_at = now
        server.ejects += 1
        self.counters.server_ejects += 1
        self._log.warn("pool {pool}: server {server} ejected for {seconds}s after {limit} consecutive "
                       "failures ({reason})", pool=self.name, server=server.name, seconds=retry,
                       limit=config.server_failure_limit, reason=reason or "error")
        self._rebuild()
        self._tell("eject", server)

    def _tell(self, kind: str, server: Server) -> None:
        for listener in list(self.health_listeners):
            try:
                listener(kind, self, server)
            except Exception:  # noqa: BLE001 - a listener's bug must not stop routing
                self._log.failure("pool {pool}: health listener failed", pool=self.name)

    @property
    def healthy(self) -> bool:
        """True when some server is in the ring and not known to be down."""
        return any(server.up for server in self._live)

    def stop(self) -> None:
        """Cancel the pending retry timer; the pool routes nothing after this."""
        if self.slots is not None:
            self.slots.stop()
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
