"""Services that own each pool's lifetime: listen, connect, stop.

Owns: :class:`PoolService` (one pool's listener, factory, :class:`ServerPool`
and backend links, in start and stop order) and :func:`make_service`, which
wires one per pool under a ``MultiService``.  It parses nothing and routes
nothing; the reactor comes in as a parameter.
"""

from __future__ import annotations

import os
import socket
import stat
from typing import Any, List, Optional, Sequence

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.logger import Logger

from twinproxy import compiled
from twinproxy.backend import ServerLink
from twinproxy.config import PoolConfig
from twinproxy.frontend import Outbox, ProxyFactory
from twinproxy.pool import ServerPool
from twinproxy.protocols import codec_for


class PoolService(Service):
    """One pool: accepts clients on its ``listen`` address and routes to its servers."""

    _log = Logger()

    def __init__(self, config: PoolConfig, reactor: Any, inherited: Any = None, reuse_port: bool = False) -> None:
        self.setName(config.name)
        # --workers: a unix socket made before the fork, or TCP shared with SO_REUSEPORT.
        self._inherited = inherited
        self._reuse_port = reuse_port
        self.config = config
        self._reactor = reactor
        self.codec = codec_for(config)
        self.pool = ServerPool(config, reactor)
        self.pool.unavailable.send = self._no_live_server
        self._no_server_reply = self.codec.error_reply(f"no live server in pool '{config.name}'")
        self.outbox = Outbox(reactor)
        self.links: List[ServerLink] = [
            ServerLink(server, self.pool, self.codec, config, reactor) for server in self.pool.servers
        ]
        for link in self.links:
            link.outbox = self.outbox
        self.factory = ProxyFactory(self.pool, self.codec, config.client_connections,
                                    requires_auth=bool(config.redis and config.redis_auth), outbox=self.outbox,
                                    clock=reactor)
        self.port: Any = None

    def _no_live_server(self, request: Any) -> None:
        self.pool.counters.forward_error += 1
        request.reply = self._no_server_reply
        request.owner.request_done(request)

    def privilegedStartService(self) -> None:
        self._listen()
        super().privilegedStartService()

    def startService(self) -> None:
        if self.port is None:
            self._listen()
        super().startService()
        if self.config.preconnect:
            for link in self.links:
                link.preconnect(self.codec.default_dialect)
        scanners = "C" if compiled.speedups is not None else "pure Python"
        self._log.info("pool {pool} ({protocol}) listening on {listen} with {count} servers (scanners: {scanners})",
                       pool=self.name, protocol=self.config.protocol, listen=str(self.config.listen),
                       count=len(self.links), scanners=scanners)

    def _listen(self) -> None:
        listen = self.config.listen
        reactor = self._reactor
        backlog = self.config.backlog
        if self._inherited is not None:
            self.port = reactor.adoptStreamPort(self._inherited.fileno(), socket.AF_UNIX, self.factory)
        elif self._reuse_port and not listen.is_unix:
            from twinproxy.workers import reuse_port_socket

            interface = _interface(listen.host) or "0.0.0.0"
            sock = reuse_port_socket(listen, backlog, interface)
            family = socket.AF_INET6 if ":" in interface else socket.AF_INET
            self.port = reactor.adoptStreamPort(sock.fileno(), family, self.factory)
            sock.close()  # the port holds its own duplicate
        elif listen.is_unix:
            _remove_stale_socket(listen.path)
            mode = listen.mode if listen.mode is not None else 0o666
            self.port = reactor.listenUNIX(listen.path, self.factory, backlog=backlog, mode=mode)
        else:
            self.port = reactor.listenTCP(listen.port, self.factory, backlog=backlog,
                                          interface=_interface(listen.host))

    @property
    def address(self) -> Any:
        """The bound address (host and port, or the socket path)."""
        return self.port.getHost() if self.port is not None else None

    def stopService(self) -> defer.Deferred:
        """Stop accepting; let clients get the replies to what they sent, up to
        ``shutdown_timeout``; then close clients and backend connections."""
        super().stopService()
        reactor = self._reactor
        listening = defer.maybeDeferred(self.port.stopListening) if self.port is not None else defer.succeed(None)
        self.port = None
        drained = self.factory.drain()
        deadline = reactor.callLater(self.config.shutdown_timeout / 1000.0, self._give_up, drained)

        def close_backends(_: Any) -> defer.Deferred:
            if deadline.active():
                deadline.cancel()
            self.pool.stop()
            return defer.gatherResults([link.stop() for link in self.links])

        drained.addCallback(close_backends)
        return defer.gatherResults([listening, drained])

    def _give_up(self, drained: defer.Deferred) -> None:
        if not drained.called:
            self._log.warn("pool {pool}: {count} clients still waiting for replies after shutdown_timeout; "
                           "closing them", pool=self.name, count=len(self.factory.clients))
            for client in list(self.factory.clients):
                client.abort()
            if not drained.called:
                drained.callback(None)


def _interface(host: Optional[str]) -> str:
    """An address to bind for ``host``; names are resolved once, before serving."""
    if not host:
        return ""
    if host in ("0.0.0.0", "::"):
        return host
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        return host
    except OSError:
        pass
    info = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return info[0][4][0]


def _remove_stale_socket(path: str) -> None:
    # A socket left by a process that died is in the way of bind(); a file
    # of any other kind is not ours to delete.
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def make_service(pools: Sequence[PoolConfig], reactor: Any) -> MultiService:
    """One named PoolService per pool, under one MultiService."""
    top = MultiService()
    for config in pools:
        PoolService(config, reactor).setServiceParent(top)
    return top
