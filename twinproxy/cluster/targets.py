"""Where a cluster pool sends each slot's requests: a server, or a stand-in.

Owns: :class:`SlotRouting` — the 1024-entry table from slot to target that
a cluster pool routes with, rebuilt from each :class:`SlotTable` — and the
stand-ins that take a slot's requests when no server should:
:class:`OfflineSlot` (no group owns it: a clear error naming the slot),
:class:`HeldSlot` (the two-phase barrier: requests wait, in order, until
the slot is released, for at most ``slot_hold`` ms; at once an error when
the coordinator session is not trusted) and the pool-wide "not ready"
answer before any topology is loaded, and :class:`AdoptedPlacement` (an
adopted pool's slots: a key goes where the pool's distribution put it,
through a :class:`~twinproxy.cluster.migrating.MigratingSlot` from there
while that server's keys move, or to its slot's owner once they have).  Everything here is "something
with ``send(request)``", so codecs and frontends need no cluster case.
The clock is injected; nothing here opens a socket.

The table is also fenced by a **lease**: once :meth:`SlotRouting.renew`
has been called, a request routed after the lease ran out (the process
was stopped, or starved, for longer than the lease: its coordinator
session may have expired meanwhile, and the dashboard may have moved slots
without waiting for it) waits on a hold of its slot until the next renewal
— which comes only once the session is confirmed and the topology read
again (:class:`~twinproxy.cluster.sources.ClusterSources`).  The check is
made per route, not by a timer, because after a SIGSTOP/SIGCONT the
reactor reads its clients before it runs any timer.
"""

from __future__ import annotations

from collections import deque
from functools import partial
from typing import Any, Callable, Dict, List, Optional
from zlib import crc32

from twisted.logger import Logger

from twinproxy.cluster.legacy import legacy_router
from twinproxy.cluster.migrating import MigratingSlot, keys_of
from twinproxy.cluster.slots import SLOT_COUNT, slot_of
from twinproxy.cluster.warmup import WarmingSlot
from twinproxy.request import Request

Answer = Callable[..., None]   # answer(request, text, code="ERR"): the reply in the pool's protocol
# Seconds a renewal (or the first table) lets a cluster pool route by its table:
# shorter than two thirds of any session timeout worth using (ZooKeeper's
# least is 2 x tickTime = 4 s by default).
LEASE_SECONDS = 1.0
# How long a request that came before the proxy's first topology waits for it (normally ~0.1 s away).
STARTUP_WAIT = 1.0


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


class AdoptedPlacement:
    """Every slot of an adopted pool (that no hold stands in for): each key by its server's state.

    ``pick(key)`` is the target: the server the pool placed the key on
    while that server's keys have not started moving, the slot's
    :class:`MigratingSlot` (from that server) while they move, the slot's
    owner once they have.  The route function asks it directly; this
    stand-in takes what a hold (or a MIGRATE answered late) releases.  A
    fragment whose keys go to different targets (a one-slot multi-key
    command whose keys the pool had placed on different servers) cannot go
    anywhere whole: it is refused rather than half-served.  ``toward(source,
    slot)``: the same target for the keys of ``slot`` that the pool placed
    on ``source`` (what a MigratingSlot from ``source`` asks once a move is
    answered: the slot alone would name this stand-in, which would give the
    request back to it).
    """

    __slots__ = ("name", "cluster", "pick", "toward", "_answer")

    def __init__(self, cluster: str, pick: Callable[[bytes], Any], answer: Answer,
                 toward: Callable[[Any, int], Any]) -> None:
        self.name = "adopted-placement"
        self.cluster = cluster
        self.pick = pick
        self.toward = toward
        self._answer = answer

    def send(self, request: Request) -> None:
        keys = keys_of(request)
        if not keys:
            self._answer(request, f"cluster '{self.cluster}': a keyless request reached the adopted placement",
                         "TRYAGAIN")
            return
        target = self.pick(keys[0])
        if any(self.pick(key) is not target for key in keys[1:]):
            self._answer(request, f"cluster '{self.cluster}': this command's keys were on different servers of the "
                                  "adopted pool and are not all moved yet; try again", "TRYAGAIN")
            return
        target.send(request)


