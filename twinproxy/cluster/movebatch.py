"""The ensure-moved scripts of one move, gathered: one script per reactor turn, not one per request.

Owns :class:`MoveBatcher`.  Every :class:`~twinproxy.cluster.migrating.MigratingSlot`
moving from the same source to the same target (same database, credentials
and limits) hands the keys its requests need moved to one batcher; what
was handed in during one reactor turn leaves as one ``EVAL ENSURE_MOVED``
with every key (at most :data:`MAX_KEYS`), at the start of the next turn —
when Twisted writes the turn's output anyway, so no request waits longer.

Why: ``MIGRATE`` blocks the source while the target loads the keys, and
every client request to the source waits behind it.  Under a pipelined
load most first touches come in bursts; measured before this (bench/migration.py,
1M keys, 2 -> 3 groups, 16 x 16 pipelined clients): 97,000 one-key scripts
for 42,000 keys moved, 52 us of the source's time each.  One script for a
burst pays the round trip to the target once.

The script answers for all of its keys: ``OK``/``NOKEY`` means every one is
on the target; ``[WAIT, i]`` means nothing moved and key *i* is claimed (a
big key): the requests that touch it wait for it as before (and ask again
alone, so that no other request waits with them), the others are asked
again in the next batch; any other answer (an error, IOERR) sends
each request's keys again alone, so an error reaches only the request whose
keys caused it.  A table change flushes what is gathered first
(:meth:`flush`): the barrier counts only what was sent.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

from twinproxy.cluster.movescripts import FAILED, MOVED, WAIT, classify, target_not_writable, wait_reply
from twinproxy.request import Request

MAX_KEYS = 64       # keys per script: bounds the source's blocking (and the script's reply) per batch
MAX_CLAIMED = 1024  # claimed keys remembered per move (then forgotten: at worst a batch stops at one again)


class _Batch:
    """One script's worth of steps (their keys, deduplicated, in arrival order)."""

    __slots__ = ("batcher", "profile", "parts", "client", "steps", "keys", "_seen")

    def __init__(self, batcher: "MoveBatcher", profile: int, parts: Any, client: Any) -> None:
        self.batcher = batcher
        self.profile = profile
        self.parts = parts            # the script's call around its keys, for the target's address now
        self.client = client          # the first request's client: its connection to the source carries it
        self.steps: List[Any] = []
        self.keys: List[bytes] = []
        self._seen: set = set()

    def add(self, step: Any) -> None:
        self.steps.append(step)
        seen = self._seen
        for key in step.keys:
            if key not in seen:
                seen.add(key)
                self.keys.append(key)

    def request_done(self, ask: Request) -> None:
        self.batcher._answered(self, ask.reply or b"")


class MoveBatcher:
    """Gathers the ensure-moved asks of one move (``source`` -> a target) per reactor turn.

    Each ask comes with ``parts``, the script's call around its keys for the
    target's address now (``ensure_moved_parts``: a Sentinel failover may
    change it); ``build(keys, parts)`` makes the script's request bytes;
    ``clock`` has ``callLater``.
    """

    __slots__ = ("source", "key", "_build", "_clock", "_pending", "_call", "_claimed", "scripts")

    def __init__(self, source: Any, build: Any, clock: Any, key: Any = None) -> None:
        self.source = source
        self.key = key            # what the routing finds it by (its move: source, target, settings)
        self._build = build
        self._clock = clock
        self._pending: Dict[Tuple[int, Any], _Batch] = {}     # (profile, parts) -> the batch being gathered
        self._call: Any = None
        # Keys answered WAIT (claimed: a big key being copied) and not since seen moved: a request touching one
        # asks alone, or every batch it joins would stop at the claim and move nothing.
        self._claimed: Dict[bytes, None] = {}
        self.scripts = 0                          # scripts sent (stats and tests)

    def ask(self, step: Any, profile: int, parts: Any) -> None:
        """Have ``step``'s keys moved; its slot's ``_answered(step, reply)`` is told how that went."""
        claimed = self._claimed
        if claimed and any(key in claimed for key in step.keys):
            self.ask_alone(step, profile, parts)
            return
        key = (profile, parts)
        batch = self._pending.get(key)
        if batch is not None and len(batch.keys) + len(step.keys) > MAX_KEYS:
            del self._pending[key]
            self._send(batch)
            batch = None
        if batch is None:
            batch = self._pending[key] = _Batch(self, profile, parts, step.request.client)
        batch.add(step)
        if self._call is None:
            self._call = self._clock.callLater(0, self._turn)

    def flush(self) -> None:
        """Send what is gathered now (a new table is about to be installed)."""
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
        pending, self._pending = self._pending, {}
        for batch in pending.values():
            self._send(batch)

    @property
    def gathering(self) -> int:
        """Steps handed in and not sent yet."""
        return sum(len(batch.steps) for batch in self._pending.values())

    def _turn(self) -> None:
        self._call = None
        self.flush()

    def _send(self, batch: _Batch) -> None:
        ask = Request(self._build(batch.keys, batch.parts))
        ask.owner = batch
        ask.client = batch.client
        ask.profile = batch.profile
        ask.name = "migrate"
        self.scripts += 1
        self.source.send(ask)

    def ask_alone(self, step: Any, profile: int, parts: Any) -> None:
        """``ask``, in a script of its own, now (a request waiting for a claimed key asks again so)."""
        batch = _Batch(self, profile, parts, step.request.client)
        batch.add(step)
        self._send(batch)

    def _answered(self, batch: _Batch, reply: bytes) -> None:
        steps = batch.steps
        kind, index = classify(reply)
        claimed = batch.keys[index - 1] if kind == WAIT and 0 < index <= len(batch.keys) else None
        if claimed is not None:
            if len(self._claimed) >= MAX_CLAIMED:
                self._claimed.clear()
            self._claimed[claimed] = None
        elif kind == MOVED and self._claimed:
            for key in batch.keys:
                self._claimed.pop(key, None)
        if len(steps) == 1:
            step = steps[0]
            # The index is into the batch's keys (each once): the step's own list may name a key twice.
            step.slot._answered(step, wait_reply(step.keys.index(claimed) + 1) if claimed in step.keys else reply)
            return
        if kind == MOVED or (kind == FAILED and target_not_writable(reply) is not None):
            # Moved, or refused by a target that is no writable master: the same for every request.
            for step in steps:
                step.slot._answered(step, reply)
            return
        for step in steps:
            if claimed is not None and claimed in step.keys:
                step.slot._answered(step, wait_reply(step.keys.index(claimed) + 1))
            elif not step.slot.routed_here():
                # Held, moving back or finished since (the barrier counted this batch as answered): nothing
                # more is asked of the source for it.
                if claimed is None:
                    step.slot._answered(step, reply)      # the error, as its own
                else:
                    step.slot.let_go(step)                # nothing of it was moved: where the slot goes now
            elif claimed is None:
                # An error: each request's keys alone, so that it reaches only the one it is about (through its
                # slot, which looks up the target's master again: a failover may be why).
                step.slot._ask(step, alone=True)
            else:
                # Nothing was moved (the script stops at a claim): asked again with the next batch.
                step.slot._ask(step)
