"""The background mover of one migrating slot range: SCAN the source, MIGRATE the range's keys.

Owns :class:`Sweep` (codis.md §6.3, "Background mover") and
:class:`Throttle`.  A sweep walks the source master's whole keyspace (db
0) with ``SCAN cursor COUNT 1000``, keeps the keys whose slot
(:func:`~twinproxy.cluster.slots.slot_of`) is in the range, and sends them
in batches of at most 100 to the source's ``EVAL SWEEP_BATCH``
(``bigkeys``), which claims the batch's big keys (``MEMORY USAGE`` over
``big_key_bytes``, default 4 MiB) and moves the others with ``MIGRATE
<target host> <port> "" 0 <timeout> REPLACE [AUTH ...|AUTH2 ...] KEYS
k1..kn`` — atomic on the source, TTLs kept, ``+NOKEY`` when a proxy moved
them all already; with the cluster's credentials (``auth``) MIGRATE passes
them to the target, and every connection of the sweep authenticates first.  The
claimed keys are then copied in chunks by a
:class:`~twinproxy.dashboard.bigkeys.BigKeyMover`, as are the keys proxies
claimed (the registry on the source, looked at after every SCAN step, at
the start of every pass — a killed dashboard's claims — and while paused:
clients wait for them) and any claim key a SCAN finds.  Names of the claim
protocol (``__twinproxy:...``) are never keys of a slot: a tagged key's
claim hashes to its slot, an untagged one's anywhere.  ``parallel``
batches are in flight at once (pipelined on one connection), and with
``keys_per_second`` the batches are spaced so that no more leave per
second (a big key counts as one).

It is done after one complete SCAN pass finds none of the range's keys
(nor a claim of one), followed by a verification pass that finds none
either: after the barrier no proxy writes the range's keys to the
source, so a key found nowhere in a full pass cannot come back (SCAN
returns every key present for the whole pass).  ``REPLACE`` makes a retried batch harmless (an
IOERR may leave a key on both sides; the source's copy is the one that
counts until MIGRATE says OK).  A refused or unanswered command is
retried after a delay doubling from 0.2 s to 5 s, its reason in the
progress' ``error``; the sweep never gives up by itself (pause, cancel or
stop it).  Runs in the reactor and never blocks it.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple
from zlib import crc32

from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.logger import Logger

from twinproxy.cluster.movescripts import RESERVED_PREFIX
from twinproxy.cluster.slots import SLOT_COUNT, SLOT_MASK, slot_of
from twinproxy.credentials import Credentials
from twinproxy.dashboard.bigkeys import (
    DEFAULT_BIG_KEY_BYTES,
    Abandoned,
    BigKeyMover,
    Stopped,
    batch_command,
    batch_reply,
    claimed_key,
    migrate_arguments,
)
from twinproxy.dashboard.progress import Progress
from twinproxy.dashboard.servers import ServerAdmin, ServerError, split_address

SCAN_COUNT = 1000
BATCH = 100
MIGRATE_TIMEOUT_MS = 5000
BACKOFF_FIRST, BACKOFF_LONGEST = 0.2, 5.0
WAIT_POLL = 0.2      # seconds between two looks while paused or not allowed to go on
CLEAN_PASSES = 2     # a pass that finds none, then the verification pass


def slot_marks(first: int, last: int) -> bytes:
    """One byte per slot, 1 for the slots ``first..last``: what :func:`range_keys` looks a key's slot up in."""
    return bytes(1 if first <= slot <= last else 0 for slot in range(SLOT_COUNT))


def range_keys(keys: List[bytes], wanted: bytes,
               belongs: Optional[Callable[[bytes], bool]] = None) -> Tuple[List[bytes], List[bytes]]:
    """(the keys to move, the keys K whose claim is among ``keys`` and that are to move): by their slot marked
    in ``wanted``, or (an adoption) by ``belongs``.

    The sweep runs this on every key of the source, three passes over its
    keyspace: a SCAN step's keys are looked at together, and when none
    holds a hash tag or a reserved name (the usual case) each costs one
    ``crc32`` and one lookup.  Pure.
    """
    if belongs is None:
        joined = b"\n".join(keys)
        if b"{" not in joined and RESERVED_PREFIX not in joined:
            return [key for key in keys if wanted[crc32(key) & SLOT_MASK]], []
        belongs = lambda key: wanted[slot_of(key)]     # noqa: E731
    matched: List[bytes] = []
    claims: List[bytes] = []
    for key in keys:
        if key.startswith(RESERVED_PREFIX):
            named = claimed_key(key)
            if named is not None and belongs(named):
                claims.append(named)
        elif belongs(key):
            matched.append(key)
    return matched, claims


