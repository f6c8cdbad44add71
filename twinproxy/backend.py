"""Connections to one backend server, and the requests in flight on them.

Owns: :class:`BackendConnection` (one socket: writes requests, frames
replies with the codec, keeps the FIFO of requests awaiting a reply, one
timer for the oldest request's deadline, fails everything pending when the
connection is lost) and :class:`ServerLink` (up to ``server_connections``
connections per protocol dialect, opened on demand or at start, reconnected
on demand).  Both report failures and successes to the pool; neither
routes, splits, merges, nor knows a client's order.

::

    link.send(request) --> BackendConnection.send
                              |  write request.raw (or hold it until connected)
                              v
            awaiting: [oldest, ..., newest]   <-- one DelayedCall: oldest.sent_at + timeout
                              |
    dataReceived --> framer.next() --> awaiting.popleft().reply = bytes
                              --> request.owner.request_done(request)

Replies on one connection come back in the order the requests were written,
so the head of ``awaiting`` is always the oldest unanswered request and one
timer per connection gives nutcracker's "timeout from send".  A request that
times out fails with everything else pending on its connection, which is
closed: its late reply could no longer be matched to anything.
"""

from __future__ import annotations

import errno
import os
from collections import deque
from typing import Any, Dict, List, Optional

from twisted.internet import defer, error
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from twinproxy.config import PoolConfig
from twinproxy.protocols import Codec, ProtocolError
from twinproxy.request import Request
from twinproxy.sockets import direct_socket, write_now

TIMED_OUT = os.strerror(errno.ETIMEDOUT)
# How a connection ended, for the server's counters.
EOF_ = "eof"
ERR = "err"
TIMEDOUT = "timedout"
REFUSED = os.strerror(errno.ECONNREFUSED)
RESET = os.strerror(errno.ECONNRESET)


def describe_failure(reason: Failure) -> str:
    """A short OS-style text for why a connection failed or was lost."""
    value = reason.value
    if isinstance(value, error.ConnectionRefusedError):
        return REFUSED
    if isinstance(value, error.TimeoutError):
        return TIMED_OUT
    if isinstance(value, (error.ConnectionDone, error.ConnectionLost)):
        return RESET
    os_error = getattr(value, "osError", None)
    if isinstance(os_error, int):
        return os.strerror(os_error)
    return reason.getErrorMessage().strip().rstrip(".") or "connection failed"


class _Handshake:
    """Owner of the requests that open a connection: an error reply aborts it."""

    __slots__ = ("connection",)

    def __init__(self, connection: "BackendConnection") -> None:
        self.connection = connection

    def request_done(self, request: Request) -> None:
        connection = self.connection
        if connection.codec.is_error(request.reply) and not connection.closed:
            text = request.reply.strip().decode("latin-1")[1:]
            connection.link.log_handshake_failure(text)
            connection.abort(f"backend handshake failed: {text}", count_failure=True, kind=ERR)


