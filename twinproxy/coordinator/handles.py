"""The objects a coordinator hands out: :class:`Watch` and :class:`Ephemeral`.

A :class:`Watch` runs one read at a time, coalesces the triggers that arrive
meanwhile, delivers only what differs from the last delivery and retries
after errors; ``refresh()`` says when a read started after the call has been
delivered (the coordinator waits for that after a reconnect, before it says
"connected").

An :class:`Ephemeral` writes one value at a time: writes racing each other
(etcd's pool of connections, the file store's threads) could land out of
order and leave an older value in place.  ``update()`` calls made while a
write is in flight coalesce into the next write, which carries the latest
value; each caller's Deferred fires once a write of its value or a later one
has landed.  The coordinator's re-creation after a lost session and
``remove()`` queue behind the write in flight the same way.

:func:`claim` makes an ephemeral, adopting a node this very session made
already (a create that timed out yet landed) and writing the value over it.
All of it runs in the reactor thread, through the coordinator's (``base.py``)
deadlines and backend calls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, List, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredLock
from twisted.logger import Logger
from twisted.python.failure import Failure

from twinproxy.coordinator import Conflict, Node, NotFound, Unavailable

if TYPE_CHECKING:
    from twinproxy.coordinator.base import Coordinator

# After a failed watch read or ephemeral re-creation: soon, yet not a busy loop against a dead server.
RETRY_DELAY = 0.5
_UNSET = object()
_log = Logger()


class Watch:
    """A data or children watch; ``cancel()`` ends the deliveries."""

    _log = Logger()

    def __init__(self, coordinator: "Coordinator", path: str, callback: Callable[[Any], None], kind: str) -> None:
        self.coordinator = coordinator
        self.path = path
        self.kind = kind  # "data" or "children"
        self._callback = callback
        self._busy = False
        self._dirty = False
        self._retry: Any = None
        self._last: Any = _UNSET
        self._next: List[Deferred] = []  # refresh() callers waiting for a read that starts after their call
        self._current: List[Deferred] = []  # those the read under way answers
        self.cancelled = False

    def cancel(self) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._settle(self._current + self._next)
        self._current, self._next = [], []
        self.coordinator._drop_watch(self)

    def changed(self) -> None:
        """Something this watch covers may have changed: read it again (once, however many calls)."""
        if self.cancelled:
            return
        self._dirty = True
        if not self._busy:
            self._read()

    def covers(self, path: str) -> bool:
        """Whether a change of ``path`` can change what this watch reports."""
        if self.kind == "data":
            return path == self.path
        prefix = "/" if self.path == "/" else self.path + "/"
        return path.startswith(prefix)  # deeper paths too: they make implied children appear

    def refresh(self) -> "Deferred[None]":
        """Read again; fires once that read's result has been delivered (or it failed: it is retried)."""
        if self.cancelled:
            return defer.succeed(None)
        waiter: Deferred = Deferred()
        self._next.append(waiter)
        self.changed()
        return waiter

    def _read(self) -> None:
        self._busy = True
        self._dirty = False
        self._current, self._next = self._current + self._next, []
        coordinator = self.coordinator
        d = coordinator._bounded(defer.maybeDeferred(coordinator._snapshot, self), "watch", self.path)
        d.addCallbacks(self._got, self._failed)

    def _got(self, value: Any) -> None:
        self._busy = False
        if self.cancelled:
            return
        if value != self._last:
            self._last = value
            try:
                self._callback(value)
            except Exception:  # noqa: BLE001 - the application's bug must not end the watch
                self._log.failure("coordinator watch callback for {path} failed", path=self.path)
        waiters, self._current = self._current, []
        self._settle(waiters)
        if self._dirty:  # a change came in during the read: the value read may be older than it
            self._read()

    def _failed(self, failure: Failure) -> None:
        self._busy = False
        waiters, self._current = self._current, []
        self._settle(waiters)  # nobody waits on a read that failed: the retry delivers later
        if self.cancelled or self.coordinator.state == "stopped":
            return
        self._log.debug("coordinator watch read failed, retrying: {error}", error=failure.getErrorMessage())
        self._retry = self.coordinator._reactor.callLater(RETRY_DELAY, self.changed)

    @staticmethod
    def _settle(waiters: List[Deferred]) -> None:
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(None)


