"""The service that owns one pool's lifetime: listen, apply changes, stop.

Owns: :class:`PoolService` — the pool's listener and its
:class:`~twinproxy.runtime.PoolRuntime`, started and stopped as a Twisted
service, and changed while running by :meth:`PoolService.prepare` (open
a new listener, which may fail and so comes first) and
:meth:`PoolService.apply`.  It parses nothing and routes nothing; the
reactor comes in as a parameter.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from twinproxy import compiled
from twinproxy.config import PoolConfig
from twinproxy.links import ServerLink
from twinproxy.listeners import bound_address, listen_pool
from twinproxy.runtime import PoolRuntime
from twinproxy.topology import PoolDiff


class PoolService(Service):
    """One pool: accepts clients on its ``listen`` address and routes to its servers."""

    _log = Logger()

    def __init__(self, config: PoolConfig, reactor: Any, inherited: Any = None, reuse_port: bool = False,
                 reply_budget: Any = None) -> None:
        self.setName(config.name)
        # --workers: a unix socket made before the fork, or TCP shared with SO_REUSEPORT.
        self._inherited = inherited
        self._reuse_port = reuse_port
        self._reactor = reactor
        self.runtime = PoolRuntime(config, reactor)
        self.runtime.factory.reply_budget = reply_budget  # the process's ReplyBudget (tap.build), or None
        self.port: Any = None
        # Listeners given up by a moved ``listen``, until they have stopped.
        self._old_ports: List[Any] = []
        # The new listener of a moved ``listen``, between prepare and apply.
        self._prepared: Any = None

    # -- views the stats, metrics and tests read ------------------------------

    @property
    def config(self) -> PoolConfig:
        return self.runtime.config

    @property
    def pool(self) -> Any:
        return self.runtime.pool

    @property
    def codec(self) -> Any:
        return self.runtime.codec

    @property
    def factory(self) -> Any:
        return self.runtime.factory

    @property
    def subscribers(self) -> Any:
        """The pool's pub/sub SubscriberHub (None for memcached)."""
        return self.runtime.subscribers

    @property
    def links(self) -> List[ServerLink]:
        """The links of the servers in the pool now (a removed server's is gone)."""
        return self.runtime.links

    @property
    def address(self) -> Any:
        """The bound address (host and port, or the socket path)."""
        return self.port.getHost() if self.port is not None else None

    @property
    def bound(self) -> Optional[str]:
        """The bound address as text (``host:port`` or the path), or None when not listening."""
        return bound_address(self.port) if self.port is not None else None

    # -- lifetime -------------------------------------------------------------

    def privilegedStartService(self) -> None:
        if self.port is None:
            self.listen()
        super().privilegedStartService()

    def startService(self) -> None:
        if self.port is None:
            self.listen()
        super().startService()
        self.runtime.start()
        config = self.config
        if config.preconnect:
            for link in self.links:
                link.preconnect(self.codec.default_dialect)
        scanners = "C" if compiled.speedups is not None else "pure Python"
        self._log.info("pool {pool} ({protocol}) listening on {listen} with {count} servers (scanners: {scanners})",
                       pool=self.name, protocol=config.protocol, listen=self.bound or str(config.listen),
                       count=len(self.links), scanners=scanners)

    def listen(self) -> None:
        """Open the pool's listener now; :class:`~twinproxy.listeners.ListenError` if it cannot be."""
        config = self.config
        self.port = listen_pool(self._reactor, config.name, config.listen, self.factory, config.backlog,
                                self._inherited, self._reuse_port)

    def stopService(self) -> defer.Deferred:
        """Stop accepting; let clients get the replies to what they sent, up to
        ``shutdown_timeout``; then close clients and backend connections."""
        super().stopService()
        reactor = self._reactor
        listening = self.stop_listening()
        drained = self.factory.drain()
        deadline = reactor.callLater(self.config.shutdown_timeout / 1000.0, self._give_up, drained)

        def close_backends(_: Any) -> defer.Deferred:
            if deadline.active():
                deadline.cancel()
            return self.runtime.stop()

        drained.addCallback(close_backends)
        return defer.gatherResults([listening, drained])

    def stop_listening(self) -> defer.Deferred:
        """Close every listener of the pool (clients stay); fires once they are closed."""
        ports, self._old_ports = [self.port, *self._old_ports], []
        self.port = None
        self._close_inherited()
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports if p is not None])

    def _close_inherited(self) -> None:
        # --workers: this process's copy of the socket made before the fork.
        # Left open, it would go on queueing connections nobody accepts.
        inherited, self._inherited = self._inherited, None
        if inherited is not None:
            inherited.close()

    def _give_up(self, drained: defer.Deferred) -> None:
        if not drained.called:
            self._log.warn("pool {pool}: {count} clients still waiting for replies after shutdown_timeout; "
                           "closing them", pool=self.name, count=len(self.factory.clients))
            for client in list(self.factory.clients):
                client.abort()
            if not drained.called:
                drained.callback(None)

    # -- change ---------------------------------------------------------------

    def prepare(self, diff: PoolDiff) -> Callable[[], List[str]]:
        """What may fail first: open the new listener if ``listen`` moved.

        Returns the commit (apply the diff, close the old listener), which
        cannot fail; raises ListenError with nothing changed.  Call
        :meth:`abort_prepared` instead of the commit to undo.
        """
        self._prepared = None
        if diff.listen_changed and self.port is not None:
            self._prepared = listen_pool(self._reactor, diff.new.name, diff.new.listen, self.factory,
                                         diff.new.backlog, None, self._reuse_port)
        return lambda: self.apply(diff)

    def abort_prepared(self) -> None:
        port, self._prepared = self._prepared, None
        if port is not None:
            port.stopListening()

    def apply(self, diff: PoolDiff) -> List[str]:
        """Move the pool to ``diff.new``.  Clients connected through an old
        listener keep their connections: only accepting moves."""
        changes = self.runtime.apply(diff)
        if self.running and diff.new.preconnect:
            for link in self.links:   # new servers, replaced connections, preconnect switched on
                link.preconnect(self.codec.default_dialect)
        new_port, self._prepared = self._prepared, None
        if new_port is not None:
            old, self.port = self.port, new_port
            self._close_inherited()
            self._old_ports.append(old)
            stopped = defer.maybeDeferred(old.stopListening)
            stopped.addBoth(lambda _: self._old_ports.remove(old) if old in self._old_ports else None)
            self._log.info("pool {pool}: now listening on {listen}", pool=self.name, listen=self.bound)
        return changes
