"""Hostile input: each gets an error (or a close) for that client only; everyone else carries on."""

from __future__ import annotations

import socket

import pytest
import redis
from pymemcache import Client

from tests.conftest import pool_yaml
from tests.servers import LOOPBACK


def exchange(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send ``data``, then read until the proxy closes or goes quiet."""
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass  # the proxy may close while we still send
        sock.settimeout(1)
        got = b""
        while True:
            try:
                chunk = sock.recv(1 << 20)
            except socket.timeout:
                return got
            except OSError:
                return got
            if not chunk:
                return got + b"<closed>"
            got += chunk


@pytest.fixture
def redis_proxy(redis_servers, proxy):
    return proxy(pool_yaml(redis_servers(2), max_request_bytes="1048576", timeout="5000"))


@pytest.fixture
def memcache_proxy(memcached_servers, proxy):
    return proxy(pool_yaml(memcached_servers(2), max_request_bytes="1048576", timeout="5000"))


REDIS_CASES = [
    ("request over max_request_bytes", b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2000000\r\n" + b"x" * 100,
     b"-ERR Protocol error: invalid bulk length\r\n<closed>"),
    ("many args over max_request_bytes", b"*100000\r\n" + b"$20\r\n" + b"a" * 20 + b"\r\n" * 1 +
     b"".join(b"$20\r\n" + b"b" * 20 + b"\r\n" for _ in range(60000)),
     b"-ERR Protocol error: request bigger than 1048576 bytes\r\n<closed>"),
    ("bulk length 2^63", b"*1\r\n$9223372036854775808\r\n", b"-ERR Protocol error: invalid bulk length\r\n<closed>"),
    ("negative bulk length", b"*2\r\n$3\r\nGET\r\n$-5\r\n", b"-ERR Protocol error: invalid bulk length\r\n<closed>"),
    ("multibulk count 2^40", b"*1099511627776\r\n", b"-ERR Protocol error: invalid multibulk length\r\n<closed>"),
    ("megabytes with no CRLF", b"*" + b"9" * (2 * 1024 * 1024),
     b"-ERR Protocol error: too big mbulk count string\r\n<closed>"),
    ("inline megabytes with no newline", b"GET " + b"k" * (2 * 1024 * 1024),
     b"-ERR Protocol error: too big inline request\r\n<closed>"),
    ("garbage type byte inside a multibulk", b"*2\r\n$3\r\nGET\r\n\x00\xff\xfe\r\n",
     b"-ERR Protocol error: expected '$', got '\\x00'\r\n<closed>"),
]


@pytest.mark.parametrize("name, data, reply", REDIS_CASES, ids=[c[0] for c in REDIS_CASES])
def test_redis_hostile_input(redis_proxy, name: str, data: bytes, reply: bytes) -> None:
    bystander = redis.Redis(host=LOOPBACK, port=redis_proxy.port_number, protocol=2, socket_timeout=10)
    bystander.set("safe", "1")
    assert exchange(redis_proxy.port_number, data) == reply
    assert bystander.get("safe") == b"1"


def test_redis_nul_bytes_and_oversized_mget(redis_proxy) -> None:
    c = redis.Redis(host=LOOPBACK, port=redis_proxy.port_number, protocol=2, socket_timeout=30)
    assert c.set(b"nul\x00key", b"v\x00") and c.get(b"nul\x00key") == b"v\x00"
    keys = [f"many:{i}" for i in range(100_000)]  # 1.6 MB of request, over this pool's 1 MiB
    other = redis.Redis(host=LOOPBACK, port=redis_proxy.port_number, protocol=2, socket_timeout=30)
    with pytest.raises(redis.ResponseError, match="request bigger than 1048576 bytes"):
        other.mget(keys)
    assert c.ping()


def test_redis_100k_key_mget_within_limits(redis_servers, proxy) -> None:
    service = proxy(pool_yaml(redis_servers(3), hash="murmur", timeout="20000"))
    c = redis.Redis(host=LOOPBACK, port=service.port_number, protocol=2, socket_timeout=60)
    keys = [f"many:{i}" for i in range(100_000)]
    c.mset({k: k for k in keys[::100]})
    values = c.mget(keys)
    assert len(values) == 100_000
    assert values[::100] == [k.encode() for k in keys[::100]]
    assert sum(v is not None for v in values) == 1000


MEMCACHE_CASES = [
    ("value over max_request_bytes", b"set k 0 0 2000000\r\n", b"SERVER_ERROR object too large for cache\r\n"),
    ("negative length", b"set k 0 0 -1\r\n", b"CLIENT_ERROR bad command line format\r\n"),
    ("length 2^63", b"set k 0 0 9223372036854775808\r\n", b"CLIENT_ERROR bad command line format\r\n"),
    ("NUL in a key", b"set a\x00b 0 0 1\r\nx\r\n", b"CLIENT_ERROR bad command line format\r\n"),
    ("megabytes with no newline", b"x" * (2 * 1024 * 1024), b"CLIENT_ERROR line too long\r\n<closed>"),
    ("garbage", b"\x00\xff\xfe\r\n", b"ERROR\r\n"),
]


@pytest.mark.parametrize("name, data, reply", MEMCACHE_CASES, ids=[c[0] for c in MEMCACHE_CASES])
def test_memcache_hostile_input(memcache_proxy, name: str, data: bytes, reply: bytes) -> None:
    bystander = Client((LOOPBACK, memcache_proxy.port_number), timeout=10, default_noreply=False)
    bystander.set("safe", b"1")
    assert exchange(memcache_proxy.port_number, data) == reply
    assert bystander.get("safe") == b"1"


def test_memcache_100k_key_get(memcached_servers, proxy) -> None:
    service = proxy(pool_yaml(memcached_servers(3), hash="murmur", timeout="20000"))
    c = Client((LOOPBACK, service.port_number), timeout=60, default_noreply=False)
    keys = [f"m{i}" for i in range(100_000)]
    c.set_many({k: k.encode() for k in keys[::100]})
    with socket.create_connection((LOOPBACK, service.port_number), timeout=60) as sock:
        sock.sendall(b"get " + " ".join(keys).encode() + b"\r\n")
        data = b""
        while not data.endswith(b"END\r\n"):
            chunk = sock.recv(1 << 20)
            assert chunk
            data += chunk
    assert data.count(b"VALUE ") == 1000
    assert data.startswith(b"VALUE m0 0 2\r\nm0\r\nVALUE m100 ")
