"""Per-client state through a running proxy on real redis-servers: databases, CLIENT, RESET, ROLE, GETKEYS.

Where Redis answers the same thing (errors, ROLE, CLIENT REPLY, RESET),
the proxy's bytes are compared with a real redis-server's, each on a fresh
connection (tests/integration/test_auth_gate.py's ``talk``).
"""

from __future__ import annotations

import dataclasses
import socket
from typing import Dict, List

import pytest
import redis

from tests.conftest import in_reactor, key_on, pool_yaml
from tests.integration.test_auth_gate import CLOSED, Connection, assert_same, talk
from tests.servers import LOOPBACK, wait_until
from twinproxy.config import load_text
from twinproxy.topology import diff_pool

pytestmark = pytest.mark.timeout(60)
PASSWORD = "pw-sessions"


def client(service, **kwargs) -> redis.Redis:
    kwargs.setdefault("socket_timeout", 5)
    kwargs.setdefault("socket_connect_timeout", 5)
    return redis.Redis(host=LOOPBACK, port=service.port_number, **kwargs)


def where(backends, key: str, db: int) -> List[int]:
    """The indexes of the backends holding ``key`` in database ``db``."""
    return [i for i, backend in enumerate(backends) if backend.client(db=db).exists(key)]


def fields(line: bytes) -> Dict[str, str]:
    return dict(part.split("=", 1) for part in line.decode().split(" "))


def test_redis_py_db_3_writes_land_in_db_3_of_each_backend(redis_servers, proxy) -> None:
    backends = redis_servers(3)
    service = proxy(pool_yaml(backends, hash="murmur"))
    names = [server.name for server in service.pool.servers]
    for protocol in (2, 3):
        c = client(service, db=3, protocol=protocol)
        for i in range(60):
            key = f"db3:{protocol}:{i}"
            assert c.set(key, i) and c.get(key) == str(i).encode()
            owner = names.index(service.pool.server_for_key(key.encode()).name)
            assert where(backends, key, 3) == [owner] and where(backends, key, 0) == []
        c.close()
    assert {len(backend.client(db=3).keys("db3:*")) > 0 for backend in backends} == {True}


def test_clients_on_db_0_and_db_5_never_see_each_others_keys(redis_servers, proxy) -> None:
    backends = redis_servers(3)
    service = proxy(pool_yaml(backends, hash="murmur"))
    db0 = client(service, protocol=2, single_connection_client=True)
    db5 = client(service, db=5, protocol=3, single_connection_client=True)
    for i in range(40):   # interleaved on the same keys: the backend connections are per database
        key = f"shared:{i}"
        assert db0.set(key, f"zero{i}") and db5.set(key, f"five{i}")
        assert db0.get(key) == f"zero{i}".encode() and db5.get(key) == f"five{i}".encode()
    fresh = client(service, protocol=2)   # never sends SELECT: database 0
    assert fresh.get("shared:7") == b"zero7"
    db5.set("only5", "x")
    assert fresh.get("only5") is None and db0.exists("only5") == 0 and db5.get("only5") == b"x"
    # One connection switching back and forth, pipelined.
    pipe = fresh.pipeline(transaction=False)
    pipe.execute_command("SELECT", 5).get("shared:1").execute_command("SELECT", 0).get("shared:1")
    assert pipe.execute()[1::2] == [b"five1", b"zero1"]
    assert sum(backend.client(db=5).dbsize() for backend in backends) == 41
    assert sum(backend.client(db=0).dbsize() for backend in backends) == 40


def test_database_errors_are_redis_exact(redis_servers, proxy) -> None:
    (server,) = redis_servers(1)
    service = proxy(pool_yaml([server]))
    assert_same(server.port, service.port_number, [
        ("SELECT", "16"), ("SELECT", "x"), ("SELECT", "-1"), ("SELECT", "01"), ("SELECT",), ("SELECT", "1", "2"),
        ("SET", "k", "v"), ("MOVE", "k", "16"), ("MOVE", "k", "x"), ("MOVE", "k", "0"), ("MOVE", "k"),
        ("SELECT", "15"), ("GET", "k"), ("SELECT", "0"), ("MOVE", "k", "15"), ("GET", "k"), ("SELECT", "15"),
        ("GET", "k"), ("MOVE", "k", "0"), ("MOVE", "nokey", "3"),
    ])
    c = client(service, protocol=2)
    with pytest.raises(redis.ResponseError, match="'SWAPDB' is not supported by twinproxy"):
        c.swapdb(0, 1)


