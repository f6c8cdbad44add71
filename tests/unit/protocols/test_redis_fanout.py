"""The fan-out layout and its pure merges: SCAN's cursor codec, INFO, SCRIPT EXISTS, KEYS, the script store.

The planners run against a fake Router of named servers; replies are
Redis 7.0's bytes (as checked against a real server in
tests/integration/test_redis_fanout.py).
"""

from __future__ import annotations

from typing import List, Optional

import pytest

from twinproxy.config import load_text
from twinproxy.protocols import redis_info, redis_keyspace, redis_scripts, resp
from twinproxy.protocols.redis import RedisCodec
from twinproxy.protocols.redis_fanout import FanoutFragment
from twinproxy.request import FRAGMENT, LOCAL, Request
from twinproxy.stats import PoolCounters


class Server:
    def __init__(self, name: str, up: bool = True) -> None:
        self.name = name
        self.up = up

    def __repr__(self) -> str:
        return self.name


class Router:
    """Three servers in configuration order; ``ejected`` ones are out of the ring."""

    def __init__(self, extra: str = "", ejected=(), down=()) -> None:
        (self.config,) = load_text(f"p:\n  listen: 127.0.0.1:1\n  redis: true\n{extra}  servers:\n"
                                   "   - 10.0.0.1:1:1\n")
        self.all_servers = [Server(name, up=name not in down) for name in ("s0", "s1", "s2")]
        self.live_servers = [server for server in self.all_servers if server.name not in ejected]
        self.counters = PoolCounters()
        self.codec_state: dict = {}

    def server_for_key(self, key: bytes) -> Server:
        return self.live_servers[0]

    def servers_for_keys(self, keys) -> List[Server]:
        return [self.server_for_key(key) for key in keys]


class Session:
    client_id = 1
    authenticated = True
    dialect = 2
    client_name: Optional[bytes] = None


def codec(extra: str = "") -> RedisCodec:
    (config,) = load_text(f"p:\n  listen: 127.0.0.1:1\n  redis: true\n{extra}  servers:\n   - 10.0.0.1:1:1\n")
    return RedisCodec(config)


def routed(args: List[bytes], router: Optional[Router] = None, the_codec: Optional[RedisCodec] = None,
           dialect: int = 2):
    """(request, routes) after prepare and fragment."""
    the_codec = the_codec or codec()
    request = Request(resp.encode_command(args), args)
    request.dialect = dialect
    the_codec.prepare(request, Session())
    assert request.kind == FRAGMENT, request.reply
    routes = the_codec.fragment(request, router or Router())
    return request, routes


def answered(the_codec: RedisCodec, request: Request, routes, replies: List[bytes]) -> bytes:
    """The client's reply once each route's server answered its reply."""
    assert len(routes) == len(replies)
    request.fragments = [part for _, part in routes]
    for (_, part), reply in zip(routes, replies):
        part.parent = request
        part.reply = reply
    return the_codec.coalesce(request)


# -- the SCAN cursor -------------------------------------------------------------

@pytest.mark.parametrize("text, servers, decoded", [
    (b"0", 3, (0, 0)),
    (b"2", 3, (0, 2)),
    (b"%d" % ((77 << 10) | 1), 3, (77, 1)),
    (b"007", 8, (0, 7)),
    (b"%d" % ((1 << 64) - 1), 1024, ((1 << 54) - 1, 1023)),
    (b"3", 3, None),                 # no server 3
    (b"1023", 3, None),
    (b"-1", 3, None),
    (b"+1", 3, None),
    (b"abc", 3, None),
    (b"", 3, None),
    (b"%d" % (1 << 64), 1024, None),  # not a uint64
    (b"1" * 21, 1024, None),
])
def test_decode_cursor(text, servers, decoded) -> None:
    assert redis_keyspace.decode_cursor(text, servers) == decoded


