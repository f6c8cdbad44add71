"""Pub/sub: each client's subscriptions and its subscriber connections, apart from the shared FIFO.

Owns: :class:`SubscriberHub` (one per Redis pool: where a channel's
subscribers live, the per-server cap ``server_subscriber_connections``, the
counters, and what a topology change does to subscriptions) and
:class:`ClientSubscriptions` (one per client that subscribed: its
channels, patterns and shard channels in subscription order, its acks, its
connections, each a
:class:`~twinproxy.subscriber_connection.SubscriberConnection`).  The wire
rules are :mod:`twinproxy.protocols.redis_pubsub`'s.

::

    SUBSCRIBE a b --> ClientSubscriptions.handle: state and acks computed now (Redis's counts)
                      --> SubscriberConnection(server of a).send  \\  one per server, opened lazily
                      --> SubscriberConnection(server of b).send  /
    every server's acks in --> the client's reply (its own acks) is released, in request order
    message in --> client.push(frame): whole frames, after the replies due before them

A topology change (reload, ejection, a Sentinel switch, a slot table)
moves subscriptions where the channels now live: connections to a removed
or re-addressed server are closed and what they held is subscribed anew,
acks swallowed.  A subscriber connection that fails on its own (the server
died, a handshake error, no ack within ``timeout``) closes the client's
connection once what it was sent is answered: its library reconnects and
subscribes again, as it would with a Redis that went away.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Set, Tuple

from twisted.logger import Logger

from twinproxy.backend import ConnectorFactory
from twinproxy.protocols import resp
from twinproxy.protocols.redis_pubsub import (
    CHANNEL,
    COMMAND_WORDS,
    PATTERN,
    SHARD,
    SUBSCRIBED,
    SUBSCRIPTION_COMMANDS,
    ack,
    channel_key,
    in_dialect,
)
from twinproxy.request import Request
from twinproxy.subscriber_connection import SubscriberConnection

_KINDS = (CHANNEL, PATTERN, SHARD)


class Unroutable(Exception):
    """A channel has no server to subscribe on now; ``str()`` is the error text."""


class _Ack:
    """A client's pub/sub request waiting for its servers' acks; its reply is the proxy's own."""

    __slots__ = ("client", "request", "reply", "left")

    def __init__(self, client: Any, request: Request, reply: bytes, left: int) -> None:
        self.client = client
        self.request = request
        self.reply = reply
        self.left = left

    def arrived(self) -> None:
        self.left -= 1
        if self.left <= 0:
            self.answer(self.reply)

    def answer(self, reply: bytes) -> None:
        request = self.request
        if request.reply is None:
            request.reply = reply
            self.client.request_done(request)


