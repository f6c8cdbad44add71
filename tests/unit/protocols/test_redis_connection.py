"""The connection commands the codec answers per client: SELECT, MOVE, CLIENT, RESET, ROLE, COMMAND GETKEYS.

Texts are Redis 7.0's (tests/integration/test_redis_sessions.py checks
them against a real redis-server); the session is a FakeSession.
"""

from __future__ import annotations

from typing import List, Optional

import pytest

from twinproxy.config import load_text
from twinproxy.protocols import REPLY_OFF, REPLY_ON, REPLY_SKIP, resp
from twinproxy.protocols.redis import RedisCodec
from twinproxy.request import FORWARD, LOCAL, Request, profile_of

from .sessions import FakeSession
from .test_redis_fanout import Router, routed

CLUSTER = "p:\n  listen: 127.0.0.1:1\n  redis: true\n  cluster: c1\n  coordinator: file:///nowhere\n"


def codec(extra: str = "") -> RedisCodec:
    (config,) = load_text(f"p:\n  listen: 127.0.0.1:1\n  redis: true\n{extra}  servers:\n   - 10.0.0.1:1:1\n")
    return RedisCodec(config)


def run(args: List[bytes], session: Optional[FakeSession] = None, the_codec: Optional[RedisCodec] = None) -> Request:
    request = Request(resp.encode_command(args), args)
    (the_codec or codec()).prepare(request, session if session is not None else FakeSession())
    return request


def reply(*args: bytes, session: Optional[FakeSession] = None, the_codec: Optional[RedisCodec] = None) -> bytes:
    request = run(list(args), session, the_codec)
    assert request.kind == LOCAL, request
    return request.reply


# -- SELECT and MOVE ------------------------------------------------------------


def test_select_changes_the_sessions_database_and_profile() -> None:
    session = FakeSession()
    assert reply(b"SELECT", b"5", session=session) == b"+OK\r\n"
    assert (session.db, session.profile) == (5, profile_of(2, 5))
    assert reply(b"select", b"15", session=session) == b"+OK\r\n"
    assert reply(b"SELECT", b"0", session=session) == b"+OK\r\n" and session.profile == profile_of(2, 0)


@pytest.mark.parametrize("args, text", [
    ([b"SELECT", b"16"], b"-ERR DB index is out of range\r\n"),
    ([b"SELECT", b"-1"], b"-ERR DB index is out of range\r\n"),
    ([b"SELECT", b"x"], b"-ERR value is not an integer or out of range\r\n"),
    ([b"SELECT", b"01"], b"-ERR value is not an integer or out of range\r\n"),
    ([b"SELECT", b"99999999999999999999"], b"-ERR value is not an integer or out of range\r\n"),
    ([b"SELECT"], b"-ERR wrong number of arguments for 'select' command\r\n"),
    ([b"MOVE", b"k", b"16"], b"-ERR DB index is out of range\r\n"),
    ([b"MOVE", b"k", b"x"], b"-ERR value is not an integer or out of range\r\n"),
    ([b"MOVE", b"k", b"0"], b"-ERR source and destination objects are the same\r\n"),
    ([b"MOVE", b"k"], b"-ERR wrong number of arguments for 'move' command\r\n"),
])
def test_database_errors_are_redis_texts(args, text) -> None:
    session = FakeSession()
    assert reply(*args, session=session) == text
    assert session.db == 0


def test_the_database_count_is_the_pools() -> None:
    small = codec("  databases: 4\n")
    assert reply(b"SELECT", b"3", the_codec=small) == b"+OK\r\n"
    assert reply(b"SELECT", b"4", the_codec=small) == b"-ERR DB index is out of range\r\n"
    wide = codec("  databases: 64\n")
    assert reply(b"SELECT", b"63", the_codec=wide) == b"+OK\r\n"


