"""A client's session: the state a codec reads and changes, apart from the connection's I/O.

Owns :class:`ClientSession`, the half of
:class:`~twinproxy.frontend.FrontendProtocol` that implements the codecs'
:class:`~twinproxy.protocols.Session`: who the client is (id, name, login),
what it speaks (RESP version, database: together its connection
*profile*, copied onto each of its requests with one store), how it wants
its replies (CLIENT REPLY), what RESET clears, and the views CLIENT
LIST/KILL need of it and of its pool's other clients.  The frontend keeps
the I/O: parsing, ordering, writing.

Hooks for the families that give a session more state (MULTI, WATCH,
subscriptions):

- ``reset_hooks``: callables run, in order, by :meth:`ClientSession.reset`
  (RESET), after the session is back to db 0, RESP2, no name and replies
  on.  A family appends one when it first gives this session state, and
  clears that state in it (discard the queue, release a pinned
  connection, unsubscribe).
- ``subscriptions``, ``pattern_subscriptions`` and ``shard_subscriptions``
  are what CLIENT LIST shows (``sub``, ``psub``, ``ssub``); class-level
  defaults, so they cost nothing until a family sets them.  (MULTI and
  WATCH end on RESET in the codec: ``RedisCodec._reset``.)

**CLIENT REPLY without a per-request cost.**  Replies leave in request
order, so a reply mode change takes effect at a position in that order:
the OFF/ON/SKIP (or RESET) request is marked (``_reply_marks``), and while
any mark or a mode other than ON is pending the frontend's ``_flush`` is
shadowed by :meth:`ClientSession._flush_replies`, which walks the replies
ready at the head of the order, applies the marks as it meets them, and
blanks the replies Redis would not send before the normal flush writes
what is left.  A muted request keeps its place in the order (and counts
against ``client_max_pending``); the client's requests and the backends'
FIFOs are untouched, so nothing can desynchronise.  With no mode change
pending, ``_flush`` is the frontend's own: the plain path pays nothing.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Tuple

from twinproxy.protocols import REPLY_OFF, REPLY_ON, REPLY_SKIP
from twinproxy.protocols.redis_pubsub import CHANNEL, PATTERN, SHARD
from twinproxy.request import Request, profile_of
from twinproxy.sockets import receive_idle_ms


class ClientSession:
    """The session state of one client connection (mixed into FrontendProtocol).

    Relies on the frontend's ``factory`` (``requires_auth``, ``clients``,
    ``clock``), ``transport``, ``_codec``, ``_in_order``, ``_output``,
    ``_flush``, ``_router``, ``_pool`` and ``watch_pin``;
    :meth:`_start_session` runs in its ``__init__``.
    """

    pubsub: Any = None      # the client's subscriptions (twinproxy.subscriber), once it subscribed

    # What CLIENT LIST shows as sub, psub and ssub.
    @property
    def subscriptions(self) -> int:
        return len(self.pubsub.names[CHANNEL]) if self.pubsub is not None else 0

    @property
    def pattern_subscriptions(self) -> int:
        return len(self.pubsub.names[PATTERN]) if self.pubsub is not None else 0

    @property
    def shard_subscriptions(self) -> int:
        return len(self.pubsub.names[SHARD]) if self.pubsub is not None else 0

    def _start_session(self, factory: Any, client_id: int, dialect: int) -> None:
        self.client_id = client_id
        self._default_dialect = dialect
        self.dialect = dialect
        self.db = 0
        self.profile = profile_of(dialect)
        self.authenticated = not factory.requires_auth
        self.client_name: Optional[bytes] = None
        self.last_command = "NULL"    # Redis's cmd for a client that has sent nothing yet
        clock = factory.clock
        self._connected_at = clock.seconds() if clock is not None else 0.0
        self.reset_hooks: List[Any] = []
        self._reply_marks: Dict[Request, int] = {}
        self._reply_state = REPLY_ON   # the mode in effect at the head of the reply order

    # -- what the codec changes -------------------------------------------------

    @property
    def in_cluster(self) -> bool:
        """The pool routes by a cluster's slots now (it may have joined one since this client connected)."""
        return self._pool.slots is not None

    def use(self, dialect: int, db: int) -> None:
        """Speak ``dialect`` in database ``db``: the requests from the next on go to that profile's connections."""
        self.dialect = dialect
        self.db = db
        self.profile = profile_of(dialect, db)

    def reset(self, request: Request) -> None:
        """RESET: database 0, RESP2, no name, replies on, AUTH again on a password pool; then the hooks."""
        self.use(self._default_dialect, 0)
        self.client_name = None
        self.authenticated = not self.factory.requires_auth
        self.set_reply_mode(request, REPLY_ON)
        for hook in list(self.reset_hooks):
            hook()

    def drop_watch(self) -> None:
        """RESET into another profile: the WATCH's connection (of the old one) leaves the routing now.

        Its requests already sent are answered, then it closes, which ends
        the WATCH on the server; the client's next requests go by its new
        profile, which the pinned connection does not serve.
        """
        pin, self.watch_pin = self.watch_pin, None
        if pin is not None:
            self._router = self._pool
            pin.server.link.retire_lease(pin.connection)

    def set_reply_mode(self, request: Request, mode: int) -> None:
        """From ``request`` on (in reply order) replies follow ``mode``; see the module docstring."""
        if mode == REPLY_ON and not self._reply_marks and self._reply_state == REPLY_ON:
            return   # on already, and nothing pending would change it
        self._reply_marks[request] = mode
        self._flush = self._flush_replies   # shadows the frontend's method until the marks are met

    def _flush_replies(self) -> None:
        """The frontend's flush, after muting what CLIENT REPLY says must not be sent."""
        marks = self._reply_marks
        state = self._reply_state
        codec = self._codec
        for head in self._in_order:
            reply = head.reply
            if reply is None:
                break   # the frontend's flush stops here too: the rest is walked next time
            mark = marks.pop(head, None)
            if mark is None:
                muted = state != REPLY_ON
                if state == REPLY_SKIP:
                    state = REPLY_ON
            elif mark == REPLY_ON:
                muted = False
                state = REPLY_ON
            else:   # OFF and SKIP are never answered themselves; SKIP does nothing while OFF
                muted = True
                if mark == REPLY_OFF or state != REPLY_OFF:
                    state = mark
            if muted and reply:
                if head.counted is not None and codec.is_error(reply):
                    head.counted.errors += 1   # the frontend counts what it sends; this is not sent
                head.reply = b""
        self._reply_state = state
        if not marks and state == REPLY_ON:
            del self._flush   # the frontend's own from now on
        type(self)._flush(self)

    # -- what CLIENT LIST and KILL see ------------------------------------------

    def peers(self) -> Iterable["ClientSession"]:
        return self.factory.clients

    def kill(self) -> None:
        if self.closed or self.transport is None:
            return
        self._in_order.clear()
        self._out.clear()
        self._closing = self._halted = True   # dispatch stops too (see FrontendProtocol._halted)
        self._finish()

    def addresses(self) -> Tuple[str, str, bool]:
        transport = self.transport
        if transport is None:
            return "", "", False
        host = transport.getHost()
        if getattr(host, "host", None) is None:
            # A unix socket: Redis names both ends by the socket's path, port 0.
            name = getattr(host, "name", None) or b""
            path = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
            return f"{path}:0", f"{path}:0", True
        return _address(transport.getPeer()), _address(host), False

    def facts(self) -> Tuple[int, int, int, int]:
        transport = self.transport
        sock = getattr(transport, "socket", None)
        try:
            fd = sock.fileno() if sock is not None else -1
        except OSError:
            fd = -1
        clock = self.factory.clock
        age = int(clock.seconds() - self._connected_at) if clock is not None else 0
        # The kernel knows when the socket last received data: no clock read per request.
        idle_ms = receive_idle_ms(sock)
        idle = min(age, idle_ms // 1000) if idle_ms is not None else 0
        output = self._output
        return fd, age, idle, output.queued if output is not None else 0


def _address(address: Any) -> str:
    host = getattr(address, "host", "")
    return f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}"