@pytest.mark.parametrize("server_cursor, index, servers, cursor", [
    (0, 0, 3, 1),                    # server 0 done: server 1 from its start
    (0, 1, 3, 2),
    (0, 2, 3, 0),                    # the last server done: the scan is over
    (0, 0, 1, 0),
    (5, 0, 3, 5 << 10),
    (5, 2, 3, (5 << 10) | 2),
    ((1 << 53) - 1, 1023, 1024, (1 << 63) - 1),
    (1 << 53, 0, 3, None),           # would reach 2^63: refused, not wrapped
])
def test_encode_cursor(server_cursor, index, servers, cursor) -> None:
    assert redis_keyspace.encode_cursor(server_cursor, index, servers) == cursor
    if server_cursor and cursor is not None:
        assert redis_keyspace.decode_cursor(b"%d" % cursor, servers) == (server_cursor, index)


def test_scan_goes_to_the_cursors_server_with_its_own_cursor_and_rewrites_the_reply() -> None:
    the_codec = codec()
    router = Router()
    request, routes = routed([b"SCAN", b"%d" % ((9 << 10) | 1), b"MATCH", b"k*", b"COUNT", b"50"], router, the_codec)
    ((server, part),) = routes
    assert server.name == "s1" and isinstance(part, FanoutFragment) and part is not request
    assert part.raw == resp.encode_command([b"SCAN", b"9", b"MATCH", b"k*", b"COUNT", b"50"])
    keys = resp.array([resp.bulk(b"k1"), resp.bulk(b"k2")])
    assert answered(the_codec, request, routes, [b"*2\r\n$2\r\n12\r\n" + keys]) == \
        b"*2\r\n" + resp.bulk(b"%d" % ((12 << 10) | 1)) + keys
    request, routes = routed([b"SCAN", b"1"], router, the_codec)
    assert answered(the_codec, request, routes, [b"*2\r\n$1\r\n0\r\n*0\r\n"]) == b"*2\r\n$1\r\n2\r\n*0\r\n"
    request, routes = routed([b"SCAN", b"2"], router, the_codec)
    assert answered(the_codec, request, routes, [b"*2\r\n$1\r\n0\r\n*0\r\n"]) == b"*2\r\n$1\r\n0\r\n*0\r\n"
    request, routes = routed([b"SCAN", b"0"], router, the_codec)
    huge = b"%d" % (1 << 60)
    assert answered(the_codec, request, routes, [b"*2\r\n$%d\r\n%s\r\n*0\r\n" % (len(huge), huge)]).startswith(
        b"-ERR SCAN cannot go on: server 's0' answered cursor 1152921504606846976, too large")
    assert router.counters.scans == 4


def test_scan_refuses_bad_cursors_and_ejected_servers() -> None:
    for cursor in (b"abc", b"3", b"18446744073709551616"):
        request, routes = routed([b"SCAN", cursor])
        assert (routes, request.kind, request.reply) == ([], LOCAL, b"-ERR invalid cursor\r\n")
    request, routes = routed([b"SCAN", b"1"], Router(ejected=("s1",)))
    assert routes == [] and request.reply.startswith(
        b"-ERR SCAN cannot go on: server 's1' (number 1 of the pool) is ejected")
    request, routes = routed([b"SCAN", b"2"], Router(ejected=("s1",)))   # past it: fine
    assert [server.name for server, _ in routes] == ["s2"]


# -- the other keyspace commands ---------------------------------------------------

def test_keys_dbsize_flush_go_to_every_server_and_merge() -> None:
    the_codec = codec()
    request, routes = routed([b"KEYS", b"*"], the_codec=the_codec)
    assert [server.name for server, _ in routes] == ["s0", "s1", "s2"]
    assert all(part.raw == request.raw for _, part in routes)
    assert answered(the_codec, request, routes, [b"*1\r\n$1\r\na\r\n", b"*0\r\n", b"*2\r\n$1\r\nb\r\n$1\r\nc\r\n"]) \
        == b"*3\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n"
    request, routes = routed([b"DBSIZE"], the_codec=the_codec)
    assert answered(the_codec, request, routes, [b":1\r\n", b":0\r\n", b":41\r\n"]) == b":42\r\n"
    request, routes = routed([b"FLUSHDB", b"ASYNC"], the_codec=the_codec)
    assert answered(the_codec, request, routes, [b"+OK\r\n"] * 3) == b"+OK\r\n"
    request, routes = routed([b"FLUSHALL"], the_codec=the_codec)
    assert answered(the_codec, request, routes, [b"+OK\r\n", b"-ERR Connection refused\r\n", b"+OK\r\n"]) == \
        b"-ERR Connection refused\r\n"


