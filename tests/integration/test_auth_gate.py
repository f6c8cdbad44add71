"""The AUTH gate, byte for byte against a real ``redis-server --requirepass``.

Every sequence goes once to a real Redis and once to the proxy in front of
it, each on a fresh connection, one command at a time; the replies must be
the same bytes.  Where the README's "AUTH" paragraph documents a difference
(things a proxy cannot be), the test rewrites Redis's reply into the
documented one and still compares the whole reply.
"""

from __future__ import annotations

import re
import socket
from typing import Any, List, Sequence, Tuple, Union

import pytest

from tests.conftest import pool_yaml
from tests.servers import LOOPBACK
from twinproxy import __version__
from twinproxy.protocols import resp
from twinproxy.protocols.redis import RedisCodec

PASSWORD = "s3cret-pw"
NOAUTH = b"-NOAUTH Authentication required.\r\n"
WRONGPASS = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"
CLOSED = b"<closed>"

Command = Union[Tuple[str, ...], bytes]  # a RESP array of these words, or raw (inline) bytes


class _IncompleteError(Exception):
    pass


def _parse(buf: bytes, pos: int = 0) -> Tuple[Any, int]:
    """One RESP2/RESP3 value at ``pos``: (value, end); raise _IncompleteError until it is all there."""
    eol = buf.find(b"\r\n", pos)
    if eol < 0:
        raise _IncompleteError
    kind, line, pos = buf[pos:pos + 1], buf[pos + 1:eol], eol + 2
    if kind in b"+-:_,#(":
        return line, pos
    if kind in b"$!=":
        size = int(line)
        if size < 0:
            return None, pos
        if len(buf) < pos + size + 2:
            raise _IncompleteError
        return buf[pos:pos + size], pos + size + 2
    if kind in b"*~>%|":
        count = int(line)
        if count < 0:
            return None, pos
        items = []
        for _ in range(count * 2 if kind in b"%|" else count):
            item, pos = _parse(buf, pos)
            items.append(item)
        if kind == b"|":  # an attribute: the value it annotates follows
            return _parse(buf, pos)
        return items, pos
    raise AssertionError(f"not RESP: {buf[pos - len(line) - 3:][:80]!r}")


class Connection:
    """A raw client socket that reads exactly one complete reply per command."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((LOOPBACK, port), timeout=5)
        self.buf = b""

    def call(self, command: Command) -> bytes:
        if isinstance(command, tuple):
            command = resp.encode_command([word.encode() for word in command])
        self.sock.sendall(command)
        return self.reply()

    def reply(self) -> bytes:
        """The next reply's bytes, or CLOSED if the peer closed first (each recv has the timeout)."""
        while True:
            try:
                _, end = _parse(self.buf)
            except _IncompleteError:
                chunk = self.sock.recv(65536)
                if not chunk:
                    assert not self.buf, f"peer closed mid-reply: {self.buf!r}"
                    return CLOSED
                self.buf += chunk
                continue
            reply, self.buf = self.buf[:end], self.buf[end:]
            return reply

    def close(self) -> None:
        self.sock.close()


def talk(port: int, commands: Sequence[Command]) -> List[bytes]:
    """Send ``commands`` one by one on a fresh connection; after a QUIT, also read the close."""
    conn = Connection(port)
    try:
        replies = [conn.call(command) for command in commands]
        if commands and isinstance(commands[-1], tuple) and commands[-1][0].upper() == "QUIT":
            replies.append(conn.reply())
        return replies
    finally:
        conn.close()


_HELLO_SERVER = re.compile(rb"\$6\r\nserver\r\n\$5\r\nredis\r\n\$7\r\nversion\r\n\$\d+\r\n[^\r]*\r\n")
_HELLO_ID = re.compile(rb"\$2\r\nid\r\n:\d+\r\n")


def as_documented(reply: bytes) -> bytes:
    """Redis's reply as the README says twinproxy gives it: HELLO names twinproxy and its version.

    The client id (Redis's own counter either way) is blanked in both.
    """
    version = __version__.encode()
    proxy_fields = b"$6\r\nserver\r\n$9\r\ntwinproxy\r\n$7\r\nversion\r\n$%d\r\n%s\r\n" % (len(version), version)
    return blank_id(_HELLO_SERVER.sub(lambda _: proxy_fields, reply))


