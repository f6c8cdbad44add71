"""A small client of etcd's v3 JSON gateway on Twisted's Agent (no treq, no grpc).

Owns: :class:`EtcdHTTP` — JSON POSTs to ``/v3/<api>`` over a persistent
connection pool, failing over to the next endpoint when one cannot be
reached (and, for requests safe to repeat, when one dropped the request);
optional user auth (a token from ``auth/authenticate``, fetched again when
etcd says it expired) — and :class:`WatchStream`, the protocol of one
``/v3/watch`` stream, which runs on a pool of its own because it holds its
connection for as long as it lives.  Keys and values travel base64-encoded;
etcd sends its int64 fields as JSON strings and leaves zero values out.
"""

from __future__ import annotations

import json
from io import BytesIO
from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.internet import defer
from twisted.internet.error import ConnectError, ConnectingCancelledError, DNSLookupError
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from twinproxy.coordinator.etcd_keys import unb64

# Never reached the server: safe to send anywhere else, whatever the request.
_UNREACHED = (ConnectError, DNSLookupError, ConnectingCancelledError)
# Reached it, no answer: only a request safe to repeat goes elsewhere.
_DROPPED = (ResponseNeverReceived, ResponseFailed)


class EtcdError(Exception):
    """etcd answered with an error (``code`` is the gRPC code, ``status`` the HTTP one)."""

    def __init__(self, message: str, code: int, status: int) -> None:
        self.code = code
        self.status = status
        super().__init__(message)


class EtcdHTTP:
    """POSTs to the gateways of ``hosts``, in turn when one fails."""

    def __init__(self, reactor: Any, hosts: Tuple[Tuple[str, int], ...], timeout: float,
                 username: Optional[str] = None, password: Optional[str] = None) -> None:
        self._reactor = reactor
        self._bases = [(f"http://[{h}]:{p}" if ":" in h else f"http://{h}:{p}").encode() for h, p in hosts]
        self._index = 0
        self._username = username
        self._password = password
        self._token: Optional[str] = None
        # Short enough that every endpoint can be tried within one operation's deadline.
        connect_timeout = max(0.2, timeout / max(2, len(hosts)))
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.retryAutomatically = False  # a POST is no GET: repeating one is this module's decision
        self._pool.maxPersistentPerHost = 8
        self._agent = Agent(reactor, connectTimeout=connect_timeout, pool=self._pool)
        self._stream_pool = HTTPConnectionPool(reactor, persistent=False)
        self._stream_agent = Agent(reactor, connectTimeout=connect_timeout, pool=self._stream_pool)

    @property
    def endpoint(self) -> str:
        return self._bases[self._index].decode()

    def rotate(self) -> None:
        """Use the next endpoint from now on (this one failed or hung)."""
        self._index = (self._index + 1) % len(self._bases)

    def call(self, api: str, body: Dict[str, Any], idempotent: bool = False) -> "defer.Deferred[Dict[str, Any]]":
        """POST ``body`` to ``/v3/<api>``; the decoded answer, or EtcdError / the connection's error."""
        if self._username and self._token is None and api != "auth/authenticate":
            return self._authenticate().addCallback(lambda _: self.call(api, body, idempotent))
        return self._attempt(api, body, idempotent, len(self._bases), reauthenticated=False)

    def _attempt(self, api: str, body: Dict[str, Any], idempotent: bool, left: int,
                 reauthenticated: bool) -> "defer.Deferred[Dict[str, Any]]":
        d = self._agent.request(b"POST", self._bases[self._index] + b"/v3/" + api.encode(), self._headers(),
                                FileBodyProducer(BytesIO(json.dumps(body).encode())))
        d.addCallback(_read_json)

        def failed(failure: Failure) -> Any:
            if failure.check(EtcdError) and failure.value.code == 16 and self._username and not reauthenticated:
                # The token expired (etcd's simple tokens idle out): fetch another, once.
                self._token = None
                again = self._authenticate()
                return again.addCallback(lambda _: self._attempt(api, body, idempotent, left, True))
            retry = failure.check(*_UNREACHED) or (idempotent and failure.check(*_DROPPED))
            if retry or (failure.check(EtcdError) and failure.value.status in (502, 503) and idempotent):
                self.rotate()
                if left > 1:
                    return self._attempt(api, body, idempotent, left - 1, reauthenticated)
            return failure

        return d.addErrback(failed)

    def _authenticate(self) -> "defer.Deferred[None]":
        d = self._attempt("auth/authenticate", {"name": self._username, "password": self._password}, True,
                          len(self._bases), reauthenticated=True)
        return d.addCallback(lambda answer: setattr(self, "_token", answer.get("token")))

    def _headers(self) -> Headers:
        headers = Headers({b"Content-Type": [b"application/json"]})
        if self._token:
            headers.addRawHeader(b"Authorization", self._token.encode())
        return headers

    def stream(self, api: str, body: Dict[str, Any], protocol: Protocol) -> "defer.Deferred[None]":
        """Open a streaming POST (``watch``) and feed its body to ``protocol``; fires once it flows."""
        if self._username and self._token is None:
            return self._authenticate().addCallback(lambda _: self.stream(api, body, protocol))
        d = self._stream_agent.request(b"POST", self._bases[self._index] + b"/v3/" + api.encode(), self._headers(),
                                       FileBodyProducer(BytesIO(json.dumps(body).encode())))

        def answered(response: Any) -> Any:
            if response.code == 401:
                self._token = None  # expired: the next attempt authenticates again
            if response.code != 200:
                return read_body(response).addCallback(lambda data: _raise_error(data, response.code))
            response.deliverBody(protocol)
            return None

        def failed(failure: Failure) -> Failure:
            if failure.check(*_UNREACHED, *_DROPPED):
                self.rotate()
            return failure

        return d.addCallbacks(answered, failed)

    def close(self) -> "defer.Deferred[None]":
        return defer.DeferredList([self._pool.closeCachedConnections(),
                                   self._stream_pool.closeCachedConnections()]).addCallback(lambda _: None)


