"""The protocol-neutral request that flows from a client to a backend and back.

Owns: one client request's raw bytes, what routing needs (its key or its
fragments), who it is for (``client``: the session, for connection
affinity), who takes its reply (``owner``: completion, which may differ,
e.g. a step that runs before the client is answered), and the reply once
it is there.  A
``Request`` holds no parsing rules and touches no socket; codecs fill it
and the frontend and backends move it.

Completion is a plain method call, ``owner.request_done(request)``, never a
Deferred: at proxy rates a Deferred per request costs a fifth of the budget.
"""

from __future__ import annotations

from typing import Any, List, Optional

# How the frontend must treat a request after its codec looked at it.
LOCAL = 0      # the codec answered it itself; ``reply`` is set
FORWARD = 1    # send unchanged to the server owning ``key``
FRAGMENT = 2   # ask the codec to split it (or check its keys) against the pool
SESSION = 3    # the client's session answers it (pub/sub: SUBSCRIBE and its kin)
BLOCK = 4      # a blocking command (BLPOP, XREAD ... BLOCK): the frontend runs it on a leased connection

# A request's connection profile: which of a server's connection sets may carry
# it.  The low bits are the protocol dialect (RESP 2 or 3; 0 for memcached),
# the bits above the client's database (SELECT n): ``db << 2 | dialect``.  A
# backend connection is opened for one profile (``codec.handshake(profile)``)
# and carries only requests of that profile.
DIALECT_BITS = 3
DB_SHIFT = 2


def profile_of(dialect: int, db: int = 0) -> int:
    """The connection profile of a client speaking ``dialect`` in database ``db``."""
    return db << DB_SHIFT | dialect


def profile_dialect(profile: int) -> int:
    return profile & DIALECT_BITS


def profile_db(profile: int) -> int:
    return profile >> DB_SHIFT


# A bit set on a request's profile (never on a connection's): the request runs
# on a backend connection leased for it alone (``ServerLink`` finds no shared
# connection set for such a profile and lends one), so a blocking command never
# stalls a connection other clients share.  Without it, the profile is the one
# the leased connection is opened for.
LEASED = 1 << 30


def shared_profile(profile: int) -> int:
    """``profile`` without :data:`LEASED`: the profile of the connections that carry it."""
    return profile & ~LEASED


class Request:
    """One request and, once it arrives, its reply.

    ``raw`` is exactly what a backend is sent.  ``reply`` stays None until
    the request is answered, by a backend or by the proxy.  A fragment has a
    ``parent``; the parent is answered when its last fragment is, from the
    codec's merge of their replies.
    """

    __slots__ = (
        "raw", "args", "kind", "key", "command", "owner", "client", "reply", "parent",
        "fragments", "pending", "positions", "profile", "sent_at",
        "expects_reply", "quiet", "close_after", "name", "terminator", "gathered",
        # Set only once a request is sent a second time (Sentinel's one retry):
        # never assigned in __init__, read with getattr(request, "retried", False).
        "retried",
        # Set only on an EXEC that carries a transaction (protocols.redis_tx): what it queued.
        "transaction",
        # Set only on a blocking command: seconds the server may hold it before replying,
        # on top of the pool's timeout (inf: no limit).  Read with getattr(request, "blocks_for", 0.0).
        "blocks_for",
        # The per-command counters (stats.CommandCounters) of a client's request and
        # its fragments; None for the proxy's own requests (handshakes, probes).
        "counted",
    )

    def __init__(self, raw: bytes, args: Optional[List[bytes]] = None) -> None:
        self.raw = raw
        self.args = args
        self.kind = FORWARD
        self.key: Optional[bytes] = None
        self.command: Any = None
        self.owner: Any = None      # has request_done(request), called once with the reply set
        self.client: Any = None     # the client session (client_id), or None for the proxy's own requests
        self.reply: Optional[bytes] = None
        self.parent: Optional[Request] = None
        self.fragments: Optional[List[Request]] = None
        self.pending = 0
        self.positions: Optional[List[int]] = None
        # The connection profile (see profile_of): the frontend copies its session's, one store.
        self.profile = 0
        self.sent_at = 0.0
        self.expects_reply = True   # a backend answers it (all commands we forward)
        self.quiet = False          # the client gets no reply (memcached ``noreply``)
        self.close_after = False
        self.name = "unknown"       # the command, for per-command counts (a known name or "unknown")
        # When set: the server's reply is every reply up to this one, which ends it (and is dropped);
        # an int: the server sends that many replies and the last one is the answer (a transaction).
        self.terminator: Optional[bytes] = None
        self.gathered: Optional[List[bytes]] = None
        self.counted: Any = None

    @property
    def dialect(self) -> int:
        """The RESP version the client speaks (2 or 3; 0 for memcached): its replies' encoding."""
        return self.profile & DIALECT_BITS

    @dialect.setter
    def dialect(self, dialect: int) -> None:
        self.profile = (self.profile & ~DIALECT_BITS) | dialect

    def __repr__(self) -> str:
        return f"<Request {self.raw[:40]!r} reply={self.reply!r:.40}>"
