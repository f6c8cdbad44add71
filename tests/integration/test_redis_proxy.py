"""The Redis path end to end: real redis-servers, the proxy in-process, redis-py clients."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest
import redis

from tests.conftest import in_reactor, key_on, pool_yaml
from tests.servers import LOOPBACK, require, wait_until
from twinproxy.config import ListenSpec, load_text


def client(service, **kwargs) -> redis.Redis:
    kwargs.setdefault("socket_timeout", 5)
    kwargs.setdefault("socket_connect_timeout", 5)
    return redis.Redis(host=LOOPBACK, port=service.port_number, **kwargs)


def raw(service, data: bytes, expect: int = 1, timeout: float = 5) -> bytes:
    """Send ``data`` on a fresh socket; read until ``expect`` CRLF-ended lines or the peer closes."""
    return raw_to(LOOPBACK, service.port_number, data, expect, timeout)


def raw_to(host: str, port: int, data: bytes, expect: int = 1, timeout: float = 5) -> bytes:
    """``raw`` to any address (a backend directly, to compare with Redis's own answer)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_lines(sock, expect)


def read_lines(sock: socket.socket, expect: int) -> bytes:
    """Read until ``expect`` CRLF-ended lines have come or the peer closes (within the socket's timeout)."""
    got = b""
    while got.count(b"\r\n") < expect:
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def owner(backends, key: str) -> int:
    """Index of the backend that holds ``key``."""
    found = [i for i, b in enumerate(backends) if b.client().exists(key)]
    assert len(found) == 1, (key, found)
    return found[0]


def test_keys_land_where_the_ring_says_and_round_trip(redis_servers, proxy) -> None:
    backends = redis_servers(3)
    service = proxy(pool_yaml(backends, hash="fnv1a_64", distribution="ketama"))
    c = client(service, protocol=2)
    names = [s.name for s in service.pool.servers]
    for i in range(60):
        key = f"key:{i}"
        assert c.set(key, f"v{i}")
        assert c.get(key) == f"v{i}".encode()
        expected = names.index(service.pool.server_for_key(key.encode()).name)
        assert owner(backends, key) == expected


def test_default_redis_py_client_works(redis_servers, proxy) -> None:
    """redis-py 8 opens with HELLO 3 and CLIENT SETINFO; nutcracker closes such connections."""
    backends = redis_servers(2)
    service = proxy(pool_yaml(backends))
    c = redis.Redis(host=LOOPBACK, port=service.port_number, socket_timeout=5)
    assert c.ping() is True
    assert c.set("a", "1") and c.get("a") == b"1"
    c.hset("h", mapping={"f1": "1", "f2": "2"})
    assert c.hgetall("h") == {b"f1": b"1", b"f2": b"2"}  # a RESP3 map, passed through
    c.zadd("z", {"m": 1.5})
    assert c.zscore("z", "m") == 1.5  # a RESP3 double
    assert c.client_setname("me") and c.client_getname() in (b"me", "me")
    assert c.echo("hi") == b"hi"


def test_pipeline_of_1000_across_3_servers_keeps_order(redis_servers, proxy) -> None:
    backends = redis_servers(3)
    # fnv1a_64 (the default) clusters short sequential keys; murmur spreads them.
    service = proxy(pool_yaml(backends, hash="murmur"))
    c = client(service)
    pipe = c.pipeline(transaction=False)
    for i in range(500):
        pipe.set(f"p:{i}", i)
        pipe.get(f"p:{i}")
    replies = pipe.execute()
    assert replies == [x for i in range(500) for x in (True, str(i).encode())]
    assert {owner(backends, f"p:{i}") for i in range(500)} == {0, 1, 2}


def test_multi_key_commands_across_servers(redis_servers, proxy) -> None:
    backends = redis_servers(3)
    service = proxy(pool_yaml(backends, hash="murmur"))
    c = client(service)
    keys = [f"m:{i}" for i in range(60)]
    assert c.mset({k: k.upper() for k in keys}) is True
    assert len({service.pool.server_for_key(k.encode()) for k in keys}) == 3
    assert c.mget(keys + ["missing"]) == [k.upper().encode() for k in keys] + [None]
    assert c.exists(*keys[:10], "missing") == 10
    assert c.touch(*keys[:5]) == 5
    assert c.delete(*keys[:20]) == 20
    assert c.unlink(*keys) == 40
    assert c.mget(keys[:3]) == [None, None, None]


def test_same_server_commands_and_hash_tags(redis_servers, proxy) -> None:
    backends = redis_servers(3)
    service = proxy(pool_yaml(backends, hash_tag='"{}"'))
    c = client(service)
    c.sadd("{u1}:a", "x", "y")
    c.sadd("{u1}:b", "y")
    assert c.sinter("{u1}:a", "{u1}:b") == {b"y"}
    c.set("{u1}:s", "v")
    assert c.eval("return redis.call('get', KEYS[1])", 1, "{u1}:s") == b"v"
    spread = [key_on(service, 0, "s"), key_on(service, 1, "s")]
    with pytest.raises(redis.ResponseError, match="don't hash to the same server"):
        c.sinter(*spread)
    # SORT ... STORE and GEORADIUS ... STORE write a second key: it must be on the same server.
    c.rpush("{u1}:l", 3, 1, 2)
    assert c.sort("{u1}:l", store="{u1}:sorted") == 3
    assert c.lrange("{u1}:sorted", 0, -1) == [b"1", b"2", b"3"]
    assert backends[owner(backends, "{u1}:l")].client().lrange("{u1}:sorted", 0, -1) == [b"1", b"2", b"3"]
    c.rpush(spread[0], 2, 1)
    with pytest.raises(redis.ResponseError, match="don't hash to the same server"):
        c.sort(spread[0], store=spread[1])


def test_unsupported_commands_error_and_connection_stays(redis_servers, proxy) -> None:
    backends = redis_servers(2)
    service = proxy(pool_yaml(backends))
    c = client(service, single_connection_client=True)
    for call, name in ((lambda: c.execute_command("SWAPDB", 0, 1), "SWAPDB"),
                       (lambda: c.execute_command("WAIT", 1, 0), "WAIT"),
                       (lambda: c.config_set("maxmemory", 1), "CONFIG SET")):
        with pytest.raises(redis.ResponseError, match=name):
            call()
    assert c.ping() is True


def test_inline_commands(redis_servers, proxy) -> None:
    service = proxy(pool_yaml(redis_servers(2)))
    assert raw(service, b'set greeting "hello world"\r\nget greeting\r\nPING\r\n', expect=4) == \
        b"+OK\r\n$11\r\nhello world\r\n+PONG\r\n"


def test_auth_with_redis_auth(redis_servers, proxy) -> None:
    backends = redis_servers(2, password="sekrit")
    service = proxy(pool_yaml(backends, redis_auth="sekrit", redis_db="2"))
    anonymous = client(service, protocol=2)
    with pytest.raises(redis.AuthenticationError):
        anonymous.get("x")
    with pytest.raises(redis.AuthenticationError):
        client(service, password="wrong", protocol=2).ping()
    good = client(service, password="sekrit")  # redis-py 8: HELLO 3 AUTH default sekrit
    assert good.set("k", "v") and good.get("k") == b"v"
    where = [b.client(db=2).exists("k") for b in backends].index(1)
    assert backends[where].client(db=0).get("k") is None
    assert backends[where].client(db=2).get("k") == b"v"


def test_select_within_the_pools_databases(redis_servers, proxy) -> None:
    """More in test_redis_sessions.py."""
    service = proxy(pool_yaml(redis_servers(1), databases="2"))
    c = client(service, protocol=2, single_connection_client=True)
    assert c.execute_command("SELECT", 1) in (True, b"OK", "OK")
    with pytest.raises(redis.ResponseError, match="DB index is out of range"):
        c.execute_command("SELECT", 2)


def test_client_connections_cap(redis_servers, proxy) -> None:
    service = proxy(pool_yaml(redis_servers(1), client_connections="2"))
    held = [socket.create_connection((LOOPBACK, service.port_number), timeout=5) for _ in range(2)]
    try:
        for sock in held:
            sock.sendall(b"PING\r\n")
            assert sock.recv(100) == b"+PONG\r\n"
        assert raw(service, b"PING\r\n") == b"-ERR max number of clients reached\r\n"
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: len(service.factory.clients) == 0, what="clients to go")
    assert raw(service, b"PING\r\n") == b"+PONG\r\n"