def _read_json(response: Any) -> "defer.Deferred[Dict[str, Any]]":
    def parse(data: bytes) -> Dict[str, Any]:
        if response.code != 200:
            _raise_error(data, response.code)
        return json.loads(data)

    return read_body(response).addCallback(parse)


class _Body(Protocol):
    """Collects a response body (Twisted's readBody warns about the transports Agent gives it)."""

    def __init__(self, done: "defer.Deferred[bytes]") -> None:
        self.done = done
        self.chunks: List[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = None) -> None:
        if self.done.called:
            return
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


def read_body(response: Any) -> "defer.Deferred[bytes]":
    """The whole body of ``response``; cancelling it drops the connection."""
    protocol: _Body

    def cancel(_: Any) -> None:
        if protocol.transport is not None:
            protocol.transport.stopProducing()

    protocol = _Body(defer.Deferred(cancel))
    response.deliverBody(protocol)
    return protocol.done


def _raise_error(data: bytes, status: int) -> None:
    try:
        answer = json.loads(data)
        message, code = answer.get("message") or answer.get("error") or "", int(answer.get("code", 0))
    except (ValueError, AttributeError):
        message, code = data[:200].decode("utf-8", "replace"), 0
    raise EtcdError(f"HTTP {status}: {message}", code, status)


class WatchStream(Protocol):
    """One watch stream: ``on_created()``, then ``on_events([(type, key)])``; ``on_closed(reason)`` once.

    ``revision`` is the newest store revision the stream has reported (every message's header has
    one: the creation, events, progress notifications) and ``last_message`` when (``clock()``) the
    last message came: what tells a stream that went silent without a word.
    """

    def __init__(self, on_created: Callable[[], None], on_events: Callable[[List[Tuple[str, bytes]]], None],
                 on_closed: Callable[[str], None], clock: Callable[[], float]) -> None:
        self._on_created = on_created
        self._on_events = on_events
        self._on_closed = on_closed
        self._clock = clock
        self._buffer = b""
        self._closed = False
        self.revision = 0
        self.last_message = clock()
        # (revision, since): a read saw a change of that revision the stream had not reported yet.
        self.lag: Optional[Tuple[int, float]] = None

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            if line.strip():
                self._message(line)

    def _message(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            self.close("a garbled watch message")
            return
        if "error" in message:
            self.close(f"watch error: {message['error']}")
            return
        self.last_message = self._clock()
        result = message.get("result", {})
        try:
            self.revision = max(self.revision, int(result.get("header", {}).get("revision", 0)))
        except (TypeError, ValueError):
            pass
        if result.get("created"):
            self._on_created()
        if result.get("canceled"):
            self.close(f"watch canceled: {result.get('cancel_reason', '')}")
            return
        events = [(event.get("type", "PUT"), unb64(event.get("kv", {}).get("key")))
                  for event in result.get("events", [])]
        if events:
            self._on_events(events)

    def close(self, reason: str = "closed") -> None:
        if self.transport is not None:
            self.transport.stopProducing()
        self._finish(reason)

    def connectionLost(self, reason: Failure = None) -> None:
        self._finish(reason.getErrorMessage() if reason is not None else "connection lost")

    def _finish(self, reason: str) -> None:
        if not self._closed:
            self._closed = True
            self._on_closed(reason)
