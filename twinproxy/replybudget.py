"""The process-wide budget of reply bytes held for clients.

Owns: :class:`ReplyBudget`, one per process (made in ``tap.build`` and
handed to every pool's factory, never a module global), which sums what
every client pins (replies queued for it, plus an estimate of the replies
to the requests it has in flight) and says when the proxy as a whole
holds too much: past ``limit`` no client is read, and reading resumes
for all of them once the sum is back at half.  Owns no sockets and knows
no client's internals: a client charges its own changes and registers to
be told when reading may resume.

::

    ClientOutput.account() --> budget.charge(delta)   (per read, per write burst)
         used >= limit  --> over: every client pauses at its next read
         used <= limit/2 --> release: each waiting client's budget_released()
"""

from __future__ import annotations

from typing import Any, List, Optional

from twisted.logger import Logger

DEFAULT_MAX_REPLY_BUFFER = 256 * 1024 * 1024
# The limit of a budget made with 0: never reached.
UNLIMITED = 1 << 62
QUANTUM = 16 * 1024
# Over-limit warnings are logged at most this often; the count in between is reported.
LOG_INTERVAL = 60.0


class ReplyBudget:
    """Reply bytes pinned by every client of the process, against one limit (0: none).

    ``charge`` is called by clients with the change of what they pin (or
    inlined: ``used`` updated, then ``charge(0)`` once at or over the
    limit); ``over`` is read on every parse.
    Clients that paused because of the budget call ``wait`` and get
    ``budget_released()`` when the sum falls to half the limit.
    """

    __slots__ = ("limit", "resume_at", "quantum", "used", "over", "trips", "_waiting", "_clock", "_logged_at",
                 "_unlogged")

    _log = Logger()

    def __init__(self, limit: int = DEFAULT_MAX_REPLY_BUFFER, clock: Any = None) -> None:
        if limit < 0:
            raise ValueError("the reply buffer limit must not be negative")
        self.limit = limit or UNLIMITED
        self.resume_at = self.limit // 2
        # A client's share is brought up to date when it moved by this much (or
        # fell to nothing, or the limit is reached): one call per request
        # would cost more than the counting is worth.
        self.quantum = max(1, min(QUANTUM, self.limit // 64))
        self.used = 0
        self.over = False
        self.trips = 0              # times the limit was reached, since start
        self._waiting: List[Any] = []
        self._clock = clock
        self._logged_at: Optional[float] = None
        self._unlogged = 0

    def charge(self, delta: int) -> None:
        """Add ``delta`` (negative: released) to what clients pin; trip or release the limit."""
        used = self.used + delta
        self.used = used
        if self.over:
            if used <= self.resume_at:
                self._release()
        elif used >= self.limit:
            self.over = True
            self.trips += 1
            self._warn()

    def wait(self, client: Any) -> None:
        """``client`` stopped reading because of the budget: call its ``budget_released()`` later."""
        self._waiting.append(client)

    def _release(self) -> None:
        self.over = False
        # A released client may read and charge again, and so trip the limit
        # again: the rest then find it over and wait anew.
        waiting, self._waiting = self._waiting, []
        for client in waiting:
            client.budget_released()

    def _warn(self) -> None:
        clock = self._clock
        now = clock.seconds() if clock is not None else None
        if now is not None and self._logged_at is not None and now - self._logged_at < LOG_INTERVAL:
            self._unlogged += 1
            return
        self._log.warn("replies held for clients reached the reply buffer limit of {limit} bytes: no client is "
                       "read until they drain to {resume} bytes (reached {times} times since the last message)",
                       limit=self.limit, resume=self.resume_at, times=self._unlogged + 1)
        self._logged_at = now
        self._unlogged = 0
