"""Clients that do not read their replies cannot grow the proxy without bound (issue 11).

The proxy runs under twistd against real servers; its memory is read from
/proc (the peak, VmHWM, reset before each hog starts).  A hog pipelines
GETs of a big value and never reads: it must be closed at
``client_output_hard_limit`` with the counter moved and one log line, the
proxy's peak growth must stay under 64 MiB, and a well-behaved client must
be served all along.  The process-wide ``--max-reply-buffer`` is checked
with clients that stay under their own limits.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from pathlib import Path

import pytest

from tests.servers import LOOPBACK, MemcachedServer, port_of, wait_until

GROWTH_BOUND_MIB = 64        # documented in the README
SERVED_DEADLINE = 60.0       # generous: a bound on hangs, not a timing claim


def status_mib(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field}")


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux 4.0+); False where that is not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as out:
            out.write("5")
        return True
    except OSError:
        return False


class Peak:
    """The proxy's RSS peak since ``start``: VmHWM after a reset, else the highest sample."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.base = status_mib(pid, "VmRSS")
        self.hwm_reset = reset_peak(pid)
        self.sampled = self.base

    def sample(self) -> None:
        self.sampled = max(self.sampled, status_mib(self.pid, "VmRSS"))

    def growth(self) -> float:
        self.sample()
        top = status_mib(self.pid, "VmHWM") if self.hwm_reset else self.sampled
        return top - self.base


def write_pool(tmp_path: Path, servers, redis: bool, extra: str = "") -> Path:
    config = tmp_path / "pools.yml"
    config.write_text(f"alpha:\n  listen: {LOOPBACK}:0\n  redis: {'true' if redis else 'false'}\n"
                      f"  timeout: 10000\n{extra}  servers:\n" + "".join(f"   - {s.address}:1\n" for s in servers))
    return config


def read_stats(address: str) -> dict:
    with socket.create_connection((LOOPBACK, port_of(address)), timeout=5) as sock:
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return json.loads(data)
            data += chunk


class Client:
    """A raw, bounded client: ``call`` sends one request and reads exactly the expected reply."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((LOOPBACK, port), timeout=10)

    def call(self, request: bytes, expected: bytes) -> None:
        self.sock.sendall(request)
        got = bytearray()
        while len(got) < len(expected):
            chunk = self.sock.recv(len(expected) - len(got))
            assert chunk, "the well-behaved client was disconnected"
            got += chunk
        assert bytes(got) == expected, bytes(got[:80])

    def close(self) -> None:
        self.sock.close()


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the proxy has closed ``sock`` (what it had sent is read and dropped)."""
    sock.settimeout(0.2)
    try:
        while True:
            if not sock.recv(1 << 20):
                return True
    except socket.timeout:
        return False
    except ConnectionError:
        return True


def hog_is_closed_and_others_served(process, requests: dict, hog_request: bytes, count: int) -> dict:
    """One client pipelines ``count`` hog requests and never reads; another goes on being served.

    ``requests`` maps well-behaved requests to their exact replies.  Returns
    the numbers; asserts the close, the counter, the log line, the bound.
    """
    bound = process.bound()
    port = port_of(bound["pools"]["alpha"])
    good = Client(port)
    for _ in range(20):  # warm-up: every path allocated once
        for request, reply in requests.items():
            good.call(request, reply)
    peak = Peak(process.proc.pid)
    hog = socket.create_connection((LOOPBACK, port), timeout=10)
    hog_address = "{}:{}".format(*hog.getsockname())
    hog.sendall(hog_request * count)
    served = served_after_close = 0
    closed = False
    deadline = time.monotonic() + SERVED_DEADLINE
    while served_after_close < 50:
        assert time.monotonic() < deadline, f"served {served}, hog closed: {closed}\n{process.output()}"
        for request, reply in requests.items():
            good.call(request, reply)
            served += 1
            if closed:
                served_after_close += 1
        peak.sample()
        if not closed:
            closed = read_stats(bound["stats"])["alpha"]["client_output_limit_closed"] == 1
    growth = peak.growth()
    print(f"proxy {peak.base:.1f} MiB at start, peak growth {growth:.1f} MiB; other client served {served}")
    assert growth < GROWTH_BOUND_MIB, f"a client that does not read grew the proxy by {growth:.1f} MiB"
    wait_until(lambda: closed_by_peer(hog), timeout=20, what="the hog's connection to be closed")
    hog.close()
    good.call(*next(iter(requests.items())))
    good.close()
    lines = [line for line in process.output().splitlines() if "client_output_hard_limit" in line]
    assert len(lines) == 1 and f"closing client {hog_address}" in lines[0] and "pool alpha" in lines[0], lines
    return {"growth": growth, "served": served}


def redis_big(size: int) -> tuple:
    value = b"v" * size
    set_big = b"*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$%d\r\n%s\r\n" % (size, value)
    return set_big, b"GET big\r\n", b"$%d\r\n%s\r\n" % (size, value)


