"""A client's traffic to one server pinned to a connection of its own (WATCH).

Owns :class:`Pin` (the leased connection a WATCHing client uses for every
request to that server, until the EXEC, DISCARD or UNWATCH that ends the
WATCH is answered) and :class:`PinnedRouter` (the pool's routing, with that
server replaced by the pin, which the frontend uses while a pin stands).

WATCH state lives on a server connection: sent on a shared one it would
make another client's EXEC fail, and a client's ``WATCH k; GET k`` on two
connections could read a value the WATCH never saw.  So a WATCH leases a
connection (``ServerLink.lease``, capped per server) and everything the
client sends to that server goes down it, in order.  The pin is released
only once the request that ends the WATCH is answered, so nothing the
client sends after EXEC can overtake it on another socket; a connection
given back is clean (EXEC, DISCARD and UNWATCH all unwatch), and one whose
client went away is closed.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

from twinproxy.protocols.resp import encode_command
from twinproxy.request import Request

_UNWATCH = encode_command([b"UNWATCH"])


class Pin:
    """One client's leased connection to one server."""

    def __init__(self, session: Any, server: Any, connection: Any, answer_error: Any) -> None:
        self.session = session
        self.server = server
        self.name = server.name
        self.connection = connection
        self._answer_error = answer_error
        self.epoch = 0            # WATCHes sent on it: a release ends the pin only if none came after it
        # The WATCH ended but requests sent after its end are still unanswered on the connection:
        # the pin stands (so nothing overtakes them on another socket) until one comes back last.
        self.ended = False

    def send(self, request: Request) -> None:
        connection = self.connection
        if connection.closed or connection.draining:
            # The link retired it (reload, failover, a slot hold): the WATCH is gone with it.
            self._answer_error(request, "the connection of this client's WATCH was closed by a topology "
                                        "change; WATCH again and retry the transaction")
            return
        if self.ended:
            request.owner = _Release(self, request.owner, self.epoch)
        connection.send(request)

    def watched(self) -> None:
        """A WATCH goes out on this pin: releases sent before it no longer end the pin."""
        self.epoch += 1
        self.ended = False

    def end(self, request: Request) -> None:
        """Send the request that ends the WATCH (EXEC, UNWATCH); unpin on its reply."""
        request.owner = _Release(self, request.owner, self.epoch)
        self.send(request)

    def end_quietly(self) -> None:
        """End the WATCH with an UNWATCH of the proxy's own (the client's EXEC or DISCARD was answered here)."""
        request = Request(_UNWATCH)
        request.client = self.session
        request.profile = self.connection.profile
        request.owner = _Release(self, _QUIET, self.epoch)
        self.send(request)


class _Quiet:
    """Takes the replies of the proxy's own UNWATCHes."""

    def request_done(self, request: Request) -> None:
        pass


_QUIET = _Quiet()


class _Release:
    """The owner of a WATCH-ending request: unpins, then hands the reply to the client."""

    __slots__ = ("pin", "owner", "epoch")

    def __init__(self, pin: Pin, owner: Any, epoch: int) -> None:
        self.pin = pin
        self.owner = owner
        self.epoch = epoch

    def request_done(self, request: Request) -> None:
        request.owner = self.owner
        pin = self.pin
        if pin.epoch == self.epoch:
            if pin.connection.pending:
                pin.ended = True
            else:
                pin.session.unpin(pin)
        self.owner.request_done(request)

    def completion_failed(self, request: Request) -> None:
        request.owner = self.owner
        self.owner.completion_failed(request)


class _Ending:
    """The target a codec routes a WATCH-ending request to: the pin, releasing it after the reply."""

    __slots__ = ("pin", "name")

    def __init__(self, pin: Pin) -> None:
        self.pin = pin
        self.name = pin.name

    def send(self, request: Request) -> None:
        self.pin.end(request)


class PinnedRouter:
    """The pool's routing with the pinned server replaced by its pin."""

    def __init__(self, pool: Any, pin: Pin) -> None:
        self._pool = pool
        self.pinned = pin
        self.ending = _Ending(pin)
        self.slot_of = pool.slot_of
        server = pin.server

        def route(key: bytes) -> Any:
            target = pool.route(key)     # looked up each time: a reload installs a new one
            return pin if target is server else target

        self.route = route
        self.server_for_key = route

    def servers_for_keys(self, keys: Sequence[bytes]) -> List[Any]:
        server = self.pinned.server
        pin = self.pinned
        return [pin if target is server else target for target in self._pool.servers_for_keys(keys)]

    @property
    def live_servers(self) -> Sequence[Any]:
        server = self.pinned.server
        return [self.pinned if target is server else target for target in self._pool.live_servers]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


class PinningClient:
    """The frontend's half of WATCH (a mixin of :class:`~twinproxy.frontend.FrontendProtocol`):
    ``watch_pin`` and the router that sends the pinned server's requests to it."""

    def pin(self, server: Any) -> Optional[Pin]:
        """Lease a connection to ``server`` and send this client's requests for it there; None at the cap."""
        link = getattr(server, "link", None)
        connection = link.lease(self.profile) if link is not None else None
        if connection is None:
            return None
        pin = Pin(self, server, connection, self._pool._reply_error)
        self.watch_pin = pin
        self._router = PinnedRouter(self._pool, pin)
        return pin

    def unpin(self, pin: Pin) -> None:
        """The request that ended ``pin``'s WATCH is answered: give its connection back."""
        if self.watch_pin is pin:
            self.watch_pin = None
            self._router = self._pool
            pin.server.link.release(pin.connection)

    def end_watch(self) -> None:
        """The codec answered what ends a WATCH itself (DISCARD, an aborted EXEC): unwatch on the pin."""
        if self.watch_pin is not None:
            self.watch_pin.end_quietly()
