"""Slot migrations driven by the dashboard: the queue, each migration's state machine, its operations.

Owns :class:`Migrations` (the controller's ``migrator``: one
:class:`~twinproxy.dashboard.runner.Runner` per migration that has not
ended, the :class:`~twinproxy.dashboard.progress.ProgressBook`, and the
bodies of the controller's ``migrate`` / ``migrations`` / ``pause`` /
``resume`` / ``cancel``).  The states and what each writes are the model's
(:mod:`twinproxy.cluster.migrations`); here is who writes them when:

1. pending: created by ``migrate``.  It starts when its groups are free
   (per group first come first served: :func:`~twinproxy.cluster.concurrency.startable`),
   it is not paused, both masters answer and the target's Redis is not
   older than the source's (else it fails: a DUMP payload of a newer Redis
   does not load in an older one);
2. prepared: the range held at the source, then every proxy's
   acknowledgement awaited (each holds the range and has drained what was in
   flight).  When they do not all come within the ack timeout nothing has
   moved yet: the hold is released (back to pending, the reason kept) and it
   is tried again after a delay doubling from 1 s to 30 s;
3. migrating: owned by the target, state migrating, acknowledgements
   awaited (a laggard still holds the range, so the sweep may go on without
   it: noted in the progress' error).  The :class:`~twinproxy.dashboard.mover.Sweep`
   moves the keys the proxies have not; pause/resume stop and restart it;
4. finished: stable at the target, acknowledgements awaited (a laggard is
   noted).  Then the next pending migration of those groups starts.

A memcache cluster's migration (its items cannot move) deletes, before its
hold, what the target's servers still hold of the range (an earlier
migration's leftovers), compares no versions, and instead of the sweep
warms up for ``warmup_seconds`` (its clock in the entry: pause stops it,
resume and a restarted dashboard go on with it); then the range is held
at the target until every proxy has acknowledged (none reads the source
any more), and only then stable there.  Its cancel holds the range at the
target the same way and gives it straight back to the source.

Cancel: pending or prepared ones are released at the source; a migrating
one is first stopped (its batches in flight answered), then moved back with
the same steps (held at the target, migrating to the source, swept back),
ending ``cancelled`` with the source owning the slots.  Its hold is never
released on missing acknowledgements (the keys are on both sides): it waits
for them, trying again.

Every topology write is one of the controller's operations (its ``busy``
while it writes and waits for the acknowledgements); a runner waits for the
controller to be idle before taking its turn.  Everything is in the
topology, so a restarted dashboard takes every migration up from its state
(a sweep starts its passes again; the progress counts go on from the
coordinator's copy and a paused migration stays paused).  The lock lost:
sweeps wait, steps fail 503 and are tried again when it is back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.logger import Logger

from twinproxy.cluster import migrations
from twinproxy.cluster.migrations import Migration
from twinproxy.dashboard.errors import OperationError
from twinproxy.dashboard.progress import Progress, ProgressBook
from twinproxy.dashboard.runner import Runner

if TYPE_CHECKING:
    from twinproxy.dashboard.controller import Controller

IDLE_POLL = 0.02


class Migrations:
    """The controller's migrations: runners, progress, and the operations' bodies."""

    _log = Logger()

    def __init__(self, ctl: "Controller") -> None:
        self.ctl = ctl
        self.book = ProgressBook(ctl.coordinator, ctl.cluster, ctl.reactor)
        self.runners: Dict[int, Runner] = {}
        self._running = False
        # The lock was not held for a while: someone else may have moved a migration on, so nothing
        # moves until the topology has been read again (by the controller, or by a runner).
        self.unsure = False
        # Called with (migration id, paused) on each pause / resume (the web dashboard's events).
        self.pause_listeners: List[Callable[[int, bool], None]] = []

    # -- life --------------------------------------------------------------------

    def load(self) -> defer.Deferred:
        return self.book.load()

    def start(self) -> None:
        self._running = True
        self.book.start()
        self.check()

    def halt(self) -> None:
        """Stop every runner (their sweeps after the batches in flight); ``stopped`` waits for them."""
        self._running = False
        for runner in list(self.runners.values()):
            runner.stop()

    @defer.inlineCallbacks
    def stopped(self) -> Any:
        yield defer.DeferredList([runner.done for runner in list(self.runners.values()) if runner.done is not None])
        if self.book.running:
            yield self.book.stop()

    def check(self) -> None:
        """Start a runner for each migration without one; wake the others (the topology may have changed)."""
        topology = self.ctl.topology
        if not self._running or topology is None:
            return
        self.book.keep({m.id for m in topology.migrations})
        for m in topology.migrations:
            if not m.ended and m.id not in self.runners:
                if m.active:
                    self._log.info("cluster {cluster}: taking up migration {id} where it is ({state})",
                                     cluster=self.ctl.cluster, id=m.describe(), state=m.state)
                runner = self.runners[m.id] = Runner(self, m.id)
                runner.start()
        for runner in list(self.runners.values()):
            runner.wake()

    def runner_done(self, runner: Runner) -> None:
        if self.runners.get(runner.id) is runner:
            del self.runners[runner.id]
        if self._running:
            # It ended, or stopped with the migration still going (another dashboard's write): look again.
            self.ctl.reactor.callLater(0, self.check)

    @defer.inlineCallbacks
    def idle(self, give_up: Callable[[], bool], timeout: Optional[float] = None) -> Any:
        """Returns when the controller runs no operation (or ``give_up()``, or after ``timeout``)."""
        reactor = self.ctl.reactor
        deadline = None if timeout is None else reactor.seconds() + timeout
        while self.ctl.busy is not None and not give_up():
            if deadline is not None and reactor.seconds() >= deadline:
                return
            yield deferLater(reactor, IDLE_POLL, lambda: None)

    # -- reads -------------------------------------------------------------------

    def paused(self, mid: int) -> bool:
        progress = self.book.entries.get(mid)
        return progress is not None and progress.paused

    def paused_ids(self) -> List[int]:
        return [mid for mid, progress in self.book.entries.items() if progress.paused]

    def merged(self, m: Migration) -> Dict[str, Any]:
        """The API's view of ``m``: the topology's entry, its progress, and who owns the slots now."""
        progress = self.book.entries.get(m.id) or Progress()
        document = m.to_dict()
        keys_left = 0 if m.state == "finished" or (m.state == "cancelled" and m.cancelling) else progress.keys_left
        owner = {"pending": m.from_group, "preparing": m.from_group, "prepared": m.source,
                 "migrating": m.target, "finished": m.to_group}.get(m.state, m.from_group)
        document.update(keys_moved=progress.keys_moved, keys_left=keys_left,
                        rate=0.0 if m.ended else progress.rate, eta=None if m.ended else progress.eta,
                        error=m.error if m.ended else (progress.error or m.error), paused=progress.paused,
                        owner=owner)
        if m.warms and m.state == "migrating":
            # The seconds of warm-up left now (the entry keeps its end, or what was left when paused).
            left = m.warmup_left if m.warmup_until is None else m.warmup_until - self.ctl.reactor.seconds()
            left = 0.0 if m.warmed else (float(m.warmup_seconds) if left is None else max(0.0, round(left, 1)))
            document.update(warmup_left=left, eta=None if progress.paused else left)
        return document

    def listing(self) -> Dict[str, Any]:
        topology = self.ctl.current()
        return {"migrations": [self.merged(m) for m in topology.migrations]}

    def cancelled(self, m: Migration, note: str, generation: Optional[int] = None) -> Dict[str, Any]:
        topology = self.ctl.current()
        return {"ok": True, "generation": generation if generation is not None else topology.generation,
                "migration": self.merged(m), "owner": m.from_group, "note": note}

    # -- operations -------------------------------------------------------------

    def _chosen(self, mid: Optional[int], doing: str) -> List[Migration]:
        """The migration ``mid`` (404 unknown, 409 ended), or every one not ended."""
        topology = self.ctl.current()
        if mid is None:
            return [m for m in topology.migrations if not m.ended]
        m = topology.migration(mid)
        if m is None:
            raise OperationError(404, f"there is no migration {mid}")
        if m.ended:
            raise OperationError(409, f"cannot {doing} migration {mid}: it has ended ({m.state})")
        return [m]

    @defer.inlineCallbacks
    def migrate(self, first: int, last: int, gid: int, keys_per_second: Optional[int],
                parallel: Optional[int], warmup_seconds: Optional[int] = None) -> Any:
        ctl = self.ctl
        ctl.check_writable()

        def edit(topology: Any) -> Any:
            return migrations.create(topology, first, last, gid, keys_per_second, parallel, warmup_seconds)

        ctl.dry(lambda: edit(ctl.current()))
        # Queued behind a runner's step rather than refused: those are short.
        yield self.idle(lambda: False, timeout=ctl.ack_timeout * 2 + 5)
        new = yield ctl._operation(f"migrate slots {first}-{last} to group {gid}", self.queue, first, last, gid,
                                   keys_per_second, parallel, warmup_seconds)
        m = new.migrations[-1]
        return ctl.ok(new, migration=self.merged(m))

    @defer.inlineCallbacks
    def queue(self, first: int, last: int, gid: int, keys_per_second: Optional[int],
              parallel: Optional[int], warmup_seconds: Optional[int] = None) -> Any:
        """Write one pending migration and wait for the proxies; the new Topology (its last migration).

        Runs inside one of the controller's operations (``migrate``'s, or a
        rebalance's); fails as ``commit`` does (504: written, not
        acknowledged by every proxy).
        """
        new = yield self.ctl.commit(lambda t: migrations.create(t, first, last, gid, keys_per_second, parallel,
                                                                warmup_seconds),
                                    f"migration of slots {first}-{last} to group {gid} queued")
        return new

    def adopt(self, request: Any) -> Any:
        """Take over a twemproxy pool (groups, slots and a paused adoption in one generation), or resume its
        adoption (the servers whose keys have not moved queued again, paused): an
        :class:`~twinproxy.dashboard.adoption.AdoptRequest`."""
        from twinproxy.dashboard import adoption

        return adoption.queue(self, request)

    def pause(self, mid: Optional[int]) -> Dict[str, Any]:
        return self._pause(mid, True)

    def resume(self, mid: Optional[int]) -> Dict[str, Any]:
        return self._pause(mid, False)

    def _pause(self, mid: Optional[int], paused: bool) -> Dict[str, Any]:
        self.ctl.check_writable()
        chosen = self._chosen(mid, "pause" if paused else "resume")
        for m in chosen:
            self.book.get(m.id).paused = paused
            runner = self.runners.get(m.id)
            if runner is not None:
                if runner.sweep is not None:
                    (runner.sweep.pause if paused else runner.sweep.resume)()
                runner.wake()
        self.book.write()
        for m in chosen:
            for listener in list(self.pause_listeners):
                listener(m.id, paused)
        key = "paused" if paused else "resumed"
        return self.ctl.ok(self.ctl.current(), **{key: [m.id for m in chosen],
                                                  "migrations": [self.merged(m) for m in chosen]})

    @defer.inlineCallbacks
    def throttle(self, mid: int, keys_per_second: Optional[int]) -> Any:
        """Change migration ``mid``'s rate: written in its topology entry (a restarted dashboard keeps it),
        and given to its sweep at once."""
        ctl = self.ctl
        ctl.check_writable()
        self._chosen(mid, "throttle")
        ctl.dry(lambda: migrations.throttle(ctl.current(), mid, keys_per_second))
        yield self.idle(lambda: False, timeout=ctl.ack_timeout * 2 + 5)
        rate = "no limit" if keys_per_second is None else f"{keys_per_second} keys/s"
        new = yield ctl._operation(f"throttle migration {mid} to {rate}", ctl.commit,
                                   lambda t: migrations.throttle(t, mid, keys_per_second),
                                   f"migration {mid} throttled to {rate}")
        runner = self.runners.get(mid)
        if runner is not None and runner.sweep is not None:
            runner.sweep.set_rate(keys_per_second)
        return ctl.ok(new, migration=self.merged(new.migration(mid)))

    @defer.inlineCallbacks
    def cancel(self, mid: Optional[int]) -> Any:
        self.ctl.check_writable()
        chosen = self._chosen(mid, "cancel")
        self.check()
        answers = []
        for m in chosen:
            runner = self.runners.get(m.id)
            if runner is None:
                raise OperationError(503, f"migration {m.id} has no runner (the dashboard is stopping)")
            # A paused migration is cancelled too: its way back must not stay paused.
            progress = self.book.get(m.id)
            if progress.paused:
                progress.paused = False
                if runner.sweep is not None:
                    runner.sweep.resume()
            answers.append(runner.cancel())
        results = yield defer.DeferredList(answers, consumeErrors=True)
        done, problems = [], []
        for (ok, value) in results:
            if ok:
                done.append(value)
            elif value.check(OperationError) and (mid is None and value.value.status == 409):
                continue      # cancelling all: one that ended meanwhile is not a failure
            else:
                problems.append(value.value)
        if problems:
            raise problems[0] if isinstance(problems[0], OperationError) else OperationError(
                500, f"internal error: {problems[0]}")
        if mid is not None:
            return done[0]
        return self.ctl.ok(self.ctl.current(), cancelled=[item["migration"] for item in done],
                           owners={str(item["migration"]["id"]): item["owner"] for item in done})
