"""One write per client and per server connection per turn of the reactor.

Owns: :class:`Outbox`, shared by a pool's clients and backend connections:
whoever has bytes queued registers once, and everything is written right
after the turn's events are handled.
"""

from __future__ import annotations

from typing import Any


class Outbox:
    """Clients and server connections with bytes queued, written once per reactor turn.

    One server read can answer many clients, and many requests of one
    pipelining client; one turn of the reactor can read requests from many
    clients for the same server connection.  Each of them then gets one
    write for all of it, right after the turn's events are handled (a
    zero-delay call runs before the reactor polls again), instead of one
    write per request or reply.  Without a clock (unit tests), ``burst_done``
    writes at once: at the end of each read or failure.
    """

    __slots__ = ("_clients", "_servers", "_clock", "_call")

    def __init__(self, clock: Any = None) -> None:
        self._clients: list = []
        self._servers: list = []
        self._clock = clock
        self._call: Any = None

    def add(self, client: Any) -> None:
        self._clients.append(client)
        if self._call is None and self._clock is not None:
            self._call = self._clock.callLater(0, self.flush)

    def add_server(self, connection: Any) -> None:
        """A backend connection with requests queued: likewise one write per turn."""
        self._servers.append(connection)
        if self._call is None and self._clock is not None:
            self._call = self._clock.callLater(0, self.flush)

    def burst_done(self) -> None:
        """A read or a failure has queued what it will: without a clock, write it now."""
        if self._clock is None:
            self.flush()

    def flush(self) -> None:
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
        servers = self._servers
        if servers:
            self._servers = []
            for connection in servers:
                connection.send_queued()
        clients = self._clients
        if clients:
            self._clients = []
            for client in clients:
                client.send_queued()
