"""The dashboard's controller: the single writer of one cluster's topology.

Owns :class:`Controller`; the HTTP API, the dashboard command and the admin
CLI sit on top of it.  Its helpers live beside it: ``lock`` (the lock in
the coordinator), ``barrier`` (the proxies' acknowledgements), ``servers``
(Redis/memcached admin commands and health polls), ``sentinels`` (Sentinel
configuration), ``masters`` (each group's confirmed master, Sentinel's
failovers followed), ``promote`` (the two-phase promote), ``migration`` (slot
migrations: their queue, state machine and mover), ``status`` (the status
document).  Everything runs in the reactor thread and never blocks it.

Public API (every Deferred fires in the reactor thread; call everything from it)::

    from twinproxy.dashboard.controller import Controller, ControllerError, LockHeld, OperationError

    Controller(coordinator, cluster, protocol, reactor, ack_timeout=10.0, command_timeout=2.0, *,
               addr=None, poll_period=1.0, catchup_timeout=5.0,
               sentinel_down_after_ms=5000, sentinel_failover_timeout_ms=60000, redis_auth=None)
        # coordinator: from twinproxy.coordinator.connect(), started (and later stopped) by the caller.
        # redis_auth: the data servers' Credentials (every connection AUTHs first), or None.
        # addr: the dashboard's HTTP address "host:port", shown in its lock document and status.
        # ValueError for a bad cluster name or protocol.
    .start(wait=False) -> Deferred[None]
        # Takes /clusters/<c>/dashboard (LockHeld naming the holder; wait=True: until it is free),
        # creates the topology (generation 0) if absent (ControllerError: invalid document, other
        # protocol or cluster, coordinator unavailable), watches the proxies and the topology, polls
        # the servers; finishes a promote a previous dashboard left half done (see promote.Recovery).
    .stop() -> Deferred[None]              # stops polling and waits (they fail 503), releases the lock
    .status() -> dict                      # GET /api/status (contract §5) plus extra fields (status.py)
    .topology -> Optional[Topology]        # the latest document (GET /api/topology: .topology.to_dict())
    .slots(first=0, last=1023) -> dict     # GET /api/slots: {"slots": runs}; OperationError 400
    .proxies() -> list                     # GET /api/proxies: the proxies' status entries, by id
    .writable -> bool; .problem -> Optional[str]   # why writes are refused (503), None when writable
    .busy -> Optional[str]                 # the operation in progress

    # Operations: Deferred[dict] ({"ok": True, "generation": N, ...}) or failing with
    # OperationError(status, message, extra); error.body() is the API's {"error": message, **extra}.
    .add_group(gid)                  -> {..., "group"}
    .remove_group(gid)               -> {..., "group", "problems"}
    .add_server(gid, addr)           -> {..., "group", "addr", "role", "notes", "problems"}
    .remove_server(gid, addr)        -> {..., "group", "addr", "problems"}
    .promote(gid, addr)              -> {..., "group", "master", "old_master", "repointed", "catch_up",
                                             "sentinels" (those naming the new master), "problems"}
    .assign_slots(first, last, gid_or_None, force=False)  -> {..., "slots": runs of first..last}
    .rebalance(dry_run=False, keys_per_second=None, parallel=None)
                                     -> {..., "plan", "placements", "moves", "applied", "migrations"[, "notes"]}
                                        # plan/placements: [{"first","last","group"}]; moves: the same plus
                                        # "from_group", one migration each; the placements written in one
                                        # generation, then each move queued as a migration (entries as in
                                        # migrations()); planned around migrations not ended (actions.py)
    .remove_proxy(proxy_id, force=False) -> {..., "removed"}   # generation unchanged (no topology write)
    .migrate(first, last, gid, keys_per_second=None, parallel=None) -> {..., "migration"}   # queued (pending)
    .migrations()                    -> {"migrations": [entry + progress + "owner"]}      # a read (dict)
    .pause(mid=None) / .resume(mid=None) -> {..., "paused"|"resumed": [ids], "migrations"}  # dicts, no write
    .cancel(mid=None)                -> {..., "migration", "owner", "note"} (one) or {..., "cancelled", "owners"}
    # A migration's own steps run as operations too (twinproxy.dashboard.migration); migrate and rebalance wait for
    # the one in progress instead of being refused, the others get 409 while a step writes.
    .add_sentinel(addr)              -> {..., "addr", "monitored", "problems"}
    .remove_sentinel(addr)           -> {..., "addr", "unmonitored", "problems"}
    # "problems": what failed on the side (a sentinel not answering...) without failing the operation.

Operations run one at a time: one asked for while another runs is refused
at once with 409 naming the one in progress (nothing queues behind a slow
promote).  Every topology write is a compare-and-set on the node's version
(on Conflict: reread, redo the edit, try once more, else 409), increments
the generation by one, then waits until every registered proxy reports that
generation; a proxy that does not within ``ack_timeout`` makes it a 504
naming the laggards in ``extra["lagging"]`` — the change stays written.
Statuses: 400 bad input, 404 unknown group/server/proxy/sentinel, 409
refused by state, 502 a Redis server or sentinel refused or did not answer,
503 no lock / coordinator unavailable, 504 proxies did not acknowledge.
Every failure is logged once (twisted.logger) with its reason.  A promote
left in the topology after its hold was written (the dashboard died; a
write, the release or the last step failed; the lock was lost midway) is
finished — or, if this dashboard abandoned it before the switch, released —
without anyone asking, by ``promote.Recovery``: whenever the controller sees
a pending promote and no operation running (start, the lock regained, an
operation's end, a topology change) it re-reads the topology and acts,
trying again with a backoff (0.2 s doubling to 5 s) while that fails; it
runs as an operation ("recover the promote of ..."), so others get 409
meanwhile.  Running the same promote again finishes it too.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Callable, Dict, List, Optional

from twisted.internet import defer
from twisted.logger import Logger

from twinproxy.cluster.model import CLUSTER_NAME, PROTOCOLS, Topology, TopologyError, check_slot_range
from twinproxy.cluster.paths import proxies_path, topology_path
from twinproxy.coordinator import Conflict, CoordinatorError, NotFound
from twinproxy.credentials import Credentials
from twinproxy.dashboard import actions
from twinproxy.dashboard import promote as promoting
from twinproxy.dashboard.barrier import AcksMissing, ProxyAcks
from twinproxy.dashboard.errors import ControllerError, LockHeld, OperationError
from twinproxy.dashboard.lock import DashboardLock
from twinproxy.dashboard.masters import MasterWatch
from twinproxy.dashboard.migration import Migrations
from twinproxy.dashboard.sentinels import SentinelAdmin
from twinproxy.dashboard.servers import HealthPoller, ServerAdmin
from twinproxy.dashboard.status import status_document

__all__ = ["Controller", "ControllerError", "LockHeld", "OperationError"]


class Controller:
    """One cluster's dashboard logic (see the module docstring for the API)."""

    _log = Logger()

    def __init__(self, coordinator: Any, cluster: str, protocol: str, reactor: Any, ack_timeout: float = 10.0,
                 command_timeout: float = 2.0, *, addr: Optional[str] = None, poll_period: float = 1.0,
                 catchup_timeout: float = 5.0, sentinel_down_after_ms: int = 5000,
                 sentinel_failover_timeout_ms: int = 60000, redis_auth: Optional[Credentials] = None) -> None:
        if not isinstance(cluster, str) or not CLUSTER_NAME.match(cluster):
            raise ValueError(f"cluster name {cluster!r} must be letters, digits, '_', '.', '-'")
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")
        self.coordinator = coordinator
        self.cluster = cluster
        self.protocol = protocol
        self.reactor = reactor
        self.ack_timeout = ack_timeout
        self.command_timeout = command_timeout
        self.catchup_timeout = catchup_timeout
        self.topology_path = topology_path(cluster)
        self.proxies_path = proxies_path(cluster)
        self.dashboard = {"addr": addr, "pid": os.getpid(), "host": socket.gethostname(), "start": time.time()}
        self._topology: Optional[Topology] = None
        # Called with (before, after) whenever another topology document is taken (the web dashboard's events).
        self.topology_listeners: List[Callable[[Optional[Topology], Topology], None]] = []
        self._version: Optional[int] = None
        self.acks = ProxyAcks(reactor)
        # The data servers' credentials: every connection to one authenticates; the sweep's MIGRATE passes them
        # on to the target.  Sentinels have their own (none here): they get an admin without.
        self.redis_auth = redis_auth
        self.admin = ServerAdmin(reactor, command_timeout, redis_auth)
        self.sentinel_admin = ServerAdmin(reactor, command_timeout)
        self.sentinels = SentinelAdmin(reactor, cluster, self.sentinel_admin, sentinel_down_after_ms,
                                       sentinel_failover_timeout_ms, master_auth=redis_auth)
        self.health = HealthPoller(reactor, protocol, self._polled_addresses, command_timeout, poll_period,
                                   auth=redis_auth, sentinels=lambda: self.topology.sentinels if self.topology else ())
        self._lock = DashboardLock(coordinator, cluster, self.dashboard, reactor, self._lock_changed)
        self.recovery = promoting.Recovery(self)
        self.migrator = Migrations(self)
        # Each group's confirmed master (what the sweeps wait for) and Sentinel's failovers written down.
        self.masters = MasterWatch(self)
        self._watches: List[Any] = []
        self._started = False
        self.busy: Optional[str] = None

    @property
    def topology(self) -> Optional[Topology]:
        return self._topology

    @topology.setter
    def topology(self, new: Optional[Topology]) -> None:
        before, self._topology = self._topology, new
        if new is not None and new is not before:
            for listener in list(self.topology_listeners):
                try:
                    listener(before, new)
                except Exception:  # noqa: BLE001 - a listener's bug must not break a topology write
                    self._log.failure("topology listener failed")

    # -- life ------------------------------------------------------------------

    @defer.inlineCallbacks
    def start(self, wait: bool = False) -> Any:
        """Take the lock (LockHeld, or wait for it), load or create the topology, watch, poll."""
        try:
            yield self._lock.take(wait)
        except LockHeld as err:
            self._log.warn("cluster {cluster}: the dashboard cannot start: {reason}", cluster=self.cluster,
                           reason=str(err))
            raise
        except CoordinatorError as err:
            error = ControllerError(f"cannot take the dashboard lock of cluster '{self.cluster}': {err}")
            self._log.warn("cluster {cluster}: the dashboard cannot start: {reason}", cluster=self.cluster,
                           reason=str(error))
            raise error
        try:
            yield self._load()
            yield self.migrator.load()
            proxies_seen: defer.Deferred = defer.Deferred()

            def proxies_changed(children: Dict[str, Any]) -> None:
                self.acks.update(children)
                if not proxies_seen.called:
                    proxies_seen.callback(None)

            self._watches.append(self.coordinator.watch_children(self.proxies_path, proxies_changed))
            self._watches.append(self.coordinator.watch(self.topology_path, self._topology_changed))
            # Acknowledgements mean nothing before the first listing of the proxies.
            limit = float(getattr(self.coordinator, "timeout", 5.0)) * 2
            timer = self.reactor.callLater(limit, lambda: proxies_seen.called or proxies_seen.errback(
                ControllerError(f"the proxies of cluster '{self.cluster}' could not be listed within {limit:g}s")))
            try:
                yield proxies_seen
            finally:
                if timer.active():
                    timer.cancel()
        except BaseException as err:
            self._log.warn("cluster {cluster}: the dashboard cannot start: {reason}", cluster=self.cluster,
                           reason=str(err))
            yield self._stop_parts()
            raise
        self._started = True
        self.health.start()
        self.masters.start()
        self.migrator.start()
        self._log.info("cluster {cluster}: dashboard started at generation {generation} ({proxies} proxies)",
                       cluster=self.cluster, generation=self.topology.generation, proxies=len(self.acks.proxies))
        self.recovery.check()

    @defer.inlineCallbacks
    def stop(self) -> Any:
        """Stop polling and watching, end the waits, release the lock."""
        self._started = False
        yield self._stop_parts()

    @defer.inlineCallbacks
    def _stop_parts(self) -> Any:
        self.recovery.stop()
        self.migrator.halt()
        for watch in self._watches:
            watch.cancel()
        self._watches = []
        self.health.stop()
        self.masters.stop()
        self.acks.fail_all(OperationError(503, "the dashboard is stopping"))
        yield self.migrator.stopped()
        self.admin.close()
        self.sentinel_admin.close()
        yield self._lock.release()

    @defer.inlineCallbacks
    def _load(self) -> Any:
        try:
            node = yield self.coordinator.get(self.topology_path)
            if node is None:
                empty = Topology.empty(self.cluster, self.protocol)
                try:
                    node = yield self.coordinator.create(self.topology_path, empty.to_json())
                    self._log.info("cluster {cluster}: created an empty {protocol} topology",
                                   cluster=self.cluster, protocol=self.protocol)
                except Conflict:
                    node = yield self.coordinator.get(self.topology_path)
        except CoordinatorError as err:
            raise ControllerError(f"cannot read the topology of cluster '{self.cluster}': {err}")
        if node is None:
            raise ControllerError(f"the topology of cluster '{self.cluster}' vanished while being created")
        try:
            topology = Topology.from_json(node.value)
        except TopologyError as err:
            raise ControllerError(f"the stored topology of cluster '{self.cluster}' is invalid: {err.message}")
        if topology.cluster != self.cluster or topology.protocol != self.protocol:
            raise ControllerError(f"the stored topology at {self.topology_path} is of {topology.protocol} cluster "
                                  f"'{topology.cluster}', not of {self.protocol} cluster '{self.cluster}'")
        self.topology, self._version = topology, node.version

    def _topology_changed(self, node: Any) -> None:
        if node is None:
            if self._started:
                self._log.error("cluster {cluster}: the topology document {path} was deleted from the "
                                "coordinator; writes fail until the dashboard is restarted",
                                cluster=self.cluster, path=self.topology_path)
            return
        if node.version == self._version:
            return
        try:
            topology = Topology.from_json(node.value)
        except TopologyError as err:
            self._log.error("cluster {cluster}: the topology in the coordinator is invalid ({reason}); keeping "
                            "generation {generation}", cluster=self.cluster, reason=err.message,
                            generation=self.topology.generation if self.topology else None)
            return
        if self.topology is None or topology.generation > self.topology.generation:
            if self.busy is None:
                self._log.warn("cluster {cluster}: the topology was changed outside this dashboard "
                               "(generation {generation})", cluster=self.cluster, generation=topology.generation)
            self.topology, self._version = topology, node.version
            if self.busy is None and self._started:
                self.recovery.check()
            self.migrator.check()

    def _lock_changed(self, problem: Optional[str]) -> None:
        if problem is not None:
            self.migrator.unsure = True     # no sweep until the topology is read again with the lock
        if problem is None and self._started:
            # Someone may have written while the lock was not ours: read again, then finish any change.
            def failed(failure: Any) -> None:
                self._log.error("cluster {cluster}: {reason}", cluster=self.cluster, reason=failure.getErrorMessage())
                self.recovery.unsure = True
                self.recovery.check()

            def loaded(_: Any) -> None:
                self.migrator.unsure = False
                self.recovery.check()
                self.migrator.check()

            self._load().addCallbacks(loaded, failed)

    def _polled_addresses(self) -> List[str]:
        if self.topology is None:
            return []
        servers = [server for group in self.topology.groups for server in group.servers]
        return servers + list(self.topology.sentinels)

    # -- reads -----------------------------------------------------------------

    @property
    def writable(self) -> bool:
        return self._started and self._lock.held

    @property
    def problem(self) -> Optional[str]:
        if not self._started:
            return "the dashboard is not running"
        return self._lock.problem

    def status(self) -> Dict[str, Any]:
        """The /api/status document."""
        return status_document(self)

    def slots(self, first: int = 0, last: int = 1023) -> Dict[str, Any]:
        try:
            check_slot_range(first, last)
        except TopologyError as err:
            raise OperationError(err.status, err.message)
        return {"slots": self.current().runs(first, last)}

    def proxies(self) -> List[Dict[str, Any]]:
        return [self.acks.proxies[name].status() for name in sorted(self.acks.proxies)]

    # -- the write path --------------------------------------------------------

    def current(self) -> Topology:
        if self.topology is None:
            raise OperationError(503, "the dashboard has not loaded the topology yet")
        return self.topology

    def check_writable(self) -> None:
        """OperationError 503 unless this dashboard holds its lock."""
        problem = self.problem
        if problem is not None:
            raise OperationError(503, f"{problem}: writes are refused until the dashboard holds its lock again"
                                 if self._started else f"{problem}: writes are refused")

    @staticmethod
    def dry(edit: Callable[..., Any], *args: Any) -> Any:
        """``edit(*args)`` (a model edit or query), with TopologyError turned into OperationError."""
        try:
            return edit(*args)
        except TopologyError as err:
            raise OperationError(err.status, err.message)

    @defer.inlineCallbacks
    def write(self, edit: Callable[[Topology], Topology]) -> Any:
        """CAS ``edit(current)`` into the coordinator; the new Topology (not waiting for acks)."""
        for attempt in (1, 2):
            self.check_writable()
            current = self.current()
            new = self.dry(edit, current)
            try:
                node = yield self.coordinator.set(self.topology_path, new.to_json(), version=self._version)
            except Conflict:
                if attempt == 2:
                    raise OperationError(409, "the topology changed in the coordinator while the dashboard was "
                                         "writing it, twice: is something else writing it?")
                yield self.reread()
                continue
            except NotFound:
                raise OperationError(503, f"the topology document {self.topology_path} is gone from the "
                                     "coordinator: restart the dashboard to create it again")
            except CoordinatorError as err:
                raise OperationError(503, f"coordinator unavailable: {err}")
            self.topology, self._version = new, node.version
            return new

    @defer.inlineCallbacks
    def reread(self) -> Any:
        """Load the topology from the coordinator again; OperationError 503 when it cannot."""
        try:
            yield self._load()
        except ControllerError as err:
            raise OperationError(503, str(err))

    @defer.inlineCallbacks
    def wait_acks(self, topology: Topology, what: str) -> Any:
        """Until every registered proxy reports ``topology``'s generation; OperationError 504 otherwise."""
        try:
            yield self.acks.wait(topology.generation, self.ack_timeout)
        except AcksMissing as err:
            raise OperationError(504, f"{what}: written as generation {err.generation}, but proxies "
                                 f"{', '.join(err.lagging)} did not acknowledge it within {err.timeout:g}s (the "
                                 "change stays written; they apply it when they can, and a dead one can be taken "
                                 "out with proxy remove --force)",
                                 {"lagging": err.lagging, "generation": err.generation})

    @defer.inlineCallbacks
    def commit(self, edit: Callable[[Topology], Topology], what: str) -> Any:
        """``write`` then ``wait_acks``: the new Topology, acknowledged by every proxy."""
        new = yield self.write(edit)
        yield self.wait_acks(new, what)
        return new

    def _operation(self, name: str, function: Callable[..., Any], *args: Any) -> defer.Deferred:
        if self.busy is not None:
            error = OperationError(409, f"another operation is in progress ({self.busy}): try again when it "
                                   "is done")
            self._log.warn("cluster {cluster}: {operation} refused: {reason}", cluster=self.cluster,
                           operation=name, reason=error.message)
            return defer.fail(error)
        self.busy = name
        result = defer.maybeDeferred(function, *args)

        def done(value: Any) -> Any:
            self.busy = None
            self.recovery.check()
            self.migrator.check()
            return value

        def failed(failure: Any) -> Any:
            self.busy = None
            self.recovery.check()
            self.migrator.check()
            if failure.check(OperationError):
                error = failure.value
            else:
                self._log.failure("cluster {cluster}: {operation}: unexpected error", failure,
                                  cluster=self.cluster, operation=name)
                error = OperationError(500, f"internal error: {failure.getErrorMessage()}")
            self._log.warn("cluster {cluster}: {operation} failed ({status}): {reason}", cluster=self.cluster,
                           operation=name, status=error.status, reason=error.message)
            raise error

        return result.addCallbacks(done, failed)

    def ok(self, topology: Topology, **extra: Any) -> Dict[str, Any]:
        return {"ok": True, "generation": topology.generation, **extra}

    # -- operations ------------------------------------------------------------

    def add_group(self, gid: int) -> defer.Deferred:
        return self._operation(f"add group {gid}", self._add_group, gid)

    @defer.inlineCallbacks
    def _add_group(self, gid: int) -> Any:
        new = yield self.commit(lambda t: t.add_group(gid), f"group {gid} added")
        return self.ok(new, group=gid)

    def remove_group(self, gid: int) -> defer.Deferred:
        return self._operation(f"remove group {gid}", self._remove_group, gid)

    @defer.inlineCallbacks
    def _remove_group(self, gid: int) -> Any:
        self.dry(lambda: self.current().remove_group(gid))
        had_master = self.current().group(gid).master is not None
        new = yield self.commit(lambda t: t.remove_group(gid), f"group {gid} removed")
        problems = []
        if had_master and new.sentinels:
            problems = yield self.sentinels.unmonitor_all(new.sentinels, gid)
        return self.ok(new, group=gid, problems=problems)

    def add_server(self, gid: int, addr: str) -> defer.Deferred:
        return self._operation(f"add server {addr} to group {gid}", actions.add_server, self, gid, addr)

    def remove_server(self, gid: int, addr: str) -> defer.Deferred:
        return self._operation(f"remove server {addr} from group {gid}", self._remove_server, gid, addr)

    @defer.inlineCallbacks
    def _remove_server(self, gid: int, addr: str) -> Any:
        self.dry(lambda: self.current().remove_server(gid, addr))
        was_master = self.current().group(gid).master == addr
        new = yield self.commit(lambda t: t.remove_server(gid, addr), f"server {addr} removed from group {gid}")
        problems: List[str] = []
        if was_master and new.sentinels and self.protocol == "redis":
            problems = yield self.sentinels.monitor_all(new, gid)
        return self.ok(new, group=gid, addr=addr, problems=problems)

    def promote(self, gid: int, addr: str) -> defer.Deferred:
        return self._operation(f"promote {addr} in group {gid}", promoting.run, self, gid, addr, False)

    def assign_slots(self, first: int, last: int, gid: Optional[int], force: bool = False) -> defer.Deferred:
        return self._operation(f"assign slots {first}-{last} to {gid if gid is not None else 'offline'}",
                               self._assign_slots, first, last, gid, bool(force))

    @defer.inlineCallbacks
    def _assign_slots(self, first: int, last: int, gid: Optional[int], force: bool) -> Any:
        new = yield self.commit(lambda t: t.assign_slots(first, last, gid, force),
                                f"slots {first}-{last} assigned")
        return self.ok(new, slots=new.runs(first, last))

    def rebalance(self, dry_run: bool = False, keys_per_second: Optional[int] = None,
                  parallel: Optional[int] = None) -> defer.Deferred:
        return defer.maybeDeferred(actions.rebalance, self, bool(dry_run), keys_per_second, parallel)

    def remove_proxy(self, proxy_id: str, force: bool = False) -> defer.Deferred:
        return self._operation(f"remove proxy {proxy_id}" + (" (forced)" if force else ""), actions.remove_proxy,
                               self, proxy_id, bool(force))

    def add_sentinel(self, addr: str) -> defer.Deferred:
        return self._operation(f"add sentinel {addr}", actions.add_sentinel, self, addr)

    def remove_sentinel(self, addr: str) -> defer.Deferred:
        return self._operation(f"remove sentinel {addr}", actions.remove_sentinel, self, addr)

    def migrate(self, first: int, last: int, gid: int, keys_per_second: Optional[int] = None,
                parallel: Optional[int] = None) -> defer.Deferred:
        return defer.maybeDeferred(self.migrator.migrate, first, last, gid, keys_per_second, parallel)

    def migrations(self) -> Dict[str, Any]:
        return self.migrator.listing()

    def pause(self, mid: Optional[int] = None) -> Dict[str, Any]:
        return self.migrator.pause(mid)

    def resume(self, mid: Optional[int] = None) -> Dict[str, Any]:
        return self.migrator.resume(mid)

    def cancel(self, mid: Optional[int] = None) -> defer.Deferred:
        return defer.maybeDeferred(self.migrator.cancel, mid)