def test_move_goes_by_its_key_with_the_database_mapped_from_redis_db() -> None:
    request = run([b"MOVE", b"k", b"3"])
    assert (request.kind, request.key, request.raw) == (FORWARD, b"k", resp.encode_command([b"MOVE", b"k", b"3"]))
    request = run([b"MOVE", b"k", b"3"], the_codec=codec("  redis_db: 2\n"))
    assert (request.kind, request.key, request.raw) == (FORWARD, b"k", resp.encode_command([b"MOVE", b"k", b"5"]))
    session = FakeSession()
    session.use(2, 3)
    assert reply(b"MOVE", b"k", b"3", session=session) == b"-ERR source and destination objects are the same\r\n"
    assert run([b"MOVE", b"k", b"0"], session).kind == FORWARD


def test_a_cluster_pool_serves_database_0_only() -> None:
    (config,) = load_text(CLUSTER)
    cluster = RedisCodec(config)
    session = FakeSession(in_cluster=True)
    assert reply(b"SELECT", b"0", session=session, the_codec=cluster) == b"+OK\r\n"
    assert reply(b"SELECT", b"1", session=session, the_codec=cluster).startswith(
        b"-ERR SELECT is not allowed in a twinproxy cluster pool")
    assert reply(b"SELECT", b"16", session=session, the_codec=cluster) == b"-ERR DB index is out of range\r\n"
    assert reply(b"MOVE", b"k", b"1", session=session, the_codec=cluster).startswith(
        b"-ERR MOVE is not allowed in a twinproxy cluster")
    assert session.db == 0


def test_a_client_of_a_pool_that_joined_a_cluster_since_it_connected_is_held_to_database_0() -> None:
    # An adopted pool switches in place: a client keeps the codec it connected with (a plain pool's),
    # so the rule is the session's (the pool's mode now), not the codec's.
    session = FakeSession(in_cluster=True)
    assert reply(b"SELECT", b"1", session=session).startswith(b"-ERR SELECT is not allowed in a twinproxy cluster")
    assert reply(b"MOVE", b"k", b"1", session=session).startswith(b"-ERR MOVE is not allowed in a twinproxy cluster")
    assert session.db == 0


def test_swapdb_is_refused_naming_why() -> None:
    assert reply(b"SWAPDB", b"0", b"1").startswith(
        b"-ERR command 'SWAPDB' is not supported by twinproxy: each server would swap its databases on its own")


def test_handshake_per_profile_maps_the_database_from_redis_db() -> None:
    the_codec = codec("  redis_auth: pw\n  redis_db: 2\n")
    auth, hello = resp.encode_command([b"AUTH", b"pw"]), resp.encode_command([b"HELLO", b"3"])
    assert the_codec.handshake(profile_of(2)) == [auth, resp.encode_command([b"SELECT", b"2"])]
    assert the_codec.handshake(profile_of(3, 5)) == [auth, hello, resp.encode_command([b"SELECT", b"7"])]
    plain = codec()
    assert plain.handshake(profile_of(2)) == [] and plain.handshake(profile_of(3)) == [hello]
    assert plain.handshake(profile_of(2, 15)) == [resp.encode_command([b"SELECT", b"15"])]


def test_hello_keeps_the_database_and_reset_clears_it() -> None:
    session = FakeSession()
    reply(b"SELECT", b"4", session=session)
    assert reply(b"HELLO", b"3", session=session).startswith(b"%7\r\n")
    assert session.profile == profile_of(3, 4)
    session.client_name = b"me"
    request = run([b"RESET"], session)
    assert request.reply == b"+RESET\r\n"
    assert (session.profile, session.client_name, session.reply_modes) == (profile_of(2), None, [(request, REPLY_ON)])


# -- CLIENT ----------------------------------------------------------------------