def blank_id(reply: bytes) -> bytes:
    return _HELLO_ID.sub(b"$2\r\nid\r\n:ID\r\n", reply)


def assert_same(server_port: int, proxy_port: int, commands: Sequence[Command]) -> List[bytes]:
    """Run ``commands`` on both; the proxy's replies must be Redis's, as documented. Returns Redis's."""
    expected = [as_documented(reply) for reply in talk(server_port, commands)]
    got = [blank_id(reply) for reply in talk(proxy_port, commands)]
    for command, want, have in zip(commands, expected, got):
        assert have == want, f"{command!r}: redis {want!r}, twinproxy {have!r}"
    assert len(got) == len(expected), (got, expected)
    return expected


@pytest.fixture
def guarded(redis_servers, proxy) -> Tuple[int, int]:
    """(redis port, proxy port): a requirepass server, and a redis_auth proxy in front of it."""
    (server,) = redis_servers(1, password=PASSWORD)
    return server.port, proxy(pool_yaml([server], redis_auth=PASSWORD)).port_number


@pytest.fixture
def open_pool(redis_servers, proxy) -> Tuple[int, int]:
    """(redis port, proxy port): no requirepass, no redis_auth."""
    (server,) = redis_servers(1)
    return server.port, proxy(pool_yaml([server])).port_number


BEFORE_AUTH: List[Command] = [
    ("PING",), ("PING", "hi"), ("PING", "a", "b"), ("ECHO", "x"), ("GET", "k"), ("SET", "k", "v"),
    ("SELECT", "0"), ("SELECT", "1"), ("CLIENT", "SETNAME", "me"), ("CLIENT", "GETNAME"), ("CLIENT", "ID"),
    ("COMMAND", "DOCS"), ("COMMAND",), ("KEYS", "*"), ("MULTI",), ("CONFIG", "GET", "x"), ("MGET", "a", "b"),
    ("EVAL", "return 1", "0"), (b"PING\r\n"), (b"get k\r\n"),
    # Redis names a wrong argument count or subcommand before it says NOAUTH.
    ("GET",), ("GET", "a", "b"), ("SET", "k"), ("ECHO",), ("SELECT",), ("CLIENT",), ("CLIENT", "SETNAME"),
    ("client", "nosuch"), ("OBJECT",), ("OBJECT", "ENCODING"), ("object", "x"), ("MEMORY", "USAGE"),
    ("XINFO", "nosuch"), ("KEYS",), ("CONFIG", "NOSUCH"), ("CONFIG", "GET"), ("SCRIPT", "LOAD"), ("script", "x"),
    ("FUNCTION", "DELETE"), ("SCAN",), ("INFO",), ("DBSIZE", "x"),
    ("HELLO",), ("HELLO", "2"), ("HELLO", "3"), ("HELLO", "4"), ("HELLO", "1"), ("HELLO", "-1"), ("HELLO", "03"),
    ("HELLO", "x"), ("HELLO", "99999999999999999999"), ("HELLO", "3", "SETNAME", "me"),
    ("HELLO", "3", "SETNAME", "a b"), ("HELLO", "3", "AUTH", "default"), ("HELLO", "3", "BOGUS"),
    ("HELLO", "3", "AUTH", "default", "wrong"), ("HELLO", "3", "AUTH", "someuser", PASSWORD),
    ("HELLO", "3", "AUTH", "default", "wrong", "BOGUS"), ("HELLO", "3", "SETNAME", "a b", "AUTH", "default", PASSWORD),
    ("AUTH",), ("AUTH", "wrong"), ("AUTH", "default", "wrong"), ("AUTH", "someuser", "pass"),
    ("AUTH", "someuser", PASSWORD), ("AUTH", "DEFAULT", PASSWORD), ("AUTH", "a", "b", "c"), ("AUTH", ""),
    # Still locked out after all that.
    ("PING",), ("GET", "k"), ("QUIT", "now"),
]


