"""The manual promote: Codis's two-phase barrier (codis.md §7.2) on stock Redis, and its recovery.

Owns :func:`run`, which the controller calls (as its one operation in
progress) for ``promote(gid, addr)``, and :class:`Recovery`, which finishes
or rolls back, without anyone asking, a promote left in the topology:

1. write the group's slots ``held`` with ``change = {"op": "promote",
   "group", "server", "step": "held"}`` and wait for every proxy: each now
   holds requests for those slots and has drained what was in flight, so
   the old master takes no more writes through the cluster;
2. make sure the replica has everything the old master acknowledged: its
   ``slave_repl_offset`` reaches the master's ``master_repl_offset``
   (within ``catchup_timeout``).  The check is skipped only when the old
   master refuses connections (nothing runs there); one that does not answer
   in time may be a slow live master with writes the replica lacks, so the
   promote fails then (502);
3. with sentinels (``topology.sentinels``): ``SENTINEL REMOVE`` the group on
   every sentinel (a majority must confirm, or no switch), so none fights it;
4. ``REPLICAOF NO ONE`` on the new master — one that got no reply is asked
   what it is before anything else: a master now means the switch is made;
   the old master (if it answers) and the other replicas ``REPLICAOF`` it;
5. with sentinels: ``SENTINEL MONITOR`` the new master on every sentinel and
   check with ``GET-MASTER-ADDR-BY-NAME`` that a majority names it.  Proxies
   whose cluster has sentinels take a group's master from them, so the slots
   are released only once the sentinels agree with the topology (502 and the
   slots stay held otherwise, until they do);
6. write the group reordered (the new master first, the old one last), its
   slots ``stable`` and no change, wait for every proxy.

The lock is checked right before each irreversible step (each sentinel's
REMOVE and MONITOR, REPLICAOF NO ONE, each repoint): a dashboard that lost
it stops there (503) and leaves the promote to whoever holds the lock.

A failure before the switch releases the hold (the original order,
stable), after re-reading the topology: a write that failed may have landed.
A resumed promote (the hold found in the topology) releases it only while
the old master is still a master and the new one is not: otherwise it may
have switched already, so it keeps the slots held and tries again.  After
the switch the promote is only ever finished, never undone.  Whatever
is left in the topology — a release or a last write that failed, a write
whose outcome is unknown, a dashboard that died — :class:`Recovery` takes
up as soon as the controller sees a promote pending with no operation
running (at start, when the lock comes back, when an operation ends, when
the topology changes): it re-reads the topology and releases a promote this
dashboard abandoned, or finishes any other (``run`` resumed: the servers are
asked what they are now); when that fails it tries again after a delay
doubling from 0.2 s to 5 s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from twisted.internet import defer
from twisted.internet.task import deferLater

from twinproxy.cluster.model import Topology
from twinproxy.dashboard.errors import OperationError
from twinproxy.dashboard.sentinels import quorum
from twinproxy.dashboard.servers import ServerDown, ServerError, ServerRefused, replicates

if TYPE_CHECKING:
    from twinproxy.dashboard.controller import Controller

CATCH_UP_POLL = 0.05   # seconds between two looks at the replica's offset (or role)


class KeepHeld(OperationError):
    """A failure that must not release the hold: the switch may be made already."""


def _still_ours(ctl: "Controller", step: str) -> Callable[[], None]:
    """A check that raises OperationError 503 when the lock is lost (to run right before ``step``)."""
    def check() -> None:
        try:
            ctl.check_writable()
        except OperationError as err:
            raise OperationError(503, f"stopped before {step}: {err.message}")
    return check


@defer.inlineCallbacks
def run(ctl: "Controller", gid: int, addr: str, resumed: bool) -> Any:
    """Promote ``addr`` in group ``gid`` (``resumed``: the hold is already written)."""
    ctl.check_writable()
    current = ctl.current()
    change = current.change
    if change and change.get("op") == "promote" and change.get("group") == gid and change.get("server") == addr:
        if not resumed:
            ctl.recovery.forget()     # asked again: finish it, even one this dashboard gave up
        resumed = True
    ctl.dry(lambda: current.promote(gid, addr))
    group = current.group(gid)
    old = group.master
    step = dict(change) if resumed else {"op": "promote", "group": gid, "server": addr, "step": "held"}
    if not resumed:
        ctl.dry(lambda: current.hold_group(gid, {}))
    problems: List[str] = []
    try:
        # Inside the try: a write that failed (a deadline passed) may have landed all the same.
        held = current if resumed else (yield ctl.write(lambda t: t.hold_group(gid, step)))
        yield _wait_hold(ctl, held, gid, addr, old, resumed)
        caught = yield catch_up(ctl, old, addr, resumed)
        if held.sentinels:
            problems += yield _forget_in_sentinels(ctl, held.sentinels, gid)
        if not caught.get("already_master"):
            _still_ours(ctl, f"REPLICAOF NO ONE on {addr}")()
            problems += yield _make_master(ctl, addr, old, caught)
    except KeepHeld as err:
        raise OperationError(err.status, f"promote of {addr} in group {gid} not finished: {err.message}; its slots "
                             "stay held: the dashboard tries again by itself", err.extra)
    except OperationError as err:
        note = yield abandon(ctl, gid, step)
        raise OperationError(err.status, f"promote of {addr} in group {gid} abandoned: {err.message}; {note}",
                             err.extra)
    # The switch is made: from here on the promote is finished, never undone.
    try:
        repointed = []
        for other in [old] + [server for server in group.replicas if server != addr]:
            _still_ours(ctl, f"pointing {other} at {addr}")()
            try:
                yield ctl.admin.replicate(other, addr)
                repointed.append(other)
            except ServerError as err:
                problems.append(f"{other} was not pointed at the new master {addr}: {err}")
        agreeing: List[str] = []
        if held.sentinels:
            agreeing, more = yield _follow_in_sentinels(ctl, ctl.dry(lambda: held.promote(gid, addr)), gid, addr)
            problems += more
        final = yield ctl.write(lambda t: t.promote(gid, addr))
    except OperationError as err:
        raise OperationError(err.status, f"{addr} is the master of group {gid} now, but the promote could not be "
                             f"finished ({err.message}); its slots stay held until it is: the dashboard holding the "
                             "lock tries again by itself (running the same promote again finishes it too)", err.extra)
    yield ctl.wait_acks(final, f"promote of {addr} in group {gid}")
    return {"ok": True, "generation": final.generation, "group": gid, "master": addr, "old_master": old,
            "repointed": repointed, "catch_up": caught, "sentinels": agreeing, "problems": problems}


@defer.inlineCallbacks
def _wait_hold(ctl: "Controller", held: Topology, gid: int, addr: str, old: str, resumed: bool) -> Any:
    """Every proxy acknowledges the hold; a resumed promote that may have switched keeps it if they do not."""
    try:
        yield ctl.wait_acks(held, f"the hold of group {gid}'s {len(held.slots_of(gid))} slots")
    except OperationError as err:
        if resumed:
            # Released, the slots go back to the old master: only if it is one (as in catch_up).
            roles = []
            for server in (addr, old):
                try:
                    roles.append((yield ctl.admin.replication(server)).role)
                except ServerError:
                    roles.append(None)
            if roles[0] == "master" or roles[1] != "master":
                raise KeepHeld(err.status, f"{err.message} ({addr} is {roles[0] or 'not answering'}, {old} is "
                               f"{roles[1] or 'not answering'}: no master to go back to)", err.extra)
        raise


@defer.inlineCallbacks
def catch_up(ctl: "Controller", old: str, new: str, resumed: bool) -> Any:
    """Wait until ``new`` has all ``old`` acknowledged; what was found, or OperationError (409/502)."""
    found: Dict[str, Any] = {}
    try:
        master = yield ctl.admin.replication(old)
    except ServerDown as err:
        # Nothing runs there: it takes no writes, and what it did not replicate is lost with it.
        master = None
        found["old_master"] = f"unreachable ({err}): promoting without comparing offsets"
    except ServerError as err:
        # It may be alive (slow, or cut off) and hold writes the replica lacks: without its offset, no promote.
        raise OperationError(502, f"cannot tell what the master {old} has ({err}): not promoting, so that no write "
                             f"it acknowledged is lost (only a master that refuses connections is passed over)")
    old_is_master = master is not None and master.role == "master"
    try:
        replica = yield ctl.admin.replication(new)
    except ServerError as err:
        if resumed and not old_is_master:
            # Perhaps switched already, and the old master repointed: releasing would send writes to a replica.
            raise KeepHeld(502, f"cannot reach {new}, the server to promote, and {old} is no master to go back to: "
                           f"{err}")
        raise OperationError(502, f"cannot reach {new}, the server to promote: {err}")
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
def _forget_in_sentinels(ctl: "Controller", sentinels: Tuple[str, ...], gid: int) -> Any:
    """``SENTINEL REMOVE`` the group everywhere before the switch; OperationError 502 unless a majority did."""
    problems = yield ctl.sentinels.unmonitor_all(sentinels, gid, before=_still_ours(ctl, "SENTINEL REMOVE"))
    done = len(sentinels) - len(problems)
    if done < quorum(sentinels):
        raise OperationError(502, f"only {done} of {len(sentinels)} sentinels forgot {ctl.sentinels.name(gid)} "
                             f"(a majority must before the switch): {'; '.join(problems)}")
    return problems


@defer.inlineCallbacks
def _make_master(ctl: "Controller", addr: str, old: str, caught: Dict[str, Any]) -> Any:
    """``REPLICAOF NO ONE`` on ``addr``; the notes, or OperationError 502 when it is not a master after it."""
    try:
        yield ctl.admin.replicate(addr, None)
        return []
    except (ServerRefused, ServerDown) as err:
        raise OperationError(502, f"REPLICAOF NO ONE failed on {addr}: {err}")
    except ServerError as err:
        lost = err
    # No reply: it may have switched all the same.  Going back would leave two masters then.
    role = yield _role(ctl, addr)
    if role == "master":
        return [f"REPLICAOF NO ONE on {addr} got no reply ({lost}), but {addr} is a master now"]
    rollback = ""
    if role is None and "master_offset" in caught:
        # Not known: point it back at the old master (a no-op if it never switched; nothing written meanwhile).
        try:
            yield ctl.admin.replicate(addr, old)
            rollback = f"; {addr} was told REPLICAOF {old} again"
        except ServerError as err:
            rollback = f"; {addr} could not be told REPLICAOF {old} again either ({err})"
    state = "is still a replica" if role is not None else "does not say what it is now"
    raise OperationError(502, f"REPLICAOF NO ONE on {addr} got no reply ({lost}) and {addr} {state}{rollback}")


@defer.inlineCallbacks
def _role(ctl: "Controller", addr: str) -> Any:
    """What ``addr`` says it is ("master", "slave"), asked until ``catchup_timeout``; None if it does not say."""
    deadline = ctl.reactor.seconds() + max(ctl.catchup_timeout, ctl.command_timeout)
    while True:
        try:
            seen = yield ctl.admin.replication(addr)
            return seen.role
        except ServerError:
            if ctl.reactor.seconds() >= deadline:
                return None
        yield deferLater(ctl.reactor, CATCH_UP_POLL, lambda: None)


@defer.inlineCallbacks
def _follow_in_sentinels(ctl: "Controller", planned: Topology, gid: int, addr: str) -> Any:
    """``SENTINEL MONITOR`` the new master everywhere, then a majority must name it; (agreeing, problems)."""
    sentinels = planned.sentinels
    problems = yield ctl.sentinels.monitor_all(planned, gid, before=_still_ours(ctl, "SENTINEL MONITOR"))
    try:
        agreeing, disagreeing = yield ctl.sentinels.naming(sentinels, gid, addr)
    except ServerError as err:
        raise OperationError(502, f"cannot check what the sentinels name as the master: {err}")
    if len(agreeing) < quorum(sentinels):
        raise OperationError(502, f"only {len(agreeing)} of {len(sentinels)} sentinels name {addr} as the master of "
                             f"{ctl.sentinels.name(gid)}, and a majority must before the slots are released (proxies "
                             f"take the master from them): {'; '.join(problems + disagreeing)}")
    return agreeing, problems + disagreeing


@defer.inlineCallbacks
def abandon(ctl: "Controller", gid: int, step: Dict[str, Any]) -> Any:
    """Release the hold ``step`` if the topology (read again: a failed write may have landed) has it; a note."""
    try:
        yield ctl.reread()
    except OperationError as err:
        ctl.recovery.abandon(step)
        return (f"whether the slots are held is not known ({err.message}): the dashboard releases them by itself "
                "as soon as it can read the topology")
    if ctl.current().change != step:
        return "the slots were not held"
    released, note = yield release(ctl, gid)
    if not released:
        ctl.recovery.abandon(step)
    return note


@defer.inlineCallbacks
def release(ctl: "Controller", gid: int) -> Any:
    """Write the hold off (the original order, stable); (whether it is, a note saying how that went)."""
    try:
        released = yield ctl.write(lambda t: t.release())
    except OperationError as err:
        return False, (f"releasing the hold failed too ({err.message}): the slots stay held until the dashboard "
                       "holding the lock releases them (it tries again by itself)")
    if released.sentinels:
        # Step 3 may have told the sentinels to forget the group: the old master is the master again.
        yield ctl.sentinels.monitor_all(released, gid)
    try:
        yield ctl.wait_acks(released, "the release of the hold")
    except OperationError as err:
        return True, f"the hold is released (generation {released.generation}), but {err.message}"
    return True, f"the hold is released (generation {released.generation}), nothing else changed"


@defer.inlineCallbacks
def recover(ctl: "Controller", recovery: "Recovery") -> Any:
    """Read the topology; release the promote in it that this dashboard abandoned, or finish any other."""
    yield ctl.reread()
    change = ctl.current().change
    if not change or change.get("op") != "promote":
        recovery.forget()
        return None
    if change == recovery.abandoned:
        released, note = yield release(ctl, change["group"])
        if not released:
            raise OperationError(503, f"the abandoned promote of {change.get('server')} in group "
                                 f"{change.get('group')} is still held: {note}")
        recovery.forget()
        return {"ok": True, "released": change, "note": note}
    return (yield run(ctl, change["group"], change["server"], True))


class Recovery:
    """Finishes or rolls back a promote left pending in the topology, with a backoff between tries."""

    FIRST = 0.2        # seconds before the first try
    LONGEST = 5.0      # the delay doubles up to this after each failed try

    def __init__(self, ctl: "Controller") -> None:
        self._ctl = ctl
        self._call: Any = None
        self._delay = self.FIRST
        self._trying = False
        self.abandoned: Optional[Dict[str, Any]] = None   # a change this dashboard gave up: release, not finish
        self.unsure = False     # the topology may hold a change the controller's copy does not show

    def abandon(self, change: Dict[str, Any]) -> None:
        """``change`` may be left in the topology: release it when it can."""
        self.abandoned = dict(change)
        self.unsure = True

    def forget(self) -> None:
        self.abandoned = None

    def check(self) -> None:
        """Try soon when a promote may be pending (the controller calls this whenever that may have changed)."""
        topology = self._ctl.topology
        change = topology.change if topology is not None else None
        if self.unsure or (change and change.get("op") == "promote"):
            self._kick()

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _kick(self) -> None:
        if self._trying or (self._call is not None and self._call.active()) or not self._ctl.writable:
            return      # the try in progress ends by checking again; the lock coming back checks again
        self._call = self._ctl.reactor.callLater(self._delay, self._try)

    def _try(self) -> None:
        self._call = None
        ctl = self._ctl
        if not ctl.writable or ctl.busy is not None:
            return      # the lock coming back, or the end of the operation running, checks again
        change = ctl.topology.change if ctl.topology is not None else None
        name = (f"recover the promote of {change.get('server')} in group {change.get('group')}"
                if change else "look for a pending promote")
        self._trying = True
        ctl._operation(name, recover, ctl, self).addCallbacks(self._done, self._failed)

    def _done(self, result: Any) -> None:
        self._trying = False
        self._delay = self.FIRST
        self.unsure = False

    def _failed(self, failure: Any) -> None:
        self._trying = False
        self._delay = min(self._delay * 2, self.LONGEST)
        self.unsure = True       # logged by the controller; look again after the delay
        self._kick()
