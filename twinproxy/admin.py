"""The operator's listeners: nutcracker's stats port, and the HTTP endpoint.

Owns: :class:`StatsPortService` (a TCP listener that writes one JSON
document and closes, as nutcracker's stats port does) and
:class:`HttpService` (``/metrics`` in Prometheus text format, ``/stats``
with the same JSON, ``/health``, ``POST /reload``, and the web dashboard's
page at ``/`` and ``/dashboard/`` with its ``/api/state``, ``/api/series``
and ``/api/events``, whose documents ``webstate.py`` builds).  Both read the pools through a callable,
so a later topology change needs nothing from them, and neither touches a
counter: ``stats.py`` and ``metrics.py`` build what they serve.
"""

from __future__ import annotations

import json
from typing import Any, Callable, List, Optional, Sequence, Tuple

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from twinproxy import metrics, stats
from twinproxy.listeners import ListenError, bound_address, os_reason
from twinproxy.web.resources import EventStream, PageFiles, json_body, series_answer
from twinproxy.webstate import ProxyWebState

_log = Logger()

PoolsSource = Callable[[], Sequence[Any]]


def stats_json(pools: PoolsSource, started: float, clock: Any, counters: Any = None) -> bytes:
    return json.dumps(stats.snapshot(pools(), started, clock.seconds(), counters)).encode() + b"\n"


def health(pools: PoolsSource) -> Tuple[int, List[str]]:
    """(HTTP status, one line per pool): 503 when some pool has no server to route to."""
    lines = []
    status = 200
    for service in pools():
        pool = service.pool
        sentinel = service.runtime.sentinel
        if sentinel is not None:
            problems = sentinel.health_lines()
            if problems:
                status = 503
                lines += [f"pool {service.name}: {problem}" for problem in problems]
            else:
                lines.append(f"pool {service.name}: ok ({len(pool.servers)} shards, every master confirmed)")
            continue
        if pool.healthy:
            lines.append(f"pool {service.name}: ok ({len(pool.live_servers)} of {len(pool.servers)} servers live)")
        else:
            status = 503
            down = ", ".join(s.spec.stats_name for s in pool.servers)
            lines.append(f"pool {service.name}: no live server (down or ejected: {down})")
    return status, lines


class _WriteAndClose(Protocol):
    def connectionMade(self) -> None:
        try:
            document = self.factory.document()
        except Exception:  # noqa: BLE001 - logged; the client is closed, not left waiting
            _log.failure("stats document failed")
            self.transport.loseConnection()
            return
        if isinstance(document, bytes):
            self._write(document)
        else:  # a Deferred: the master gathering its workers' documents
            document.addCallbacks(self._write, self._failed)

    def _write(self, document: bytes) -> None:
        self.transport.write(document)
        self.transport.loseConnection()

    def _failed(self, failure: Any) -> None:
        _log.failure("stats document failed", failure=failure)
        self.transport.loseConnection()


class _StatsFactory(Factory):
    protocol = _WriteAndClose
    noisy = False

    def __init__(self, document: Callable[[], bytes]) -> None:
        self.document = document


class _Listening(Service):
    """A service that listens on one TCP address while running."""

    _log = Logger()

    def __init__(self, reactor: Any, interface: str, port: int, path: Any = None) -> None:
        self._reactor = reactor
        self.interface = interface
        self.requested_port = port
        self.path = path  # a unix socket instead (a worker's stats, for its master)
        self.port: Any = None

    def factory(self) -> Factory:
        raise NotImplementedError

    def privilegedStartService(self) -> None:
        self._listen()
        super().privilegedStartService()

    def startService(self) -> None:
        if self.port is None:
            self._listen()
        super().startService()

    def _listen(self) -> None:
        try:
            if self.path is not None:
                self.port = self._reactor.listenUNIX(self.path, self.factory(), mode=0o600)
                return
            self.port = self._reactor.listenTCP(self.requested_port, self.factory(), interface=self.interface)
        except (CannotListenError, OSError) as err:
            where = self.path or f"{self.interface}:{self.requested_port}"
            raise ListenError(self.name, where, os_reason(err)) from None
        self._log.info("{what} listening on {interface}:{port}", what=self.name,
                       interface=self.interface, port=self.port.getHost().port)

    @property
    def port_number(self) -> int:
        return self.port.getHost().port

    @property
    def bound(self) -> Optional[str]:
        return bound_address(self.port) if self.port is not None else None

    def stopService(self) -> defer.Deferred:
        super().stopService()
        port, self.port = self.port, None
        return defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)


class StatsPortService(_Listening):
    """nutcracker's stats port: connect, read one JSON document, get closed."""

    def __init__(self, pools: PoolsSource, started: float, reactor: Any, interface: str, port: int,
                 path: Any = None, document: Any = None, counters: Any = None) -> None:
        super().__init__(reactor, interface, port, path)
        self.setName("stats")
        self._pools = pools
        self._started = started
        self._document = document or (lambda: stats_json(self._pools, self._started, self._reactor, counters))

    def factory(self) -> Factory:
        return _StatsFactory(self._document)


