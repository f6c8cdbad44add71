"""The stand-ins that take a cluster slot's requests when no server should.

Owns :class:`OfflineSlot` (no group owns the slot: a clear error naming
it), :class:`HeldSlot` (the two-phase barrier: requests wait, in order,
until the slot is released, for at most ``slot_hold`` ms; at once an error
when the coordinator session is not trusted), :class:`StartupHold` (before
the proxy's first topology) and :class:`Early` (a hold's front door for
requests from before it).  Each is "something with ``send(request)``", so
codecs and frontends need no cluster case; the clock is injected.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from twinproxy.request import Request

Answer = Callable[..., None]   # answer(request, text, code="ERR"): the reply in the pool's protocol


class OfflineSlot:
    """A slot no group owns."""

    __slots__ = ("name", "slot", "_text", "_answer")

    def __init__(self, slot: int, cluster: str, answer: Answer) -> None:
        self.name = f"slot-{slot}"
        self.slot = slot
        self._text = f"slot {slot} is offline in cluster '{cluster}' (no group serves it)"
        self._answer = answer

    def send(self, request: Request) -> None:
        self._answer(request, self._text)


class HeldSlot:
    """A slot on hold: its requests wait here until the next table releases it."""

    __slots__ = ("name", "slot", "cluster", "fenced", "why", "_queue", "_early", "_clock", "_limit", "_answer",
                 "_timer")

    def __init__(self, slot: int, cluster: str, clock: Any, limit: float, answer: Answer,
                 why: str = "held for a topology change") -> None:
        self.name = f"slot-{slot}"
        self.slot = slot
        self.cluster = cluster
        self.fenced = False
        self.why = why
        self._queue: deque = deque()    # (request, deadline)
        self._early = 0                 # the first this many came from before the hold: they go first
        self._clock = clock
        self._limit = limit
        self._answer = answer
        self._timer: Any = None

    def send(self, request: Request) -> None:
        if self.fenced:
            self._answer(request, self._fenced_text(), "TRYAGAIN")
            return
        self._queue.append((request, self._clock.seconds() + self._limit))
        if self._timer is None:
            self._timer = self._clock.callLater(self._limit, self._expire)

    def send_early(self, request: Request) -> None:
        """``send``, but ahead of what came since the hold began (a request released by an older hold)."""
        if self.fenced:
            self._answer(request, self._fenced_text(), "TRYAGAIN")
            return
        self._queue.insert(self._early, (request, self._clock.seconds() + self._limit))
        self._early += 1
        if self._timer is None:
            self._timer = self._clock.callLater(self._limit, self._expire)

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def _fenced_text(self) -> str:
        return (f"slot {self.slot} of cluster '{self.cluster}' is held for a topology change and this "
                "proxy has lost its coordinator session: it cannot know the slot's state")

    def _expire(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        queue = self._queue
        while queue and queue[0][1] <= now + 1e-9:
            request, _ = queue.popleft()
            self._early = max(0, self._early - 1)
            self._answer(request, *self._expired())
        if queue:
            self._timer = self._clock.callLater(max(0.0, queue[0][1] - now), self._expire)

    def _expired(self) -> "tuple[str, str]":
        """The error (text, code) of a request that waited its limit out."""
        return (f"slot {self.slot} of cluster '{self.cluster}' is {self.why} for longer than "
                f"{self._limit * 1000:.0f} ms", "TRYAGAIN")

    def fence(self) -> None:
        """The session is not trusted: what waits fails now, what comes fails at once."""
        self.fenced = True
        self._cancel_timer()
        queue, self._queue, self._early = self._queue, deque(), 0
        for request, _ in queue:
            self._answer(request, self._fenced_text(), "TRYAGAIN")

    def release(self, route: Callable[[int], Any]) -> None:
        """The slot is free: send what waited, in arrival order, where the slot now goes."""
        self._cancel_timer()
        queue, self._queue, self._early = self._queue, deque(), 0
        for request, _ in queue:
            route(self.slot).send(request)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class Early:
    """A hold's front door, for requests that were waiting (or moving keys) before the hold or the stall."""

    __slots__ = ("send",)

    def __init__(self, hold: HeldSlot) -> None:
        self.send = hold.send_early


class StartupHold(HeldSlot):
    """A slot before the proxy's first topology: a request waits a moment for it (the proxy just started
    and is reading it), then gets the "not ready" error a cluster with no topology gives."""

    __slots__ = ()

    def _expired(self) -> "tuple[str, str]":
        return (f"cluster '{self.cluster}' not ready: its topology is not loaded yet "
                f"(waited {self._limit * 1000:.0f} ms)", "ERR")
