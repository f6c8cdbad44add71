"""A migrating slot's requests: move the keys they touch, then serve them from the new owner.

Owns: :class:`MigratingSlot` — the target of a slot whose keys are moving
from a source group to a target group on stock Redis (Codis's "sync" mode
without its forked server) — and :class:`Draining`.  The script it sends
and the claim protocol's names (codis.md §6.5) are
:mod:`twinproxy.cluster.movescripts`'s.

For each request the source master is first sent ``EVAL ENSURE_MOVED``
with every key the request touches, their claim keys and the claims
registry as KEYS.  The script answers ``[WAIT, i]`` when the ``i``-th key
is claimed (a big key the dashboard is copying in chunks), claims any key
over :data:`BIG_KEY_BYTES` itself (``RENAMENX`` to its claim, registered
in :data:`CLAIMS` for the dashboard to copy) and answers ``WAIT`` for it,
and otherwise runs ``MIGRATE <target> "" <db> <timeout> REPLACE [AUTH ...]
KEYS <keys>`` — atomic on the single-threaded source, TTLs kept,
``+NOKEY`` when none is there any more — and answers what MIGRATE did.
Only after ``+OK``/``+NOKEY`` is the request sent to the target.  After
the barrier no proxy writes a migrating slot's keys to the source, so a
key moved once never comes back: keys known moved skip the script (a
bounded set per slot).

A request answered ``WAIT`` is asked again after 0 ms (5 times), then
``loop`` ms (loops 5-19), then every 20 ms (Codis's schedule), and fails
with ``-TRYAGAIN`` naming the key once it has waited ``wait_limit``
seconds (the pool's ``slot_hold``).

The MIGRATE goes to the target group's *confirmed* master: in a cluster
with sentinels that is the target shard's (``target.link.shard``: the
address a majority of sentinels names and ``ROLE`` confirmed), not the
topology's first guess — a MIGRATE into a demoted master loses the keys
when Sentinel makes it a replica.  While the shard has no confirmed master
(a failover, a fence) the request waits on the same schedule, and so does
one whose MIGRATE the target refused as no writable master (nothing moved:
``READONLY``, ``MASTERDOWN``, ``LOADING`` also make the shard look for its
master again; ``NOREPLICAS`` — a demoted master under
``min-replicas-to-write``, or a lagging replica — is only asked again);
past ``wait_limit``: ``-TRYAGAIN``.

Order: a client's requests for one slot go through a *line* (per client,
per slot) while any of them is on its way: the scripts go on the client's
own connection to the source, so they are answered in order, and a request
is sent to the target only when every earlier request of the line was.  A
waiting request therefore holds back the *same client's* later requests
for *this slot* — even for keys known moved — and nothing else: other
clients, and the client's other slots, go on.  (The client's replies come
in request order anyway.)  :func:`keys_of` says which keys a request
touches (its key, its fragment's keys, or every key position of a one-slot
multi-key command).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple

from twinproxy.cluster.movescripts import (
    BIG_KEY_BYTES,
    MOVED,
    RESERVED_PREFIX,
    WAIT,
    classify,
    ensure_moved_parts,
    ensure_moved_request,
    show_key,
    target_not_writable,
)
from twinproxy.credentials import Credentials
from twinproxy.request import Request, shared_profile

# Keys remembered as moved per slot before the set starts over (then a key
# may be sent the script again, which answers NOKEY: correct, one round trip).
MOVED_MEMORY = 65536
MIGRATE_TIMEOUT_MS = 5000
WAIT_LIMIT = 5.0      # seconds a request waits for a claimed key (the pool's slot_hold, when given)

# A step's state in its line.
_IN_FLIGHT, _READY, _WAITING, _FAILED = 0, 1, 2, 3


def retry_delay(loop: int) -> float:
    """Seconds before asking again after the ``loop``-th WAIT (0-based): Codis's 0 / loop ms / 20 ms."""
    if loop < 5:
        return 0.0
    if loop < 20:
        return loop / 1000.0
    return 0.02


def keys_of(request: Request) -> List[bytes]:
    """Every key ``request`` touches (a fragment's from its parent's arguments)."""
    positions = request.positions
    if positions:
        args = request.parent.args if request.parent is not None else request.args
        return [args[position] for position in positions]
    return [request.key] if request.key is not None else []


