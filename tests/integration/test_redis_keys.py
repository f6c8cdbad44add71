"""The key table against a live Redis 7: ``COMMAND GETKEYS`` for a corpus, the generated table, and the proxy.

The corpus covers every command family, the movablekeys commands and the
edge cases of their key specs.  For each invocation twinproxy's
:func:`~twinproxy.protocols.redis_keys.key_positions` must name the keys
``COMMAND GETKEYS`` names; where it refuses the invocation, its error must
be the one the real command answers (so a refusal is never twinproxy's
guess), and GETKEYS must refuse it too unless the command itself does
(numkeys "1x": GETKEYS reads it with atoi, the command refuses it).  The
documented exceptions are in ``EXCEPTIONS``.
"""

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

from tests.conftest import key_on, pool_yaml
from tests.resp_client import Resp, RespError
from tests.servers import RedisServer
from twinproxy.protocols.redis_commands import REDIS_VERSION
from twinproxy.protocols.redis_keys import BadInvocation, command_keys, key_positions

REPO = Path(__file__).resolve().parents[2]

# One invocation a line, shell-quoted; $SHA is a loaded script, f/fro loaded functions.
CORPUS = r"""
get k
get
get a b
set k v
set k v GET EX 10 NX
setnx k v
setex k 10 v
psetex k 10 v
getex k PERSIST
getdel k
getset k v
append k v
strlen k
setrange k 0 v
getrange k 0 1
substr k 0 1
incr k
incrby k 2
incrbyfloat k 1.5
decr k
decrby k 2
mget a
mget a b c
mset a 1
mset a 1 b 2 c 3
mset a 1 b
msetnx a 1 b 2
lcs a b
lcs a b IDX MINMATCHLEN 2 WITHMATCHLEN
setbit k 7 1
getbit k 7
bitcount k 0 -1 BIT
bitpos k 1
bitop AND d a b c
bitop NOT d a
bitfield k GET u8 0 SET u8 0 1
bitfield_ro k GET u8 0
del a
del a b c
unlink a b
exists a b a
touch a b
expire k 10 NX
pexpire k 10
expireat k 10
pexpireat k 10
expiretime k
pexpiretime k
ttl k
pttl k
persist k
type k
rename a b
rename a
renamenx a b
copy a b
copy a b DB 1 REPLACE
move k 1
dump k
restore k 0 payload REPLACE
object encoding k
object freq k
object idletime k
object refcount k
object help
object encoding
object nosuch k
object
sort k
sort k ALPHA DESC LIMIT 0 10
sort k BY w_* GET o_* GET # STORE d
sort k STORE d1 STORE d2
sort k LIMIT 0 5 STORE store
sort k GET store ALPHA
sort k BY store
sort_ro k BY w_* GET o_*
keys *
scan 0 MATCH a* COUNT 10
randomkey
dbsize
lpush l a b
rpush l a
lpushx l a
rpushx l a
lpop l
rpop l 2
llen l
lrange l 0 -1
lindex l 0
linsert l BEFORE a b
lpos l a RANK 1
lrem l 0 a
lset l 0 a
ltrim l 0 1
rpoplpush a b
lmove a b LEFT RIGHT
blmove a b LEFT RIGHT 0
blpop a b c 0
brpop a 0
brpoplpush a b 0
lmpop 1 a LEFT
lmpop 2 a b RIGHT COUNT 2
lmpop 2 a LEFT
lmpop 0 a LEFT
lmpop -1 a LEFT
lmpop x a LEFT
lmpop 1x a LEFT
lmpop 9 a LEFT
blmpop 0 2 a b LEFT
blmpop 0 0 a LEFT
blmpop 0 9 a LEFT
sadd s a b
srem s a
smembers s
sismember s a
smismember s a b
scard s
spop s 2
srandmember s -2
smove a b m
sdiff a b c
sdiffstore d a b
sinter a
sinterstore d a b
sunion a b
sunionstore d a
sintercard 2 a b
sintercard 1 a LIMIT 5
sintercard 0 a
sintercard 3 a b
sintercard x a
sintercard -1 a
sscan s 0
zadd z 1 a
zrem z a
zscore z a
zmscore z a b
zincrby z 1 a
zcard z
zcount z 0 1
zrank z a
zrevrank z a
zrange z 0 -1 WITHSCORES
zrange z (1 5 BYSCORE LIMIT 0 1
zrangebyscore z 0 1
zrevrangebylex z + -
zrangestore d z 0 -1
zpopmin z 2
zpopmax z
bzpopmin a b 0
bzpopmax a 0
zrandmember z 2
zunion 2 a b WEIGHTS 1 2
zunion 1 a WITHSCORES
zinter 3 a b c AGGREGATE MAX
zdiff 2 a b
zunionstore d 2 a b
zunionstore d 1 a WEIGHTS 2
zinterstore d 2 a b AGGREGATE MIN
zdiffstore d 1 a
zunionstore d 0 a
zunionstore d -1 a
zunionstore d x a
zunionstore d 1x a
zunionstore d 01 a
zunionstore d 99999999999999999999 a
zunionstore d 3 a b
zunion 0 a
zintercard 2 a b LIMIT 1
zintercard 0 a
zintercard 5 a
zmpop 1 a MIN
zmpop 2 a b MAX COUNT 3
zmpop 0 a MIN
zmpop 2 a MIN
bzmpop 0 2 a b MIN
bzmpop 0 x a MIN
zremrangebyrank z 0 1
zscan z 0
hset h f v
hget h f
hmget h a b
hgetall h
hdel h a b
hexists h f
hincrby h f 1
hkeys h
hlen h
hrandfield h 2 WITHVALUES
hscan h 0
hsetnx h f v
hstrlen h f
xadd s * f v
xadd s MAXLEN ~ 10 * f v
xlen s
xrange s - +
xrevrange s + -
xdel s 1-1
xtrim s MAXLEN 10
xsetid s 1-1
xread STREAMS a 0
xread COUNT 1 STREAMS a b 0 0
xread COUNT 1 STREAMS a
xread STREAMS a b c
xread COUNT 1 BLOCK 0 x
xread BLOCK 10 COUNT 1 STREAMS a 0
xread streams a streams 0 0
xread COUNT 1 streams streams 0
xread count streams streams a 0
xread COUNT x STREAMS a
xread foo STREAMS a 0
xreadgroup GROUP g c STREAMS a >
xreadgroup GROUP g c COUNT 1 NOACK STREAMS a b > >
xreadgroup GROUP g c STREAMS a b >
xreadgroup GROUP streams c STREAMS a >
xreadgroup GROUP g streams STREAMS a >
xreadgroup GROUP g c BLOCK 0 STREAMS a >
xreadgroup STREAMS a b c d e f
xreadgroup STREAMS a b c d STREAMS e
xgroup CREATE s g $ MKSTREAM
xgroup DESTROY s g
xgroup SETID s g 0
xgroup CREATECONSUMER s g c
xgroup DELCONSUMER s g c
xgroup HELP
xgroup NOSUCH s
xinfo STREAM s FULL COUNT 2
xinfo GROUPS s
xinfo CONSUMERS s g
xinfo HELP
xack s g 1-1
xclaim s g c 0 1-1
xautoclaim s g c 0 0
xpending s g
geoadd g 13.36 38.11 Palermo
geodist g a b
geohash g a
geopos g a
georadius g 15 37 200 km
georadius g 15 37 200 km STORE d
georadius g 15 37 200 km STOREDIST d
georadius g 15 37 200 km STORE d STOREDIST e
georadius g 15 37 200 km COUNT 2 ASC STORE d
georadius g 15 37 200 km STORE
georadiusbymember g m 100 km STORE d
georadiusbymember g m 100 km
georadius_ro g 15 37 200 km
georadiusbymember_ro g m 100 km
geosearch g FROMMEMBER m BYRADIUS 10 km
geosearchstore d g FROMMEMBER m BYBOX 1 1 km STOREDIST
pfadd h a b
pfcount a b
pfmerge d a b
pfmerge d
eval "return 1" 0
eval "return 1" 1 a
eval "return 1" 2 a b x y
eval "return 1" 3 a b
eval "return 1" -1
eval "return 1" x
eval "return 1" 1x a
eval_ro "return 1" 1 a
evalsha $SHA 1 a
evalsha $SHA 0
evalsha $SHA 2 a
evalsha $SHA -1
evalsha_ro $SHA 1 a
fcall f 1 a
fcall f 0
fcall f 2 a
fcall f x
fcall f -1
fcall_ro fro 2 a b
script load "return 1"
script exists abc
function list
publish c m
spublish c m
subscribe a b
ssubscribe a b
psubscribe a*
pubsub channels
multi
exec
watch a b
unwatch
migrate h 1 k 0 5
migrate h 1 "" 0 5 KEYS a b
migrate h 1 k 0 5 KEYS a b
migrate h 1 "" 0 5 COPY REPLACE AUTH pw KEYS a b
migrate h 1 "" 0 5 AUTH2 u pw KEYS a
info server
config get maxmemory
memory usage k
memory usage k SAMPLES 5
memory stats
memory help
memory doctor
command count
command getkeys get k
time
ping
echo x
client id
wait 1 0
lolwut
nosuch
nosuch a b
NoSuch "a b" c
""".strip().splitlines()

