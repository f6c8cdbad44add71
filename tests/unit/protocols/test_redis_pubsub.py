"""The pure half of pub/sub: channel routing, classification, PUBSUB's fan-out and merges, frames."""

from __future__ import annotations

from types import SimpleNamespace
from typing import List, Optional

import pytest

from twinproxy.config import load_text
from twinproxy.protocols import redis_pubsub
from twinproxy.protocols.redis import RedisCodec
from twinproxy.protocols.resp import RespRequestParser
from twinproxy.request import FORWARD, FRAGMENT, LOCAL, SESSION, Request

POOL = "alpha:\n  listen: 127.0.0.1:1\n  redis: true\n  servers:\n   - 127.0.0.1:6379:1\n"


class Session:
    def __init__(self) -> None:
        self.client_id = 1
        self.authenticated = True
        self.dialect = 2
        self.client_name: Optional[bytes] = None
        self.mode: Optional[str] = None
        self.transaction = None
        self.prepare = None


class Router:
    """Channels starting with 'a' (or keys naming them) live on A, the rest on B."""

    live_servers = ("A", "B")
    all_servers = ("A", "B")
    config = SimpleNamespace(name="alpha")

    def __init__(self) -> None:
        self.counters = SimpleNamespace(fanouts=0)

    def server_for_key(self, key: bytes) -> str:
        return "A" if key.startswith(b"a") else "B"

    def servers_for_keys(self, keys: List[bytes]) -> List[str]:
        return [self.server_for_key(key) for key in keys]


CODEC = RedisCodec(load_text(POOL)[0])


def prepared(*args: bytes, session: Optional[Session] = None) -> Request:
    parser = RespRequestParser()
    parser.feed(b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args))
    request = parser.next()
    session = session or Session()
    (session.prepare or CODEC.prepare)(request, session)
    return request


@pytest.mark.parametrize("channel, key", [
    (b"news", b"news"),
    (b"__keyspace@0__:user:1", b"user:1"),
    (b"__keyspace@12__:a__:b", b"a__:b"),
    (b"__keyspace@x__:k", b"__keyspace@x__:k"),   # not a database number: an ordinary channel
    (b"__keyevent@0__:expired", None),
])
def test_channel_key(channel: bytes, key: Optional[bytes]) -> None:
    assert redis_pubsub.channel_key(channel) == key


def test_publish_routes_by_channel_and_keyspace_channels_by_key() -> None:
    request = prepared(b"PUBLISH", b"__keyspace@0__:k1", b"m")
    assert (request.kind, request.key) == (FORWARD, b"k1")
    request = prepared(b"SPUBLISH", b"{t}x", b"m")
    assert (request.kind, request.key) == (FORWARD, b"{t}x")
    request = prepared(b"PUBLISH", b"__keyevent@0__:expired", b"m")   # one server: every subscriber hears it once
    assert (request.kind, request.key) == (FORWARD, b"__keyevent@0__:expired")


@pytest.mark.parametrize("command", [b"SUBSCRIBE", b"PSUBSCRIBE", b"SSUBSCRIBE", b"UNSUBSCRIBE", b"PUNSUBSCRIBE",
                                     b"SUNSUBSCRIBE"])
def test_subscriptions_go_to_the_session(command: bytes) -> None:
    assert prepared(command, b"c").kind == SESSION


@pytest.mark.parametrize("args, reply", [
    ((b"SUBSCRIBE",), b"-ERR wrong number of arguments for 'subscribe' command\r\n"),
    ((b"PUBLISH", b"a"), b"-ERR wrong number of arguments for 'publish' command\r\n"),
    ((b"PUBSUB",), b"-ERR wrong number of arguments for 'pubsub' command\r\n"),
    ((b"PUBSUB", b"nope"), b"-ERR unknown subcommand 'nope'. Try PUBSUB HELP.\r\n"),
    ((b"PUBSUB", b"NUMPAT", b"x"), b"-ERR wrong number of arguments for 'pubsub|numpat' command\r\n"),
    ((b"PUBSUB", b"SHARDCHANNELS", b"a", b"b"),
     b"-ERR unknown subcommand or wrong number of arguments for 'SHARDCHANNELS'. Try PUBSUB HELP.\r\n"),
    ((b"PUBSUB", b"NUMSUB"), b"*0\r\n"),
])
def test_answered_at_once(args, reply: bytes) -> None:
    request = prepared(*args)
    if request.kind == FRAGMENT:   # PUBSUB: checked by its fan-out planner, when routed
        assert CODEC.fragment(request, Router()) == []
    assert (request.kind, request.reply) == (LOCAL, reply)