def test_every_server_commands_refuse_while_one_is_ejected() -> None:
    for args in ([b"KEYS", b"*"], [b"DBSIZE"], [b"FLUSHDB"], [b"FUNCTION", b"FLUSH"]):
        request, routes = routed(args, Router(ejected=("s2",)))
        assert routes == [] and request.reply.startswith(b"-ERR " + args[0].upper()), request.reply
        assert b"needs every server of the pool, and server 's2' is ejected" in request.reply


def test_flush_denied_by_the_pool() -> None:
    request, routes = routed([b"flushall", b"sync"], Router("  redis_deny_flush: true\n"))
    assert routes == [] and request.reply == \
        b"-ERR FLUSHALL is denied by twinproxy: the pool sets redis_deny_flush\r\n"


def test_randomkey_prefers_a_key_over_nil() -> None:
    the_codec = codec()
    request, routes = routed([b"RANDOMKEY"], Router(ejected=("s0",)), the_codec)
    assert [server.name for server, _ in routes] == ["s1", "s2"]
    assert answered(the_codec, request, routes, [b"$-1\r\n", b"$1\r\nz\r\n"]) == b"$1\r\nz\r\n"
    request, routes = routed([b"RANDOMKEY"], the_codec=the_codec, dialect=3)
    assert answered(the_codec, request, routes, [b"_\r\n"] * 3) == b"_\r\n"


# -- first live -------------------------------------------------------------------

def test_first_live_skips_ejected_and_down_servers() -> None:
    for router, name in ((Router(), "s0"), (Router(ejected=("s0",)), "s1"), (Router(down=("s0", "s1")), "s2"),
                         (Router(down=("s0", "s1", "s2")), "s0")):
        request, routes = routed([b"TIME"], router)
        assert [server.name for server, _ in routes] == [name]
    request, routes = routed([b"LASTSAVE"], Router(ejected=("s0", "s1", "s2")))
    assert routes == [] and request.reply == b"-ERR no live server in pool 'p'\r\n"


def test_config_get_from_one_server_and_writes_refused() -> None:
    the_codec = codec()
    request, routes = routed([b"CONFIG", b"GET", b"maxmemory"], the_codec=the_codec)
    reply = b"*2\r\n$9\r\nmaxmemory\r\n$1\r\n0\r\n"
    assert len(routes) == 1 and answered(the_codec, request, routes, [reply]) == reply
    request, routes = routed([b"CONFIG", b"rewrite"], the_codec=the_codec)
    assert routes == [] and request.reply.startswith(b"-ERR CONFIG REWRITE is not supported by twinproxy")


def test_command_replies_cached_per_resp_version() -> None:
    the_codec = codec()
    router = Router()
    request, routes = routed([b"COMMAND", b"COUNT"], router, the_codec)
    assert answered(the_codec, request, routes, [b":240\r\n"]) == b":240\r\n"
    request, routes = routed([b"command", b"count"], router, the_codec)
    assert routes == [] and request.reply == b":240\r\n"
    request, routes = routed([b"COMMAND", b"COUNT"], router, the_codec, dialect=3)
    assert len(routes) == 1                                    # RESP3: asked once for itself
    request, routes = routed([b"COMMAND", b"DOCS", b"get"], router, the_codec)
    assert len(routes) == 1 and answered(the_codec, request, routes, [b"*0\r\n"]) == b"*0\r\n"
    request, routes = routed([b"COMMAND", b"DOCS", b"get"], router, the_codec)
    assert len(routes) == 1                                    # named commands: not cached
    request, routes = routed([b"COMMAND", b"GETKEYS", b"GET", b"k"], router, the_codec)
    assert routes == [] and request.reply.startswith(b"-ERR COMMAND GETKEYS")


# -- scripts -----------------------------------------------------------------------

