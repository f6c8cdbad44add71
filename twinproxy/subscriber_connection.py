"""One subscriber connection: one client's subscriptions on one server, streaming.

Owns: :class:`SubscriberConnection` — one socket, opened in the client's
RESP version with the pool's handshake; the (UN)SUBSCRIBE commands it sent
and the acks still to come for each (so the client's reply can wait for
them), the names it holds, and the messages it reads, handed whole to its
session.  No request FIFO, no idle or request deadline: only a deadline
for acks (the pool's ``timeout``).  Its session is a
:class:`~twinproxy.subscriber.ClientSubscriptions`; it neither routes nor
counts what the client is subscribed to.
"""

from __future__ import annotations

from collections import deque
from typing import Any, List, Set, Tuple

from twisted.internet import error
from twisted.internet.protocol import Protocol

from twinproxy.backend import describe_failure
from twinproxy.protocols import ProtocolError, resp
from twinproxy.protocols.redis_pubsub import COMMAND_WORDS, MESSAGE_KINDS, push_parts

_ACK_WORDS = frozenset(COMMAND_WORDS.values())


class SubscriberConnection(Protocol):
    """One client's subscriptions on one server: the commands it sent, their acks, the messages."""

    def __init__(self, session: Any, server: str, link: Any, dialect: int,
                 handshake: List[bytes], clock: Any) -> None:
        self.session = session
        self.server = server
        self.link = link
        self.target = link.target
        self.dialect = dialect
        # What this connection is subscribed to, as sent (acks may still be on the way).
        self.names: Tuple[Set[bytes], Set[bytes], Set[bytes]] = (set(), set(), set())
        self._framer = resp.RespReplyFramer(pushes=True)
        self._pending: deque = deque()   # [acks still to come, _Ack or None (swallowed), sent_at]
        self._held: List[bytes] = list(handshake)
        self._handshake = len(handshake)
        self._clock = clock
        self._timeout = link.timeout
        self._timer: Any = None
        self.closed = False
        self.counted = True   # against the hub's per-server cap, until gone

    @property
    def idle(self) -> bool:
        """Subscribed to nothing and waiting for nothing: it may close."""
        return not self._pending and not any(self.names)

    def send(self, what: int, subscribing: bool, names: List[bytes], waiter: Any) -> None:
        """(UN)SUBSCRIBE ``names``; ``waiter`` learns when the server has acked them all."""
        held = self.names[what]
        if subscribing:
            held.update(names)
        else:
            held.difference_update(names)
        self._pending.append([len(names), waiter, self._clock.seconds()])
        raw = resp.encode_command([COMMAND_WORDS[what, subscribing], *names])
        if self.transport is not None and not self._held:
            self.transport.write(raw)
        else:
            self._held.append(raw)
        if self._timer is None and self._timeout is not None:
            self._timer = self._clock.callLater(self._timeout, self._overdue)

    def release_pending(self) -> None:
        """Count every ack still to come as arrived (the connection is replaced; its subscriptions move)."""
        pending, self._pending = self._pending, deque()
        for _, waiter, _ in pending:
            if waiter is not None:
                waiter.arrived()

    def fail_pending(self, reply: bytes) -> None:
        pending, self._pending = self._pending, deque()
        for _, waiter, _ in pending:
            if waiter is not None:
                waiter.answer(reply)

    def close(self) -> None:
        """Close it on purpose (idle, moved, the client or the pool is gone)."""
        if self.closed:
            return
        self.closed = True
        self._cancel_timer()
        self.session.hub.gone(self)
        if self.transport is not None:
            self.transport.loseConnection()

    # -- Twisted protocol -----------------------------------------------------

    def connectionMade(self) -> None:
        transport = self.transport
        if self.closed:
            transport.abortConnection()
            return
        if hasattr(transport, "setTcpNoDelay"):
            transport.setTcpNoDelay(True)
            if self.link.config.tcpkeepalive:
                transport.setTcpKeepAlive(True)
        held, self._held = self._held, []
        if held:
            transport.writeSequence(held)

    def dataReceived(self, data: bytes) -> None:
        try:
            self._frames(data)
        finally:
            outbox = self.session.hub.outbox
            if outbox is not None:
                outbox.burst_done()

    def _frames(self, data: bytes) -> None:
        framer = self._framer
        framer.feed(data)
        while not self.closed:
            try:
                frame = framer.next()
                if frame is None:
                    return
                if self._handshake:
                    self._handshake -= 1
                    if frame[:1] in (b"-", b"!"):
                        self._failed("backend handshake failed: " + frame.strip().decode("latin-1")[1:])
                    continue
                parts = push_parts(frame)
            except (ProtocolError, ValueError) as err:
                self._failed(f"bad reply from server: {err}")
                return
            if not parts or not isinstance(parts[0], bytes):
                if frame[:1] in (b"-", b"!"):   # a command refused (ACL): the client is told by a close
                    self._failed("server refused a subscription: " + frame.strip().decode("latin-1")[1:])
                continue
            kind = parts[0]
            what = MESSAGE_KINDS.get(kind)
            if what is not None:
                if len(parts) > 1 and parts[1] in self.names[what]:   # not unsubscribed since
                    self.session.relay(self, frame)
            elif kind in _ACK_WORDS:
                self._acked()
            # Anything else (a PONG, a tracking push) answers nothing the proxy asked.

    def _acked(self) -> None:
        pending = self._pending
        if not pending:
            self._failed("ack from server with no subscription pending")
            return
        head = pending[0]
        head[0] -= 1
        if head[0]:
            return
        pending.popleft()
        self._cancel_timer()
        if pending and self._timeout is not None:
            due = pending[0][2] + self._timeout - self._clock.seconds()
            self._timer = self._clock.callLater(max(0.0, due), self._overdue)
        if head[1] is not None:
            head[1].arrived()
        if self.idle and not self.closed:
            self.session.idle(self)

    def _overdue(self) -> None:
        self._timer = None
        pending = self._pending
        if not pending or self.closed:
            return
        due = pending[0][2] + self._timeout
        now = self._clock.seconds()
        if now + 1e-6 >= due:
            self._failed(f"no ack from server within {self._timeout * 1000:.0f} ms")
        else:
            self._timer = self._clock.callLater(due - now, self._overdue)

    def _failed(self, text: str) -> None:
        if self.closed:
            return
        transport = self.transport
        self.close()
        if transport is not None:
            transport.abortConnection()
        self.session.lost(self, text)

    def connectionLost(self, reason: Any = None) -> None:
        self.transport = None
        if not self.closed:
            clean = reason is not None and reason.check(error.ConnectionDone) is not None
            self.close()
            self.session.lost(self, "server closed the connection" if clean else describe_failure(reason))

    def connect_failed(self, reason: Any) -> None:
        """Called by the connector when the connection could not be made."""
        if not self.closed:
            self.close()
            self.session.lost(self, describe_failure(reason))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
