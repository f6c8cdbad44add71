r"""All of the proxy's connections to one backend server.

Owns: :class:`ServerLink` — a fixed array of connection slots per connection
profile (protocol dialect and database, :func:`~twinproxy.request.profile_of`;
``server_connections`` slots each), each filled on demand and
replaced in place when its connection dies, so ``client_id % slots`` sends
one client's requests down one socket for as long as the slot count
stands; and the runtime changes of a server: :meth:`ServerLink.retarget`
(a new address under the same name), :meth:`ServerLink.reconfigure` (new
settings; a new handshake or slot count replaces the connections after
draining), :meth:`ServerLink.drain` (the server left the pool),
:meth:`ServerLink.cut_over` (a master switch: drop everything now) and
:meth:`ServerLink.stop` (shutdown), which reach its leased connections
(:class:`~twinproxy.leases.Leases`: lent to one client each) too.  Never
routes and never parses.

::

    send(request) --> slots[profile][client_id % n] --> BackendConnection.send
                  \-- a LEASED profile (no slots): leases.lend --> a connection of its own
    retired connections: drain (no new requests; close after the last reply
    or at the drain deadline); their replacements' writes wait behind them
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Set

from twisted.internet import defer
from twisted.logger import Logger

from twinproxy.backend import BackendConnection, ConnectorFactory
from twinproxy.config import PoolConfig
from twinproxy.leases import Leases
from twinproxy.protocols import Codec
from twinproxy.request import LEASED, Request


def drain_seconds(config: PoolConfig) -> float:
    """How long a retired connection may take to answer what it was sent.

    The pool's ``timeout`` where there is one (a reply later than that would
    have failed anyway); else ``shutdown_timeout``, so a drain always ends.
    """
    if config.timeout_seconds is not None:
        return config.timeout_seconds
    return config.shutdown_timeout / 1000.0


class ServerLink:
    """The connections to one server: slots per connection profile, and the retired ones draining."""

    _log = Logger()

    def __init__(self, server: Any, pool: Any, codec: Codec, config: PoolConfig, reactor: Any) -> None:
        self.server = server
        self.pool = pool
        self.reactor = reactor
        self.clock = reactor
        self._slots: Dict[int, List[Optional[BackendConnection]]] = {}
        # Retired connections still answering what they were sent.
        self._draining: Set[BackendConnection] = set()
        # Retired connections that new ones on this server must wait for (same server, same keys).
        self._barrier: Set[BackendConnection] = set()
        # Connections holding their writes, each until what it waits for is gone.
        self._gated: Dict[BackendConnection, Set[BackendConnection]] = {}
        self._stopped = False
        self._lost_waiters: Dict[BackendConnection, defer.Deferred] = {}
        self._drained_waiters: List[defer.Deferred] = []
        self._last_failure: Optional[str] = None
        # Set by the runtime: the frontends' outbox, flushed after each burst of replies.
        self.outbox: Any = None
        # Where connections go: the server's configured address, unless a
        # topology source (Sentinel) says otherwise; None: nowhere yet.
        self.target: Any = server.spec
        # Set by a topology source that wants a look at failures first:
        # ``intercept(request, how) -> True`` when it took the request over (a
        # retry elsewhere), called for error replies and for requests failed
        # by a connection (``how``: backend.ERROR_REPLY, LOST or NEVER_SENT;
        # ``request.reply`` holds the error); ``on_lost(connection)`` when
        # a connection closed or failed that the link did not close itself.
        self.intercept: Any = None
        self.on_lost: Any = None
        # The Sentinel shard this link is the master link of, for the stats.
        self.shard: Any = None
        # Told ``(link)`` after ``target`` changed (retarget, cut_over): the pool's
        # subscriber connections, which live outside the slots, follow the server.
        self.moved_listeners: List[Any] = []
        # Connections lent to one client each (WATCH pins, blocking commands), apart from the shared slots.
        self.leases = Leases(self)
        self._configure(codec, config)
        server.send = self.send
        server.link = self

    def _configure(self, codec: Codec, config: PoolConfig) -> None:
        self.codec = codec
        self.config = config
        self.timeout = config.timeout_seconds
        self._size = config.server_connections
        self.leases.configure(config.server_leased_connections)

    # -- leases (see twinproxy.leases) ----------------------------------------------

    def lease(self, profile: int) -> Optional[BackendConnection]:
        """A connection for one client session alone, or None (``leases.refusal`` says why).

        Counted against ``server_leased_connections``; given back with
        ``release`` (clean: reused), ``discard`` (closed now) or
        ``retire_lease`` (closed once what it was sent is answered).
        """
        return self.leases.lease(profile)

    def release(self, connection: BackendConnection) -> None:
        """``connection`` is clean (nothing pending, no session state): keep it for the next lease."""
        self.leases.release(connection)

    def discard(self, connection: BackendConnection) -> None:
        """Close a leased connection (its session state dies with it)."""
        self.leases.discard(connection)

    def retire_lease(self, connection: BackendConnection) -> None:
        """Close a leased connection once what it was sent is answered (its session state dies with it)."""
        self.leases.retire(connection, drain_seconds(self.config))

    def open_leased(self, profile: int) -> BackendConnection:
        """A new connection outside the slots, opened with ``profile``'s handshake (for ``leases``)."""
        connection = BackendConnection(self, profile, -1)
        self._connect(connection)
        return connection

    @property
    def stopped(self) -> bool:
        """The server left the pool (or the proxy is stopping): nothing new is opened."""
        return self._stopped

    # -- sending --------------------------------------------------------------

    def send(self, request: Request) -> None:
        profile = request.profile
        slots = self._slots.get(profile)
        if slots is None:
            if profile & LEASED:
                # A blocking command: no shared slot ever has this profile, so the
                # check costs the other requests nothing.
                self.leases.lend(request)
                return
            # The first request of a profile opens all its slots at once, as nutcracker does.
            self.preconnect(profile)
            slots = self._slots[profile]
        if self._size == 1:  # server_connections: 1, nutcracker's default
            index = 0
        else:
            # One client's requests to this server share one connection, so a write
            # and the read after it can never overtake each other on two sockets.
            client = request.client
            index = client.client_id % self._size if client is not None else 0
        connection = slots[index]
        if connection is None:
            connection = self._open(profile, index)
        connection.send(request)

    def preconnect(self, profile: int) -> None:
        """Fill every slot of ``profile`` now (``preconnect: true``, or its first request)."""
        slots = self._slots.setdefault(profile, [None] * self._size)
        if self.target is None:
            return
        for index, connection in enumerate(slots):
            if connection is None:
                self._open(profile, index)

    def _open(self, profile: int, index: int) -> BackendConnection:
        connection = BackendConnection(self, profile, index, gated=bool(self._barrier))
        if self._stopped:
            connection.abort("server connection closed: the server left the pool or the proxy is stopping",
                             count_failure=False)
            return connection
        self._slots[profile][index] = connection
        if self._barrier:
            self._gated[connection] = set(self._barrier)
        self._connect(connection)
        return connection

    def _connect(self, connection: BackendConnection) -> None:
        factory = ConnectorFactory(connection)
        target = self.target
        timeout = self.timeout if self.timeout is not None else 30
        if target.path is not None:
            self.reactor.connectUNIX(target.path, factory, timeout=timeout)
        else:
            self.reactor.connectTCP(target.host, target.port, factory, timeout=timeout)

    # -- connection events ----------------------------------------------------

    def connection_gone(self, connection: BackendConnection) -> None:
        """Stop routing to ``connection``: it failed, closed or finished draining."""
        slots = self._slots.get(connection.profile)
        if slots is not None and connection.slot < len(slots) and slots[connection.slot] is connection:
            slots[connection.slot] = None
        self._gated.pop(connection, None)
        if connection.slot < 0:
            self.leases.forget(connection)
        if connection in self._draining:
            self._draining.discard(connection)
            self._barrier.discard(connection)
            for waiting, before in list(self._gated.items()):
                before.discard(connection)
                if not before:
                    del self._gated[waiting]
                    waiting.open_gate()
            if not self._draining:
                waiters, self._drained_waiters = self._drained_waiters, []
                for waiter in waiters:
                    waiter.callback(None)

    def connection_lost(self, connection: BackendConnection) -> None:
        """``connection``'s socket is gone (or was never made)."""
        self.connection_gone(connection)
        waiter = self._lost_waiters.pop(connection, None)
        if waiter is not None:
            waiter.callback(None)
        elif self.on_lost is not None and not connection.closed_by_proxy:
            self.on_lost(connection)

    def connected(self) -> None:
        """A connection to the server was made: it is up, and a past failure is over."""
        self.server.up = True
        if self._last_failure is not None:
            self._log.info("pool {pool}: server {server}: connected again after: {reason}",
                           pool=self.pool.name, server=self.server.name, reason=self._last_failure)
            self._last_failure = None

    def record_failure(self, text: str) -> None:
        if text != self._last_failure:
            self._log.info("pool {pool}: server {server}: {reason}",
                           pool=self.pool.name, server=self.server.name, reason=text)
            self._last_failure = text
        self.pool.record_failure(self.server, text)

    def log_handshake_failure(self, text: str) -> None:
        self._log.error("pool {pool}: server {server} refused the connection handshake: {reason}",
                        pool=self.pool.name, server=self.server.name, reason=text)

    # -- runtime changes ------------------------------------------------------

    def _retire(self, barrier: bool) -> None:
        """Take every open connection, of every profile, out of its slot and let it drain.

        With ``barrier``, connections opened from now on hold their writes
        until the retired ones are done: same server, so a request sent on
        a new socket could otherwise overtake an earlier one of the same
        client still on an old socket.
        """
        seconds = drain_seconds(self.config)
        for profile, slots in self._slots.items():
            for connection in slots:
                if connection is None:
                    continue
                self._draining.add(connection)
                if barrier:
                    # A connection still gated joins too: the ones after it wait for
                    # it, and it for those before it, so the order holds over
                    # reloads in quick succession.
                    self._barrier.add(connection)
            self._slots[profile] = [None] * self._size
        # Leased ones too: what their sessions sent is answered before a hold's ack (a
        # blocking command ends at the drain deadline), and a WATCH's later requests are
        # refused (see pinning.Pin), never sent to a stale target.  No barrier behind them:
        # a lease's session sends nothing elsewhere to that server before its lease is done
        # with (a blocked client waits for its reply, a pin stands until nothing is pending),
        # and a blocked command must not hold every other client's new connections back.
        self.leases.close_idle()
        for connection in self.leases.in_use():
            self._draining.add(connection)
        for connection in list(self._draining):
            connection.drain(seconds)

    def retarget(self, target: Any = None) -> None:
        """The server has a new address (``target``, else ``server.spec``): new requests go there.

        Requests already sent to the old address get their replies from it;
        no barrier, since the new address is another process.
        """
        self.target = target if target is not None else self.server.spec
        self._retire(barrier=False)
        self._moved()

    def cut_over(self, target: Any, text: str) -> int:
        """Drop every connection now, failing what is in flight with ``text``; then go to ``target``.

        Returns how many requests it failed.

        For a master switch: a frozen old master would still answer
        ``+OK`` to what it holds once it wakes, and those writes are lost,
        so its requests are failed rather than drained.
        """
        self.target = target
        connections = [c for slots in self._slots.values() for c in slots if c is not None]
        connections += [c for c in (*self._draining, *self.leases.connections()) if c not in connections]
        for profile in self._slots:
            self._slots[profile] = [None] * self._size
        failed = 0
        for connection in connections:
            failed += connection.pending
            connection.closed_by_proxy = True
            connection.abort(text, count_failure=False)
        self._moved()
        return failed

    def _moved(self) -> None:
        for listener in list(self.moved_listeners):
            try:
                listener(self)
            except Exception:  # noqa: BLE001 - a listener's bug must not stop a switch
                self._log.failure("pool {pool}: server {server}: a move listener failed",
                                  pool=self.pool.name, server=self.server.name)

    def reconfigure(self, codec: Codec, config: PoolConfig, handshake_changed: bool) -> None:
        """New settings: connections opened from now on use them.

        A changed handshake (``redis_auth``, ``redis_auth_user``, ``redis_db``) or slot count
        makes the open connections wrong for new requests: they are retired
        and replaced, behind a barrier, for every profile (each database's
        and dialect's set).
        """
        resized = config.server_connections != self._size
        self._configure(codec, config)
        if handshake_changed or resized:
            self._retire(barrier=True)

    def settle(self) -> defer.Deferred:
        """Fires once every request sent so far is answered (a slot hold's ack).

        The open connections drain, and new ones wait behind a barrier for
        them, so nothing sent before this call is still unanswered when the
        Deferred fires and no client's requests are reordered.
        """
        self._retire(barrier=True)
        if not self._draining:
            return defer.succeed(None)
        waiter = defer.Deferred()
        self._drained_waiters.append(waiter)
        return waiter

    def drain(self) -> defer.Deferred:
        """The server left the pool: finish what was sent, open nothing; fires when every connection is gone."""
        self._stopped = True
        self._retire(barrier=False)
        if not self._draining:
            return defer.succeed(None)
        waiter = defer.Deferred()
        self._drained_waiters.append(waiter)
        return waiter

    def stop(self) -> defer.Deferred:
        """Close every connection now; the Deferred fires once all are gone."""
        self._stopped = True
        waiting = []
        connections = [c for slots in self._slots.values() for c in slots if c is not None]
        connections += [c for c in (*self._draining, *self.leases.connections()) if c not in connections]
        for connection in connections:
            if connection.transport is not None:
                waiter = defer.Deferred()
                self._lost_waiters[connection] = waiter
                waiting.append(waiter)
            connection.close()
        self._slots.clear()
        return defer.gatherResults(waiting) if waiting else defer.succeed(None)

    # -- views ----------------------------------------------------------------

    def _connections(self) -> List[BackendConnection]:
        open_now = [c for slots in self._slots.values() for c in slots if c is not None]
        return open_now + [c for c in (*self._draining, *self.leases.connections()) if c not in open_now]

    def queue_stats(self) -> tuple:
        """(in_queue, in_queue_bytes, out_queue, out_queue_bytes) over every connection."""
        in_queue = in_bytes = out_queue = out_bytes = 0
        for connection in self._connections():
            held, awaiting_count, awaiting_bytes = connection.queue_stats()
            in_queue += len(held)
            in_bytes += sum(len(raw) for raw in held)
            out_queue += awaiting_count
            out_bytes += awaiting_bytes
        return in_queue, in_bytes, max(0, out_queue - in_queue), max(0, out_bytes - in_bytes)

    @property
    def connection_count(self) -> int:
        return len(self._connections())

    @property
    def draining_count(self) -> int:
        return len(self._draining)
