"""Blocking commands through the proxy, against real redis-servers: leased connections, deadlines, Redis's replies."""

from __future__ import annotations

import select
import socket
import time
from typing import List

import pytest
import redis

from tests.conftest import in_reactor, key_on, pool_yaml
from tests.integration.test_redis_proxy import client, raw, raw_to, read_lines
from tests.resp_client import encode_command
from tests.servers import LOOPBACK, wait_until
from twinproxy.metrics import render
from twinproxy.protocols.redis_blocking import timeout_milliseconds
from twinproxy.stats import pool_document

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def three(redis_servers, proxy):
    backends = redis_servers(3)
    service = proxy(pool_yaml(backends, hash="fnv1a_64", distribution="ketama", hash_tag='"{}"', timeout=400))
    return backends, service


def owner(backends, service, key: str):
    """The backend (a RedisServer) the pool places ``key`` on."""
    name = service.pool.server_for_key(key.encode()).name
    return backends[[server.name for server in service.pool.servers].index(name)]


def blocked_on(backend) -> int:
    """How many of ``backend``'s clients are blocked now (CLIENT LIST's flag ``b``)."""
    return sum(1 for entry in backend.client().client_list() if "b" in entry.get("flags", ""))


def send(service, data: bytes) -> socket.socket:
    sock = socket.create_connection((LOOPBACK, service.port_number), timeout=5)
    sock.sendall(data)
    return sock


def lease_numbers(reactor, service) -> tuple:
    """(leased now, idle) over the pool's servers, read in the reactor thread."""
    def read():
        return (sum(link.leases.in_use_count for link in service.links),
                sum(link.leases.idle_count for link in service.links))
    return in_reactor(reactor, read)


def test_blpop_returns_nil_after_its_own_timeout_while_the_pool_timeout_is_400ms(three) -> None:
    _, service = three
    c = client(service, protocol=2)
    started = time.monotonic()
    assert c.blpop("{t}q", 1) is None                   # Redis's nil, not the proxy's timeout error
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 3, elapsed
    assert raw(service, encode_command(["BLPOP", "{t}q", "0.05"])) == b"*-1\r\n"
    assert raw(service, b"HELLO 3\r\n" + encode_command(["BLPOP", "{t}q", "0.05"]), expect=27).endswith(b"_\r\n")


def test_the_proxy_deadline_is_the_command_timeout_plus_the_pool_timeout(three) -> None:
    """A frozen server: the proxy gives up 1 s + 400 ms after sending BLPOP q 1, not at 400 ms."""
    backends, service = three
    c = client(service, protocol=2)
    backend = owner(backends, service, "{f}q")
    backend.freeze()
    try:
        started = time.monotonic()
        with pytest.raises(redis.ResponseError, match="timed out"):
            c.blpop("{f}q", 1)
        elapsed = time.monotonic() - started
    finally:
        backend.thaw()
    assert 1.35 <= elapsed < 3.5, elapsed


def test_rpush_wakes_exactly_one_of_several_blocked_clients(three) -> None:
    backends, service = three
    backend = owner(backends, service, "{w}q")
    socks = [send(service, encode_command(["BLPOP", "{w}q", "20"])) for _ in range(4)]
    try:
        wait_until(lambda: blocked_on(backend) == 4, what="4 clients blocked on the server")
        c = client(service, protocol=2)
        c.rpush("{w}q", "one")
        readable, _, _ = select.select(socks, [], [], 5)
        assert len(readable) >= 1
        wait_until(lambda: blocked_on(backend) == 3, what="3 still blocked")
        assert c.llen("{w}q") == 0
        c.rpush("{w}q", "two", "three", "four")
        got = sorted(read_lines(sock, 5).split(b"\r\n")[4] for sock in socks)
        assert got == [b"four", b"one", b"three", b"two"]     # one element each, none lost, none twice
    finally:
        for sock in socks:
            sock.close()


def test_a_client_killed_while_blocked_leaves_no_backend_connection(three, reactor) -> None:
    backends, service = three
    backend = owner(backends, service, "{k}q")
    sock = send(service, encode_command(["BLPOP", "{k}q", "0"]))
    wait_until(lambda: blocked_on(backend) == 1, what="the client blocked on the server")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")   # reset
    sock.close()
    wait_until(lambda: blocked_on(backend) == 0, what="its backend connection closed")
    client(service, protocol=2).rpush("{k}q", "item")
    assert backend.client().lrange("{k}q", 0, -1) == [b"item"]      # popped for nobody? no
    assert lease_numbers(reactor, service) == (0, 0)