def test_script_exists_is_an_and_per_position() -> None:
    the_codec = codec()
    request, routes = routed([b"SCRIPT", b"EXISTS", b"a" * 40, b"b" * 40, b"c" * 40], the_codec=the_codec)
    assert answered(the_codec, request, routes, [b"*3\r\n:1\r\n:1\r\n:0\r\n", b"*3\r\n:1\r\n:0\r\n:0\r\n",
                                                 b"*3\r\n:1\r\n:1\r\n:0\r\n"]) == b"*3\r\n:1\r\n:0\r\n:0\r\n"
    request, routes = routed([b"SCRIPT", b"EXISTS", b"a" * 40], the_codec=the_codec)
    assert answered(the_codec, request, routes, [b"*1\r\n:1\r\n", b"-ERR Connection refused\r\n",
                                                 b"*1\r\n:1\r\n"]) == b"-ERR Connection refused\r\n"


def test_script_load_remembers_the_body_and_replies_the_sha() -> None:
    the_codec = codec()
    router = Router(ejected=("s1",))
    body = b"return 1"
    sha = redis_scripts.sha1_hex(body)
    assert sha == b"e0e1f9fabfc9d4800c877a703b823ac0578ff8db"   # what Redis 7.0 answered
    request, routes = routed([b"SCRIPT", b"LOAD", body], router, the_codec)
    assert [server.name for server, _ in routes] == ["s0", "s2"]   # every live server
    assert redis_scripts.store_of(router).body(sha.upper()) == body
    assert answered(the_codec, request, routes, [b"-ERR Connection refused\r\n", resp.bulk(sha)]) == resp.bulk(sha)
    assert router.counters.script_loads == 1 and router.counters.fanouts == 1
    request, routes = routed([b"SCRIPT", b"FLUSH", b"ASYNC"], router, the_codec)
    assert len(redis_scripts.store_of(router)) == 0          # flushed scripts are not healed back
    request, routes = routed([b"SCRIPT", b"KILL"], router, the_codec)
    notbusy = b"-NOTBUSY No scripts in execution right now.\r\n"
    assert answered(the_codec, request, routes, [notbusy, notbusy]) == notbusy
    request, routes = routed([b"SCRIPT", b"KILL"], router, the_codec)
    assert answered(the_codec, request, routes, [notbusy, b"+OK\r\n"]) == b"+OK\r\n"


def test_malformed_script_and_function_calls_get_one_servers_error() -> None:
    for args in ([b"SCRIPT", b"LOAD"], [b"SCRIPT", b"NOSUCH"], [b"FUNCTION", b"DELETE"], [b"SCRIPT", b"HELP"],
                 [b"FUNCTION", b"LIST"], [b"FUNCTION", b"DUMP"]):
        request, routes = routed(args)
        assert [server.name for server, _ in routes] == ["s0"], args


def test_function_writes_go_everywhere_and_must_agree() -> None:
    the_codec = codec()
    request, routes = routed([b"FUNCTION", b"LOAD", b"#!lua name=l\n..."], the_codec=the_codec)
    assert len(routes) == 3
    assert answered(the_codec, request, routes, [b"$1\r\nl\r\n"] * 3) == b"$1\r\nl\r\n"
    request, routes = routed([b"FUNCTION", b"DELETE", b"l"], the_codec=the_codec)
    assert answered(the_codec, request, routes, [b"+OK\r\n", b"-ERR Library not found\r\n", b"+OK\r\n"]) == \
        b"-ERR Library not found\r\n"


def test_script_store_is_an_lru_bounded_by_count_and_bytes() -> None:
    store = redis_scripts.ScriptStore(max_scripts=3, max_bytes=100)
    shas = [store.remember(b"return %d" % i) for i in range(3)]
    assert store.body(shas[0]) == b"return 0"               # used: now the newest
    store.remember(b"return 3")
    assert store.body(shas[1]) is None and store.body(shas[0]) is not None and len(store) == 3
    store.remember(b"x" * 95)
    assert len(store) == 1                                  # by bytes: the others went
    store.remember(b"y" * 101)                              # bigger than the whole store: not kept
    assert store.body(redis_scripts.sha1_hex(b"y" * 101)) is None and len(store) == 1


