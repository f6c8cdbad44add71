"""What every coordinator backend shares: the API, states, deadlines, watches and held ephemerals.

Owns :class:`Coordinator`: the public methods (checked, bounded by the
deadline, failing only with CoordinatorError subclasses), the state machine
and ``on_state``, the ephemerals this session holds, how they are made or
adopted, and their re-creation after a lost session (``handles.py`` has
:class:`Watch` and :class:`Ephemeral`).

A backend implements ``_start``, ``_stop``, ``_get``, ``_children``,
``_create`` (optionally bound to the session), ``_set``, ``_delete``,
``_is_mine`` and ``_snapshot`` (one read for a watch, arming whatever tells
it of the next change), and calls ``_set_state`` and ``_session_renewed``.
All of it runs in the reactor thread; backends with threads hop in before
touching anything.

Life: a failed ``start()`` cleans up what it began and leaves the
coordinator "connecting": a later ``start()`` tries afresh.  ``stop()`` is final.

Order after a reconnect ("suspended", or "lost" and the ephemerals made
again): every watch reads again, and "connected" is announced once those
reads are delivered (or after the deadline; a failed read is retried), so a
consumer hearing "connected" has seen each watch's value as of then.  On the
first connection "connected" comes first, the first deliveries follow.

A create that timed out may have landed: an ephemeral whose creation hits
Conflict on a node of this very session (``_is_mine``) is adopted, with the
latest value written over it.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Set

from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from twinproxy.coordinator import Conflict, CoordinatorError, CoordinatorURL, Node, Unavailable, check_path
from twinproxy.coordinator.handles import RETRY_DELAY, Ephemeral, Watch, as_bytes, claim, describe, shielded

STATES = ("connecting", "connected", "suspended", "lost", "stopped")
_BUGS = (TypeError, AttributeError, NameError, KeyError, IndexError, AssertionError)


class Coordinator:
    """The coordinator API (see the package docstring and the contract); backends subclass it."""

    _log = Logger()

    def __init__(self, parsed: CoordinatorURL, reactor: Any) -> None:
        self.parsed = parsed
        self.url = parsed.display
        self.session_timeout = parsed.session_timeout
        self.timeout = parsed.timeout
        self.state = "connecting"
        # Where the backend says the state is heading: "connected" is announced (``state``) only once
        # the watches have read again after a reconnect; until then the two differ.
        self._target_state = "connecting"
        self._transition: object = None
        self._reactor = reactor
        self._started = False
        self._state_callbacks: List[Callable[[str], None]] = []
        self._watches: List[Watch] = []
        self._ephemerals: Dict[str, Ephemeral] = {}
        self._claiming: Set[str] = set()  # paths ephemeral() is making right now
        self._removing: Dict[str, Deferred] = {}  # path -> its queued delete, which a new claim waits for
        self._restore_call: Any = None
        self._stop_waiters: List[Deferred] = []

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url} {self.state}>"

    # -- life ---------------------------------------------------------------

    def start(self) -> "Deferred[None]":
        """Establish the session; Unavailable if that does not happen within the deadline.

        A start that failed leaves the coordinator "connecting": call ``start()`` again to retry.
        """
        if self.state == "stopped":
            return defer.fail(Unavailable(self.url, "start", "/", "stopped"))
        if self._started:
            return defer.fail(Unavailable(self.url, "start", "/", "already started"))
        self._started = True
        d = self._bounded(defer.maybeDeferred(self._start), "start", "/")

        def started(_: Any) -> Any:
            if self.state != "stopped":
                return None
            # stop() ran while the session was coming up: whatever came up after its cleanup goes too.
            cleanup = self._bounded(defer.maybeDeferred(self._stop), "stop", "/")
            return cleanup.addBoth(lambda _: defer.fail(Unavailable(self.url, "start", "/", "stopped meanwhile")))

        def failed(failure: Failure) -> Any:
            if self.state == "stopped":
                return failure  # stop() ran meanwhile and cleaned up
            # A session that did not come up must not linger (threads, timers, a lease) ...
            cleanup = self._bounded(defer.maybeDeferred(self._stop), "stop", "/")

            def startable(_: Any) -> Failure:
                # ... yet the coordinator stays usable: a later start() (the server is back) tries afresh.
                if self.state != "stopped":
                    self._started = False
                    self._set_state("connecting")
                return failure

            return cleanup.addBoth(startable)

        return d.addCallbacks(started, failed)

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
        """The backend's word on the state; "connected" again after a reconnect waits for the watches."""
        if state == self._target_state or self.state == "stopped":
            return
        self._target_state = state
        self._transition = transition = object()
        if state != "connected" or self.state == "connecting" or not self._watches:
            self._announce(state)
            if state == "connected":
                for watch in list(self._watches):  # the first connection: every watch's first read
                    watch.changed()
            return
        # Whatever was missed while the link was down is read again, and delivered before "connected".
        reads = defer.DeferredList([watch.refresh() for watch in list(self._watches)])

        def announce(_: Any = None) -> None:
            if timer.active():
                timer.cancel()
            if self._transition is transition:  # nothing newer happened meanwhile
                self._announce(state)

        timer = self._reactor.callLater(self.timeout, announce)  # a read that hangs must not hold it back
        reads.addCallback(announce)

    def _announce(self, state: str) -> None:
        if state == self.state or self.state == "stopped":
            return
        self._log.info("{url}: coordinator {old} -> {new}", url=self.url, old=self.state, new=state)
        self.state = state
        for callback in list(self._state_callbacks):
            try:
                callback(state)
            except Exception:  # noqa: BLE001 - one listener's bug must not starve the others
                self._log.failure("coordinator state callback failed")

    def _session_renewed(self) -> None:
        """The backend has a new session after a lost one: re-create the ephemerals, then say connected."""
        self._restore(list(self._ephemerals.values())).addBoth(lambda _: self._set_state("connected"))

    def _restore(self, ephemerals: List[Ephemeral]) -> "Deferred[None]":
        """Make ``ephemerals`` again under the new session; those that fail for a passing reason, later."""
        again: List[Ephemeral] = []

        def one(ephemeral: Ephemeral) -> "Deferred[None]":
            # Behind any update in flight, and with the value latest when it is sent.
            d = ephemeral.serially(ephemeral.write, Ephemeral.recreate)
            return d.addCallbacks(lambda _: None, failed, errbackArgs=(ephemeral,))

        def failed(failure: Failure, ephemeral: Ephemeral) -> None:
            if not ephemeral.held:
                return
            if failure.check(Conflict):  # not ours (claim adopts what is): someone else took it
                taken(ephemeral)
                return
            self._log.warn("{url}: re-creating ephemeral: {error}", url=self.url, error=failure.getErrorMessage())
            again.append(ephemeral)

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
        if self._target_state in ("lost", "stopped"):
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
        return self._operation("create", check_path(path), self._create, path, as_bytes(value), False)

    def set(self, path: str, value: bytes, version: Optional[int] = None) -> "Deferred[Node]":
        """Write ``value``; with ``version``, only if the node is still at it (else Conflict); NotFound if absent."""
        return self._operation("set", check_path(path), self._set, path, as_bytes(value), version)

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
        """A node that lives as long as the session; Conflict if ``path`` exists (the lock).

        A node at ``path`` that this very session made (an earlier call timed out, yet its create
        landed) is adopted, with ``value`` written over it.
        """
        check_path(path)
        if path in self._ephemerals:
            return defer.fail(Conflict(self.url, "ephemeral", path, "this session already holds it"))
        if path in self._claiming:
            return defer.fail(Conflict(self.url, "ephemeral", path, "this session is making it already"))
        ephemeral = Ephemeral(self, path, as_bytes(value), on_lost)

        def created(node: Node) -> Ephemeral:
            ephemeral.node = node
            if self.state != "stopped":
                self._ephemerals[path] = ephemeral
            return ephemeral

        removing = self._removing.get(path)  # adopting the node a queued delete then deletes: no

        def make(_: Any = None) -> "Deferred[Node]":
            return claim(self, path, ephemeral.value)

        d = self._operation("ephemeral", path, make if removing is None else lambda: shielded(removing).addBoth(make))
        if not d.called:
            self._claiming.add(path)
            d.addBoth(lambda result: self._claiming.discard(path) or result)
        return d.addCallback(created)

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
        if self._started and self._target_state not in ("connecting", "lost"):
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
            if watch.covers(path):
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


__all__ = ["STATES", "Coordinator", "Ephemeral", "Watch", "describe", "RETRY_DELAY"]
