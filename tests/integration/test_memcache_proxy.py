"""The memcached path end to end: real memcached processes, the proxy in-process."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest
from pymemcache.client.base import Client
from pymemcache.exceptions import MemcacheClientError, MemcacheServerError

from tests.conftest import key_on, pool_yaml
from tests.servers import LOOPBACK, require, wait_until


def client(service, **kwargs) -> Client:
    kwargs.setdefault("timeout", 5)
    kwargs.setdefault("connect_timeout", 5)
    return Client((LOOPBACK, service.port_number), **kwargs)


class Raw:
    """A raw socket to the proxy that reads replies byte-exact."""

    def __init__(self, service, timeout: float = 5) -> None:
        self.sock = socket.create_connection((LOOPBACK, service.port_number), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> "Raw":
        self.sock.sendall(data)
        return self

    def read_until(self, terminator: bytes, count: int = 1) -> bytes:
        while self.buf.count(terminator) < count:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                break
            self.buf += chunk
        out, self.buf = self.buf, b""
        return out

    def read_exactly(self, size: int) -> bytes:
        while len(self.buf) < size:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                break
            self.buf += chunk
        out, self.buf = self.buf[:size], self.buf[size:]
        return out

    def closed(self) -> bool:
        return self.sock.recv(10) == b""

    def close(self) -> None:
        self.sock.close()


def test_memccapable_passes_every_ascii_check(memcached_servers, proxy) -> None:
    require("memccapable")
    service = proxy(pool_yaml(memcached_servers(3), timeout="2000"))
    result = subprocess.run(["memccapable", "-a", "-h", LOOPBACK, "-p", str(service.port_number), "-t", "5"],
                            capture_output=True, text=True, timeout=120)
    assert "All tests passed" in result.stdout or result.stdout.count("[pass]") == 27, result.stdout
    assert "[FAIL]" not in result.stdout, result.stdout
    assert result.stdout.count("[pass]") == 27, result.stdout


def test_pymemcache_single_and_multi_across_3_servers(memcached_servers, proxy) -> None:
    backends = memcached_servers(3)
    service = proxy(pool_yaml(backends, hash="murmur"))
    c = client(service)
    assert c.set("one", b"1") is True
    assert c.get("one") == b"1"
    values = {f"key:{i}": f"value-{i}".encode() for i in range(60)}
    assert c.set_many(values) == []
    owners = {service.pool.server_for_key(k.encode()).name for k in values}
    assert len(owners) == 3
    assert c.get_many(list(values) + ["missing"]) == values
    # Every key is on the server the ring names, and only there.
    names = [s.name for s in service.pool.servers]
    for key in list(values)[:20]:
        holders = [i for i, b in enumerate(backends) if b.client().get(key) is not None]
        assert holders == [names.index(service.pool.server_for_key(key.encode()).name)]
    assert c.delete_many(list(values)[:10]) is True
    assert c.get_many(list(values)[:10]) == {}


def test_pymemcache_cas_incr_touch_noreply(memcached_servers, proxy) -> None:
    service = proxy(pool_yaml(memcached_servers(3)))
    c = client(service, default_noreply=False)
    c.set("c", b"v1")
    value, token = c.gets("c")
    assert value == b"v1"
    assert c.cas("c", b"v2", token) is True
    assert c.cas("c", b"v3", token) is False
    assert c.get("c") == b"v2"
    c.set("n", b"10")
    assert c.incr("n", 5) == 15
    assert c.decr("n", 20) == 0
    assert c.incr("absent", 1) is None
    assert c.incr("n", 2**64 - 1) == 2**64 - 1
    assert c.touch("n", 100) is True
    assert c.touch("absent", 100) is False
    assert c.add("n", b"x") is False
    assert c.replace("n", b"r") is True
    assert c.append("n", b"+") is True and c.prepend("n", b"-") is True
    assert c.get("n") == b"-r+"
    # noreply: nothing comes back, and the next reply is still the right one.
    assert c.set("q", b"quiet", noreply=True) is True
    assert c.delete("missing", noreply=True) is True
    assert c.get("q") == b"quiet"
    raw = Raw(service)
    assert raw.send(b"gat 100 q nope\r\ngats 100 q\r\n").read_until(b"END\r\n", 2).startswith(
        b"VALUE q 0 5\r\nquiet\r\nEND\r\nVALUE q 0 5 ")
    raw.close()
    with pytest.raises(MemcacheClientError, match="non-numeric"):
        c.incr("q", 1)


def mixed_pipeline(count: int) -> bytes:
    out = []
    for i in range(count):
        key = b"p%d" % (i % 37)
        kind = i % 8
        if kind == 0:
            out.append(b"set %s %d 0 %d\r\n%s\r\n" % (key, i, len(key) + 1, key + b"!"))
        elif kind == 1:
            out.append(b"get %s p%d nothere\r\n" % (key, (i * 7) % 37))
        elif kind == 2:
            out.append(b"add %s 0 0 1 noreply\r\nx\r\n" % key)
        elif kind == 3:
            out.append(b"append %s 0 0 2\r\nab\r\n" % key)
        elif kind == 4:
            out.append(b"set n%d 0 0 1\r\n5\r\nincr n%d 3\r\n" % (i % 5, i % 5))
        elif kind == 5:
            out.append(b"delete %s%s\r\n" % (key, b" noreply" if i % 3 else b""))
        elif kind == 6:
            out.append(b"touch %s 100\r\n" % key)
        else:
            out.append(b"bogus command\r\nversion\r\n" if i % 2 else b"get %s\r\n" % key)
    return b"".join(out)


TERMINATOR = b"set end-marker 0 0 3\r\nfin\r\nget end-marker\r\n"
TERMINATOR_REPLY = b"STORED\r\nVALUE end-marker 0 3\r\nfin\r\nEND\r\n"


def run_stream(port: int, stream: bytes) -> bytes:
    """Send ``stream`` and the terminator on one connection; return every reply byte before it."""
    with socket.create_connection((LOOPBACK, port), timeout=10) as sock:
        sock.sendall(stream + TERMINATOR)
        data = b""
        while not data.endswith(TERMINATOR_REPLY):
            chunk = sock.recv(1 << 20)
            assert chunk, f"connection closed after {data[-200:]!r}"
            data += chunk
    return data[:-len(TERMINATOR_REPLY)]


def normalise_version(replies: bytes) -> bytes:
    import re

    return re.sub(rb"VERSION [^\r]*\r\n", b"VERSION x\r\n", replies)


def test_pipeline_of_500_mixed_commands_is_byte_exact_with_one_memcached(memcached_servers, proxy) -> None:
    backends = memcached_servers(4)
    service = proxy(pool_yaml(backends[:3], hash="murmur"))
    stream = mixed_pipeline(500)
    # The proxy over three servers must answer exactly as one memcached does.
    expected = run_stream(backends[3].port, stream)
    got = run_stream(service.port_number, stream)
    assert normalise_version(got) == normalise_version(expected)
    assert len({service.pool.server_for_key(b"p%d" % i) for i in range(37)}) == 3


def test_one_mebibyte_value_and_one_byte_writes(memcached_servers, proxy) -> None:
    service = proxy(pool_yaml(memcached_servers(2)))
    value = (bytes(range(256)) * 4096)[:1024 * 1024 - 100]
    c = client(service, default_noreply=False)
    # memcached's default item limit is 1 MiB including its header; this is the largest that fits.
    assert c.set("big", value) is True
    assert c.get("big") == value
    too_big = b"x" * (2 * 1024 * 1024)
    with pytest.raises(MemcacheServerError, match="too large"):
        c.set("huge", too_big)
    assert c.get("big") == value  # the connection is still in step
    raw = Raw(service)
    request = b"set tiny 7 0 3\r\nabc\r\nget tiny\r\n"
    for byte in request:
        raw.send(bytes([byte]))
    assert raw.read_until(b"END\r\n") == b"STORED\r\nVALUE tiny 7 3\r\nabc\r\nEND\r\n"
    raw.close()


def test_exactly_one_mebibyte_value_with_a_larger_item_limit(memcached_servers, proxy, tmp_path) -> None:
    from tests.servers import MemcachedServer

    server = MemcachedServer(tmp_path / "big")
    backend = server.start(extra=["-I", "2m"])
    try:
        service = proxy(pool_yaml([backend]))
        value = bytes(range(256)) * 4096
        assert len(value) == 1024 * 1024
        c = client(service, default_noreply=False)
        assert c.set("mib", value) is True
        assert c.get("mib") == value
    finally:
        server.stop()


@pytest.mark.parametrize("request_bytes, reply", [
    (b"get " + b"k" * 251 + b"\r\n", b"CLIENT_ERROR bad command line format\r\n"),
    (b"set k\x07 0 0 1\r\nx\r\n", b"CLIENT_ERROR bad command line format\r\n"),
    (b"set k 0 0 1\r\nxyz\r\n", b"CLIENT_ERROR bad data chunk\r\nERROR\r\n"),
    (b"set k 0 0 -1\r\n", b"CLIENT_ERROR bad command line format\r\n"),
    (b"set k 0 0 abc\r\n", b"CLIENT_ERROR bad command line format\r\n"),
    (b"nosuchcommand\r\n", b"ERROR\r\n"),
    (b"stats items\r\n", b"SERVER_ERROR 'stats items' not supported by twinproxy\r\n"),
])
def test_bad_input_answered_like_memcached_and_connection_stays(memcached_servers, proxy, request_bytes,
                                                                 reply) -> None:
    service = proxy(pool_yaml(memcached_servers(2)))
    raw = Raw(service)
    raw.send(request_bytes)
    assert raw.read_until(b"\r\n", reply.count(b"\r\n")) == reply
    raw.send(b"version\r\n")
    assert raw.read_until(b"\r\n").startswith(b"VERSION ")
    raw.close()


def test_line_without_newline_over_the_limit_is_answered_and_closed(memcached_servers, proxy) -> None:
    service = proxy(pool_yaml(memcached_servers(1)))
    raw = Raw(service)
    raw.send(b"x" * 5000)
    assert raw.read_until(b"\r\n") == b"CLIENT_ERROR line too long\r\n"
    assert raw.closed()
    raw.close()


def test_broadcasts_and_aggregated_stats(memcached_servers, proxy) -> None:
    backends = memcached_servers(3)
    service = proxy(pool_yaml(backends, hash="murmur"))
    c = client(service, default_noreply=False)
    c.set_many({f"s{i}": b"v" for i in range(30)})
    stats = c.stats()
    assert stats[b"curr_items"] == 30
    assert stats[b"total_items"] == 30
    assert stats[b"servers"] == 3
    assert stats[b"version"].startswith(b"twinproxy-")
    assert c.flush_all() is True
    assert all(b.client().get("s1") is None and b.client().get("s2") is None for b in backends)
    raw = Raw(service)
    assert raw.send(b"verbosity 1\r\nverbosity 0 noreply\r\nstats reset\r\n").read_until(b"\r\n", 2) == \
        b"OK\r\nRESET\r\n"
    raw.close()


def test_backend_killed_then_restarted(memcached_servers, proxy) -> None:
    backends = memcached_servers(2)
    service = proxy(pool_yaml(backends, timeout="500", auto_eject_hosts="true", server_failure_limit="2",
                              server_retry_timeout="1000"))
    dead_key, live_key = key_on(service, 0), key_on(service, 1)
    c = client(service, default_noreply=False)
    assert c.set(dead_key, b"before") and c.set(live_key, b"live")
    backends[0].kill()
    with pytest.raises(MemcacheServerError):
        c.get(dead_key)
    # The whole multi-get fails, nutcracker-style, while the dead server is in the ring.
    with pytest.raises(MemcacheServerError):
        c.get_many([dead_key, live_key])
    wait_until(lambda: len(service.pool.live_servers) == 1, what="ejection")
    assert c.get_many([dead_key, live_key]) == {live_key: b"live"}
    stats = c.stats()
    assert stats[b"servers"] == 1
    backends[0].restart()
    wait_until(lambda: len(service.pool.live_servers) == 2, timeout=5, what="retry")
    wait_until(lambda: c.set(dead_key, b"after"), what="restarted server to answer")
    assert backends[0].client().get(dead_key) == b"after"


def test_backend_frozen_times_out_while_others_serve(memcached_servers, proxy) -> None:
    backends = memcached_servers(2)
    service = proxy(pool_yaml(backends, timeout="300"))
    frozen_key, live_key = key_on(service, 0), key_on(service, 1)
    c = client(service, default_noreply=False)
    c.set(frozen_key, b"x")
    backends[0].freeze()
    try:
        # When the timeout fires is the fake-clock unit tests' business (tests/unit/test_proxying.py);
        # here: it fires, it is counted against the frozen server, and it comes in bounded time.
        started = time.monotonic()
        with pytest.raises(MemcacheServerError, match="timed out"):
            c.get(frozen_key)
        assert time.monotonic() - started < 0.3 + 2
        assert [s.counters.server_timedout for s in service.pool.servers] == [1, 0]
        other = client(service, default_noreply=False)
        assert other.set(live_key, b"y") and other.get(live_key) == b"y"
    finally:
        backends[0].thaw()
    wait_until(lambda: c.get(frozen_key) == b"x", what="thawed server to answer")


def test_no_live_server_answers_server_error(memcached_servers, proxy) -> None:
    backends = memcached_servers(1)
    service = proxy(pool_yaml(backends, auto_eject_hosts="true", server_failure_limit="1",
                              server_retry_timeout="30000"))
    backends[0].kill()
    raw = Raw(service)
    first = raw.send(b"get a\r\n").read_until(b"\r\n")
    assert first.startswith(b"SERVER_ERROR ")
    wait_until(lambda: not service.pool.live_servers, what="ejection")
    assert raw.send(b"get a b\r\nflush_all\r\n").read_until(b"\r\n", 2) == \
        b"SERVER_ERROR no live server in pool 'alpha'\r\nSERVER_ERROR no live server in the pool\r\n"
    raw.close()


def test_memcslap_runs_clean(memcached_servers, proxy) -> None:
    require("memcslap")
    service = proxy(pool_yaml(memcached_servers(3)))
    for test in ("set", "get", "mget"):
        result = subprocess.run(["memcslap", "-s", f"{LOOPBACK}:{service.port_number}", "-c", "4", "-t", test,
                                 "-e", "300"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Time total" in result.stdout
        assert "error" not in (result.stdout + result.stderr).lower(), result.stdout + result.stderr


def meta_pipeline(count: int) -> bytes:
    out = []
    for i in range(count):
        key = b"meta%d" % (i % 23)
        kind = i % 6
        if kind == 0:
            out.append(b"ms %s 4 T0 F%d\r\nv%03d\r\n" % (key, i, i % 1000))
        elif kind == 1:
            out.append(b"mg %s v f k O%d\r\n" % (key, i))
        elif kind == 2:
            out.append(b"ma counter%d N0 J10 D2 v\r\n" % (i % 3))
        elif kind == 3:
            out.append(b"md %s%s\r\n" % (key, b" q" if i % 2 else b"") if i % 5 else b"mn\r\n")
        elif kind == 4:
            out.append(b"mg %s s v\r\nget %s\r\n" % (key, key))
        elif i % 4:
            out.append(b"mg nothere%d v q\r\nmg %s v q k\r\nms %s 2 q\r\nqq\r\nmn\r\n" % (i, key, key))
        else:
            out.append(b"mg nothere%d v\r\n" % i)
    return b"".join(out)


def test_meta_commands_are_byte_exact_with_one_memcached(memcached_servers, proxy) -> None:
    backends = memcached_servers(4)
    service = proxy(pool_yaml(backends[:3], hash="murmur"))
    stream = meta_pipeline(300)
    expected = run_stream(backends[3].port, stream)
    got = run_stream(service.port_number, stream)
    assert got == expected
    assert len({service.pool.server_for_key(b"meta%d" % i) for i in range(23)}) == 3
    assert b"MN\r\n" in got and b"NF\r\n" in got  # quiet mode kept some replies and dropped others