EXCEPTIONS: Dict[str, str] = {
    "pfmerge d": "GETKEYS refuses a PFMERGE without sources (its range spec starts past the end), yet the "
                 "command is valid: twinproxy routes it by its destination",
}


def _load_scripts(server: RedisServer) -> str:
    with Resp(server.port, timeout=5) as conn:
        sha = conn.call("SCRIPT", "LOAD", "return 1")
        loaded = conn.call("FUNCTION", "LOAD", "#!lua name=lib\n"
                           "redis.register_function('f', function(keys, args) return 1 end)\n"
                           "redis.register_function{function_name='fro', callback=function(keys, args) "
                           "return 1 end, flags={'no-writes'}}")
    assert loaded == "lib", loaded
    return sha


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    redis_server = RedisServer(tmp_path_factory.mktemp("getkeys"))
    redis_server.start()
    try:
        redis_server.sha = _load_scripts(redis_server)
        yield redis_server
    finally:
        redis_server.stop()


def _server_version(server: RedisServer) -> str:
    with Resp(server.port, timeout=5) as conn:
        info = conn.call("INFO", "server")
    return re.search(r"redis_version:(\S+)", info).group(1)


def _invocation(line: str, sha: str) -> List[str]:
    return [sha if word == "$SHA" else word for word in shlex.split(line)]


