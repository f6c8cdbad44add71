"""An adopted twemproxy pool's routing: each key by the state of the server the pool placed it on.

Owns :class:`AdoptedPlacement` (the stand-in of an adopted pool's slots),
:class:`PlacedHold` (a slot's hold as seen from one server of the pool)
and :func:`build_placement` / :func:`adopted_route`, which
:class:`~twinproxy.cluster.targets.SlotRouting` calls for a table that
names an adopted pool.  A key whose server is ``legacy`` goes to that
server; while the server's keys move, through the slot's
:class:`~twinproxy.cluster.migrating.MigratingSlot` from it (a memcache
cluster's: a :class:`~twinproxy.cluster.warmup.WarmingSlot` from it, its
items read through rather than moved); once they have, to its slot's owner.  The clock is injected; nothing here opens a
socket.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from twinproxy.cluster.holds import Answer, HeldSlot
from twinproxy.cluster.migrating import Draining, MigratingSlot, keys_of
from twinproxy.cluster.slots import SLOT_COUNT, slot_of
from twinproxy.cluster.warmup import WarmingSlot
from twinproxy.credentials import Credentials
from twinproxy.request import Request


class AdoptedPlacement:
    """Every slot of an adopted pool (that no hold stands in for): each key by its server's state.

    ``pick(key, slot)`` is the target: the server the pool placed the key
    on while that server's keys have not started moving, the slot's
    :class:`MigratingSlot` (from that server) while they move, the slot's
    owner once they have.  The route function asks it directly; this
    stand-in takes what a hold (or a MIGRATE answered late) releases.  A
    hold's waiting requests are grouped by the server the pool placed their
    keys on (:class:`PlacedHold`; ``held_with(key, slot)`` is that server's index,
    or None for a key that goes to its slot's owner whatever comes next —
    its server is done, or is that owner), so what it releases has one target; a
    fragment that still has several (a one-slot multi-key command whose keys
    the pool had placed on different servers) is refused rather than
    half-served.  ``toward(source, slot)``: the same target for the keys of
    ``slot`` that the pool placed on ``source`` (what a MigratingSlot from
    ``source`` asks once a move is answered: the slot alone would name this
    stand-in, which would give the request back to it).  ``home(key)``: the
    name of the server a key's pub/sub channel lives on (where PUBLISH of it
    goes: its placed server while that is ``legacy``, else its slot's owner).
    """

    __slots__ = ("name", "cluster", "pick", "toward", "home", "held_with", "draining", "_answer")

    def __init__(self, cluster: str, pick: Callable[[bytes, int], Any], answer: Answer,
                 toward: Callable[[Any, int], Any], home: Callable[[bytes], Optional[str]] = lambda key: None,
                 held_with: Callable[[bytes, int], Optional[int]] = lambda key, slot: None) -> None:
        self.name = "adopted-placement"
        self.cluster = cluster
        self.pick = pick
        self.toward = toward
        self.home = home
        self.held_with = held_with
        # slot -> the Draining in front of its owner for a done server's MigratingSlot that still lets out a
        # client's line
        self.draining: Dict[int, Any] = {}
        self._answer = answer

    def send(self, request: Request) -> None:
        keys = keys_of(request)
        if not keys:
            self._answer(request, f"cluster '{self.cluster}': a keyless request reached the adopted placement",
                         "TRYAGAIN")
            return
        pick = self.pick
        target = pick(keys[0], slot_of(keys[0]))
        if any(pick(key, slot_of(key)) is not target for key in keys[1:]):
            self._answer(request, f"cluster '{self.cluster}': this command's keys were on different servers of the "
                                  "adopted pool and are not all moved yet; try again", "TRYAGAIN")
            return
        target.send(request)


class PlacedHold:
    """A slot's hold as the keys of one server of the adopted pool see it.

    The codec splits MGET, MSET, DEL... by target object: the keys of one
    held slot that the pool had placed on different servers must fall into
    different pieces, because once released each piece goes to one target
    (its server, the slot's MigratingSlot from it, or the slot's owner).
    Requests wait on the hold itself, in arrival order.
    """

    __slots__ = ("hold", "send", "name", "slot")

    def __init__(self, hold: HeldSlot) -> None:
        self.hold = hold
        self.send = hold.send
        self.name = hold.name
        self.slot = hold.slot


def build_placement(cluster: str, clock: Any, answer: Answer, table: Any, servers: Dict[str, Any],
                    place: Callable[[bytes], int], migrating_before: Dict[int, Any], migrating_now: Dict[int, Any],
                    hold_seconds: float, auth: Optional[Credentials], slot_route: Callable[[int], Any],
                    batcher: Optional[Callable[[Any, Any], Any]] = None,
                    draining_before: Sequence[Any] = (), warming: bool = False) -> AdoptedPlacement:
    """The stand-in of an adopted pool's slots; fills ``migrating_now`` with the MigratingSlots of the
    server whose keys move (kept from ``migrating_before`` where the move is the same).

    ``place(key)`` is the pool's own placement (an index into its server
    list); ``slot_route(slot)`` is where a slot's requests go now (the
    routing's ``target_for_slot``); ``batcher(source, target)`` the move's
    :class:`~twinproxy.cluster.movebatch.MoveBatcher` (None: none);
    ``draining_before``: MigratingSlots the last table let out (a done
    server's, whose lines were not empty yet).  A MigratingSlot dropped
    while a client's requests wait in its line stands, behind a
    :class:`~twinproxy.cluster.migrating.Draining`, in front of its slot's
    owner for the done servers' keys until the line is empty; while the
    session is not trusted the moving server's are kept (not routed to), so
    that the next trusted table goes on with their lines.  ``warming``: a
    memcache cluster's (a :class:`WarmingSlot` per slot of the moving server
    instead: its source that server, its target the slot's owner).
    """
    sources = [servers[name] for name in table.legacy_names]
    states: Sequence[str] = table.adopt_states
    owners = [servers[name] if name is not None else None for name in table.owners]
    fenced = table.fenced
    moving: List[Any] = [None] * SLOT_COUNT

    def toward_source(source: Any, slot: int) -> Any:
        now = slot_route(slot)
        return now.toward(source, slot) if isinstance(now, AdoptedPlacement) else now

    for index, state in enumerate(states):
        if state != "moving":
            continue
        source = sources[index]
        if fenced:
            for slot, before in migrating_before.items():
                if before.source is source:
                    migrating_now[slot] = before
            continue
        for slot, owner in enumerate(owners):
            if owner is None or owner is source:
                continue
            target = migrating_before.get(slot)
            if warming:
                if not isinstance(target, WarmingSlot) or not target.same_move(source, owner):
                    target = WarmingSlot(slot, source, owner, answer, partial(toward_source, source), clock)
            elif target is None or not target.same_move(source, owner, 0, auth, hold_seconds):
                target = MigratingSlot(slot, source, owner, 0, auth, answer, partial(toward_source, source),
                                       clock=clock, wait_limit=hold_seconds,
                                       batcher=batcher(source, owner) if batcher is not None else None)
            moving[slot] = migrating_now[slot] = target
    kept = {id(target) for target in migrating_now.values()}
    draining: Dict[int, Any] = {}
    for before in [*migrating_before.values(), *draining_before]:
        if id(before) not in kept and isinstance(before, MigratingSlot) and before.has_lines \
                and owners[before.slot] is not None:
            draining[before.slot] = Draining(before, owners[before.slot])
            before.on_empty = partial(_drained, draining, before.slot, draining[before.slot])
    fenced_holds: Dict[int, HeldSlot] = {}

    def fenced_hold(slot: int) -> HeldSlot:
        """Moving, but without a trusted session its state is unknown: as a held slot's (one per slot)."""
        hold = fenced_holds.get(slot)
        if hold is None:
            hold = fenced_holds[slot] = HeldSlot(slot, cluster, clock, hold_seconds, answer)
            hold.fenced = True
        return hold

    def toward(index: int, slot: int) -> Any:
        """Where the keys of ``slot`` that the pool placed on its ``index``-th server go."""
        state = states[index]
        if state == "done":
            return draining.get(slot) or owners[slot]
        source = sources[index]
        if state == "legacy" or owners[slot] is source:
            return source
        return moving[slot] if not fenced else fenced_hold(slot)

    def pick(key: bytes, slot: int) -> Any:
        index = place(key)
        if states[index] == "legacy":
            return sources[index]
        return toward(index, slot)

    index_of = {server.name: index for index, server in enumerate(sources)}

    def toward_placed(source: Any, slot: int) -> Any:
        index = index_of.get(source.name)
        return toward(index, slot) if index is not None else owners[slot]

    def home(key: bytes) -> Optional[str]:
        index = place(key)
        if states[index] == "legacy":
            return sources[index].name
        owner = owners[slot_of(key)]
        return owner.name if owner is not None else None

    def held_with(key: bytes, slot: int) -> Optional[int]:
        # A key whose server is done, or was placed on its slot's owner, goes to that owner whatever comes
        # next (owners do not change during an adoption, and a done server stays done): with the hold itself.
        index = place(key)
        if states[index] == "done" or sources[index] is owners[slot]:
            return None
        return index

    placement = AdoptedPlacement(cluster, pick, answer, toward_placed, home, held_with)
    placement.draining = draining     # kept current: each empties itself out of it (_drained)
    return placement


def _drained(draining: Dict[int, Any], slot: int, let_out: Any) -> None:
    # Its lines are empty: the slot's owner takes the done servers' keys directly again.
    if draining.get(slot) is let_out:
        del draining[slot]


def adopted_route(table: List[Any], placement: AdoptedPlacement, lease: List[float], stalled: Callable[[], None],
                  now: Callable[[], float]) -> Callable[[bytes], Any]:
    """Route an adopted pool's keys by ``placement``, save a slot a hold or the lease stands in for; a held
    slot's keys by (slot, the server the pool placed them on) (see :class:`PlacedHold`)."""
    pick = placement.pick
    held_with = placement.held_with
    views: Dict[Tuple[int, int], PlacedHold] = {}

    def adopted_route(key: bytes) -> Any:
        if now() > lease[0]:
            stalled()
        slot = slot_of(key)
        target = table[slot]
        if target is placement:
            return pick(key, slot)
        if not isinstance(target, HeldSlot):
            return target
        index = held_with(key, slot)
        if index is None:
            return target
        view = views.get((slot, index))
        if view is None or view.hold is not target:
            view = views[(slot, index)] = PlacedHold(target)
        return view

    return adopted_route
