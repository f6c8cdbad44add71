"""The whole-keyspace commands over a sharded pool: SCAN, KEYS, DBSIZE, RANDOMKEY, FLUSHDB, FLUSHALL.

Owns: the SCAN cursor codec and the planners and merges of this family.

A client's SCAN cursor is ``(server's cursor << 10) | server index`` (the
index in configuration order, ``all_servers``, which ejections do not
change): one server is scanned to its end, then the next.  When a server's
cursor comes back 0 and a server follows, the client gets ``(0 << 10) |
next``; after the last server, 0.  Every cursor handed out is below 2^63,
so clients that parse it as a signed 64-bit integer (Jedis,
StackExchange.Redis) can; a server cursor too large for that is refused
with an error rather than wrapped.  A cursor that is not a decimal uint64,
or names no server, gets Redis's ``-ERR invalid cursor``.  A scan that
reaches an ejected server fails with an error naming it: skipping it would
end the scan with keys missing and no one told.  MATCH, COUNT and TYPE go
to the server as given (per server: COUNT is a hint, as in Redis).

KEYS and DBSIZE ask every server (the replies concatenated, summed);
RANDOMKEY asks the servers in the ring and picks one of the keys they
gave; FLUSHDB and FLUSHALL (with ASYNC/SYNC as given) go to every server,
``+OK`` only when all said so, else the first error, and the pool key
``redis_deny_flush`` refuses them.
"""

from __future__ import annotations

import random
from typing import List, Optional, Tuple

from twinproxy.protocols import Router, resp
from twinproxy.protocols.redis_fanout import (
    Routes,
    answer,
    command_name,
    every_server,
    first_error,
    first_live,
    is_error,
    live_servers,
    merge_all_ok,
    merge_one,
    merge_sum,
    send_to,
    server_name,
    unexpected,
)
from twinproxy.request import Request

SERVER_BITS = 10
MAX_SERVERS = 1 << SERVER_BITS
CURSOR_LIMIT = 1 << 63          # every cursor handed out is below this (a signed 64-bit integer)
_UINT64_LIMIT = 1 << 64
INVALID_CURSOR = b"-ERR invalid cursor\r\n"


def decode_cursor(text: bytes, servers: int) -> Optional[Tuple[int, int]]:
    """(the server's cursor, the server's index) of a client's cursor; None if it is invalid."""
    if not text.isdigit() or len(text) > 20:
        return None
    value = int(text)
    if value >= _UINT64_LIMIT:
        return None
    index = value & (MAX_SERVERS - 1)
    if index >= servers:
        return None
    return value >> SERVER_BITS, index


def encode_cursor(server_cursor: int, index: int, servers: int) -> Optional[int]:
    """The client's cursor after server ``index`` answered ``server_cursor``; None if it would reach 2^63."""
    if server_cursor == 0:
        return index + 1 if index + 1 < servers else 0
    value = (server_cursor << SERVER_BITS) | index
    return value if value < CURSOR_LIMIT else None


def plan_scan(request: Request, router: Router) -> Routes:
    args = request.args
    if len(args) < 2:   # a server answers Redis's own error
        return send_to(request, router, first_live(request, router), merge_one)
    servers = router.all_servers
    if not servers:
        return answer(request, resp.error(f"ERR no live server in pool '{router.config.name}'"))
    if len(servers) > MAX_SERVERS:
        return answer(request, resp.error(f"ERR SCAN is served for pools of at most {MAX_SERVERS} servers"))
    decoded = decode_cursor(args[1], len(servers))
    if decoded is None:
        return answer(request, INVALID_CURSOR)
    server_cursor, index = decoded
    server = servers[index]
    if server not in set(router.live_servers):
        return answer(request, resp.error(
            f"ERR SCAN cannot go on: server '{server_name(server)}' (number {index} of the pool) is ejected; "
            "scan again once it is back (it is tried again after server_retry_timeout)"))
    router.counters.scans += 1
    raw = resp.encode_command([args[0], b"%d" % server_cursor, *args[2:]])
    return send_to(request, router, [(index, server)], _merge_scan, len(servers), raw)


def _merge_scan(request: Request) -> bytes:
    part = request.fragments[0]
    reply = part.reply
    if is_error(reply):
        return reply
    try:
        header, (cursor_bulk, keys) = resp.split_aggregate(reply)
        cursor_text = cursor_bulk[cursor_bulk.index(b"\r\n") + 2:-2]
        server_cursor = int(cursor_text)
    except (ValueError, TypeError):
        return unexpected(reply)
    if header != b"*2\r\n" or cursor_bulk[:1] != b"$":
        return unexpected(reply)
    cursor = encode_cursor(server_cursor, part.index, part.context)
    if cursor is None:
        return resp.error(
            f"ERR SCAN cannot go on: server '{server_name(part.server)}' answered cursor {server_cursor}, too "
            f"large to carry with the server's number below 2^63 (it has {SERVER_BITS} bits)")
    return b"*2\r\n" + resp.bulk(b"%d" % cursor) + keys


def plan_keys(request: Request, router: Router) -> Routes:
    return send_to(request, router, every_server(request, router), _merge_keys)


def _merge_keys(request: Request) -> bytes:
    """Every server's keys, one array (a Redis array, RESP2 and RESP3 alike)."""
    error = first_error(request)
    if error is not None:
        return error
    total = 0
    bodies: List[bytes] = []
    for part in request.fragments:
        reply = part.reply
        eol = reply.find(b"\r\n")
        if reply[:1] != b"*" or eol < 0:
            return unexpected(reply)
        total += int(reply[1:eol])
        bodies.append(reply[eol + 2:])
    return b"*%d\r\n" % total + b"".join(bodies)


def plan_dbsize(request: Request, router: Router) -> Routes:
    return send_to(request, router, every_server(request, router), merge_sum)


def plan_randomkey(request: Request, router: Router) -> Routes:
    return send_to(request, router, live_servers(request, router), _merge_randomkey)


def _merge_randomkey(request: Request) -> bytes:
    """A key some server picked, at random among the servers that have one; nil when none has."""
    keys = [part.reply for part in request.fragments if part.reply[:1] == b"$" and part.reply != b"$-1\r\n"]
    if keys:
        return random.choice(keys)
    return first_error(request) or request.fragments[0].reply


def plan_flush(request: Request, router: Router) -> Routes:
    if router.config.redis_deny_flush:
        return answer(request, resp.error(
            f"ERR {command_name(request)} is denied by twinproxy: the pool sets redis_deny_flush"))
    return send_to(request, router, every_server(request, router), merge_all_ok)


PLANNERS = {
    "scan": plan_scan,
    "keys": plan_keys,
    "dbsize": plan_dbsize,
    "randomkey": plan_randomkey,
    "flushdb": plan_flush,
    "flushall": plan_flush,
}
