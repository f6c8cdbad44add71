"""The Redis codec: classification, local replies, splitting and merging."""

from __future__ import annotations

from typing import List, Optional

import pytest

from twinproxy.config import load_text
from twinproxy.protocols import redis_keys, redis_specs, resp
from twinproxy.protocols.redis import RedisCodec
from twinproxy.request import FORWARD, FRAGMENT, LOCAL, Request

from .sessions import FakeSession as Session


class Router:
    """Keys starting with 'a' live on server A, the rest on B."""

    live_servers = ("A", "B")
    all_servers = ("A", "B")

    def __init__(self) -> None:
        from twinproxy.stats import PoolCounters

        self.counters = PoolCounters()
        self.codec_state: dict = {}
        (self.config,) = load_text("p:\n  listen: 127.0.0.1:1\n  redis: true\n  servers:\n   - 10.0.0.1:1:1\n")

    def server_for_key(self, key: bytes) -> str:
        return "A" if key.startswith(b"a") else "B"

    def servers_for_keys(self, keys: List[bytes]) -> List[str]:
        return [self.server_for_key(key) for key in keys]


def codec(extra: str = "") -> RedisCodec:
    (config,) = load_text(f"p:\n  listen: 127.0.0.1:1\n  redis: true\n{extra}  servers:\n   - 10.0.0.1:1:1\n")
    return RedisCodec(config)


def prepared(args: List[bytes], session: Optional[Session] = None, the_codec: Optional[RedisCodec] = None):
    request = Request(resp.encode_command(args), args)
    (the_codec or codec()).prepare(request, session or Session())
    return request


def test_single_key_commands_forward_by_key() -> None:
    request = prepared([b"GET", b"k"])
    assert (request.kind, request.key) == (FORWARD, b"k")
    assert prepared([b"object", b"encoding", b"k2"]).key == b"k2"
    assert prepared([b"HSET", b"h", b"f", b"v"]).key == b"h"


@pytest.mark.parametrize("args, reply", [
    ([b"PING"], b"+PONG\r\n"),
    ([b"ping", b"hi"], b"$2\r\nhi\r\n"),
    ([b"ECHO", b"x"], b"$1\r\nx\r\n"),
    ([b"SELECT", b"0"], b"+OK\r\n"),
    ([b"CLIENT", b"SETINFO", b"LIB-NAME", b"redis-py"], b"+OK\r\n"),
    ([b"CLIENT", b"ID"], b":7\r\n"),
    ([b"CLIENT", b"GETNAME"], b"$-1\r\n"),
    ([b"QUIT"], b"+OK\r\n"),
])
def test_local_replies(args, reply) -> None:
    request = prepared(args)
    assert (request.kind, request.reply) == (LOCAL, reply)


@pytest.mark.parametrize("args, text", [
    ([b"SWAPDB", b"0", b"1"], b"-ERR command 'SWAPDB' is not supported by twinproxy"),
    ([b"WAIT", b"1", b"0"], b"-ERR command 'WAIT' is not supported"),
    ([b"CONFIG", b"SET", b"x", b"1"], b"-ERR CONFIG SET is not supported by twinproxy"),
    ([b"config", b"resetstat"], b"-ERR CONFIG RESETSTAT is not supported by twinproxy"),
    ([b"SCRIPT", b"DEBUG", b"yes"], b"-ERR SCRIPT DEBUG is not supported by twinproxy"),
    ([b"NOSUCH"], b"-ERR unknown command 'NOSUCH', with args beginning with: \r\n"),
    ([b"GET"], b"-ERR wrong number of arguments for 'get' command"),
    ([b"SELECT", b"16"], b"-ERR DB index is out of range"),
    ([b"SWAPDB", b"0", b"1"], b"-ERR command 'SWAPDB' is not supported by twinproxy: each server"),
    ([b"MSET", b"a", b"1", b"b"], b"-ERR wrong number of arguments for 'mset' command"),
    ([b"EVAL", b"s", b"0"], b"-ERR EVAL with no keys cannot be routed"),
    ([b"EVAL", b"s", b"3", b"a"], b"-ERR Number of keys can't be greater than number of args"),
])
def test_refusals_name_the_command(args, text) -> None:
    the_codec = codec()
    request = prepared(args, the_codec=the_codec)
    if request.kind == FRAGMENT:  # key checks happen when routing
        assert the_codec.fragment(request, Router()) == []
    assert request.kind == LOCAL and request.reply.startswith(text), request.reply


def test_quit_closes_after_reply() -> None:
    assert prepared([b"QUIT"]).close_after