def test_evalsha_of_a_known_body_is_watched_for_noscript() -> None:
    the_codec = codec()
    router = Router()
    request, routes = routed([b"EVAL", b"return 7", b"1", b"k"], router, the_codec)
    assert routes == [(router.live_servers[0], request)]       # routed by its key, unchanged
    sha = redis_scripts.sha1_hex(b"return 7")
    owner = object()
    request = Request(resp.encode_command([b"EVALSHA", sha, b"1", b"k"]), [b"EVALSHA", sha, b"1", b"k"])
    request.owner = owner
    the_codec.prepare(request, Session())
    the_codec.fragment(request, router)
    assert isinstance(request.owner, redis_scripts.ScriptHeal) and request.owner.owner is owner
    unknown = [b"EVALSHA", b"f" * 40, b"1", b"k"]
    request = Request(resp.encode_command(unknown), unknown)
    request.owner = owner
    the_codec.prepare(request, Session())
    the_codec.fragment(request, router)
    assert request.owner is owner                              # nothing to heal with


# -- INFO --------------------------------------------------------------------------

SERVER_A = """# Server\r
redis_version:7.0.15\r
redis_mode:standalone\r
tcp_port:7001\r
uptime_in_seconds:500\r
\r
# Clients\r
connected_clients:2\r
client_recent_max_input_buffer:20480\r
\r
# Memory\r
used_memory:1048576\r
used_memory_human:1.00M\r
used_memory_peak:2097152\r
used_memory_peak_human:2.00M\r
used_memory_peak_perc:50.00%\r
maxmemory_policy:noeviction\r
mem_fragmentation_ratio:1.50\r
\r
# Persistence\r
loading:0\r
rdb_last_save_time:1700000100\r
rdb_last_bgsave_status:ok\r
\r
# Stats\r
total_commands_processed:10\r
instantaneous_input_kbps:0.50\r
\r
# Replication\r
role:master\r
connected_slaves:1\r
slave0:ip=10.0.0.9,port=6379,state=online,offset=5,lag=0\r
\r
# CPU\r
used_cpu_sys:0.100000\r
\r
# Commandstats\r
cmdstat_get:calls=3,usec=30,usec_per_call=10.00,rejected_calls=0,failed_calls=0\r
\r
# Keyspace\r
db0:keys=10,expires=2,avg_ttl=1000\r
"""
SERVER_B = """# Server\r
redis_version:6.2.14\r
redis_mode:standalone\r
tcp_port:7002\r
uptime_in_seconds:50\r
\r
# Clients\r
connected_clients:3\r
client_recent_max_input_buffer:8\r
\r
# Memory\r
used_memory:3145728\r
used_memory_human:3.00M\r
used_memory_peak:3145728\r
used_memory_peak_human:3.00M\r
used_memory_peak_perc:100.00%\r
maxmemory_policy:allkeys-lru\r
mem_fragmentation_ratio:2.25\r
\r
# Persistence\r
loading:1\r
loading_eta_seconds:7\r
rdb_last_save_time:1700000000\r
rdb_last_bgsave_status:err\r
\r
# Stats\r
total_commands_processed:32\r
instantaneous_input_kbps:0.25\r
\r
# Replication\r
role:master\r
connected_slaves:1\r
slave0:ip=10.0.0.8,port=6379,state=online,offset=9,lag=1\r
\r
# CPU\r
used_cpu_sys:0.250000\r
\r
# Commandstats\r
cmdstat_get:calls=1,usec=10,usec_per_call=10.00,rejected_calls=0,failed_calls=1\r
cmdstat_set:calls=2,usec=4,usec_per_call=2.00,rejected_calls=0,failed_calls=0\r
\r
# Keyspace\r
db0:keys=5,expires=6,avg_ttl=3000\r
db3:keys=1,expires=0,avg_ttl=0\r
"""


