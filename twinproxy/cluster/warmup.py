"""A memcache cluster's migrating slot: served by the new owner, warmed up from the old one.

Owns: :class:`WarmingSlot` — the target of a slot of a memcache cluster
whose owner changed (memcached cannot move items; mcrouter calls this a
warm-up) — ``source`` is the server the slot had in the old group,
``target`` its server in the new one.  Per request, by command:

- **reads** (``get``/``gets``/``gat``/``gats``, their multi-key fragments,
  ``mg``) go to the target.  For each key that misses there: read the
  source (``mg <key> v f t``); if it is there, ``add`` it to the target
  with its flags and remaining TTL (``ms <key> <n> T<ttl> F<flags> ME c``,
  so a newer value written meanwhile wins), check the source still has it
  (``mg <key>``; if not, a write or delete through another proxy raced this
  copy, which is then removed: ``md <key> C<cas of the copy>``), then read
  those keys from the target again and answer (so the client's own
  dialect, flags and the target's CAS come back).
- **blind writes** (``set``, ``delete``, ``md``, ``ms`` in set mode without
  CAS) first delete the key on the source (``md``), and only when that is
  answered go to the target; a delete answers ``DELETED`` (``HD``) when
  either copy was deleted.  A source that does not answer the delete fails
  the request (nothing written): a stale copy left there could come back.
- **writes that read the item** (``add``, ``replace``, ``append``,
  ``prepend``, ``cas``, ``incr``, ``decr``, ``touch``, ``ma``, ``ms`` in
  another mode or with CAS) first warm the key up as a read does (so a
  counter or an append carries on from the source's item), then delete it
  on the source, then run on the target.

Order and the races within one proxy: while a key's multi-step request is
in flight, later requests for that key (of any client of this process)
wait behind it, in order, so a client's pipelined requests for one key
keep their order and no warm-up of this process can race a write of this
process.  Across proxies the source read of one and the delete of another
can interleave: see the README ("Memcached clusters") for exactly what a
client may then observe.  A request that finds the slot routed elsewhere
when a step answers (a hold, the end, a cancel) copies nothing more and
goes where the slot goes now; reads then answer their miss.

Everything is plain method calls on small owner objects (no Deferreds);
nothing here opens a socket.  The clock (wall time) only converts a
remaining TTL longer than memcached's 30-day relative limit.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional

from twisted.logger import Logger

from twinproxy.protocols.memcache_text import _RETRIEVAL, CRLF, END, split_values
from twinproxy.request import Request

READ, BLIND, DEPENDENT, PASS = range(4)
_KINDS = {b"get": READ, b"gets": READ, b"gat": READ, b"gats": READ, b"mg": READ,
          b"set": BLIND, b"delete": BLIND, b"md": BLIND,
          b"add": DEPENDENT, b"replace": DEPENDENT, b"append": DEPENDENT, b"prepend": DEPENDENT,
          b"cas": DEPENDENT, b"incr": DEPENDENT, b"decr": DEPENDENT, b"touch": DEPENDENT, b"ma": DEPENDENT}
_ERRORS = (b"SERVER_ERROR", b"CLIENT_ERROR", b"ERROR")
RELATIVE_LIMIT = 30 * 86400   # memcached reads a larger exptime as a Unix time


def _kind(args: List[bytes]) -> int:
    name = args[0]
    kind = _KINDS.get(name, PASS)
    if name == b"ms":
        flags = args[3:]
        blind = all(not (f[:1] == b"M" and f[1:2] not in (b"S", b"s")) and f[:1] != b"C" for f in flags)
        kind = BLIND if blind else DEPENDENT
    return kind


def _missing(request: Request, reply: bytes) -> List[bytes]:
    """The keys of read ``request`` its target reply ``reply`` did not have (none for an error)."""
    args = request.args
    name = args[0]
    if name == b"mg":
        # Quiet mode leaves a miss (EN) out: nothing before the MN.
        miss = reply[:2] == b"EN" or (not reply and request.terminator is not None)
        return [args[1]] if miss else []
    if reply == END:
        return args[_RETRIEVAL[name]:]
    first = _RETRIEVAL[name]
    if len(args) == first + 1:      # one key, not END: its item, or an error
        return []
    if not reply.endswith(END) or reply.startswith(_ERRORS):
        return []
    found = {key for key, _ in split_values(reply)}
    return [key for key in args[first:] if key not in found]


class _Step:
    """The owner of one of the proxy's own requests: hands its reply to ``then(reply)``."""

    __slots__ = ("then", "chain")

    def __init__(self, then: Callable[[bytes], None], chain: Any) -> None:
        self.then = then
        self.chain = chain

    def request_done(self, step: Request) -> None:
        try:
            self.then(step.reply or b"")
        except Exception:  # noqa: BLE001 - the client's request must still be answered, its keys freed
            WarmingSlot._log.failure("slot warm-up: a step's completion failed")
            self.chain.broken()