def test_blmove_bzpopmin_xread_and_their_kin_block_then_wake(three) -> None:
    backends, service = three
    c = client(service, protocol=2)
    c.xgroup_create("{x}g", "grp", id="$", mkstream=True)
    cases = [   # (the key whose server blocks it, the command, what wakes it, the reply)
        ("{m}src", encode_command(["BLMOVE", "{m}src", "{m}dst", "LEFT", "RIGHT", "10"]),
         lambda: c.rpush("{m}src", "v"), b"$1\r\nv\r\n"),
        ("{m}a", encode_command(["BRPOPLPUSH", "{m}a", "{m}b", "10"]), lambda: c.rpush("{m}a", "w"), b"$1\r\nw\r\n"),
        ("{m}l1", encode_command(["BLMPOP", "10", "2", "{m}l1", "{m}l2", "RIGHT"]), lambda: c.rpush("{m}l2", "x"),
         b"*2\r\n$5\r\n{m}l2\r\n*1\r\n$1\r\nx\r\n"),
        ("{z}s", encode_command(["BZPOPMIN", "{z}s", "10"]), lambda: c.zadd("{z}s", {"a": 1}),
         b"*3\r\n$4\r\n{z}s\r\n$1\r\na\r\n$1\r\n1\r\n"),
        ("{z}t", encode_command(["BZMPOP", "10", "1", "{z}t", "MAX"]), lambda: c.zadd("{z}t", {"b": 2}),
         b"*2\r\n$4\r\n{z}t\r\n*1\r\n*2\r\n$1\r\nb\r\n$1\r\n2\r\n"),
        ("{x}s", encode_command(["XREAD", "BLOCK", "10000", "STREAMS", "{x}s", "$"]),
         lambda: c.xadd("{x}s", {"f": "v"}, id="5-1"),
         b"*1\r\n*2\r\n$4\r\n{x}s\r\n*1\r\n*2\r\n$3\r\n5-1\r\n*2\r\n$1\r\nf\r\n$1\r\nv\r\n"),
        ("{x}g", encode_command(["XREADGROUP", "GROUP", "grp", "c1", "BLOCK", "10000", "STREAMS", "{x}g", ">"]),
         lambda: c.xadd("{x}g", {"f": "w"}, id="6-1"),
         b"*1\r\n*2\r\n$4\r\n{x}g\r\n*1\r\n*2\r\n$3\r\n6-1\r\n*2\r\n$1\r\nf\r\n$1\r\nw\r\n"),
    ]
    for key, request, wake, expected in cases:
        backend = owner(backends, service, key)
        sock = send(service, request)
        try:
            wait_until(lambda: blocked_on(backend) == 1, what=f"{request!r} blocked on its server")  # noqa: B023
            wake()
            assert read_lines(sock, expected.count(b"\r\n")) == expected, request
        finally:
            sock.close()


def test_timeouts_of_each_command_give_redis_own_nil(three) -> None:
    backends, service = three
    target = owner(backends, service, "{n}a")
    for words in (["BLMOVE", "{n}a", "{n}b", "LEFT", "RIGHT", "0.01"], ["BRPOP", "{n}a", "0.01"],
                  ["BLMPOP", "0.01", "1", "{n}a", "LEFT"], ["BZPOPMAX", "{n}a", "0.01"],
                  ["BZMPOP", "0.01", "1", "{n}a", "MIN"], ["XREAD", "BLOCK", "10", "STREAMS", "{n}a", "$"],
                  ["XREAD", "COUNT", "1", "STREAMS", "{n}a", "0"]):
        request = encode_command(words)
        assert raw(service, request) == raw_to(LOOPBACK, target.port, request), request