def test_redis_db_is_database_0_and_a_reload_that_changes_it_moves_new_traffic(redis_servers, proxy,
                                                                                reactor) -> None:
    backends = redis_servers(2)
    service = proxy(pool_yaml(backends, redis_db="1", databases="4"))
    key = key_on(service, 0)
    fresh = client(service, protocol=2, single_connection_client=True)
    selected = client(service, db=2, protocol=3, single_connection_client=True)
    fresh.set(key, "before")
    selected.set(key, "before")
    assert backends[0].client(db=1).get(key) == b"before" and backends[0].client(db=3).get(key) == b"before"
    with pytest.raises(redis.ResponseError, match="DB index is out of range"):
        fresh.execute_command("SELECT", 4)
    (new,) = load_text(pool_yaml(backends, redis_db="6", databases="4"))
    old = service.runtime.config
    in_reactor(reactor, service.apply, diff_pool(old, dataclasses.replace(new, listen=old.listen)))
    fresh.set(key, "after")
    selected.set(key, "after")   # the same clients, their next requests: the new base
    assert backends[0].client(db=6).get(key) == b"after" and backends[0].client(db=8).get(key) == b"after"
    assert backends[0].client(db=1).get(key) == b"before" and backends[0].client(db=3).get(key) == b"before"


def test_move_maps_its_database_as_select_does(redis_servers, proxy) -> None:
    backends = redis_servers(2)
    service = proxy(pool_yaml(backends, redis_db="2"))
    key = key_on(service, 1)
    c = client(service, protocol=2)
    c.set(key, "v")
    assert c.move(key, 3) is True
    assert backends[1].client(db=5).get(key) == b"v" and backends[1].client(db=2).get(key) is None
    assert client(service, db=3, protocol=2).get(key) == b"v"


def test_client_setname_then_client_list_shows_it_as_redis_lists(redis_servers, proxy) -> None:
    (server,) = redis_servers(1)
    service = proxy(pool_yaml([server]))
    worker = client(service, protocol=3, single_connection_client=True)
    worker.client_setname("bull:Y29uc3VtZXI=:w1")   # BullMQ names its workers, then lists them
    worker.set("x", "1")
    admin = client(service, protocol=2, db=2, single_connection_client=True)
    listed = {entry["name"]: entry for entry in admin.client_list()}
    assert set(listed) == {"bull:Y29uc3VtZXI=:w1", ""}
    me, them = listed[""], listed["bull:Y29uc3VtZXI=:w1"]
    assert (them["id"], them["db"], them["resp"], them["cmd"]) == (str(worker.client_id()), "0", "3", "set")
    assert (me["db"], me["cmd"], me["flags"]) == ("2", "client|list", "N")
    assert admin.client_list(_type="pubsub") == []
    # CLIENT INFO: Redis 7.0's fields in its order, a bulk string in RESP2 and a verbatim one in RESP3.
    commands = [("CLIENT", "INFO"), ("HELLO", "3"), ("CLIENT", "INFO")]
    redis_replies, proxy_replies = talk(server.port, commands), talk(service.port_number, commands)
    for index, start in ((0, b"$"), (2, b"=")):
        redis_line, proxy_line = (reply.split(b"\r\n")[1] for reply in (redis_replies[index], proxy_replies[index]))
        assert proxy_replies[index].startswith(start) and redis_replies[index].startswith(start)
        assert proxy_line.endswith(b"\n") and redis_line.endswith(b"\n")
        proxy_line, redis_line = (line.rstrip(b"\n").replace(b"txt:", b"") for line in (proxy_line, redis_line))
        assert list(fields(proxy_line)) == list(fields(redis_line))
        assert fields(proxy_line)["resp"] == fields(redis_line)["resp"]
    conn = Connection(service.port_number)
    try:
        address, port = conn.sock.getsockname()
        line = fields(conn.call(("CLIENT", "INFO")).split(b"\r\n")[1].rstrip(b"\n"))
    finally:
        conn.close()
    assert (line["addr"], line["laddr"]) == (f"{address}:{port}", f"{LOOPBACK}:{service.port_number}")
    assert int(line["fd"]) > 0 and line["cmd"] == "client|info" and line["name"] == ""


def test_client_kill_id_closes_another_proxy_client(redis_servers, proxy) -> None:
    (server,) = redis_servers(1)
    service = proxy(pool_yaml([server]))
    victim = Connection(service.port_number)
    victim_id = int(victim.call(("CLIENT", "ID"))[1:-2])
    admin = client(service, protocol=2, single_connection_client=True)
    assert admin.client_kill_filter(_id=victim_id) == 1
    assert victim.reply() == CLOSED
    victim.close()
    wait_until(lambda: victim_id not in [int(entry["id"]) for entry in admin.client_list()],
               what="the killed client to leave CLIENT LIST")
    assert admin.client_kill_filter(_id=victim_id) == 0
    assert admin.ping() is True


