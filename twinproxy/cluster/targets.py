"""Where a cluster pool sends each slot's requests: a server, or a stand-in.

Owns :class:`SlotRouting` — the 1024-entry table from slot to target that
a cluster pool routes with, rebuilt from each :class:`SlotTable`.  The
stand-ins it puts in the table when no server should take a slot's
requests are in :mod:`twinproxy.cluster.holds` (offline, held, before the
first topology); an adopted pool's placement is in
:mod:`twinproxy.cluster.adopted`; a migrating slot's in
:mod:`twinproxy.cluster.migrating` and :mod:`twinproxy.cluster.warmup`.
Everything in the table is "something with ``send(request)``", so codecs
and frontends need no cluster case.  The clock is injected; nothing here
opens a socket.

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

from functools import partial
from typing import Any, Callable, Dict, List, Optional
from zlib import crc32

from twisted.logger import Logger

from twinproxy.cluster.adopted import AdoptedPlacement, adopted_route, build_placement
from twinproxy.cluster.holds import Answer, Early, HeldSlot, OfflineSlot, StartupHold
from twinproxy.cluster.legacy import legacy_router
from twinproxy.cluster.migrating import Draining, MigratingSlot
from twinproxy.cluster.movebatch import MoveBatcher
from twinproxy.cluster.movescripts import ensure_moved_request
from twinproxy.cluster.slots import SLOT_COUNT, slot_of
from twinproxy.cluster.warmup import WarmingSlot
from twinproxy.credentials import Credentials, pool_credentials

__all__ = ["AdoptedPlacement", "Answer", "Early", "HeldSlot", "LEASE_SECONDS", "OfflineSlot", "STARTUP_WAIT",
           "SlotRouting", "StartupHold"]
# Seconds a renewal (or the first table) lets a cluster pool route by its table:
# shorter than two thirds of any session timeout worth using (ZooKeeper's
# least is 2 x tickTime = 4 s by default).
LEASE_SECONDS = 1.0
# How long a request that came before the proxy's first topology waits for it (normally ~0.1 s away).
STARTUP_WAIT = 1.0


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
        self._placement: Optional[AdoptedPlacement] = None
        self._batchers: Dict[Any, MoveBatcher] = {}    # the moves' MoveBatchers, by source, target and settings
        self._draining: Dict[int, MigratingSlot] = {}   # slot -> a dropped MigratingSlot still letting out lines

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
        # What the moves gathered this turn goes now: the barrier after this table counts what was sent.
        batchers_before, self._batchers = self._batchers, {}
        for batcher in batchers_before.values():
            batcher.flush()
        answer = self._answer
        held_before = self._held
        held_now: Dict[int, HeldSlot] = {}
        migrating_before = self._migrating
        migrating_now: Dict[int, MigratingSlot] = {}
        sources = dict(table.migrating)
        warming = config is not None and not config.redis
        db = config.redis_db if config else 0
        auth = pool_credentials(config)
        placement = None
        if table.legacy is not None:
            placement = self._adopted(table, servers, migrating_before, migrating_now, hold_seconds, config,
                                      batchers_before)
        targets: List[Any] = []
        for slot in range(SLOT_COUNT):
            owner = table.owners[slot]
            source = sources.get(slot)
            if source is not None and owner is not None and table.fenced:
                # A migrating slot's state cannot be trusted without the session: like a held one.  Its
                # MigratingSlot is kept (not routed to) so that the next trusted table of the same move goes
                # on with its lines: a request whose script was on its way keeps its place.
                target = HeldSlot(slot, self.cluster, self._clock, hold_seconds, answer)
                target.fenced = True
                kept = migrating_before.get(slot)
                if kept is not None:
                    migrating_now[slot] = kept
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
                                               self.target_for_slot, clock=self._clock, wait_limit=hold_seconds,
                                               batcher=self.batcher(servers[source], servers[owner], db, auth,
                                                                    batchers_before))
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
        for moving in migrating_now.values():
            # A slot kept from the last table (through a fenced one too) keeps its batcher: this table's
            # installs must send what it gathers (the barrier counts what was sent).
            kept_batcher = getattr(moving, "batcher", None)
            if kept_batcher is not None:
                self._batchers.setdefault(kept_batcher.key, kept_batcher)
        self._placement = placement
        self._let_out(targets, migrating_before, migrating_now, servers)
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
            return adopted_route(table_list, placement, lease, stalled, self._clock.seconds)

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

    def _let_out(self, targets: List[Any], migrating_before: Dict[int, Any], migrating_now: Dict[int, Any],
                 servers: Dict[str, Any]) -> None:
        """A slot whose MigratingSlot left this table while a client's requests still wait in its line:
        what the slot routes to now (its owner, or a new MigratingSlot of the same move) behind a
        :class:`Draining`, so that client's next requests wait behind them.  A held slot needs none (what
        the hold releases goes behind what it let in early): the MigratingSlot is remembered, and put in front
        again once the slot routes to a server."""
        kept = {id(target) for target in migrating_now.values()}
        server_ids = {id(server) for server in servers.values()}
        draining = {}
        for before in [*migrating_before.values(), *self._draining.values()]:
            if id(before) in kept or not isinstance(before, MigratingSlot) or not before.has_lines:
                continue
            slot = before.slot
            now = targets[slot]
            if type(now) is Draining:
                now = now.after
            if isinstance(now, HeldSlot):
                draining[slot] = before
            elif id(now) in server_ids or (isinstance(now, MigratingSlot) and now is not before):
                wrapper = targets[slot] = Draining(before, now)
                draining[slot] = before
                before.on_empty = partial(self._drained, wrapper)
        if self._placement is not None:
            # An adopted pool's: the placement lets them out.
            draining.update({slot: let_out.slot_moving for slot, let_out in self._placement.draining.items()})
        self._draining = draining

    def _drained(self, wrapper: Draining) -> None:
        """``wrapper``'s lines are empty: its slot routes to what it stood in front of again (WATCH pins the
        slot's server by identity, and needs the server itself)."""
        slot = wrapper.slot
        for table in (self._table, self._real):
            if len(table) > slot and table[slot] is wrapper:
                table[slot] = wrapper.after
        if self._draining.get(slot) is wrapper.slot_moving:
            del self._draining[slot]

    def _adopted(self, table: Any, servers: Dict[str, Any], migrating_before: Dict[int, Any],
                 migrating_now: Dict[int, Any], hold_seconds: float, config: Any,
                 batchers_before: Dict[Any, MoveBatcher]) -> AdoptedPlacement:
        """The stand-in of an adopted pool's slots (and the MigratingSlots of the server whose keys move)."""
        legacy = table.legacy
        if self._legacy[0] != legacy:
            # The pool's own placement, as its index in the pool's server list (kept while the pool is).
            self._legacy = (legacy, legacy_router(legacy, list(range(len(legacy.servers)))))
        auth = pool_credentials(config)
        return build_placement(self.cluster, self._clock, self._answer, table, servers, self._legacy[1],
                               migrating_before, migrating_now, hold_seconds, auth, self.target_for_slot,
                               lambda source, owner: self.batcher(source, owner, 0, auth, batchers_before),
                               list(self._draining.values()),
                               warming=config is not None and not config.redis)

    def batcher(self, source: Any, target: Any, db: int, auth: Optional[Credentials],
                before: Dict[Any, MoveBatcher]) -> MoveBatcher:
        """The MoveBatcher of the move ``source`` -> ``target`` in this table (the last table's, if it had it)."""
        key = (id(source), id(target), target.spec.host, target.spec.port, db, auth)
        found = self._batchers.get(key)
        if found is None:
            found = before.get(key)
            if found is None or found.source is not source:
                found = MoveBatcher(source, ensure_moved_request, self._clock, key)
            self._batchers[key] = found
        return found

    def home_of(self, key: bytes) -> Optional[str]:
        """An adopted pool's key: the server its pub/sub channel lives on now; None otherwise (its slot's
        owner, which the caller reads from the table)."""
        placement = self._placement
        return placement.home(key) if placement is not None else None

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
            return Early(self._stall_holds[slot])
        target = self._table[slot]
        # A hold: what comes from before it (a MIGRATE answered late) goes ahead of what arrived meanwhile.
        return Early(target) if isinstance(target, HeldSlot) else target

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
