"""Client connections: parse, dispatch, and answer in the client's order.

Owns: :class:`FrontendProtocol`, one per client, protocol-neutral (the
pool's codec parses and classifies); :class:`~twinproxy.factory.ProxyFactory`
builds them, enforces ``client_connections`` and assigns client ids.  The
:class:`~twinproxy.outbox.Outbox` turns a burst of replies into one write
per client.
Knows neither wire syntax nor hashing: routing is ``pool.server_for_key``
and a server is something with ``send(request)``.

::

    dataReceived --> parser.next() --> session.prepare(request, session)  (the codec's, per mode)
         LOCAL    : reply already set by the codec
         FORWARD  : pool.server_for_key(key).send(request)
         FRAGMENT : codec.fragment(request, pool) -> [(server, fragment)], each sent
         SESSION  : the client's subscriptions (twinproxy.subscriber) answer it
         BLOCK    : routed as FRAGMENT; dispatch halts until its reply (twinproxy.blocking)

    in order: [oldest, ..., newest]   (one entry per request the client wants answered)
    request_done(request) --> while in order[0].reply is set: queue it, pop it
    outbox.flush() (once per reactor turn) --> one write per client, one per server connection

Every request that expects a reply gets exactly one, and the client sees
them in the order it sent the requests, whichever servers answered first.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Optional

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from twinproxy.blocking import BlockedCall, BlockingClient
from twinproxy.outbox import Outbox
from twinproxy.output import ClientOutput, peer_text
from twinproxy.pinning import Pin, PinningClient
from twinproxy.protocols import Codec, ProtocolError
from twinproxy.replybudget import ReplyBudget
from twinproxy.request import BLOCK, FORWARD, FRAGMENT, SESSION, Request
from twinproxy.session import ClientSession
from twinproxy.sockets import direct_socket
from twinproxy.stats import CommandCounters

if TYPE_CHECKING:
    from twinproxy.factory import ProxyFactory

# After a protocol error the proxy goes on reading, and drops, what the
# client is still sending, for this long and up to this many bytes: closing
# a socket with unread input sends a reset, which destroys the error reply
# before a client that is still writing gets to read it.
LINGER_SECONDS = 2.0
LINGER_BYTES = 64 * 1024 * 1024
# A limit set to 0 in the pool file: never reached.
NO_LIMIT = 1 << 62


@implementer(IPushProducer)
class FrontendProtocol(ClientSession, PinningClient, BlockingClient, Protocol):
    """One client connection; also the codec's session for that client (:class:`ClientSession`).

    Backpressure: the client is not read while ``client_max_pending``
    requests or ``client_max_pending_bytes`` bytes of them await replies,
    while what it pins (replies it has not read, plus its requests in flight
    at the estimated reply size) reaches ``client_output_soft_limit``, while
    the process-wide :class:`ReplyBudget` is spent, or while the pool is
    stopping.  Reading resumes at half those limits, so a client at the limit
    costs no pause per request.  A read is dispatched only as far as the
    limits allow; the rest waits in the parser.  A client whose unread
    replies pass ``client_output_hard_limit`` is closed.
    """

    _log = Logger()

    def __init__(self, factory: "ProxyFactory", client_id: int) -> None:
        self.factory = factory
        self._pool = factory.pool
        self._codec: Codec = factory.codec
        self._start_session(factory, client_id, self._codec.default_dialect)
        self._parser = self._codec.request_parser()
        self._in_order: deque = deque()
        self._counters = factory.pool.counters
        self._commands = factory.pool.counters.commands
        # The codec's error replies begin with one of error_starts (each error_start_width bytes long):
        # only those go on to is_error.
        self._error_starts = getattr(self._codec, "error_starts", frozenset())
        self._error_start_width = getattr(self._codec, "error_start_width", 1)
        config = factory.pool.config
        self._max_pending = config.client_max_pending
        self._max_pending_bytes = config.client_max_pending_bytes
        self._pending_bytes = 0
        self._write_blocked = False
        self._reading_paused = False
        self._draining = False
        self._closing = False
        self._halted = False            # no dispatch: closing, or a blocking command awaits its reply
        self._blocked: Optional[BlockedCall] = None
        self._failed = False   # a protocol error, already counted as client_err
        self._socket: Any = None
        self._output: Any = None        # a ClientOutput once connected
        self._soft_limit = config.client_output_soft_limit or NO_LIMIT
        self._hard_limit = config.client_output_hard_limit or NO_LIMIT
        self._budget: Optional[ReplyBudget] = factory.reply_budget
        self._budget_waiting = False
        self._parse_held = False        # the parser holds requests a limit kept from dispatch
        self._allowed = 0               # requests that may go out before _allowance is asked again
        self._parsing = False
        self._outbox: Optional[Outbox] = factory.outbox
        self._out: list = []            # replies in order, not yet written
        self._in_outbox = False
        self._close_when_sent = False
        self._linger_call: Any = None
        self._linger_left = 0
        self.closed = False
        # The codec's prepare for this client's mode: the codec swaps it (MULTI queues).
        self.prepare = self._codec.prepare
        self.transaction: Any = None    # the codec's state between MULTI and EXEC
        # Where requests go: the pool, or while a WATCH pins a server, the pool with that server's pin.
        self._router: Any = factory.pool
        self.watch_pin: Optional[Pin] = None
        # What restricts the requests the codec accepts (pub/sub's SUBSCRIBED), or None.
        self.mode: Optional[str] = None
        # The client's pub/sub subscriptions (twinproxy.subscriber), made at its first SUBSCRIBE.
        self.pubsub: Any = None

    def connectionMade(self) -> None:
        transport = self.transport
        if hasattr(transport, "setTcpNoDelay"):
            transport.setTcpNoDelay(True)
        self._socket = direct_socket(transport)
        self._output = ClientOutput(transport, self._socket, self._budget)
        # Writing the socket itself, the client is its transport's *pull*
        # producer: resumeProducing then means "the socket is writable".
        transport.registerProducer(self, not self._output.direct)

    # -- producer: the transport's verdict on our replies ---------------------

    def pauseProducing(self) -> None:
        self._write_blocked = True
        self._allowed = 0
        self._update_reading()

    def resumeProducing(self) -> None:
        output = self._output
        if output is not None and output.direct:
            if output.waiting and not self.closed:
                output.pump()
                self._output_moved()
            return
        self._write_blocked = False
        if output is not None:
            output.transport_drained()
        self._update_reading()

    def stopProducing(self) -> None:
        pass

    def budget_released(self) -> None:
        """The process-wide reply budget has room again (see ``ReplyBudget.wait``)."""
        self._budget_waiting = False
        self._update_reading()

    def _update_reading(self) -> None:
        if self.closed or self.transport is None or self._linger_call is not None:
            return
        budget = self._budget
        blocked = self._blocked
        if blocked is not None:
            pause = self._blocked_pause(blocked)
            if pause is None:
                return                    # answered at once: unblocked settled reading
        elif self._draining or self._write_blocked:
            pause = True
        elif budget is not None and budget.over and (self._in_order or self._output.queued):
            # Past the process-wide limit only clients holding no replies are
            # read, one request at a time (see _allowance): readers go on,
            # however many clients do not read.
            pause = True
            if not self._budget_waiting:
                self._budget_waiting = True
                budget.wait(self)
        else:
            in_flight = len(self._in_order)
            pinned = self._output.pinned(in_flight)
            if self._reading_paused:
                pause = (in_flight > self._max_pending // 2 or self._pending_bytes > self._max_pending_bytes // 2
                         or pinned > self._soft_limit // 2)
            else:
                pause = (in_flight >= self._max_pending or self._pending_bytes >= self._max_pending_bytes
                         or pinned >= self._soft_limit)
            if not pause and self._parse_held:
                if not self._parsing:
                    self.dataReceived(b"")   # dispatches what it may, then settles reading itself
                return
        if pause != self._reading_paused:
            self._reading_paused = pause
            if pause:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    def drain(self) -> None:
        """Read no more; close once every request read so far is answered (pool stopping)."""
        if self._blocked is not None:
            self._drain_when_unblocked()
            return
        if self._parse_held and not self._closing:
            # Read but held back by a limit: answered too (the hard limit still holds).
            self._allowed = NO_LIMIT
            self.dataReceived(b"")
        self._draining = True
        self._update_reading()
        if not self._in_order:
            self._close_when_sent = True
            self._schedule_send()
            if self._outbox is not None:
                self._outbox.flush()

    def abort(self) -> None:
        """Drop the connection now, unanswered requests and all (shutdown deadline)."""
        self.closed = True
        self._in_order.clear()
        if self.transport is not None:
            self.transport.abortConnection()

    # -- requests -------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """Dispatch the requests read, as many as the limits allow; then settle reading.

        One read can hold thousands of requests: dispatched all at once,
        their replies would arrive past every limit.  What a limit holds back
        stays in the parser (``_parse_held``) and reading pauses, so that is
        one read at most; ``_update_reading`` dispatches it (calling this
        with no bytes) once there is room.
        """
        if self._closing or self._draining:
            if self._linger_call is not None:
                self._linger_left -= len(data)
                if self._linger_left < 0:
                    self._linger_over()
            return
        parser = self._parser
        parser.feed(data)
        dispatch = self._dispatch
        held = False
        budget = self._budget
        # What _allowance said last, less what went out since: replies only add room,
        # and send_queued zeroes it when unread replies (or bigger ones) take room away.
        allowed = 0 if budget is not None and budget.over else self._allowed
        self._parsing = True
        while not self._halted:
            if not allowed:
                allowed = self._allowance()
                if not allowed:
                    held = True
                    break
            try:
                request = parser.next()
            except ProtocolError as err:
                self._protocol_error(err)
                break
            if request is None:
                break
            dispatch(request)
            allowed -= 1
        else:
            held = not self._closing      # a blocking command halted it: the rest waits in the parser
        self._parsing = False
        self._allowed = allowed
        self._parse_held = held
        output = self._output
        in_flight = len(self._in_order)
        pinned = output.queued + in_flight * output.estimate
        if budget is not None:
            delta = pinned - output.charged
            if delta >= budget.quantum or -delta >= budget.quantum or (delta and not pinned) or budget.over:
                output.account(in_flight)
        if (held or self._reading_paused or pinned >= self._soft_limit or in_flight >= self._max_pending
                or self._pending_bytes >= self._max_pending_bytes):
            self._update_reading()
        if self._outbox is not None:
            self._outbox.burst_done()

    def _allowance(self) -> int:
        """How many more requests may be dispatched before a limit is reached (0: none now)."""
        if self._draining or self._write_blocked:
            return 0
        budget = self._budget
        in_flight = len(self._in_order)
        if budget is not None and budget.over:
            return 0 if in_flight or self._output.queued else 1
        room = self._max_pending - in_flight
        if room <= 0 or self._pending_bytes >= self._max_pending_bytes:
            return 0
        return min(room, self._output.room(in_flight, self._soft_limit))

    def connectionLost(self, reason: Any = None) -> None:
        if not self._failed:
            if reason is None or reason.check(ConnectionDone) is not None:
                self._counters.client_eof += 1
            else:
                self._counters.client_err += 1
        self.closed = True
        self._closing = self._halted = True
        self._in_order.clear()
        if self._blocked is not None:
            self._abandon_blocked()
        if self.watch_pin is not None:
            # Its WATCH (and whatever it still had in flight there) dies with the connection.
            pin, self.watch_pin = self.watch_pin, None
            self._router = self._pool
            pin.server.link.discard(pin.connection)
        if self._output is not None:
            self._output.discard()
        if self.pubsub is not None:
            self.pubsub.close()
        if self._linger_call is not None:
            if self._linger_call.active():
                self._linger_call.cancel()
            self._linger_call = None
        self.factory.client_gone(self)

    # -- dispatch -------------------------------------------------------------

    def _dispatch(self, request: Request) -> None:
        request.owner = self
        request.client = self
        request.profile = self.profile   # which connections: the session's dialect and database
        self.prepare(request, self)
        name = self.last_command = request.name
        counted = self._commands.get(name)
        if counted is None:   # once per command name and pool
            counted = self._commands[name] = CommandCounters()
        counted.calls += 1
        request.counted = counted   # the backend adds its latency, _flush its error reply
        if not request.quiet:
            self._in_order.append(request)
            self._pending_bytes += len(request.raw)
        kind = request.kind
        if kind == FORWARD:
            self._router.route(request.key).send(request)
        elif kind == FRAGMENT:
            self._send_fragments(request)
        elif kind == SESSION:
            self._session_request(request)
        elif kind == BLOCK:
            self._block(request)
        else:
            if request.close_after:
                self._closing = self._halted = True
            self._flush()

    def _send_fragments(self, request: Request) -> None:
        routes = self._codec.fragment(request, self._router)
        if not routes:
            self._flush()
            return
        if len(routes) == 1 and routes[0][1] is request:
            routes[0][0].send(request)
            return
        request.fragments = [fragment for _, fragment in routes]
        request.pending = len(routes)
        self._counters.fragments += len(routes)
        for server, fragment in routes:
            fragment.owner = self
            fragment.client = self
            fragment.parent = request
            fragment.profile = request.profile   # no ``counted``: the backend times the parent once
            server.send(fragment)

    def _session_request(self, request: Request) -> None:
        """SUBSCRIBE and its kin: the client's subscriptions answer (made at the first)."""
        if self.pubsub is None:   # only a Redis pool's codec gives SESSION, and it has a hub
            self.pubsub = self.factory.subscribers.session(self)
        self.pubsub.handle(request)

    def set_mode(self, mode: Optional[str]) -> None:
        """Pub/sub's SUBSCRIBED, or None: the codec then says how requests are prepared (RESP2's rules)."""
        self.mode = mode
        self._codec.mode_changed(self)

    def push(self, frame: bytes) -> None:
        """Write a message from a subscriber connection, as a whole frame, after every reply due before it."""
        if self.closed or self._closing:   # nothing after QUIT's +OK, as Redis
            return
        entry = _Pushed(frame)
        in_order = self._in_order
        in_order.append(entry)
        if in_order[0] is entry:
            self._flush()

    def close_when_answered(self) -> None:
        """Read no more; close once every request read so far is answered (a subscriber connection failed)."""
        if self.closed or self._closing:
            return
        entry = _Pushed(b"")
        entry.close_after = True
        self._closing = self._halted = True
        self._in_order.append(entry)
        self._flush()

    def request_done(self, request: Request) -> None:
        """A backend (or the proxy) answered ``request``; write what is now in order."""
        parent = request.parent
        if parent is not None:
            parent.pending -= 1
            if parent.pending:
                return
            try:
                parent.reply = self._codec.coalesce(parent)
            except Exception:  # noqa: BLE001 - answer this request, keep the client and the server
                self._log.failure("pool {pool}: merging the replies of a split request failed",
                                  pool=self._pool.name)
                parent.reply = self._codec.error_reply("proxy error: the replies could not be merged")
            request = parent
        in_order = self._in_order
        if in_order and in_order[0] is request:
            self._flush()

    def completion_failed(self, request: Request) -> None:
        """``request_done`` raised for ``request``: answer it (or its parent) with an error."""
        top = request.parent if request.parent is not None else request
        # Whatever reply it holds was not processed to the end: it must not reach the client.
        top.reply = self._codec.error_reply("proxy error while completing the request")
        top.pending = 0
        self._flush()

    def _flush(self) -> None:
        """Queue every reply now at the head of the order; send them as one write.

        Always called as ``self._flush()``: CLIENT REPLY shadows it on the
        instance while a reply mode change is pending (see twinproxy.session).
        """
        in_order = self._in_order
        out = self._out
        error_starts = self._error_starts
        width = self._error_start_width
        while in_order:
            head = in_order[0]
            reply = head.reply
            if reply is None:
                break
            in_order.popleft()
            self._pending_bytes -= len(head.raw)
            # Error replies per command, the server's and the proxy's, for both protocols
            # (calls are counted at dispatch, latency by the backend).
            if reply[:width] in error_starts and head.counted is not None and self._codec.is_error(reply):
                head.counted.errors += 1
            if self.closed:
                continue
            out.append(reply)
            if head.close_after:
                in_order.clear()
                self._close_when_sent = True
                break
        if self._reading_paused:
            self._update_reading()
        if self._draining and not in_order:
            self._close_when_sent = True
        if out or self._close_when_sent:
            self._schedule_send()

    def _schedule_send(self) -> None:
        outbox = self._outbox
        if outbox is None:
            self.send_queued()
        elif not self._in_outbox:
            self._in_outbox = True
            outbox.add(self)

    def send_queued(self) -> None:
        """Write what ``_flush`` queued (the outbox calls this once per burst)."""
        self._in_outbox = False
        out = self._out
        output = self._output
        if out:
            if not self.closed and output is not None:
                estimate = output.estimate
                output.write(out)
                out.clear()
                if output.queued or output.estimate > estimate:
                    if output.queued > self._hard_limit:
                        self._output_limit_exceeded()
                        return
                    self._allowed = 0
                in_flight = len(self._in_order)
                pinned = output.queued + in_flight * output.estimate
                budget = self._budget
                if budget is not None:   # ClientOutput.account, called only when it changes something
                    delta = pinned - output.charged
                    if delta >= budget.quantum or -delta >= budget.quantum or (delta and not pinned) or budget.over:
                        output.account(in_flight)
                if pinned >= self._soft_limit or self._reading_paused:
                    self._update_reading()
            else:
                out.clear()
        if self._close_when_sent and (output is None or not output.queued):
            self._finish()

    def _output_moved(self) -> None:
        """The socket took queued replies: read again if that was the limit; close if that was asked."""
        self._output.account(len(self._in_order))
        if self._reading_paused:
            self._update_reading()
        if self._close_when_sent and not self._output.queued:
            self._finish()

    def _finish(self) -> None:
        """Every reply is written and the connection is to close: close it (after a linger, on an error)."""
        transport = self.transport
        if self.closed or transport is None:
            return
        if self._output is not None and self._output.direct and getattr(transport, "producer", None) is self:
            transport.unregisterProducer()   # else a pull producer keeps the transport from closing
        if self._failed:
            self._linger()
        else:
            transport.loseConnection()

    def _output_limit_exceeded(self) -> None:
        """More than ``client_output_hard_limit`` bytes of replies wait for this client: close it now."""
        output = self._output
        self._counters.client_output_limit_closed += 1
        self._log.warn("pool {pool}: closing client {client}: {queued} bytes of replies it has not read passed "
                       "client_output_hard_limit ({limit})", pool=self._pool.name, client=peer_text(self.transport),
                       queued=output.queued, limit=self._hard_limit)
        self._failed = True   # counted above, not again as client_err
        self._close_when_sent = False
        self.abort()
        output.discard()

    def _linger(self) -> None:
        """Close our half once the error is written; drop what the client still sends, for a while.

        A client that wrote a request too large or malformed is often still
        writing it when the error goes out: it reads the error only after its
        write is done, so the proxy must keep reading until then.  It hangs up
        when the client does, or after ``LINGER_SECONDS``/``LINGER_BYTES``.
        """
        if self._linger_call is not None:
            return
        transport = self.transport
        clock = self.factory.clock
        close_write = getattr(transport, "loseWriteConnection", None)
        if clock is None or close_write is None:
            transport.loseConnection()
            return
        close_write()
        self._linger_left = LINGER_BYTES
        self._linger_call = clock.callLater(LINGER_SECONDS, self._linger_over)
        if self._reading_paused:
            self._reading_paused = False
            transport.resumeProducing()

    def _linger_over(self) -> None:
        call, self._linger_call = self._linger_call, None
        if call is not None and call.active():
            call.cancel()
        if not self.closed and self.transport is not None:
            self.transport.abortConnection()

    def _protocol_error(self, err: ProtocolError) -> None:
        """Answer a malformed request after everything before it, then close."""
        request = Request(b"")
        request.reply = self._codec.protocol_error_reply(err)
        request.counted = None   # no command: counted as client_err
        request.close_after = True
        self._closing = self._halted = True
        self._counters.client_err += 1
        self._failed = True
        self._in_order.append(request)
        self._flush()


class _Pushed:
    """A message (or a closing error) in the client's order: written as soon as it reaches the head."""

    __slots__ = ("reply", "raw", "counted", "close_after")

    def __init__(self, frame: bytes) -> None:
        self.reply = frame
        self.raw = b""
        self.counted = None
        self.close_after = False