def test_client_info_is_redis_line_format_bulk_then_verbatim() -> None:
    session = FakeSession()
    session.client_name = b"worker-1"
    session.use(2, 3)
    line = (b"id=7 addr=127.0.0.1:50000 laddr=127.0.0.1:6379 fd=9 name=worker-1 age=12 idle=3 flags=N db=3 sub=0 "
            b"psub=0 ssub=0 multi=-1 qbuf=0 qbuf-free=0 argv-mem=0 multi-mem=0 rbs=0 rbp=0 obl=0 oll=0 omem=0 "
            b"tot-mem=0 events=r cmd=client|info user=default redir=-1 resp=2\n")
    assert reply(b"CLIENT", b"INFO", session=session) == b"$%d\r\n%s\r\n" % (len(line), line)
    session.use(3, 3)
    assert reply(b"CLIENT", b"INFO", session=session) == (
        b"=%d\r\ntxt:%s\r\n" % (len(line) + 4, line.replace(b"resp=2", b"resp=3")))


def test_client_list_shows_every_peer_by_id_with_filters() -> None:
    me = FakeSession(client_id=7)
    other = FakeSession(client_id=3, address=("/tmp/p.sock:0", "/tmp/p.sock:0", True))
    other.client_name = b"bull:queue"
    other.last_command = "get"
    subscriber = FakeSession(client_id=9)
    subscriber.subscriptions = 2
    me.others = [subscriber, other]
    listed = reply(b"CLIENT", b"LIST", session=me).split(b"\r\n")[1].split(b"\n")
    assert [line.split(b" ")[0] for line in listed] == [b"id=3", b"id=7", b"id=9", b""]
    assert b"name=bull:queue" in listed[0] and b"flags=U" in listed[0] and b"cmd=get " in listed[0]
    assert b"cmd=client|list" in listed[1] and b"flags=P" in listed[2] and b"sub=2" in listed[2]
    normal = reply(b"CLIENT", b"LIST", b"TYPE", b"normal", session=me)
    assert b"id=3 " in normal and b"id=7 " in normal and b"id=9 " not in normal
    assert b"id=9 " in reply(b"client", b"list", b"type", b"PUBSUB", session=me)
    assert reply(b"CLIENT", b"LIST", b"TYPE", b"master", session=me) == b"$0\r\n\r\n"
    by_id = reply(b"CLIENT", b"LIST", b"ID", b"9", b"99", b"3", session=me).split(b"\r\n")[1].split(b"\n")
    assert [line.split(b" ")[0] for line in by_id] == [b"id=9", b"id=3", b""]
    me.use(3, 0)
    assert reply(b"CLIENT", b"LIST", b"ID", b"99", session=me) == b"=4\r\ntxt:\r\n"


@pytest.mark.parametrize("args, text", [
    ([b"LIST", b"TYPE", b"foo"], b"-ERR Unknown client type 'foo'\r\n"),
    ([b"LIST", b"ID", b"x"], b"-ERR Invalid client ID\r\n"),
    ([b"LIST", b"ID"], b"-ERR syntax error\r\n"),
    ([b"LIST", b"foo"], b"-ERR syntax error\r\n"),
    ([b"KILL", b"1.2.3.4:5"], b"-ERR No such client\r\n"),
    ([b"KILL", b"ID", b"999"], b":0\r\n"),
    ([b"KILL", b"ID", b"x"], b"-ERR client-id should be greater than 0\r\n"),
    ([b"KILL", b"ID", b"0"], b"-ERR client-id should be greater than 0\r\n"),
    ([b"KILL", b"foo", b"bar"], b"-ERR syntax error\r\n"),
    ([b"KILL", b"ID", b"1", b"foo"], b"-ERR syntax error\r\n"),
    ([b"KILL", b"SKIPME", b"maybe"], b"-ERR syntax error\r\n"),
    ([b"KILL", b"TYPE", b"foo"], b"-ERR Unknown client type 'foo'\r\n"),
    ([b"KILL", b"USER", b"nobody"], b"-ERR No such user 'nobody'\r\n"),
    ([b"KILL"], b"-ERR wrong number of arguments for 'client|kill' command\r\n"),
    ([b"REPLY", b"foo"], b"-ERR syntax error\r\n"),
    ([b"REPLY"], b"-ERR wrong number of arguments for 'client|reply' command\r\n"),
    ([b"NO-EVICT", b"on"], b"+OK\r\n"),
    ([b"NO-EVICT", b"maybe"], b"-ERR syntax error\r\n"),
    ([b"NO-TOUCH", b"OFF"], b"+OK\r\n"),
    ([b"GETREDIR"], b":-1\r\n"),
    ([b"TRACKINGINFO"], b"*6\r\n$5\r\nflags\r\n*1\r\n$3\r\noff\r\n$8\r\nredirect\r\n:-1\r\n$8\r\nprefixes\r\n*0\r\n"),
    ([b"INFO", b"x"], b"-ERR wrong number of arguments for 'client|info' command\r\n"),
    ([b"nosuch"], b"-ERR unknown subcommand 'nosuch'. Try CLIENT HELP.\r\n"),
    ([b"SETNAME", b"a b"], b"-ERR Client names cannot contain spaces, newlines or special characters.\r\n"),
    ([b"SETINFO", b"LIB-NAME", b"redis-py"], b"+OK\r\n"),
    ([b"ID"], b":7\r\n"),
])
def test_client_subcommands_answer_as_redis(args, text) -> None:
    assert reply(b"CLIENT", *args) == text