@pytest.mark.parametrize("line", [
    "BLPOP {e}q -1", "BLPOP {e}q x", "BLPOP {e}q 1e400", "BLPOP {e}q nan", "BLPOP {e}q inf", "BLPOP {e}q",
    "BLPOP", "BRPOPLPUSH {e}a {e}b -1", "BLMOVE {e}a {e}b LEFT UP -1", "BLMOVE {e}a {e}b LEFT RIGHT x",
    "BLMPOP -1 1 {e}q LEFT", "BLMPOP 0.01 x {e}q LEFT", "BLMPOP 0.01 2 {e}q LEFT", "BLMPOP 0.01 1 {e}q UP",
    "BLMPOP 0.01 1 {e}q LEFT COUNT 0", "BZPOPMIN {e}z -1", "BZMPOP x 1 {e}z MIN", "BZMPOP 1 -1 {e}z MIN",
    "XREAD BLOCK -1 STREAMS {e}s 0", "XREAD BLOCK x STREAMS {e}s 0", "XREAD BLOCK 1.5 STREAMS {e}s 0",
    "XREAD BLOCK 10 STREAMS {e}s {e}t $", "XREAD BLOCK 10 STREAMS", "XREAD BLOCK 10 FOO 1 STREAMS {e}s 0",
    "XREADGROUP GROUP g c BLOCK 10 STREAMS {e}s >", "XREADGROUP GROUP g c BLOCK -1 STREAMS {e}s >",
    "XREAD BLOCK 10 GROUP g c STREAMS {e}s 0",
])
def test_bad_invocations_get_the_servers_own_errors(three, line) -> None:
    backends, service = three
    request = line.encode() + b"\r\n"
    assert raw(service, request) == raw_to(LOOPBACK, owner(backends, service, "{e}q").port, request)


def test_cross_server_keys_get_the_hash_tag_error(three) -> None:
    _, service = three
    a, b = key_on(service, 0, "x"), key_on(service, 1, "y")
    assert raw(service, encode_command(["BRPOP", a, b, "1"])) == (
        b"-ERR keys in request don't hash to the same server (use a hash tag to keep them together)\r\n")


def test_wait_stays_refused(three) -> None:
    _, service = three
    assert raw(service, b"WAIT 0 0\r\n").startswith(b"-ERR command 'WAIT' is not supported by twinproxy")


def test_requests_pipelined_around_a_blocking_command_keep_their_order(three) -> None:
    _, service = three
    pipeline = [["DEL", "{p}q"], ["RPUSH", "{p}q", "a"], ["BLPOP", "{p}q", "1"], ["GET", "{p}k"]]
    got = raw(service, b"".join(map(encode_command, pipeline)) + b"PING\r\n", expect=8)
    assert got == b":0\r\n:1\r\n*2\r\n$4\r\n{p}q\r\n$1\r\na\r\n$-1\r\n+PONG\r\n"


# The timeouts' reading: the proxy's deadline must never cut a timeout Redis accepts.
TIMEOUTS = [b"-0", b"0", b"0.001", b"0.0001", b"1e-9", b"1e-4940", b"0x1p-20", b".5e-3", b"+0.01", b"-0.0001",
            b"-0.001", b"-0.002", b"-1", b"1e400", b"inf", b"-inf", b"nan", b"x", b"", b" 1", b"1 ", b"1_0",
            b"1e5000", b"1e-5000", b"9223372036854775.807", b"9223372036854775.808", b"9223372036854776", b"20",
            b"0x14", b"20.", b"2e1", b"\0abc", b"0.01\0x", b"0." + b"0" * 5100 + b"1", b"0." + b"0" * 5117 + b"1",
            b"0x1p99999", b"1e-4951", b"1e-4952"]


def test_seconds_timeouts_are_read_as_the_server_reads_them(redis_servers) -> None:
    """For each text: a refusal, a nil within moments, or still blocked after 0.5 s — as the proxy's reading says."""
    (backend,) = redis_servers(1)
    for text in TIMEOUTS:
        milliseconds = timeout_milliseconds(text)
        with socket.create_connection((LOOPBACK, backend.port), timeout=5) as sock:
            sock.sendall(b"*3\r\n$5\r\nBLPOP\r\n$6\r\nnokey!\r\n$%d\r\n%s\r\n" % (len(text), text))
            ready, _, _ = select.select([sock], [], [], 0.5)
            got = read_lines(sock, 1) if ready else b"(blocked)"
        if milliseconds is None:
            assert got == b"-ERR timeout is not a float or out of range\r\n", text
        elif milliseconds < 0:
            assert got == b"-ERR timeout is negative\r\n", text
        elif milliseconds == 0 or milliseconds >= 10000:
            assert got == b"(blocked)", text
        else:
            assert milliseconds <= 100 and got == b"*-1\r\n", (text, milliseconds)


