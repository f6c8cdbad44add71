"""The scripts a migrating slot's source is sent, and what their answers mean.

Owns the claim protocol's reserved names (codis.md §6.5: :func:`claim_of`,
:data:`CLAIMS`, :data:`UNSURE`), the Lua of :data:`ENSURE_MOVED` (move the
keys a request touches: ``MIGRATE ... REPLACE KEYS``, unless one is claimed
or big) and :data:`RUN_OR_MOVE` (run the request on the source while its key
is there, else the same: :mod:`twinproxy.cluster.onsource`), the bytes of
their requests (:func:`ensure_moved_parts`, :func:`ensure_moved_request`)
and the reading of their replies (:func:`classify`, :func:`wait_reply`,
:func:`target_not_writable`).  Pure: no sockets, no clock.
:class:`~twinproxy.cluster.migrating.MigratingSlot` sends them; the
dashboard's sweep shares the names.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from twinproxy.cluster.onsource import SERVED_HEAD
from twinproxy.credentials import Credentials, migrate_options

# The claim protocol's names, reserved: never a client's keys, never swept as keys.
RESERVED_PREFIX = b"__twinproxy:"
CLAIM_PREFIX = b"__twinproxy:mig:"
CLAIMS = b"__twinproxy:claims"       # a set on the source: the keys K whose claim(K) exists
UNSURE = b"__twinproxy:unsure"       # a set on the source: keys a MIGRATE's IOERR may have left on the target too
# A key whose MEMORY USAGE (5 samples: microseconds even for a 200 MiB hash)
# is above this is claimed, not MIGRATEd: MIGRATE would block both servers
# for the whole copy (measured: 1.96 s for a 214 MB hash).
BIG_KEY_BYTES = 4 * 1024 * 1024

# The scripts' parts.  KEYS: the request's keys, their claims, the claims registry.  ARGV (from ``o + 1``):
# the big-key limit, the target's host, port, db, MIGRATE's timeout, its AUTH words.
_WAIT_FOR_CLAIMS = b"""\
local n = (#KEYS - 1) / 2
for i = 1, n do
  if redis.call('EXISTS', KEYS[n + i]) == 1 then return {'WAIT', i} end
end
"""
_MOVE_KEYS = b"""\
local limit = tonumber(ARGV[o + 1])
if limit > 0 then
  local claimed = 0
  for i = 1, n do
    local size = redis.call('MEMORY', 'USAGE', KEYS[i])
    if size and size > limit and redis.call('RENAMENX', KEYS[i], KEYS[n + i]) == 1 then
      redis.call('SADD', KEYS[#KEYS], KEYS[i])
      if claimed == 0 then claimed = i end
    end
  end
  if claimed > 0 then return {'WAIT', claimed} end
end
local args = {'MIGRATE', ARGV[o + 2], ARGV[o + 3], '', ARGV[o + 4], ARGV[o + 5], 'REPLACE'}
for i = o + 6, #ARGV do args[#args + 1] = ARGV[i] end
args[#args + 1] = 'KEYS'
for i = 1, n do args[#args + 1] = KEYS[i] end
local moved = redis.pcall(unpack(args))
if moved.err then
  if string.sub(moved.err, 1, 5) == 'IOERR' then
    for i = 1, n do redis.call('SADD', '__twinproxy:unsure', KEYS[i]) end
  end
elseif redis.call('EXISTS', '__twinproxy:unsure') == 1 then
  redis.call('SREM', '__twinproxy:unsure', unpack(KEYS, 1, n))
end
return moved
"""
# A MIGRATE answered IOERR (the target did not answer in time) may have left its keys on the target too (the
# target may still load them): they are noted in UNSURE (a set on the source) until a MIGRATE of them
# succeeds, and no request runs on the source on one of them meanwhile (a DEL run there would leave the
# target's copy for the next request to read).  The name is in the scripts, not their KEYS (stock Redis,
# no cluster mode: a script may name it).
ENSURE_MOVED = _WAIT_FOR_CLAIMS + b"local o = 0\n" + _MOVE_KEYS

# The same, but when every key is on the source, run the request there (ARGV[1]: its number of arguments,
# then the arguments) and answer [SERVED, its reply]: twinproxy.cluster.onsource.
RUN_OR_MOVE = _WAIT_FOR_CLAIMS + b"""\
local o = tonumber(ARGV[1]) + 1
if redis.call('EXISTS', unpack(KEYS, 1, n)) == n
    and redis.call('SMISMEMBER', '__twinproxy:unsure', unpack(KEYS, 1, n))[1] == 0 then
  return {'SERVED', redis.pcall(unpack(ARGV, 2, o))}
end
""" + _MOVE_KEYS
RUN_HEAD = (2, b"$4\r\nEVAL\r\n$%d\r\n%s\r\n" % (len(RUN_OR_MOVE), RUN_OR_MOVE))

# MIGRATE's error when the target refused the keys (nothing moved): ``-ERR Target instance replied with
# error: <its error>``; these mean the target is no writable master (yet): wait for one.
_TARGET_REFUSED = b"Target instance replied with error: "
_NOT_WRITABLE = (b"READONLY", b"NOREPLICAS", b"MASTERDOWN", b"LOADING")

# What the script's reply means.
MOVED, WAIT, FAILED, SERVED = 0, 1, 2, 3
_WAIT_HEAD = b"*2\r\n$4\r\nWAIT\r\n:"


def claim_of(key: bytes) -> bytes:
    """The name a big key has on the source while it is copied (its slot is not the key's: never swept)."""
    return CLAIM_PREFIX + key


def classify(reply: bytes) -> Tuple[int, int]:
    """(MOVED, 0), (WAIT, index of the claimed key, 1-based), (SERVED, 0) — the request ran on the source —
    or (FAILED, 0) for the script's reply."""
    if reply.startswith((b"+OK\r", b"+NOKEY\r")):
        return MOVED, 0
    if reply.startswith(SERVED_HEAD):
        return SERVED, 0
    if reply.startswith(_WAIT_HEAD) and reply.endswith(b"\r\n"):
        try:
            return WAIT, int(reply[len(_WAIT_HEAD):-2])
        except ValueError:
            pass
    return FAILED, 0


def wait_reply(index: int) -> bytes:
    """The script's ``[WAIT, index]`` answer (the inverse of :func:`classify`'s WAIT)."""
    return _WAIT_HEAD + b"%d\r\n" % index


def target_not_writable(reply: bytes) -> Optional[str]:
    """The target's error word when the script's reply says the target refused the keys as no writable
    master (see ``_NOT_WRITABLE``), else None."""
    at = reply.find(_TARGET_REFUSED)
    if at < 0:
        return None
    word = reply[at + len(_TARGET_REFUSED):].split(b" ", 1)[0].strip()
    return word.decode("latin-1") if word in _NOT_WRITABLE else None


def show_key(key: bytes) -> str:
    text = key.decode("utf-8", "replace")
    return repr(text if len(text) <= 100 else text[:100] + "...")


def ensure_moved_request(keys: List[bytes], parts: Tuple[Tuple[int, bytes], Tuple[int, bytes]]) -> bytes:
    """The script's request for ``keys``: ``parts`` is :func:`ensure_moved_parts`' (head, tail)."""
    (count, head), (tail_count, tail) = parts
    claims = [claim_of(key) for key in keys]
    return (b"*%d\r\n" % (count + 2 * len(keys) + 2 + tail_count) + head
            + _bulk(b"%d" % (2 * len(keys) + 1)) + _bulks(keys) + _bulks(claims) + _bulk(CLAIMS) + tail)


def ensure_moved_parts(host: str, port: int, db: int, timeout_ms: int, auth: Optional[Credentials],
                       big_key_bytes: int = BIG_KEY_BYTES) -> Tuple[Tuple[int, bytes], Tuple[int, bytes]]:
    """The script call around its keys: (count, bulks) of ``EVAL <script>`` and of its ARGV."""
    argv = [b"%d" % big_key_bytes, host.encode(), b"%d" % port, b"%d" % db, b"%d" % timeout_ms,
            *migrate_options(auth)]
    return (2, _bulks([b"EVAL", ENSURE_MOVED])), (len(argv), _bulks(argv))


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _bulks(values: List[bytes]) -> bytes:
    return b"".join(b"$%d\r\n%s\r\n" % (len(value), value) for value in values)