class ClientSubscriptions:
    """One client's channels, patterns and shard channels, and its connection to each server holding some."""

    def __init__(self, hub: "SubscriberHub", client: Any) -> None:
        self.hub = hub
        self.client = client
        # name -> None, in subscription order (a bare UNSUBSCRIBE acks in that order).
        self.names: Tuple[Dict[bytes, None], Dict[bytes, None], Dict[bytes, None]] = ({}, {}, {})
        self.connections: Dict[str, SubscriberConnection] = {}
        self.failed = False

    @property
    def active(self) -> bool:
        return any(self.names)

    def count(self, what: int) -> int:
        """What Redis's acks count: channels and patterns together, shard channels apart."""
        names = self.names
        return len(names[SHARD]) if what == SHARD else len(names[CHANNEL]) + len(names[PATTERN])

    # -- the client's requests ------------------------------------------------

    def handle(self, request: Request) -> None:
        """SUBSCRIBE, PSUBSCRIBE, SSUBSCRIBE, UNSUBSCRIBE, PUNSUBSCRIBE, SUNSUBSCRIBE: state now, reply once acked."""
        what, subscribing = SUBSCRIPTION_COMMANDS[request.args[0].lower()]
        if self.failed:
            self._answer(request, resp.error("ERR the subscriber connection failed; this connection closes"))
            return
        if subscribing:
            plan = self._subscribe(request, what)
        else:
            plan = self._unsubscribe(request, what)
        mode = SUBSCRIBED if self.active else None
        if mode is not self.client.mode:
            self.client.set_mode(mode)
        if plan is None:
            return
        reply, sends = plan
        waiter = _Ack(self.client, request, reply, len(sends))
        if not sends:
            waiter.answer(reply)
        for server, names in sends.items():
            self.connections[server].send(what, subscribing, names, waiter)

    def _subscribe(self, request: Request, what: int) -> Optional[Tuple[bytes, Dict[str, List[bytes]]]]:
        hub = self.hub
        held = self.names[what]
        placed: Dict[bytes, List[str]] = {}
        names = request.args[1:]
        try:
            for name in names:
                if name not in held and name not in placed:
                    placed[name] = hub.servers_of(what, name)
            needed = list(dict.fromkeys(server for servers in placed.values() for server in servers
                                        if server not in self.connections))
            hub.check_open(needed)
        except Unroutable as err:
            self._answer(request, resp.error(f"ERR {err}"))
            return None
        dialect = self.client.dialect
        for server in needed:
            self.connections[server] = hub.open(self, server, dialect)
        word = COMMAND_WORDS[what, True]
        sends: Dict[str, List[bytes]] = {}
        acks = []
        for name in names:
            servers = placed.pop(name, None)
            if servers is not None:
                held[name] = None
                for server in servers:
                    sends.setdefault(server, []).append(name)
            acks.append(ack(word, name, self.count(what), dialect))
        return b"".join(acks), sends

    def _unsubscribe(self, request: Request, what: int) -> Tuple[bytes, Dict[str, List[bytes]]]:
        held = self.names[what]
        word = COMMAND_WORDS[what, False]
        dialect = self.client.dialect
        names = request.args[1:] or list(held)
        if not names:   # nothing to drop: Redis acks once, with no name
            return ack(word, None, self.count(what), dialect), {}
        sends: Dict[str, List[bytes]] = {}
        acks = []
        for name in names:
            if name in held:
                del held[name]
                for server, connection in self.connections.items():
                    if name in connection.names[what]:
                        sends.setdefault(server, []).append(name)
            acks.append(ack(word, name, self.count(what), dialect))
        return b"".join(acks), sends

    def _answer(self, request: Request, reply: bytes) -> None:
        request.reply = reply
        self.client.request_done(request)

    # -- what the connections report --------------------------------------------

    def relay(self, connection: SubscriberConnection, frame: bytes) -> None:
        """A message for this client: written as a whole frame in its RESP version."""
        self.hub.messages += 1
        self.client.push(in_dialect(frame, self.client.dialect))

    def idle(self, connection: SubscriberConnection) -> None:
        """The server acked the last unsubscribe: the connection closes."""
        if self.connections.get(connection.server) is connection:
            del self.connections[connection.server]
        connection.close()

    def lost(self, connection: SubscriberConnection, text: str) -> None:
        """A connection failed on its own: the client's connection closes once answered (it subscribes anew)."""
        reply = resp.error(f"ERR subscriber connection to server '{connection.server}' failed: {text}")
        connection.fail_pending(reply)
        self.fail(reply)

    def fail(self, reply: bytes) -> None:
        if self.failed:
            return
        self.failed = True
        self.hub.lost += 1
        for connection in list(self.connections.values()):
            connection.fail_pending(reply)
            connection.close()
        self.connections.clear()
        self.client.close_when_answered()

    def close(self) -> None:
        """The client is gone: so are its subscriber connections."""
        for connection in list(self.connections.values()):
            connection.close()
        self.connections.clear()
        for held in self.names:
            held.clear()
        self.hub.sessions.discard(self)

    # -- topology changes -------------------------------------------------------

    def rehome(self) -> None:
        """Subscribe each name where it lives now; drop it where it no longer does (acks swallowed)."""
        if self.failed or (not self.active and not self.connections):
            return
        hub = self.hub
        for server, connection in list(self.connections.items()):
            link = hub.link(server)
            if link is not connection.link or link.target != connection.target:
                del self.connections[server]
                connection.close()
                connection.release_pending()
        wanted: Dict[str, Tuple[List[bytes], List[bytes], List[bytes]]] = {}
        for what in _KINDS:
            for name in self.names[what]:
                try:
                    servers = hub.servers_of(what, name)
                except Unroutable:
                    continue   # nowhere now: placed by a later change
                for server in servers:
                    wanted.setdefault(server, ([], [], []))[what].append(name)
        missing = [server for server in wanted if server not in self.connections]
        try:
            hub.check_open(missing)
        except Unroutable as err:
            hub.log_rehome_failure(str(err))
            self.fail(resp.error(f"ERR {err}"))
            return
        for server in missing:
            self.connections[server] = hub.open(self, server, self.client.dialect)
        nothing: Tuple[List[bytes], List[bytes], List[bytes]] = ([], [], [])
        for server, connection in list(self.connections.items()):
            names = wanted.get(server, nothing)
            for what in _KINDS:
                have = connection.names[what]
                keep = set(names[what])
                add = [name for name in names[what] if name not in have]
                drop = [name for name in have if name not in keep]
                if add:
                    connection.send(what, True, add, None)
                if drop:
                    connection.send(what, False, drop, None)
            if connection.idle:
                self.idle(connection)


