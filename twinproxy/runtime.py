"""One pool's live state, changed only by applying a diff.

Owns: :class:`PoolRuntime` — the pool's current config, its codec, its
:class:`~twinproxy.pool.ServerPool` (routing and health), one
:class:`~twinproxy.links.ServerLink` per server keyed by name, the
frontends' :class:`~twinproxy.frontend.Outbox` and the client factory —
and :meth:`PoolRuntime.apply`, which moves all of them to a new config.
Listening is the service's business; so is the reactor it was given.

How a change reaches running traffic:

- the ring (servers, weights, names, hash, hash tag, distribution) is
  one ``route`` function on the pool, replaced in one assignment: the
  next request routes by the new file, none is routed half-way;
- a server that stays keeps its link, counters and health; a new address
  under the same name retargets the link (old connections drain);
- a removed server's link drains: every request already sent on it gets
  its reply (or the pool's timeout passes), then its connections close;
- new settings reach new connections; a new handshake (``redis_auth``,
  ``redis_auth_user``, ``redis_db``) or slot count replaces the backend connections behind a
  barrier; clients keep the codec they were accepted with;
- in Sentinel mode each server is a shard
  (:class:`~twinproxy.sentinel.shards.SentinelShards`): its address comes
  from the sentinels, not the file, and a master switch is the shard's own
  change, applied between reloads.
"""

from __future__ import annotations

from typing import Any, Dict, List

from twisted.internet import defer
from twisted.logger import Logger

from twinproxy.config import PoolConfig
from twinproxy.factory import ProxyFactory
from twinproxy.links import ServerLink
from twinproxy.outbox import Outbox
from twinproxy.pool import Server, ServerPool
from twinproxy.protocols import codec_for
from twinproxy.request import Request
from twinproxy.sentinel.shards import SentinelShards
from twinproxy.subscriber import SubscriberHub
from twinproxy.topology import PoolDiff


