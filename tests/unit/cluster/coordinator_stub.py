"""An in-memory stand-in for the part of the coordinator API a cluster follower uses.

Owns: :class:`StubCoordinator` (``start``/``stop``/``state``/``on_state``/
``get``/``watch``/``ephemeral``, contract §2), :class:`StubEphemeral`,
:class:`StubWatch` and :class:`Connector` (the ``connect(url, reactor)``
a follower is given: it counts the coordinators it makes, and they share
one store, as sessions with one coordinator would).  Test controls:
:meth:`StubCoordinator.set_topology` (optionally without telling the
watches, as a suspended session would miss it), :meth:`~StubCoordinator.set_state`,
:meth:`~StubCoordinator.fail` (the next calls of an operation fail, e.g.
``update`` with :class:`~twinproxy.coordinator.NotFound`) and
:meth:`~StubCoordinator.hold` / :meth:`~StubCoordinator.release` (an
operation's Deferreds stay unfired until released, to control ordering).

It behaves like ``twinproxy.coordinator.base`` where the follower can tell:
a successful ``start`` says "connected" to the state callbacks before its
Deferred fires; a failed one leaves the coordinator "connecting"; a
watch's first delivery comes soon (``callLater(0)``), not inside
``watch()``; watches are called only when the value changed, and back to
"connected" after a reconnect they catch up *before* "connected" is said;
removing an ephemeral of a stopped session succeeds (it is gone already).
Every call is logged in ``events`` in order.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.internet import defer

from twinproxy.coordinator import Node, NotFound, Unavailable

URL = "file:///tmp/x"
OPERATIONS = ("start", "stop", "get", "ephemeral", "update", "remove")


class StubWatch:
    def __init__(self, coordinator: "StubCoordinator", path: str, callback: Callable[[Optional[Node]], None]) -> None:
        self.coordinator = coordinator
        self.path = path
        self.callback = callback
        self.cancelled = False
        self._delivered = False
        self._last: Optional[Node] = None

    def deliver(self) -> None:
        """Call back with the current value, unless it is what was delivered last."""
        if self.cancelled:
            return
        node = self.coordinator.store.get(self.path)
        if self._delivered and node == self._last:
            return
        self._delivered, self._last = True, node
        self.callback(node)

    def cancel(self) -> None:
        self.cancelled = True


class StubEphemeral:
    def __init__(self, coordinator: "StubCoordinator", path: str, value: bytes,
                 on_lost: Optional[Callable[[str], None]]) -> None:
        self.coordinator = coordinator
        self.path = path
        self.value = value
        self.on_lost = on_lost
        self.removed = False
        self.writes: List[bytes] = [value]

    def update(self, value: bytes) -> defer.Deferred:
        self.coordinator.events.append(("update", self.path, value))
        self.value = value

        def write() -> Node:
            self.writes.append(value)
            return Node(value=value, version=len(self.writes))

        return self.coordinator._reply("update", self.path, write)

    def remove(self) -> defer.Deferred:
        self.coordinator.events.append(("remove", self.path))

        def gone() -> None:
            self.removed = True

        return self.coordinator._reply("remove", self.path, gone)


class StubCoordinator:
    """One session with an in-memory coordinator; see the module docstring for the controls."""

    def __init__(self, url: str = URL, reactor: Any = None, store: Optional[Dict[str, Node]] = None) -> None:
        self.url = url
        self.session_timeout = 10.0
        self.reactor = reactor
        self.state = "connecting"
        self.store: Dict[str, Node] = {} if store is None else store
        self.events: List[Tuple[Any, ...]] = []
        self.watches: List[StubWatch] = []
        self.ephemerals: List[StubEphemeral] = []
        self._state_callbacks: List[Callable[[str], None]] = []
        self._held: set = set()
        self._pending: List[Tuple[str, defer.Deferred, Callable[[], Any]]] = []
        self._failures: Dict[str, List[Exception]] = {}

    # -- the API ------------------------------------------------------------------

    def start(self) -> defer.Deferred:
        self.events.append(("start",))

        def started() -> None:
            failures = self._failures.get("start")
            if failures:
                self._set_state("connecting")   # as base.Coordinator: a failed start can be tried again
                raise failures.pop(0)
            self._set_state("connected")

        return self._reply("start", "/", started, failable=False)

    def stop(self) -> defer.Deferred:
        self.events.append(("stop",))
        return self._reply("stop", "/", lambda: self._set_state("stopped"))

    def on_state(self, callback: Callable[[str], None]) -> None:
        self._state_callbacks.append(callback)

    def get(self, path: str) -> defer.Deferred:
        self.events.append(("get", path))
        node = self.store.get(path)   # read now, answered when released
        return self._reply("get", path, lambda: node)

    def watch(self, path: str, callback: Callable[[Optional[Node]], None]) -> StubWatch:
        self.events.append(("watch", path))
        watch = StubWatch(self, path, callback)
        self.watches.append(watch)
        if self.state == "connected":
            self._soon(watch.deliver)
        return watch

    def ephemeral(self, path: str, value: bytes, on_lost: Optional[Callable[[str], None]] = None) -> defer.Deferred:
        self.events.append(("ephemeral", path, value))
        ephemeral = StubEphemeral(self, path, value, on_lost)
        self.ephemerals.append(ephemeral)
        return self._reply("ephemeral", path, lambda: ephemeral)

    # -- test controls ----------------------------------------------------------------

    def set_value(self, path: str, value: bytes, notify: Optional[bool] = None) -> Node:
        """Write ``value``; watches hear of it when connected (``notify`` True: always, False: never)."""
        old = self.store.get(path)
        node = Node(value=value, version=old.version + 1 if old else 1)
        self.store[path] = node
        if notify or (notify is None and self.state == "connected"):
            for watch in list(self.watches):
                if watch.path == path:
                    watch.deliver()
        return node

    def set_topology(self, topology: Any, notify: Optional[bool] = None) -> Node:
        """Write ``topology`` (a model.Topology) where the follower reads it; ``notify`` as for set_value."""
        return self.set_value(f"/clusters/{topology.cluster}/topology", topology.to_json(), notify)

    def set_state(self, state: str) -> None:
        """Go to ``state`` and tell the callbacks; back to "connected", the watches catch up first."""
        if state == "connected" and self.state not in ("connecting", "connected"):
            for watch in list(self.watches):
                watch.deliver()
        self._set_state(state)

    def fail(self, operation: str, error: Exception, times: int = 1) -> None:
        """The next ``times`` calls of ``operation`` fail with ``error``."""
        self._failures.setdefault(operation, []).extend([error] * times)

    def clear_failures(self, operation: str) -> None:
        self._failures.pop(operation, None)

    def hold(self, operation: str) -> None:
        """From now on ``operation``'s Deferreds stay unfired until :meth:`release`."""
        assert operation in OPERATIONS, operation
        self._held.add(operation)

    def release(self, operation: str) -> int:
        """Stop holding ``operation`` and fire its waiting Deferreds in call order; how many fired."""
        self._held.discard(operation)
        ready = [entry for entry in self._pending if entry[0] == operation]
        self._pending = [entry for entry in self._pending if entry[0] != operation]
        for _, d, outcome in ready:
            self._fire(d, outcome)
        return len(ready)

    def pending(self, operation: str) -> int:
        return sum(1 for entry in self._pending if entry[0] == operation)

    def calls(self, operation: str) -> List[Tuple[Any, ...]]:
        return [event for event in self.events if event[0] == operation]

    @property
    def live(self) -> List[StubEphemeral]:
        return [each for each in self.ephemerals if not each.removed]

    # -- plumbing -------------------------------------------------------------------------

    def _set_state(self, state: str) -> None:
        if state == self.state:
            return
        self.state = state
        for callback in list(self._state_callbacks):
            callback(state)

    def _soon(self, call: Callable[[], None]) -> None:
        if self.reactor is not None:
            self.reactor.callLater(0, call)
        else:
            call()

    def _reply(self, operation: str, path: str, outcome: Callable[[], Any], failable: bool = True) -> defer.Deferred:
        if failable and self._failures.get(operation):
            error = self._failures[operation].pop(0)
            outcome = _raiser(error)
        elif operation == "remove" and self.state == "stopped":
            pass   # the session's end removed it already
        elif operation not in ("start", "stop") and self.state == "stopped":
            outcome = _raiser(Unavailable(self.url, operation, path, "stopped"))
        d: defer.Deferred = defer.Deferred()
        if operation in self._held:
            self._pending.append((operation, d, outcome))
        else:
            self._fire(d, outcome)
        return d

    @staticmethod
    def _fire(d: defer.Deferred, outcome: Callable[[], Any]) -> None:
        try:
            value = outcome()
        except Exception as error:  # noqa: BLE001 - becomes the Deferred's failure
            d.errback(error)
        else:
            d.callback(value)