class Ephemeral:
    """A node that lives as long as the session; re-created with its latest value after a lost session."""

    def __init__(self, coordinator: "Coordinator", path: str, value: bytes,
                 on_lost: Optional[Callable[[str], None]]) -> None:
        self.coordinator = coordinator
        self.path = path
        self.value = value
        self.on_lost = on_lost
        self.node: Optional[Node] = None
        self._lock = DeferredLock()  # one write in flight at a time
        self._waiting: List[Deferred] = []  # update() callers whose value no write has carried yet

    @property
    def held(self) -> bool:
        return self.coordinator._ephemerals.get(self.path) is self

    def update(self, value: bytes) -> "Deferred[Node]":
        """Write a new value (remembered first, so a re-creation uses it).

        Fires with the Node of a write that carried this value or a later one
        (values given while a write is in flight coalesce into the next), or
        with that write's failure; within the operation deadline either way.
        """
        coordinator = self.coordinator
        value = as_bytes(value)
        if not self.held:
            return defer.fail(NotFound(coordinator.url, "update", self.path, "this session no longer holds it"))
        self.value = value
        waiter: Deferred = Deferred()
        self._waiting.append(waiter)
        if len(self._waiting) == 1:  # the first of a batch queues the write that will carry the batch
            # Failures reach every caller through its own Deferred: the queue's copy is dropped.
            self.serially(self._flush).addErrback(lambda _: None)
        return coordinator._bounded(waiter, "update", self.path)

    def remove(self) -> "Deferred[None]":
        """Delete the node and stop holding it (a node already gone is fine)."""
        coordinator, path = self.coordinator, self.path
        if not self.held:
            return defer.succeed(None)
        del coordinator._ephemerals[path]  # first: a re-creation queued meanwhile must not revive it
        # Behind the write in flight (a create or set landing after the delete would revive the node),
        # and sent even if the caller's deadline passes first; a new claim of the path waits for it.
        queued = self.serially(coordinator._operation, "remove", path, coordinator._delete, path, None)
        coordinator._removing[path] = queued

        def removed(result: Any) -> Any:
            if coordinator._removing.get(path) is queued:
                del coordinator._removing[path]
            return result

        d = coordinator._bounded(shielded(queued.addBoth(removed)), "remove", path)
        return d.addErrback(lambda failure: None if failure.check(NotFound) else failure)

    def serially(self, function: Callable[..., "Deferred[Any]"], *args: Any) -> "Deferred[Any]":
        """``function(*args)`` (a Deferred) once the write before it has finished; its outcome."""
        return self._lock.run(function, *args)

    def write(self, how: Callable[["Ephemeral", bytes], "Deferred[Node]"]) -> "Deferred[Any]":
        """Send the latest value with ``how(self, value)``; answers the callers waiting for it."""
        waiters, self._waiting = self._waiting, []
        d = defer.maybeDeferred(how, self, self.value)

        def done(outcome: Any) -> Any:
            if isinstance(outcome, Node):
                self.node = outcome
            for waiter in waiters:
                if waiter.called:  # its deadline answered already
                    continue
                if isinstance(outcome, Failure):
                    waiter.errback(outcome)
                else:
                    waiter.callback(outcome)
            return outcome

        return d.addBoth(done)

    def _flush(self) -> "Deferred[Any]":
        if not self._waiting:  # a re-creation carried their value already
            return defer.succeed(None)
        return self.write(Ephemeral._send)

    def _send(self, value: bytes) -> "Deferred[Node]":
        """One write of ``value`` (``update`` queues them, one at a time)."""
        coordinator, path = self.coordinator, self.path
        if not self.held:
            return defer.fail(NotFound(coordinator.url, "update", path, "this session no longer holds it"))
        d = coordinator._operation("update", path, coordinator._set, path, value, None)

        def failed(failure: Failure) -> Failure:
            if failure.check(NotFound) and self.held and coordinator.state != "connected":
                # Gone with the lost session; still held, so made again with the latest value.
                raise Unavailable(coordinator.url, "update", path,
                                  f"the session is {coordinator.state}: written when the ephemeral is made again")
            return failure

        return d.addErrback(failed)

    def recreate(self, value: bytes) -> "Deferred[Node]":
        """Make it again under a new session (the coordinator queues this behind any write)."""
        coordinator = self.coordinator
        if not self.held:
            return defer.fail(NotFound(coordinator.url, "ephemeral", self.path, "this session no longer holds it"))
        return coordinator._bounded(claim(coordinator, self.path, value), "ephemeral", self.path)


def claim(coordinator: "Coordinator", path: str, value: bytes, attempts: int = 2) -> "Deferred[Node]":
    """Create the ephemeral at ``path``, or adopt it when it is this session's already (a create that
    timed out yet landed), writing ``value`` over it; Conflict if another session's.  No deadline."""
    d = _step(coordinator, "ephemeral", path, coordinator._create, path, value, True)

    def exists(failure: Failure) -> Any:
        failure.trap(Conflict)
        mine = _step(coordinator, "ephemeral", path, coordinator._is_mine, path)
        return mine.addCallback(adopt, failure)

    def adopt(is_mine: bool, conflict: Failure) -> Any:
        if not is_mine:
            return conflict
        _log.info("{url}: ephemeral {path} was made by this session already: adopted", url=coordinator.url,
                  path=path)
        written = _step(coordinator, "ephemeral", path, coordinator._set, path, value, None)
        return written.addErrback(gone)

    def gone(failure: Failure) -> Any:
        failure.trap(NotFound)  # deleted between the two: make it after all
        if attempts > 1:
            return claim(coordinator, path, value, attempts - 1)
        return failure

    return d.addErrback(exists)


def _step(coordinator: "Coordinator", operation: str, path: str, function: Callable[..., Any],
          *args: Any) -> "Deferred[Any]":
    """One backend call, its failure as a CoordinatorError."""
    d = defer.maybeDeferred(function, *args)
    return d.addErrback(lambda failure: Failure(coordinator._as_error(failure, operation, path)))


def describe(error: BaseException) -> str:
    """A short, one-line description of an exception."""
    text = str(error) or type(error).__name__
    if type(error).__name__ not in text:
        text = f"{type(error).__name__}: {text}"
    return " ".join(text.split())


def as_bytes(value: Any) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"coordinator values are bytes, not {type(value).__name__}")
    return value


def shielded(d: "Deferred[Any]") -> "Deferred[Any]":
    """``d``'s outcome in a Deferred whose cancellation leaves ``d`` running (a deadline that
    expires must not cancel a write queued behind another)."""
    result: Deferred = Deferred()

    def forward(outcome: Any) -> None:
        if result.called:
            return
        if isinstance(outcome, Failure):
            result.errback(outcome)
        else:
            result.callback(outcome)

    d.addBoth(forward)
    return result