class BackendConnection(Protocol):
    """One connection to a server; requests may be sent before it is connected."""

    def __init__(self, link: "ServerLink", dialect: int) -> None:
        self.link = link
        self.dialect = dialect
        self.codec: Codec = link.codec
        self._clock = link.clock
        self._timeout = link.timeout
        self._framer = self.codec.reply_framer()
        self._awaiting: deque = deque()
        self._held: List[bytes] = []
        self._outbox = link.outbox
        self._queued: List[bytes] = []   # written at the end of the burst (see frontend.Outbox)
        self._in_outbox = False
        self._timer: Any = None
        self._socket: Any = None
        self._counters = link.server.counters
        self._latency = link.server.counters.latency
        self.connected_at: Optional[float] = None
        self.closed = False
        self._closing_reason: Optional[str] = None
        handshake_owner = _Handshake(self)
        for raw in self.codec.handshake(dialect):
            request = Request(raw)
            request.owner = handshake_owner
            self.send(request)

    @property
    def pending(self) -> int:
        return len(self._awaiting)

    def queue_stats(self) -> tuple:
        """(raw requests not yet written, requests awaiting a reply, their bytes)."""
        awaiting = self._awaiting
        return list(self._held), len(awaiting), sum(len(r.raw) for r in awaiting)

    # -- sending --------------------------------------------------------------

    def send(self, request: Request) -> None:
        if self.closed:
            if not isinstance(request.owner, _Handshake):
                self.link.pool.counters.forward_error += 1
            request.reply = self.codec.error_reply(self._closing_reason or RESET)
            request.owner.request_done(request)
            return
        transport = self.transport
        raw = request.raw
        counters = self._counters
        counters.requests += 1
        counters.request_bytes += len(raw)
        if transport is None:
            self._held.append(raw)
        elif self._outbox is None:
            transport.write(raw)
        else:
            self._queued.append(raw)
            if not self._in_outbox:
                self._in_outbox = True
                self._outbox.add_server(self)
        if request.expects_reply:
            request.sent_at = self._clock.seconds()
            self._awaiting.append(request)
            if self._timer is None and self._timeout is not None:
                self._timer = self._clock.callLater(self._timeout, self._deadline)

    def send_queued(self) -> None:
        """Write the requests queued during this burst, in one go."""
        self._in_outbox = False
        queued = self._queued
        if queued:
            self._queued = []
            if not self.closed and self.transport is not None:
                write_now(self._socket, self.transport, queued[0] if len(queued) == 1 else b"".join(queued))

    # -- Twisted protocol -----------------------------------------------------

    def connectionMade(self) -> None:
        transport = self.transport
        if hasattr(transport, "setTcpNoDelay"):
            transport.setTcpNoDelay(True)
            if self.link.config.tcpkeepalive:
                transport.setTcpKeepAlive(True)
        self._socket = direct_socket(transport)
        self.connected_at = self._clock.seconds()
        self._counters.connections_made += 1
        self.link.connected()
        if self.closed:
            transport.abortConnection()
            return
        held, self._held = self._held, []
        if held:
            transport.writeSequence(held)

    def dataReceived(self, data: bytes) -> None:
        try:
            self._replies(data)
        finally:
            outbox = self.link.outbox
            if outbox is not None:
                outbox.burst_done()

    def _replies(self, data: bytes) -> None:
        framer = self._framer
        framer.feed(data)
        awaiting = self._awaiting
        server = self.link.server
        counters = self._counters
        observe = self._latency.observe
        now = self._clock.seconds()
        while True:
            try:
                reply = framer.next()
            except ProtocolError as err:
                self.abort(f"bad reply from server: {err}", count_failure=True, kind=ERR)
                return
            if reply is None:
                break
            if not awaiting:
                self.abort("reply from server with no request pending", count_failure=True, kind=ERR)
                return
            counters.responses += 1
            counters.response_bytes += len(reply)
            request = awaiting[0]
            terminator = request.terminator
            if terminator is not None:
                # A reply of several parts, ended by a marker reply the codec chose
                # (memcached quiet mode: the reply, if any, then MN).
                if reply != terminator:
                    request.gathered.append(reply)
                    continue
                reply = b"".join(request.gathered)
            awaiting.popleft()
            observe(now - request.sent_at)
            request.reply = reply
            request.owner.request_done(request)
            if self.closed:
                return
        if server.failure_count:
            self.link.pool.record_success(server)

    def connectionLost(self, reason: Failure = None) -> None:
        if not self.closed:
            text = describe_failure(reason) if reason is not None else RESET
            clean = reason is not None and reason.check(error.ConnectionDone) is not None
            self._count_end(EOF_ if clean else ERR)
            self._fail_pending(text, count_failure=bool(self._awaiting))
        self.transport = None
        self.link.connection_lost(self)

    def connect_failed(self, reason: Failure) -> None:
        """Called by the connector when the connection could not be made."""
        if not self.closed:
            self._count_end(ERR)
            self._fail_pending(describe_failure(reason), count_failure=True)
        self.link.connection_lost(self)

    # -- failure --------------------------------------------------------------

    def _deadline(self) -> None:
        self._timer = None
        awaiting = self._awaiting
        if not awaiting or self.closed:
            return
        now = self._clock.seconds()
        due = awaiting[0].sent_at + self._timeout
        if now + 1e-6 >= due:
            self.abort(TIMED_OUT, count_failure=True, kind=TIMEDOUT)
        else:
            self._timer = self._clock.callLater(due - now, self._deadline)

    def abort(self, text: str, count_failure: bool, kind: Optional[str] = None) -> None:
        """Fail every pending request with ``text`` and drop the connection."""
        if self.closed:
            return
        if kind is not None:
            self._count_end(kind)
        self._fail_pending(text, count_failure)
        if self.transport is not None:
            self.transport.abortConnection()

    def close(self) -> None:
        """Close without counting a failure (shutdown, topology change)."""
        self.abort("server connection closed by the proxy", count_failure=False)

    def _count_end(self, kind: str) -> None:
        counters = self._counters
        if kind == EOF_:
            counters.server_eof += 1
        elif kind == TIMEDOUT:
            counters.server_timedout += 1
        else:
            counters.server_err += 1
        self.link.server.up = False

    def _fail_pending(self, text: str, count_failure: bool) -> None:
        self.closed = True
        self._closing_reason = text
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        self.link.connection_gone(self)
        awaiting, self._awaiting = self._awaiting, deque()
        self._held = []
        self._queued = []
        if count_failure:
            self.link.record_failure(text)
        reply = self.codec.error_reply(text)
        failed = 0
        for request in awaiting:
            request.reply = reply
            owner = request.owner
            if not isinstance(owner, _Handshake):
                failed += 1
            owner.request_done(request)
        self.link.pool.counters.forward_error += failed
        outbox = self.link.outbox
        if outbox is not None:
            outbox.burst_done()