def test_lease_exhaustion_gives_a_clear_error_at_once(redis_servers, proxy) -> None:
    backends = redis_servers(1)
    service = proxy(pool_yaml(backends, server_leased_connections=2, timeout=400))
    socks = [send(service, encode_command(["BLPOP", "q", "0"])) for _ in range(2)]
    try:
        wait_until(lambda: blocked_on(backends[0]) == 2, what="2 clients blocked")
        c = client(service, protocol=2)
        started = time.monotonic()
        with pytest.raises(redis.ResponseError, match=r"no connection to lend for BLPOP on server .*: "
                                                      r"server_leased_connections \(2\) are all in use"):
            c.blpop("q", 0)
        assert time.monotonic() - started < 1
        assert c.ping()                      # the client goes on
        socks.pop().close()
        wait_until(lambda: blocked_on(backends[0]) == 1, what="one lease back")
        c.rpush("q", "a")
        assert socks[0].recv(100).endswith(b"$1\r\na\r\n")
        c.rpush("q", "b")
        assert c.blpop("q", 1) == (b"q", b"b")
    finally:
        for sock in socks:
            sock.close()


def test_a_thousand_sequential_blpops_reuse_a_leased_connection(three) -> None:
    backends, service = three
    backend = owner(backends, service, "{r}q")

    def connections_received() -> int:
        return backend.client().info("stats")["total_connections_received"]

    c = client(service, protocol=2, single_connection_client=True)
    c.ping()
    before = connections_received()
    for i in range(1000):
        c.rpush("{r}q", i)
        assert c.blpop("{r}q", 1) == (b"{r}q", b"%d" % i)
    # One shared connection for the RPUSHes, one leased for every BLPOP (the probe's own is the +1).
    assert connections_received() - before <= 3


def test_many_blocked_clients_do_not_slow_other_clients(redis_servers, proxy, reactor) -> None:
    backends = redis_servers(3)
    service = proxy(pool_yaml(backends, hash="fnv1a_64", distribution="ketama", timeout=400,
                              server_leased_connections=100))
    c = client(service, protocol=2)
    keys = [f"g{i}" for i in range(200)]
    c.mset({key: key for key in keys})

    def gets() -> float:
        started = time.monotonic()
        for key in keys:
            assert c.get(key) == key.encode()
        return time.monotonic() - started

    baseline = gets()
    socks: List[socket.socket] = []
    try:
        for i in range(120):
            socks.append(send(service, encode_command(["BLPOP", key_on(service, i % 3, f"bq{i}-"), "0"])))
        wait_until(lambda: sum(blocked_on(backend) for backend in backends) == 120, timeout=10,
                   what="120 clients blocked on 3 servers")
        document = in_reactor(reactor, pool_document, service)
        assert document["blocked_clients"] == 120
        assert sum(document[server.spec.stats_name]["leased_connections"] for server in service.pool.servers) == 120
        loaded = gets()
        assert loaded < baseline * 5 + 1, (baseline, loaded)
        text = in_reactor(reactor, render, lambda: [service], 0.0, reactor).decode()
        assert 'twinproxy_pool_blocked_clients{pool="alpha"} 120.0' in text
    finally:
        for sock in socks:
            sock.close()
    wait_until(lambda: sum(blocked_on(backend) for backend in backends) == 0, timeout=10,
               what="every blocked client's connection closed")
    assert lease_numbers(reactor, service)[0] == 0


def test_client_list_shows_a_blocked_client_and_client_kill_ends_its_lease(three) -> None:
    backends, service = three
    backend = owner(backends, service, "{c}q")
    sock = send(service, encode_command(["BLPOP", "{c}q", "0"]))
    try:
        wait_until(lambda: blocked_on(backend) == 1, what="the client blocked on the server")
        c = client(service, protocol=2)
        (entry,) = [e for e in c.client_list() if e["cmd"] == "blpop"]
        assert "b" in entry["flags"]                    # as Redis shows a blocked client
        assert c.client_kill_filter(_id=entry["id"]) == 1
        wait_until(lambda: blocked_on(backend) == 0, what="its leased connection closed")
        assert sock.recv(100) == b""                    # killed: closed without a reply
    finally:
        sock.close()
