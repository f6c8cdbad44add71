"""The pool's client connections as a whole: the cap, the ids, the drain.

Owns :class:`ProxyFactory` — it builds one
:class:`~twinproxy.frontend.FrontendProtocol` per client of a pool,
refuses clients past ``client_connections`` (Redis's words, then it hangs
up), numbers them (the id a client's requests keep their connections by)
and, when the pool stops, lets every client finish what it sent.  What one
client does is :mod:`twinproxy.frontend`'s.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from twinproxy.frontend import FrontendProtocol
from twinproxy.outbox import Outbox
from twinproxy.protocols import Codec
from twinproxy.replybudget import ReplyBudget


class _Refused(Protocol):
    """Says why and hangs up: the pool is at ``client_connections``."""

    def __init__(self, message: bytes) -> None:
        self._message = message

    def connectionMade(self) -> None:
        self.transport.write(self._message)
        self.transport.loseConnection()


class ProxyFactory(Factory):
    """Builds one FrontendProtocol per client of a pool."""

    _log = Logger()
    noisy = False

    def __init__(self, pool: Any, codec: Codec, client_limit: int = 0, requires_auth: bool = False,
                 outbox: Optional["Outbox"] = None, clock: Any = None,
                 reply_budget: Optional[ReplyBudget] = None) -> None:
        self.pool = pool
        self.clock = clock  # for the linger after a protocol error; without one, errors close at once
        self.reply_budget = reply_budget  # the process's, shared by every pool; None: no process-wide limit
        self.outbox = outbox
        self.codec = codec
        self.client_limit = client_limit
        self.requires_auth = requires_auth
        # The pool's twinproxy.subscriber.SubscriberHub (Redis pools), set by the runtime.
        self.subscribers: Any = None
        self.clients: set = set()
        self._empty_waiters: list = []
        self._next_id = 0
        self._warned_full = False

    def buildProtocol(self, addr: Any) -> Protocol:
        if self.client_limit and len(self.clients) >= self.client_limit:
            if not self._warned_full:
                self._log.warn("pool {pool}: client_connections limit of {limit} reached; refusing clients",
                               pool=self.pool.name, limit=self.client_limit)
                self._warned_full = True
            return _Refused(self.codec.error_reply("max number of clients reached"))
        self._warned_full = False
        self._next_id += 1
        self.pool.counters.clients_accepted += 1
        protocol = FrontendProtocol(self, self._next_id)
        self.clients.add(protocol)
        return protocol

    def client_gone(self, protocol: FrontendProtocol) -> None:
        self.clients.discard(protocol)
        if not self.clients:
            waiters, self._empty_waiters = self._empty_waiters, []
            for waiter in waiters:
                if not waiter.called:  # the shutdown deadline may have fired it already
                    waiter.callback(None)

    def drain(self) -> defer.Deferred:
        """Let every client finish what it sent, then close it; fires when all are gone."""
        if not self.clients:
            return defer.succeed(None)
        waiter = defer.Deferred()
        self._empty_waiters.append(waiter)
        for client in list(self.clients):
            client.drain()
        return waiter
