"""Hot reload: the pool file, read again on SIGHUP or ``POST /reload``, applied as a diff.

Owns: :class:`Reloader` (read and validate the file off the reactor
thread, hand the pools to whoever applies them — this process's
:class:`~twinproxy.control.ProxyService`, or a ``--workers`` master's
channel to its workers — count and log the outcome; one reload at a time,
and signals that arrive meanwhile fold into one more) and
:class:`HangupService` (nutcracker's SIGHUP: reopen the log file, and
reload).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence

from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from twinproxy.config import ConfigError, PoolConfig
from twinproxy.sentinel.check import load_checked

Apply = Callable[[List[PoolConfig]], defer.Deferred]


@dataclass
class ReloadResult:
    """What a reload did: the answer of ``POST /reload`` and of the log line."""

    ok: bool
    status: int                   # HTTP: 200 applied, 400 the file is refused, 500 applying failed
    generation: int
    changes: List[str] = field(default_factory=list)
    error: Optional[str] = None

    def document(self) -> dict:
        if self.ok:
            return {"ok": True, "generation": self.generation, "changes": self.changes}
        return {"ok": False, "generation": self.generation, "error": self.error}


class ApplyError(Exception):
    """Applying a valid file failed (a listener could not open); nothing changed."""


class Reloader:
    """Reads ``path`` again and applies it; counts into ``counters`` (a ReloadCounters)."""

    _log = Logger()

    def __init__(self, path: str, apply: Apply, counters: Any, reactor: Any,
                 load: Optional[Callable[[str], defer.Deferred]] = None,
                 applied: Sequence[Callable[[], None]] = ()) -> None:
        self.path = path
        self._apply = apply
        self.counters = counters
        self._reactor = reactor
        self._load = load or self._load_in_thread
        self._applied = list(applied)
        self._outcomes: List[Callable[[ReloadResult], None]] = []
        self._running = False
        self._waiting: Optional[defer.Deferred] = None

    def _load_in_thread(self, path: str) -> defer.Deferred:
        # PyYAML takes milliseconds per pool, asking the sentinels of a Sentinel
        # pool (is every master name monitored?) up to a second: the reactor
        # goes on serving meanwhile.
        reactor = self._reactor
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), load_checked, path)

    def on_applied(self, callback: Callable[[], None]) -> None:
        self._applied.append(callback)

    def on_outcome(self, callback: Callable[[ReloadResult], None]) -> None:
        """Call ``callback(result)`` after every reload, applied or refused (the dashboard's events)."""
        self._outcomes.append(callback)

    def reload(self) -> defer.Deferred:
        """Reload now, or once the reload under way is done; fires with a ReloadResult.

        Requests that arrive while one runs share the one after it: ten
        SIGHUPs in a row read the file twice, not ten times, and the last
        read is never older than the last signal.
        """
        if not self._running:
            return self._start()
        if self._waiting is None:
            self._waiting = defer.Deferred()
        return shared(self._waiting)

    def _start(self) -> defer.Deferred:
        self._running = True
        done = self._reload()
        done.addBoth(self._finished)
        return done

    def _finished(self, result: Any) -> Any:
        self._running = False
        if isinstance(result, ReloadResult):
            for callback in self._outcomes:
                try:
                    callback(result)
                except Exception:  # noqa: BLE001 - logged; the reload's outcome stands
                    self._log.failure("after reload {generation}", generation=result.generation)
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            self._start().chainDeferred(waiting)
        return result

    @defer.inlineCallbacks
    def _reload(self) -> Any:
        counters = self.counters
        try:
            pools = yield self._load(self.path)
        except ConfigError as err:
            counters.reload_failures += 1
            self._log.error("reload of {path} failed, keeping the running topology: {error}",
                            path=self.path, error=str(err))
            return ReloadResult(False, 400, counters.generation, error=str(err))
        try:
            changes = yield self._apply(pools)
        except Exception as err:  # noqa: BLE001 - a ListenError, a worker's refusal: all said in one line
            counters.reload_failures += 1
            self._log.error("reload of {path} failed, keeping the running topology: {error}",
                            path=self.path, error=str(err))
            return ReloadResult(False, 500, counters.generation, error=str(err))
        self._log.info("reload of {path} applied (configuration {generation}): {summary}", path=self.path,
                       generation=counters.generation, summary="; ".join(changes) if changes else "no change")
        for callback in self._applied:
            try:
                callback()
            except Exception:  # noqa: BLE001 - e.g. the bound-addresses file: logged, the reload stands
                self._log.failure("after reload {generation}", generation=counters.generation)
        return ReloadResult(True, 200, counters.generation, changes=list(changes))


def shared(d: defer.Deferred) -> defer.Deferred:
    """A Deferred of ``d``'s result for one more waiter, leaving ``d``'s own chain alone."""
    out: defer.Deferred = defer.Deferred()

    def relay(result: Any) -> Any:
        if isinstance(result, Failure):
            out.errback(result)
        else:
            out.callback(result)
        return result

    d.addBoth(relay)
    return out


def apply_in_process(proxy: Any) -> Apply:
    """``Reloader``'s apply for one process: prepare and commit on ``proxy`` (a ProxyService)."""
    def apply(pools: List[PoolConfig]) -> defer.Deferred:
        try:
            return defer.succeed(proxy.reconfigure(pools))
        except Exception as err:  # noqa: BLE001 - ListenError: nothing changed
            return defer.fail(ApplyError(str(err)))

    return apply


class HangupService(Service):
    """SIGHUP: what nutcracker does (reopen the log) and a reload, each in the reactor thread."""

    _log = Logger()

    def __init__(self, reactor: Any, actions: Sequence[Callable[[], Any]]) -> None:
        self.setName("hangup")
        self._reactor = reactor
        self._actions = list(actions)
        self._installed = False

    def startService(self) -> None:
        super().startService()
        try:
            signal.signal(signal.SIGHUP, self._handle)
            self._installed = True
        except ValueError:  # not the main thread (tests run the reactor in a thread)
            pass

    def _handle(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self.hangup)

    def hangup(self) -> None:
        for action in self._actions:
            try:
                action()
            except Exception:  # noqa: BLE001 - one failing action must not stop the next
                self._log.failure("SIGHUP")

    def stopService(self) -> None:
        super().stopService()
        if self._installed:
            # Stopping means the process is on its way out, draining: SIGHUP's
            # default action would kill it with requests in flight.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            self._installed = False