class PoolRuntime:
    """Everything one pool routes with, as of its latest config."""

    _log = Logger()

    def __init__(self, config: PoolConfig, reactor: Any, outbox: Any = "turns") -> None:
        self.config = config
        self._reactor = reactor
        self.codec = codec_for(config)
        self.pool = ServerPool(config, reactor)
        self.pool.unavailable.send = self._no_live_server
        self.pool.reply_error = self._answer_error
        self._no_server_reply = self.codec.error_reply(f"no live server in pool '{config.name}'")
        # "turns": one write per reactor turn; None (unit tests): write at once.
        self.outbox = Outbox(reactor) if outbox == "turns" else outbox
        self._links: Dict[str, ServerLink] = {}
        # Redis pools: each client's pub/sub subscriber connections, following the topology.
        self.subscribers = SubscriberHub(self, reactor, self.outbox) if config.redis else None
        if self.subscribers is not None:
            self.pool.health_listeners.append(self.subscribers.health_changed)
        # Sentinel mode: each server is a shard whose master the sentinels place.
        self.sentinel = (SentinelShards(config, self.pool, reactor, self.outbox)
                         if config.sentinel_mode else None)
        for server in self.pool.servers:
            self._add_link(server)
        self.factory = ProxyFactory(self.pool, self.codec, config.client_connections,
                                    requires_auth=_requires_auth(config), outbox=self.outbox, clock=reactor)
        self.factory.subscribers = self.subscribers
        # Links of removed servers, still draining.
        self._retiring: Dict[ServerLink, defer.Deferred] = {}
        # Cluster mode: fires once what was in flight on newly held slots is answered.
        self._settling: List[defer.Deferred] = []

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def links(self) -> List[ServerLink]:
        """The current servers' links, in the config's order."""
        links = self._links
        return [links[server.name] for server in self.pool.servers]

    def link(self, name: str) -> ServerLink:
        return self._links[name]

    def _add_link(self, server: Server) -> ServerLink:
        if self.sentinel is not None:
            link = self.sentinel.add(server, self.codec, self.config)
        else:
            link = ServerLink(server, self.pool, self.codec, self.config, self._reactor)
            link.outbox = self.outbox
        if self.subscribers is not None:
            link.moved_listeners.append(self.subscribers.link_moved)
        self._links[server.name] = link
        return link

    def _answer_error(self, request: Request, text: str, code: str = "ERR") -> None:
        request.reply = self.codec.error_reply(text, code)
        request.owner.request_done(request)

    def _no_live_server(self, request: Request) -> None:
        self.pool.counters.forward_error += 1
        request.reply = self._no_server_reply
        request.owner.request_done(request)

    # -- change ---------------------------------------------------------------

    def apply(self, diff: PoolDiff) -> List[str]:
        """Move to ``diff.new``; return what changed, one line each.

        Runs in one reactor turn, so no request sees half of it.  The
        listen address is not touched here (see ``PoolService.apply``).
        """
        new = diff.new
        if diff.settings:
            self.codec = codec_for(new)
            self._no_server_reply = self.codec.error_reply(f"no live server in pool '{new.name}'")
        self.config = new
        switched = new.sentinel_mode != diff.old.sentinel_mode   # a cluster pool's sentinels added or removed
        if switched:
            self._leave_sentinel_mode_or_plain(new)
        for old_spec, new_spec in diff.renamed:
            self._links[new_spec.name] = self._links.pop(old_spec.name)
        if diff.renamed and self.subscribers is not None:
            self.subscribers.rename([(old_spec.name, new_spec.name) for old_spec, new_spec in diff.renamed])
        gone = self.pool.install(new, [(old_spec.name, new_spec.name) for old_spec, new_spec in diff.renamed])
        for server in self.pool.servers:
            if server.name not in self._links:
                self._add_link(server)
        if switched and self.sentinel is not None:
            self.sentinel.start()
        for old_spec, new_spec in diff.readdressed:
            if self.sentinel is not None:
                # A cluster's promote: the dashboard has the sentinels name the new
                # master; the shard holds its requests until it confirms it.
                self.sentinel.master_moved(old_spec.name, new_spec.address)
            else:
                self._links[old_spec.name].retarget()   # to its new server.spec
        if diff.settings:
            added = {spec.name for spec in diff.added}   # their links were made with the new settings
            if self.sentinel is not None:
                self.sentinel.reconfigure(self.codec, new, diff.handshake_changed, added)
            else:
                for server in self.pool.servers:
                    if server.name not in added:
                        self._links[server.name].reconfigure(self.codec, new, diff.handshake_changed)
            factory = self.factory
            factory.codec = self.codec
            factory.client_limit = new.client_connections
            factory.requires_auth = _requires_auth(new)
        for server in gone:
            self._retire(self._links.pop(server.name), server.name)
        if new.cluster_mode and not diff.old.cluster_mode:
            self._close_other_databases()
        if diff.old.slots is not new.slots and new.slots is not None:
            self._settle_held(diff.old.slots, new.slots)
        if self.pool.slots is not None:
            # Last: a released slot's requests must go to its owner's new address (a promote).
            self.pool.slots.release_held()
        if self.subscribers is not None:
            self.subscribers.recheck_soon()   # subscriptions follow their channels to their new servers
        return diff.describe()

    def _close_other_databases(self) -> None:
        """The pool just joined a cluster (adopted): a cluster serves database 0 only, so a client that
        SELECTed another one is closed (its next connection starts in database 0, where SELECT of another
        is refused) rather than have its keys moved into, or read from, database 0."""
        closing = [client for client in self.factory.clients if client.db != 0]
        for client in closing:
            client.kill()
        if closing:
            self._log.warn("pool {pool} joined cluster {cluster}: closed {count} client connection(s) that had "
                           "selected a database other than 0", pool=self.name, cluster=self.config.cluster,
                           count=len(closing))

    def _settle_held(self, old: Any, new: Any) -> None:
        """The barrier's second half: newly held slots are acknowledged only once
        every request already sent for them is answered.

        A server's connections cannot tell one slot's requests from another's,
        so each server owning a newly held slot settles whole (its other slots'
        requests wait behind the barrier a moment, in order).
        """
        newly = new.held - (old.held if old is not None else frozenset())
        names = {new.owners[slot] for slot in newly} - {None}
        # A slot held after migrating (a cancel's way back): its MIGRATEs still in
        # flight on the source must be answered first too.
        if old is not None:
            names |= {source for slot, source in old.migrating if slot in newly}
        for name in names:
            link = self._links.get(name)
            if link is not None:
                self._settling.append(link.settle())

    def settled(self) -> defer.Deferred:
        """Fires once every hold applied so far has drained its requests in flight.

        A hold stays pending until it has drained, so asking again (after a
        control-channel timeout) waits for it again rather than passing.
        """
        self._settling = [d for d in self._settling if not d.called]
        if not self._settling:
            return defer.succeed(None)
        return defer.gatherResults(list(self._settling))

    def _leave_sentinel_mode_or_plain(self, new: PoolConfig) -> None:
        """A cluster pool gains (or loses) sentinels: same servers, other followers.

        Every current link drains (what was sent is answered) and new ones are
        made for the new mode, so the pool keeps its listener and its clients.
        """
        old_links, old_shards = self._links, self.sentinel
        self._links = {}
        self.sentinel = SentinelShards(new, self.pool, self._reactor, self.outbox) if new.sentinel_mode else None
        for name, link in old_links.items():
            self._track_retiring(link, old_shards.remove(name) if old_shards is not None else link.drain())
        if old_shards is not None:
            old_shards.watcher.stop()

    def _retire(self, link: ServerLink, name: str) -> None:
        self._track_retiring(link, self.sentinel.remove(name) if self.sentinel is not None else link.drain())

    def _track_retiring(self, link: ServerLink, drained: defer.Deferred) -> None:
        if drained.called:
            return
        self._retiring[link] = drained

        def done(result: Any) -> Any:
            self._retiring.pop(link, None)
            return result

        drained.addBoth(done)

    @property
    def retiring_links(self) -> List[ServerLink]:
        """The links of removed servers whose connections are still answering (the dashboard's draining)."""
        return list(self._retiring)

    @property
    def retiring_count(self) -> int:
        """Removed servers whose connections are still answering."""
        return len(self._retiring)

    # -- start and stop -------------------------------------------------------

    def start(self) -> None:
        """Begin what runs on its own: following the sentinels, in Sentinel mode."""
        if self.sentinel is not None:
            self.sentinel.start()

    @property
    def healthy(self) -> bool:
        """Something to route to: a live server, and in Sentinel mode a confirmed master per shard."""
        if self.sentinel is not None:
            return self.sentinel.healthy
        return self.pool.healthy

    def stop(self) -> defer.Deferred:
        """Close every backend connection (the clients are gone): fires when all are closed."""
        self.pool.stop()
        if self.subscribers is not None:
            self.subscribers.stop()
        if self.sentinel is not None:
            closing = [self.sentinel.stop()]
            closing += [link.stop() for link in self._retiring]
        else:
            closing = [link.stop() for link in (*self._links.values(), *self._retiring)]
        return defer.gatherResults(closing)


def _requires_auth(config: PoolConfig) -> bool:
    return bool(config.redis and config.redis_auth)