class WarmingSlot:
    """One slot of a memcache cluster moving from server ``source`` to server ``target``."""

    __slots__ = ("name", "slot", "source", "target", "_answer", "_route", "_clock", "_chains", "copies",
                 "races", "failures")
    _log = Logger()

    def __init__(self, slot: int, source: Any, target: Any, answer: Callable[..., None],
                 route: Optional[Callable[[int], Any]] = None, clock: Any = None) -> None:
        self.name = f"slot-{slot}"
        self.slot = slot
        self.source = source
        self.target = target
        self._answer = answer
        self._route = route          # where the slot goes now (a later table may route it elsewhere)
        self._clock = clock
        # Keys with a multi-step request in flight -> the requests waiting behind it, in order.
        self._chains: Dict[bytes, Deque[Request]] = {}
        self.copies = 0     # items copied from the source to the target
        self.races = 0      # copies removed again: the source's item went while it was copied
        self.failures = 0   # requests answered with an error because the source failed

    def same_move(self, source: Any, target: Any) -> bool:
        return source is self.source and target is self.target

    @property
    def busy(self) -> int:
        """Keys with a request in several steps in flight."""
        return len(self._chains)

    def current(self) -> bool:
        """Whether the slot still routes here (a later table may send it elsewhere)."""
        return self._route is None or self._route(self.slot) is self

    def now(self) -> Any:
        """Where the slot's requests go now."""
        return self._route(self.slot) if self._route is not None else self

    # -- dispatch ------------------------------------------------------------

    def send(self, request: Request) -> None:
        args = request.args
        kind = _kind(args)
        keys = args[_RETRIEVAL[args[0]]:] if kind == READ and args[0] != b"mg" else args[1:2]
        chains = self._chains
        if chains:
            for key in keys:
                waiting = chains.get(key)
                if waiting is not None:
                    waiting.append(request)
                    return
        if kind == READ:
            request.owner = _Read(self, request)
            self.target.send(request)
        elif kind == PASS:
            self.target.send(request)
        else:
            chains[keys[0]] = deque()
            _Write(self, request, keys[0], kind == DEPENDENT).start()

    def release(self, keys: List[bytes]) -> None:
        """The multi-step requests of ``keys`` are done: what waited behind them goes on, in order."""
        chains = self._chains
        for key in keys:
            waiting = chains.pop(key, None)
            while waiting:
                self.now().send(waiting.popleft())
                if key in chains:
                    # Sent and chained again: the rest wait behind it, still in order.
                    chains[key].extend(waiting)
                    break

    def step(self, server: Any, request: Request, raw: bytes, then: Callable[[bytes], None], chain: Any) -> None:
        """Send ``raw`` to ``server`` on ``request``'s client connection; ``then(reply)``."""
        step = Request(raw)
        step.owner = _Step(then, chain)
        step.client = request.client      # the client's connection: its requests stay in order
        step.profile = request.profile   # its dialect and database
        step.name = "warmup"
        server.send(step)

    # -- the pieces ----------------------------------------------------------------

    def copy(self, chain: Any, key: bytes, then: Callable[[Optional[bytes]], None]) -> None:
        """Copy ``key`` from the source to the target if the source has it and the target has none.

        ``then(header)``: None when the source had nothing, ``b"ERR"`` when
        it failed, else its ``VA`` line.  A copy stored is checked against
        the source afterwards and taken back if the source's item went
        meanwhile (a racing delete through another proxy).
        """
        request = chain.request
        b64 = _b64(request)

        def read(reply: bytes) -> None:
            if reply.startswith(b"EN"):
                then(None)
                return
            if not reply.startswith(b"VA "):
                then(b"ERR")
                return
            eol = reply.find(CRLF)
            header = reply[:eol]
            ttl = _ttl(header, self._clock)
            if ttl is None or not self.current():
                then(header)
                return
            size = header.split(b" ", 2)[1]
            data = reply[eol + 2:eol + 2 + int(size)]
            flags = _token(header, b"f") or b"0"
            raw = b"ms %s %s%s T%s F%s ME c\r\n%s\r\n" % (key, size, b64, ttl, flags, data)
            self.step(self.target, request, raw, lambda stored: copied(header, stored), chain)

        def copied(header: bytes, stored: bytes) -> None:
            if not stored.startswith(b"HD"):
                then(header)         # the target had one already (newer: it stands), or refused
                return
            self.copies += 1
            cas = _token(stored, b"c")
            if cas is None:
                then(header)
                return
            self.step(self.source, request, b"mg %s%s\r\n" % (key, b64),
                      lambda still: checked(header, cas, still), chain)

        def checked(header: bytes, cas: bytes, still: bytes) -> None:
            if still.startswith(b"HD"):
                then(header)
                return
            # The source's item went while it was copied: a delete (or a write,
            # which deletes it first) through another proxy may have reached the
            # target before the copy.  Take the copy back unless something newer
            # replaced it.
            self.races += 1
            self.step(self.target, request, b"md %s%s C%s\r\n" % (key, b64, cas), lambda _: then(header), chain)

        self.step(self.source, request, b"mg %s%s v f t\r\n" % (key, b64), read, chain)

    def delete_source(self, chain: Any, key: bytes, then: Callable[[Optional[bool]], None]) -> None:
        """``md`` the key on the source: ``then(True)`` deleted, ``then(False)`` not there, ``then(None)`` failed."""
        def deleted(reply: bytes) -> None:
            then(True if reply.startswith(b"HD") else False if reply.startswith(b"NF") else None)

        self.step(self.source, chain.request, b"md %s%s\r\n" % (key, _b64(chain.request)), deleted, chain)


