"""The Redis codec: classification, local replies, splitting and merging."""

from __future__ import annotations

from typing import List, Optional

import pytest

from twinproxy.config import load_text
from twinproxy.protocols import resp
from twinproxy.protocols.redis import RedisCodec
from twinproxy.request import FORWARD, FRAGMENT, LOCAL, Request


class Session:
    def __init__(self, authenticated: bool = True) -> None:
        self.client_id = 7
        self.authenticated = authenticated
        self.dialect = 2
        self.client_name: Optional[bytes] = None


class Router:
    """Keys starting with 'a' live on server A, the rest on B."""

    live_servers = ("A", "B")

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
    ([b"KEYS", b"*"], b"-ERR command 'KEYS' is not supported by twinproxy"),
    ([b"MULTI"], b"-ERR command 'MULTI' is not supported"),
    ([b"SUBSCRIBE", b"c"], b"-ERR command 'SUBSCRIBE' is not supported"),
    ([b"CONFIG", b"GET", b"x"], b"-ERR command 'CONFIG' is not supported"),
    ([b"NOSUCH"], b"-ERR unknown or unsupported command 'NOSUCH'"),
    ([b"GET"], b"-ERR wrong number of arguments for 'get' command"),
    ([b"SELECT", b"1"], b"-ERR SELECT is not allowed"),
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
    assert prepared([b"PING"], session, the_codec).reply == b"+PONG\r\n"
    assert prepared([b"AUTH", b"pw"], session, the_codec).reply == b"+OK\r\n"
    assert session.authenticated
    assert prepared([b"GET", b"k"], session, the_codec).kind == FORWARD


def test_auth_without_password_configured() -> None:
    assert prepared([b"AUTH", b"x"]).reply.startswith(b"-ERR AUTH <password> called without any password")


def test_hello_switches_dialect_and_authenticates() -> None:
    the_codec = codec("  redis_auth: pw\n")
    session = Session(authenticated=False)
    assert prepared([b"HELLO", b"3"], session, the_codec).reply.startswith(b"-NOAUTH")
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
