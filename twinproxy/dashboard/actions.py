"""The controller's operations that touch more than the topology: servers, proxies, sentinels, rebalance.

Owns the bodies of ``add_server`` (REPLICAOF for a new replica, unless it
already replicates the group's master; Codis's rule: the first server is
the master, left as it is), ``rebalance`` (Codis's plan: the offline slots
placed in one generation, then one slot migration queued per range of
moved slots with one source and one target group), ``remove_proxy`` (its
registration deleted: after checking that nothing answers at its address,
or forced), ``add_sentinel`` / ``remove_sentinel`` (the sentinel configured
or told to forget the cluster, then the list stored and the quorum of the
others updated).  Each is a function of the :class:`Controller`, which runs
it as its one operation in progress; the promote is in ``promote.py``.

A rebalance asked while migrations are queued or running is planned around
them: the planner counts their slots for the group each ends at, so asking
again queues nothing twice (and after a partial failure queues the rest).
Its migrations are written one by one, each a whole pending migration
(``Migrations.queue``, as ``POST /api/slots/migrate`` writes one), and the
dashboard runs them one group at a time like any other.  If writing one
fails, those written stay queued and the error names them, the one that
failed and the ones not queued (in its ``extra`` too).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional

from twisted.internet import defer
from twisted.logger import Logger

from twinproxy.cluster.migrations import check_parallel, check_rate
from twinproxy.cluster.model import Topology, TopologyError, show_slots
from twinproxy.cluster.planner import move_runs, placements, plan_runs, rebalance_plan
from twinproxy.coordinator import CoordinatorError, NotFound
from twinproxy.dashboard.errors import OperationError
from twinproxy.dashboard.servers import ServerAuthRefused, ServerError, answers, replicates

if TYPE_CHECKING:
    from twinproxy.dashboard.controller import Controller

_log = Logger()

@defer.inlineCallbacks
def add_server(ctl: "Controller", gid: int, addr: str) -> Any:
    """Add ``addr`` to group ``gid``; a Redis replica is pointed at the master first."""
    ctl.check_writable()
    current = ctl.current()
    ctl.dry(lambda: current.add_server(gid, addr))
    master = current.group(gid).master
    notes: List[str] = []
    if ctl.protocol == "redis":
        try:
            replication = yield ctl.admin.replication(addr)
        except ServerAuthRefused as err:
            # It answers, but not to the cluster's credentials: neither the sweep nor the proxies could use it.
            raise OperationError(502, f"cannot add {addr} to group {gid}: {err}")
        except ServerError as err:
            if master is not None:
                raise OperationError(502, f"cannot make {addr} a replica of {master}: {err}")
            replication = None
            notes.append(f"{addr} did not answer ({err}); it is the group's master in the topology")
        if master is not None:
            already = yield replicates(ctl.admin, addr, replication, master)
            if already:
                notes.append(f"{addr} already replicates {master}")
            else:
                try:
                    yield ctl.admin.replicate(addr, master)
                except ServerError as err:
                    raise OperationError(502, f"cannot make {addr} a replica of {master}: {err}")
                notes.append(f"{addr} told REPLICAOF {master}")
        elif replication is not None and replication.role == "slave":
            # Codis's rule: the first server is the master, as it is; say what it really is.
            notes.append(f"{addr} is a replica of {replication.master[0]}:{replication.master[1]}: the "
                         "dashboard leaves it as it is")
    new = yield ctl.write(lambda t: t.add_server(gid, addr))
    problems: List[str] = []
    if master is None and new.sentinels:
        problems = yield ctl.sentinels.monitor_all(new, gid)
    yield ctl.wait_acks(new, f"server {addr} added to group {gid}")
    role = "master" if master is None or ctl.protocol == "memcache" else "replica"
    return ctl.ok(new, group=gid, addr=addr, role=role, notes=notes, problems=problems)


@defer.inlineCallbacks
def rebalance(ctl: "Controller", dry_run: bool, keys_per_second: Optional[int] = None,
              parallel: Optional[int] = None) -> Any:
    """Codis's plan; unless ``dry_run``, its offline slots placed and its moves queued as migrations.

    ``keys_per_second`` / ``parallel`` tune every migration it queues (400
    when out of range).  Waits for a migration step in progress (short)
    rather than being refused, as ``migrate`` does; then runs as one
    operation, so no migration step writes in between.
    """
    ctl.dry(check_rate, keys_per_second)
    ctl.dry(check_parallel, parallel)
    yield ctl.migrator.idle(lambda: False, timeout=ctl.ack_timeout * 2 + 5)
    result = yield ctl._operation("rebalance" + (" (dry run)" if dry_run else ""), _rebalance, ctl, dry_run,
                                  keys_per_second, parallel)
    return result


def _still_offline(placed: Dict[int, int]) -> Any:
    def edit(topology: Topology) -> Topology:
        taken = [slot for slot in placed if topology.slots[slot][0] is not None]
        if taken:
            raise TopologyError(f"slots {show_slots(taken)} were assigned meanwhile: run the rebalance again", 409)
        return topology.place(placed)
    return edit


@defer.inlineCallbacks
def _rebalance(ctl: "Controller", dry_run: bool, keys_per_second: Optional[int], parallel: Optional[int]) -> Any:
    current = ctl.current()
    plan = ctl.dry(lambda: rebalance_plan(current))
    placed, runs = placements(current, plan), move_runs(current, plan)
    result = ctl.ok(current, plan=plan_runs(plan), placements=plan_runs(placed), moves=runs, applied=False,
                    migrations=[])
    notes: List[str] = []
    around = [m.id for m in current.migrations if not m.ended]
    if around:
        notes.append(f"migration {around[0]} has not ended: its slots count for the group it ends at and are not "
                     "planned again" if len(around) == 1 else
                     f"migrations {', '.join(map(str, around))} have not ended: their slots count for the group "
                     "each ends at and are not planned again")
    if notes:
        result["notes"] = notes
    if dry_run or not (placed or runs):
        return result

    # The whole plan tried on a copy first: one that cannot be applied entirely writes nothing.
    def trial(topology: Topology) -> Topology:
        topology = topology.place(placed) if placed else topology
        for run in runs:
            topology = topology.create_migration(run["first"], run["last"], run["group"], keys_per_second,
                                                 parallel)
        return topology

    ctl.check_writable()
    ctl.dry(trial, current)
    if placed:
        try:
            new = yield ctl.commit(_still_offline(placed), f"{len(placed)} offline slots placed")
        except OperationError as err:
            if not runs:
                raise
            # A 504 is a placement written all the same (not acknowledged by every proxy).
            result["applied"] = err.status == 504
            raise OperationError(err.status, f"{err.message}; no migration was queued (run the rebalance again)",
                                 {**err.extra, **_partial(result, [], runs, None)})
        result.update(generation=new.generation, applied=True)
    created: List[Dict[str, Any]] = []
    for index, run in enumerate(runs):
        known = {m.id for m in ctl.current().migrations}
        try:
            new = yield ctl.migrator.queue(run["first"], run["last"], run["group"], keys_per_second, parallel)
        except OperationError as err:
            landed, sure = yield _written(ctl, run, known)
            if landed is not None:
                created.append(ctl.migrator.merged(landed))
                result["applied"] = True
            raise OperationError(err.status, _stopped(placed, created, run, index, runs, err, landed, sure),
                                 {**err.extra, **_partial(result, created, runs[index + 1:],
                                                          {**run, "error": err.message})})
        created.append(ctl.migrator.merged(new.migrations[-1]))
        result.update(generation=new.generation, applied=True)
    result["migrations"] = created
    return result


@defer.inlineCallbacks
def _written(ctl: "Controller", run: Dict[str, Any], known: Any) -> Any:
    """(the migration of ``run`` written despite the error, or None; whether the topology could be read)."""
    sure = True
    try:
        yield ctl.reread()
    except OperationError:
        sure = False
    for m in ctl.current().migrations:
        if m.id not in known and (m.first, m.last, m.to_group) == (run["first"], run["last"], run["group"]):
            return m, True
    return None, sure


def _describe(run: Dict[str, Any]) -> str:
    return f"slots {run['first']}-{run['last']} from group {run['from_group']} to group {run['group']}"


def _stopped(placed: Dict[int, int], created: List[Dict[str, Any]], run: Dict[str, Any],
             index: int, runs: List[Dict[str, Any]], err: OperationError, landed: Any, sure: bool) -> str:
    """The one line a rebalance stopped midway fails with: what was done, what failed, what is left."""
    done = [f"{len(placed)} offline slots placed"] if placed else []
    earlier = [m["id"] for m in created if landed is None or m["id"] != landed.id]
    if earlier:
        done.append(f"migration{'s' if len(earlier) > 1 else ''} {', '.join(map(str, earlier))} queued")
    which = f"migration {index + 1} of {len(runs)} ({_describe(run)})"
    if landed is not None:
        failed = f"{which} was queued as migration {landed.id}, but: {err.message}"
    else:
        maybe = "" if sure else " (it may have been written all the same: see migration status)"
        failed = f"queueing {which} failed: {err.message}{maybe}"
    rest = runs[index + 1:]
    left = ""
    if rest:
        left = f"; not queued: {'; '.join(_describe(other) for other in rest)}"
    if rest or landed is None:
        left += "; run the rebalance again for what is left (it plans around the queued migrations)"
    return "rebalance stopped: " + "".join(part + "; " for part in done) + failed + left


def _partial(result: Dict[str, Any], created: List[Dict[str, Any]], not_queued: List[Dict[str, Any]],
             failed: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The error body's fields of a rebalance stopped midway (``failed``: the run whose migration failed)."""
    return {"plan": result["plan"], "placements": result["placements"], "moves": result["moves"],
            "applied": result["applied"], "migrations": created, "failed": failed, "not_queued": not_queued}