def _raiser(error: Exception) -> Callable[[], Any]:
    def outcome() -> Any:
        raise error

    return outcome


def not_found(path: str = "/clusters/shop/proxies/x") -> NotFound:
    return NotFound(URL, "update", path, "no such node")


def unavailable(operation: str = "update", path: str = "/") -> Unavailable:
    return Unavailable(URL, operation, path, "no answer within 5 s")


class Connector:
    """``connect(url, reactor)`` for a follower: a new StubCoordinator each call, one shared store."""

    def __init__(self, fail_starts: int = 0) -> None:
        self.store: Dict[str, Node] = {}
        self.made: List[StubCoordinator] = []
        self.fail_starts = fail_starts           # the first this many coordinators fail to start
        self.prepare: Optional[Callable[[StubCoordinator], None]] = None   # called on each new one

    def __call__(self, url: str, reactor: Any) -> StubCoordinator:
        coordinator = StubCoordinator(url, reactor, self.store)
        if len(self.made) < self.fail_starts:
            coordinator.fail("start", Unavailable(url, "start", "/", "connection refused"))
        self.made.append(coordinator)
        if self.prepare is not None:
            self.prepare(coordinator)
        return coordinator

    @property
    def current(self) -> StubCoordinator:
        return self.made[-1]

    def set_topology(self, topology: Any) -> None:
        """Write ``topology`` through the newest coordinator (or straight into the store before any)."""
        if self.made:
            self.current.set_topology(topology)
        else:
            StubCoordinator(store=self.store).set_topology(topology)


# -- what both test modules build from --------------------------------------------------

POOLS = """\
shop:
  listen: {listen}
  redis: true
  cluster: shop
  coordinator: file:///tmp/x
"""


def shop_pool(listen: str = "127.0.0.1:19000", extra: str = "") -> Any:
    """The file's cluster pool ``shop`` (and whatever pools ``extra`` adds), as load_text makes them."""
    from twinproxy.config import load_text

    return load_text(POOLS.format(listen=listen) + extra)


def layout(generation: int, held: Tuple[int, ...] = ()) -> Any:
    """Cluster ``shop``: group 1 serves slots 0-511, group 2 the rest; ``held`` slots are held."""
    from twinproxy.cluster.model import Group, Topology

    groups = (Group(id=1, servers=("10.0.0.1:6379",)), Group(id=2, servers=("10.0.0.2:6379",)))
    slots = tuple((1 if slot < 512 else 2, "held" if slot in held else "stable") for slot in range(1024))
    return Topology(cluster="shop", protocol="redis", generation=generation, groups=groups, slots=slots)
