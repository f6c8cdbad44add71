"""A migrating slot's requests: move the keys they touch, then serve them from the new owner.

Owns: :class:`MigratingSlot` — the target of a slot whose keys are moving
from a source group to a target group on stock Redis (Codis's "sync" mode
without its forked server).  For each request it first sends the source
master ``MIGRATE <target> "" <db> <timeout> REPLACE [AUTH ...] KEYS <every
key the request touches>`` — atomic on the single-threaded source, TTLs
kept, ``+NOKEY`` when none is there any more — and only when that answers
sends the request itself to the target.  After the barrier no proxy
writes a migrating slot's keys to the source, so a key moved once never
comes back: keys known moved skip the MIGRATE (a bounded set per slot).

Order: the MIGRATE goes on the client's own connection to the source and
the request, from the MIGRATE's completion, on its own connection to the
target, so a client's requests for one key stay in order.  :func:`keys_of`
says which keys a request touches (its key, its fragment's keys, or every
key position of a one-slot multi-key command).
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Set, Tuple

from twinproxy.request import Request

# Keys remembered as moved per slot before the set starts over (then a key
# may be sent a MIGRATE again, which answers NOKEY: correct, one round trip).
MOVED_MEMORY = 65536
MIGRATE_TIMEOUT_MS = 5000


def keys_of(request: Request) -> List[bytes]:
    """Every key ``request`` touches (a fragment's from its parent's arguments)."""
    positions = request.positions
    if positions:
        args = request.parent.args if request.parent is not None else request.args
        return [args[position] for position in positions]
    return [request.key] if request.key is not None else []


class _ThenForward:
    """The MIGRATE's owner: on its reply, send the client's request to the target (or answer it)."""

    __slots__ = ("slot", "request", "keys")

    def __init__(self, slot: "MigratingSlot", request: Request, keys: List[bytes]) -> None:
        self.slot = slot
        self.request = request
        self.keys = keys

    def request_done(self, step: Request) -> None:
        self.slot.moved(self.request, self.keys, step.reply or b"")


class MigratingSlot:
    """One slot moving from ``source`` to ``target`` (both Servers of the pool)."""

    __slots__ = ("name", "slot", "source", "target", "_prefix", "_moved", "_answer", "_route", "moves",
                 "failures")

    def __init__(self, slot: int, source: Any, target: Any, db: int, auth: Optional[str],
                 answer: Callable[..., None], route: Optional[Callable[[int], Any]] = None,
                 timeout_ms: int = MIGRATE_TIMEOUT_MS) -> None:
        self.name = f"slot-{slot}"
        self.slot = slot
        self.source = source
        self.target = target
        self._answer = answer
        # Where the slot goes *now*: a MIGRATE answered after the next table (a
        # hold, a cancel's way back, the finish) sends its request there.
        self._route = route
        self._moved: Set[bytes] = set()
        self.moves = 0       # MIGRATEs sent
        self.failures = 0    # MIGRATEs that failed (the request got an error)
        if target.spec.host is None:
            raise ValueError(f"slot {slot}: a migration needs the target's TCP address (MIGRATE), not "
                             f"{target.spec.address}")
        self._prefix = migrate_prefix(target.spec.host, target.spec.port, db, timeout_ms, auth)

    def same_move(self, source: Any, target: Any) -> bool:
        return source is self.source and target is self.target

    def send(self, request: Request) -> None:
        keys = keys_of(request)
        moved = self._moved
        if not keys or all(key in moved for key in keys):
            self.target.send(request)
            return
        count, head = self._prefix
        step = Request(b"*%d\r\n" % (count + len(keys)) + head + _bulks(keys))
        step.owner = _ThenForward(self, request, keys)
        step.client = request.client      # the client's connection: its requests stay in order
        step.dialect = request.dialect
        step.name = "migrate"
        self.moves += 1
        self.source.send(step)

    def moved(self, request: Request, keys: List[bytes], reply: bytes) -> None:
        if reply.startswith((b"+OK", b"+NOKEY")):
            moved = self._moved
            if len(moved) >= MOVED_MEMORY:
                moved.clear()
            moved.update(keys)
            now = self._route(self.slot) if self._route is not None else self
            (self.target if now is self else now).send(request)
            return
        self.failures += 1
        shown = reply.strip().decode("utf-8", "replace")[:200] or "no reply"
        self._answer(request, f"slot {self.slot} is migrating and moving its keys to the new owner failed "
                              f"({shown}); nothing was done, try again", "TRYAGAIN")


def migrate_prefix(host: str, port: int, db: int, timeout_ms: int, auth: Optional[str]) -> Tuple[int, bytes]:
    """``MIGRATE host port "" db timeout REPLACE [AUTH ...] KEYS``: (its argument count, its bulk strings)."""
    args = [b"MIGRATE", host.encode(), b"%d" % port, b"", b"%d" % db, b"%d" % timeout_ms, b"REPLACE"]
    if auth:
        user, _, password = auth.partition(" ")
        args += [b"AUTH2", user.encode(), password.encode()] if password else [b"AUTH", auth.encode()]
    args.append(b"KEYS")
    return len(args), _bulks(args)


def _bulks(values: List[bytes]) -> bytes:
    return b"".join(b"$%d\r\n%s\r\n" % (len(value), value) for value in values)