@defer.inlineCallbacks
def remove_proxy(ctl: "Controller", proxy_id: str, force: bool) -> Any:
    """Delete a proxy's registration (unless forced, only if nothing answers at its address)."""
    ctl.check_writable()
    info = ctl.acks.proxies.get(proxy_id)
    if info is None or "/" in proxy_id:
        raise OperationError(404, f"there is no proxy {proxy_id} registered in cluster '{ctl.cluster}'")
    if not force:
        if info.addr is None:
            raise OperationError(409, f"proxy {proxy_id} registered no address to check: use force")
        reason = yield answers(ctl.reactor, ctl.protocol, info.addr, ctl.command_timeout)
        if reason is None:
            raise OperationError(409, f"proxy {proxy_id} still answers at {info.addr}: stop it (its "
                                 "registration then goes by itself), or remove it with force")
    try:
        yield ctl.coordinator.delete(f"{ctl.proxies_path}/{proxy_id}")
    except NotFound:
        pass
    except CoordinatorError as err:
        raise OperationError(503, f"coordinator unavailable: {err}")
    _log.info("cluster {cluster}: proxy {proxy} removed{forced}", cluster=ctl.cluster, proxy=proxy_id,
              forced=" (forced)" if force else "")
    return ctl.ok(ctl.current(), removed=proxy_id)