def test_auth_gate() -> None:
    the_codec = codec("  redis_auth: pw\n")
    session = Session(authenticated=False)
    assert prepared([b"GET", b"k"], session, the_codec).reply == b"-NOAUTH Authentication required.\r\n"
    assert prepared([b"AUTH", b"nope"], session, the_codec).reply.startswith(b"-WRONGPASS")
    assert not session.authenticated
    assert prepared([b"PING"], session, the_codec).reply == b"-NOAUTH Authentication required.\r\n"
    assert prepared([b"AUTH", b"pw"], session, the_codec).reply == b"+OK\r\n"
    assert session.authenticated
    assert prepared([b"GET", b"k"], session, the_codec).kind == FORWARD
    assert prepared([b"AUTH", b"nope"], session, the_codec).reply.startswith(b"-WRONGPASS")
    assert session.authenticated  # as in Redis, a failed AUTH does not log the client out


@pytest.mark.parametrize("args, reply", [
    # Redis's processCommand order: subcommand, then argument count, then NOAUTH.
    ([b"PING"], b"-NOAUTH Authentication required.\r\n"),
    ([b"PING", b"a", b"b"], b"-NOAUTH Authentication required.\r\n"),
    ([b"ECHO"], b"-ERR wrong number of arguments for 'echo' command\r\n"),
    ([b"get", b"a", b"b"], b"-ERR wrong number of arguments for 'get' command\r\n"),
    ([b"SET", b"k"], b"-ERR wrong number of arguments for 'set' command\r\n"),
    ([b"KEYS"], b"-ERR wrong number of arguments for 'keys' command\r\n"),
    ([b"KEYS", b"*"], b"-NOAUTH Authentication required.\r\n"),
    ([b"CLIENT"], b"-ERR wrong number of arguments for 'client' command\r\n"),
    ([b"CLIENT", b"SETNAME"], b"-ERR wrong number of arguments for 'client|setname' command\r\n"),
    ([b"CLIENT", b"SETNAME", b"a b"], b"-NOAUTH Authentication required.\r\n"),
    ([b"client", b"nosuch"], b"-ERR unknown subcommand 'nosuch'. Try CLIENT HELP.\r\n"),
    ([b"object", b"x\r\ny"], b"-ERR unknown subcommand 'x  y'. Try OBJECT HELP.\r\n"),
    ([b"OBJECT", b"ENCODING"], b"-ERR wrong number of arguments for 'object|encoding' command\r\n"),
    ([b"COMMAND"], b"-NOAUTH Authentication required.\r\n"),
    ([b"CONFIG", b"NOSUCH"], b"-ERR unknown subcommand 'NOSUCH'. Try CONFIG HELP.\r\n"),
    ([b"SCRIPT", b"LOAD"], b"-ERR wrong number of arguments for 'script|load' command\r\n"),
    ([b"ACL", b"NOSUCH"], b"-NOAUTH Authentication required.\r\n"),  # no subcommand list for refused ones
    ([b"AUTH"], b"-ERR wrong number of arguments for 'auth' command\r\n"),
    ([b"AUTH", b"a", b"b", b"c"], b"-ERR syntax error\r\n"),
    ([b"QUIT", b"now"], b"+OK\r\n"),
    ([b"NOSUCH", b"x"], b"-ERR unknown command 'NOSUCH', with args beginning with: 'x' \r\n"),
])
def test_before_auth_as_redis_orders_its_checks(args, reply) -> None:
    request = prepared(args, Session(authenticated=False), codec("  redis_auth: pw\n"))
    assert (request.kind, request.reply) == (LOCAL, reply)


def test_reset_is_served_before_auth_and_logs_out() -> None:
    session = Session(authenticated=True, requires_auth=True)
    request = prepared([b"RESET"], session, codec("  redis_auth: pw\n"))
    assert (request.reply, session.resets, session.authenticated) == (b"+RESET\r\n", 1, False)
    request = prepared([b"RESET"], session, codec("  redis_auth: pw\n"))
    assert (request.reply, session.resets) == (b"+RESET\r\n", 2)   # no_auth, as in Redis


def test_every_command_has_redis_arity() -> None:
    the_codec = codec()
    assert set(redis_specs.arities(redis_specs.ARITY)) == set(the_codec.commands)
    assert the_codec.commands[b"get"].arity == 2 and the_codec.commands[b"set"].arity == -3
    assert the_codec.commands[b"client"].subcommands[b"setinfo"] == 4