class _Chain:
    """A client request in several steps: the keys it holds, and its one answer."""

    __slots__ = ("slot", "request", "owner", "keys", "answered")

    def __init__(self, slot: WarmingSlot, request: Request) -> None:
        self.slot = slot
        self.request = request
        self.owner = request.owner
        self.keys: List[bytes] = []
        self.answered = False

    def finish(self, reply: Optional[bytes] = None) -> None:
        """Answer the client (with ``reply``, or the reply the request holds) and free the keys."""
        request = self.request
        if reply is not None:
            request.reply = reply
        request.owner = self.owner
        self.answered = True
        try:
            self.owner.request_done(request)
        finally:
            self.slot.release(self.keys)

    def fail(self, text: str) -> None:
        request = self.request
        request.owner = self.owner
        self.answered = True
        self.slot.failures += 1
        try:
            self.slot._answer(request, text, "TRYAGAIN")
        finally:
            self.slot.release(self.keys)

    def broken(self) -> None:
        """A completion raised: answer with an error if not answered yet, free the keys."""
        if not hasattr(self, "keys"):       # a read that never missed holds nothing
            self.keys = []
        if not getattr(self, "answered", False):
            self.fail(f"slot {self.slot.slot}: proxy error while warming the key up")
        else:
            self.slot.release(self.keys)

    def completion_failed(self, request: Request) -> None:
        self.broken()


class _Read(_Chain):
    """A read: the target's answer, and for its misses a warm-up and a second read of the target."""

    __slots__ = ("original", "pending", "found", "again")

    def __init__(self, slot: WarmingSlot, request: Request) -> None:
        # Most reads hit: the rest is set only for a miss (see request_done).
        self.slot = slot
        self.request = request
        self.owner = request.owner
        self.again = False

    def request_done(self, request: Request) -> None:
        if self.again:
            # The ``mg`` sent again: its reply (or, failed, the first one's miss).
            reply = request.reply
            self.finish(self.original if reply is None or reply.startswith(_ERRORS) else None)
            return
        slot = self.slot
        missing = _missing(request, request.reply or b"")
        chains = slot._chains
        # A key another request of this process is changing or warming stays a miss.
        mine = [key for key in dict.fromkeys(missing) if key not in chains] if missing and slot.current() else ()
        if not mine:
            owner = request.owner = self.owner
            owner.request_done(request)
            return
        self.answered = False
        self.found = []
        self.original = request.reply
        self.keys = mine
        self.pending = len(mine)
        for key in mine:
            chains[key] = deque()
        for key in mine:
            slot.copy(self, key, lambda header, key=key: self.warmed(key, header))

    def warmed(self, key: bytes, header: Optional[bytes]) -> None:
        if header is not None and header != b"ERR":
            self.found.append(key)
        self.pending -= 1
        if self.pending:
            return
        slot = self.slot
        if not self.found or not slot.current():
            self.finish(self.original)
            return
        request = self.request
        args = request.args
        if args[0] == b"mg":
            request.reply = None
            if request.terminator is not None:
                request.gathered = []
            self.again = True
            slot.target.send(request)
            return
        head = args[:_RETRIEVAL[args[0]]]
        slot.step(slot.target, request, b" ".join(head + self.found) + CRLF, self.merge, self)

    def merge(self, reply: bytes) -> None:
        """The target's items of the warmed keys, in the request's key order with the first reply's."""
        if not reply.endswith(END) or reply.startswith(_ERRORS):
            self.finish(self.original)
            return
        items = dict(split_values(self.original))
        items.update(split_values(reply))
        args = self.request.args
        self.finish(b"".join(items[key] for key in args[_RETRIEVAL[args[0]]:] if key in items) + END)


