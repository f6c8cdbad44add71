"""The manual promote: Codis's two-phase barrier (codis.md §7.2) on stock Redis.

Owns :func:`run`, which the controller calls (as its one operation in
progress) for ``promote(gid, addr)`` and to finish a promote that a dead
or interrupted dashboard left in the topology:

1. write the group's slots ``held`` with ``change = {"op": "promote",
   "group", "server", "step": "held"}`` and wait for every proxy: each now
   holds requests for those slots and has drained what was in flight, so
   the old master takes no more writes through the cluster;
2. make sure the replica has everything the old master acknowledged: its
   ``slave_repl_offset`` reaches the master's ``master_repl_offset``
   (within ``catchup_timeout``); an unreachable old master cannot take
   writes (the slots are held), so that check is skipped then;
3. ``SENTINEL REMOVE`` the group (so no sentinel fights the switch),
   ``REPLICAOF NO ONE`` on the new master, the old master (if it answers)
   and the other replicas ``REPLICAOF`` the new one;
4. write the group reordered (the new master first, the old one last),
   its slots ``stable`` and no change, wait for every proxy; sentinels then
   monitor the new master.

A failure before the switch (3) releases the hold (the original order,
stable) and reports why.  After the switch the promote is only ever
finished, never undone: if step 4 cannot be written the slots stay held and
running the same promote again (or the dashboard regaining its lock, or a
new dashboard starting) finishes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List

from twisted.internet import defer
from twisted.internet.task import deferLater

from twinproxy.dashboard.errors import OperationError
from twinproxy.dashboard.servers import ServerError, ServerUnreachable, replicates

if TYPE_CHECKING:
    from twinproxy.dashboard.controller import Controller

CATCH_UP_POLL = 0.05   # seconds between two looks at the replica's offset


@defer.inlineCallbacks
def run(ctl: "Controller", gid: int, addr: str, resumed: bool) -> Any:
    """Promote ``addr`` in group ``gid`` (``resumed``: the hold is already written)."""
    ctl.check_writable()
    current = ctl.current()
    change = current.change
    if change and change.get("op") == "promote" and change.get("group") == gid and change.get("server") == addr:
        resumed = True          # the same promote again: finish it
    ctl.dry(lambda: current.promote(gid, addr))
    group = current.group(gid)
    old = group.master
    if resumed:
        held = current
    else:
        ctl.dry(lambda: current.hold_group(gid, {}))
        step = {"op": "promote", "group": gid, "server": addr, "step": "held"}
        held = yield ctl.write(lambda t: t.hold_group(gid, step))
    problems: List[str] = []
    try:
        yield ctl.wait_acks(held, f"the hold of group {gid}'s {len(held.slots_of(gid))} slots")
        caught = yield catch_up(ctl, old, addr, resumed)
        if held.sentinels:
            problems += yield ctl.sentinels.unmonitor_all(held.sentinels, gid)
        if not caught.get("already_master"):
            try:
                yield ctl.admin.replicate(addr, None)
            except ServerError as err:
                raise OperationError(502, f"REPLICAOF NO ONE failed on {addr}: {err}")
    except OperationError as err:
        note = yield release(ctl, gid)
        raise OperationError(err.status, f"promote of {addr} in group {gid} abandoned: {err.message}; {note}",
                             err.extra)
    # The switch is made: from here on the promote is finished, never undone.
    repointed = []
    for other in [old] + [server for server in group.replicas if server != addr]:
        try:
            yield ctl.admin.replicate(other, addr)
            repointed.append(other)
        except ServerError as err:
            problems.append(f"{other} was not pointed at the new master {addr}: {err}")
    try:
        final = yield ctl.write(lambda t: t.promote(gid, addr))
    except OperationError as err:
        raise OperationError(err.status, f"{addr} is the master of group {gid} now, but the topology saying so "
                             f"could not be written ({err.message}); its slots stay held: run the same promote "
                             "again to finish it", err.extra)
    if final.sentinels:
        problems += yield ctl.sentinels.monitor_all(final, gid)
    yield ctl.wait_acks(final, f"promote of {addr} in group {gid}")
    return {"ok": True, "generation": final.generation, "group": gid, "master": addr, "old_master": old,
            "repointed": repointed, "catch_up": caught, "problems": problems}


@defer.inlineCallbacks
def catch_up(ctl: "Controller", old: str, new: str, resumed: bool) -> Any:
    """Wait until ``new`` has all ``old`` acknowledged; what was found, or OperationError (409/502)."""
    found: Dict[str, Any] = {}
    try:
        master = yield ctl.admin.replication(old)
    except ServerUnreachable as err:
        master = None
        found["old_master"] = f"unreachable ({err}): promoting without comparing offsets"
    except ServerError as err:
        # It is alive and may hold writes the replica lacks: without its offset, no promote.
        raise OperationError(502, f"cannot tell what the master {old} has: {err}")
    try:
        replica = yield ctl.admin.replication(new)
    except ServerError as err:
        raise OperationError(502, f"cannot reach {new}, the server to promote: {err}")
    old_is_master = master is not None and master.role == "master"
    if replica.role == "master":
        if resumed or not old_is_master:
            found["already_master"] = True      # switched already (by this promote, or by hand)
            return found
        raise OperationError(409, f"{new} is a master itself, not a replica of {old}: promoting it would lose "
                             f"the writes on {old}")
    if not old_is_master:
        if master is not None:
            found["old_master"] = f"{old} is not a master any more: nothing to compare"
        return found
    if not (yield replicates(ctl.admin, new, replica, old, master)):
        shown = f"{replica.master[0]}:{replica.master[1]}" if replica.master else "nothing"
        raise OperationError(409, f"{new} replicates {shown}, not the group's master {old}: promoting it would "
                             f"lose the writes on {old}")
    target = master.offset
    deadline = ctl.reactor.seconds() + ctl.catchup_timeout
    while replica.offset < target:
        if ctl.reactor.seconds() >= deadline:
            raise OperationError(409, f"{new} did not catch up with {old} within {ctl.catchup_timeout:g}s "
                                 f"(replica offset {replica.offset} of {target}, link "
                                 f"{'up' if replica.link_up else 'down'}): not promoting it, so that no write "
                                 f"{old} acknowledged is lost")
        yield deferLater(ctl.reactor, CATCH_UP_POLL, lambda: None)
        try:
            replica = yield ctl.admin.replication(new)
        except ServerError as err:
            raise OperationError(502, f"lost {new}, the server to promote, while it caught up: {err}")
    found.update(master_offset=target, replica_offset=replica.offset)
    return found


@defer.inlineCallbacks
def release(ctl: "Controller", gid: int) -> Any:
    """Write the hold off (the original order, stable); a note saying how that went (never raises)."""
    try:
        released = yield ctl.write(lambda t: t.release())
    except OperationError as err:
        return (f"releasing the hold failed too ({err.message}): the slots stay held until the dashboard can "
                "write again (run the same promote again to finish or release it)")
    if released.sentinels:
        # Step 3 may have told the sentinels to forget the group: the old master is the master again.
        yield ctl.sentinels.monitor_all(released, gid)
    try:
        yield ctl.wait_acks(released, "the release of the hold")
    except OperationError as err:
        return f"the hold is released (generation {released.generation}), but {err.message}"
    return f"the hold is released (generation {released.generation}), nothing else changed"
