"""A proxy's side of cluster mode: follow each cluster pool's topology and acknowledge it.

Owns: :class:`ClusterFollower` (one cluster pool: its coordinator session,
the watch on ``/clusters/<name>/topology``, the proxy's registration under
``/clusters/<name>/proxies/<id>`` and its acknowledgements) and
:class:`ClusterSources` (every cluster pool of the file: it turns the
file's pools plus the latest topologies into the pools to run, hands them
to the same apply a reload uses — one process, or every worker — waits for
the holds to settle, and only then writes the generation into each
registration: the dashboard's barrier counts those writes).

The coordinator going away does not stop traffic: the last applied
topology keeps serving.  A session that is not trusted ("suspended",
"lost") fences the pool's held slots (they fail at once instead of
waiting on a state this proxy cannot know) until the session is back and
the topology re-read.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from twinproxy import __version__
from twinproxy.cluster.pools import CONNECTED, cluster_pool, not_ready
from twinproxy.config import PoolConfig

RETRY_SECONDS = 1.0


def topology_path(cluster: str) -> str:
    return f"/clusters/{cluster}/topology"


def proxies_path(cluster: str) -> str:
    return f"/clusters/{cluster}/proxies"


class Applier:
    """How the pools reach traffic: ``apply(pools)`` then ``settle()`` (both Deferreds)."""

    def __init__(self, apply: Callable[[List[PoolConfig]], defer.Deferred],
                 settle: Callable[[], defer.Deferred], workers: int = 1) -> None:
        self.apply = apply
        self.settle = settle
        self.workers = workers


class ClusterFollower:
    """One cluster pool's topology, session and registration."""

    _log = Logger()

    def __init__(self, base: PoolConfig, reactor: Any, changed: Callable[[], None],
                 connect: Optional[Callable[[str, Any], Any]] = None) -> None:
        self.base = base
        self.reactor = reactor
        self._changed = changed
        self._connect = connect
        self.coordinator: Any = None
        self.topology: Any = None
        self.session = "connecting"
        self.acked: Optional[int] = None
        self._registration: Any = None
        self._registering = False
        self._watch: Any = None
        self._stopped = False
        self._retry: Any = None
        self._last_problem: Optional[str] = None

    @property
    def name(self) -> str:
        return self.base.name

    @property
    def cluster(self) -> str:
        return self.base.cluster or ""

    def config(self) -> PoolConfig:
        """The pool to run now: the last topology read, or "not ready"."""
        if self.topology is None:
            return not_ready(self.base)
        return cluster_pool(self.base, self.topology, self.session)

    # -- session --------------------------------------------------------------

    def start(self) -> None:
        if self._connect is None:
            from twinproxy.coordinator import connect
            self._connect = connect
        self.coordinator = self._connect(self.base.coordinator, self.reactor)
        self.coordinator.on_state(self._on_state)
        self._begin()

    def _begin(self) -> None:
        self._retry = None
        if self._stopped:
            return
        started = self.coordinator.start()
        started.addCallbacks(self._connected, self._start_failed)

    def _start_failed(self, failure: Any) -> None:
        self._problem(f"cannot reach coordinator: {failure.getErrorMessage()}; serving "
                      + ("the last topology" if self.topology is not None else "nothing yet ('not ready')")
                      + f", retrying every {RETRY_SECONDS:g}s")
        if not self._stopped:
            self._retry = self.reactor.callLater(RETRY_SECONDS, self._begin)

    def _connected(self, _: Any) -> None:
        if self._stopped:
            return
        self.session = self.coordinator.state if self.coordinator.state != "connecting" else CONNECTED
        if self._watch is None:
            self._watch = self.coordinator.watch(topology_path(self.cluster), self._on_topology)

    def _on_state(self, state: str) -> None:
        if state == self.session or self._stopped:
            return
        self._log.info("cluster pool {pool}: coordinator session {old} -> {new}", pool=self.name,
                       old=self.session, new=state)
        self.session = state
        self._changed()

    def _on_topology(self, node: Any) -> None:
        if self._stopped:
            return
        if node is None:
            self._problem(f"cluster '{self.cluster}' has no topology in the coordinator yet (start its dashboard)")
            return
        from twinproxy.cluster.model import Topology, TopologyError

        try:
            topology = Topology.from_json(node.value)
        except TopologyError as err:
            self._problem(f"topology in the coordinator is invalid, keeping the last one: {err}")
            return
        if topology.protocol != self.base.protocol:
            self._problem(f"cluster '{self.cluster}' is a {topology.protocol} cluster but this pool speaks "
                          f"{self.base.protocol}; not serving it")
            return
        self._last_problem = None
        self.topology = topology
        self._changed()

    def _problem(self, text: str) -> None:
        if text != self._last_problem:
            self._log.warn("cluster pool {pool}: {problem}", pool=self.name, problem=text)
            self._last_problem = text

    # -- registration ---------------------------------------------------------

    @property
    def registered(self) -> bool:
        return self._registration is not None

    def acknowledge(self, generation: int, info: Dict[str, Any]) -> None:
        """Every process applied ``generation`` and its holds settled: say so to the dashboard."""
        if self._stopped or self.session != CONNECTED:
            return
        document = dict(info, generation=generation, session=self.session, updated=time.time())
        value = json.dumps(document, sort_keys=True).encode()
        if self._registration is not None:
            d = self._registration.update(value)
        elif not self._registering:
            self._registering = True
            path = f"{proxies_path(self.cluster)}/{info['id']}"
            d = self.coordinator.ephemeral(path, value, on_lost=self._registration_lost)

            def registered(ephemeral: Any) -> None:
                self._registration = ephemeral
                self._log.info("cluster pool {pool}: registered as {path}", pool=self.name, path=path)
                self._changed()   # a generation applied meanwhile is acknowledged now

            d.addCallback(registered)
            d.addBoth(self._registered_or_not)
        else:
            return
        d.addCallbacks(lambda _: setattr(self, "acked", generation), self._ack_failed)

    def _registered_or_not(self, result: Any) -> Any:
        self._registering = False
        return result

    def _ack_failed(self, failure: Any) -> None:
        self._problem(f"cannot acknowledge in the coordinator: {failure.getErrorMessage()}; "
                      f"trying again in {RETRY_SECONDS:g}s")
        self._later(self._changed)

    def _registration_lost(self, reason: str) -> None:
        self._problem(f"registration lost: {reason}; registering again in {RETRY_SECONDS:g}s")
        self._registration = None
        self._later(self._changed)

    def _later(self, call: Callable[[], None]) -> None:
        if not self._stopped:
            self.reactor.callLater(RETRY_SECONDS, lambda: None if self._stopped else call())

    def stop(self) -> defer.Deferred:
        """Leave: the registration goes first (clients stop picking this proxy), then the session."""
        self._stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if self._watch is not None:
            self._watch.cancel()
        coordinator = self.coordinator
        if coordinator is None:
            return defer.succeed(None)
        d = self._registration.remove() if self._registration is not None else defer.succeed(None)
        d.addErrback(lambda failure: None)
        d.addCallback(lambda _: coordinator.stop())
        d.addErrback(lambda failure: self._log.warn("cluster pool {pool}: coordinator stop: {why}",
                                                    pool=self.name, why=failure.getErrorMessage()))
        return d


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
        self._running = False     # a pass of apply + settle + acknowledge is under way
        self._again = False
        self._pass_call: Any = None
        self._started_at = time.time()

    # -- the pools to run -----------------------------------------------------

    def resolve(self, pools: Optional[Sequence[PoolConfig]] = None) -> List[PoolConfig]:
        """The file's pools with every cluster pool filled in from its latest topology."""
        resolved = []
        for config in (self._file_pools if pools is None else pools):
            follower = self.followers.get(config.name)
            if config.cluster_mode and follower is not None and follower.base == config:
                resolved.append(follower.config())
            elif config.cluster_mode:
                resolved.append(not_ready(config))
            else:
                resolved.append(config)
        return resolved

    def apply_file(self, pools: List[PoolConfig]) -> defer.Deferred:
        """The Reloader's apply: a new file, its cluster pools followed from now on."""
        self._file_pools = list(pools)
        self._follow(pools)
        return self._applier.apply(self.resolve())

    def _follow(self, pools: Sequence[PoolConfig]) -> None:
        wanted = {config.name: config for config in pools if config.cluster_mode}
        for name, follower in list(self.followers.items()):
            config = wanted.get(name)
            if config is not None and (config.cluster, config.coordinator) == (follower.base.cluster,
                                                                               follower.base.coordinator):
                follower.base = config   # new settings, same cluster: the session stays
            elif config != follower.base:
                del self.followers[name]
                follower.stop()
        for name, config in wanted.items():
            if name not in self.followers:
                follower = ClusterFollower(config, self._reactor, self._schedule, self._connect)
                self.followers[name] = follower
                if self.running:
                    follower.start()

    # -- one pass: apply, settle, acknowledge ----------------------------------

    def _schedule(self) -> None:
        if not self.running:
            return
        if self._running:
            self._again = True
            return
        if self._pass_call is None:
            # Changes that arrive together (a session and a topology) make one pass.
            self._pass_call = self._reactor.callLater(0, self._pass)

    @defer.inlineCallbacks
    def _pass(self) -> Any:
        self._pass_call = None
        self._running = True
        self._again = False
        try:
            pools = self.resolve()
            generations = {name: f.topology.generation for name, f in self.followers.items()
                           if f.topology is not None and f.session == CONNECTED}
            try:
                changes = yield self._applier.apply(pools)
                yield self._applier.settle()
            except Exception as err:  # noqa: BLE001 - logged; the next change tries again
                self._log.error("cluster: applying the topology failed, keeping the running one: {error}",
                                error=str(err))
                self._again = True
                yield _later(self._reactor, RETRY_SECONDS)
                return
            if changes:
                self._log.info("cluster: applied: {summary}", summary="; ".join(changes))
            for name, generation in generations.items():
                follower = self.followers.get(name)
                if follower is not None and (follower.acked != generation or not follower.registered):
                    follower.acknowledge(generation, self._registration_info(follower))
        finally:
            self._running = False
            if self._again and self.running:
                self._schedule()

    def _registration_info(self, follower: ClusterFollower) -> Dict[str, Any]:
        address = self._address_of(follower.base)
        return {"id": f"{address}-{os.getpid()}", "addr": address, "admin": self._admin_address(),
                "pid": os.getpid(), "host": socket.gethostname(), "start": self._started_at,
                "version": __version__, "protocol": follower.base.protocol, "pool": follower.name,
                "workers": self._applier.workers}

    # -- lifetime -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._follow(self._file_pools)
        for follower in self.followers.values():
            follower.start()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        if self._pass_call is not None and self._pass_call.active():
            self._pass_call.cancel()
        self._pass_call = None
        followers, self.followers = list(self.followers.values()), {}
        return defer.gatherResults([f.stop() for f in followers])

    def document(self, name: str) -> Optional[Dict[str, Any]]:
        """What the stats show for cluster pool ``name`` (None: not a cluster pool)."""
        follower = self.followers.get(name)
        if follower is None:
            return None
        return {"cluster": follower.cluster, "coordinator_session": follower.session,
                "generation_acknowledged": follower.acked}


def _later(reactor: Any, seconds: float) -> defer.Deferred:
    d = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d