class _Write(_Chain):
    """A write: the item warmed up first when the write reads it, the source's copy deleted, then the target."""

    __slots__ = ("reads", "deleted")

    def __init__(self, slot: WarmingSlot, request: Request, key: bytes, reads: bool) -> None:
        _Chain.__init__(self, slot, request)
        self.keys = [key]
        self.reads = reads
        self.deleted = False

    def start(self) -> None:
        if self.reads:
            self.slot.copy(self, self.keys[0], self.warmed)
        else:
            self.slot.delete_source(self, self.keys[0], self.source_deleted)

    def warmed(self, header: Optional[bytes]) -> None:
        if not self.slot.current() or header is None:
            self.to_target()             # elsewhere now, or nothing on the source to delete
        elif header == b"ERR":
            self.abort("reading the item")
        else:
            self.slot.delete_source(self, self.keys[0], self.source_deleted)

    def source_deleted(self, deleted: Optional[bool]) -> None:
        if deleted is None:
            self.abort("deleting the old copy")
            return
        self.deleted = deleted
        self.to_target()

    def to_target(self) -> None:
        slot = self.slot
        request = self.request
        if not slot.current():
            # Routed elsewhere meanwhile (a hold, the end, a cancel): it goes there.
            self.answered = True
            try:
                slot.now().send(request)
            finally:
                slot.release(self.keys)
            return
        request.owner = self
        slot.target.send(request)

    def request_done(self, request: Request) -> None:
        reply = request.reply or b""
        if self.deleted:
            name = request.args[0]
            if name == b"delete" and reply.startswith(b"NOT_FOUND"):
                request.reply = b"DELETED\r\n"
            elif name == b"md" and reply.startswith(b"NF"):
                # The target had none and the source's copy is gone: deleted (quiet: no word).
                request.reply = b"" if request.terminator is not None else b"HD" + reply[2:]
        self.finish()

    def abort(self, what: str) -> None:
        self.fail(f"slot {self.slot.slot} is warming up on its new server and {what} on the old one failed; "
                  "nothing was written, try again")


def _b64(request: Request) -> bytes:
    """`` b`` when the client's meta command names its key in base64 (our steps then do too)."""
    args = request.args
    if args[0][:1] == b"m" and b"b" in args[2:]:
        return b" b"
    return b""


def _token(line: bytes, flag: bytes) -> Optional[bytes]:
    """The value of meta flag ``flag`` in a reply line (``f5`` -> ``5``), or None."""
    for token in line.split(b" ")[1:]:
        if token[:1] == flag:
            return token[1:].rstrip(b"\r\n")
    return None


def _ttl(header: bytes, clock: Any) -> Optional[bytes]:
    """The ``T`` to copy an item with from the source's ``t`` (-1: none, so 0); None: do not copy it."""
    text = _token(header, b"t")
    if text is None:
        return None
    try:
        left = int(text)
    except ValueError:
        return None
    if left < 0:
        return b"0"
    if left == 0:
        return None            # it expires within the second: not worth a copy
    if left > RELATIVE_LIMIT:
        if clock is None:
            return None
        return b"%d" % (int(clock.seconds()) + left)   # memcached reads this as a Unix time
    return b"%d" % left


__all__ = ["WarmingSlot"]