def test_auth_without_password_configured() -> None:
    assert prepared([b"AUTH", b"x"]).reply.startswith(b"-ERR AUTH <password> called without any password")
    assert prepared([b"AUTH", b"default", b"x"]).reply == b"+OK\r\n"  # the default user is nopass
    assert prepared([b"AUTH", b"someuser", b"x"]).reply.startswith(b"-WRONGPASS")


@pytest.mark.parametrize("text, value", [
    (b"0", 0), (b"3", 3), (b"-1", -1), (b"9223372036854775807", 2 ** 63 - 1), (b"-9223372036854775808", -2 ** 63),
    (b"03", None), (b"-0", None), (b"+3", None), (b"", None), (b"-", None), (b" 3", None), (b"1_0", None),
    (b"9223372036854775808", None),
])
def test_integers_read_as_redis_reads_them(text, value) -> None:
    assert redis_keys.long_long(text) == value


def test_hello_version_as_redis_parses_it() -> None:
    assert prepared([b"HELLO", b"03"]).reply == b"-ERR Protocol version is not an integer or out of range\r\n"
    assert prepared([b"HELLO", b"-1"]).reply == b"-NOPROTO unsupported protocol version\r\n"
    assert prepared([b"HELLO", b"99999999999999999999"]).reply.startswith(b"-ERR Protocol version")
    assert prepared([b"SELECT", b"00"]).reply == b"-ERR value is not an integer or out of range\r\n"


def test_hello_auth_logs_in_even_if_a_later_option_fails() -> None:
    the_codec = codec("  redis_auth: pw\n")
    session = Session(authenticated=False)
    reply = prepared([b"HELLO", b"3", b"AUTH", b"default", b"pw", b"BOGUS"], session, the_codec).reply
    assert reply == b"-ERR Syntax error in HELLO option 'BOGUS'\r\n"
    assert (session.authenticated, session.dialect) == (True, 2)
    session = Session(authenticated=False)
    reply = prepared([b"HELLO", b"3", b"SETNAME", b"a b", b"AUTH", b"default", b"pw"], session, the_codec).reply
    assert reply.startswith(b"-ERR Client names cannot contain") and not session.authenticated


def test_hello_switches_dialect_and_authenticates() -> None:
    the_codec = codec("  redis_auth: pw\n")
    session = Session(authenticated=False)
    assert prepared([b"HELLO", b"3"], session, the_codec).reply == (
        b"-NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO AUTH "
        b"<user> <pass> option can be used to authenticate the client and select the RESP protocol version "
        b"at the same time\r\n")
    reply = prepared([b"HELLO", b"3", b"AUTH", b"default", b"pw", b"SETNAME", b"me"], session, the_codec).reply
    assert reply.startswith(b"%7\r\n") and b"twinproxy" in reply
    assert (session.dialect, session.authenticated, session.client_name) == (3, True, b"me")
    assert prepared([b"HELLO", b"4"], session, the_codec).reply.startswith(b"-NOPROTO")
    assert prepared([b"HELLO", b"2"], session, the_codec).reply.startswith(b"*14\r\n")
    assert session.dialect == 2


def test_handshake_per_dialect() -> None:
    the_codec = codec("  redis_auth: pw\n  redis_db: 2\n")
    assert the_codec.handshake(2) == [resp.encode_command([b"AUTH", b"pw"]), resp.encode_command([b"SELECT", b"2"])]
    assert the_codec.handshake(3)[1] == resp.encode_command([b"HELLO", b"3"])
    assert codec().handshake(2) == []


def test_handshake_sends_the_whole_password_and_the_acl_user() -> None:
    assert codec("  redis_auth: pass word\n").handshake(2) == [b"*2\r\n$4\r\nAUTH\r\n$9\r\npass word\r\n"]
    assert codec("  redis_auth: pass word\n  redis_auth_user: alice\n").handshake(3) == [
        b"*3\r\n$4\r\nAUTH\r\n$5\r\nalice\r\n$9\r\npass word\r\n", b"*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n"]


