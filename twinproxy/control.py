"""The control plane: every pool of the process, changed by reconciling a desired topology.

Owns: :class:`ProxyService`, the parent of one
:class:`~twinproxy.service.PoolService` per pool, whose
:meth:`~ProxyService.prepare` diffs the running pools against a new list
(buildbot's reconfigure-by-diff) and does everything that can fail first —
building and binding added pools, opening moved listeners — so that a
failure changes nothing; the returned :class:`PreparedChange` then commits
(cannot fail) or aborts.  Topology sources (the pool file on SIGHUP or
``POST /reload``, a ``--workers`` master, later Sentinel and the cluster
coordinator) all end here.  Also owns the reload counters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger

from twinproxy.config import PoolConfig
from twinproxy.listeners import ListenError
from twinproxy.service import PoolService
from twinproxy.topology import ProxyDiff, diff_pools


@dataclass
class ReloadCounters:
    """Applied configurations and failed attempts, for stats and metrics."""

    generation: int = 1      # the configuration serving now: 1 at start, +1 per applied change
    reloads: int = 0         # changes applied (a reload that changes nothing counts too)
    reload_failures: int = 0  # reloads refused: a file that does not validate, a listener that cannot open
    last_reload_at: float = 0.0


class ReloadError(Exception):
    """A change that cannot be applied now; nothing was changed."""


class PreparedChange:
    """A change whose fallible half is done: ``commit()`` applies it, ``abort()`` undoes it."""

    def __init__(self, proxy: "ProxyService", pools: Sequence[PoolConfig], diff: ProxyDiff,
                 started: Dict[str, PoolService], commits: List[Callable[[], List[str]]],
                 prepared: List[PoolService]) -> None:
        self._proxy = proxy
        self.pools = list(pools)
        self.diff = diff
        self._started = started
        self._commits = commits
        self._prepared = prepared
        self.done = False

    def describe(self) -> List[str]:
        return self.diff.describe()

    def commit(self) -> List[str]:
        """Apply the change (in one reactor turn); return what changed."""
        self.done = True
        return self._proxy._commit(self)

    def abort(self) -> None:
        """Undo what ``prepare`` did: close new listeners, drop pools not started.

        A new listener may have accepted clients meanwhile (``--workers``:
        between prepare and commit): they are closed, and so is anything
        their requests opened.
        """
        if self.done:
            return
        self.done = True
        for service in self._prepared:
            service.abort_prepared()
        for service in self._started.values():
            service.stop_listening()
            for client in list(service.factory.clients):
                client.abort()
            service.runtime.stop()


class ProxyService(MultiService):
    """All pools of this process, and the one way to change them."""

    _log = Logger()

    def __init__(self, pools: Sequence[PoolConfig], make_pool: Callable[[PoolConfig], PoolService],
                 clock: Any) -> None:
        super().__init__()
        self.setName("pools")
        self._make_pool = make_pool
        self._clock = clock
        self.configs: List[PoolConfig] = list(pools)
        self.counters = ReloadCounters()
        # Pools being stopped by a change, until their clients have drained.
        self.stopping: Dict[str, defer.Deferred] = {}
        # Pools of an applied change waiting for an address another pool gives up.
        self.starting: Dict[str, PoolService] = {}
        # Called when such a pool has started (the --bound-addresses file is written again).
        self.on_late_start: List[Callable[[], None]] = []
        for config in self.configs:
            make_pool(config).setServiceParent(self)

    @property
    def pools(self) -> List[PoolService]:
        """The running pools, in the file's order."""
        return [self.namedServices[config.name] for config in self.configs if config.name in self.namedServices]

    def pool(self, name: str) -> Optional[PoolService]:
        return self.namedServices.get(name)

    # -- change ---------------------------------------------------------------

    def prepare(self, pools: Sequence[PoolConfig]) -> PreparedChange:
        """Diff against ``pools`` and do the fallible half; on any error everything stays as it was."""
        if self.starting:
            raise ReloadError(f"pool {', '.join(self.starting)} is still starting after the previous reload; "
                              "try again")
        diff = diff_pools(self.configs, pools)
        started: Dict[str, PoolService] = {}
        prepared: List[PoolService] = []
        commits: List[Callable[[], List[str]]] = []
        change = PreparedChange(self, pools, diff, started, commits, prepared)
        # Addresses given up by pools that go away: a new pool taking one listens once they are closed.
        freed = {str(config.listen) for config in (*diff.removed, *(old for old, _ in diff.replaced))
                 if config.listen.port != 0}
        try:
            for config in (*diff.added, *(new for _, new in diff.replaced)):
                service = self._make_pool(config)
                started[config.name] = service
                if str(config.listen) not in freed:
                    service.listen()
            for pool_diff in diff.changed:
                service = self.namedServices[pool_diff.name]
                prepared.append(service)
                commits.append(service.prepare(pool_diff))
        except Exception:
            change.abort()
            raise
        return change

    def _commit(self, change: PreparedChange) -> List[str]:
        diff = change.diff
        changes = change.describe()
        closed: Dict[str, defer.Deferred] = {}
        for config in (*diff.removed, *(old for old, _ in diff.replaced)):
            closed[str(config.listen)] = self.namedServices[config.name].stop_listening()
            self._stop_pool(config.name)
        for service in change._started.values():
            if service.port is None:
                # The address is another pool's until its listener has closed.
                self.starting[service.name] = service
                closed[str(service.config.listen)].addCallback(lambda _, s=service: self._start_late(s))
            else:
                self._start_pool(service)
        for commit in change._commits:
            commit()
        self.configs = change.pools
        counters = self.counters
        counters.generation += 1
        counters.reloads += 1
        counters.last_reload_at = self._clock.seconds()
        return changes

    def _start_late(self, service: PoolService) -> None:
        self.starting.pop(service.name, None)
        try:
            self._start_pool(service)
        except ListenError:
            return   # logged; the pool is gone (someone took the address in between)
        for callback in self.on_late_start:
            callback()

    def _stop_pool(self, name: str) -> defer.Deferred:
        """Stop accepting now; the pool's clients drain in the background."""
        service = self.namedServices[name]
        # removeService stops it: no new clients, replies to what was read, then close.
        stopped = defer.maybeDeferred(self.removeService, service)
        self.stopping[name] = stopped

        def done(result: Any) -> Any:
            if self.stopping.get(name) is stopped:
                del self.stopping[name]
            return result

        stopped.addBoth(done)
        return stopped

    def _start_pool(self, service: PoolService) -> None:
        try:
            service.setServiceParent(self)
        except ListenError as err:
            # Only a pool taking over another's address gets here, after that
            # listener closed (someone else took the address in between).
            self._log.error("pool {pool}: could not start after the reload: {error}", pool=service.name, error=err)
            if service.name in self.namedServices:
                self.removeService(service)
            raise

    def stopService(self) -> defer.Deferred:
        """Stop every pool, and wait for those a reload was already stopping."""
        stopping = list(self.stopping.values())
        return defer.gatherResults([defer.maybeDeferred(super().stopService), *stopping])

    def settled(self) -> defer.Deferred:
        """Fires once every slot hold applied so far has drained what was in flight (cluster pools)."""
        return defer.gatherResults([service.runtime.settled() for service in self.pools])

    def renew_leases(self, until: float) -> None:
        """Cluster pools may route by their slot tables until ``until`` (see cluster.targets' lease)."""
        for service in self.pools:
            slots = service.runtime.pool.slots
            if slots is not None:
                slots.renew(until)

    def reconfigure(self, pools: Sequence[PoolConfig]) -> List[str]:
        """Prepare and commit in one go (one process); raises ListenError with nothing changed."""
        return self.prepare(pools).commit()
