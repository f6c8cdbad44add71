"""The seam between protocol-neutral machinery and one wire protocol.

Owns: the :class:`Codec` interface that the frontend and the backends call,
the parser/framer shapes it hands out, :class:`ProtocolError`, and the
registry of codecs by pool protocol.  Concrete protocols live in sibling
modules and never import the pool, the backends, the frontend or the
reactor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Protocol, Sequence, Tuple

if TYPE_CHECKING:
    from twinproxy.config import PoolConfig
    from twinproxy.request import Request


class ProtocolError(Exception):
    """Bytes that break the protocol; ``str()`` is the text the peer is told."""


class RequestParser(Protocol):
    def feed(self, data: bytes) -> None: ...

    def next(self) -> Optional["Request"]:
        """Return the next whole request, None until more bytes come; raise ProtocolError."""


class ReplyFramer(Protocol):
    def feed(self, data: bytes) -> None: ...

    def next(self) -> Optional[bytes]:
        """Return the next whole reply's bytes, None until more come; raise ProtocolError."""


# CLIENT REPLY's modes, as the codec tells the session (``set_reply_mode``).
REPLY_ON = 0
REPLY_OFF = 1
REPLY_SKIP = 2


class Session(Protocol):
    """What a codec may read and change of the client connection it serves.

    The frontend implements it (:class:`~twinproxy.session.ClientSession`);
    codecs see nothing else of the client, its pool or its peers.
    """

    client_id: int
    authenticated: bool
    dialect: int                    # the RESP version its replies are encoded in (0: memcached)
    db: int                         # the database it SELECTed (0 until it does)
    profile: int                    # its connection profile: request.profile_of(dialect, db)
    client_name: Optional[bytes]
    # The codec's ``prepare`` for this session's mode (a codec swaps it: MULTI queues).
    prepare: Callable[["Request", "Session"], None]
    transaction: Any     # a codec's state between MULTI and EXEC; None outside
    # pub/sub's SUBSCRIBED while the client holds a subscription, else None.
    mode: Optional[str]
    watch_pin: Any       # the connection a WATCH pinned (frontend.pin), or None
    last_command: str               # the name of the command it sent last (CLIENT LIST's cmd)
    # Set by the families that give a client such state (CLIENT LIST shows them).
    subscriptions: int
    pattern_subscriptions: int
    shard_subscriptions: int

    def end_watch(self) -> None:
        """Unwatch on the WATCH's pinned connection, if there is one, and give it back."""

    def drop_watch(self) -> None:
        """Stop routing to the WATCH's pinned connection now; it closes once answered (RESET)."""

    def use(self, dialect: int, db: int) -> None:
        """Speak ``dialect`` in database ``db`` from the next request on (HELLO, SELECT)."""

    def reset(self, request: "Request") -> None:
        """RESET: back to a fresh connection's state; ``request`` (the RESET) is answered normally."""

    def set_reply_mode(self, request: "Request", mode: int) -> None:
        """CLIENT REPLY: ``mode`` (REPLY_ON/OFF/SKIP) takes effect in reply order at ``request``."""

    def peers(self) -> Iterable["Session"]:
        """The sessions of every client of this pool in this process, this one included."""

    def kill(self) -> None:
        """CLIENT KILL of another client: close its connection now, unanswered requests and all."""

    def addresses(self) -> Tuple[str, str, bool]:
        """(its address, the address it connected to, over a unix socket), as Redis writes them."""

    def facts(self) -> Tuple[int, int, int, int]:
        """(file descriptor or -1, age in seconds, idle seconds, bytes of replies it has not read)."""


class Router(Protocol):
    """Where a codec's requests go: the pool, as protocols may see it.

    Servers are anything with ``send(request)`` and a ``name`` (a
    :class:`~twinproxy.pool.Server` also has ``up``: False after a failed
    connection, until one succeeds).
    """

    # The pool's configuration now (a reload replaces it; a client's codec may be older).
    config: "PoolConfig"
    # The pool's counters (stats.PoolCounters): the fan-out families count there.
    counters: Any
    # State codecs keep per pool, across reloads (which make new codecs): Redis's script bodies.
    codec_state: Dict[str, Any]

    def server_for_key(self, key: bytes) -> Any: ...

    def servers_for_keys(self, keys: Sequence[bytes]) -> List[Any]:
        """``server_for_key`` of each key, in order."""

    @property
    def live_servers(self) -> Sequence[Any]:
        """The servers in the ring now (not ejected), in configuration order."""

    @property
    def all_servers(self) -> Sequence[Any]:
        """Every server in configuration order, ejected ones too (each group's master in a cluster
        pool, by group id): an index here stays the same server across ejections."""


def group_by_server(positions: Sequence[int], servers: Sequence[Any]) -> Dict[Any, List[int]]:
    """Key positions by the server each key lives on, in first-seen order (a split command's parts)."""
    groups: Dict[Any, List[int]] = {}
    for position, server in zip(positions, servers):
        group = groups.get(server)
        if group is None:
            groups[server] = [position]
        else:
            group.append(position)
    return groups


class Codec(Protocol):
    """One wire protocol, as twemproxy's per-protocol hooks.

    The frontend parses with ``request_parser()``, calls ``prepare`` on each
    request (which answers local commands and classifies the rest), and for
    ``FRAGMENT`` requests calls ``fragment`` then, when every fragment has
    its reply, ``coalesce``.  Backends frame replies with ``reply_framer()``
    and open each connection with ``handshake``.
    """

    default_dialect: int
    # The first ``error_start_width`` bytes an error reply may start with
    # (``is_error`` decides): the frontend's per-command error count tests
    # ``reply[:error_start_width]`` against this set first, so most replies
    # cost no call.
    error_starts: frozenset
    error_start_width: int

    def request_parser(self) -> RequestParser: ...

    def reply_framer(self) -> ReplyFramer: ...

    def prepare(self, request: "Request", session: Session) -> None: ...

    def fragment(self, request: "Request", router: Router) -> List[Tuple[Any, "Request"]]: ...

    def coalesce(self, request: "Request") -> bytes: ...

    def error_reply(self, message: str, code: str = "ERR") -> bytes:
        """The reply for a request the proxy could not get answered (server down, ...)."""

    def protocol_error_reply(self, err: ProtocolError) -> bytes:
        """The reply to a client whose bytes broke the protocol (the connection then closes)."""

    def is_error(self, reply: bytes) -> bool: ...

    def handshake(self, profile: int) -> List[bytes]:
        """The commands that open a backend connection of ``profile`` (request.profile_of)."""


def codec_for(config: "PoolConfig") -> Codec:
    """Return a codec for the pool's protocol."""
    return _CODECS[config.protocol](config)


def _redis(config: "PoolConfig") -> Codec:
    from twinproxy.protocols.redis import RedisCodec

    return RedisCodec(config)


def _memcache(config: "PoolConfig") -> Codec:
    from twinproxy.protocols.memcache import MemcacheCodec

    return MemcacheCodec(config)


_CODECS: Dict[str, Callable[["PoolConfig"], Codec]] = {
    "redis": _redis,
    "memcache": _memcache,
}
