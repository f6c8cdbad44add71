"""Codis's rebalance: an even spread of the 1024 slots over the groups that have servers.

Owns :func:`rebalance_plan` (codis.md §2 "Rebalance", written afresh from
that description) and helpers splitting a plan into what needs data moved
and what does not.  Pure: no Twisted, no I/O.

The algorithm, with ``n`` groups that have servers:

1. ``lower = 1024 // n``, ``upper = ceil(1024 / n)``.
2. Slots in a change stay where they are: those of a migration that has not
   ended (pending ones too, whose slots are still stable) count toward the
   group the migration ends at, as Codis counts a slot with an action for
   its target; other slots whose state is not ``stable`` (held by a
   promote) count toward their owner.  So a rebalance asked again while its
   migrations are queued or running plans nothing twice.
3. Walking the other stable slots in order, a group keeps each slot while it
   has fewer than ``lower``; the rest of its slots may be given away.
4. Each offline slot goes to the currently smallest group (size, then id).
5. Then one slot at a time moves from the largest group (size, then id) to
   the smallest, until the sizes differ by at most one, the largest is at
   ``lower`` or the smallest at ``upper``.  A group with nothing left to
   give drops out.
6. Sources give up their highest-numbered slots; the slots on the move
   (offline ones and given-up ones, in slot order) are dealt to the
   receiving groups in id order, each taking as many as it gains.

The result maps each slot that changes owner to its new group.  A slot that
was offline needs no data moved (:func:`placements`: the dashboard assigns
them in one generation); one that had an owner does (:func:`moves`):
:func:`move_runs` cuts those into the ranges of one source and one target
group, one slot migration each.
"""

from __future__ import annotations

from typing import Any, Dict, List

from twinproxy.cluster.model import Topology, TopologyError
from twinproxy.cluster.slots import SLOT_COUNT


def rebalance_plan(topology: Topology) -> Dict[int, int]:
    """``{slot: new group}`` for every slot the even spread moves; {} when already even.

    TopologyError (409) when no group has a server.
    """
    gids = sorted(group.id for group in topology.groups if group.servers)
    if not gids:
        raise TopologyError("no group has a server: add groups and servers before rebalancing", 409)
    lower = SLOT_COUNT // len(gids)
    upper = -(-SLOT_COUNT // len(gids))
    kept = {gid: 0 for gid in gids}        # slots a group keeps for sure
    spare: Dict[int, List[int]] = {gid: [] for gid in gids}   # slots it could give away, ascending
    net = {gid: 0 for gid in gids}         # slots given away (+) or received (-) so far
    offline: List[int] = []

    def size(gid: int) -> int:
        return kept[gid] + len(spare[gid]) - net[gid]

    # Where each slot of a migration that has not ended goes: it is in a change even while pending.
    ends_at: Dict[int, int] = {}
    for m in topology.migrations:
        if not m.ended:
            for slot in m.slot_range:
                ends_at[slot] = m.target
    for slot, (owner, state) in enumerate(topology.slots):
        if owner is not None and owner not in kept:
            # Impossible for a valid topology (an owner has servers); never plan around it.
            raise TopologyError(f"slot {slot} belongs to group {owner}, which has no servers", 409)
        if slot in ends_at:
            # Counted for where it ends up (its owner, should that group have lost its servers meanwhile).
            target = ends_at[slot]
            kept[target if target in kept else owner] += 1
        elif owner is not None and state != "stable":
            kept[owner] += 1           # in a change: counted first, never moved
    for slot, (owner, state) in enumerate(topology.slots):
        if state != "stable" or slot in ends_at:
            continue
        if owner is None:
            offline.append(slot)
        elif size(owner) < lower:
            kept[owner] += 1
        else:
            spare[owner].append(slot)

    def smallest(among: List[int]) -> int:
        return min(among, key=lambda gid: (size(gid), gid))

    for _ in offline:
        net[smallest(gids)] -= 1

    active = list(gids)
    while len(active) >= 2:
        source = max(active, key=lambda gid: (size(gid), gid))
        if net[source] >= len(spare[source]):
            active.remove(source)      # it has nothing more to give
            continue
        target = smallest([gid for gid in active if gid != source])
        if size(source) <= lower or size(target) >= upper or size(source) - size(target) <= 1:
            break
        net[source] += 1
        net[target] -= 1

    moving = list(offline)
    for gid in gids:
        if net[gid] > 0:
            moving.extend(spare[gid][len(spare[gid]) - net[gid]:])   # its highest-numbered slots
    moving.sort()
    plan: Dict[int, int] = {}
    for gid in gids:
        for _ in range(-net[gid]):
            if not moving:
                break
            plan[moving.pop(0)] = gid
    return plan


def placements(topology: Topology, plan: Dict[int, int]) -> Dict[int, int]:
    """The entries of ``plan`` for offline slots: assigning them moves no data."""
    return {slot: gid for slot, gid in plan.items() if topology.slots[slot][0] is None}


def moves(topology: Topology, plan: Dict[int, int]) -> Dict[int, int]:
    """The entries of ``plan`` for owned slots: their keys would have to be migrated."""
    return {slot: gid for slot, gid in plan.items() if topology.slots[slot][0] is not None}


def move_runs(topology: Topology, plan: Dict[int, int]) -> List[Dict[str, Any]]:
    """The owned slots of ``plan`` as runs ``{"first", "last", "from_group", "group"}``: one migration each.

    A run is consecutive slots with the same owner now and the same new
    group; in slot order.
    """
    found: List[Dict[str, Any]] = []
    for slot in sorted(moves(topology, plan)):
        source, target = topology.slots[slot][0], plan[slot]
        last = found[-1] if found else None
        if last is not None and last["last"] == slot - 1 and (last["from_group"], last["group"]) == (source, target):
            last["last"] = slot
        else:
            found.append({"first": slot, "last": slot, "from_group": source, "group": target})
    return found


def plan_runs(plan: Dict[int, int]) -> List[Dict[str, Any]]:
    """A plan as runs ``{"first", "last", "group"}`` of consecutive slots going to the same group."""
    ordered = sorted(plan)
    found: List[Dict[str, Any]] = []
    for slot in ordered:
        if found and found[-1]["last"] == slot - 1 and found[-1]["group"] == plan[slot]:
            found[-1]["last"] = slot
        else:
            found.append({"first": slot, "last": slot, "group": plan[slot]})
    return found


__all__ = ["move_runs", "moves", "placements", "plan_runs", "rebalance_plan"]