def test_everything_before_auth_is_answered_as_redis(guarded) -> None:
    replies = assert_same(*guarded, BEFORE_AUTH)
    assert replies[0] == NOAUTH and replies[-2:] == [b"+OK\r\n", CLOSED]


@pytest.mark.parametrize("commands", [
    pytest.param([("AUTH", PASSWORD), ("PING",), ("SET", "k", "v"), ("GET", "k"), ("ECHO", "x"), ("SELECT", "0"),
                  ("SELECT", "00"), ("CLIENT", "SETNAME", "me"), ("CLIENT", "GETNAME"), ("HELLO",),
                  ("AUTH", "wrong"), ("AUTH", "someuser", "pass"), ("HELLO", "2", "AUTH", "default", "wrong"),
                  ("PING",), ("GET", "k"), ("QUIT",)],
                 id="auth-right-then-wrong-keeps-the-login"),
    pytest.param([("AUTH", "default", PASSWORD), ("GET", "k"), ("AUTH", "default", "wrong"), ("GET", "k"),
                  ("QUIT",)], id="auth-user-and-password"),
    pytest.param([("AUTH", "wrong"), ("GET", "k"), ("HELLO", "3"), ("AUTH", "default", "wrong"), ("PING",),
                  ("AUTH", PASSWORD), ("PING",), ("GET", "k")], id="commands-after-a-failed-auth"),
    pytest.param([("HELLO", "3", "AUTH", "default", PASSWORD), ("GET", "k"), ("GET", "nokey"), ("PING",),
                  ("AUTH", "wrong"), ("HELLO", "3", "AUTH", "default", "wrong"), ("HELLO", "2", "AUTH", "x", "y"),
                  ("AUTH", "someuser", "pass"), ("AUTH",), ("GET", "nokey"), ("HELLO",), ("CLIENT", "GETNAME"),
                  ("QUIT",)],
                 id="resp3-hello-auth-and-its-errors"),
    pytest.param([("HELLO", "2", "AUTH", "default", PASSWORD, "SETNAME", "me"), ("CLIENT", "GETNAME"),
                  ("GET", "nokey")], id="hello-2-auth-setname"),
    pytest.param([("HELLO", "3", "AUTH", "default", PASSWORD, "BOGUS"), ("PING",), ("GET", "nokey")],
                 id="hello-auth-then-bad-option-stays-logged-in"),
    pytest.param([("HELLO", "3", "AUTH", "default", PASSWORD, "SETNAME", "a b"), ("PING",), ("CLIENT", "GETNAME")],
                 id="hello-auth-then-bad-name-stays-logged-in"),
    pytest.param([("HELLO", "3", "AUTH", "default", PASSWORD, "AUTH", "default", "wrong"), ("PING",),
                  ("GET", "nokey")], id="hello-second-auth-wrong"),
])
def test_auth_sequences_match_redis(guarded, commands) -> None:
    assert_same(*guarded, commands)


def test_the_hello_reply_differs_only_as_documented(guarded) -> None:
    server_port, proxy_port = guarded
    command = [("HELLO", "3", "AUTH", "default", PASSWORD)]
    (server,), (proxied,) = talk(server_port, command), talk(proxy_port, command)
    assert server.startswith(b"%7\r\n$6\r\nserver\r\n$5\r\nredis\r\n")
    assert proxied.startswith(b"%7\r\n$6\r\nserver\r\n$9\r\ntwinproxy\r\n")
    assert blank_id(proxied) == as_documented(server)