def test_client_commands_match_redis(redis_servers, proxy) -> None:
    (server,) = redis_servers(1)
    service = proxy(pool_yaml([server]))
    assert_same(server.port, service.port_number, [
        ("CLIENT", "LIST", "TYPE", "foo"), ("CLIENT", "LIST", "ID", "x"), ("CLIENT", "LIST", "ID"),
        ("CLIENT", "LIST", "foo"), ("CLIENT", "LIST", "ID", "99999"), ("CLIENT", "LIST", "TYPE", "master"),
        ("CLIENT", "KILL", "1.2.3.4:5"), ("CLIENT", "KILL", "ID", "99999"), ("CLIENT", "KILL", "ID", "x"),
        ("CLIENT", "KILL", "ID"), ("CLIENT", "KILL", "foo", "bar"), ("CLIENT", "KILL", "SKIPME", "maybe"),
        ("CLIENT", "KILL", "TYPE", "foo"), ("CLIENT", "KILL", "USER", "nobody"),
        ("CLIENT", "KILL", "ADDR", "1.2.3.4:5"),
        ("CLIENT", "KILL", "TYPE", "replica"), ("CLIENT", "KILL"), ("CLIENT", "REPLY", "foo"), ("CLIENT", "REPLY"),
        ("CLIENT", "NO-EVICT", "on"), ("CLIENT", "NO-EVICT", "maybe"), ("CLIENT", "GETREDIR"),
        ("CLIENT", "TRACKINGINFO"), ("CLIENT", "INFO", "x"), ("CLIENT", "nosuch"), ("CLIENT", "SETNAME", "a b"),
        ("HELLO", "3"), ("CLIENT", "TRACKINGINFO"), ("CLIENT", "LIST", "ID", "99999"), ("CLIENT", "GETNAME"),
    ])
    with pytest.raises(redis.ResponseError, match="CLIENT TRACKING is not supported by twinproxy"):
        client(service, protocol=2).execute_command("CLIENT", "TRACKING", "on")
    with pytest.raises(redis.ResponseError, match="CLIENT PAUSE is not supported by twinproxy"):
        client(service, protocol=2).client_pause(10)


@pytest.mark.parametrize("commands", [
    pytest.param([b"CLIENT REPLY OFF", b"SET k v", b"CLIENT REPLY ON", b"GET k"], id="off-set-on"),
    pytest.param([b"CLIENT REPLY SKIP", b"CLIENT REPLY SKIP", b"PING", b"PING x"], id="skip-skip"),
    pytest.param([b"CLIENT REPLY SKIP", b"GET k", b"PING", b"CLIENT REPLY SKIP", b"CLIENT REPLY ON", b"PING"],
                 id="skip-then-on"),
    pytest.param([b"CLIENT REPLY OFF", b"SELECT 99", b"GET k", b"RESET", b"PING"], id="off-reset"),
])
def test_client_reply_modes_send_what_redis_sends(redis_servers, proxy, commands) -> None:
    """CLIENT REPLY OFF, SET, CLIENT REPLY ON returns only the final +OK; pipelined, as a client sends it."""
    backends = redis_servers(3)
    service = proxy(pool_yaml(backends, hash="murmur"))
    data = b"".join(command + b"\r\n" for command in commands) + b"ECHO end\r\n"
    got = {}
    for name, port in (("redis", backends[0].port), ("twinproxy", service.port_number)):
        with socket.create_connection((LOOPBACK, port), timeout=5) as sock:
            sock.sendall(data)
            received = b""
            while not received.endswith(b"$3\r\nend\r\n"):
                chunk = sock.recv(65536)
                assert chunk, (name, received)
                received += chunk
            got[name] = received
    assert got["twinproxy"] == got["redis"]
    if commands[0] == b"CLIENT REPLY OFF" and commands[1] == b"SET k v":
        assert got["twinproxy"] == b"+OK\r\n$1\r\nv\r\n$3\r\nend\r\n"


