"""Which migrations may run side by side: the scheduling rules of the topology's migration queue.

Owns :func:`startable` (the pending migrations that may start now, per
group first come first served), :func:`may_start_with` (why one may not
start beside those past pending), :func:`moving_cycle` (migrations whose
sources would ``MIGRATE`` into each other) and :func:`groups_of`.  Pure
functions of a :class:`~twinproxy.cluster.model.Topology`; the edits that
use them are in :mod:`twinproxy.cluster.migrations`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Collection, Dict, List, Optional

if TYPE_CHECKING:
    from twinproxy.cluster.model import Topology

Migration = Any   # twinproxy.cluster.migrations.Migration (imported there from here)


def startable(topology: Topology, skip: Collection[int] = ()) -> List[int]:
    """Ids of the pending migrations that may start now, in order.

    Per group, first come first served: a pending migration starts when
    :func:`may_start_with` lets it beside the migrations past pending, its
    groups are under no promote, and no earlier pending one (except those in
    ``skip``: paused) has a claim on them: an earlier one's source is its
    alone, and an earlier one's target may be shared as a target but is no
    later one's source (the later one would start first and make the earlier
    one wait behind it).
    """
    change = topology.change or {}
    claimed = {change["group"]} if change.get("group") is not None else set()   # no other may use them
    targets: set = set()      # the targets of the earlier pending ones: shared as targets only
    found = []
    for m in topology.migrations:
        if m.state not in ("pending", "preparing") or m.id in skip:
            continue
        groups = groups_of(topology, m)
        if m.adopt:
            blocked = bool(groups & (claimed | targets))
        else:
            blocked = m.from_group in claimed or m.from_group in targets or m.to_group in claimed
        if not blocked and may_start_with(topology, m) is None:
            found.append(m.id)
        if m.adopt:
            claimed |= groups
        else:
            claimed.add(m.from_group)
            targets.add(m.to_group)
    return found


def moving_cycle(active: List[Migration]) -> List[Migration]:
    """Migrations whose source -> target edges form a circle (empty when none do).

    ``MIGRATE`` blocks its source until the target has loaded the keys: two
    servers each migrating into the other (or a longer circle) wait on each
    other until the timeout.  A chain or a shared target is fine.
    """
    edges: Dict[int, List[Migration]] = {}
    for m in active:
        edges.setdefault(m.source, []).append(m)
    state: Dict[int, int] = {}      # 1: on the current path, 2: done
    path: List[Migration] = []

    def visit(gid: int) -> bool:
        state[gid] = 1
        for m in edges.get(gid, ()):
            path.append(m)
            if state.get(m.target) == 1 or (m.target not in state and visit(m.target)):
                return True
            path.pop()
        state[gid] = 2
        return False

    for gid in sorted(edges):
        if gid not in state and visit(gid):
            return path
    return []


def may_start_with(topology: Topology, m: Migration) -> Optional[str]:
    """Why pending ``m`` may not start beside the migrations past pending (None: it may).

    Codis lets a group take part in one migration at a time; here several
    may share a **target** (the rebalance onto a new group moves from every
    other group at once), since the danger is a server that is both a
    source and a target: ``MIGRATE``s in a circle block each other.  So the
    source takes part in nothing else, and the target is the source of
    nothing.  A cancel turns a migration around (its target becomes its
    source); with sources exclusive that never closes a circle, and
    :func:`check_migrations` refuses one anyway.
    """
    for other in topology.migrations:
        if not other.active or other.id == m.id:
            continue
        if other.adopt:
            shared = sorted({m.from_group, m.to_group} & groups_of(topology, other))
            if shared:
                return f"group {shared[0]} takes part in adoption {other.id}"
            continue
        if m.from_group in (other.source, other.target):
            return f"group {m.from_group} takes part in migration {other.describe()}"
        if m.to_group == other.source:
            return f"group {m.to_group} is the source of migration {other.describe()}"
    return None


def groups_of(topology: Topology, m: Migration) -> set:
    """The groups ``m`` takes part in: an adoption's are the adopted pool's."""
    if m.adopt:
        return set(topology.adopted.gids) if topology.adopted is not None else {m.from_group}
    return {m.from_group, m.to_group}
