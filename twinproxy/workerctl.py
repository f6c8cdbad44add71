"""The control channel between a ``--workers`` master and each worker.

Owns: the worker's end (:class:`WorkerControlService`, a unix socket only
the master's user can open) and the master's (:func:`ask`, one exchange
per connection, and :func:`apply_everywhere`, a two-phase change: every
worker prepares — parses nothing, binds what it must — and only when all
have, every worker commits; else every worker aborts, so the workers never
serve two different topologies).  Messages are length-prefixed pickles of
plain dicts and PoolConfig values; both ends are this program, on a socket
in a directory only it can enter.
"""

from __future__ import annotations

import os
import pickle
from typing import Any, Callable, Dict, List, Optional, Sequence

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

from twinproxy import stats

# A worker that does not answer within this many seconds is taken as gone.
ASK_TIMEOUT = 10.0
MAX_MESSAGE = 64 * 1024 * 1024


class _WorkerEnd(Int32StringReceiver):
    """One exchange with the master; a change prepared here dies with the connection unless committed."""

    MAX_LENGTH = MAX_MESSAGE
    _log = Logger()

    def __init__(self, service: "WorkerControlService") -> None:
        self._service = service
        self._prepared: Any = None

    def stringReceived(self, data: bytes) -> None:
        try:
            message = pickle.loads(data)
            if message.get("op") == "settle":
                # Asynchronous: the answer waits for the holds to drain.
                self._service.proxy.settled().addCallbacks(
                    lambda _: self._reply({"ok": True}),
                    lambda failure: self._reply({"ok": False, "error": f"worker {os.getpid()}: "
                                                                      f"{failure.getErrorMessage()}"}))
                return
            reply = self._handle(message)
        except Exception as err:  # noqa: BLE001 - the master is told, and so is the log
            self._log.failure("worker control: {op} failed", op=locals().get("message", {}).get("op", "?"))
            reply = {"ok": False, "error": f"worker {os.getpid()}: {err}"}
        self._reply(reply)

    def _reply(self, reply: Dict[str, Any]) -> None:
        if self.transport is not None and self.connected:
            self.sendString(pickle.dumps(reply))

    def _handle(self, message: Dict[str, Any]) -> Dict[str, Any]:
        service = self._service
        op = message.get("op")
        if op == "stats":
            return {"ok": True, "document": service.document()}
        if op == "prepare":
            if self._prepared is not None:
                self._prepared.abort()
            self._prepared = service.proxy.prepare(message["pools"])
            return {"ok": True, "changes": self._prepared.describe()}
        if op == "commit":
            prepared, self._prepared = self._prepared, None
            if prepared is None:
                return {"ok": False, "error": "nothing prepared"}
            changes = prepared.commit()
            service.applied()
            return {"ok": True, "changes": changes}
        if op == "abort":
            prepared, self._prepared = self._prepared, None
            if prepared is not None:
                prepared.abort()
            return {"ok": True}
        if op == "reopen":
            service.reopen_log()
            return {"ok": True}
        if op == "lease":
            service.proxy.renew_leases(float(message["until"]))
            return {"ok": True}
        return {"ok": False, "error": f"unknown operation {op!r}"}

    def connectionLost(self, reason: Any = None) -> None:
        prepared, self._prepared = self._prepared, None
        if prepared is not None:
            prepared.abort()


class _WorkerEndFactory(Factory):
    noisy = False

    def __init__(self, service: "WorkerControlService") -> None:
        self._service = service

    def buildProtocol(self, addr: Any) -> _WorkerEnd:
        protocol = _WorkerEnd(self._service)
        protocol.factory = self
        return protocol


class WorkerControlService(Service):
    """A worker's control socket: stats, two-phase reloads and log reopening for its master."""

    def __init__(self, path: str, proxy: Any, pools: Callable[[], Sequence[Any]], started: float, reactor: Any,
                 log_control: Any = None, applied: Optional[Callable[[], None]] = None) -> None:
        self.setName("worker-control")
        self.path = path
        self.proxy = proxy
        self._pools = pools
        self._started = started
        self._reactor = reactor
        self._log_control = log_control
        self._applied = applied
        self.port: Any = None

    def document(self) -> Dict[str, Any]:
        return stats.snapshot(self._pools(), self._started, self._reactor.seconds(), self.proxy.counters)

    def applied(self) -> None:
        if self._applied is not None:
            self._applied()

    def reopen_log(self) -> None:
        if self._log_control is not None:
            self._log_control.reopen()

    def privilegedStartService(self) -> None:
        if self.port is None:
            self.port = self._reactor.listenUNIX(self.path, _WorkerEndFactory(self), mode=0o600)
        super().privilegedStartService()

    def startService(self) -> None:
        if self.port is None:
            self.port = self._reactor.listenUNIX(self.path, _WorkerEndFactory(self), mode=0o600)
        super().startService()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        port, self.port = self.port, None
        return defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)