def test_reset_then_a_command_needing_auth_gets_noauth(redis_servers, proxy) -> None:
    (server,) = redis_servers(1, password=PASSWORD)
    service = proxy(pool_yaml([server], redis_auth=PASSWORD))
    replies = assert_same(server.port, service.port_number, [
        ("AUTH", PASSWORD), ("SELECT", "3"), ("CLIENT", "SETNAME", "me"), ("HELLO", "3"), ("SET", "k", "in3"),
        ("RESET",), ("GET", "k"), ("AUTH", PASSWORD), ("GET", "k"), ("CLIENT", "GETNAME"), ("SELECT", "3"),
        ("GET", "k"), ("RESET",), ("RESET",),
    ])
    assert replies[5:7] == [b"+RESET\r\n", b"-NOAUTH Authentication required.\r\n"]
    assert replies[8] == b"$-1\r\n" and replies[11] == b"$3\r\nin3\r\n"   # back in db 0, RESP2


def test_role_and_readonly_as_redis_standalone(redis_servers, proxy) -> None:
    (server,) = redis_servers(1)
    service = proxy(pool_yaml([server]))
    replies = assert_same(server.port, service.port_number, [
        ("ROLE",), ("ROLE", "x"), ("READONLY",), ("READWRITE",), ("HELLO", "3"), ("ROLE",), ("READONLY",),
    ])
    assert replies[0] == b"*3\r\n$6\r\nmaster\r\n:0\r\n*0\r\n"


GETKEYS_CORPUS = [
    ("GET", "k"), ("SET", "k", "v", "EX", "10"), ("MGET", "a", "b", "c"), ("MSET", "a", "1", "b", "2"),
    ("DEL", "a", "b"), ("RENAME", "a", "b"), ("LMOVE", "a", "b", "LEFT", "RIGHT"), ("COPY", "a", "b"),
    ("ZUNIONSTORE", "d", "2", "a", "b", "WEIGHTS", "1", "2"), ("ZINTER", "2", "a", "b"),
    ("LMPOP", "2", "a", "b", "LEFT"),
    ("SORT", "l", "BY", "w*", "STORE", "d"), ("EVAL", "return 1", "2", "a", "b", "x"), ("EVAL", "return 1", "0"),
    ("FCALL", "f", "1", "a"), ("OBJECT", "ENCODING", "k"), ("XINFO", "STREAM", "s"), ("SINTERSTORE", "d", "a", "b"),
    ("GEORADIUS", "g", "0", "0", "1", "km", "STORE", "d"), ("BITOP", "AND", "d", "a", "b"), ("MOVE", "k", "1"),
    ("NOSUCH", "k"), ("PING", "x"), ("CLIENT", "LIST"), ("GET", "k", "x"), ("MSET", "a"),
    ("ZUNIONSTORE", "d", "-1", "a"),
]


def test_command_getkeys_matches_a_real_server(redis_servers, proxy) -> None:
    backends = redis_servers(2)
    service = proxy(pool_yaml(backends))
    assert_same(backends[0].port, service.port_number,
                [("COMMAND", "GETKEYS", *words) for words in GETKEYS_CORPUS]
                + [("COMMAND", "GETKEYSANDFLAGS", *words) for words in GETKEYS_CORPUS[:23]]
                + [("COMMAND", "GETKEYS", "GET"), ("COMMAND", "GETKEYS", "BLPOP", "a", "b", "0"),
                   ("COMMAND", "GETKEYS", "XREAD", "BLOCK", "0", "STREAMS", "s", "t", "$", "$")])
    assert talk(service.port_number, [("COMMAND", "GETKEYS", "WAITAOF", "0", "0", "0")])[0].startswith(
        b"-ERR command 'WAITAOF' is not supported by twinproxy")


def test_reset_ends_multi_and_watch_and_transactions_run_in_the_clients_database(redis_servers, proxy) -> None:
    (server,) = redis_servers(1)
    service = proxy(pool_yaml([server]))
    assert_same(server.port, service.port_number, [
        ("SELECT", "3"), ("MULTI",), ("SET", "k", "queued"), ("RESET",), ("EXEC",), ("GET", "k"),
        ("SELECT", "3"), ("WATCH", "k"), ("RESET",), ("SELECT", "3"), ("MULTI",), ("SET", "k", "v3"), ("EXEC",),
        ("GET", "k"),
    ])
    assert server.client(db=3).get("k") == b"v3" and server.client(db=0).get("k") is None
    # WATCH in db 5 watches db 5's key: another client's write there aborts the EXEC.
    watcher = client(service, db=5, protocol=2, single_connection_client=True)
    other = client(service, db=5, protocol=2)
    with watcher.pipeline(transaction=True) as pipe:
        pipe.watch("w")
        other.set("w", "changed")
        pipe.multi()
        pipe.set("w", "mine")
        with pytest.raises(redis.WatchError):
            pipe.execute()
    assert server.client(db=5).get("w") == b"changed"
