"""Every cluster pool of the pool file, applied with the rest of the file.

Owns: :class:`ClusterSources` — it turns the file's pools plus each
:class:`~twinproxy.cluster.follower.ClusterFollower`'s latest topology into
the pools to run, hands them to the same apply a reload uses (one process,
or every worker through their two-phase change), waits for the slot holds
to settle, and only then has each follower write its generation into its
registration: the dashboard's barrier counts those writes.  Reloads (the
file) and topology changes (the coordinator) take turns through one lock,
so no two applies ever interleave; a reload that fails leaves the file,
the followers and the running pools as they were.

It also keeps the pools' slot **lease** (:mod:`twinproxy.cluster.targets`):
every :data:`TICK` it renews it to now + :meth:`ClusterSources.lease_seconds` in every process.  A
tick that finds the lease run out means this process did not run for that
long (stopped, or starved): its coordinator sessions may have expired and
the dashboard may have gone on without it, so the lease is renewed only
once every follower has confirmed its session and read the topology again
(:meth:`~twinproxy.cluster.follower.ClusterFollower.confirm`) and a pass has
applied what it read.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from twinproxy import __version__
from twinproxy.cluster.follower import RETRY_SECONDS, ClusterFollower
from twinproxy.cluster.pools import not_ready
from twinproxy.cluster.targets import LEASE_SECONDS
from twinproxy.config import PoolConfig

TICK = 0.25     # seconds between two lease renewals
LEASE = LEASE_SECONDS


class Applier:
    """How the pools reach traffic: ``apply(pools)`` then ``settle()`` (both Deferreds).

    ``apply`` must fail unless every process applied the pools (a partial
    commit under ``--workers`` is a failure here: the pass is tried again).
    ``renew(until)`` hands the slot lease to every process (None: no lease).
    """

    def __init__(self, apply: Callable[[List[PoolConfig]], defer.Deferred],
                 settle: Callable[[], defer.Deferred], workers: int = 1,
                 renew: Optional[Callable[[float], Any]] = None) -> None:
        self.apply = apply
        self.settle = settle
        self.workers = workers
        self.renew = renew


class ClusterSources(Service):
    """Every cluster pool of the file, applied with the rest of the file."""

    _log = Logger()

    def __init__(self, file_pools: Sequence[PoolConfig], applier: Applier, reactor: Any,
                 address_of: Callable[[PoolConfig], str], admin_address: Callable[[], Optional[str]],
                 connect: Optional[Callable[[str, Any], Any]] = None) -> None:
        self.setName("cluster-sources")
        self._file_pools = list(file_pools)
        self._applier = applier
        self._reactor = reactor
        self._address_of = address_of
        self._admin_address = admin_address
        self._connect = connect
        self.followers: Dict[str, ClusterFollower] = {}
        self._lock = defer.DeferredLock()   # one apply at a time: a pass or a reload
        self._pass_call: Any = None
        self._queued = False                # a pass is waiting for the lock
        self._started_at = time.time()
        self._applied: Optional[List[PoolConfig]] = None   # what the last apply installed
        self._ticker: Optional[LoopingCall] = None
        self._lease_until: Optional[float] = None
        self._confirming = False
        self.stalls = 0

    # -- the pools to run -----------------------------------------------------

    def resolve(self, pools: Optional[Sequence[PoolConfig]] = None) -> List[PoolConfig]:
        """``pools`` (default: the file's) with every cluster pool filled in from its latest topology."""
        resolved = []
        # What runs now: the last apply's pools, or (none yet) the file's the proxy started with.
        running = {config.name: config for config in (self._file_pools if self._applied is None else self._applied)}
        for config in (self._file_pools if pools is None else pools):
            follower = self.followers.get(config.name)
            before = running.get(config.name)
            joining = config.cluster_mode and before is not None and not before.cluster_mode
            if config.cluster_mode and follower is not None and follower.same_cluster(config) and not (
                    joining and follower.topology is None):
                resolved.append(follower.config(config))
            elif joining:
                # A pool joining a cluster (adopted) serves as it did until its topology is read: the
                # adoption routes by the pool's placement until keys move, so nothing changes meanwhile.
                resolved.append(before)
            elif config.cluster_mode:
                resolved.append(not_ready(config))
            else:
                resolved.append(config)
        return resolved

    def apply_file(self, pools: List[PoolConfig]) -> defer.Deferred:
        """The Reloader's apply: a new file, its cluster pools followed once it is applied."""
        return self._lock.run(self._apply_file, list(pools))

    @defer.inlineCallbacks
    def _apply_file(self, pools: List[PoolConfig]) -> Any:
        resolved = self.resolve(pools)
        changes = yield self._applier.apply(resolved)   # failing: nothing changes here either
        self._applied = resolved
        self._file_pools = pools
        self._follow(pools)
        if self.followers:
            self._schedule()   # new cluster pools: registered, then filled in by a pass
        return changes

    def _follow(self, pools: Sequence[PoolConfig]) -> None:
        wanted = {config.name: config for config in pools if config.cluster_mode}
        for name, follower in list(self.followers.items()):
            config = wanted.get(name)
            if config is not None and follower.same_cluster(config):
                follower.base = config   # new settings, same cluster: the session stays
            else:
                del self.followers[name]
                follower.stop()
        for name, config in wanted.items():
            if name not in self.followers:
                follower = ClusterFollower(config, self._reactor, self._schedule, self._registration_info,
                                           self._connect)
                self.followers[name] = follower
                if self.running:
                    follower.start()

    # -- one pass: apply, settle, acknowledge ----------------------------------

    def _schedule(self) -> None:
        if not self.running or self._pass_call is not None or self._queued:
            return
        # Changes that arrive together (a session and a topology) make one pass.
        self._pass_call = self._reactor.callLater(0, self._start_pass)

    def _start_pass(self) -> None:
        self._pass_call = None
        self._queued = True
        self._lock.run(self._pass)

    @defer.inlineCallbacks
    def _pass(self) -> Any:
        """Apply what the followers know, settle, acknowledge; True when it applied and settled."""
        self._queued = False    # what changes from now on needs a pass of its own
        if not self.running:
            return False
        generations = {name: f.topology.generation for name, f in self.followers.items()
                       if f.topology is not None and f.trusted}
        try:
            pools = self.resolve()
            changes: List[str] = []
            if pools != self._applied:   # a pass for an acknowledgement alone applies nothing
                changes = yield self._applier.apply(pools)
                self._applied = pools
            yield self._applier.settle()
        except Exception as err:  # noqa: BLE001 - logged; tried again
            self._log.error("cluster: applying the topology failed, keeping the running one; trying again in "
                            "{seconds}s: {error}", seconds=RETRY_SECONDS, error=str(err))
            self._reactor.callLater(RETRY_SECONDS, self._schedule)
            return False
        if changes:
            self._log.info("cluster: applied: {summary}", summary="; ".join(changes))
        for name, follower in self.followers.items():
            generation = generations.get(name)
            if follower.needs_acknowledging(generation):
                follower.acknowledge(generation if generation is not None else (follower.acked or 0))
        return True

    # -- the slot lease ----------------------------------------------------------

    def lease_seconds(self) -> float:
        """A third of the shortest session timeout, at least :data:`LEASE`: a stall that short cannot
        have outlived a session (a false stall costs every cluster request a wait)."""
        timeouts = [getattr(f.coordinator, "session_timeout", None) for f in self.followers.values()]
        timeouts = [t for t in timeouts if isinstance(t, (int, float)) and t > 0]
        return max(LEASE, min(timeouts) / 3.0) if timeouts else LEASE

    def _tick(self) -> None:
        try:
            if self._applier.renew is None or self._confirming:
                return
            if not self.followers:
                self._lease_until = None     # no cluster pool: nothing to renew, nothing to have missed
                return
            now = self._reactor.seconds()
            if self._lease_until is not None and now > self._lease_until:
                self._confirm(now - self._lease_until + self.lease_seconds())
                return
            self._renew(now)
        except Exception:  # noqa: BLE001 - the ticker must go on (a LoopingCall stops on an exception)
            self._log.failure("cluster: renewing the slot lease")

    def _renew(self, now: float) -> None:
        self._lease_until = now + self.lease_seconds()
        self._applier.renew(self._lease_until)

    @defer.inlineCallbacks
    def _confirm(self, gap: float) -> Any:
        """Confirm every session, read and apply, and only then renew; until it works, the lease stays out."""
        self._confirming = True
        self.stalls += 1
        self._log.warn("cluster: this process did not run for {gap:.1f}s (stopped or starved): cluster requests "
                       "wait until every coordinator session is confirmed and the topology read again", gap=gap)
        began = self._reactor.seconds()
        try:
            while self.running:
                yield defer.gatherResults([follower.confirm() for follower in list(self.followers.values())],
                                          consumeErrors=True)
                read_at = self._reactor.seconds()
                applied = yield self._lock.run(self._pass)
                if not self.running:
                    return
                now = self._reactor.seconds()
                if not applied:
                    yield deferLater(self._reactor, RETRY_SECONDS, lambda: None)
                    continue
                if now - read_at > self.lease_seconds():
                    self._log.warn("cluster: stopped again while confirming ({seconds:.1f}s): confirming again",
                                   seconds=now - read_at)
                    continue
                self._log.info("cluster: sessions confirmed in {seconds:.2f}s; serving cluster slots again",
                               seconds=now - began)
                self._renew(now)
                return
        except Exception:  # noqa: BLE001 - the next tick finds the lease still out and confirms again
            self._log.failure("cluster: confirming the coordinator sessions")
        finally:
            self._confirming = False

    def _registration_info(self, follower: ClusterFollower) -> Dict[str, Any]:
        address = self._address_of(follower.base)
        return {"id": f"{address}-{os.getpid()}", "addr": address, "admin": self._admin_address(),
                "pid": os.getpid(), "host": socket.gethostname(), "start": self._started_at,
                "version": __version__, "protocol": follower.base.protocol, "pool": follower.name,
                "workers": self._applier.workers}

    # -- lifetime -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._follow(self._file_pools)   # starts each follower (the service is running now)
        if self._applier.renew is not None:
            self._ticker = LoopingCall(self._tick)
            self._ticker.clock = self._reactor
            self._ticker.start(TICK, now=True)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        self._ticker = None
        if self._pass_call is not None and self._pass_call.active():
            self._pass_call.cancel()
        self._pass_call = None
        followers, self.followers = list(self.followers.values()), {}
        return defer.gatherResults([f.stop() for f in followers])