def test_documented_differences_before_auth(guarded) -> None:
    """The README's AUTH paragraph, case by case: what Redis says, and what twinproxy says instead."""
    server_port, proxy_port = guarded
    commands = [("NOSUCH", "a"), ("CLIENT", "SETINFO", "lib-name", "x"), ("ACL", "NOSUCH"), ("ACL", "DELUSER"),
                ("RESET",), ("PING",)]
    server = talk(server_port, commands)
    proxied = talk(proxy_port, commands)
    # Unknown commands: Redis's own text, before its gate, in twinproxy too.
    assert server[0] == b"-ERR unknown command 'NOSUCH', with args beginning with: 'a' \r\n"
    assert proxied[0] == server[0]
    # CLIENT SETINFO is 7.2's; Redis 7.0 does not know it, twinproxy gates it as 7.2 does.
    assert server[1] in (NOAUTH, b"-ERR unknown subcommand 'SETINFO'. Try CLIENT HELP.\r\n")
    assert proxied[1] == NOAUTH
    # Refused containers have no subcommand list in twinproxy: NOAUTH for any subcommand.
    assert server[2] == b"-ERR unknown subcommand 'NOSUCH'. Try ACL HELP.\r\n"
    assert server[3] == b"-ERR wrong number of arguments for 'acl|deluser' command\r\n"
    assert proxied[2:4] == [NOAUTH, NOAUTH]
    # RESET needs no AUTH in Redis; twinproxy refuses it before AUTH as after.
    assert server[4] == b"+RESET\r\n"
    assert proxied[4].startswith(b"-ERR command 'RESET' is not supported by twinproxy")
    assert server[5] == proxied[5] == NOAUTH


def test_pipelined_before_and_after_auth(guarded) -> None:
    server_port, proxy_port = guarded
    commands = [("PING",), ("AUTH", "wrong"), ("GET", "k"), ("AUTH", PASSWORD), ("PING",), ("DEL", "k")]
    data = b"".join(resp.encode_command([word.encode() for word in command]) for command in commands)
    replies = []
    for port in (server_port, proxy_port):
        conn = Connection(port)
        try:
            conn.sock.sendall(data)
            replies.append([conn.reply() for _ in commands])
        finally:
            conn.close()
    assert replies[0] == replies[1] == [NOAUTH, WRONGPASS, NOAUTH, b"+OK\r\n", b"+PONG\r\n", b":0\r\n"]


@pytest.mark.parametrize("commands", [
    pytest.param([("AUTH", "x"), ("AUTH", "default", "x"), ("AUTH", "someuser", "x"), ("AUTH", "a", "b", "c"),
                  ("AUTH",), ("HELLO", "3", "AUTH", "someuser", "x"), ("HELLO", "3", "AUTH", "default", "anything"),
                  ("AUTH", "x"), ("GET", "nokey"), ("QUIT",)],
                 id="auth-without-a-password"),
    pytest.param([("PING",), ("HELLO", "3"), ("CLIENT", "SETNAME", "me"), ("HELLO", "2", "SETNAME", "you"),
                  ("CLIENT", "GETNAME"), ("GET",), ("QUIT",)],
                 id="no-gate-without-a-password"),
])
def test_open_pool_answers_as_a_server_without_requirepass(open_pool, commands) -> None:
    assert_same(*open_pool, commands)


def test_arity_table_matches_redis(redis_servers) -> None:
    """The gate's argument counts are COMMAND INFO's, for every command this Redis has."""
    (server,) = redis_servers(1)
    conn = Connection(server.port)
    try:
        (info, _) = _parse(conn.call(("COMMAND",)))
    finally:
        conn.close()
    arity = {}
    for entry in info:
        arity[entry[0]] = int(entry[1])
        for sub in entry[9] if len(entry) > 9 else ():
            arity[sub[0]] = int(sub[1])
    codec = RedisCodec(_config())
    newer = {b"zrank", b"zrevrank"}  # WITHSCORE since 7.2: the table has 7.2's arity
    for name, spec in codec.commands.items():
        if name in arity and name not in newer:
            assert spec.arity == arity[name], name
        for sub, sub_arity in (spec.subcommands or {}).items():
            full = name + b"|" + sub
            if full in arity:
                assert sub_arity == arity[full], full
    for name in newer:
        assert arity[name] in (3, -3) and codec.commands[name].arity == -3


def _config():
    from twinproxy.config import load_text

    (config,) = load_text("p:\n  listen: 127.0.0.1:1\n  redis: true\n  servers:\n   - 127.0.0.1:1:1\n")
    return config
