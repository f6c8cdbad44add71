"""The script a migrating slot's source is sent, and what its answers mean.

Owns the claim protocol's reserved names (codis.md §6.5: :func:`claim_of`,
:data:`CLAIMS`), the Lua of :data:`ENSURE_MOVED` (move the keys a request
touches: ``MIGRATE ... REPLACE KEYS``, unless one is claimed or big), the
bytes of its requests (:func:`ensure_moved_parts`, :func:`ensure_moved_request`)
and the reading of its replies (:func:`classify`, :func:`wait_reply`,
:func:`target_not_writable`).  Pure: no sockets, no clock.
:class:`~twinproxy.cluster.migrating.MigratingSlot` sends it; the
dashboard's sweep shares the names.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from twinproxy.credentials import Credentials, migrate_options

# The claim protocol's names, reserved: never a client's keys, never swept as keys.
RESERVED_PREFIX = b"__twinproxy:"
CLAIM_PREFIX = b"__twinproxy:mig:"
CLAIMS = b"__twinproxy:claims"       # a set on the source: the keys K whose claim(K) exists
# A key whose MEMORY USAGE (5 samples: microseconds even for a 200 MiB hash)
# is above this is claimed, not MIGRATEd: MIGRATE would block both servers
# for the whole copy (measured: 1.96 s for a 214 MB hash).
BIG_KEY_BYTES = 4 * 1024 * 1024

# KEYS: the request's keys, their claims, the claims registry; ARGV: the big-key limit, the target's host,
# port, db, MIGRATE's timeout, its AUTH words.
ENSURE_MOVED = b"""\
local n = (#KEYS - 1) / 2
for i = 1, n do
  if redis.call('EXISTS', KEYS[n + i]) == 1 then return {'WAIT', i} end
end
local limit = tonumber(ARGV[1])
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
local args = {'MIGRATE', ARGV[2], ARGV[3], '', ARGV[4], ARGV[5], 'REPLACE'}
for i = 6, #ARGV do args[#args + 1] = ARGV[i] end
args[#args + 1] = 'KEYS'
for i = 1, n do args[#args + 1] = KEYS[i] end
return redis.pcall(unpack(args))
"""

# MIGRATE's error when the target refused the keys (nothing moved): ``-ERR Target instance replied with
# error: <its error>``; these mean the target is no writable master (yet): wait for one.
_TARGET_REFUSED = b"Target instance replied with error: "
_NOT_WRITABLE = (b"READONLY", b"NOREPLICAS", b"MASTERDOWN", b"LOADING")

# What the script's reply means.
MOVED, WAIT, FAILED = 0, 1, 2
_WAIT_HEAD = b"*2\r\n$4\r\nWAIT\r\n:"


def claim_of(key: bytes) -> bytes:
    """The name a big key has on the source while it is copied (its slot is not the key's: never swept)."""
    return CLAIM_PREFIX + key


def classify(reply: bytes) -> Tuple[int, int]:
    """(MOVED, 0), (WAIT, index of the claimed key, 1-based) or (FAILED, 0) for the script's reply."""
    if reply.startswith((b"+OK\r", b"+NOKEY\r")):
        return MOVED, 0
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
