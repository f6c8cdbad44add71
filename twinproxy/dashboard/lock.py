"""The dashboard's lock on its cluster: ``/clusters/<c>/dashboard``, an Ephemeral (contract §3).

Owns :class:`DashboardLock`: taking the lock (failing with
:class:`~twinproxy.dashboard.errors.LockHeld` naming the holder, or waiting
for it to be free), knowing at every moment whether this dashboard may
write (``problem`` is None) — not while the coordinator session is
suspended or lost, nor after the lock went to someone else — and taking it
again when it can.  Unlike Codis's lock it expires with the session, so a
dead dashboard never needs ``--remove-lock``.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, Optional

from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.logger import Logger

from twinproxy.cluster.paths import dashboard_path
from twinproxy.coordinator import Conflict, CoordinatorError
from twinproxy.dashboard.errors import LockHeld


class DashboardLock:
    """The lock, held by ``value`` (``{"addr", "pid", "host", "start"}``) while this dashboard runs."""

    _log = Logger()

    def __init__(self, coordinator: Any, cluster: str, value: Dict[str, Any], reactor: Any,
                 on_change: Callable[[Optional[str]], None], retry: float = 0.5) -> None:
        self._coordinator = coordinator
        self._cluster = cluster
        self.path = dashboard_path(cluster)
        self.value = value
        self._reactor = reactor
        self._on_change = on_change      # called with the new ``problem`` (None: writable again)
        self._retry = retry
        self._ephemeral: Any = None
        self._running = False
        self._regaining: Optional[Any] = None
        self.problem: Optional[str] = "the dashboard has not taken its lock yet"
        coordinator.on_state(self._state)

    @property
    def held(self) -> bool:
        return self.problem is None

    @defer.inlineCallbacks
    def take(self, wait: bool = False) -> Any:
        """Take the lock; LockHeld if another live dashboard has it (unless ``wait``: until it is free)."""
        self._running = True
        while True:
            holder = yield self._try_take()
            if holder is None:
                self._set_problem(None)
                return
            if not wait:
                self._running = False
                raise LockHeld(self._cluster, holder, self._coordinator.session_timeout)
            yield _later(self._reactor, self._retry)
            if not self._running:
                raise LockHeld(self._cluster, holder, self._coordinator.session_timeout)

    @defer.inlineCallbacks
    def release(self) -> Any:
        """Give the lock up (stop trying to take it again)."""
        self._running = False
        if self._regaining is not None and self._regaining.active():
            self._regaining.cancel()
        self._regaining = None
        ephemeral, self._ephemeral = self._ephemeral, None
        self._set_problem("the dashboard has stopped")
        if ephemeral is not None:
            try:
                yield ephemeral.remove()
            except CoordinatorError as err:
                # Its session ends with the coordinator's stop anyway, and the lock with it.
                self._log.warn("cluster {cluster}: could not remove the dashboard lock: {reason}",
                               cluster=self._cluster, reason=str(err))

    # -- internals --------------------------------------------------------------

    @defer.inlineCallbacks
    def _try_take(self) -> Any:
        """None when the lock is ours now, else the holder's document."""
        data = json.dumps(self.value).encode()
        for _ in range(50):
            try:
                self._ephemeral = yield self._coordinator.ephemeral(self.path, data, on_lost=self._lost)
                return None
            except Conflict:
                pass
            node = yield self._coordinator.get(self.path)
            if node is None:
                if self._ephemeral is not None:
                    # This session still thinks it holds a lock someone deleted: drop that, then take it anew.
                    stale, self._ephemeral = self._ephemeral, None
                    yield stale.remove()
                yield _later(self._reactor, 0.01)   # freed meanwhile: try again (without spinning)
                continue
            try:
                holder = json.loads(node.value.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                holder = {"addr": f"(unreadable lock document {node.value[:80]!r})"}
            if holder == self.value:
                return None       # ours already: the coordinator re-created it for this session
            return holder if isinstance(holder, dict) else {"addr": repr(holder)}
        return {"addr": "(none: the lock node is absent, yet the coordinator refuses to create it)"}

    def _set_problem(self, problem: Optional[str]) -> None:
        if problem != self.problem:
            self.problem = problem
            self._on_change(problem)

    def _state(self, state: str) -> None:
        if not self._running:
            return
        if state in ("suspended", "lost", "connecting"):
            self._set_problem(f"the coordinator session is {state}, so the dashboard cannot be sure it still "
                              "holds its lock")
        elif state == "connected" and self.problem is not None and self._regaining is None:
            # Confirm the lock is (still, or again) ours before writing anything.
            self._regain()
        elif state == "stopped":
            self._set_problem("the coordinator connection is stopped")

    def _lost(self, reason: str) -> None:
        if not self._running:
            return
        self._ephemeral = None
        self._set_problem(f"the dashboard lost its lock: {reason}")
        self._log.warn("cluster {cluster}: the dashboard lost its lock ({reason}); trying to take it again",
                       cluster=self._cluster, reason=reason)
        self._regain()

    def _regain(self) -> None:
        self._regaining = None
        if not self._running:
            return
        attempt = self._try_take()

        def done(holder: Any) -> None:
            if holder is None:
                if self.problem is not None:
                    self._log.info("cluster {cluster}: the dashboard holds its lock again", cluster=self._cluster)
                self._set_problem(None)
                return
            self._set_problem(f"the dashboard lost its lock: dashboard {holder.get('addr') or '-'} "
                              f"(pid {holder.get('pid', '?')} on {holder.get('host', '?')}) holds it now")
            self._again()

        def failed(failure: Any) -> None:
            self._again()

        attempt.addCallbacks(done, failed)

    def _again(self) -> None:
        if self._running and self._regaining is None:
            self._regaining = self._reactor.callLater(self._retry, self._regain)


def _later(reactor: Any, seconds: float) -> defer.Deferred:
    return deferLater(reactor, seconds, lambda: None)
