"""The controller's operations that touch more than the topology: servers, proxies, sentinels, rebalance.

Owns the bodies of ``add_server`` (REPLICAOF for a new replica, unless it
already replicates the group's master; Codis's rule: the first server is
the master, left as it is), ``rebalance`` (Codis's plan; only offline slots
are placed until data can move), ``remove_proxy`` (its registration
deleted: after checking that nothing answers at its address, or forced),
``add_sentinel`` / ``remove_sentinel`` (the sentinel configured or told to
forget the cluster, then the list stored and the quorum of the others
updated).  Each is a function of the :class:`Controller`, which runs it as
its one operation in progress; the promote is in ``promote.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, List

from twisted.internet import defer
from twisted.logger import Logger

from twinproxy.cluster.model import Topology
from twinproxy.cluster.planner import moves, placements, plan_runs, rebalance_plan
from twinproxy.coordinator import CoordinatorError, NotFound
from twinproxy.dashboard.errors import OperationError
from twinproxy.dashboard.servers import ServerError, answers, replicates

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
def rebalance(ctl: "Controller", dry_run: bool) -> Any:
    """Codis's plan; unless ``dry_run``, the offline slots of it placed in one generation."""
    current = ctl.current()
    plan = ctl.dry(lambda: rebalance_plan(current))
    placed, moved = placements(current, plan), moves(current, plan)
    result = ctl.ok(current, plan=plan_runs(plan), placements=plan_runs(placed), moves=plan_runs(moved),
                    applied=False)
    if moved:
        result["note"] = (f"{len(moved)} owned slots would move: moving data is not available yet, so only "
                          "offline slots are placed")
    if dry_run or not placed:
        return result

    def edit(topology: Topology) -> Topology:
        return topology.place(placements(topology, rebalance_plan(topology)))

    new = yield ctl.commit(edit, f"{len(placed)} offline slots placed")
    result.update(generation=new.generation, applied=True)
    return result


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