@pytest.mark.parametrize("sub", [b"TRACKING", b"CACHING", b"PAUSE", b"UNBLOCK"])
def test_client_subcommands_twinproxy_refuses_name_the_subcommand(sub) -> None:
    argument = {b"PAUSE": b"10", b"UNBLOCK": b"1"}.get(sub, b"on")
    assert reply(b"CLIENT", sub, argument).startswith(b"-ERR CLIENT %s is not supported by twinproxy: " % sub)
    assert reply(b"CLIENT", b"UNPAUSE").startswith(b"-ERR CLIENT UNPAUSE is not supported by twinproxy")


def test_client_kill_acts_on_peers_and_closes_the_caller_after_its_reply() -> None:
    me = FakeSession(client_id=7)
    other = FakeSession(client_id=3, address=("127.0.0.1:40000", "127.0.0.1:6379", False))
    third = FakeSession(client_id=4, address=("127.0.0.1:40001", "127.0.0.1:6380", False))
    me.others = [other, third]
    assert reply(b"CLIENT", b"KILL", b"ID", b"3", session=me) == b":1\r\n"
    assert (other.killed, third.killed) == (True, False)
    assert reply(b"CLIENT", b"KILL", b"LADDR", b"127.0.0.1:6380", session=me) == b":1\r\n" and third.killed
    third.killed = other.killed = False
    request = run([b"CLIENT", b"KILL", b"ADDR", b"127.0.0.1:50000"], me)
    assert request.reply == b":0\r\n" and not request.close_after   # SKIPME yes: not the caller
    request = run([b"CLIENT", b"KILL", b"USER", b"default", b"SKIPME", b"no"], me)
    assert request.reply == b":3\r\n" and request.close_after and other.killed and third.killed
    assert not me.killed   # the caller is closed by the frontend once its reply is out
    request = run([b"CLIENT", b"KILL", b"127.0.0.1:50000"], me)   # the old form may kill the caller
    assert (request.reply, request.close_after) == (b"+OK\r\n", True)


def test_client_reply_tells_the_session_the_mode_at_that_request() -> None:
    session = FakeSession()
    for word, mode in ((b"OFF", REPLY_OFF), (b"skip", REPLY_SKIP), (b"On", REPLY_ON)):
        request = run([b"CLIENT", b"REPLY", word], session)
        assert request.reply == b"+OK\r\n" and session.reply_modes[-1] == (request, mode)


def test_client_setname_getname_and_hello_setname() -> None:
    session = FakeSession()
    assert reply(b"CLIENT", b"SETNAME", b"app", session=session) == b"+OK\r\n"
    assert reply(b"CLIENT", b"GETNAME", session=session) == b"$3\r\napp\r\n"
    assert reply(b"CLIENT", b"SETNAME", b"", session=session) == b"+OK\r\n" and session.client_name is None