class Page(Resource):
    """A GET-only page rendered by ``render_page(request) -> bytes`` (the proxy's and the dashboard's)."""

    isLeaf = True

    def __init__(self, render_page: Callable[[Any], bytes]) -> None:
        super().__init__()
        self._render_page = render_page

    def render_GET(self, request: Any) -> bytes:
        return self._render_page(request)


class _Reload(Resource):
    """``POST /reload``: read the pool file again and apply it; the answer says what changed, or why not."""

    isLeaf = True

    def __init__(self, reload: Callable[[], defer.Deferred]) -> None:
        super().__init__()
        self._reload = reload

    def render_POST(self, request: Any) -> Any:
        gone = []
        request.notifyFinish().addErrback(gone.append)   # the client hung up: the reload goes on

        def send(status: int, document: dict) -> None:
            if gone:
                return
            request.setResponseCode(status)
            request.setHeader(b"content-type", b"application/json")
            request.write(json.dumps(document).encode() + b"\n")
            request.finish()

        def failed(failure: Any) -> None:
            _log.failure("POST /reload", failure=failure)
            send(500, {"ok": False, "error": failure.getErrorMessage()})

        self._reload().addCallbacks(lambda result: send(result.status, result.document()), failed)
        return NOT_DONE_YET

    def render_GET(self, request: Any) -> bytes:
        request.setResponseCode(405)
        request.setHeader(b"allow", b"POST")
        return b"POST /reload re-reads the pool file and applies it\n"


class _QuietSite(Site):
    """A Site without its access log: scrapes every few seconds would flood the proxy's log."""

    noisy = False
    displayTracebacks = False

    def log(self, request: Any) -> None:
        pass


class _PageRoot(Resource):
    """The root: its children (``/metrics``, ``/api`` ...) first, else the page's files (``/``, ``/app.js``)."""

    def __init__(self, files: Resource) -> None:
        super().__init__()
        self._files = files

    def getChild(self, path: bytes, request: Any) -> Resource:
        # PageFiles reads the name from postpath: give it back the segment traversal took.
        request.postpath.insert(0, request.prepath.pop())
        return self._files


class _Events(Resource):
    isLeaf = True

    def __init__(self, stream: EventStream) -> None:
        super().__init__()
        self._stream = stream

    def render_GET(self, request: Any) -> Any:
        return self._stream.render(request)


class HttpService(_Listening):
    """``/metrics``, ``/stats``, ``/health``, ``POST /reload`` and the dashboard page over HTTP (twisted.web).

    The dashboard's sampler (``web``) runs while the service does.
    """

    def __init__(self, pools: PoolsSource, started: float, reactor: Any, interface: str, port: int,
                 counters: Any = None, reload: Optional[Callable[[], defer.Deferred]] = None) -> None:
        super().__init__(reactor, interface, port)
        self.setName("http")
        self._pools = pools
        self._started = started
        self._counters = counters
        self._reload = reload
        self.web = ProxyWebState(pools, started, reactor, counters)
        self._events: Optional[EventStream] = None

    def startService(self) -> None:
        super().startService()
        self.web.start()

    def stopService(self) -> defer.Deferred:
        self.web.stop()
        events, self._events = self._events, None
        if events is not None:
            events.close()   # every open stream ends; a restart makes a new one
        return super().stopService()

    def _state(self, request: Any) -> bytes:
        return json_body(request, 200, self.web.document())

    def _series(self, request: Any) -> bytes:
        return series_answer(request, self.web.series, self._reactor.seconds(), self.web.period)

    def _metrics(self, request: Any) -> bytes:
        request.setHeader(b"content-type", metrics.CONTENT_TYPE.encode())
        return metrics.render(self._pools, self._started, self._reactor, self._counters)

    def _stats(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return stats_json(self._pools, self._started, self._reactor, self._counters)

    def _health(self, request: Any) -> bytes:
        status, lines = health(self._pools)
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return ("\n".join(lines) + "\n").encode()

    def factory(self) -> Factory:
        files = PageFiles()
        root = _PageRoot(files)
        root.putChild(b"dashboard", files)
        api = Resource()
        root.putChild(b"api", api)
        api.putChild(b"state", Page(self._state))
        api.putChild(b"series", Page(self._series))
        if self._events is None:
            self._events = EventStream(self.web.events, self._reactor)
        api.putChild(b"events", _Events(self._events))
        root.putChild(b"metrics", Page(self._metrics))
        root.putChild(b"stats", Page(self._stats))
        root.putChild(b"health", Page(self._health))
        if self._reload is not None:
            root.putChild(b"reload", _Reload(self._reload))
        return _QuietSite(root)