# -- the master's end ---------------------------------------------------------


class _MasterEnd(Int32StringReceiver):
    """Sends one message at a time and fires the Deferred of each with the worker's reply."""

    MAX_LENGTH = MAX_MESSAGE

    def __init__(self) -> None:
        self._waiting: List[defer.Deferred] = []

    def ask(self, message: Dict[str, Any]) -> defer.Deferred:
        waiter: defer.Deferred = defer.Deferred()
        self._waiting.append(waiter)
        self.sendString(pickle.dumps(message))
        return waiter

    def stringReceived(self, data: bytes) -> None:
        if self._waiting:
            self._waiting.pop(0).callback(pickle.loads(data))

    def connectionLost(self, reason: Any = None) -> None:
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.errback(ConnectionError("the worker closed its control connection"))


class WorkerUnreachableError(Exception):
    """A worker's control socket did not answer."""


class _QuietFactory(Factory):
    noisy = False
    protocol = _MasterEnd


def _connect(reactor: Any, path: str) -> defer.Deferred:
    return UNIXClientEndpoint(reactor, path, timeout=ASK_TIMEOUT).connect(_QuietFactory())


def _with_timeout(reactor: Any, d: defer.Deferred, what: str) -> defer.Deferred:
    def timed_out(result: Any, timeout: float) -> Any:
        if isinstance(result, Failure) and result.check(defer.CancelledError):
            raise WorkerUnreachableError(f"{what}: no answer within {timeout:g}s")
        return result

    return d.addTimeout(ASK_TIMEOUT, reactor, onTimeoutCancel=timed_out)


@defer.inlineCallbacks
def ask(reactor: Any, path: str, message: Dict[str, Any]) -> Any:
    """One message to the worker at ``path``, one reply (a dict)."""
    end = yield _with_timeout(reactor, _connect(reactor, path), path)
    try:
        reply = yield _with_timeout(reactor, end.ask(message), path)
    finally:
        end.transport.loseConnection()
    return reply


class PartialCommitError(Exception):
    """Every worker prepared, but some did not confirm the commit (it died or hung meanwhile).

    The others have applied the change: it stands.
    """

    def __init__(self, changes: List[str], reason: str) -> None:
        super().__init__(reason)
        self.changes = changes


@defer.inlineCallbacks
def apply_everywhere(reactor: Any, paths: Sequence[str], pools: List[Any]) -> Any:
    """Two-phase: every worker prepares ``pools``; all commit if all could, else all abort.

    Returns the changes; raises RuntimeError naming the first worker that
    refused (a listener it could not open) or did not answer, with nothing
    changed anywhere; PartialCommitError when the change was committed but
    some worker did not confirm it.
    """
    ends: List[_MasterEnd] = []
    try:
        connecting = [_with_timeout(reactor, _connect(reactor, path), path) for path in paths]
        results = yield defer.DeferredList(connecting, consumeErrors=True)
        ends = [value for ok, value in results if ok]
        for (ok, value), path in zip(results, paths):
            if not ok:
                raise RuntimeError(f"worker at {path} unreachable: {value.getErrorMessage()}")
        prepared = yield _ask_all(reactor, ends, {"op": "prepare", "pools": pools}, "prepare")
        refusal = _first_refusal(prepared)
        if refusal is not None:
            yield _ask_all(reactor, ends, {"op": "abort"}, "abort")
            raise RuntimeError(refusal)
        committed = yield _ask_all(reactor, ends, {"op": "commit"}, "commit")
        changes = next((value["changes"] for ok, value in committed if ok and value.get("ok")), None)
        refusal = _first_refusal(committed)
        if refusal is not None:
            if changes is None:
                changes = next(value["changes"] for ok, value in prepared)
            raise PartialCommitError(changes, refusal)
        return changes
    finally:
        for end in ends:
            if end.transport is not None:
                end.transport.loseConnection()


@defer.inlineCallbacks
def settle_everywhere(reactor: Any, paths: Sequence[str]) -> Any:
    """Every worker's slot holds have drained what was in flight; RuntimeError naming one that did not."""
    results = yield defer.DeferredList([ask(reactor, path, {"op": "settle"}) for path in paths],
                                       consumeErrors=True)
    refusal = _first_refusal(results)
    if refusal is not None:
        raise RuntimeError(refusal)


def _ask_all(reactor: Any, ends: Sequence[_MasterEnd], message: Dict[str, Any], what: str) -> defer.Deferred:
    return defer.DeferredList([_with_timeout(reactor, end.ask(message), what) for end in ends],
                              consumeErrors=True)


def _first_refusal(results: List[Any]) -> Optional[str]:
    for ok, value in results:
        if not ok:
            return value.getErrorMessage()
        if not value.get("ok"):
            return value.get("error", "refused")
    return None
