"""One connection to a backend server, and the requests in flight on it.

Owns: :class:`BackendConnection` (one socket: writes requests, frames
replies with the codec, keeps the FIFO of requests awaiting a reply, one
timer for the oldest request's deadline, fails everything pending when the
connection is lost, drains when retired) and the guard around every
completion.  :class:`~twinproxy.links.ServerLink` owns the connections of
one server.  It reports failures and successes to the pool; it neither
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
from bisect import bisect_left
from collections import deque
from typing import Any, List, Optional

from twisted.internet import error
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from twinproxy.protocols import Codec, ProtocolError
from twinproxy.request import Request
from twinproxy.sockets import direct_socket, write_now
from twinproxy.stats import LATENCY_BUCKETS

TIMED_OUT = os.strerror(errno.ETIMEDOUT)
# What ``link.intercept(request, how)`` is told about a failed request.
ERROR_REPLY = 0   # the server answered an error (in ``request.reply``)
LOST = 1          # the connection failed with the request written: its outcome is unknown
NEVER_SENT = 2    # the connection failed before it was made: the request was never written
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
    """One connection to a server; requests may be sent before it is connected.

    Writes wait in ``_held`` until the socket is connected and the ``gate``
    is open: a connection that replaces others on the same server (new
    handshake, new slot count) opens its gate once they have drained, so a
    client's request can never overtake its earlier one on another socket.
    """

    _log = Logger()

    def __init__(self, link: Any, profile: int, slot: int = 0, gated: bool = False) -> None:
        self.link = link
        self.profile = profile   # the connection profile it is opened for (dialect and database)
        self.slot = slot
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
        self._latency = link.server.counters.latency   # Histogram.observe in-line in _replies
        self._gated = gated
        self._ready = False    # connected and the gate open: writes go to the socket
        self.connected_at: Optional[float] = None
        self.closed = False
        self.closed_by_proxy = False   # closed on purpose (drain, retire, stop, cut-over), not lost
        self.draining = False
        self._drain_seconds: Optional[float] = None   # a gated connection's drain deadline, once open
        self._drain_call: Any = None
        self._closing_reason: Optional[str] = None
        handshake_owner = _Handshake(self)
        for raw in self.codec.handshake(profile):
            request = Request(raw)
            request.owner = handshake_owner
            self.send(request)

    @property
    def pending(self) -> int:
        return len(self._awaiting)

    def time_replies_in(self, histogram: Any = None) -> None:
        """Time the replies from now on in ``histogram`` rather than the server's (None: the server's again).

        A blocking command's reply comes when a key is ready, not when the
        server is done working: counted in the server's latency it would
        make a healthy server look slow.
        """
        self._latency = histogram if histogram is not None else self.link.server.counters.latency

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
            _complete(request, self)
            return
        raw = request.raw
        counters = self._counters
        counters.requests += 1
        counters.request_bytes += len(raw)
        if not self._ready:
            self._held.append(raw)
        elif self._outbox is None:
            self.transport.write(raw)
        else:
            self._queued.append(raw)
            if not self._in_outbox:
                self._in_outbox = True
                self._outbox.add_server(self)
        if request.expects_reply:
            request.sent_at = self._clock.seconds()
            self._awaiting.append(request)
            # Behind a gate nothing is sent yet: the timeout runs from the write (open_gate).
            if self._timer is None and self._timeout is not None and not self._gated:
                self._timer = self._clock.callLater(self._timeout, self._deadline)

    def send_queued(self) -> None:
        """Write the requests queued during this burst, in one go."""
        self._in_outbox = False
        queued = self._queued
        if queued:
            self._queued = []
            if not self.closed and self.transport is not None:
                write_now(self._socket, self.transport, queued[0] if len(queued) == 1 else b"".join(queued))

    def open_gate(self) -> None:
        """The connections this one replaces have drained: its writes may go out.

        What waited behind the gate was not sent: its timeout starts now.
        """
        self._gated = False
        if self.closed:
            return
        seconds = self._drain_seconds
        if seconds is not None and self._drain_call is None:
            self._drain_call = self._clock.callLater(seconds, self._drain_overdue)
        awaiting = self._awaiting
        if awaiting and self._timeout is not None:
            now = self._clock.seconds()
            for request in awaiting:
                request.sent_at = now
            if self._timer is None:
                self._timer = self._clock.callLater(self._timeout, self._deadline)
        self._write_held()

    def _write_held(self) -> None:
        if self._gated or self.closed or self.transport is None:
            return
        self._ready = True
        held, self._held = self._held, []
        if held:
            self.transport.writeSequence(held)

    # -- retiring -------------------------------------------------------------

    def drain(self, seconds: float) -> None:
        """Take no new requests; close once every request already sent is answered.

        What is still unanswered after ``seconds`` fails as on a timeout (the
        link no longer routes to this connection, so it only finishes).
        """
        if self.closed or self.draining:
            return
        self.draining = True
        if not self._awaiting:
            self._close_drained()
            return
        if not self._gated:   # a gated one's deadline starts when its gate opens
            self._drain_call = self._clock.callLater(seconds, self._drain_overdue)
        else:
            self._drain_seconds = seconds

    def _drain_overdue(self) -> None:
        self._drain_call = None
        self.closed_by_proxy = True
        self.abort("server connection retired by the proxy: no reply before the drain deadline",
                   count_failure=False)

    def _close_drained(self) -> None:
        self.closed_by_proxy = True
        self._fail_pending("server connection closed by the proxy", count_failure=False)
        if self.transport is not None:
            self.transport.loseConnection()

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
        self._write_held()

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
        latency = self._latency
        latency_counts = latency.counts
        intercept = self.link.intercept
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
                if terminator.__class__ is int:
                    # A fixed count of replies, the last one the answer (MULTI ... EXEC).
                    gathered = request.gathered
                    gathered.append(reply)
                    if len(gathered) < terminator:
                        continue
                else:
                    # A reply of several parts, ended by a marker reply the codec chose
                    # (memcached quiet mode: the reply, if any, then MN).
                    if reply != terminator:
                        request.gathered.append(reply)
                        continue
                    reply = b"".join(request.gathered)
            awaiting.popleft()
            # The server's latency and the command's (the same span), one bucket lookup for both.
            elapsed = now - request.sent_at
            bucket = bisect_left(LATENCY_BUCKETS, elapsed)
            latency_counts[bucket] += 1
            latency.total += elapsed
            counted = request.counted
            if counted is None and request.parent is not None and request.parent.pending == 1:
                # The last fragment of a split request: the command's one observation, from this
                # fragment's send (they all leave together) to the last reply.  Fragments carry no
                # ``counted``, so a split command is timed once, not once per server.
                counted = request.parent.counted
            if counted is not None:
                command_latency = counted.latency
                command_latency.counts[bucket] += 1
                command_latency.total += elapsed
            request.reply = reply
            if (intercept is None or reply[:1] != b"-" or request.owner.__class__ is _Handshake
                    or not intercept(request, ERROR_REPLY)):
                try:
                    request.owner.request_done(request)
                except Exception:  # noqa: BLE001 - one request's bug must not drop a shared connection
                    _completion_failed(request, self)
            if self.closed:
                return
        if server.failure_count:
            self.link.pool.record_success(server)
        if self.draining and not awaiting:
            self._close_drained()

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
        head = awaiting[0]
        # A blocking command may be held by the server for its own timeout (blocks_for;
        # inf for none) before the pool's timeout starts to count.
        due = head.sent_at + self._timeout + getattr(head, "blocks_for", 0.0)
        if now + 1e-6 >= due:
            self.abort(TIMED_OUT, count_failure=True, kind=TIMEDOUT)
        else:
            # Never armed further than one timeout ahead: a request sent after a long
            # blocking command (a lease reused) may be due before it, and is still seen in time.
            self._timer = self._clock.callLater(min(due - now, self._timeout), self._deadline)

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
        self.closed_by_proxy = True
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
        self._ready = False
        self._closing_reason = text
        for name in ("_timer", "_drain_call"):
            call = getattr(self, name)
            if call is not None:
                if call.active():
                    call.cancel()
                setattr(self, name, None)
        self.link.connection_gone(self)
        awaiting, self._awaiting = self._awaiting, deque()
        self._held = []
        self._queued = []
        if count_failure:
            self.link.record_failure(text)
        reply = self.codec.error_reply(text)
        failed = 0
        intercept = self.link.intercept
        how = LOST if self.connected_at is not None else NEVER_SENT
        for request in awaiting:
            request.reply = reply
            if not isinstance(request.owner, _Handshake):
                if intercept is not None and intercept(request, how):
                    continue
                failed += 1
            _complete(request, self)
        self.link.pool.counters.forward_error += failed
        outbox = self.link.outbox
        if outbox is not None:
            outbox.burst_done()


def _complete(request: Request, connection: BackendConnection) -> None:
    """Hand ``request`` its reply; a completion that raises is logged and answered, never propagated."""
    try:
        request.owner.request_done(request)
    except Exception:  # noqa: BLE001 - see _completion_failed
        _completion_failed(request, connection)


def _completion_failed(request: Request, connection: BackendConnection) -> None:
    """The owner raised while taking its reply (a merge bug, a routing error).

    The exception stops here: raised into ``dataReceived`` it would make
    Twisted drop the connection, and with it every other client's request
    on it.  The owner answers that one request with an error if it can.
    """
    link = connection.link
    BackendConnection._log.failure("pool {pool}: server {server}: completing a request failed",
                                   pool=link.pool.name, server=link.server.name)
    recover = getattr(request.owner, "completion_failed", None)
    if recover is None:
        return
    try:
        recover(request)
    except Exception:  # noqa: BLE001 - nothing more can be done for that request
        BackendConnection._log.failure("pool {pool}: answering a failed completion failed too",
                                       pool=link.pool.name)


class ConnectorFactory(ClientFactory):
    """Hands one pre-built BackendConnection to one connection attempt."""

    noisy = False

    def __init__(self, connection: BackendConnection) -> None:
        self.connection = connection

    def buildProtocol(self, addr: Any) -> BackendConnection:
        return self.connection

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.connection.connect_failed(reason)
