"""The run-or-move script (twinproxy.cluster.onsource) on real redis-servers: a request whose key is on the
source runs there and its reply comes back byte for byte as the command's own; a key not there is moved (or
found moved) and nothing is created on the source; a claimed key makes it wait; a big key is served in place."""

from __future__ import annotations

import socket
from typing import Any, List

import pytest
import redis

from tests.servers import LOOPBACK
from twinproxy.cluster.movescripts import BIG_KEY_BYTES, CLAIMS, ENSURE_MOVED, RUN_OR_MOVE, UNSURE, claim_of
from twinproxy.cluster.onsource import ONE_KEY_ONLY, RUN_ON_SOURCE, SERVED_HEAD
from twinproxy.dashboard.bigkeys import batch_command

pytestmark = pytest.mark.timeout(60)


class Raw:
    """One connection, replies as bytes (what a proxy's backend connection sees)."""

    def __init__(self, port: int) -> None:
        self.conn = socket.create_connection((LOOPBACK, port), timeout=5)
        self.buffer = b""

    def call(self, *args: bytes) -> bytes:
        self.conn.sendall(b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args))
        # PING after it: its +PONG ends the reply, whatever its shape.
        self.conn.sendall(b"*1\r\n$4\r\nPING\r\n")
        while not self.buffer.endswith(b"+PONG\r\n"):
            chunk = self.conn.recv(65536)
            assert chunk, "the server closed the connection"
            self.buffer += chunk
        reply, self.buffer = self.buffer[:-len(b"+PONG\r\n")], b""
        return reply

    def close(self) -> None:
        self.conn.close()


def run_or_move(raw: Raw, target_port: int, key: bytes, *args: bytes) -> bytes:
    return raw.call(b"EVAL", RUN_OR_MOVE, b"3", key, claim_of(key), CLAIMS, b"%d" % len(args), *args,
                    b"%d" % BIG_KEY_BYTES, LOOPBACK.encode(), b"%d" % target_port, b"0", b"5000")


# (set-up commands, the command) for each type; each runs twice: through the script on one copy of the data
# and directly on another, and the replies must be the same bytes.
CASES: List[Any] = [
    ([[b"SET", b"s", b"v"]], [b"GET", b"s"]),
    ([[b"SET", b"s", b"v"]], [b"SET", b"s", b"w", b"GET"]),
    ([[b"SET", b"s", b"v"]], [b"SET", b"s", b"w", b"NX"]),
    ([[b"SET", b"s", b"v", b"EX", b"100"]], [b"GETEX", b"s", b"PERSIST"]),
    ([[b"SET", b"s", b"1.5"]], [b"INCRBYFLOAT", b"s", b"0.25"]),
    ([[b"SET", b"s", b"v"]], [b"TYPE", b"s"]),
    ([[b"SET", b"s", b"v"]], [b"DEL", b"s"]),
    ([[b"SET", b"s", b"v"]], [b"LPUSH", b"s", b"x"]),                   # WRONGTYPE
    ([[b"HSET", b"h", b"a", b"1", b"b", b"2"]], [b"HGETALL", b"h"]),
    ([[b"HSET", b"h", b"a", b"1"]], [b"HMGET", b"h", b"a", b"nope", b"a"]),
    ([[b"HSET", b"h", b"a", b"1"]], [b"HGET", b"h", b"nope"]),
    ([[b"RPUSH", b"l", b"a", b"b", b"c"]], [b"LRANGE", b"l", b"0", b"-1"]),
    ([[b"RPUSH", b"l", b"a", b"b", b"c"]], [b"LPOS", b"l", b"zz"]),
    ([[b"RPUSH", b"l", b"a", b"b", b"c"]], [b"LPOP", b"l", b"2"]),
    ([[b"SADD", b"t", b"a"]], [b"SMISMEMBER", b"t", b"a", b"b"]),
    ([[b"ZADD", b"z", b"1.5", b"a", b"2", b"b"]], [b"ZRANGE", b"z", b"0", b"-1", b"WITHSCORES"]),
    ([[b"ZADD", b"z", b"1.5", b"a"]], [b"ZSCORE", b"z", b"a"]),
    ([[b"ZADD", b"z", b"1.5", b"a"]], [b"ZRANK", b"z", b"nope"]),
    ([[b"ZADD", b"z", b"1.5", b"a"]], [b"ZADD", b"z", b"INCR", b"2", b"a"]),
    ([[b"XADD", b"x", b"1-1", b"f", b"v"]], [b"XRANGE", b"x", b"-", b"+"]),
    ([[b"XADD", b"x", b"1-1", b"f", b"v"]], [b"XADD", b"x", b"2-1", b"g", b"w"]),
    ([[b"PFADD", b"p", b"a"]], [b"PFADD", b"p", b"b"]),
    ([[b"SETBIT", b"s", b"7", b"1"]], [b"BITCOUNT", b"s"]),
]


def test_replies_of_requests_run_on_the_source_are_the_commands_own(redis_servers) -> None:
    one, two, three = redis_servers(3)
    source, direct = Raw(one.port), Raw(three.port)
    try:
        for setup, command in CASES:
            assert command[0].decode().lower() in RUN_ON_SOURCE | ONE_KEY_ONLY, command
            for server in (source, direct):
                server.call(b"FLUSHALL")
                for step in setup:
                    server.call(*step)
            got = run_or_move(source, two.port, command[1], *command)
            assert got.startswith(SERVED_HEAD), (command, got)
            assert got[len(SERVED_HEAD):] == direct.call(*command), command
        assert two.client().dbsize() == 0           # nothing went to the target
    finally:
        source.close()
        direct.close()


