"""Where a cluster pool sends each slot's requests: a server, or a stand-in.

Owns: :class:`SlotRouting` — the 1024-entry table from slot to target that
a cluster pool routes with, rebuilt from each :class:`SlotTable` — and the
stand-ins that take a slot's requests when no server should:
:class:`OfflineSlot` (no group owns it: a clear error naming the slot),
:class:`HeldSlot` (the two-phase barrier: requests wait, in order, until
the slot is released, for at most ``slot_hold`` ms; at once an error when
the coordinator session is not trusted) and the pool-wide "not ready"
answer before any topology is loaded.  Everything here is "something
with ``send(request)``", so codecs and frontends need no cluster case.
The clock is injected; nothing here opens a socket.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Dict, List
from zlib import crc32

from twinproxy.cluster.migrating import MigratingSlot
from twinproxy.cluster.slots import SLOT_COUNT
from twinproxy.cluster.warmup import WarmingSlot
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

    __slots__ = ("name", "slot", "cluster", "fenced", "_queue", "_clock", "_limit", "_answer", "_timer")

    def __init__(self, slot: int, cluster: str, clock: Any, limit: float, answer: Answer) -> None:
        self.name = f"slot-{slot}"
        self.slot = slot
        self.cluster = cluster
        self.fenced = False
        self._queue: deque = deque()    # (request, deadline)
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
            self._answer(request, f"slot {self.slot} of cluster '{self.cluster}' is held for a topology "
                                  f"change for longer than {self._limit * 1000:.0f} ms", "TRYAGAIN")
        if queue:
            self._timer = self._clock.callLater(max(0.0, queue[0][1] - now), self._expire)

    def fence(self) -> None:
        """The session is not trusted: what waits fails now, what comes fails at once."""
        self.fenced = True
        self._cancel_timer()
        queue, self._queue = self._queue, deque()
        for request, _ in queue:
            self._answer(request, self._fenced_text(), "TRYAGAIN")

    def release(self, route: Callable[[int], Any]) -> None:
        """The slot is free: send what waited, in arrival order, where the slot now goes."""
        self._cancel_timer()
        queue, self._queue = self._queue, deque()
        for request, _ in queue:
            route(self.slot).send(request)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class SlotRouting:
    """The key -> target function of one cluster pool, and the stand-ins it keeps between tables."""

    def __init__(self, cluster: str, clock: Any, answer: Answer) -> None:
        self.cluster = cluster
        self._clock = clock
        self._answer = answer
        self._table: List[Any] = []
        self._held: Dict[int, HeldSlot] = {}
        self._released: List[HeldSlot] = []
        self._migrating: Dict[int, MigratingSlot] = {}

    def not_ready(self) -> Callable[[bytes], Any]:
        text = f"cluster '{self.cluster}' not ready: its topology is not loaded yet"
        answer = self._answer

        class _NotReady:
            name = "not-ready"

            @staticmethod
            def send(request: Request) -> None:
                answer(request, text)

        target = _NotReady()
        return lambda key: target

    def install(self, table: Any, servers: Dict[str, Any], hold_seconds: float,
                config: Any = None) -> Callable[[bytes], Any]:
        """Route by ``table`` (a SlotTable) over ``servers`` (name -> Server) from now on."""
        answer = self._answer
        held_before = self._held
        held_now: Dict[int, HeldSlot] = {}
        migrating_before = self._migrating
        migrating_now: Dict[int, MigratingSlot] = {}
        sources = dict(table.migrating)
        targets: List[Any] = []
        for slot in range(SLOT_COUNT):
            owner = table.owners[slot]
            source = sources.get(slot)
            if source is not None and owner is not None and table.fenced:
                # A migrating slot's state cannot be trusted without the session: like a held one.
                target = HeldSlot(slot, self.cluster, self._clock, hold_seconds, answer)
                target.fenced = True
            elif source is not None and owner is not None:
                target = migrating_before.get(slot)
                if target is None or not target.same_move(servers[source], servers[owner]):
                    if config is not None and not config.redis:   # memcached: warmed up, not moved
                        target = WarmingSlot(slot, servers[source], servers[owner], answer, self.target_for_slot,
                                             self._clock)
                    else:
                        target = MigratingSlot(slot, servers[source], servers[owner],
                                               config.redis_db if config else 0,
                                               config.redis_auth if config else None, answer, self.target_for_slot)
                migrating_now[slot] = target
            elif slot in table.held:
                target = held_before.pop(slot, None) or HeldSlot(slot, self.cluster, self._clock, hold_seconds,
                                                                 answer)
                target.fenced = table.fenced
                held_now[slot] = target
            elif owner is None:
                target = OfflineSlot(slot, self.cluster, answer)
            else:
                target = servers[owner]
            targets.append(target)
        self._table = targets
        self._held = held_now
        self._migrating = migrating_now
        for target in held_now.values():
            if target.fenced:
                target.fence()
        # Slots released by this table: what waited goes where they now go, once
        # the caller has moved every link to its new address (release_held).
        self._released.extend(held_before.values())
        table_list = targets

        # slot_of, inlined: this runs once per request.  ``123 in key`` (is there a
        # "{"?) is a memchr, a quarter of a method call's cost, and most keys have
        # no tag (measured: bench/routing.py).
        def slot_route(key: bytes, crc32: Any = crc32, table: List[Any] = table_list) -> Any:
            if 123 in key:
                start = key.find(b"{")
                end = key.find(b"}", start + 1)
                if end >= 0:
                    return table[crc32(key[start + 1:end]) & 1023]
            return table[crc32(key) & 1023]

        return slot_route

    def release_held(self) -> None:
        """Send what waited on the slots the last table released (after the links are retargeted)."""
        released, self._released = self._released, []
        for target in released:
            target.release(self.target_for_slot)

    def target_for_slot(self, slot: int) -> Any:
        return self._table[slot]

    @property
    def migrating(self) -> Dict[int, MigratingSlot]:
        return self._migrating

    @property
    def waiting(self) -> int:
        """Requests waiting on held slots."""
        return sum(target.waiting for target in self._held.values())

    def stop(self) -> None:
        """The pool stops: what waits on held slots fails."""
        held, self._held = self._held, {}
        held.update({target.slot: target for target in self._released})
        self._released = []
        for target in held.values():
            target.fenced = True
            target.fence()