def test_unix_socket_listener_with_mode(redis_servers, proxy, tmp_path) -> None:
    path = str(tmp_path / "tp.sock")
    (config,) = load_text(pool_yaml(redis_servers(1)))
    import dataclasses

    proxy(dataclasses.replace(config, listen=ListenSpec(path=path, mode=0o600)))
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o600)
    c = redis.Redis(unix_socket_path=path, socket_timeout=5)
    assert c.set("u", "1") and c.get("u") == b"1"


def test_backend_killed_then_recovers_after_retry(redis_servers, proxy) -> None:
    backends = redis_servers(2)
    service = proxy(pool_yaml(backends, timeout="500", auto_eject_hosts="true", server_failure_limit="1",
                              server_retry_timeout="1000"))
    c = client(service, protocol=2)
    dead_key = key_on(service, 0)
    assert c.set(dead_key, "before")
    backends[0].kill()
    with pytest.raises(redis.ResponseError, match="Connection"):
        c.get(dead_key)
    # Ejected: the key now lives on the other server; nothing hangs.
    wait_until(lambda: len(service.pool.live_servers) == 1, what="ejection")
    assert c.set(dead_key, "during") and c.get(dead_key) == b"during"
    backends[0].restart()
    wait_until(lambda: len(service.pool.live_servers) == 2, timeout=5, what="retry")
    wait_until(lambda: c.set(dead_key, "after"), what="recovered server to answer")
    assert c.get(dead_key) == b"after"
    assert backends[0].client().get(dead_key) == b"after"