@pytest.mark.parametrize(("size", "count"), [(64 * 1024, 5000), (1024 * 1024, 500)], ids=["64KiBx5000", "1MiBx500"])
def test_redis_hog_is_closed_at_the_hard_limit(redis_servers, twistd, tmp_path, size, count) -> None:
    """GET of a big value pipelined without reading (~320-500 MiB of replies): closed at 32 MiB, others served."""
    servers = redis_servers(3)
    process = twistd(write_pool(tmp_path, servers, redis=True), "--http-port", "0", "--http-addr", LOOPBACK)
    port = port_of(process.bound()["pools"]["alpha"])
    set_big, get_big, big_reply = redis_big(size)
    Client(port).call(set_big, b"+OK\r\n")
    Client(port).call(b"SET small x\r\n", b"+OK\r\n")
    hog_is_closed_and_others_served(process, {b"GET small\r\n": b"$1\r\nx\r\n", b"PING\r\n": b"+PONG\r\n",
                                              get_big: big_reply}, get_big, count)
    with urllib.request.urlopen(f"http://{process.bound()['http']}/metrics", timeout=5) as response:
        text = response.read().decode()
    assert 'twinproxy_pool_client_output_limit_closed_total{pool="alpha"} 1.0' in text


@pytest.mark.parametrize(("size", "count"), [(64 * 1024, 5000), (1024 * 1024, 500)], ids=["64KiBx5000", "1MiBx500"])
def test_memcached_hog_is_closed_at_the_hard_limit(twistd, tmp_path, size, count) -> None:
    """memcached ``get`` of a big value pipelined without reading: closed at the hard limit, others served."""
    servers = []
    try:
        for index in range(3):
            server = MemcachedServer(tmp_path / f"memcached{index}")
            servers.append(server)
            server.start(extra=["-I", "2m"])
        process = twistd(write_pool(tmp_path, servers, redis=False))
        port = port_of(process.bound()["pools"]["alpha"])
        value = b"v" * size
        Client(port).call(b"set big 0 0 %d\r\n%s\r\n" % (size, value), b"STORED\r\n")
        Client(port).call(b"set small 0 0 1\r\nx\r\n", b"STORED\r\n")
        hog_is_closed_and_others_served(
            process, {b"get small\r\n": b"VALUE small 0 1\r\nx\r\nEND\r\n", b"get missing\r\n": b"END\r\n",
                      b"get big\r\n": b"VALUE big 0 %d\r\n%s\r\nEND\r\n" % (size, value)}, b"get big\r\n", count)
    finally:
        for server in servers:
            server.stop()


def get_calls(server) -> int:
    return server.client().info("commandstats").get("cmdstat_get", {}).get("calls", 0)


def read_replies(sock: socket.socket, count: int, reply: bytes, deadline: float) -> None:
    """Read exactly ``count`` copies of ``reply`` from ``sock``, in full, before ``deadline``."""
    expected = len(reply) * count
    got = bytearray()
    sock.settimeout(10)
    while len(got) < expected:
        assert time.monotonic() < deadline, f"read {len(got)} of {expected} bytes"
        chunk = sock.recv(min(1 << 20, expected - len(got)))
        assert chunk, f"closed after {len(got)} of {expected} bytes"
        got += chunk
    assert got == reply * count


def test_process_wide_reply_buffer_stops_reading_clients_that_hold_replies(redis_servers, twistd, tmp_path) -> None:
    """Past --max-reply-buffer, clients holding unread replies are not read; a reading client is served one
    request at a time; once the replies are read, everyone's requests are served."""
    servers = redis_servers(1)
    process = twistd(write_pool(tmp_path, servers, redis=True), "--max-reply-buffer", str(8 << 20))
    port = port_of(process.bound()["pools"]["alpha"])
    set_big, get_big, big_reply = redis_big(64 * 1024)
    Client(port).call(set_big, b"+OK\r\n")
    peak = Peak(process.proc.pid)
    deadline = time.monotonic() + SERVED_DEADLINE
    # A pins ~19 MiB (under its own 32 MiB hard limit): past the process's 8 MiB.
    first = socket.create_connection((LOOPBACK, port), timeout=10)
    first.sendall(get_big * 300)
    wait_until(lambda: get_calls(servers[0]) >= 300, timeout=20, what="the first client's 300 GETs")
    wait_until(lambda: read_stats(process.bound()["stats"])["alpha"][servers[0].address]["out_queue"] == 0,
               timeout=20, what="every reply of the first client to reach the proxy")
    # B arrives holding nothing: it gets one request at a time, until its unread replies hold it too.
    second = socket.create_connection((LOOPBACK, port), timeout=10)
    second.sendall(get_big * 400)
    good = Client(port)
    for _ in range(30):  # many reactor turns: B's bytes have been read (and held) by now
        good.call(get_big, big_reply)
        good.call(b"PING\r\n", b"+PONG\r\n")
        peak.sample()
    held_back = 300 + 30 + 400 - get_calls(servers[0])
    assert held_back > 200, f"only {held_back} of the second client's 400 GETs were held back"
    assert "reply buffer limit" in process.output()
    # Once A and B read, the budget drains and B's held requests are served too.
    read_replies(first, 300, big_reply, deadline)
    read_replies(second, 400, big_reply, deadline)
    good.call(get_big, big_reply)
    growth = peak.growth()
    print(f"proxy peak growth {growth:.1f} MiB; {held_back} requests held back at the limit")
    assert growth < GROWTH_BOUND_MIB
    for sock in (first, second):
        sock.close()
    good.close()