class _ConnectorFactory(ClientFactory):
    """Hands one pre-built BackendConnection to one connection attempt."""

    noisy = False

    def __init__(self, connection: BackendConnection) -> None:
        self.connection = connection

    def buildProtocol(self, addr: Any) -> BackendConnection:
        return self.connection

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.connection.connect_failed(reason)


class ServerLink:
    """All of the proxy's connections to one server, per dialect.

    ``send`` is the server's ``send``: it opens ``server_connections``
    connections of the request's dialect when it needs the first, and gives
    each client one of them.
    """

    _log = Logger()

    def __init__(self, server: Any, pool: Any, codec: Codec, config: PoolConfig, reactor: Any) -> None:
        self.server = server
        self.pool = pool
        self.codec = codec
        self.config = config
        self.reactor = reactor
        self.clock = reactor
        self.timeout = config.timeout_seconds
        self._limit = config.server_connections
        self._connections: Dict[int, List[BackendConnection]] = {}
        self._stopped = False
        self._lost_waiters: Dict[BackendConnection, defer.Deferred] = {}
        self._last_failure: Optional[str] = None
        # Set by the service: the frontends' outbox, flushed after each burst of replies.
        self.outbox: Any = None
        server.send = self.send

    def send(self, request: Request) -> None:
        connections = self._connections.get(request.dialect)
        if connections is None or len(connections) < self._limit:
            connections = self._fill(request.dialect)
        if len(connections) == 1:  # server_connections: 1, nutcracker's default
            connections[0].send(request)
            return
        # One client's requests to this server share one connection, so a write
        # and the read after it can never overtake each other on two sockets.
        client_id = getattr(request.owner, "client_id", 0)
        connections[client_id % len(connections)].send(request)

    def _fill(self, dialect: int) -> List[BackendConnection]:
        connections = self._connections.setdefault(dialect, [])
        while len(connections) < self._limit:
            connections.append(self._connect(dialect))
        return connections

    def preconnect(self, dialect: int) -> None:
        self._fill(dialect)

    def _connect(self, dialect: int) -> BackendConnection:
        connection = BackendConnection(self, dialect)
        if self._stopped:
            connection.abort("proxy is shutting down", count_failure=False)
            return connection
        factory = _ConnectorFactory(connection)
        spec = self.server.spec
        timeout = self.timeout if self.timeout is not None else 30
        if spec.path is not None:
            self.reactor.connectUNIX(spec.path, factory, timeout=timeout)
        else:
            self.reactor.connectTCP(spec.host, spec.port, factory, timeout=timeout)
        return connection

    def connection_gone(self, connection: BackendConnection) -> None:
        """Stop routing to ``connection``: it failed or is closing."""
        connections = self._connections.get(connection.dialect)
        if connections and connection in connections:
            connections.remove(connection)

    def connection_lost(self, connection: BackendConnection) -> None:
        """``connection``'s socket is gone (or was never made)."""
        self.connection_gone(connection)
        waiter = self._lost_waiters.pop(connection, None)
        if waiter is not None:
            waiter.callback(None)

    def connected(self) -> None:
        """A connection to the server was made: it is up, and a past failure is over."""
        self.server.up = True
        if self._last_failure is not None:
            self._log.info("pool {pool}: server {server}: connected again after: {reason}",
                           pool=self.pool.name, server=self.server.name, reason=self._last_failure)
            self._last_failure = None

    def queue_stats(self) -> tuple:
        """(in_queue, in_queue_bytes, out_queue, out_queue_bytes) over every connection."""
        in_queue = in_bytes = out_queue = out_bytes = 0
        for connections in self._connections.values():
            for connection in connections:
                held, awaiting_count, awaiting_bytes = connection.queue_stats()
                in_queue += len(held)
                in_bytes += sum(len(raw) for raw in held)
                out_queue += awaiting_count
                out_bytes += awaiting_bytes
        return in_queue, in_bytes, max(0, out_queue - in_queue), max(0, out_bytes - in_bytes)

    def record_failure(self, text: str) -> None:
        if text != self._last_failure:
            self._log.info("pool {pool}: server {server}: {reason}",
                           pool=self.pool.name, server=self.server.name, reason=text)
            self._last_failure = text
        self.pool.record_failure(self.server, text)

    def log_handshake_failure(self, text: str) -> None:
        self._log.error("pool {pool}: server {server} refused the connection handshake: {reason}",
                        pool=self.pool.name, server=self.server.name, reason=text)

    def stop(self) -> defer.Deferred:
        """Close every connection; the Deferred fires once all are gone."""
        self._stopped = True
        waiting = []
        for connections in list(self._connections.values()):
            for connection in list(connections):
                if connection.transport is not None:
                    waiter = defer.Deferred()
                    self._lost_waiters[connection] = waiter
                    waiting.append(waiter)
                connection.close()
        self._connections.clear()
        return defer.gatherResults(waiting) if waiting else defer.succeed(None)

    @property
    def connection_count(self) -> int:
        return sum(len(c) for c in self._connections.values())

