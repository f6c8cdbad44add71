"""One slot migration driven through its states by the dashboard (see ``migration`` for the whole story).

Owns :class:`Runner`: a loop per migration that has not ended, which reads
the migration's state from the controller's topology, takes the next step
as one of the controller's operations (hold, migrating, finish, cancel;
each a topology write waiting for every proxy), runs the
:class:`~twinproxy.dashboard.mover.Sweep` while the range is migrating
(for a memcache cluster, whose items cannot move, its warm-up instead:
:meth:`Runner._warm_up`), and tries again after a delay doubling from 1 s
to 30 s when a step fails (its reason in the progress' ``error``).  Cancels asked for meanwhile are
answered by the loop once their write is made.  A sweep waits while either
group's master is not confirmed (``masters``: a Sentinel failover).  Runs in the reactor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, List, Optional

from twisted.internet import defer
from twisted.logger import Logger

from twinproxy.cluster import migrations
from twinproxy.cluster.migrations import Migration, startable
from twinproxy.cluster.movescripts import CLAIMS, claim_of
from twinproxy.cluster.slots import slot_of
from twinproxy.dashboard import adoption
from twinproxy.dashboard.bigkeys import ROLLBACK
from twinproxy.dashboard.errors import OperationError
from twinproxy.dashboard.leftovers import purge
from twinproxy.dashboard.mover import Sweep
from twinproxy.dashboard.progress import Progress
from twinproxy.dashboard.servers import ServerError, unanswered

if TYPE_CHECKING:
    from twinproxy.cluster.model import Topology
    from twinproxy.dashboard.migration import Migrations

def sweep_options(ctl: Any) -> dict:
    """What every sweep of this dashboard is given: the big-key threshold when it has one
    (``--big-key-bytes``), the data servers' credentials (``--redis-auth-file``, ``--redis-auth-user``)."""
    value = getattr(ctl, "big_key_bytes", None)
    options = {} if value is None else {"big_key_bytes": value}
    options["auth"] = getattr(ctl, "redis_auth", None)
    return options


POLL = 0.25                      # seconds a runner waits before looking again (woken sooner by changes)
RETRY_FIRST, RETRY_LONGEST = 1.0, 30.0


def _version(info: Any) -> Optional[tuple]:
    text = info.decode("utf-8", "replace") if isinstance(info, bytes) else str(info)
    for line in text.splitlines():
        if line.startswith("redis_version:"):
            try:
                return tuple(int(part) for part in line.split(":", 1)[1].strip().split("."))
            except ValueError:
                return None
    return None