# -- ROLE, READONLY, COMMAND GETKEYS ---------------------------------------------------------


def test_role_and_readonly_as_a_standalone_master() -> None:
    assert reply(b"ROLE") == b"*3\r\n$6\r\nmaster\r\n:0\r\n*0\r\n"
    assert reply(b"ROLE", b"x") == b"-ERR wrong number of arguments for 'role' command\r\n"
    assert reply(b"READONLY") == b"-ERR This instance has cluster support disabled\r\n"
    assert reply(b"readwrite") == b"-ERR This instance has cluster support disabled\r\n"


@pytest.mark.parametrize("args, text", [
    ([b"GET", b"k"], b"*1\r\n$1\r\nk\r\n"),
    ([b"MSET", b"a", b"1", b"b", b"2"], b"*2\r\n$1\r\na\r\n$1\r\nb\r\n"),
    ([b"OBJECT", b"ENCODING", b"k"], b"*1\r\n$1\r\nk\r\n"),
    ([b"ZUNIONSTORE", b"d", b"2", b"a", b"b"], b"*3\r\n$1\r\nd\r\n$1\r\na\r\n$1\r\nb\r\n"),
    ([b"SORT", b"l", b"STORE", b"d"], b"*2\r\n$1\r\nl\r\n$1\r\nd\r\n"),
    ([b"EVAL", b"s", b"0"], b"*0\r\n"),
    ([b"MOVE", b"k", b"1"], b"*1\r\n$1\r\nk\r\n"),
    ([b"NOSUCH", b"k"], b"-ERR Invalid command specified\r\n"),
    ([b"CLIENT", b"NOSUCH"], b"-ERR Invalid command specified\r\n"),
    ([b"PING", b"x"], b"-ERR The command has no key arguments\r\n"),
    ([b"CLIENT", b"LIST"], b"-ERR The command has no key arguments\r\n"),
    ([b"GET", b"k", b"x"], b"-ERR Invalid number of arguments specified for command\r\n"),
    ([b"MSET", b"a"], b"-ERR Invalid number of arguments specified for command\r\n"),
    ([b"ZUNIONSTORE", b"d", b"-1", b"a"], b"-ERR Invalid arguments specified for command\r\n"),
])
def test_command_getkeys_from_the_proxys_key_extraction(args, text) -> None:
    assert getkeys(b"GETKEYS", *args) == text


def getkeys(*args: bytes) -> bytes:
    """COMMAND's reply (a FANOUT command: answered when it is routed); the routes must be none."""
    request, routes = routed([b"COMMAND", *args])
    assert routes == [] and request.kind == LOCAL, routes
    return request.reply


def test_command_getkeys_of_a_refused_command_names_the_refusal() -> None:
    assert getkeys(b"GETKEYS", b"WAITAOF", b"0", b"0", b"0").startswith(b"-ERR command 'WAITAOF' is not supported")
    assert getkeys(b"GETKEYS", b"BLPOP", b"a", b"b", b"0") == b"*2\r\n$1\r\na\r\n$1\r\nb\r\n"   # as Redis
    assert getkeys(b"GETKEYS", b"GET") == b"-ERR wrong number of arguments for 'command|getkeys' command\r\n"


def test_command_getkeysandflags_goes_to_a_server_once_the_proxy_found_the_keys() -> None:
    request, routes = routed([b"COMMAND", b"GETKEYSANDFLAGS", b"RENAME", b"a", b"b"], Router())
    assert [server.name for server, _ in routes] == ["s0"]
    assert getkeys(b"GETKEYSANDFLAGS", b"EVAL", b"s", b"0") == b"*0\r\n"
    assert getkeys(b"GETKEYSANDFLAGS", b"PING", b"x") == b"-ERR The command has no key arguments\r\n"