def _twinproxy(args: List[str]):
    """twinproxy's keys for ``args`` (as text), or its refusal."""
    encoded = [arg.encode() for arg in args]
    try:
        return [args[position] for position in key_positions(encoded)]
    except BadInvocation as refusal:
        return refusal


def _compare(conn: Resp, line: str, args: List[str]) -> str:
    """'' when twinproxy agrees with the server on ``args``, else what differs."""
    expected = conn.call("COMMAND", "GETKEYS", *args)
    mine = _twinproxy(args)
    if isinstance(mine, list):
        if isinstance(expected, list):
            return "" if mine == expected else f"{line!r}: GETKEYS {expected}, twinproxy {mine}"
        # GETKEYS needs an argument after the command's name: a lone PING is asked about as no keys.
        no_keys = expected.text in ("ERR The command has no key arguments",
                                    "ERR wrong number of arguments for 'command|getkeys' command")
        if no_keys and not mine and not command_keys([arg.encode() for arg in args]).has_keys:
            return ""
        return f"{line!r}: GETKEYS {expected.text!r}, twinproxy routes by {mine}"
    # twinproxy refuses: with the error the command itself answers, and GETKEYS refuses it too,
    # or names keys the command would never use (it reads numkeys with atoi).
    real = conn.call(*args)
    if not isinstance(real, RespError):
        return f"{line!r}: twinproxy refuses it ({mine.message!r}), the command answers {real!r}"
    if real.text != mine.message.decode("utf-8", "replace"):
        return f"{line!r}: twinproxy says {mine.message!r}, the command {real.text!r}"
    return ""


@pytest.mark.timeout(60)
def test_key_positions_equal_command_getkeys(server: RedisServer) -> None:
    assert len(CORPUS) >= 200
    differences = []
    with Resp(server.port, timeout=5) as conn:
        for line in CORPUS:
            args = _invocation(line, server.sha)
            if line in EXCEPTIONS:
                assert isinstance(conn.call("COMMAND", "GETKEYS", *args), RespError), line
                assert isinstance(_twinproxy(args), list), line
                continue
            difference = _compare(conn, line, args)
            if difference:
                differences.append(difference)
    assert not differences, "\n".join(differences)


@pytest.mark.timeout(60)
def test_channels_are_keys_only_when_asked(server: RedisServer) -> None:
    with Resp(server.port, timeout=5) as conn:
        assert conn.call("COMMAND", "GETKEYS", "SPUBLISH", "c", "m").text == "ERR The command has no key arguments"
    assert key_positions([b"SPUBLISH", b"c", b"m"]) == []
    assert key_positions([b"SPUBLISH", b"c", b"m"], include_not_keys=True) == [1]
    assert key_positions([b"SSUBSCRIBE", b"a", b"b"], include_not_keys=True) == [1, 2]