@defer.inlineCallbacks
def add_sentinel(ctl: "Controller", addr: str) -> Any:
    """Configure the sentinel for every group, then list it (and update the others' quorum)."""
    ctl.check_writable()
    current = ctl.current()
    planned = ctl.dry(lambda: current.add_sentinel(addr))
    try:
        yield ctl.sentinels.configure(addr, current, planned.sentinels)
    except ServerError as err:
        raise OperationError(502, f"cannot configure sentinel {addr}: {err}")
    new = yield ctl.write(lambda t: t.add_sentinel(addr))
    problems = yield ctl.sentinels.set_quorum_all(new)
    yield ctl.wait_acks(new, f"sentinel {addr} added")
    monitored = [ctl.sentinels.name(g.id) for g in new.groups if g.master is not None]
    return ctl.ok(new, addr=addr, monitored=monitored, problems=problems)


@defer.inlineCallbacks
def remove_sentinel(ctl: "Controller", addr: str) -> Any:
    """Tell the sentinel to forget this cluster (if it answers), then drop it from the list."""
    ctl.check_writable()
    ctl.dry(lambda: ctl.current().remove_sentinel(addr))
    problems: List[str] = []
    removed: List[str] = []
    try:
        removed = yield ctl.sentinels.forget_cluster(addr)
    except ServerError as err:
        problems.append(f"sentinel {addr} was not told to forget this cluster: {err}")
    new = yield ctl.write(lambda t: t.remove_sentinel(addr))
    problems += yield ctl.sentinels.set_quorum_all(new)
    yield ctl.wait_acks(new, f"sentinel {addr} removed")
    return ctl.ok(new, addr=addr, unmonitored=removed, problems=problems)