class Throttle:
    """Spaces sends so that at most ``rate`` keys leave per second (None: no limit)."""

    def __init__(self, reactor: Any, rate: Optional[int]) -> None:
        self._reactor = reactor
        self.rate = rate
        self._next = 0.0

    def delay(self, keys: int) -> float:
        """Seconds to wait before sending ``keys`` keys (and books them)."""
        if not self.rate:
            return 0.0
        now = self._reactor.seconds()
        start = max(now, self._next)
        self._next = start + keys / self.rate
        return start - now


class Sweep:
    """Moves every key of slots ``first..last`` from ``source`` to ``target`` (both ``host:port`` masters).

    ``run()`` fires True once the range is empty on the source, False when
    ``stop()`` ended it first (after the batches in flight answered).
    ``may_go()`` is asked before each command: False makes the sweep wait
    (the lock lost, the migration changed, a master not confirmed) — like
    ``pause()`` until ``resume()``; ``refused(reason)`` is told why a
    command failed before it is asked again.
    """

    _log = Logger()

    def __init__(self, reactor: Any, source: str, target: str, first: int, last: int, progress: Progress,
                 keys_per_second: Optional[int] = None, parallel: Optional[int] = None,
                 may_go: Optional[Callable[[], bool]] = None, timeout_ms: int = MIGRATE_TIMEOUT_MS,
                 command_timeout: float = 2.0, label: str = "", big_key_bytes: Optional[int] = None,
                 belongs: Optional[Callable[[bytes], bool]] = None,
                 refused: Optional[Callable[[str], None]] = None, auth: Optional[Credentials] = None) -> None:
        self._reactor = reactor
        self._refused = refused     # told why a command failed (a demoted master's READONLY: look again)
        # Which keys are to move: the range's, or (an adoption) whatever ``belongs`` says.
        self._belongs = belongs
        self.source = source
        self.target = target
        self.first = first
        self.last = last
        self._wanted = slot_marks(first, last)
        self.progress = progress
        self.parallel = parallel or 1
        self.throttle = Throttle(reactor, keys_per_second)
        self.batch = BATCH
        self.set_rate(keys_per_second)
        self._may_go = may_go or (lambda: True)
        self._timeout_ms = timeout_ms
        # Pipelined batches wait for the ones before them: the deadline covers them all.
        self._admin = ServerAdmin(reactor, timeout_ms / 1000.0 * self.parallel + command_timeout, auth)
        host, port = split_address(target)
        self.big_key_bytes = DEFAULT_BIG_KEY_BYTES if big_key_bytes is None else big_key_bytes
        migrate = migrate_arguments(host, port, timeout_ms, auth)
        self._batch_head = [b"%d" % self.big_key_bytes, *migrate]
        self.label = label or f"slots {first}-{last}"
        self._links = ServerAdmin(reactor, command_timeout, auth)
        self.big = BigKeyMover(reactor, self._links, source, target, self._in_range, progress, migrate,
                               may_go=lambda: self._may_go(), stopped=lambda: self.stopped, trouble=self._trouble,
                               well=self._well, label=self.label)
        self.paused = False
        self.stopped = False
        self.passes = 0
        self._delay = BACKOFF_FIRST

    # -- control ---------------------------------------------------------------

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def stop(self) -> None:
        self.stopped = True

    # -- the sweep ---------------------------------------------------------------

    def _in_range(self, key: bytes) -> bool:
        if self._belongs is not None:
            return self._belongs(key)
        return bool(self._wanted[slot_of(key)])

    def set_rate(self, keys_per_second: Optional[int]) -> None:
        """At most ``keys_per_second`` keys a second from the next batch on (None: no limit)."""
        self.throttle.rate = keys_per_second
        self.throttle._next = 0.0
        self.batch = min(BATCH, max(1, keys_per_second // 10)) if keys_per_second else BATCH

    @defer.inlineCallbacks
    def run(self) -> Any:
        try:
            clean = 0
            while clean < CLEAN_PASSES:
                found = yield self._pass()
                self.passes += 1
                clean = clean + 1 if found == 0 else 0
            self.progress.keys_left = 0
            return True
        except Stopped:
            return False
        finally:
            self._admin.close()
            self._links.close()

    @defer.inlineCallbacks
    def _gate(self) -> Any:
        """Returns when the sweep may send its next command; Stopped when it was stopped."""
        while True:
            if self.stopped:
                raise Stopped()
            if not self.paused and self._may_go():
                return
            if self._may_go():
                yield self._serve_claims()      # paused: a claimed key's clients still wait for it
            yield deferLater(self._reactor, WAIT_POLL, lambda: None)

    @defer.inlineCallbacks
    def _serve_claims(self, extra: Sequence[bytes] = ()) -> Any:
        """Copy the range's claimed keys; how many there were (one left behind counts too)."""
        try:
            served = yield self.big.serve(extra)
        except Abandoned:
            return max(1, len(extra))
        except ServerError as err:
            yield self._trouble(f"the claims registry on the source {self.source}: {err}")
            return max(1, len(extra))
        return served

    @defer.inlineCallbacks
    def _command(self, *args: bytes) -> Any:
        """The command's reply, asked again (after a growing delay) until the source answers it."""
        while True:
            yield self._gate()
            try:
                reply = yield self._admin.command(self.source, *args)
                return reply
            except ServerError as err:
                yield self._trouble(f"{args[0].decode()} on the source {self.source}: {err}")

    @defer.inlineCallbacks
    def _trouble(self, reason: str) -> Any:
        if self._refused is not None:
            self._refused(reason)
        if self.progress.error != reason:
            self._log.warn("{label}: {reason}; trying again in {delay:g}s", label=self.label, reason=reason,
                           delay=self._delay)
        self.progress.error = reason
        yield deferLater(self._reactor, self._delay, lambda: None)
        self._delay = min(self._delay * 2, BACKOFF_LONGEST)

    def _well(self) -> None:
        self._delay = BACKOFF_FIRST
        self.progress.error = None

    @defer.inlineCallbacks
    def _pass(self) -> Any:
        """One complete SCAN pass, moving what it finds; the number of the range's keys it found."""
        size = yield self._command(b"DBSIZE")
        total = size if isinstance(size, int) else 0
        cursor, scanned, found, moved_before = b"0", 0, 0, self.progress.keys_moved
        yield self._gate()
        found += yield self._serve_claims()      # a killed dashboard's, or proxies'
        scan: Optional[defer.Deferred] = None
        while True:
            reply = yield (scan if scan is not None else self._scan(cursor))
            scan = None
            try:
                cursor, keys = bytes(reply[0]), reply[1]
                if not all(type(key) is bytes for key in keys):     # the decoder's are (no copy: 2.3 M a run)
                    keys = [bytes(key) for key in keys]
            except (TypeError, IndexError, ValueError):
                yield self._trouble(f"SCAN on the source {self.source} answered {str(reply)[:100]}")
                continue
            self._well()
            matched, claims = range_keys(keys, self._wanted, self._belongs)
            scanned += len(keys)
            found += len(matched)
            if scanned and total:
                # The range's share of what was scanned, of what the source held when the pass began.
                estimate = round(found * total / scanned)
                self.progress.keys_left = max(0, estimate - (self.progress.keys_moved - moved_before))
            claimed = yield self._move(matched)
            if cursor != b"0":
                scan = self._scan(cursor)     # the next step's, sent with the claims' look: a round trip less
            try:
                yield self._gate()
                served = yield self._serve_claims(claims + claimed)
            except BaseException:
                if scan is not None:
                    scan.addErrback(lambda _: None)     # stopped: nobody reads it
                raise
            found += max(0, served - len(claimed))       # the claimed ones were counted as matched
            if cursor == b"0":
                break
        if found == 0:
            self.progress.keys_left = 0
        return found

    def _scan(self, cursor: bytes) -> defer.Deferred:
        return self._command(b"SCAN", cursor, b"COUNT", b"%d" % SCAN_COUNT)

    @defer.inlineCallbacks
    def _move(self, keys: List[bytes]) -> Any:
        """Move ``keys`` in batches, ``parallel`` at a time, each until it is answered; the keys it claimed."""
        claimed: List[bytes] = []
        batches = [keys[i:i + self.batch] for i in range(0, len(keys), self.batch)]
        while batches:
            wave, batches = batches[:self.parallel], batches[self.parallel:]
            while wave:
                yield self._gate()
                wait = self.throttle.delay(sum(len(batch) for batch in wave))
                if wait > 0:
                    yield deferLater(self._reactor, wait, lambda: None)
                    yield self._gate()
                results = yield defer.DeferredList(
                    [self._admin.command(self.source, *batch_command(self._batch_head, batch)) for batch in wave],
                    consumeErrors=True)
                again, problem = [], None
                for batch, (ok, value) in zip(wave, results):
                    answer = batch_reply(value) if ok else None
                    if answer is not None:
                        moved, big = answer
                        if moved:
                            self.progress.keys_moved += len(batch) - len(big)
                        claimed += big
                    else:
                        again.append(batch)
                        problem = value.getErrorMessage() if not ok else f"unexpected reply {str(value)[:100]}"
                wave = again
                if problem is not None:
                    yield self._trouble(f"MIGRATE from {self.source} to {self.target}: {problem}")
                else:
                    self._well()
        return claimed