def test_backend_frozen_times_out_while_others_serve(redis_servers, proxy) -> None:
    backends = redis_servers(2)
    service = proxy(pool_yaml(backends, timeout="300"))
    c = client(service, protocol=2)
    frozen_key, live_key = key_on(service, 0), key_on(service, 1)
    c.set(frozen_key, "x")
    backends[0].freeze()
    try:
        # When the timeout fires is the fake-clock unit tests' business (tests/unit/test_proxying.py);
        # here: it fires, it is counted against the frozen server, and it comes in bounded time.
        started = time.monotonic()
        with pytest.raises(redis.ResponseError, match="timed out"):
            c.get(frozen_key)
        elapsed = time.monotonic() - started
        assert elapsed < 0.3 + 2, elapsed
        assert [s.counters.server_timedout for s in service.pool.servers] == [1, 0]
        other = client(service, protocol=2)
        assert other.set(live_key, "y") and other.get(live_key) == b"y"
    finally:
        backends[0].thaw()
    wait_until(lambda: c.get(frozen_key) == b"x", what="thawed server to answer")


def test_redis_benchmark_runs_clean(redis_servers, proxy) -> None:
    require("redis-benchmark")
    service = proxy(pool_yaml(redis_servers(3)))
    result = subprocess.run(["redis-benchmark", "-h", LOOPBACK, "-p", str(service.port_number), "-t",
                             "set,get,mset", "-n", "3000", "-c", "20", "-q"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    for name in ("SET", "GET", "MSET"):
        assert name in result.stdout, result.stdout
    assert "ERR" not in result.stdout + result.stderr


def test_stop_leaves_nothing_running(redis_servers, proxy, reactor) -> None:
    service = proxy(pool_yaml(redis_servers(1), preconnect="true"))
    wait_until(lambda: sum(link.connection_count for link in service.links) == 1, what="preconnect")
    in_reactor(reactor, service.stopService)
    assert all(link.connection_count == 0 for link in service.links)
    with pytest.raises(OSError):
        socket.create_connection((LOOPBACK, service.port_number), timeout=1).close()