class _Step:
    """One request of a line: its script's owner, then the line's record of where it stands."""

    __slots__ = ("slot", "request", "keys", "line", "state", "loops", "deadline", "timer", "waited_for", "reply",
                 "for_target")

    def __init__(self, slot: "MigratingSlot", request: Request, keys: List[bytes], line: Deque["_Step"],
                 state: int) -> None:
        self.slot = slot
        self.request = request
        self.keys = keys
        self.line = line
        self.state = state
        self.loops = 0
        self.deadline = 0.0
        self.timer: Any = None
        self.waited_for = b""      # the claimed key
        self.reply = b""
        self.for_target = ""       # why it waits for the target's master (else: for a claimed key)

    def request_done(self, step: Request) -> None:
        self.slot._answered(self, step.reply or b"")


class MigratingSlot:
    """One slot moving from ``source`` to ``target`` (both Servers of the pool).

    ``clock`` (``seconds``, ``callLater``) times the retries of requests
    waiting for a claimed key, for at most ``wait_limit`` seconds each.
    """

    __slots__ = ("name", "slot", "source", "target", "_head", "_tail", "_moved", "_answer", "_route", "_lines",
                 "_clock", "_wait_limit", "moves", "failures", "waits", "_made_for", "_batcher", "_parts",
                 "_script_for", "on_empty")

    def __init__(self, slot: int, source: Any, target: Any, db: int, auth: Optional[Credentials],
                 answer: Callable[..., None], route: Optional[Callable[[int], Any]] = None,
                 timeout_ms: int = MIGRATE_TIMEOUT_MS, *, clock: Any = None,
                 wait_limit: Optional[float] = None, big_key_bytes: int = BIG_KEY_BYTES,
                 batcher: Any = None) -> None:
        self.name = f"slot-{slot}"
        self.slot = slot
        self.source = source
        self.target = target
        self._answer = answer
        # Where the slot goes *now*: a script answered after the next table (a
        # hold, a cancel's way back, the finish) sends its request there.
        self._route = route
        self._moved: Set[bytes] = set()
        # client -> its requests of this slot still on the way, in arrival order.
        self._lines: Dict[Any, Deque[_Step]] = {}
        self._clock = clock
        self._wait_limit = WAIT_LIMIT if wait_limit is None else wait_limit
        self.moves = 0       # scripts sent
        self.failures = 0    # scripts that failed (the request got an error)
        self.waits = 0       # WAIT answers (a claimed key)
        # The move's MoveBatcher (twinproxy.cluster.movebatch): the scripts of a reactor turn go as one.
        # None: one script per request, at once (what the unit tests of this module look at).
        self._batcher = batcher
        # Told when the last line empties (a Draining in front of the slot's owner can go: targets.py).
        self.on_empty: Optional[Callable[[], None]] = None
        if target.spec.host is None:
            raise ValueError(f"slot {slot}: a migration needs the target's TCP address (MIGRATE), not "
                             f"{target.spec.address}")
        self._head, self._tail = ensure_moved_parts(target.spec.host, target.spec.port, db, timeout_ms, auth,
                                                    big_key_bytes)
        # The script's parts for another address of the target (its Sentinel shard's master now).
        self._parts: Dict[Tuple[str, int], Tuple[Any, Any]] = {(target.spec.host, target.spec.port):
                                                               (self._head, self._tail)}
        self._script_for = (db, timeout_ms, auth, big_key_bytes)
        # What the script and the waits were made for: a table that changes any of them makes a new slot.
        self._made_for = (target.spec.host, target.spec.port, db, auth, self._wait_limit)

    def same_move(self, source: Any, target: Any, db: int = 0, auth: Optional[Credentials] = None,
                  wait_limit: Optional[float] = None) -> bool:
        """Whether this slot object serves the move of the next table too (same servers, address and settings)."""
        return (source is self.source and target is self.target
                and self._made_for == (target.spec.host, target.spec.port, db, auth,
                                       WAIT_LIMIT if wait_limit is None else wait_limit))

    def send(self, request: Request) -> None:
        keys = keys_of(request)
        for key in keys:
            if key.startswith(RESERVED_PREFIX):
                # The migration's own claims and temporary copies: a client must not touch them.
                self._answer(request, f"keys starting with '{RESERVED_PREFIX.decode()}' are reserved for "
                                      "twinproxy's slot migration")
                return
        lines = self._lines
        if lines:
            line = lines.get(request.client)
            if line is not None:
                self._join(line, request, keys)
                return
        moved = self._moved
        if not keys or all(key in moved for key in keys):
            self.target.send(request)
            return
        line = lines[request.client] = deque()
        self._join(line, request, keys)

    @property
    def batcher(self) -> Any:
        """The move's MoveBatcher, or None."""
        return self._batcher

    @property
    def has_lines(self) -> bool:
        """Some client's requests still wait here for a script's answer (or behind one that does)."""
        return bool(self._lines)

    def queue_behind(self, request: Request) -> bool:
        """Queue ``request`` behind its client's line here, if it has one (see :class:`Draining`)."""
        line = self._lines.get(request.client)
        if line is None:
            return False
        line.append(_Step(self, request, keys_of(request), line, _READY))
        return True

    @property
    def waiting(self) -> int:
        """Requests waiting (for a claimed key, or for the target's master)."""
        return sum(1 for line in self._lines.values() for step in line if step.state == _WAITING)

    # -- internals ----------------------------------------------------------------

    def _join(self, line: Deque[_Step], request: Request, keys: List[bytes]) -> None:
        moved = self._moved
        if not keys or all(key in moved for key in keys):
            line.append(_Step(self, request, keys, line, _READY))     # behind the line, no script needed
            return
        step = _Step(self, request, keys, line, _IN_FLIGHT)
        line.append(step)
        self._ask(step)

    def _destination(self) -> Tuple[Optional[Tuple[str, int]], str]:
        """Where the MIGRATE goes: (host, port), or (None, why not now): the target's Sentinel shard has no
        confirmed master."""
        link = getattr(self.target, "link", None)
        shard = getattr(link, "shard", None)
        if shard is None:
            return (self.target.spec.host, self.target.spec.port), ""
        if shard.confirmed and shard.address is not None:
            return shard.address, ""
        return None, f"has no confirmed master (shard '{shard.name}': failover in progress?)"

    def _ask(self, step: _Step, alone: bool = False) -> None:
        request = step.request
        where, why = self._destination()
        if where is None:
            self._wait_for_target(step, why)
            self._drain(step.line, request.client)
            return
        parts = self._parts.get(where)
        if parts is None:
            if len(self._parts) >= 8:
                self._parts.clear()
            parts = self._parts[where] = ensure_moved_parts(where[0], where[1], *self._script_for)
        if self._batcher is not None:
            self.moves += 1
            if alone:
                # A request waiting for a claimed key asks on its own: in a batch, the claim would make every
                # other request of the batch wait for it too.
                self._batcher.ask_alone(step, shared_profile(request.profile), parts)
            else:
                self._batcher.ask(step, shared_profile(request.profile), parts)
            return
        ask = Request(ensure_moved_request(step.keys, parts))
        ask.owner = step
        ask.client = request.client      # the client's connection: its scripts are answered in order
        ask.profile = shared_profile(request.profile)   # its dialect and database; a blocking command's
                                                        # script goes on a shared connection
        ask.name = "migrate"
        self.moves += 1
        self.source.send(ask)

    def _answered(self, step: _Step, reply: bytes) -> None:
        kind, index = classify(reply)
        if kind == MOVED:
            moved = self._moved
            if len(moved) >= MOVED_MEMORY:
                moved.clear()
            moved.update(step.keys)
            step.state = _READY
        elif kind == WAIT:
            self.waits += 1
            keys = step.keys
            step.waited_for = keys[index - 1] if 0 < index <= len(keys) else (keys[0] if keys else b"")
            step.for_target = ""
            if step.loops == 0:
                step.deadline = self._seconds(step) + self._wait_limit
            step.state = _WAITING
        else:
            word = target_not_writable(reply)
            if word is not None:
                shard = getattr(getattr(self.target, "link", None), "shard", None)
                if shard is not None and word != "NOREPLICAS":
                    shard.suspect(f"answered {word} to the MIGRATE of slot {self.slot}")
                self._wait_for_target(step, f"refused the keys ({word}: no writable master)")
            else:
                self.failures += 1
                step.state = _FAILED
                step.reply = reply
        self._drain(step.line, step.request.client)

    def _wait_for_target(self, step: _Step, why: str) -> None:
        step.for_target = why
        if step.loops == 0:
            step.deadline = self._seconds(step) + self._wait_limit
        step.state = _WAITING

    def _drain(self, line: Deque[_Step], client: Any) -> None:
        """Send what the line's head allows, in order; schedule the head's next look when it waits."""
        while line:
            step = line[0]
            state = step.state
            if state == _IN_FLIGHT:
                break
            if state == _WAITING and all(key in self._moved for key in step.keys):
                state = step.state = _READY      # moved meanwhile (the request before it waited for the same key)
                if step.timer is not None and step.timer.active():
                    step.timer.cancel()
                step.timer = None
            if state == _WAITING:
                now = self._seconds(step)
                if now < step.deadline and self._clock_of(step) is not None:
                    if step.timer is None:
                        step.timer = self._clock_of(step).callLater(retry_delay(step.loops), self._retry, step)
                    break
                line.popleft()
                self.failures += 1
                if step.for_target:
                    self._answer(step.request, f"slot {self.slot} is migrating and its target {step.for_target} "
                                               f"for longer than {self._wait_limit * 1000:.0f} ms; nothing was "
                                               "done, try again", "TRYAGAIN")
                    continue
                self._answer(step.request, f"key {show_key(step.waited_for)} of slot {self.slot} is being moved "
                                           f"to the new owner (a big key, copied in chunks) for longer than "
                                           f"{self._wait_limit * 1000:.0f} ms; try again", "TRYAGAIN")
                continue
            line.popleft()
            if state == _READY:
                self._where().send(step.request)
            else:
                shown = step.reply.strip().decode("utf-8", "replace")[:200] or "no reply"
                self._answer(step.request, f"slot {self.slot} is migrating and moving its keys to the new owner "
                                           f"failed ({shown}); nothing was done, try again", "TRYAGAIN")
        if not line and self._lines.get(client) is line:
            self._line_done(client)

    def _line_done(self, client: Any) -> None:
        del self._lines[client]
        if not self._lines and self.on_empty is not None:
            self.on_empty()

    def routed_here(self) -> bool:
        """Whether the slot's requests still come here (not held, moving back or finished meanwhile)."""
        return self._route is None or self._route(self.slot) is self

    def let_go(self, step: _Step) -> None:
        """``step`` asks nothing more here (its slot changed meanwhile): it goes where the slot goes now,
        in its line's order."""
        step.state = _READY
        self._drain(step.line, step.request.client)

    def _retry(self, step: _Step) -> None:
        step.timer = None
        step.loops += 1
        client = step.request.client
        if getattr(client, "closed", False):
            # Nobody to answer: stop asking the source (a client that gave up must not multiply the scripts).
            line = step.line
            line.clear()
            if self._lines.get(client) is line:
                self._line_done(client)
            return
        if self._route is not None and self._route(self.slot) is not self:
            # The slot changed meanwhile (held, moving back, finished): it goes where the slot goes now.
            step.state = _READY
            self._drain(step.line, step.request.client)
            return
        if self._seconds(step) >= step.deadline:
            self._drain(step.line, step.request.client)      # still waiting: it fails now
            return
        step.state = _IN_FLIGHT
        # Alone when it waited for a claimed key (in a batch the claim would stop every other key); a wait
        # for the target's master is everybody's: those ask together again.
        self._ask(step, alone=not step.for_target)

    def _where(self) -> Any:
        now = self._route(self.slot) if self._route is not None else self
        if now is self:
            return self.target
        if type(now) is Draining:
            if now.after is self:
                return self.target    # this slot stands behind another's lines: its own go on
            if now.slot_moving is self:
                return now.after      # this slot's own lines, let out after it was dropped
        return now

    def _clock_of(self, step: _Step) -> Any:
        # Until the routing table passes its clock in (targets.py), the client's factory has the reactor.
        if self._clock is None:
            factory = getattr(step.request.client, "factory", None)
            self._clock = getattr(factory, "clock", None)
        return self._clock

    def _seconds(self, step: _Step) -> float:
        clock = self._clock_of(step)
        return clock.seconds() if clock is not None else 0.0


class Draining:
    """A slot whose :class:`MigratingSlot` was dropped by a new table while a client's requests still wait
    in its line (a script on its way): that client's next requests for the slot queue behind them, so a read
    never overtakes its own write; everyone else's go straight to ``after`` (the slot's owner now)."""

    __slots__ = ("name", "slot", "slot_moving", "after")

    def __init__(self, slot_moving: MigratingSlot, after: Any) -> None:
        self.name = getattr(after, "name", slot_moving.name)
        self.slot = slot_moving.slot
        self.slot_moving = slot_moving
        self.after = after

    def send(self, request: Request) -> None:
        if not self.slot_moving.queue_behind(request):
            self.after.send(request)