@pytest.mark.timeout(60)
def test_checked_in_table_is_what_the_generator_writes(server: RedisServer) -> None:
    version = _server_version(server)
    if version != REDIS_VERSION:
        pytest.skip(f"twinproxy/protocols/redis_commands.py is from Redis {REDIS_VERSION}; the redis-server "
                    f"here is {version}, whose COMMAND INFO may differ")
    generator = subprocess.run([sys.executable, str(REPO / "scripts" / "gen-redis-commands.py"), "--check",
                                "--port", str(server.port)], capture_output=True, text=True, timeout=30, cwd=REPO)
    assert generator.returncode == 0, generator.stdout + generator.stderr


# -- through a proxy with 3 backends -------------------------------------------------


def _tagged_pool(redis_servers, proxy):
    backends = redis_servers(3)
    service = proxy(pool_yaml(backends, hash_tag='"{}"', hash="murmur"))
    return backends, service


def _comparable(reply):
    """A reply as a value == can compare (errors by their text)."""
    return ("error", reply.text) if isinstance(reply, RespError) else reply


def _holders(backends, key: str) -> List[int]:
    return [i for i, backend in enumerate(backends) if backend.client().exists(key)]


@pytest.mark.timeout(60)
def test_zunionstore_destination_must_be_with_its_sources(redis_servers, proxy) -> None:
    backends, service = _tagged_pool(redis_servers, proxy)
    names = [server.name for server in service.pool.servers]
    tagged = names.index(service.pool.server_for_key(b"t").name)
    elsewhere = key_on(service, (tagged + 1) % 3, "d")
    with Resp(service.port_number, timeout=5) as conn:
        assert conn.call("ZADD", "a{t}", "1", "x") == 1
        assert conn.call("ZADD", "b{t}", "2", "y") == 1
        refused = conn.call("ZUNIONSTORE", elsewhere, "2", "a{t}", "b{t}")
        assert isinstance(refused, RespError)
        assert refused.text == ("ERR keys in request don't hash to the same server "
                                "(use a hash tag to keep them together)")
        assert all(_holders(backends, key) == [] for key in (elsewhere, "d{t}"))   # nothing written anywhere
        assert conn.call("ZUNIONSTORE", "d{t}", "2", "a{t}", "b{t}") == 2
        assert conn.call("ZRANGE", "d{t}", "0", "-1") == ["x", "y"]
    assert _holders(backends, "d{t}") == [tagged]


@pytest.mark.timeout(60)
def test_xread_without_block_through_the_proxy(redis_servers, proxy) -> None:
    backends, service = _tagged_pool(redis_servers, proxy)
    with Resp(service.port_number, timeout=5) as conn:
        entry = conn.call("XADD", "s{t}", "*", "f", "v")
        assert conn.call("XREAD", "COUNT", "1", "STREAMS", "s{t}", "0") == [["s{t}", [[entry, ["f", "v"]]]]]
        assert conn.call("XGROUP", "CREATE", "s{t}", "g", "0") == "OK"
        assert conn.call("XREADGROUP", "GROUP", "g", "c", "COUNT", "1", "STREAMS", "s{t}", ">") == [
            ["s{t}", [[entry, ["f", "v"]]]]]
        # With BLOCK it runs on a leased connection (tests/integration/test_redis_blocking.py).
        assert conn.call("XREAD", "BLOCK", "10", "STREAMS", "s{t}", "$") is None
        assert conn.call("PING") == "PONG"


@pytest.mark.timeout(60)
def test_unknown_commands_and_help_as_the_server_answers(redis_servers, proxy) -> None:
    backends, service = _tagged_pool(redis_servers, proxy)
    asked = [("NOSUCH",), ("nosuch", "a", "b c"), ("NoSuch", "x" * 150), ("OBJECT", "NOSUCH", "k"),
             ("OBJECT", "HELP"), ("XINFO", "HELP"), ("OBJECT", "ENCODING"), ("ZUNIONSTORE", "d", "0", "a"),
             ("LMPOP", "0", "a", "LEFT"), ("EVAL", "return 1", "-1")]
    with Resp(service.port_number, timeout=5) as through, Resp(backends[0].port, timeout=5) as direct:
        for command in asked:
            assert _comparable(through.call(*command)) == _comparable(direct.call(*command)), command
        assert through.call("SET", "k{t}", "1") == "OK"
        assert through.call("OBJECT", "ENCODING", "k{t}") == "int"
        assert isinstance(through.call("MEMORY", "USAGE", "k{t}"), int)
        refused = through.call("MEMORY", "STATS")
        assert refused.text.startswith("ERR command 'MEMORY STATS' is not supported by twinproxy")
