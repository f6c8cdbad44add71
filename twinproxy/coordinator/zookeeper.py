"""The ZooKeeper coordinator backend, on kazoo, bridged into the reactor.

Owns: :class:`ZooKeeperCoordinator`.  kazoo runs its own threads (socket I/O,
watch callbacks, completions): every kazoo callback only hops into the
reactor with ``callFromThread``, and only kazoo's ``*_async`` calls are made
from the reactor thread (``start``'s connection is ``start_async``; its
``stop``/``close`` run in a daemon thread).  Each ``start`` makes its own
client: a failed start's client is closed and whatever it reports later is
ignored, so a start retried once the server is up begins afresh.  kazoo's state listener gives
the states as they are: SUSPENDED (no contact for 2/3 of the session
timeout), LOST (the session expired, which a partitioned client learns only
when it reaches a server again; kazoo then makes a new session, whereupon
the held ephemerals are re-created) and CONNECTED.

The URL's path is a prefix applied here rather than kazoo's chroot, which
needs the chroot to exist first; ``start`` makes it.  Parents are made as
empty nodes (``makepath``); ZK refuses to delete a node with children
(Conflict).  Versions are ZK's node versions (reset when a path is made anew).
Watches are ZK's one-shot watches, re-armed by each read: a data watch on
the node (``exists`` while it is absent), a children watch on the parent
plus a data watch on every child, so a child's new value is seen too.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, List, Optional

from twisted.internet import defer
from twisted.python.failure import Failure

from twinproxy.coordinator import Conflict, CoordinatorError, CoordinatorURL, Node, NotFound, Unavailable
from twinproxy.coordinator.base import Coordinator, Watch

# What kazoo's exceptions mean (their str() is mostly empty).
_REASONS = {
    "ConnectionLoss": "connection to ZooKeeper lost",
    "ConnectionClosedError": "connection to ZooKeeper closed",
    "SessionExpiredError": "ZooKeeper session expired",
    "SessionMovedError": "ZooKeeper session moved",
    "OperationTimeoutError": "ZooKeeper operation timed out",
    "NoAuthError": "not authorized (ZooKeeper ACL)",
    "AuthFailedError": "ZooKeeper authentication failed",
    "NoChildrenForEphemeralsError": "an ephemeral node cannot have children",
}
# Connection retries: quick and bounded, so a server that comes back is used within a second.
_CONNECTION_RETRY = {"max_tries": -1, "delay": 0.1, "backoff": 2, "max_delay": 1.0}


class ZooKeeperCoordinator(Coordinator):
    """``zookeeper://h1:2181,h2:2181/chroot`` through kazoo."""

    def __init__(self, parsed: CoordinatorURL, reactor: Any) -> None:
        super().__init__(parsed, reactor)
        self._root = parsed.root  # "" or "/a/b": prefixed to every path
        self._client: Any = None
        self._connected: Optional[defer.Deferred] = None
        self._was_lost = False

    # -- life ------------------------------------------------------------------

    def _start(self) -> "defer.Deferred[None]":
        from kazoo.client import KazooClient

        auth = []
        if self.parsed.username:
            auth.append(("digest", f"{self.parsed.username}:{self.parsed.password}"))
        # A client per start (a failed start's client is closed): its states count only while it is ours.
        client = KazooClient(hosts=self.parsed.host_list, timeout=self.session_timeout, auth_data=auth,
                             connection_retry=dict(_CONNECTION_RETRY))
        self._client = client
        self._was_lost = False
        # kazoo's connection thread: hop, nothing more.
        client.add_listener(lambda state: self._reactor.callFromThread(self._kazoo_state, client, state))
        self._connected = defer.Deferred()
        client.start_async()  # returns at once: the connection thread does the rest
        d = self._connected
        if self._root:
            d.addCallback(lambda _: self._kazoo(client.ensure_path_async(self._root)))
        return d.addCallback(lambda _: self._set_state("connected"))

    def _stop(self) -> "defer.Deferred[None]":
        client, self._client = self._client, None  # from now on its states are ignored
        if client is None:
            return defer.succeed(None)

        d: defer.Deferred = defer.Deferred()
        reactor = self._reactor

        def fire(outcome: Any) -> None:  # reactor thread
            if d.called:  # the deadline answered already
                return
            if outcome is None:
                d.callback(None)
            else:
                d.errback(outcome)

        def stop_and_close() -> None:
            outcome: Any = None
            try:
                client.stop()  # closes the session: its ephemerals go at once
                client.close()
            except Exception:  # noqa: BLE001 - reported through the Deferred
                outcome = Failure()
            reactor.callFromThread(fire, outcome)

        # Blocking (kazoo waits up to 10 s for a server that does not answer), so not in the reactor
        # thread, and not in its thread pool either, whose shutdown would wait for it: a daemon thread.
        threading.Thread(target=stop_and_close, name="kazoo-stop", daemon=True).start()
        return d

    def _kazoo_state(self, client: Any, state: str) -> None:
        if client is not self._client or self.state == "stopped":
            return
        if state == "CONNECTED":
            if self._connected is not None and not self._connected.called:
                self._connected.callback(None)  # start() says connected once the root exists
            elif self._was_lost:
                self._was_lost = False
                self._session_renewed()  # kazoo made a new session: ephemerals back, then "connected"
            elif self.state != "connecting":
                self._set_state("connected")
        elif state == "SUSPENDED":
            if self.state != "connecting":
                self._set_state("suspended")
        elif state == "LOST" and self.state != "connecting":
            self._was_lost = True
            self._set_state("lost")

    # -- the bridge -------------------------------------------------------------

    def _kazoo(self, async_result: Any) -> "defer.Deferred[Any]":
        """A kazoo IAsyncResult as a Deferred fired in the reactor thread."""
        d: defer.Deferred = defer.Deferred()
        reactor = self._reactor

        def fire(ok: bool, value: Any) -> None:  # reactor thread
            if d.called:  # cancelled by a deadline: the late answer is dropped
                return
            if ok:
                d.callback(value)
            else:
                d.errback(Failure(value))

        def done(result: Any) -> None:  # a kazoo thread
            try:
                value = result.get_nowait()
            except Exception as err:  # noqa: BLE001 - travels to the errback
                reactor.callFromThread(fire, False, err)
            else:
                reactor.callFromThread(fire, True, value)

        async_result.rawlink(done)
        return d

    def _full(self, path: str) -> str:
        if path == "/":
            return self._root or "/"
        return self._root + path

    def _translate(self, error: BaseException, operation: str, path: str) -> Optional[CoordinatorError]:
        name = type(error).__name__
        if name == "NoNodeError":
            return NotFound(self.url, operation, path, "no such node")
        if name == "NodeExistsError":
            return Conflict(self.url, operation, path, "it exists")
        if name == "BadVersionError":
            return Conflict(self.url, operation, path, "its version moved on")
        if name == "NotEmptyError":
            return Conflict(self.url, operation, path, "it has children")
        if name in _REASONS:
            return Unavailable(self.url, operation, path, _REASONS[name])
        return None

    def _client_or_fail(self) -> Any:
        if self._client is None:
            raise Unavailable(self.url, "request", "/", "not connected")
        return self._client

    # -- operations ---------------------------------------------------------------

    def _get(self, path: str, watcher: Any = None) -> "defer.Deferred[Optional[Node]]":
        d = self._kazoo(self._client_or_fail().get_async(self._full(path), watch=watcher))
        d.addCallback(lambda result: Node(result[0] or b"", result[1].version))
        return d.addErrback(_absent, None)

    def _children(self, path: str, watcher: Any = None, missing: Any = None) -> "defer.Deferred[Dict[str, Node]]":
        client = self._client_or_fail()
        full = self._full(path)

        def got_names(names: List[str]) -> "defer.Deferred[Dict[str, Node]]":
            prefix = full.rstrip("/") + "/"
            if full == "/":
                names = [name for name in names if name != "zookeeper"]  # ZooKeeper's own, not ours
            reads = [self._kazoo(client.get_async(prefix + name, watch=watcher)) for name in names]
            d = defer.DeferredList(reads, consumeErrors=True)
            return d.addCallback(collect, names)

        def collect(results: List[Any], names: List[str]) -> Dict[str, Node]:
            found: Dict[str, Node] = {}
            for name, (ok, result) in zip(names, results):
                if ok:
                    found[name] = Node(result[0] or b"", result[1].version)
                elif not _is_no_node(result):  # a child deleted meanwhile is simply not there
                    result.raiseException()
            return found

        d = self._kazoo(client.get_children_async(full, watch=watcher))
        return d.addCallbacks(got_names, _absent, errbackArgs=({} if missing is None else missing,))

    def _create(self, path: str, value: bytes, ephemeral: bool) -> "defer.Deferred[Node]":
        result = self._client_or_fail().create_async(self._full(path), value, ephemeral=ephemeral, makepath=True)
        return self._kazoo(result).addCallback(lambda _: Node(value, 0))  # a new node's version is 0

    def _set(self, path: str, value: bytes, version: Optional[int]) -> "defer.Deferred[Node]":
        result = self._client_or_fail().set_async(self._full(path), value, -1 if version is None else version)
        return self._kazoo(result).addCallback(lambda stat: Node(value, stat.version))

    def _delete(self, path: str, version: Optional[int]) -> "defer.Deferred[None]":
        result = self._client_or_fail().delete_async(self._full(path), -1 if version is None else version)
        return self._kazoo(result).addCallback(lambda _: None)

    def _is_mine(self, path: str) -> "defer.Deferred[bool]":
        client = self._client_or_fail()
        d = self._kazoo(client.exists_async(self._full(path)))
        return d.addCallback(lambda stat: stat is not None and bool(client.client_id)
                             and stat.ephemeralOwner == client.client_id[0])

    # -- watches ------------------------------------------------------------------

    def _watch_added(self, watch: Watch) -> None:
        # One callable per watch, so kazoo (which keeps a set per path) registers it once.
        watch.zk_watcher = lambda event: self._reactor.callFromThread(watch.changed)

    def _snapshot(self, watch: Watch, attempts: int = 3) -> "defer.Deferred[Any]":
        watcher = watch.zk_watcher
        if watch.kind == "data":
            d = self._get(watch.path, watcher)
        else:
            d = self._children(watch.path, watcher, missing=_MISSING)
        absent = None if watch.kind == "data" else {}

        def got(value: Any) -> Any:
            if value is not None and value is not _MISSING:
                return value
            # Absent, so no watch was armed by the read: arm one for its creation.
            d = self._kazoo(self._client_or_fail().exists_async(self._full(watch.path), watch=watcher))
            return d.addCallback(created)

        def created(stat: Any) -> Any:
            if stat is not None and attempts > 1:  # made meanwhile: read it (and arm its watches)
                return self._snapshot(watch, attempts - 1)
            return absent

        return d.addCallback(got)


_MISSING = object()


def _is_no_node(failure: Failure) -> bool:
    return type(failure.value).__name__ == "NoNodeError"


def _absent(failure: Failure, value: Any) -> Any:
    """A missing node reads as ``value``."""
    return value if _is_no_node(failure) else failure
