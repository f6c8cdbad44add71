"""A client blocked in a blocking command: nothing else of its runs until the reply, as in Redis.

Owns :class:`BlockedCall`, one blocking command of one client (BLPOP,
BRPOP, BRPOPLPUSH, BLMOVE, BLMPOP, BZPOPMIN/MAX, BZMPOP, XREAD/XREADGROUP
... BLOCK) from its dispatch to its reply.  The frontend
(:mod:`twinproxy.frontend`) makes one when the codec classifies a request
``BLOCK`` and its keys are on one server (one slot); while it stands:

- the client's later requests stay in the parser (dispatch halts, as when
  a limit holds it): Redis runs nothing of a blocked client's before its
  reply.  Reading goes on, so a client that hangs up is seen at once, up to
  :data:`BLOCKED_INPUT` bytes;
- the command is sent once every earlier request of the client is
  answered: it runs on a connection of its own, where it could overtake
  them (a pipelined ``DEL q`` then ``BLPOP q 1``);
- it goes to its target with the :data:`~twinproxy.request.LEASED`
  profile bit, so the server's link runs it alone on a leased connection
  (:meth:`~twinproxy.leases.Leases.lend`), whatever stood between:
  a held slot, a migrating slot (which moves the keys first), a Sentinel
  shard's hold.  A WATCHing client's pinned connection carries it itself;
- the connection's deadline for the reply is the command's timeout plus
  the pool's ``timeout`` (``request.blocks_for``, see
  :mod:`twinproxy.protocols.redis_blocking`), none for a timeout of 0;
- its reply unblocks the client and the leased connection goes back for
  reuse; a client that hangs up first has it closed (an element popped on
  it now would be handed to nobody).

:class:`BlockingClient` is the frontend's half of it (a mixin of
:class:`~twinproxy.frontend.FrontendProtocol`, as the session is): no
per-request cost for other commands, since the frontend looks for a blocked
call only where dispatch halts, where reading is settled, at drain and at
hang-up.
"""

from __future__ import annotations

from typing import Any, Optional

from twinproxy.request import LEASED, Request

# Bytes a blocked client may send before the proxy stops reading it (they wait for the reply).
BLOCKED_INPUT = 1 << 20


class BlockedCall:
    """One client's blocking command, and the owner of its request."""

    __slots__ = ("client", "request", "target", "sent", "drain_after")

    def __init__(self, client: Any, request: Request, target: Any) -> None:
        self.client = client
        self.request = request
        self.target = target
        self.sent = False
        self.drain_after = False    # the pool stopped meanwhile: drain the client once answered

    def send(self) -> None:
        """Every earlier request is answered: run it, on a connection leased for it alone."""
        self.sent = True
        request = self.request
        request.owner = self
        request.profile |= LEASED
        self.target.send(request)

    def request_done(self, request: Request) -> None:
        self.client.unblocked(self, request)

    def completion_failed(self, request: Request) -> None:
        self.client.unblocked(self, request, failed=True)

    def abandon(self) -> None:
        """The client has gone: close the leased connection the command waits on, if it waits on one."""
        owner = self.request.owner
        if owner is not self:
            abandon = getattr(owner, "abandon", None)
            if abandon is not None:
                abandon()


class BlockingClient:
    """The frontend's blocked state: ``_blocked`` (a BlockedCall, or None) and ``_halted`` (no dispatch)."""

    _blocked: Optional[BlockedCall]

    @property
    def blocked(self) -> bool:
        """Waiting for a blocking command's reply (CLIENT LIST's flag ``b``)."""
        return self._blocked is not None

    def _block(self, request: Request) -> None:
        """Route a blocking command; dispatch halts until its reply (it is sent once in turn: _blocked_pause)."""
        routes = self._codec.fragment(request, self._router)
        if not routes:            # refused: its keys are on several servers, a bad numkeys, ...
            self._flush()
            return
        self._blocked = BlockedCall(self, request, routes[0][0])
        self._halted = True
        self._counters.blocked_clients += 1

    def _blocked_pause(self, blocked: BlockedCall) -> Optional[bool]:
        """Whether reading pauses while ``blocked`` stands; None if it was answered at once (reading is settled).

        Called wherever the frontend settles reading, so also after each of
        the client's earlier replies (reading is paused meanwhile): the
        command goes out once it is at the head of the client's order.
        """
        in_order = self._in_order
        if not blocked.sent and in_order and in_order[0] is blocked.request:
            blocked.send()
            if self._blocked is not blocked:
                return None
        # Read on while it waits (a client that hangs up is seen), up to BLOCKED_INPUT.
        return (self._draining or blocked.drain_after or self._write_blocked or not blocked.sent
                or self._parser.buffered >= BLOCKED_INPUT)

    def unblocked(self, call: BlockedCall, request: Request, failed: bool = False) -> None:
        """The blocking command is answered: what waited behind it is dispatched, then its reply written."""
        if self._blocked is call:
            self._blocked = None
            self._halted = self._closing
            self._counters.blocked_clients -= 1
            if call.drain_after:
                self.drain()
            else:
                self._update_reading()
        if failed:
            self.completion_failed(request)
        else:
            self.request_done(request)

    def _drain_when_unblocked(self) -> None:
        """The pool stops: what waits behind the blocking command is answered once it is, then the client drains."""
        self._blocked.drain_after = True
        self._update_reading()

    def _abandon_blocked(self) -> None:
        """The client hung up while blocked: close the lease its command waits on."""
        blocked, self._blocked = self._blocked, None
        self._counters.blocked_clients -= 1
        blocked.abandon()