class Runner:
    """Drives one migration through its states until it ends (or the dashboard stops)."""

    _log = Logger()

    def __init__(self, manager: "Migrations", mid: int) -> None:
        self.manager = manager
        self.ctl = manager.ctl
        self.id = mid
        self.sweep: Any = None          # a Sweep, or an adoption's SweepGroup
        self.cancels: List[defer.Deferred] = []
        self.stopped = False
        self._wake: Optional[defer.Deferred] = None
        self._delay = RETRY_FIRST
        self.done: Optional[defer.Deferred] = None

    @property
    def progress(self) -> Progress:
        return self.manager.book.get(self.id)

    def start(self) -> None:
        self.done = self._loop()

    def stop(self) -> None:
        self.stopped = True
        if self.sweep is not None:
            self.sweep.stop()
        self.wake()

    def wake(self) -> None:
        if self._wake is not None and not self._wake.called:
            self._wake.callback(None)

    def cancel(self) -> defer.Deferred:
        """Fires with the cancel's answer once it is written (or fails with why it cannot be)."""
        answer: defer.Deferred = defer.Deferred()
        self.cancels.append(answer)
        if self.sweep is not None:
            self.sweep.stop()      # its batches in flight answer first
        self.wake()
        return answer

    def _sleep(self, seconds: float) -> defer.Deferred:
        woken: defer.Deferred = defer.Deferred()
        self._wake = woken
        timer = self.ctl.reactor.callLater(seconds, lambda: woken.called or woken.callback(None))

        def done(value: Any) -> Any:
            if timer.active():
                timer.cancel()
            return value

        return woken.addBoth(done)

    def _entry(self) -> Optional[Migration]:
        topology = self.ctl.topology
        return topology.migration(self.id) if topology is not None else None

    def _answer_cancels(self, result: Any = None, error: Optional[OperationError] = None) -> None:
        answers, self.cancels = self.cancels, []
        for answer in answers:
            if error is not None:
                answer.errback(error)
            else:
                answer.callback(result)

    @defer.inlineCallbacks
    def _loop(self) -> Any:
        try:
            while not self.stopped:
                m = self._entry()
                if m is None or m.ended:
                    if self.cancels:
                        shown = f"has ended ({m.state})" if m is not None else "is gone from the topology"
                        self._answer_cancels(error=OperationError(409, f"migration {self.id} {shown}"))
                    return
                if self.cancels and m.cancelling:
                    self._answer_cancels(self.manager.cancelled(m, "it is being moved back already"))
                if not self.ctl.writable:
                    yield self._sleep(POLL)
                    continue
                if self.manager.unsure:
                    try:
                        yield self.ctl.reread()
                        self.manager.unsure = False
                    except OperationError:
                        yield self._sleep(POLL)
                    continue
                try:
                    acted = yield self._act(m)
                except Exception as err:  # noqa: BLE001 - a runner must outlive any one failed step
                    if self.stopped:
                        return
                    if not isinstance(err, OperationError):
                        self._log.failure("cluster {cluster}: migration {id}: unexpected error",
                                          cluster=self.ctl.cluster, id=self.id)
                    self.progress.error = getattr(err, "message", None) or f"internal error: {err}"
                    try:
                        yield self.ctl.reread()      # a write that failed may have landed
                    except OperationError:
                        pass
                    yield self._sleep(self._delay)
                    self._delay = min(self._delay * 2, RETRY_LONGEST)
                    continue
                self._delay = RETRY_FIRST
                if not acted:
                    yield self._sleep(POLL)
        finally:
            if self.cancels:
                self._answer_cancels(error=OperationError(503, "the dashboard is stopping"))
            self.manager.runner_done(self)

    @defer.inlineCallbacks
    def _act(self, m: Migration) -> Any:
        """One step of ``m``; False when it has to wait (its turn, a pause)."""
        cancel = bool(self.cancels) and not m.cancelling
        what = (f"adoption {m.id} (group {m.from_group}'s keys)" if m.adopt else
                f"migration {m.id} (slots {m.first}-{m.last})")
        if cancel:
            yield self._step(f"cancel {what}", self._cancel)
            return True
        if m.state in ("pending", "preparing"):
            topology = self.ctl.current()
            if self.manager.paused(m.id) or m.id not in startable(topology, self.manager.paused_ids()):
                return False
            yield self._step(f"{what}: hold the slots" + ("" if m.adopt else f" on group {m.source}"), self._prepare)
        elif m.state == "prepared":
            yield self._step(f"{what}: migrating" + ("" if m.adopt else f" to group {m.target}"), self._start_moving)
        elif m.warms:
            return (yield self._warm_up(m, what))
        else:
            done = yield self._sweep(m)
            if done and not self.stopped and not self.cancels:
                yield self._step(f"{what}: finish", self._finish)
        return True

    @defer.inlineCallbacks
    def _step(self, name: str, body: Callable[[], Any]) -> Any:
        yield self.manager.idle(lambda: self.stopped)
        if self.stopped:
            raise OperationError(503, "the dashboard is stopping")
        self.progress.error = None       # what this step finds worth noting is noted again
        result = yield self.ctl._operation(name, body)
        m = self._entry()
        if m is not None:
            self._log.info("cluster {cluster}: {step}: done, migration {id} is {state} (generation {generation})",
                           cluster=self.ctl.cluster, step=name, id=self.id, state=m.state,
                           generation=self.ctl.current().generation)
        return result

    @defer.inlineCallbacks
    def _prepare(self) -> Any:
        ctl = self.ctl
        ctl.check_writable()
        m = self._entry()
        current = ctl.current()
        if self.manager.paused(self.id):
            return ctl.ok(current)      # paused while this step waited for its turn: nothing is held
        ctl.dry(lambda: current.advance_migration(self.id))
        if m.warms:    # memcached: no versions to compare, leftover items of the range to delete
            yield self._purge_leftovers(m)
        if m.adopt and not m.warms:
            reason = yield adoption.check_versions(ctl, current, m, _version)
            if reason is not None:
                yield ctl.commit(lambda t: t.fail_migration(self.id, reason), f"adoption {m.id} failed")
                return {"failed": reason}
        versions = []
        for gid in (m.source, m.target) if not (m.warms or m.adopt) else ():
            master = current.group(gid).master
            try:
                versions.append(_version((yield ctl.admin.command(master, b"INFO", b"server"))))
            except ServerError as err:
                raise OperationError(502, f"migration {m.id} cannot start: group {gid}'s master "
                                     f"{unanswered(err)}")
        if len(versions) == 2 and None not in versions and versions[1] < versions[0]:
            reason = (f"the target group {m.target} runs Redis {'.'.join(map(str, versions[1]))}, older than the "
                      f"source's {'.'.join(map(str, versions[0]))}: its keys would not load there")
            yield ctl.commit(lambda t: t.fail_migration(self.id, reason), f"migration {m.id} failed")
            return {"failed": reason}
        held = yield ctl.write(lambda t: t.advance_migration(self.id))
        try:
            yield ctl.wait_acks(held, f"the hold of slots {m.first}-{m.last} (migration {m.id})")
        except OperationError as err:
            if err.status == 504:
                # Nothing has moved yet: release the hold rather than keep requests waiting.
                reason = err.message
                yield ctl.write(lambda t: t.unprepare_migration(self.id, reason))
            raise
        return ctl.ok(held)

    @defer.inlineCallbacks
    def _start_moving(self) -> Any:
        ctl = self.ctl
        ctl.check_writable()
        m = self._entry()
        try:
            yield ctl.wait_acks(ctl.current(), f"the hold of slots {m.first}-{m.last} (migration {m.id})")
        except OperationError as err:
            if err.status == 504 and not m.cancelling:
                reason = err.message
                yield ctl.write(lambda t: t.unprepare_migration(self.id, reason))
            raise      # moving back: keys on both sides, so the hold stays until everyone has it
        if m.cancelling and not m.warms:
            yield self._roll_back_claims(m)
        # (A memcache migration's warm-up clock starts now; a cancelled one goes back to its source.)
        moving = yield ctl.write(lambda t: migrations.advance(t, self.id, ctl.reactor.seconds()))
        yield self._acks_noted(moving, ("every slot back at its server" if m.cancelling else
                                        "every slot migrating to its owner") if m.adopt else
                               f"slots {m.first}-{m.last} migrating to group {m.target}")
        return ctl.ok(moving)

    @defer.inlineCallbacks
    def _roll_back_claims(self, m: Migration) -> Any:
        """A cancel's way back, under its hold: the old source's claims of the range become their keys again.

        A claimed key (a big key being copied) is on the old source under its
        claim name; nobody copies it once the range moves back (a proxy's
        claim made after the sweep stopped, or a killed dashboard's), so it
        would read as missing there.  While the range is held nobody touches it.
        """
        master = self.ctl.current().group(m.from_group).master
        try:
            members = yield self.ctl.admin.command(master, b"SMEMBERS", CLAIMS)
            for key in members or ():
                key = bytes(key)
                if m.first <= slot_of(key) <= m.last:
                    yield self.ctl.admin.command(master, b"EVAL", ROLLBACK, b"3", claim_of(key), key, CLAIMS)
        except ServerError as err:
            raise OperationError(502, f"migration {m.id}: putting back the big keys claimed on group "
                                 f"{m.from_group}'s master {master} failed: {err}")

    @defer.inlineCallbacks
    def _finish(self) -> Any:
        m = self._entry()
        ended = yield self.ctl.write(lambda t: t.advance_migration(self.id))
        yield self._acks_noted(ended, "every slot stable at its owner" if m.adopt else
                               f"slots {m.first}-{m.last} stable at group {m.target}")
        return self.ctl.ok(ended)

    @defer.inlineCallbacks
    def _cancel(self) -> Any:
        ctl = self.ctl
        m = self._entry()
        try:
            ctl.check_writable()
            new = yield ctl.write(lambda t: t.cancel_migration(self.id))
        except OperationError as err:
            self._answer_cancels(error=err)
            raise
        after = new.migration(self.id)
        note = ("nothing had moved: the slots stay with group {0}" if after.state == "cancelled" else
                "the keys the pool placed on group {0}'s server go back to it once every proxy holds them"
                if m.adopt else
                "its keys move back to group {0}, which owns the slots again when that ends").format(m.from_group)
        self._answer_cancels(self.manager.cancelled(after, note, new.generation))
        yield self._acks_noted(new, f"the cancel of migration {m.id}")
        return ctl.ok(new)

    @defer.inlineCallbacks
    def _acks_noted(self, topology: "Topology", what: str) -> Any:
        """Wait for the acknowledgements; missing ones are noted in the progress (the proxies catch up)."""
        try:
            yield self.ctl.wait_acks(topology, what)
        except OperationError as err:
            if err.status != 504:
                raise
            self.progress.error = err.message

    @defer.inlineCallbacks
    def _sweep(self, m: Migration) -> Any:
        topology = self.ctl.current()
        if m.adopt:     # the keys of one server of the adopted pool, to every other group
            sweep: Any = adoption.sweeps(self, topology, m, sweep_options(self.ctl))
        else:
            source, target = topology.group(m.source).master, topology.group(m.target).master
            sweep = Sweep(self.ctl.reactor, source, target, m.first, m.last, self.progress, m.keys_per_second,
                          m.parallel, may_go=lambda: self._may_sweep(m, source, target),
                          command_timeout=self.ctl.command_timeout, label=f"migration {m.id}",
                          refused=lambda reason: self.ctl.masters.refused(reason, (m.source, m.target)),
                          **sweep_options(self.ctl))
        if self.manager.paused(m.id):
            sweep.pause()
        self.sweep = sweep
        try:
            done = yield sweep.run()
        finally:
            self.sweep = None
        return done

    def _may_sweep(self, m: Migration, source: str, target: str, gids: Optional[tuple] = None) -> bool:
        """Whether the sweep may send its next command; a migration changed under it stops it.

        ``gids``: the source and target groups (an adoption's sweep; else the migration's)."""
        if not self.ctl.writable:
            return False      # the lock is not ours: whoever holds it may move the migration on
        if self.manager.unsure:
            # It was not ours for a while: stop, so that the loop reads the topology before going on.
            if self.sweep is not None:
                self.sweep.stop()
            return False
        now = self._entry()
        topology = self.ctl.topology

        def master(gid: int) -> Optional[str]:
            group = topology.group(gid)
            return group.master if group is not None else None

        source_gid, target_gid = gids if gids is not None else (m.source, m.target)
        if (now is None or now.state != "migrating" or now.cancelling != m.cancelling
                or master(source_gid) != source or master(target_gid) != target):
            if self.sweep is not None:
                self.sweep.stop()
            return False
        # A demoted master (a Sentinel failover) loses what is MIGRATEd into it: wait for confirmed ones.
        problem = self.ctl.masters.problem(source_gid, source) or self.ctl.masters.problem(target_gid, target)
        if problem is not None:
            self.progress.error = f"waiting: {problem}"
            return False
        return True

    # -- memcache clusters: a warm-up instead of a sweep ----------------------------------

    @defer.inlineCallbacks
    def _purge_leftovers(self, m: Migration) -> Any:
        """Delete what the target group's servers still hold of the range (see ``leftovers``); an adoption's
        entry, only what a cancelled entry of its server left at the other servers (usually nothing)."""
        topology = self.ctl.current()
        timeout = max(30.0, self.ctl.command_timeout * 10)
        addresses, belongs = (adoption.leftovers_of(topology, m) or ([], None)) if m.adopt else \
            (topology.group(m.target).servers, None)
        for address in addresses:
            try:
                count = yield purge(self.ctl.reactor, address, m.first, m.last, timeout, belongs)
            except ServerError as err:
                raise OperationError(502, f"migration {m.id} cannot start: {err}")
            if count:
                self._log.info("cluster {cluster}: migration {id}: deleted {count} leftover items of slots "
                               "{first}-{last} on {address}", cluster=self.ctl.cluster, id=m.id, count=count,
                               first=m.first, last=m.last, address=address)

    @defer.inlineCallbacks
    def _warm_up(self, m: Migration, what: str) -> Any:
        """One step of a migrating memcache migration: its warm-up clock, its end, or a wait (False).

        The clock lives in the entry (``warmup_until`` while it counts,
        ``warmup_left`` while paused), so a restarted dashboard goes on with it.
        """
        if m.warmed:
            yield self._step(f"{what}: finish", self._finish_warmed)
            return True
        now = self.ctl.reactor.seconds()
        paused = self.manager.paused(m.id)
        if paused and m.warmup_until is not None:
            left = max(0.0, m.warmup_until - now)
            yield self._step(f"{what}: pause the warm-up", lambda: self._clock(None, left))
            return True
        if paused:
            return False
        if m.warmup_until is None:
            left = float(m.warmup_seconds) if m.warmup_left is None else m.warmup_left
            yield self._step(f"{what}: warm up for {left:g}s", lambda: self._clock(now + left, None))
            return True
        left = m.warmup_until - now
        if left > 0:
            yield self._sleep(left)      # woken sooner by a pause, a cancel or a change
            return True
        yield self._step(f"{what}: warm-up over, hold the slots" + ("" if m.adopt else f" on group {m.target}"),
                         self._hold_warmed)
        return True

    @defer.inlineCallbacks
    def _clock(self, until: Any, left: Any) -> Any:
        ctl = self.ctl
        ctl.check_writable()
        new = yield ctl.write(lambda t: migrations.time_warmup(t, self.id, until, left))
        yield self._acks_noted(new, f"the warm-up clock of migration {self.id}")
        return ctl.ok(new)

    @defer.inlineCallbacks
    def _hold_warmed(self) -> Any:
        # Every proxy stops reading the source before any serves the target alone.
        self.ctl.check_writable()
        yield self.ctl.write(lambda t: t.advance_migration(self.id))
        return (yield self._finish_warmed())

    @defer.inlineCallbacks
    def _finish_warmed(self) -> Any:
        ctl = self.ctl
        ctl.check_writable()
        m = self._entry()
        # A proxy that has not acknowledged the hold may still warm from the source: wait for it.
        yield ctl.wait_acks(ctl.current(), f"the hold of slots {m.first}-{m.last} at the end of their warm-up "
                                           f"(migration {m.id})")
        ended = yield ctl.write(lambda t: t.advance_migration(self.id))
        yield self._acks_noted(ended, "every slot stable at its owner" if m.adopt else
                               f"slots {m.first}-{m.last} stable at group {m.target}")
        return ctl.ok(ended)
