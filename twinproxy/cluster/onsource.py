"""Which requests of a migrating slot the source may serve itself while their key is still there.

Owns :func:`may_run_on_source`, :func:`run_or_move_request` and
:func:`served`: the proxy's half of Codis's ``SLOTSMGRT-EXEC-WRAPPER`` on
stock Redis.  A migrating slot's key is authoritative on the source for as
long as it exists there: nothing writes it on the target before it moved
(a MIGRATE is atomic on the source), and nothing creates it on the source
after the barrier.  So instead of moving the key first and then sending
the request to the target (two round trips, and a ``MIGRATE`` that blocks
the source while the target loads the key), a request whose key is on the
source runs *there*, inside the same script that checks for it (atomic:
the key can neither move nor be claimed in between), and its reply is the
client's.  When the key is not there (moved, never written, expired) the
script does exactly what the ensure-moved script does, and the request
goes to the target as before.  Nothing is ever created on the source: a
command runs there only when its key exists.

Only requests whose reply comes back through Lua unchanged qualify
(:data:`RUN_ON_SOURCE`): one key, RESP2 (Lua's RESP3 conversion changes
reply types), not leased (blocking commands must block on the server),
whole (a fragment's arguments are its parent's), at most
:data:`MAX_ARGUMENTS` arguments, and a command whose
integer replies stay far below 2**53 (Lua numbers are doubles: ``INCR``
and its kin on large counters, ``TTL`` and its kin on far expiries, would
come back rounded, so they move the key instead).  Replies were compared byte for byte against the same
command sent directly (Redis 7.0: bulk, nil, integer, status, nested
arrays, errors; tests/integration/test_run_on_source.py).
"""

from __future__ import annotations

from typing import List, Tuple

from twinproxy.request import DIALECT_BITS, LEASED, Request

# The script's answer when it ran the request: ``[SERVED, <the command's reply>]``.
SERVED_HEAD = b"*2\r\n$6\r\nSERVED\r\n"

# Commands (the codec's labels) that may run on the source: one key, replies that Lua returns unchanged.
RUN_ON_SOURCE = frozenset((
    # strings and bits (not incr/incrby/decr/decrby: 64-bit integer replies)
    "get", "set", "setnx", "setex", "psetex", "getset", "getdel", "getex", "append", "strlen", "getrange",
    "setrange", "incrbyfloat", "getbit", "setbit", "bitcount", "bitpos",
    # the key itself (not ttl/pttl/expiretime/pexpiretime: an expiry may be set up to 2**63 ms, and the
    # answer past 2**53 would come back rounded)
    "type", "expire", "pexpire", "expireat", "pexpireat", "persist",
    # hashes (not hincrby)
    "hget", "hset", "hsetnx", "hmset", "hmget", "hdel", "hexists", "hgetall", "hkeys", "hvals", "hlen",
    "hstrlen", "hincrbyfloat", "hrandfield",
    # lists (not the blocking ones)
    "lpush", "rpush", "lpushx", "rpushx", "lpop", "rpop", "llen", "lrange", "lindex", "lset", "lrem", "ltrim",
    "linsert", "lpos",
    # sets
    "sadd", "srem", "smembers", "sismember", "smismember", "scard", "spop", "srandmember",
    # sorted sets
    "zadd", "zrem", "zscore", "zmscore", "zincrby", "zcard", "zcount", "zlexcount", "zrange", "zrangebyscore",
    "zrevrange", "zrevrangebyscore", "zrangebylex", "zrevrangebylex", "zrank", "zrevrank", "zremrangebyrank",
    "zremrangebyscore", "zremrangebylex", "zpopmin", "zpopmax", "zrandmember",
    # streams (not xread/xreadgroup: a nil array comes back as a nil string)
    "xadd", "xlen", "xrange", "xrevrange", "xdel", "xtrim",
    # HyperLogLog
    "pfadd",
))
# Arguments at most (Lua's unpack stops near 8,000: a longer request would fail in the script; it moves).
MAX_ARGUMENTS = 1024
# Multi-key commands that qualify when they name exactly one key.
ONE_KEY_ONLY = frozenset(("del", "unlink", "exists", "touch", "pfcount"))


def may_run_on_source(request: Request) -> bool:
    """Whether ``request`` may run on a migrating slot's source while its key is there (see the module)."""
    args = request.args
    if request.parent is not None or request.positions or request.key is None or args is None \
            or len(args) > MAX_ARGUMENTS:
        return False
    if request.profile & (LEASED | DIALECT_BITS) != 2 or request.terminator is not None:
        return False
    name = request.name
    if name in RUN_ON_SOURCE:
        return True
    return name in ONE_KEY_ONLY and len(args) == 2


def run_or_move_request(keys: List[bytes], args: List[bytes], head: Tuple[int, bytes],
                        tail: Tuple[int, bytes], claims: List[bytes], registry: bytes) -> bytes:
    """``EVAL <run-or-move> 2n+1 keys claims registry m <the request's arguments> <ensure-moved's ARGV>``."""
    (count, head_bulks), (tail_count, tail_bulks) = head, tail
    total = count + 1 + 2 * len(keys) + 1 + 1 + len(args) + tail_count
    return (b"*%d\r\n" % total + head_bulks + _bulk(b"%d" % (2 * len(keys) + 1)) + _bulks(keys) + _bulks(claims)
            + _bulk(registry) + _bulk(b"%d" % len(args)) + _bulks(args) + tail_bulks)


def served(reply: bytes) -> bytes:
    """The command's own reply inside the script's ``[SERVED, reply]`` (``reply`` starts with SERVED_HEAD)."""
    return reply[len(SERVED_HEAD):]


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _bulks(values: List[bytes]) -> bytes:
    return b"".join(b"$%d\r\n%s\r\n" % (len(value), value) for value in values)
