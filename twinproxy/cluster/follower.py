"""One cluster pool's topology, coordinator session and registration, as a proxy follows them.

Owns: :class:`ClusterFollower` — the session with the pool's coordinator
(a new one for every failed start), the watch on
``/clusters/<name>/topology``, and the proxy's registration under
``/clusters/<name>/proxies/<id>``, whose ``generation`` field is the
acknowledgement the dashboard's barrier counts.  The order matters for the
barrier: the registration is made *before* the topology is first read, so
a dashboard that stops waiting for acknowledgements has either seen this
proxy or written its change before this proxy read anything.

The coordinator going away does not stop traffic: the last applied
topology keeps serving.  While the session is not trusted ("suspended",
"lost", or back but not yet re-read) the pool's held slots are fenced:
they fail at once instead of waiting on a state this proxy cannot know.
:class:`~twinproxy.cluster.sources.ClusterSources` applies what this
class knows; this class never touches a pool.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Dict, Optional

from twisted.internet import defer
from twisted.logger import Logger

from twinproxy.cluster.paths import proxies_path, topology_path
from twinproxy.cluster.pools import CONNECTED, cluster_pool, not_ready
from twinproxy.config import PoolConfig

RETRY_SECONDS = 1.0
CONFIRM_RETRY_SECONDS = 0.2
# The session is back but the topology not yet re-read: held slots stay fenced.
RESYNCING = "resyncing"


class ClusterFollower:
    """One cluster pool's topology, session and registration."""

    _log = Logger()

    def __init__(self, base: PoolConfig, reactor: Any, changed: Callable[[], None],
                 info: Callable[["ClusterFollower"], Dict[str, Any]],
                 connect: Optional[Callable[[str, Any], Any]] = None) -> None:
        self.base = base
        self.reactor = reactor
        self._changed = changed
        self._info = info
        self._connect = connect
        self.coordinator: Any = None
        self.topology: Any = None
        self.session = "connecting"
        self._resyncing = False
        self.acked: Optional[int] = None
        self._sent: Optional[bytes] = None      # the registration's value as last written
        self._registration: Any = None
        self._registering = False
        self._watch: Any = None
        self._stopped = False
        self._calls: list = []
        self._last_problem: Optional[str] = None
        self._confirms: list = []               # Deferreds waiting for ``confirm``

    @property
    def name(self) -> str:
        return self.base.name

    @property
    def cluster(self) -> str:
        return self.base.cluster or ""

    def same_cluster(self, config: PoolConfig) -> bool:
        """Whether ``config`` follows the same cluster, coordinator and protocol (a reload keeps the session)."""
        return (config.cluster, config.coordinator, config.redis) == (self.base.cluster, self.base.coordinator,
                                                                       self.base.redis)

    @property
    def trusted(self) -> bool:
        """The session is up and the topology was read on it."""
        return self.session == CONNECTED and not self._resyncing

    def config(self, base: Optional[PoolConfig] = None) -> PoolConfig:
        """The pool to run now (with ``base``'s settings): the last topology read, or "not ready"."""
        base = base or self.base
        if self.topology is None:
            return not_ready(base)
        return cluster_pool(base, self.topology, CONNECTED if self.trusted else (
            RESYNCING if self.session == CONNECTED else self.session))

    # -- session --------------------------------------------------------------

    def start(self) -> None:
        if self.coordinator is not None:
            raise RuntimeError(f"cluster pool {self.name}: follower already started")
        if self._connect is None:
            from twinproxy.coordinator import connect
            self._connect = connect
        self._begin()

    def _begin(self) -> None:
        if self._stopped:
            return
        # A new session object for every attempt: a failed start leaves nothing behind.
        self.coordinator = self._connect(self.base.coordinator, self.reactor)
        self.coordinator.on_state(lambda state, c=self.coordinator: self._on_state(c, state))
        self.coordinator.start().addCallbacks(self._connected, self._start_failed)

    def _start_failed(self, failure: Any) -> None:
        self._problem(f"cannot reach coordinator: {failure.getErrorMessage()}; serving "
                      + ("the last topology" if self.topology is not None else "nothing yet ('not ready')")
                      + f", retrying every {RETRY_SECONDS:g}s")
        coordinator, self.coordinator = self.coordinator, None
        if coordinator is not None:
            coordinator.stop().addErrback(lambda _: None)
        self._later(self._begin)

    def _connected(self, _: Any) -> None:
        if self._stopped:
            return
        self.session = CONNECTED
        self._register()

    def _on_state(self, coordinator: Any, state: str) -> None:
        if coordinator is not self.coordinator or self._stopped or state == self.session:
            return
        self._log.info("cluster pool {pool}: coordinator session {old} -> {new}", pool=self.name,
                       old=self.session, new=state)
        self.session = state
        if state == CONNECTED and self._watch is not None:
            # Back (the topology was being read before): read it again before
            # trusting held slots (the watch may lag).  Before the first
            # registration the start's own path reads it, after registering.
            self._resyncing = True
            self._reread()
        self._changed()

    def _reread(self) -> None:
        path = topology_path(self.cluster)
        coordinator = self.coordinator

        def read(node: Any) -> None:
            if coordinator is self.coordinator and not self._stopped:
                self._resyncing = False
                self._on_topology(node, force=True)

        def failed(failure: Any) -> None:
            self._problem(f"cannot read the topology again: {failure.getErrorMessage()}")
            self._later(self._reread)

        coordinator.get(path).addCallbacks(read, failed)

    def _on_topology(self, node: Any, force: bool = False) -> None:
        if self._stopped:
            return
        if node is None:
            self._problem(f"cluster '{self.cluster}' has no topology in the coordinator yet (start its dashboard)")
            if force:
                self._changed()
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
        if self.topology is not None and topology.generation < self.topology.generation and not force:
            return   # an older read delivered late
        self._last_problem = None
        self.topology = topology
        self._changed()

    def _problem(self, text: str) -> None:
        if text != self._last_problem:
            self._log.warn("cluster pool {pool}: {problem}", pool=self.name, problem=text)
            self._last_problem = text

    # -- confirming the session after a stall ----------------------------------

    def confirm(self) -> defer.Deferred:
        """Fires once the session is shown alive and the topology read on it again.

        Alive: the registration (an ephemeral node of this session) was
        written — a dashboard that dropped this proxy saw that node go, so a
        write to it that succeeds means nobody went on without this proxy.
        A lost registration is made again first (a new session, read
        afterwards, as at start-up).  Tried until it works or the follower stops.
        """
        d: defer.Deferred = defer.Deferred()
        self._confirms.append(d)
        if len(self._confirms) == 1:
            self._try_confirm()
        return d

    def _confirmed(self) -> None:
        waiting, self._confirms = self._confirms, []
        for d in waiting:
            d.callback(None)

    def _try_confirm(self) -> None:
        if self._stopped:
            self._confirmed()
            return
        registration, coordinator = self._registration, self.coordinator
        if registration is None or coordinator is None or self.session != CONNECTED:
            self._later(self._try_confirm, CONFIRM_RETRY_SECONDS)   # re-registering, or reconnecting
            return

        def read(_: Any) -> Any:
            return coordinator.get(topology_path(self.cluster))

        def done(node: Any) -> None:
            if registration is not self._registration or coordinator is not self.coordinator:
                self._later(self._try_confirm, CONFIRM_RETRY_SECONDS)
                return
            self._resyncing = False
            self._on_topology(node, force=True)
            self._confirmed()

        def failed(failure: Any) -> None:
            from twinproxy.coordinator import NotFound

            if failure.check(NotFound) and registration is self._registration:
                self._problem("registration gone from the coordinator; registering again")
                self._registration = None
                self._later(self._register)
            else:
                self._problem(f"cannot confirm the coordinator session: {failure.getErrorMessage()}")
            self._later(self._try_confirm, CONFIRM_RETRY_SECONDS)

        # The newest value given (an acknowledgement in flight included): writes coalesce, so an older one
        # written now would land after it and take the acknowledgement back.
        latest = getattr(registration, "value", None) or self._sent or self._value(self.acked or 0)
        registration.update(latest).addCallback(read).addCallbacks(done, failed)

    # -- registration ---------------------------------------------------------

    @property
    def registered(self) -> bool:
        return self._registration is not None

    def _value(self, generation: int) -> bytes:
        document = dict(self._info(self), generation=generation, session=self.session, updated=time.time())
        return json.dumps(document, sort_keys=True).encode()

    def _register(self) -> None:
        """Make the registration (generation 0 until one is applied), then start reading the topology."""
        if self._registering or self._registration is not None or self._stopped:
            return
        self._registering = True
        info = self._info(self)
        path = f"{proxies_path(self.cluster)}/{info['id']}"
        generation = self.acked or 0
        value = self._value(generation)
        coordinator = self.coordinator

        def registered(ephemeral: Any) -> None:
            self._registering = False
            if coordinator is not self.coordinator or self._stopped:
                ephemeral.remove().addErrback(lambda _: None)
                return
            self._registration = ephemeral
            self._sent = value
            self._log.info("cluster pool {pool}: registered as {path}", pool=self.name, path=path)
            if self._watch is None:
                self._watch = coordinator.watch(topology_path(self.cluster), self._on_topology)
            self._changed()

        def failed(failure: Any) -> None:
            self._registering = False
            self._problem(f"cannot register in the coordinator: {failure.getErrorMessage()}; "
                          f"trying again in {RETRY_SECONDS:g}s")
            self._later(self._register)

        coordinator.ephemeral(path, value, on_lost=self._registration_lost).addCallbacks(registered, failed)

    def acknowledge(self, generation: int) -> None:
        """Every process applied ``generation`` and its holds settled: say so to the dashboard."""
        if self._stopped or not self.trusted or self._registration is None:
            return
        value = self._value(generation)
        registration = self._registration

        def written(_: Any) -> None:
            if registration is self._registration:
                self.acked = generation
                self._sent = value

        def failed(failure: Any) -> None:
            from twinproxy.coordinator import NotFound

            if failure.check(NotFound) and registration is self._registration:
                # Removed by the dashboard (proxy remove --force) while this proxy lives: register again.
                self._problem("registration removed from the coordinator; registering again")
                self._registration = None
                self._later(self._register)
                return
            self._problem(f"cannot acknowledge in the coordinator: {failure.getErrorMessage()}; "
                          f"trying again in {RETRY_SECONDS:g}s")
            self._later(self._changed)

        registration.update(value).addCallbacks(written, failed)

    def needs_acknowledging(self, generation: Optional[int]) -> bool:
        """Whether the registration lags ``generation`` or says something else than it would now."""
        if self._registration is None or not self.trusted:
            return False
        if generation is not None and generation != self.acked:
            return True
        current = json.loads(self._value(self.acked or 0))
        sent = json.loads(self._sent) if self._sent else {}
        return any(current.get(key) != sent.get(key) for key in ("addr", "admin", "id", "workers"))

    def _registration_lost(self, reason: str) -> None:
        self._problem(f"registration lost: {reason}; registering again in {RETRY_SECONDS:g}s")
        self._registration = None
        self._later(self._register)

    def _later(self, call: Callable[[], None], seconds: float = RETRY_SECONDS) -> None:
        if self._stopped:
            return
        self._calls = [c for c in self._calls if c.active()]
        self._calls.append(self.reactor.callLater(seconds, lambda: None if self._stopped else call()))

    def stop(self) -> defer.Deferred:
        """Leave: the registration goes first (clients stop picking this proxy), then the session."""
        self._stopped = True
        for call in self._calls:
            if call.active():
                call.cancel()
        self._confirmed()
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
