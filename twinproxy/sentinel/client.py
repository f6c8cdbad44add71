"""The proxy's own small Redis clients for the control plane.

Owns: :class:`CommandClient` — one lazily opened connection to a sentinel or
a data node, commands answered in order, each with its own deadline (a
missed deadline drops the connection and fails everything on it) — and
:class:`EventSubscriber` — a subscription to a sentinel's event channels
that reconnects with backoff, pings every second and counts the link dead
when nothing came back for a few seconds (radix.v2#41: an unpinged event
link misses the switch).  Both run in the reactor; neither blocks.  The
data plane never uses them: these carry a few commands a second at most,
so a Deferred per command is fine here.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Deque, List, Optional, Sequence, Tuple

from twisted.internet import defer
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from twinproxy.credentials import Credentials
from twinproxy.protocols.resp import RespReplyFramer, encode_command
from twinproxy.sentinel.replies import ReplyError, decode, show_address


class CommandError(Exception):
    """The command got no reply: the connection failed, closed or timed out."""


def auth_command(auth: Optional[Credentials]) -> Optional[List[bytes]]:
    """``AUTH`` arguments for ``auth``, or None without credentials."""
    return auth.auth_arguments() if auth is not None else None


class _CommandProtocol(Protocol):
    def __init__(self, client: "CommandClient") -> None:
        self.client = client
        self.framer = RespReplyFramer()

    def connectionMade(self) -> None:
        self.client._connected(self)

    def dataReceived(self, data: bytes) -> None:
        self.framer.feed(data)
        while True:
            try:
                raw = self.framer.next()
            except Exception as err:  # noqa: BLE001 - a garbled stream ends the connection
                self.client._lost(self, f"bad reply: {err}")
                self.transport.abortConnection()
                return
            if raw is None:
                return
            self.client._reply(self, raw)

    def connectionLost(self, reason: Failure = None) -> None:
        self.client._lost(self, reason.getErrorMessage() if reason is not None else "connection lost")


class _Factory(ClientFactory):
    noisy = False

    def __init__(self, client: Any) -> None:
        self.client = client

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.client._protocol()

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.client._connect_failed(reason.getErrorMessage())


class CommandClient:
    """Commands to one Redis or sentinel, in order, over one connection opened on demand."""

    def __init__(self, reactor: Any, address: Tuple[str, int], auth: Optional[Credentials] = None,
                 timeout: float = 0.5, on_lost: Optional[Callable[[], None]] = None) -> None:
        self.address = address
        self._on_lost = on_lost   # the connection closed, and not by us
        self._reactor = reactor
        self._auth = auth_command(auth)
        self.timeout = timeout
        self._protocol_now: Optional[_CommandProtocol] = None
        self._connecting = False
        # (encoded, deferred, deadline call): written once connected; answered in order.
        self._waiting: Deque[Tuple[bytes, defer.Deferred, Any]] = deque()
        self._sent: Deque[Tuple[defer.Deferred, Any]] = deque()
        self._closed = False

    def command(self, *args: bytes) -> defer.Deferred:
        """Send one command; fires with its decoded reply (a :class:`ReplyError` is a value).

        Fails with :class:`CommandError` when no reply came within ``timeout``.
        """
        result: defer.Deferred = defer.Deferred()
        if self._closed:
            result.errback(CommandError("client closed"))
            return result
        deadline = self._reactor.callLater(self.timeout, self._overdue)
        self._waiting.append((encode_command(list(args)), result, deadline))
        if self._protocol_now is not None:
            self._write_waiting()
        elif not self._connecting:
            self._connect()
        return result

    def close(self) -> None:
        self._closed = True
        self._fail_all("client closed")
        if self._protocol_now is not None and self._protocol_now.transport is not None:
            self._protocol_now.transport.abortConnection()

    # -- internals --------------------------------------------------------------

    def _protocol(self) -> _CommandProtocol:
        return _CommandProtocol(self)

    def _connect(self) -> None:
        self._connecting = True
        host, port = self.address
        self._reactor.connectTCP(host, port, _Factory(self), timeout=max(self.timeout, 0.1))

    def _connected(self, protocol: _CommandProtocol) -> None:
        self._connecting = False
        if self._closed:
            protocol.transport.abortConnection()
            return
        self._protocol_now = protocol
        if self._auth is not None:
            # Its reply is matched like any other; a refusal ends the connection.
            checked: defer.Deferred = defer.Deferred()
            checked.addCallback(self._auth_answered, protocol)
            # A lost connection fails the commands after AUTH too: they report it.
            checked.addErrback(lambda failure: None)
            protocol.transport.write(encode_command(self._auth))
            self._sent.append((checked, None))
        self._write_waiting()

    def _auth_answered(self, value: Any, protocol: _CommandProtocol) -> None:
        if isinstance(value, ReplyError) and protocol.transport is not None:
            self._lost(protocol, f"AUTH refused: {value.message}")
            protocol.transport.abortConnection()

    def _write_waiting(self) -> None:
        protocol = self._protocol_now
        while self._waiting:
            raw, result, deadline = self._waiting.popleft()
            protocol.transport.write(raw)
            self._sent.append((result, deadline))

    def _reply(self, protocol: _CommandProtocol, raw: bytes) -> None:
        if protocol is not self._protocol_now or not self._sent:
            return
        result, deadline = self._sent.popleft()
        if deadline is not None and deadline.active():
            deadline.cancel()
        try:
            value = decode(raw)
        except ValueError as err:
            result.errback(CommandError(f"undecodable reply: {err}"))
            return
        result.callback(value)

    def _overdue(self) -> None:
        # Some command's deadline passed: its reply can no longer be matched safely.
        protocol, self._protocol_now = self._protocol_now, None   # dropped by us: not reused, not "lost"
        self._fail_all(f"no reply from {show_address(self.address)} within {self.timeout:g}s")
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abortConnection()

    def _lost(self, protocol: _CommandProtocol, text: str) -> None:
        if protocol is self._protocol_now:
            self._protocol_now = None
            self._fail_all(f"{show_address(self.address)}: {text}")
            if self._on_lost is not None and not self._closed:
                self._on_lost()

    def _connect_failed(self, text: str) -> None:
        self._connecting = False
        self._fail_all(f"{show_address(self.address)}: {text}")

    def _fail_all(self, text: str) -> None:
        pending = list(self._sent) + [(result, deadline) for _, result, deadline in self._waiting]
        self._sent.clear()
        self._waiting.clear()
        for result, deadline in pending:
            if deadline is not None and deadline.active():
                deadline.cancel()
            if not result.called:
                result.errback(CommandError(text))


class _EventProtocol(Protocol):
    def __init__(self, subscriber: "EventSubscriber") -> None:
        self.subscriber = subscriber
        self.framer = RespReplyFramer()
        self.subscribed = 0

    def connectionMade(self) -> None:
        self.subscriber._connected(self)

    def dataReceived(self, data: bytes) -> None:
        self.subscriber._heard()
        self.framer.feed(data)
        while True:
            try:
                raw = self.framer.next()
                if raw is None:
                    return
                value = decode(raw)
            except Exception:  # noqa: BLE001 - a garbled stream ends the connection
                self.transport.abortConnection()
                return
            self.subscriber._message(self, value)

    def connectionLost(self, reason: Failure = None) -> None:
        self.subscriber._lost(self, reason.getErrorMessage() if reason is not None else "connection lost")


class EventSubscriber:
    """A sentinel's event channels, kept subscribed for as long as it runs.

    ``on_event(channel, payload)`` gets every message; ``on_subscribed()``
    runs after each (re)subscription, since events sent while the link was
    down are lost and the caller must look again.
    """

    _log = Logger()
    PING_EVERY = 1.0
    DEAD_AFTER = 3.0
    BACKOFF = (0.1, 0.2, 0.5, 1.0, 2.0)

    def __init__(self, reactor: Any, address: Tuple[str, int], channels: Sequence[bytes],
                 on_event: Callable[[bytes, bytes], None], on_subscribed: Callable[[], None],
                 auth: Optional[Credentials] = None, label: str = "") -> None:
        self.address = address
        self._reactor = reactor
        self._channels = list(channels)
        self._on_event = on_event
        self._on_subscribed = on_subscribed
        self._auth = auth_command(auth)
        self._label = label
        self._protocol_now: Optional[_EventProtocol] = None
        self._running = False
        self._attempt = 0
        self._retry_call: Any = None
        self._ping_call: Any = None
        self._last_heard = 0.0
        self.subscribed = False
        self._last_problem: Optional[str] = None

    def start(self) -> None:
        self._running = True
        self._connect()

    def stop(self) -> None:
        self._running = False
        for call in (self._retry_call, self._ping_call):
            if call is not None and call.active():
                call.cancel()
        self._retry_call = self._ping_call = None
        if self._protocol_now is not None and self._protocol_now.transport is not None:
            self._protocol_now.transport.abortConnection()

    # -- internals --------------------------------------------------------------

    def _protocol(self) -> _EventProtocol:
        return _EventProtocol(self)

    def _connect(self) -> None:
        self._retry_call = None
        if not self._running:
            return
        host, port = self.address
        self._reactor.connectTCP(host, port, _Factory(self), timeout=1.0)

    def _connected(self, protocol: _EventProtocol) -> None:
        if not self._running:
            protocol.transport.abortConnection()
            return
        self._protocol_now = protocol
        self._heard()
        commands = []
        if self._auth is not None:
            commands.append(encode_command(self._auth))
        commands.append(encode_command([b"SUBSCRIBE", *self._channels]))
        protocol.transport.write(b"".join(commands))
        self._ping_call = self._reactor.callLater(self.PING_EVERY, self._ping)

    def _heard(self) -> None:
        self._last_heard = self._reactor.seconds()

    def _ping(self) -> None:
        self._ping_call = None
        protocol = self._protocol_now
        if protocol is None or protocol.transport is None:
            return
        if self._reactor.seconds() - self._last_heard >= self.DEAD_AFTER:
            self._problem(f"no answer to PING for {self.DEAD_AFTER:g}s")
            protocol.transport.abortConnection()
            return
        protocol.transport.write(encode_command([b"PING"]))
        self._ping_call = self._reactor.callLater(self.PING_EVERY, self._ping)

    def _message(self, protocol: _EventProtocol, value: Any) -> None:
        if isinstance(value, ReplyError):
            self._problem(f"refused: {value.message}")
            protocol.transport.abortConnection()
            return
        if not isinstance(value, list) or not value or not isinstance(value[0], bytes):
            return
        kind = value[0].lower()
        if kind == b"message" and len(value) == 3:
            self._on_event(value[1], value[2])
        elif kind == b"subscribe":
            protocol.subscribed += 1
            if protocol.subscribed == len(self._channels):
                self.subscribed = True
                self._attempt = 0
                if self._last_problem is not None:
                    self._log.info("sentinel {sentinel}: event link up again{label}",
                                   sentinel=show_address(self.address), label=self._label)
                    self._last_problem = None
                self._on_subscribed()

    def _lost(self, protocol: _EventProtocol, text: str) -> None:
        if protocol is self._protocol_now:
            self._protocol_now = None
            self.subscribed = False
            if self._ping_call is not None and self._ping_call.active():
                self._ping_call.cancel()
            self._ping_call = None
            self._problem(text)
            self._schedule_retry()

    def _connect_failed(self, text: str) -> None:
        self._problem(text)
        self._schedule_retry()

    def _problem(self, text: str) -> None:
        if text != self._last_problem and self._running:
            self._log.warn("sentinel {sentinel}: event link: {reason}{label}",
                           sentinel=show_address(self.address), reason=text, label=self._label)
        self._last_problem = text

    def _schedule_retry(self) -> None:
        if not self._running or self._retry_call is not None:
            return
        delay = self.BACKOFF[min(self._attempt, len(self.BACKOFF) - 1)]
        self._attempt += 1
        self._retry_call = self._reactor.callLater(delay, self._connect)
