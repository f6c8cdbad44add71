"""What every coordinator backend shares: the API, states, deadlines, watches and held ephemerals.

Owns: :class:`Coordinator` (the public methods, each checked, bounded by the
per-operation deadline and failing only with CoordinatorError subclasses;
the state machine and ``on_state``; the ephemerals this session holds and
their re-creation after a lost session), :class:`Watch` (one read at a time,
coalescing the triggers that arrive meanwhile, delivering only what differs
from the last delivery, retrying after errors) and :class:`Ephemeral`.

A backend implements ``_start``, ``_stop``, ``_get``, ``_children``,
``_create`` (optionally bound to the session), ``_set``, ``_delete`` and
``_snapshot`` (one read for a watch, arming whatever tells it of the next
change), and calls ``_set_state`` and ``_session_renewed``.  All of it runs in
the reactor thread; backends with threads hop in before touching anything.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from twinproxy.coordinator import Conflict, CoordinatorError, CoordinatorURL, Node, NotFound, Unavailable, check_path

STATES = ("connecting", "connected", "suspended", "lost", "stopped")
# After a failed watch read or ephemeral re-creation: soon, yet not a busy loop against a dead server.
RETRY_DELAY = 0.5
_UNSET = object()
_BUGS = (TypeError, AttributeError, NameError, KeyError, IndexError, AssertionError)


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
        self.cancelled = False

    def cancel(self) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self.coordinator._drop_watch(self)

    def changed(self) -> None:
        """Something this watch covers may have changed: read it again (once, however many calls)."""
        if self.cancelled:
            return
        self._dirty = True
        if not self._busy:
            self._read()

    def _read(self) -> None:
        self._busy = True
        self._dirty = False
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
        if self._dirty:  # a change came in during the read: the value read may be older than it
            self._read()

    def _failed(self, failure: Failure) -> None:
        self._busy = False
        if self.cancelled or self.coordinator.state == "stopped":
            return
        self._log.debug("coordinator watch read failed, retrying: {error}", error=failure.getErrorMessage())
        self._retry = self.coordinator._reactor.callLater(RETRY_DELAY, self.changed)


class Ephemeral:
    """A node that lives as long as the session; re-created with its latest value after a lost session."""

    def __init__(self, coordinator: "Coordinator", path: str, value: bytes,
                 on_lost: Optional[Callable[[str], None]]) -> None:
        self.coordinator = coordinator
        self.path = path
        self.value = value
        self.on_lost = on_lost
        self.node: Optional[Node] = None

    @property
    def held(self) -> bool:
        return self.coordinator._ephemerals.get(self.path) is self

    def update(self, value: bytes) -> "Deferred[Node]":
        """Write a new value (remembered first, so a re-creation uses it)."""
        self.value = value
        return self.coordinator._update_ephemeral(self, value)

    def remove(self) -> "Deferred[None]":
        """Delete the node and stop holding it (a node already gone is fine)."""
        return self.coordinator._remove_ephemeral(self)


class Coordinator:
    """The coordinator API (see the package docstring and the contract); backends subclass it."""

    _log = Logger()

    def __init__(self, parsed: CoordinatorURL, reactor: Any) -> None:
        self.parsed = parsed
        self.url = parsed.display
        self.session_timeout = parsed.session_timeout
        self.timeout = parsed.timeout
        self.state = "connecting"
        self._reactor = reactor
        self._started = False
        self._state_callbacks: List[Callable[[str], None]] = []
        self._watches: List[Watch] = []
        self._ephemerals: Dict[str, Ephemeral] = {}
        self._restore_call: Any = None
        self._stop_waiters: List[Deferred] = []

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url} {self.state}>"

    # -- life ---------------------------------------------------------------

    def start(self) -> "Deferred[None]":
        """Establish the session; Unavailable if that does not happen within the deadline."""
        if self._started:
            return defer.fail(Unavailable(self.url, "start", "/", "already started"))
        self._started = True
        d = self._bounded(defer.maybeDeferred(self._start), "start", "/")

        def failed(failure: Failure) -> "Deferred[None]":
            # A session that did not come up must not linger (threads, timers, a lease).
            stopped = self._bounded(defer.maybeDeferred(self._stop), "stop", "/")
            stopped.addBoth(lambda _: self._finish_stop())
            return stopped.addCallback(lambda _: failure)

        return d.addErrback(failed)

    def stop(self) -> "Deferred[None]":
        """End the session (its ephemerals vanish) and every watch; never fails, never hangs."""
        if self.state == "stopped":
            return defer.succeed(None)
        waiter: Deferred = Deferred()
        self._stop_waiters.append(waiter)
        if len(self._stop_waiters) > 1:
            return waiter  # a stop is under way already
        d = self._bounded(defer.maybeDeferred(self._stop), "stop", "/") if self._started else defer.succeed(None)

        def done(result: Any) -> None:
            if isinstance(result, Failure):
                self._log.warn("{url}: stopping: {error}", url=self.url, error=result.getErrorMessage())
            self._finish_stop()
            waiters, self._stop_waiters = self._stop_waiters, []
            for each in waiters:
                each.callback(None)

        d.addBoth(done)
        return waiter

    def _finish_stop(self) -> None:
        for watch in list(self._watches):
            watch.cancel()
        self._ephemerals.clear()
        if self._restore_call is not None and self._restore_call.active():
            self._restore_call.cancel()
        self._set_state("stopped")

    def on_state(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(state)`` on every state change, in the reactor thread."""
        self._state_callbacks.append(callback)

    def _set_state(self, state: str) -> None:
        if state == self.state or self.state == "stopped":
            return
        self._log.info("{url}: coordinator {old} -> {new}", url=self.url, old=self.state, new=state)
        self.state = state
        for callback in list(self._state_callbacks):
            try:
                callback(state)
            except Exception:  # noqa: BLE001 - one listener's bug must not starve the others
                self._log.failure("coordinator state callback failed")
        if state == "connected":
            # Whatever was missed while the link was down is read again.
            for watch in list(self._watches):
                watch.changed()

    def _session_renewed(self) -> None:
        """The backend has a new session after a lost one: re-create the ephemerals, then say connected."""
        self._restore(list(self._ephemerals.values())).addBoth(lambda _: self._set_state("connected"))

    def _restore(self, ephemerals: List[Ephemeral]) -> "Deferred[None]":
        """Make ``ephemerals`` again under the new session; those that fail for a passing reason, later."""
        again: List[Ephemeral] = []

        def one(ephemeral: Ephemeral) -> "Deferred[None]":
            d = self._bounded(defer.maybeDeferred(self._create, ephemeral.path, ephemeral.value, True),
                              "ephemeral", ephemeral.path)
            return d.addCallbacks(lambda node: setattr(ephemeral, "node", node), failed, errbackArgs=(ephemeral,))

        def failed(failure: Failure, ephemeral: Ephemeral) -> Any:
            if not ephemeral.held:
                return None
            if failure.check(Conflict):
                # Ours after all (an earlier attempt that timed out did make it), or someone else's?
                d = self._bounded(defer.maybeDeferred(self._is_mine, ephemeral.path), "ephemeral", ephemeral.path)
                return d.addCallbacks(lambda mine: None if mine else taken(ephemeral),
                                      lambda _: again.append(ephemeral))
            self._log.warn("{url}: re-creating ephemeral: {error}", url=self.url, error=failure.getErrorMessage())
            again.append(ephemeral)
            return None

        def taken(ephemeral: Ephemeral) -> None:
            del self._ephemerals[ephemeral.path]
            reason = f"{ephemeral.path} was taken by another session while this session was lost"
            self._log.warn("{url}: {reason}", url=self.url, reason=reason)
            if ephemeral.on_lost is not None:
                try:
                    ephemeral.on_lost(reason)
                except Exception:  # noqa: BLE001
                    self._log.failure("ephemeral on_lost callback failed")

        def retry_later(_: Any) -> None:
            if again and self.state != "stopped":
                self._restore_call = self._reactor.callLater(RETRY_DELAY, self._restore_again, again)

        return defer.DeferredList([one(ephemeral) for ephemeral in ephemerals]).addCallback(retry_later)

    def _restore_again(self, ephemerals: List[Ephemeral]) -> None:
        held = [ephemeral for ephemeral in ephemerals if ephemeral.held]
        if self.state in ("lost", "stopped"):
            return  # a session lost again re-creates them all anyway
        self._restore(held)

    # -- operations -----------------------------------------------------------

    def get(self, path: str) -> "Deferred[Optional[Node]]":
        """The node at ``path``, or None."""
        return self._operation("get", check_path(path), self._get, path)

    def children(self, path: str) -> "Deferred[Dict[str, Node]]":
        """The direct children of ``path`` (name -> Node); {} when there are none."""
        return self._operation("children", check_path(path, allow_root=True), self._children, path)

    def create(self, path: str, value: bytes) -> "Deferred[Node]":
        """A new persistent node; Conflict if ``path`` exists."""
        return self._operation("create", check_path(path), self._create, path, _bytes(value), False)

    def set(self, path: str, value: bytes, version: Optional[int] = None) -> "Deferred[Node]":
        """Write ``value``; with ``version``, only if the node is still at it (else Conflict); NotFound if absent."""
        return self._operation("set", check_path(path), self._set, path, _bytes(value), version)

    def delete(self, path: str, version: Optional[int] = None) -> "Deferred[None]":
        """Delete the node (only at ``version``, if given: else Conflict); NotFound if absent."""
        return self._operation("delete", check_path(path), self._delete, path, version)

    def watch(self, path: str, callback: Callable[[Optional[Node]], None]) -> Watch:
        """Call ``callback(node or None)`` soon, then after changes (coalesced, ending at the latest)."""
        return self._add_watch(Watch(self, check_path(path), callback, "data"))

    def watch_children(self, path: str, callback: Callable[[Dict[str, Node]], None]) -> Watch:
        """Like ``watch`` for ``children(path)``: names coming and going, and the children's values."""
        return self._add_watch(Watch(self, check_path(path, allow_root=True), callback, "children"))

    def ephemeral(self, path: str, value: bytes,
                  on_lost: Optional[Callable[[str], None]] = None) -> "Deferred[Ephemeral]":
        """A node that lives as long as the session; Conflict if ``path`` exists (the lock)."""
        check_path(path)
        if path in self._ephemerals:
            return defer.fail(Conflict(self.url, "ephemeral", path, "this session already holds it"))
        ephemeral = Ephemeral(self, path, _bytes(value), on_lost)

        def created(node: Node) -> Ephemeral:
            ephemeral.node = node
            if self.state != "stopped":
                self._ephemerals[path] = ephemeral
            return ephemeral

        d = self._operation("ephemeral", path, self._create, path, ephemeral.value, True)
        return d.addCallback(created)

    def _update_ephemeral(self, ephemeral: Ephemeral, value: bytes) -> "Deferred[Node]":
        if not ephemeral.held:
            return defer.fail(NotFound(self.url, "update", ephemeral.path, "this session no longer holds it"))
        d = self._operation("update", ephemeral.path, self._set, ephemeral.path, _bytes(value), None)

        def written(node: Node) -> Node:
            ephemeral.node = node
            return node

        def failed(failure: Failure) -> Failure:
            if failure.check(NotFound) and ephemeral.held and self.state != "connected":
                # Gone with the lost session; still held, so made again with this value.
                raise Unavailable(self.url, "update", ephemeral.path,
                                  f"the session is {self.state}: written when the ephemeral is made again")
            return failure

        return d.addCallbacks(written, failed)

    def _remove_ephemeral(self, ephemeral: Ephemeral) -> "Deferred[None]":
        if not ephemeral.held:
            return defer.succeed(None)
        del self._ephemerals[ephemeral.path]  # first: a re-creation racing the delete must not revive it
        d = self._operation("remove", ephemeral.path, self._delete, ephemeral.path, None)
        return d.addErrback(lambda failure: None if failure.check(NotFound) else failure)

    def _operation(self, operation: str, path: str, function: Callable[..., Any], *args: Any) -> "Deferred[Any]":
        if not self._started or self.state == "stopped":
            reason = "stopped" if self.state == "stopped" else "not started (call start() first)"
            return defer.fail(Unavailable(self.url, operation, path, reason))
        return self._bounded(defer.maybeDeferred(function, *args), operation, path)

    def _bounded(self, d: "Deferred[Any]", operation: str, path: str,
                 timeout: Optional[float] = None) -> "Deferred[Any]":
        """``d``'s outcome as a CoordinatorError-only Deferred that fires within the deadline."""
        timeout = self.timeout if timeout is None else timeout
        result: Deferred = Deferred(lambda _: d.cancel())

        def expire() -> None:
            result.errback(Unavailable(self.url, operation, path, f"no answer within {timeout:g} s"))
            d.cancel()

        call = self._reactor.callLater(timeout, expire)

        def done(outcome: Any) -> None:
            if call.active():
                call.cancel()
            if result.called:
                return None  # the deadline (or a cancel) answered already: the late outcome is dropped
            if isinstance(outcome, Failure):
                result.errback(self._as_error(outcome, operation, path))
            else:
                result.callback(outcome)
            return None

        d.addBoth(done)
        return result

    def _as_error(self, failure: Failure, operation: str, path: str) -> CoordinatorError:
        error = failure.value
        if isinstance(error, CoordinatorError):
            return error
        if isinstance(error, CancelledError):
            return Unavailable(self.url, operation, path, "cancelled")
        translated = self._translate(error, operation, path)
        if translated is not None:
            return translated
        if isinstance(error, _BUGS):
            # Not a link problem but likely a bug: its traceback goes to the log.
            self._log.failure("{url}: {operation} {path}", failure, url=self.url, operation=operation, path=path)
        return Unavailable(self.url, operation, path, describe(error))

    def _translate(self, error: BaseException, operation: str, path: str) -> Optional[CoordinatorError]:
        """A backend's own exceptions as CoordinatorErrors (None: Unavailable with the description)."""
        return None

    # -- watch bookkeeping ------------------------------------------------------

    def _add_watch(self, watch: Watch) -> Watch:
        if self.state == "stopped":
            watch.cancelled = True
            return watch
        self._watches.append(watch)
        self._watch_added(watch)
        if self._started and self.state not in ("connecting", "lost"):
            # Soon, not now: the first delivery must not run before watch() has returned.
            self._reactor.callLater(0, watch.changed)
        return watch

    def _drop_watch(self, watch: Watch) -> None:
        if watch in self._watches:
            self._watches.remove(watch)
            self._watch_removed(watch)

    def _watch_added(self, watch: Watch) -> None:
        """Hook: a backend arms what it needs for ``watch`` (etcd: its watch stream)."""

    def _watch_removed(self, watch: Watch) -> None:
        """Hook: the opposite of ``_watch_added``."""

    def _changed(self, path: str) -> None:
        """Tell the watches covering ``path`` that it changed (backends with change events)."""
        for watch in list(self._watches):
            if covers(watch, path):
                watch.changed()

    # -- the backend's part -----------------------------------------------------

    def _start(self) -> Any:
        raise NotImplementedError

    def _stop(self) -> Any:
        raise NotImplementedError

    def _get(self, path: str) -> Any:
        raise NotImplementedError

    def _children(self, path: str) -> Any:
        raise NotImplementedError

    def _create(self, path: str, value: bytes, ephemeral: bool) -> Any:
        raise NotImplementedError

    def _set(self, path: str, value: bytes, version: Optional[int]) -> Any:
        raise NotImplementedError

    def _delete(self, path: str, version: Optional[int]) -> Any:
        raise NotImplementedError

    def _is_mine(self, path: str) -> Any:
        """Whether the node at ``path`` is an ephemeral of this very session (bool or Deferred)."""
        return False

    def _snapshot(self, watch: Watch) -> Any:
        """By default a plain read: backends with their own change events need nothing more."""
        return self._get(watch.path) if watch.kind == "data" else self._children(watch.path)


def covers(watch: Watch, path: str) -> bool:
    """Whether a change of ``path`` can change what ``watch`` reports."""
    if watch.kind == "data":
        return path == watch.path
    prefix = "/" if watch.path == "/" else watch.path + "/"
    return path.startswith(prefix)  # deeper paths too: they make implied children appear


def describe(error: BaseException) -> str:
    """A short, one-line description of an exception."""
    text = str(error) or type(error).__name__
    if type(error).__name__ not in text:
        text = f"{type(error).__name__}: {text}"
    return " ".join(text.split())


def _bytes(value: Any) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"coordinator values are bytes, not {type(value).__name__}")
    return value
