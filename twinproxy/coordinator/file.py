"""The file coordinator backend: the store of ``filestore.py`` driven from the reactor.

Owns: :class:`FileCoordinator`.  Reads are a few small local files (and a
non-blocking flock probe per ephemeral owner), done in the reactor thread;
writes take the writers' flock and fsync, so they run in the reactor's
thread pool, each bounded by the operation's deadline (the lock is polled
until then, never waited on blindly).  Watches re-read on inotify events
(a node renamed in or deleted; a session file closed, which is how a dead
owner shows) and on a 0.25 s poll, which also covers filesystems without
inotify and dead owners inotify did not report.  A dead owner's ephemerals
are deleted by the next poll that saw them (``reap``).

There is no server and no session to lose: the state is "connected" from
start to stop.
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, Optional, Set

from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.python.filepath import FilePath

from twinproxy.coordinator import CoordinatorURL, Node, direct_children
from twinproxy.coordinator.base import Coordinator
from twinproxy.coordinator.filestore import FileStore, node_path

POLL_INTERVAL = 0.25


class FileCoordinator(Coordinator):
    """``file:///abs/dir``: one host, no server."""

    def __init__(self, parsed: CoordinatorURL, reactor: Any) -> None:
        super().__init__(parsed, reactor)
        self.store = FileStore(parsed.root, self.url)
        self._session: Optional[str] = None
        self._notifier: Any = None
        self._poll: Optional[task.LoopingCall] = None
        self._dead: Set[str] = set()
        self._reaping = False
        self._soon: Any = None

    # -- life ----------------------------------------------------------------

    def _start(self) -> None:
        # A few mkdirs and one non-blocking flock: quick enough for the reactor thread.
        self.store.ensure()
        self._session = self.store.open_session()
        self._start_notifier()
        self._poll = task.LoopingCall(self._tick)
        self._poll.clock = self._reactor
        self._poll.start(POLL_INTERVAL, now=False)
        self._set_state("connected")

    def _start_notifier(self) -> None:
        try:
            from twisted.internet import inotify
        except ImportError:  # not Linux: the poll alone notices changes
            return
        try:
            notifier = inotify.INotify(self._reactor)
            notifier.startReading()
            notifier.watch(FilePath(self.store.nodes), mask=inotify.IN_MOVED_TO | inotify.IN_DELETE,
                           callbacks=[self._node_event])
            notifier.watch(FilePath(self.store.sessions), mask=inotify.IN_CLOSE_WRITE,
                           callbacks=[self._session_event])
        except Exception as err:  # noqa: BLE001 - no inotify here (NFS, limits): polling still works
            self._log.info("{url}: no inotify ({error}): polling only", url=self.url, error=err)
            return
        self._notifier = notifier

    def _stop(self) -> "defer.Deferred[None]":
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        if self._notifier is not None:
            self._notifier.loseConnection()
            self._notifier = None
        if self._soon is not None and self._soon.active():
            self._soon.cancel()
        session, self._session = self._session, None
        if session is None:
            return defer.succeed(None)
        return self._in_thread(self.store.close_session, session, self._deadline())

    # -- operations -------------------------------------------------------------

    def _get(self, path: str) -> Optional[Node]:
        record = self.store.read(path, self._dead)
        return None if record is None else Node(record.value, record.version)

    def _children(self, path: str) -> Dict[str, Node]:
        records = self.store.under(path, self._dead)
        return direct_children(path, {p: Node(r.value, r.version) for p, r in records.items()})

    def _create(self, path: str, value: bytes, ephemeral: bool) -> "defer.Deferred[Node]":
        session = self._session if ephemeral else None
        operation = "ephemeral" if ephemeral else "create"
        d = self._in_thread(self.store.create, path, value, session, self._deadline(), operation)
        return d.addCallback(self._written, path, value)

    def _set(self, path: str, value: bytes, version: Optional[int]) -> "defer.Deferred[Node]":
        d = self._in_thread(self.store.set, path, value, version, self._deadline())
        return d.addCallback(self._written, path, value)

    def _delete(self, path: str, version: Optional[int]) -> "defer.Deferred[None]":
        d = self._in_thread(self.store.delete, path, version, self._deadline())
        return d.addCallback(self._written, path, None)

    def _is_mine(self, path: str) -> bool:
        return self._session is not None and self.store.owner(path) == self._session

    def _written(self, version: Optional[int], path: str, value: Optional[bytes]) -> Optional[Node]:
        # Our own watches need not wait for inotify (or the poll, without it).
        self._changed(path)
        return None if value is None else Node(value, version)

    def _in_thread(self, function: Any, *args: Any) -> "defer.Deferred[Any]":
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), function, *args)

    def _deadline(self) -> float:
        return time.monotonic() + self.timeout

    # -- change notice ------------------------------------------------------------

    def _node_event(self, _watch: Any, file_path: FilePath, _mask: int) -> None:
        path = node_path(os.fsdecode(file_path.basename()))
        if path is not None:
            self._changed(path)

    def _session_event(self, _watch: Any, _file_path: FilePath, _mask: int) -> None:
        # A session file closed for writing: its owner stopped or died, and its ephemerals with it.
        if self._soon is None or not self._soon.active():
            self._soon = self._reactor.callLater(0, self._tick)

    def _tick(self) -> None:
        for watch in list(self._watches):
            watch.changed()
        if self._dead and not self._reaping and self._session is not None:
            self._dead.clear()
            self._reaping = True
            d = self._in_thread(self.store.reap, self._deadline())
            d.addErrback(lambda failure: self._log.info("{url}: reaping dead ephemerals: {error}", url=self.url,
                                                        error=failure.getErrorMessage()))
            d.addBoth(lambda _: setattr(self, "_reaping", False))