def test_resp2_subscribed_mode_gate_comes_after_redis_own_checks() -> None:
    session = Session()
    session.mode = redis_pubsub.SUBSCRIBED
    CODEC.mode_changed(session)
    assert session.prepare == CODEC.prepare_subscribed
    assert prepared(b"GET", b"k", session=session).reply.startswith(b"-ERR Can't execute 'get': only (P|S)")
    assert prepared(b"GET", session=session).reply == b"-ERR wrong number of arguments for 'get' command\r\n"
    assert prepared(b"PUBSUB", b"NUMSUB", session=session).reply.startswith(b"-ERR Can't execute 'pubsub|numsub'")
    assert prepared(b"PING", session=session).reply == b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"
    assert prepared(b"SUBSCRIBE", b"x", session=session).kind == SESSION
    assert prepared(b"NOSUCH", session=session).reply.startswith(b"-ERR unknown command 'NOSUCH'")
    prepared(b"HELLO", b"3", session=session)   # refused in RESP2 subscribed mode: nothing changes
    assert session.dialect == 2
    session.dialect = 3   # RESP3: nothing is refused
    CODEC.mode_changed(session)
    assert session.prepare == CODEC.prepare
    assert prepared(b"GET", b"k", session=session).kind == FORWARD
    assert prepared(b"PING", session=session).reply == b"+PONG\r\n"


def fanout(*args: bytes, replies: dict) -> bytes:
    request = prepared(*args)
    assert request.kind == FRAGMENT
    codec = CODEC
    routes = codec.fragment(request, Router())
    if not routes:
        return request.reply
    request.fragments = []
    for server, part in routes:
        part.reply = replies[server] if not callable(replies[server]) else replies[server](part)
        request.fragments.append(part)
    return codec.coalesce(request)


def test_channels_is_the_union_of_every_servers_list() -> None:
    reply = fanout(b"PUBSUB", b"CHANNELS", replies={"A": b"*2\r\n$1\r\na\r\n$1\r\nk\r\n",
                                                    "B": b"*2\r\n$1\r\nb\r\n$1\r\nk\r\n"})
    assert reply == b"*3\r\n$1\r\na\r\n$1\r\nk\r\n$1\r\nb\r\n"


def test_numpat_is_the_most_any_server_holds() -> None:
    assert fanout(b"PUBSUB", b"NUMPAT", replies={"A": b":2\r\n", "B": b":3\r\n"}) == b":3\r\n"


def test_an_error_from_one_server_is_the_reply() -> None:
    assert fanout(b"PUBSUB", b"NUMPAT", replies={"A": b":2\r\n", "B": b"-ERR boom\r\n"}) == b"-ERR boom\r\n"


def test_numsub_asks_each_channel_of_its_server_and_keeps_the_order() -> None:
    def answer(part: Request) -> bytes:
        channels = part.args[2:]
        return b"*%d\r\n" % (2 * len(channels)) + b"".join(
            b"$%d\r\n%s\r\n:%d\r\n" % (len(c), c, len(c)) for c in channels)

    reply = fanout(b"PUBSUB", b"NUMSUB", b"b1", b"a1", b"bb2", b"a1",
                   replies={"A": answer, "B": answer})
    assert reply == (b"*8\r\n$2\r\nb1\r\n:2\r\n$2\r\na1\r\n:2\r\n$3\r\nbb2\r\n:3\r\n$2\r\na1\r\n:2\r\n")
    # A server that answers for fewer channels than asked: an error, not a wrong pairing.
    assert fanout(b"PUBSUB", b"NUMSUB", b"a1", b"a2", replies={"A": b"*0\r\n"}).startswith(
        b"-ERR unexpected reply from server")


def test_ack_and_frames() -> None:
    assert redis_pubsub.ack(b"subscribe", b"a", 1, 2) == b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n"
    assert redis_pubsub.ack(b"unsubscribe", None, 0, 3) == b">3\r\n$11\r\nunsubscribe\r\n_\r\n:0\r\n"
    frame = b">4\r\n$8\r\npmessage\r\n$2\r\na*\r\n$2\r\nab\r\n$0\r\n\r\n"
    assert redis_pubsub.push_parts(frame) == [b"pmessage", b"a*", b"ab", b""]
    assert redis_pubsub.push_parts(b"*3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n") == [b"unsubscribe", None, 0]
    assert redis_pubsub.push_parts(b"+OK\r\n") is None
    assert redis_pubsub.in_dialect(frame, 2) == b"*" + frame[1:]
    assert redis_pubsub.in_dialect(frame, 3) is frame
