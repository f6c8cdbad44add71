"""The Redis codec's key extraction from Redis's generated key specs: every key checked, containers, refusals."""

from typing import List

import pytest

from tests.unit.protocols.test_redis_codec import Router, codec, prepared
from twinproxy.protocols.redis_commands import COMMANDS
from twinproxy.protocols.redis_specs import KEYLESS, REJECTED, SINGLE
from twinproxy.request import BLOCK, FORWARD, FRAGMENT, LOCAL

SPREAD = b"-ERR keys in request don't hash to the same server"


def routed(args: List[bytes], router=None):
    """``args`` prepared and, if it needs it, routed: (request, routes)."""
    the_codec = codec()
    request = prepared(args, the_codec=the_codec)
    routes = the_codec.fragment(request, router or Router()) if request.kind == FRAGMENT else None
    return request, routes


@pytest.mark.parametrize("args", [
    [b"ZUNIONSTORE", b"b", b"2", b"a1", b"a2"],           # the destination, on B
    [b"ZINTERSTORE", b"b", b"1", b"a1"],
    [b"ZDIFFSTORE", b"b", b"1", b"a1"],
    [b"SORT", b"a", b"BY", b"w_*", b"STORE", b"b"],
    [b"SORT", b"a", b"STORE", b"a2", b"STORE", b"b"],     # the last STORE is the one written
    [b"GEORADIUS", b"a", b"15", b"37", b"200", b"km", b"STORE", b"b"],
    [b"GEORADIUS", b"a", b"15", b"37", b"200", b"km", b"STORE", b"a2", b"STORE", b"b"],  # Redis's specs miss b
    [b"GEORADIUSBYMEMBER", b"a", b"m", b"10", b"km", b"STOREDIST", b"b"],
    [b"GEOSEARCHSTORE", b"b", b"a", b"FROMMEMBER", b"m", b"BYRADIUS", b"1", b"km"],
    [b"XREAD", b"COUNT", b"1", b"STREAMS", b"a", b"b", b"0", b"0"],
    [b"XREADGROUP", b"GROUP", b"g", b"c", b"STREAMS", b"a", b"b", b">", b">"],
    [b"BITOP", b"AND", b"b", b"a1", b"a2"],
    [b"LMPOP", b"2", b"a", b"b", b"LEFT"],
    [b"COPY", b"a", b"b", b"REPLACE"],
])
def test_every_key_is_checked_for_one_server(args) -> None:
    request, routes = routed(args)
    assert routes == [] and request.reply.startswith(SPREAD), request.reply


def test_keys_on_one_server_forward_whole_with_every_position() -> None:
    request, routes = routed([b"ZUNIONSTORE", b"a", b"2", b"a1", b"a2", b"WEIGHTS", b"1", b"2"])
    assert routes == [("A", request)] and (request.kind, request.key) == (FORWARD, b"a")
    assert request.positions == [1, 3, 4]   # a migrating slot moves the destination too
    request, routes = routed([b"GEORADIUS", b"a", b"15", b"37", b"200", b"km", b"STORE", b"a2", b"STORE", b"a3"])
    assert routes == [("A", request)] and request.positions == [1, 7, 9]


def test_xread_without_block_is_routed_by_its_streams() -> None:
    request, routes = routed([b"XREAD", b"COUNT", b"1", b"STREAMS", b"b1", b"b2", b"0", b"0"])
    assert routes == [("B", request)] and request.key == b"b1"
    request, routes = routed([b"xreadgroup", b"GROUP", b"block", b"c", b"STREAMS", b"a", b">"])
    assert routes == [("A", request)]


@pytest.mark.parametrize("args", [
    [b"XREAD", b"BLOCK", b"0", b"STREAMS", b"a", b"0"],
    [b"xread", b"count", b"1", b"block", b"10", b"streams", b"a", b"$"],
    [b"XREADGROUP", b"GROUP", b"g", b"c", b"BLOCK", b"0", b"STREAMS", b"a", b">"],
])
def test_xread_with_block_is_a_blocking_command(args) -> None:
    """With BLOCK it runs on a leased connection (tests/unit/protocols/test_redis_blocking.py)."""
    request, routes = routed(args)
    assert routes is None and request.kind == BLOCK and request.reply is None


@pytest.mark.parametrize("args, key", [
    ([b"OBJECT", b"ENCODING", b"k"], b"k"),
    ([b"object", b"freq", b"k"], b"k"),
    ([b"MEMORY", b"USAGE", b"k", b"SAMPLES", b"5"], b"k"),
    ([b"XINFO", b"STREAM", b"s", b"FULL"], b"s"),
    ([b"XGROUP", b"CREATE", b"s", b"g", b"$", b"MKSTREAM"], b"s"),
])
def test_container_subcommands_forward_by_their_key(args, key) -> None:
    request = prepared(args)
    assert (request.kind, request.key) == (FORWARD, key)
    assert request.name == args[0].lower().decode()   # counted under the container, as before
    assert not request.command.readonly             # containers stay on the master