def test_a_key_not_on_the_source_is_moved_and_nothing_is_created_there(redis_servers) -> None:
    one, two = redis_servers(2)
    source = Raw(one.port)
    try:
        assert run_or_move(source, two.port, b"new", b"SET", b"new", b"v") == b"+NOKEY\r\n"
        assert one.client().exists(b"new") == 0        # not created on the source: the proxy sends it to the target
        one.client().set(b"big", b"x" * (BIG_KEY_BYTES + 1))
        served = run_or_move(source, two.port, b"big", b"STRLEN", b"big")
        assert served == SERVED_HEAD + b":%d\r\n" % (BIG_KEY_BYTES + 1)      # a big key served in place
        one.client().rename(b"big", claim_of(b"big"))
        assert run_or_move(source, two.port, b"big", b"STRLEN", b"big") == b"*2\r\n$4\r\nWAIT\r\n:1\r\n"
    finally:
        source.close()


def test_commands_whose_integer_replies_can_pass_2_53_do_not_run_on_the_source(redis_servers) -> None:
    """A key's expiry in ms may be set as far as 2**63: TTL, PTTL, EXPIRETIME and PEXPIRETIME then answer integers
    above 2**53, which come back rounded through Lua's numbers (as INCR's would)."""
    one, two = redis_servers(2)
    source = Raw(one.port)
    try:
        source.call(b"SET", b"s", b"v")
        source.call(b"PEXPIREAT", b"s", b"9123456789012345001")
        for command in (b"TTL", b"PTTL", b"EXPIRETIME", b"PEXPIRETIME"):
            direct = source.call(command, b"s")
            assert int(direct[1:]) > 2 ** 53, command          # past the integers a double holds exactly
            if command.endswith(b"EXPIRETIME"):                 # fixed and odd (the TTLs move with the clock)
                through_lua = source.call(b"EVAL", b"return redis.pcall(ARGV[1], KEYS[1])", b"1", b"s", command)
                assert through_lua == b":%d\r\n" % int(float(int(direct[1:]))) != direct, command
            assert command.decode().lower() not in RUN_ON_SOURCE, command
    finally:
        source.close()


def test_a_key_a_failed_migrate_may_have_left_on_the_target_too_is_not_run_on_the_source(redis_servers) -> None:
    """MIGRATE's IOERR (no answer from the target in time) leaves the key on the source, and maybe on the target
    too (the target may still load it).  A DEL run on the source then would leave the target's copy, which the
    next request (NOKEY on the source) would read: the key must be moved again, not run on, until a MIGRATE of it
    succeeded."""
    one, two = redis_servers(2)
    silent = socket.socket()        # a target that takes the connection and never answers
    silent.bind((LOOPBACK, 0))
    silent.listen(8)
    source = Raw(one.port)
    try:
        source.call(b"SET", b"k", b"v")
        port = silent.getsockname()[1]
        failed = source.call(b"EVAL", ENSURE_MOVED, b"3", b"k", claim_of(b"k"), CLAIMS,
                             b"%d" % BIG_KEY_BYTES, LOOPBACK.encode(), b"%d" % port, b"0", b"100")
        assert failed.startswith(b"-IOERR"), failed
        again = source.call(b"EVAL", RUN_OR_MOVE, b"3", b"k", claim_of(b"k"), CLAIMS, b"2", b"DEL", b"k",
                            b"%d" % BIG_KEY_BYTES, LOOPBACK.encode(), b"%d" % port, b"0", b"100")
        assert again.startswith(b"-IOERR"), again          # moved again (failing again), not run
        assert one.client().get(b"k") == b"v" and one.client().sismember(UNSURE, b"k")
        # Once a MIGRATE of it succeeded, it is known on one side only again.
        assert run_or_move(source, two.port, b"k", b"GET", b"k") == b"+OK\r\n"
        assert not one.client().sismember(UNSURE, b"k") and two.client().get(b"k") == b"v"
    finally:
        source.close()
        silent.close()


def test_the_sweep_notes_the_keys_its_failed_batch_may_have_left_on_the_target(redis_servers) -> None:
    """The dashboard's batch script does as the proxies' do: IOERR notes the batch's keys, success clears them."""
    one, two = redis_servers(2)
    silent = socket.socket()
    silent.bind((LOOPBACK, 0))
    silent.listen(8)
    source = one.client()
    try:
        source.mset({b"a": b"1", b"b": b"2"})
        port = silent.getsockname()[1]
        head = [b"%d" % BIG_KEY_BYTES, LOOPBACK.encode(), b"%d" % port, b"0", b"100"]
        with pytest.raises(redis.ResponseError, match="IOERR"):
            source.execute_command(*batch_command(head, [b"a", b"b"]))
        assert source.smembers(UNSURE) == {b"a", b"b"} and source.mget([b"a", b"b"]) == [b"1", b"2"]
        raw = Raw(one.port)
        try:
            assert run_or_move(raw, two.port, b"a", b"DEL", b"a") == b"+OK\r\n"     # moved, not run there
        finally:
            raw.close()
        assert source.smembers(UNSURE) == {b"b"}
        head[2] = b"%d" % two.port
        assert source.execute_command(*batch_command(head, [b"b"])) == [b"OK", []]
        assert not source.exists(UNSURE) and two.client().mget([b"a", b"b"]) == [b"1", b"2"]
    finally:
        silent.close()