def test_info_merge_field_by_field() -> None:
    merged = dict((name, dict(fields)) for name, fields in redis_info.merge_info([SERVER_A, SERVER_B]))
    assert list(merged) == ["Server", "Clients", "Memory", "Persistence", "Stats", "Replication", "CPU",
                            "Commandstats", "Keyspace"]
    server = merged["Server"]
    assert server["redis_version"] == "6.2.14"              # the lowest
    assert server["redis_mode"] == "standalone" and server["tcp_port"] == "7001"   # the first's
    assert server["uptime_in_seconds"] == "50"
    assert merged["Clients"] == {"connected_clients": "5", "client_recent_max_input_buffer": "20480"}
    memory = merged["Memory"]
    assert memory["used_memory"] == "4194304" and memory["used_memory_human"] == "4.00M"
    assert memory["used_memory_peak"] == "5242880" and memory["used_memory_peak_human"] == "5.00M"
    assert memory["used_memory_peak_perc"] == "80.00%"
    assert memory["maxmemory_policy"] == "noeviction" and memory["mem_fragmentation_ratio"] == "2.25"
    persistence = merged["Persistence"]
    assert persistence["loading"] == "1" and persistence["loading_eta_seconds"] == "7"
    assert persistence["rdb_last_save_time"] == "1700000000" and persistence["rdb_last_bgsave_status"] == "err"
    assert merged["Stats"] == {"total_commands_processed": "42", "instantaneous_input_kbps": "0.75"}
    assert merged["Replication"] == {"role": "master", "connected_slaves": "2",
                                     "slave0": "ip=10.0.0.9,port=6379,state=online,offset=5,lag=0",
                                     "slave1": "ip=10.0.0.8,port=6379,state=online,offset=9,lag=1"}
    assert merged["CPU"] == {"used_cpu_sys": "0.350000"}
    assert merged["Commandstats"] == {
        "cmdstat_get": "calls=4,usec=40,usec_per_call=10.00,rejected_calls=0,failed_calls=1",
        "cmdstat_set": "calls=2,usec=4,usec_per_call=2.00,rejected_calls=0,failed_calls=0"}
    # avg_ttl weighted by each server's keys with an expiry: (1000*2 + 3000*6) / 8
    assert merged["Keyspace"] == {"db0": "keys=15,expires=8,avg_ttl=2500", "db3": "keys=1,expires=0,avg_ttl=0"}


def test_info_reply_in_both_resp_versions_with_the_proxy_section() -> None:
    the_codec = codec()
    router = Router(ejected=("s2",))
    text_a = b"# Keyspace\r\ndb0:keys=1,expires=0,avg_ttl=0\r\n"
    text_b = b"# Keyspace\r\ndb0:keys=2,expires=0,avg_ttl=0\r\n"
    request, routes = routed([b"INFO"], router, the_codec)
    assert [server.name for server, _ in routes] == ["s0", "s1"]
    reply = answered(the_codec, request, routes, [resp.bulk(text_a), resp.bulk(text_b)])
    text = redis_info.info_text(reply)
    assert reply.startswith(b"$")
    assert text.startswith(b"# Keyspace\r\ndb0:keys=3,expires=0,avg_ttl=0\r\n\r\n# Proxy\r\n")
    assert b"\r\npool:p\r\nservers:3\r\nservers_asked:2\r\nservers_answered:2\r\n" in text
    request, routes = routed([b"INFO", b"keyspace"], router, the_codec, dialect=3)
    verbatim = [b"=%d\r\ntxt:%s\r\n" % (len(text) + 4, text) for text in (text_a, text_b)]
    reply = answered(the_codec, request, routes, [verbatim[0], b"-ERR Connection refused\r\n"])
    assert reply == b"=%d\r\ntxt:%s\r\n" % (len(text_a) + 4, text_a)   # no proxy section asked for
    request, routes = routed([b"INFO", b"proxy"], router, the_codec)
    reply = answered(the_codec, request, routes, [b"$0\r\n\r\n", b"-ERR Connection refused\r\n"])
    assert b"servers_answered:1\r\nserver0:name=s0,redis_version=unknown\r\n" \
           b"server1:name=s1,error=ERR Connection refused\r\n" in reply
    request, routes = routed([b"INFO"], router, the_codec)
    assert answered(the_codec, request, routes, [b"-ERR a\r\n", b"-ERR b\r\n"]) == b"-ERR a\r\n"


def test_info_text_reads_bulk_and_verbatim() -> None:
    assert redis_info.info_text(b"$3\r\nabc\r\n") == b"abc"
    assert redis_info.info_text(b"=7\r\ntxt:abc\r\n") == b"abc"
    assert redis_info.info_text(b"=7\r\nmkd:abc\r\n") is None
    assert redis_info.info_text(b"-ERR x\r\n") is None
    assert redis_info.info_text(b"$9\r\nabc\r\n") is None