@pytest.mark.parametrize("args", [[b"OBJECT", b"HELP"], [b"memory", b"help"], [b"XINFO", b"HELP"],
                                  [b"XGROUP", b"help"]])
def test_help_subcommands_go_to_the_first_live_server(args) -> None:
    request, routes = routed(args)
    assert request.command.layout is KEYLESS
    assert routes == [("A", request)] and request.kind == FORWARD

    class NoServer(Router):
        live_servers = ()

    request, routes = routed(args, NoServer())
    assert routes == [] and request.reply == b"-ERR no live server in pool 'p'\r\n"


@pytest.mark.parametrize("sub", [b"STATS", b"DOCTOR", b"MALLOC-STATS", b"PURGE"])
def test_memory_about_one_server_is_refused(sub) -> None:
    request = prepared([b"MEMORY", sub])
    assert request.kind == LOCAL and request.reply == (
        b"-ERR command 'MEMORY %s' is not supported by twinproxy: it reports on (or acts on) one server; "
        b"ask the backends directly\r\n" % sub)


@pytest.mark.parametrize("args, reply", [
    ([b"OBJECT"], b"-ERR wrong number of arguments for 'object' command\r\n"),
    ([b"OBJECT", b"ENCODING"], b"-ERR wrong number of arguments for 'object|encoding' command\r\n"),
    ([b"OBJECT", b"HELP", b"x"], b"-ERR wrong number of arguments for 'object|help' command\r\n"),
    ([b"OBJECT", b"NOSUCH", b"k"], b"-ERR unknown subcommand 'NOSUCH'. Try OBJECT HELP.\r\n"),
    ([b"xinfo", b"x\r\ny"], b"-ERR unknown subcommand 'x  y'. Try XINFO HELP.\r\n"),
    ([b"NOSUCH"], b"-ERR unknown command 'NOSUCH', with args beginning with: \r\n"),
    ([b"nosuch", b"a", b"b"], b"-ERR unknown command 'nosuch', with args beginning with: 'a' 'b' \r\n"),
    ([b"ZUNIONSTORE", b"d", b"0", b"a"], b"-ERR at least 1 input key is needed for 'zunionstore' command\r\n"),
    ([b"ZUNIONSTORE", b"d", b"x", b"a"], b"-ERR value is not an integer or out of range\r\n"),
    ([b"SINTERCARD", b"-1", b"a"], b"-ERR numkeys should be greater than 0\r\n"),
    ([b"EVAL", b"s", b"-1"], b"-ERR Number of keys can't be negative\r\n"),
    ([b"FCALL", b"f", b"x"], b"-ERR Bad number of keys provided\r\n"),
    ([b"XREAD", b"COUNT", b"1", b"STREAMS", b"a"],
     b"-ERR Unbalanced XREAD list of streams: for each stream key an ID or '$' must be specified.\r\n"),
    ([b"RENAME", b"a"], b"-ERR wrong number of arguments for 'rename' command\r\n"),
    ([b"MGET"], b"-ERR wrong number of arguments for 'mget' command\r\n"),
    ([b"MSET", b"a", b"1", b"b"], b"-ERR wrong number of arguments for 'mset' command\r\n"),
    ([b"EVAL", b"s", b"0"], b"-ERR EVAL with no keys cannot be routed by twinproxy: pass the keys it uses "
                            b"(numkeys >= 1)\r\n"),
    ([b"PFDEBUG", b"GETREG", b"k"], b"-ERR command 'PFDEBUG' is not supported by twinproxy: it is Redis's "
                                    b"internal or debugging command\r\n"),
])
def test_answered_with_redis_text(args, reply) -> None:
    request, _ = routed(args)
    assert (request.kind, request.reply) == (LOCAL, reply)


def test_every_redis_command_is_known() -> None:
    """A command Redis 7 has is never 'unknown': it is routed, answered or refused by name."""
    commands = codec().commands
    missing = sorted(name for name in COMMANDS if "|" not in name and name.encode() not in commands)
    assert missing == []


def test_layouts_agree_with_redis_key_specs() -> None:
    for name, spec in codec().commands.items():
        if spec.layout is SINGLE:
            assert spec.keys.single == spec.first, name
        for sub, child in (spec.children or {}).items():
            assert child.layout in (SINGLE, KEYLESS, REJECTED), (name, sub)