class SubscriberHub:
    """A Redis pool's subscriber connections: placement, the per-server cap, counters, topology changes.

    ``runtime`` is the pool's :class:`~twinproxy.runtime.PoolRuntime` (its
    pool, codec, config and links as of now); ``reactor`` connects and times.
    """

    _log = Logger()

    def __init__(self, runtime: Any, reactor: Any, outbox: Any) -> None:
        self._runtime = runtime
        self._reactor = reactor
        self.outbox = outbox
        self.sessions: Set[ClientSubscriptions] = set()
        self._open: Dict[str, int] = {}   # server name -> subscriber connections open or opening
        self.messages = 0   # messages relayed to clients
        self.refused = 0    # subscriptions refused: a server's server_subscriber_connections reached
        self.lost = 0       # clients closed because a subscriber connection failed on its own
        self.opened = 0     # subscriber connections ever opened
        self._warned_full: Set[str] = set()
        self._recheck_call: Any = None

    def session(self, client: Any) -> ClientSubscriptions:
        subscriptions = ClientSubscriptions(self, client)
        self.sessions.add(subscriptions)
        return subscriptions

    # -- placement ------------------------------------------------------------

    def servers_of(self, what: int, name: bytes) -> List[str]:
        """The servers to subscribe ``name`` on: a channel's (or a shard channel's) own; patterns, every one."""
        key = name if what == SHARD else (channel_key(name) if what == CHANNEL else None)
        if key is None:
            servers = [server.name for server in self._runtime.pool.live_servers]
            if not servers:
                raise Unroutable(f"no live server in pool '{self._runtime.name}'")
            return servers
        return [self._server_of(key)]

    def _server_of(self, key: bytes) -> str:
        pool = self._runtime.pool
        if pool.slot_of is not None:
            # A cluster: the slot's owner (where a migrating slot's publishes go), never a stand-in.
            table = pool.config.slots
            if table is None:
                raise Unroutable(f"cluster '{pool.config.cluster}' not ready: its topology is not loaded yet")
            home = pool.slots.home_of(key) if pool.slots is not None else None
            if home is not None:
                return home   # an adopted pool's key still on the server the pool placed it on
            slot = pool.slot_of(key)
            owner = table.owners[slot]
            if owner is None:
                raise Unroutable(f"slot {slot} is offline in cluster '{pool.config.cluster}' (no group serves it)")
            return owner
        server = pool.route(key)
        if server is pool.unavailable:
            raise Unroutable(f"no live server in pool '{self._runtime.name}'")
        return server.name

    def link(self, server: str) -> Any:
        try:
            return self._runtime.link(server)
        except KeyError:
            return None

    # -- connections ----------------------------------------------------------

    def check_open(self, servers: List[str]) -> None:
        """Raise Unroutable unless one more subscriber connection may open to each of ``servers``."""
        limit = self._runtime.config.server_subscriber_connections
        for server in servers:
            link = self.link(server)
            if link is None or link.target is None:
                raise Unroutable(f"server '{server}' has no known address now (failover in progress?)")
            if limit and self._open.get(server, 0) >= limit:
                self.refused += 1
                if server not in self._warned_full:
                    self._warned_full.add(server)
                    self._log.warn("pool {pool}: server {server}: server_subscriber_connections limit of {limit} "
                                   "reached; refusing subscriptions", pool=self._runtime.name, server=server,
                                   limit=limit)
                raise Unroutable(f"max number of subscriber connections to server '{server}' reached "
                                 f"(server_subscriber_connections: {limit})")

    def open(self, session: ClientSubscriptions, server: str, dialect: int) -> SubscriberConnection:
        """A new subscriber connection to ``server`` in ``dialect`` (``check_open`` said it may)."""
        link = self.link(server)
        # The pool's handshake: AUTH, HELLO 3, the pool's database.  Channels are not per
        # database, so a client's SELECT changes nothing here.
        connection = SubscriberConnection(session, server, link, dialect, self._runtime.codec.handshake(dialect),
                                          self._reactor)
        self._open[server] = self._open.get(server, 0) + 1
        self.opened += 1
        target = link.target
        factory = ConnectorFactory(connection)
        timeout = link.timeout if link.timeout is not None else 30
        if target.path is not None:
            self._reactor.connectUNIX(target.path, factory, timeout=timeout)
        else:
            self._reactor.connectTCP(target.host, target.port, factory, timeout=timeout)
        return connection

    def gone(self, connection: SubscriberConnection) -> None:
        if connection.counted:
            connection.counted = False
            left = self._open.get(connection.server, 1) - 1
            if left > 0:
                self._open[connection.server] = left
            else:
                self._open.pop(connection.server, None)
            self._warned_full.discard(connection.server)

    def log_rehome_failure(self, text: str) -> None:
        self._log.warn("pool {pool}: a client's subscriptions could not follow a topology change ({reason}); "
                       "closing it", pool=self._runtime.name, reason=text)

    # -- topology ---------------------------------------------------------------

    def recheck(self) -> None:
        """The ring, a slot table or a server's address changed: subscriptions follow their channels.

        Called at the end of the change's turn (``recheck_soon``), once the
        ring, the links and the slot table all say where things are now.
        """
        call, self._recheck_call = self._recheck_call, None
        if call is not None and call.active():
            call.cancel()
        for session in list(self.sessions):
            session.rehome()

    def rename(self, names: List[Tuple[str, str]]) -> None:
        """Servers renamed in place, (old, new), their links kept (a pool joining a cluster: ``a`` is now
        ``shop-1``): their subscriber connections stay, under the new names.  Closing them would drop the
        messages they were reading, and miss every one published until their replacements subscribed."""
        opened = {old: self._open.pop(old) for old, _ in names if old in self._open}
        warned = {old for old, _ in names if old in self._warned_full}
        self._warned_full -= warned
        for old, new in names:
            if old in opened:
                self._open[new] = opened[old]
            if old in warned:
                self._warned_full.add(new)
        for session in self.sessions:
            moved = [(new, session.connections.pop(old)) for old, new in names if old in session.connections]
            for new, connection in moved:
                connection.server = new
                session.connections[new] = connection

    def recheck_soon(self) -> None:
        if self._recheck_call is None and self.sessions:
            self._recheck_call = self._reactor.callLater(0, self.recheck)

    def link_moved(self, link: Any) -> None:
        """A link's target changed (a reload's new address, a Sentinel master switch)."""
        self.recheck_soon()

    def health_changed(self, kind: str, pool: Any, server: Any) -> None:
        """A server was ejected or came back (told before the ring is rebuilt)."""
        self.recheck_soon()

    def stop(self) -> None:
        """The pool stops: every subscriber connection closes, and so does any client still holding one."""
        call, self._recheck_call = self._recheck_call, None
        if call is not None and call.active():
            call.cancel()
        for session in list(self.sessions):
            if session.connections:
                session.fail(resp.error("ERR the proxy is stopping"))
            session.close()

    # -- views ------------------------------------------------------------------

    @property
    def subscribers(self) -> int:
        """Clients subscribed to something now."""
        return sum(1 for session in self.sessions if session.active)

    @property
    def connection_count(self) -> int:
        return sum(self._open.values())
