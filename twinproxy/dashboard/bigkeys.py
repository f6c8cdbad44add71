"""Big keys of a migrating slot range: claimed on the source, copied in chunks, never MIGRATEd whole.

Owns the dashboard's half of the claim protocol (codis.md §6.5; the
proxy's half, the names and its ensure-moved script are in
``twinproxy.cluster.migrating``): :data:`SWEEP_BATCH`, the script the sweep
sends for each batch of keys instead of a bare MIGRATE (keys whose ``MEMORY
USAGE`` — 5 samples: ~11 µs on a 214 MB hash, against 51 ms for ``SAMPLES
0`` — is above the threshold are claimed, the others MIGRATEd); the chunk
plans (:func:`plan_for`: which command reads the next chunk of a claim on
the source and which commands write it to ``tmp(K)`` on the target; pure);
and :class:`BigKeyMover`, which copies one claimed key:

1. ``TYPE``, ``PEXPIRETIME``, ``MEMORY USAGE`` and the length of claim(K)
   on the source; ``UNLINK tmp(K)`` on the target (a leftover);
2. chunks: ``HSCAN``/``SSCAN``/``ZRANGE`` by rank ``WITHSCORES``/``LRANGE``/
   ``GETRANGE``/``XRANGE`` on the source, ``HSET``/``SADD``/``ZADD``/
   ``RPUSH``/``APPEND``/``XADD`` on the target, each between two ``PEXPIRE
   tmp(K)`` (:data:`TMP_TTL_MS`: a partial copy evaporates when the mover
   dies; the first one answering 0 says it did, and the copy starts over);
   the next read goes out while the last chunk is written; a chunk is sized
   for :data:`CHUNK_BYTES` (at most :data:`MAX_COUNT` elements), so every
   command takes about a millisecond;
3. the lengths of the claim and of the copy must agree, then on the target,
   in one script (atomic, as §6.5's MULTI): ``RENAME tmp(K) K`` and
   ``PEXPIREAT K abs`` or ``PERSIST K``;
4. ``UNLINK`` claim(K) and its entry in the claims registry on the source.

A failed command starts the key over (``RPUSH``/``APPEND`` are not
idempotent) after the sweep's backoff.  A claim that is gone (it expired)
only has its copy and registry entry removed.  Stopped (a cancel, the
dashboard stopping) before the copy is in place, the claim is renamed back
to K on the source; after, the claim is released.  When the sweep may not
go on (the lock lost, the migration changed), the claim is left for the
next dashboard: redoing the copy is idempotent, since nobody writes K on
the target while its claim exists.  A paused sweep still finishes the key
it copies (clients wait for it).  Streams with consumer groups and module
types cannot be copied faithfully: the claim is renamed back and MIGRATEd
whole (blocking both servers; a warning names the key and its size).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

from twisted.internet import defer
from twisted.logger import Logger

from twinproxy.cluster.movescripts import CLAIM_PREFIX, CLAIMS, RESERVED_PREFIX, claim_of, show_key
from twinproxy.credentials import Credentials, migrate_options
from twinproxy.dashboard.progress import Progress
from twinproxy.dashboard.servers import ServerError, ServerRefused

DEFAULT_BIG_KEY_BYTES = 4 * 1024 * 1024
TMP_PREFIX = b"__twinproxy:tmp:"
TMP_TTL_MS = 30000
CHUNK_BYTES = 256 * 1024
MAX_COUNT = 1000
FIRST_COUNT = 100
STRING_CHUNK = 1024 * 1024

# KEYS are the batch's keys only: the claim names are made here (standalone Redis allows it), which keeps
# the sweep's arguments at half the size (measured: ~100k keys/s against ~90k declaring them).
SWEEP_BATCH = b"""\
local n = #KEYS
local limit = tonumber(ARGV[1])
local rest, claimed = {}, {}
for i = 1, n do
  local size = limit > 0 and redis.call('MEMORY', 'USAGE', KEYS[i])
  if size and size > limit then
    if redis.call('RENAMENX', KEYS[i], '%s' .. KEYS[i]) == 1 then
      redis.call('SADD', '%s', KEYS[i])
      claimed[#claimed + 1] = KEYS[i]
    end
  else
    rest[#rest + 1] = KEYS[i]
  end
end
local moved = 'NOKEY'
if #rest > 0 then
  local args = {'MIGRATE', ARGV[2], ARGV[3], '', ARGV[4], ARGV[5], 'REPLACE'}
  for i = 6, #ARGV do args[#args + 1] = ARGV[i] end
  args[#args + 1] = 'KEYS'
  for i = 1, #rest do args[#args + 1] = rest[i] end
  local reply = redis.pcall(unpack(args))
  if type(reply) == 'table' and reply.err then return reply end
  moved = reply.ok or reply
end
return {moved, claimed}
""" % (CLAIM_PREFIX, CLAIMS)

FINALIZE = b"""\
redis.call('UNLINK', KEYS[2])
redis.call('RENAME', KEYS[1], KEYS[2])
local at = tonumber(ARGV[1])
if at > 0 then redis.call('PEXPIREAT', KEYS[2], at) else redis.call('PERSIST', KEYS[2]) end
return 1
"""

RELEASE = b"""\
redis.call('UNLINK', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return 1
"""

ROLLBACK = b"""\
local back = 0
if redis.call('EXISTS', KEYS[1]) == 1 then back = redis.call('RENAMENX', KEYS[1], KEYS[2]) end
if back == 1 or redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SREM', KEYS[3], KEYS[2]) end
return back
"""

# The claim back to K, then MIGRATE it whole (the types a chunked copy cannot reproduce).
WHOLE = b"""\
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SREM', KEYS[3], KEYS[2])
  return 'NOKEY'
end
redis.call('RENAMENX', KEYS[1], KEYS[2])
redis.call('SREM', KEYS[3], KEYS[2])
local args = {'MIGRATE', ARGV[1], ARGV[2], '', ARGV[3], ARGV[4], 'REPLACE'}
for i = 5, #ARGV do args[#args + 1] = ARGV[i] end
args[#args + 1] = 'KEYS'
args[#args + 1] = KEYS[2]
local reply = redis.pcall(unpack(args))
if type(reply) == 'table' and reply.err then return reply end
return reply.ok or reply
"""

LENGTH = {"hash": b"HLEN", "set": b"SCARD", "zset": b"ZCARD", "list": b"LLEN", "string": b"STRLEN",
          "stream": b"XLEN"}


def tmp_of(key: bytes) -> bytes:
    """The name of K's copy on the target until it is complete."""
    return TMP_PREFIX + key


def claimed_key(name: bytes) -> Optional[bytes]:
    """K for a claim key's name, else None."""
    return name[len(CLAIM_PREFIX):] if name.startswith(CLAIM_PREFIX) else None


def is_reserved(name: bytes) -> bool:
    """A name of the claim protocol (claims, copies, the registry): never a key of a slot."""
    return name.startswith(RESERVED_PREFIX)


def migrate_arguments(host: str, port: int, timeout_ms: int, auth: Optional[Credentials] = None) -> List[bytes]:
    """MIGRATE's arguments after the key, as the scripts take them: host, port, db 0, timeout, then
    ``AUTH password`` or ``AUTH2 user password`` for the target when the cluster has credentials."""
    return [host.encode(), b"%d" % port, b"0", b"%d" % timeout_ms, *migrate_options(auth)]


def batch_command(head: Sequence[bytes], keys: Sequence[bytes]) -> List[bytes]:
    """``EVAL SWEEP_BATCH`` for ``keys``; ``head`` is [limit, host, port, db, timeout(, auth ...)]."""
    return [b"EVAL", SWEEP_BATCH, b"%d" % len(keys), *keys, *head]


def batch_reply(value: Any) -> Optional[tuple]:
    """(moved: bool, claimed keys) from the batch script's decoded reply; None when it is not one."""
    if not isinstance(value, list) or len(value) != 2 or not isinstance(value[1], list):
        return None
    status = value[0].decode() if isinstance(value[0], bytes) else value[0]
    if status not in ("OK", "NOKEY"):
        return None
    return status == "OK", [bytes(key) for key in value[1]]


def next_count(count: int, elements: int, size: int, limit: int = MAX_COUNT) -> int:
    """Elements to ask for after a chunk of ``elements`` in ``size`` bytes: about CHUNK_BYTES, 1..limit.

    An empty chunk (a sparse stretch of a scanned hash) doubles ``count``.
    """
    if elements <= 0 or size <= 0:
        return max(1, min(limit, count * 2))
    return max(1, min(limit, int(CHUNK_BYTES * elements / size)))


def _size(items: Sequence[Any]) -> int:
    return sum(len(item) for item in items if isinstance(item, bytes))


class Plan:
    """How one claim is read in chunks and written to its copy: commands in, commands out (no I/O).

    ``read()`` is the next read on the source (None once all was read);
    ``took(reply)`` the writes on the target for its reply; ``finish(info)``
    writes made once at the end.
    """

    def __init__(self, claim: bytes, tmp: bytes, length: int) -> None:
        self.claim = claim
        self.tmp = tmp
        self.length = length
        self.count = FIRST_COUNT
        self.done = False
        self.chunks = 0

    def read(self) -> Optional[List[bytes]]:
        raise NotImplementedError

    def took(self, reply: Any) -> List[List[bytes]]:
        raise NotImplementedError

    def finish(self, info: Dict[str, Any]) -> List[List[bytes]]:
        return []


class _Scanned(Plan):
    """HSCAN / SSCAN: a cursor; the elements come as they are written (field value ..., or members)."""

    scan, write, per = b"", b"", 1

    def __init__(self, claim: bytes, tmp: bytes, length: int) -> None:
        super().__init__(claim, tmp, length)
        self.cursor = b"0"

    def read(self) -> Optional[List[bytes]]:
        if self.done:
            return None
        return [self.scan, self.claim, self.cursor, b"COUNT", b"%d" % self.count]

    def took(self, reply: Any) -> List[List[bytes]]:
        self.cursor, items = bytes(reply[0]), list(reply[1])
        self.done = self.cursor == b"0"
        self.chunks += 1
        self.count = next_count(self.count, len(items) // self.per, _size(items))
        return [[self.write, self.tmp, *items]] if items else []


class HashPlan(_Scanned):
    scan, write, per = b"HSCAN", b"HSET", 2


class SetPlan(_Scanned):
    scan, write, per = b"SSCAN", b"SADD", 1


class _Ranked(Plan):
    """ZRANGE / LRANGE by index: ``count`` from ``start``; fewer than asked (or the length reached) ends it."""

    def __init__(self, claim: bytes, tmp: bytes, length: int) -> None:
        super().__init__(claim, tmp, length)
        self.start = 0
        self._asked = 0

    def _range(self, command: bytes, *more: bytes) -> Optional[List[bytes]]:
        if self.done or self.start >= self.length:
            self.done = True
            return None
        self._asked = self.count
        return [command, self.claim, b"%d" % self.start, b"%d" % (self.start + self.count - 1), *more]

    def _advance(self, elements: int, size: int) -> None:
        self.start += elements
        self.chunks += 1
        self.done = elements < self._asked or self.start >= self.length
        self.count = next_count(self.count, elements, size)


class ZsetPlan(_Ranked):
    def read(self) -> Optional[List[bytes]]:
        return self._range(b"ZRANGE", b"WITHSCORES")

    def took(self, reply: Any) -> List[List[bytes]]:
        items = list(reply)
        self._advance(len(items) // 2, _size(items))
        pairs: List[bytes] = []
        for index in range(0, len(items) - 1, 2):
            pairs += [items[index + 1], items[index]]      # member score -> score member
        return [[b"ZADD", self.tmp, *pairs]] if pairs else []


class ListPlan(_Ranked):
    def read(self) -> Optional[List[bytes]]:
        return self._range(b"LRANGE")

    def took(self, reply: Any) -> List[List[bytes]]:
        items = list(reply)
        self._advance(len(items), _size(items))
        return [[b"RPUSH", self.tmp, *items]] if items else []


class StringPlan(Plan):
    """GETRANGE / APPEND, STRING_CHUNK bytes at a time (HyperLogLogs and bitmaps are strings too)."""

    def __init__(self, claim: bytes, tmp: bytes, length: int) -> None:
        super().__init__(claim, tmp, length)
        self.offset = 0

    def read(self) -> Optional[List[bytes]]:
        if self.done or self.offset >= self.length:
            self.done = True
            return None
        return [b"GETRANGE", self.claim, b"%d" % self.offset, b"%d" % (self.offset + STRING_CHUNK - 1)]

    def took(self, reply: Any) -> List[List[bytes]]:
        chunk = bytes(reply or b"")
        self.offset += len(chunk)
        self.chunks += 1
        self.done = len(chunk) < STRING_CHUNK or self.offset >= self.length
        return [[b"APPEND", self.tmp, chunk]] if chunk else []


class StreamPlan(Plan):
    """XRANGE / XADD with the entries' ids, then XSETID with the stream's last id and counters."""

    def __init__(self, claim: bytes, tmp: bytes, length: int) -> None:
        super().__init__(claim, tmp, length)
        self.after: Optional[bytes] = None
        self._asked = 0

    def read(self) -> Optional[List[bytes]]:
        if self.done:
            return None
        self._asked = self.count
        start = b"-" if self.after is None else b"(" + self.after
        return [b"XRANGE", self.claim, start, b"+", b"COUNT", b"%d" % self.count]

    def took(self, reply: Any) -> List[List[bytes]]:
        entries = list(reply)
        self.chunks += 1
        self.done = len(entries) < self._asked
        writes, size = [], 0
        for entry_id, fields in entries:
            fields = list(fields)
            writes.append([b"XADD", self.tmp, bytes(entry_id), *fields])
            size += _size(fields)
            self.after = bytes(entry_id)
        self.count = next_count(self.count, len(entries), size)
        return writes

    def finish(self, info: Dict[str, Any]) -> List[List[bytes]]:
        last = info.get("last-generated-id")
        if not last:
            return []
        command = [b"XSETID", self.tmp, _bytes(last)]
        if info.get("entries-added") is not None:
            command += [b"ENTRIESADDED", _bytes(info["entries-added"])]
        if info.get("max-deleted-entry-id"):
            command += [b"MAXDELETEDID", _bytes(info["max-deleted-entry-id"])]
        return [command]


PLANS = {"hash": HashPlan, "set": SetPlan, "zset": ZsetPlan, "list": ListPlan, "string": StringPlan,
         "stream": StreamPlan}


def plan_for(kind: str, key: bytes, length: int, info: Optional[Dict[str, Any]] = None) -> Optional[Plan]:
    """The chunk plan for a claim of type ``kind``; None when it cannot be copied faithfully in chunks."""
    if kind == "stream" and int((info or {}).get("groups") or 0) > 0:
        return None            # consumer groups and their pending entries: no command rebuilds them exactly
    made = PLANS.get(kind)
    return made(claim_of(key), tmp_of(key), length) if made is not None else None


def stream_info(value: Any) -> Dict[str, Any]:
    """XINFO STREAM's flat reply as a dict (text keys)."""
    if not isinstance(value, list):
        return {}
    return {_text(value[i]): value[i + 1] for i in range(0, len(value) - 1, 2)}


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


class _StartOver(Exception):
    """The copy is not good (a partial copy evaporated, the lengths differ): start the key over."""


class Abandoned(Exception):
    """The sweep may not go on: the claim is left for whoever sweeps next."""


class Stopped(Exception):
    """The sweep was stopped before the range was empty."""


class BigKeyMover:
    """Copies claimed keys of slots in ``in_range`` from ``source`` to ``target`` (masters, ``host:port``).

    ``admin`` is a :class:`~twinproxy.dashboard.servers.ServerAdmin` (or anything with its ``command``).
    The owning sweep gives: ``may_go()`` (False: leave the claim, raise
    :class:`Abandoned`), ``stopped()`` (True: put the key back or release
    it, raise :class:`Stopped`), ``trouble(reason)`` (a Deferred that
    waits the backoff and notes the reason) and ``well()``.
    """

    _log = Logger()

    def __init__(self, clock: Any, admin: Any, source: str, target: str, in_range: Callable[[bytes], bool],
                 progress: Progress, migrate_args: Sequence[bytes], may_go: Callable[[], bool],
                 stopped: Callable[[], bool], trouble: Callable[[str], defer.Deferred],
                 well: Callable[[], None], label: str = "") -> None:
        self._clock = clock
        self._admin = admin
        self.source = source
        self.target = target
        self._in_range = in_range
        self.progress = progress
        self._migrate_args = list(migrate_args)        # host, port, db, timeout (, AUTH ... / AUTH2 ...)
        self._may_go = may_go
        self._stopped = stopped
        self._trouble = trouble
        self._well = well
        self.label = label
        self.moved = 0      # keys copied in chunks
        self.whole = 0      # keys MIGRATEd whole

    @defer.inlineCallbacks
    def serve(self, extra: Sequence[bytes] = ()) -> Any:
        """Copy every claimed key of the range (the registry's and ``extra``); how many there were."""
        members = yield self._ask(self.source, b"SMEMBERS", CLAIMS)
        keys = sorted({bytes(key) for key in (members or [])} | set(extra))
        mine = [key for key in keys if self._in_range(key)]
        for key in mine:
            yield self.move(key)
        return len(mine)

    @defer.inlineCallbacks
    def move(self, key: bytes) -> Any:
        """Copy claimed ``key`` until it is in place (or gone); Abandoned/Stopped as above."""
        while True:
            try:
                self._check()
                yield self._copy(key)
                self._well()
                return None
            except Stopped:
                if self._may_go():
                    yield self._put_back(key)
                raise
            except (ServerError, _StartOver) as err:
                reason = f"big key {show_key(key)} from {self.source} to {self.target}: {err}"
            yield self._trouble(reason)

    def _check(self) -> None:
        if not self._may_go():
            raise Abandoned()
        if self._stopped():
            raise Stopped()

    def _ask(self, address: str, *args: bytes) -> defer.Deferred:
        return self._admin.command(address, *args)

    @defer.inlineCallbacks
    def _copy(self, key: bytes) -> Any:
        claim, tmp = claim_of(key), tmp_of(key)
        kind, at, size = yield _gather([self._ask(self.source, b"TYPE", claim),
                                        self._ask(self.source, b"PEXPIRETIME", claim),
                                        self._ask(self.source, b"MEMORY", b"USAGE", claim)])
        kind = _text(kind)
        if kind == "none":
            yield self._ask(self.source, b"SREM", CLAIMS, key)      # expired, or put in place by another
            return
        info = stream_info((yield self._ask(self.source, b"XINFO", b"STREAM", claim))) if kind == "stream" else {}
        length = yield self._ask(self.source, LENGTH[kind], claim) if kind in LENGTH else defer.succeed(0)
        plan = plan_for(kind, key, length or 0, info)
        if plan is None:
            yield self._whole(key, kind, size)
            return
        began = self._clock.seconds()
        self._log.info("{label}: copying big key {key} ({mib:.1f} MiB, {kind} of {length} elements) in chunks",
                       label=self.label, key=show_key(key), mib=(size or 0) / 1048576, kind=kind, length=length)
        yield self._ask(self.target, b"UNLINK", tmp)
        yield self._chunks(plan, tmp)
        for command in plan.finish(info):
            yield self._ask(self.target, *command)
        # Same length on both sides, and the claim still there (it may have expired meanwhile).
        still, theirs, ours = yield _gather([self._ask(self.source, b"TYPE", claim),
                                             self._ask(self.source, LENGTH[kind], claim),
                                             self._ask(self.target, LENGTH[kind], tmp)])
        if _text(still) == "none":
            yield self._ask(self.target, b"UNLINK", tmp)
            yield self._ask(self.source, b"SREM", CLAIMS, key)
            return
        if theirs != ours:
            raise _StartOver(f"the copy has {ours} elements, the claim {theirs}")
        self._check()      # the last moment a stop puts K back on the source
        yield self._ask(self.target, b"EVAL", FINALIZE, b"2", tmp, key, b"%d" % (at if isinstance(at, int) else -1))
        if not self._may_go():
            raise Abandoned()      # in place on the target, claim kept: the next sweep copies it again
        yield self._ask(self.source, b"EVAL", RELEASE, b"2", claim, CLAIMS, key)
        self.moved += 1
        self.progress.keys_moved += 1
        self._log.info("{label}: big key {key} moved in {chunks} chunks, {seconds:.2f}s", label=self.label,
                       key=show_key(key), chunks=plan.chunks, seconds=self._clock.seconds() - began)

    @defer.inlineCallbacks
    def _chunks(self, plan: Plan, tmp: bytes) -> Any:
        """Read chunk n+1 on the source while chunk n is written to the target."""
        ttl = b"%d" % TMP_TTL_MS
        read = plan.read()
        reply = (yield self._ask(self.source, *read)) if read is not None else None
        first = True
        while read is not None:
            writes = plan.took(reply)
            self._check()
            asked = []
            if writes:
                if not first:
                    asked.append(self._ask(self.target, b"PEXPIRE", tmp, ttl))
                asked += [self._ask(self.target, *command) for command in writes]
                asked.append(self._ask(self.target, b"PEXPIRE", tmp, ttl))
            read = plan.read()
            if read is not None:
                asked.append(self._ask(self.source, *read))
            results = yield _gather(asked)
            if writes and not first and results[0] != 1:
                raise _StartOver(f"its partial copy on the target expired (after {plan.chunks} chunks)")
            if writes:
                first = False
            reply = results[-1] if read is not None else None

    @defer.inlineCallbacks
    def _put_back(self, key: bytes) -> Any:
        """Stopped mid-copy: the claim becomes K again on the source (which still owns it); the copy goes.

        If the source does not answer, the claim stays for the next sweep (logged).
        """
        try:
            yield self._ask(self.source, b"EVAL", ROLLBACK, b"3", claim_of(key), key, CLAIMS)
            yield self._ask(self.target, b"UNLINK", tmp_of(key))
        except ServerError as err:
            self._log.warn("{label}: stopped mid-copy, cannot put big key {key} back: {reason}; the next sweep "
                           "copies it", label=self.label, key=show_key(key), reason=str(err))

    @defer.inlineCallbacks
    def _whole(self, key: bytes, kind: str, size: Any) -> Any:
        why = "a stream with consumer groups" if kind == "stream" else f"of type {kind}"
        self._log.warn("{label}: big key {key} ({mib:.1f} MiB) is {why}, which a chunked copy cannot reproduce: "
                       "MIGRATE moves it whole, blocking {source} and {target} meanwhile", label=self.label,
                       key=show_key(key), mib=(size or 0) / 1048576, why=why, source=self.source,
                       target=self.target)
        reply = yield self._ask(self.source, b"EVAL", WHOLE, b"3", claim_of(key), key, CLAIMS, *self._migrate_args)
        if _text(reply) not in ("OK", "NOKEY"):
            raise ServerRefused(f"{self.source} answered {reply!r} to the MIGRATE of a big key")
        self.whole += 1
        self.progress.keys_moved += 1


def _gather(deferreds: List[defer.Deferred]) -> defer.Deferred:
    """The results in order; the first failure (a ServerError) fails it, after all have answered."""
    def unwrap(results: List[Any]) -> List[Any]:
        for ok, value in results:
            if not ok:
                value.raiseException()
        return [value for _, value in results]

    return defer.DeferredList(deferreds, consumeErrors=True).addCallback(unwrap)