@pytest.mark.parametrize("extra, args, accepted", [
    ("  redis_auth: pass word\n", [b"AUTH", b"pass word"], True),
    ("  redis_auth: pass word\n", [b"AUTH", b"pass", b"word"], False),     # never split: no user "pass"
    ("  redis_auth: pass word\n", [b"AUTH", b"default", b"pass word"], True),
    ("  redis_auth: pw\n  redis_auth_user: alice\n", [b"AUTH", b"pw"], True),
    ("  redis_auth: pw\n  redis_auth_user: alice\n", [b"AUTH", b"alice", b"pw"], True),
    ("  redis_auth: pw\n  redis_auth_user: alice\n", [b"AUTH", b"default", b"pw"], True),
    ("  redis_auth: pw\n  redis_auth_user: alice\n", [b"AUTH", b"bob", b"pw"], False),
    ("  redis_auth: pw\n  redis_auth_user: alice\n", [b"AUTH", b"alice", b"nope"], False),
    ("  redis_auth: pw\n  redis_auth_user: alice\n", [b"HELLO", b"3", b"AUTH", b"alice", b"pw"], True),
    ("  redis_auth: pw\n  redis_auth_user: alice\n", [b"HELLO", b"3", b"AUTH", b"default", b"pw"], True),
    ("  redis_auth: pw\n  redis_auth_user: alice\n", [b"HELLO", b"3", b"AUTH", b"bob", b"pw"], False),
])
def test_client_auth_forms(extra: str, args: List[bytes], accepted: bool) -> None:
    session = Session(authenticated=False)
    reply = prepared(args, session, codec(extra)).reply
    assert session.authenticated is accepted
    assert reply.startswith(b"+OK" if args[0] == b"AUTH" else b"%7") if accepted else reply.startswith(b"-WRONGPASS")


def test_mget_split_and_merged_in_key_order() -> None:
    the_codec = codec()
    request = prepared([b"MGET", b"a1", b"b1", b"a2", b"b2"], the_codec=the_codec)
    assert request.kind == FRAGMENT
    routes = the_codec.fragment(request, Router())
    assert [(server, f.raw) for server, f in routes] == [
        ("A", resp.encode_command([b"MGET", b"a1", b"a2"])), ("B", resp.encode_command([b"MGET", b"b1", b"b2"]))]
    request.fragments = [f for _, f in routes]
    routes[0][1].reply = b"*2\r\n$2\r\nA1\r\n$-1\r\n"
    routes[1][1].reply = b"*2\r\n$2\r\nB1\r\n$2\r\nB2\r\n"
    assert the_codec.coalesce(request) == b"*4\r\n$2\r\nA1\r\n$2\r\nB1\r\n$-1\r\n$2\r\nB2\r\n"


def test_mset_and_del_merges() -> None:
    the_codec = codec()
    mset = prepared([b"MSET", b"a", b"1", b"b", b"2", b"ax", b"3"], the_codec=the_codec)
    routes = the_codec.fragment(mset, Router())
    assert [f.raw for _, f in routes] == [resp.encode_command([b"MSET", b"a", b"1", b"ax", b"3"]),
                                          resp.encode_command([b"MSET", b"b", b"2"])]
    mset.fragments = [f for _, f in routes]
    for fragment in mset.fragments:
        fragment.reply = b"+OK\r\n"
    assert the_codec.coalesce(mset) == b"+OK\r\n"
    delete = prepared([b"DEL", b"a", b"b"], the_codec=the_codec)
    routes = the_codec.fragment(delete, Router())
    delete.fragments = [f for _, f in routes]
    delete.fragments[0].reply, delete.fragments[1].reply = b":1\r\n", b":0\r\n"
    assert the_codec.coalesce(delete) == b":1\r\n"
    delete.fragments[1].reply = b"-ERR oops\r\n"
    assert the_codec.coalesce(delete) == b"-ERR oops\r\n"


def test_keys_on_one_server_forward_unchanged() -> None:
    the_codec = codec()
    request = prepared([b"MGET", b"a1", b"a2"], the_codec=the_codec)
    assert the_codec.fragment(request, Router()) == [("A", request)]
    assert (request.kind, request.key) == (FORWARD, b"a1")


def test_same_server_commands_refuse_spread_keys() -> None:
    the_codec = codec()
    request = prepared([b"RENAME", b"a", b"b"], the_codec=the_codec)
    assert the_codec.fragment(request, Router()) == []
    assert request.reply.startswith(b"-ERR keys in request don't hash to the same server")
    request = prepared([b"EVAL", b"return 1", b"2", b"a1", b"a2", b"argv"], the_codec=the_codec)
    assert the_codec.fragment(request, Router()) == [("A", request)]


@pytest.mark.parametrize("reply", [b"+OK\r\n", b":1\r\n", b"$1\r\nv\r\n", b"*0\r\n", b"_\r\n", b"%0\r\n",
                                   b"-ERR wrong\r\n", b"-MOVED 1 a:1\r\n", b"!3\r\nbad\r\n"])
def test_error_starts_match_is_error(reply: bytes) -> None:
    the_codec = codec()
    starts_like_error = reply[:the_codec.error_start_width] in the_codec.error_starts
    assert starts_like_error == the_codec.is_error(reply)