def _fenced_hold(slot: int, cluster: str, clock: Any, limit: float, answer: Answer) -> HeldSlot:
    hold = HeldSlot(slot, cluster, clock, limit, answer)
    hold.fenced = True
    return hold


class _Early:
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


class SlotRouting:
    """The key -> target function of one cluster pool, and the stand-ins it keeps between tables."""

    _log = Logger()

    def __init__(self, cluster: str, clock: Any, answer: Answer,
                 lease_seconds: Optional[float] = LEASE_SECONDS) -> None:
        self.cluster = cluster
        self._clock = clock
        self._answer = answer
        self._table: List[Any] = []
        self._held: Dict[int, HeldSlot] = {}
        self._released: List[HeldSlot] = []
        self._migrating: Dict[int, MigratingSlot] = {}
        # The lease (see the module's docstring): routes made after ``_lease[0]``
        # wait in ``_stall_holds`` until ``renew``.  The first table is good for
        # ``lease_seconds`` (it was just read); None: no lease until a renewal.
        self._lease = [float("inf")]
        self._first_lease = lease_seconds
        self._real: List[Any] = []            # the table's targets while the stall holds stand in
        self._stall_holds: Dict[int, HeldSlot] = {}
        self._hold_seconds = 5.0
        self._startup_holds: List[StartupHold] = []   # requests from before the first table (not_ready)
        self.stalls = 0                       # times the lease ran out (stats)
        # An adopted pool's placement: (what it was built from, its key -> server function).
        self._legacy: Any = (None, None)

    def not_ready(self, hold_seconds: float) -> Callable[[bytes], Any]:
        """Before the first table: a request waits for it (a just-started proxy is reading the topology),
        at most ``min(hold_seconds, STARTUP_WAIT)`` — a cluster with no topology yet must not make every
        client wait ``slot_hold`` — then fails "not ready"; the first ``install`` releases them in order."""
        if not self._startup_holds:
            limit = min(hold_seconds, STARTUP_WAIT)
            self._startup_holds = [StartupHold(slot, self.cluster, self._clock, limit, self._answer)
                                   for slot in range(SLOT_COUNT)]
        holds = self._startup_holds

        def waiting_route(key: bytes) -> Any:
            return holds[slot_of(key)]

        return waiting_route

    def install(self, table: Any, servers: Dict[str, Any], hold_seconds: float,
                config: Any = None) -> Callable[[bytes], Any]:
        """Route by ``table`` (a SlotTable) over ``servers`` (name -> Server) from now on."""
        self._check_lease()     # a table that comes after the lease ran out stays behind the stall holds
        answer = self._answer
        held_before = self._held
        held_now: Dict[int, HeldSlot] = {}
        migrating_before = self._migrating
        migrating_now: Dict[int, MigratingSlot] = {}
        sources = dict(table.migrating)
        warming = config is not None and not config.redis
        db = config.redis_db if config else 0
        auth = config.redis_auth if config else None
        placement = None
        if table.legacy is not None:
            placement = self._adopted(table, servers, migrating_before, migrating_now, hold_seconds, config)
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
                same = target is not None and (target.same_move(servers[source], servers[owner]) if warming else
                                               target.same_move(servers[source], servers[owner], db, auth,
                                                                hold_seconds))
                if not same:
                    if warming:   # memcached: warmed up, not moved
                        target = WarmingSlot(slot, servers[source], servers[owner], answer, self.target_for_slot,
                                             self._clock)
                    else:
                        target = MigratingSlot(slot, servers[source], servers[owner], db, auth, answer,
                                               self.target_for_slot, clock=self._clock, wait_limit=hold_seconds)
                migrating_now[slot] = target
            elif slot in table.held:
                target = held_before.pop(slot, None) or HeldSlot(slot, self.cluster, self._clock, hold_seconds,
                                                                 answer)
                target.fenced = table.fenced
                held_now[slot] = target
            elif placement is not None and owner is not None:
                target = placement
            elif owner is None:
                target = OfflineSlot(slot, self.cluster, answer)
            else:
                target = servers[owner]
            targets.append(target)
        self._hold_seconds = hold_seconds
        self._real = targets
        if self._first_lease is not None and not self._stall_holds and self._lease[0] == float("inf"):
            self._lease[0] = self._clock.seconds() + self._first_lease
            self._first_lease = None
        if self._stall_holds:
            # Stalled: the new table waits behind the stall holds until the lease is renewed.
            targets = [self._stall_holds[slot] for slot in range(SLOT_COUNT)]
        self._table = targets
        self._held = held_now
        self._migrating = migrating_now
        for target in held_now.values():
            if target.fenced:
                target.fence()
        # Slots released by this table: what waited goes where they now go, once
        # the caller has moved every link to its new address (release_held).
        self._released.extend(held_before.values())
        startup, self._startup_holds = self._startup_holds, []
        self._released.extend(startup)
        table_list = targets
        lease = self._lease
        stalled = self._stalled
        if placement is not None:
            return self._adopted_route(table_list, placement)

        # slot_of, inlined: this runs once per request.  ``123 in key`` (is there a
        # "{"?) is a memchr, a quarter of a method call's cost, and most keys have
        # no tag (measured: bench/routing.py).
        def slot_route(key: bytes, crc32: Any = crc32, table: List[Any] = table_list,
                       now: Callable[[], float] = self._clock.seconds) -> Any:
            if now() > lease[0]:
                stalled()         # the table's entries become stall holds, in place
            if 123 in key:
                start = key.find(b"{")
                end = key.find(b"}", start + 1)
                if end >= 0:
                    return table[crc32(key[start + 1:end]) & 1023]
            return table[crc32(key) & 1023]

        return slot_route

    def _adopted(self, table: Any, servers: Dict[str, Any], migrating_before: Dict[int, Any],
                 migrating_now: Dict[int, Any], hold_seconds: float, config: Any) -> AdoptedPlacement:
        """The stand-in of an adopted pool's slots (and the MigratingSlots of the server whose keys move)."""
        legacy = table.legacy
        if self._legacy[0] != legacy:
            # The pool's own placement, as its index in the pool's server list (kept while the pool is).
            self._legacy = (legacy, legacy_router(legacy, list(range(len(legacy.servers)))))
        place = self._legacy[1]
        sources = [servers[name] for name in table.legacy_names]
        states = table.adopt_states
        owners = [servers[name] if name is not None else None for name in table.owners]
        moving: List[Any] = [None] * SLOT_COUNT
        for index, state in enumerate(states):
            if state != "moving" or table.fenced:
                continue
            source = sources[index]
            for slot, owner in enumerate(owners):
                if owner is None or owner is source:
                    continue
                target = migrating_before.get(slot)
                if target is None or not target.same_move(source, owner, 0, config.redis_auth if config else None,
                                                          hold_seconds):
                    target = MigratingSlot(slot, source, owner, 0, config.redis_auth if config else None,
                                           self._answer, partial(self._adopted_slot_route, source),
                                           clock=self._clock, wait_limit=hold_seconds)
                moving[slot] = migrating_now[slot] = target
        fenced = table.fenced
        cluster = self.cluster
        index_of = {server.name: index for index, server in enumerate(sources)}

        def toward(index: int, slot: int) -> Any:
            """Where the keys of ``slot`` that the pool placed on its ``index``-th server go."""
            state = states[index]
            if state == "done":
                return owners[slot]
            source = sources[index]
            if state == "legacy" or owners[slot] is source:
                return source
            # Moving, but without a trusted session its state is unknown: as a held slot's.
            return moving[slot] if not fenced else _fenced_hold(slot, cluster, self._clock, hold_seconds,
                                                                self._answer)

        def pick(key: bytes) -> Any:
            index = place(key)
            if states[index] == "legacy":
                return sources[index]
            return toward(index, slot_of(key))

        def toward_source(source: Any, slot: int) -> Any:
            index = index_of.get(source.name)
            return toward(index, slot) if index is not None else owners[slot]

        return AdoptedPlacement(cluster, pick, self._answer, toward_source)

    def _adopted_slot_route(self, source: Any, slot: int) -> Any:
        """A MigratingSlot's route (where its slot goes now) while ``source``'s keys move: by the placement."""
        now = self.target_for_slot(slot)
        return now.toward(source, slot) if isinstance(now, AdoptedPlacement) else now

    def _adopted_route(self, table: List[Any], placement: AdoptedPlacement) -> Callable[[bytes], Any]:
        """Route an adopted pool's keys by ``placement`` (save a slot a hold or the lease stands in for)."""
        lease = self._lease
        stalled = self._stalled
        pick = placement.pick

        def adopted_route(key: bytes, now: Callable[[], float] = self._clock.seconds) -> Any:
            if now() > lease[0]:
                stalled()
            target = table[slot_of(key)]
            return pick(key) if target is placement else target

        return adopted_route

    # -- the lease --------------------------------------------------------------

    def renew(self, until: float) -> None:
        """Route by the table until ``until`` (the clock's seconds); release the stall holds.

        A renewal that is already over (sent before this process stopped, read
        after) changes nothing: the next route finds the lease run out.
        """
        if until <= self._clock.seconds():
            return
        self._lease[0] = until
        holds, self._stall_holds = self._stall_holds, {}
        if not holds:
            return
        self._table[:] = self._real
        for slot in range(SLOT_COUNT):
            holds[slot].release(self.target_for_slot)

    @property
    def stalled(self) -> bool:
        return bool(self._stall_holds)

    def _stalled(self) -> None:
        """The lease ran out: every slot waits (in order, for at most ``slot_hold``) for the next renewal."""
        if self._stall_holds or not self._table:
            self._lease[0] = float("inf")
            return
        self.stalls += 1
        self._lease[0] = float("inf")   # latched: the holds stand until ``renew``
        self._log.warn("cluster '{cluster}': the slot lease ran out (this process did not run for a while): "
                       "requests wait until the coordinator session is confirmed", cluster=self.cluster)
        why = "waiting for this proxy to confirm its coordinator session (it did not run for a while)"
        holds = {slot: HeldSlot(slot, self.cluster, self._clock, self._hold_seconds, self._answer, why)
                 for slot in range(SLOT_COUNT)}
        self._stall_holds = holds
        self._real = list(self._table)
        self._table[:] = [holds[slot] for slot in range(SLOT_COUNT)]

    def release_held(self) -> None:
        """Send what waited on the slots the last table released (after the links are retargeted)."""
        released, self._released = self._released, []
        for target in released:
            target.release(self.target_for_slot)

    def target_for_slot(self, slot: int) -> Any:
        """Where a request released by a hold or a MIGRATE goes now: during a stall, ahead of newer ones."""
        self._check_lease()
        if self._stall_holds:
            return _Early(self._stall_holds[slot])
        target = self._table[slot]
        # A hold: what comes from before it (a MIGRATE answered late) goes ahead of what arrived meanwhile.
        return _Early(target) if isinstance(target, HeldSlot) else target

    def _check_lease(self) -> None:
        if self._clock.seconds() > self._lease[0]:
            self._stalled()

    @property
    def migrating(self) -> Dict[int, MigratingSlot]:
        return self._migrating

    @property
    def waiting(self) -> int:
        """Requests waiting on held slots (and on the stall holds)."""
        return (sum(target.waiting for target in self._held.values())
                + sum(target.waiting for target in self._stall_holds.values())
                + sum(target.waiting for target in self._startup_holds))

    def stop(self) -> None:
        """The pool stops: what waits on held slots fails."""
        held, self._held = self._held, {}
        held.update({target.slot: target for target in self._released})
        self._released = []
        stall, self._stall_holds = list(self._stall_holds.values()), {}
        stall.extend(self._startup_holds)
        self._startup_holds = []
        for target in [*held.values(), *stall]:
            target.fenced = True
            target.fence()
