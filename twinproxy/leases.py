"""Connections a server lends to one client each, apart from the shared ones.

Owns :class:`Leases`, one server's leased connections:

- :meth:`Leases.lease` — a connection for one client session alone: an
  idle one of the same profile if there is one, else a new one opened with
  the same handshake as the profile's shared connections; None at the cap
  (``server_leased_connections`` per server, idle ones included), when the
  server is leaving the pool, or before it has an address;
- :meth:`Leases.release` — a clean connection (nothing pending, no session
  state left on it) goes back to a small idle list, so a client that leases
  again and again (a worker's BLPOP loop, a WATCH per transaction) reuses
  one TCP connection rather than opening one each time;
- :meth:`Leases.discard` — closed: whatever state its session left on the
  server (a WATCH, a blocked pop) dies with it; :meth:`Leases.retire` —
  closed once what it was sent is answered (a RESET into another profile);
- :meth:`Leases.lend` — one request run alone on a leased connection, which
  goes back after the reply (closed instead if its client has gone, or if it
  failed).  A request whose profile carries :data:`~twinproxy.request.LEASED`
  (a blocking command) comes here from :meth:`ServerLink.send`, however it
  was routed: a held or migrating slot, a Sentinel shard's hold.

WATCH pins (:mod:`twinproxy.pinning`) hold one lease for many requests;
blocking commands are lent one each.  The link retires, aborts and closes
leased connections with its shared ones (reload, retarget, master switch,
drain, stop).  Never routes, never parses.
"""

from __future__ import annotations

from typing import Any, List, Optional, Set

from twisted.logger import Logger

from twinproxy.request import Request, shared_profile
from twinproxy.stats import Histogram

# Idle connections kept per server for reuse, as a share of the cap (at least IDLE_LEAST).
IDLE_SHARE = 4
IDLE_LEAST = 4


class Leases:
    """One server's leased connections: in use, and idle for the next lease."""

    _log = Logger()

    def __init__(self, link: Any) -> None:
        self._link = link
        self._in_use: Set[Any] = set()
        self._idle: List[Any] = []       # oldest first
        self.refused = 0                 # leases refused (the cap, a server leaving the pool)
        # Lent connections' replies are timed here, not in the server's latency: a blocking
        # command's time is the wait for a key (its command's latency still counts it).
        self.waits = Histogram()
        self.limit = 0
        self._idle_limit = 0

    def configure(self, limit: int) -> None:
        self.limit = limit
        self._idle_limit = min(limit, max(IDLE_LEAST, limit // IDLE_SHARE))

    # -- lending ----------------------------------------------------------------

    def lease(self, profile: int) -> Optional[Any]:
        """A connection for one session alone, or None (counted in ``refused``; :meth:`refusal` says why)."""
        idle = self._idle
        for index in range(len(idle) - 1, -1, -1):
            connection = idle[index]
            if connection.profile == profile and not connection.closed:
                del idle[index]
                self._in_use.add(connection)
                return connection
        link = self._link
        if link.stopped or link.target is None:
            self.refused += 1
            return None
        if len(self._in_use) + len(idle) >= self.limit:
            if not idle:
                self.refused += 1
                return None
            idle.pop(0).close()   # an idle one of another profile makes room
        connection = link.open_leased(profile)
        self._in_use.add(connection)
        return connection

    def refusal(self, what: str) -> str:
        """Why :meth:`lease` gives nothing now, for ``what`` (``"BLPOP"``, ``"WATCH"``): the error's text."""
        link = self._link
        name = link.server.name
        if link.stopped:
            return f"no connection to lend for {what}: server {name} is leaving the pool"
        if link.target is None:
            return f"no connection to lend for {what}: server {name} has no known address yet"
        return (f"no connection to lend for {what} on server {name}: server_leased_connections "
                f"({self.limit}) are all in use")

    def release(self, connection: Any) -> None:
        """``connection`` is clean: keep it for the next lease (the oldest idle one goes past the idle limit)."""
        if (connection not in self._in_use or connection.closed or connection.draining or connection.pending
                or self._link.stopped):
            self.discard(connection)
            return
        self._in_use.discard(connection)
        idle = self._idle
        idle.append(connection)
        if len(idle) > self._idle_limit:
            idle.pop(0).close()

    def discard(self, connection: Any) -> None:
        """Close a leased connection: its session state dies with it."""
        self.forget(connection)
        if not connection.closed:
            connection.close()

    def retire(self, connection: Any, seconds: float) -> None:
        """Close a leased connection once what it was sent is answered (or after ``seconds``).

        It stays counted until it is gone; it is never lent again.
        """
        if connection in self._idle:
            self._idle.remove(connection)
            self._in_use.add(connection)
        connection.drain(seconds)

    def forget(self, connection: Any) -> None:
        """``connection`` is closed or closing: it is no longer lent nor idle."""
        self._in_use.discard(connection)
        if connection in self._idle:
            self._idle.remove(connection)

    def lend(self, request: Request) -> None:
        """Run ``request`` alone on a leased connection, which goes back after its reply."""
        owner = request.owner
        if owner.__class__ is _Lent:
            # Sent again (a Sentinel retry after -READONLY): its first connection goes back first.
            owner.give_back(request)
            owner = request.owner = owner.owner
        client = request.client
        if client is not None and getattr(client, "closed", False):
            # The client went away while the request waited (a held slot, a failover hold):
            # nobody would read what it pops.
            self._answer(request, "the client closed its connection before the command ran")
            return
        connection = self.lease(shared_profile(request.profile))
        if connection is None:
            self._answer(request, self.refusal(request.name.upper()))
            return
        self._link.pool.counters.blocking_commands += 1
        connection.time_replies_in(self.waits)
        request.owner = _Lent(self, connection, owner)
        connection.send(request)

    def _answer(self, request: Request, text: str) -> None:
        request.reply = self._link.codec.error_reply(text)
        try:
            request.owner.request_done(request)
        except Exception:  # noqa: BLE001 - one request's bug must not stop the caller
            self._log.failure("pool {pool}: server {server}: answering a request failed",
                              pool=self._link.pool.name, server=self._link.server.name)

    # -- the link's views and changes -----------------------------------------------

    def in_use(self) -> List[Any]:
        return list(self._in_use)

    def connections(self) -> List[Any]:
        """Every leased connection, in use or idle."""
        return [*self._in_use, *self._idle]

    def close_idle(self) -> None:
        """Close the idle ones (a retarget, new settings, a drain: they are for the old state)."""
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    @property
    def in_use_count(self) -> int:
        return len(self._in_use)

    @property
    def idle_count(self) -> int:
        return len(self._idle)


class _Lent:
    """The owner of a request on a connection lent for it alone: gives the connection back, then the reply."""

    __slots__ = ("leases", "connection", "owner")

    def __init__(self, leases: Leases, connection: Any, owner: Any) -> None:
        self.leases = leases
        self.connection = connection
        self.owner = owner

    def request_done(self, request: Request) -> None:
        request.owner = self.owner
        self.give_back(request)
        self.owner.request_done(request)

    def give_back(self, request: Request) -> None:
        """Back to the idle list after a reply; closed if it failed or the client has gone."""
        connection = self.connection
        connection.time_replies_in(None)
        client = request.client
        if client is not None and getattr(client, "closed", False):
            self.leases.discard(connection)
        else:
            self.leases.release(connection)

    def abandon(self) -> None:
        """The client has gone while the server holds the command: close the connection (never reused,
        or what the command pops would be handed to nobody)."""
        self.leases.discard(self.connection)
