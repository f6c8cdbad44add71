"""Bounded memory: idle clients are cheap, and a client that never reads cannot balloon the proxy."""

from __future__ import annotations

import os
import select
import socket
import sys
import time

import redis

from tests.servers import LOOPBACK, Process, port_of

IDLE_CLIENTS = 2000
IDLE_BOUND_MIB = 32          # documented in the README
NON_READER_BOUND_MIB = 64    # documented in the README
PIPELINE_BYTES = 200 * 1024 * 1024


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def start_proxy(tmp_path, backends) -> tuple:
    config = tmp_path / "pools.yml"
    config.write_text(f"alpha:\n  listen: {LOOPBACK}:0\n  redis: true\n  timeout: 10000\n  backlog: 4096\n"
                      "  servers:\n" + "".join(f"   - {b.address}:1\n" for b in backends))
    twinproxy = os.path.join(os.path.dirname(sys.executable), "twinproxy")
    process = Process([twinproxy, "-c", str(config), "-s", "0", "-a", LOOPBACK,
                       "--bound-addresses", str(tmp_path / "bound.json")], tmp_path / "proxy.out")
    process.bound_path = tmp_path / "bound.json"
    process.spawn()
    try:
        port = port_of(process.bound()["pools"]["alpha"])
        client = redis.Redis(host=LOOPBACK, port=port, protocol=2, socket_timeout=10, socket_connect_timeout=1)
        assert client.ping()
    except BaseException:
        process.stop()
        raise
    return process, port, client


def test_idle_clients_and_a_client_that_never_reads(redis_servers, tmp_path) -> None:
    backends = redis_servers(2)
    process, port, client = start_proxy(tmp_path, backends)
    try:
        client.set("big", b"v" * 1024)
        for _ in range(200):  # warm up: every code path allocated once
            client.get("big")
        baseline = rss_mib(process.proc.pid)

        idle = []
        try:
            for _ in range(IDLE_CLIENTS):
                sock = socket.create_connection((LOOPBACK, port), timeout=10)
                idle.append(sock)
            for sock in idle[::100]:
                sock.sendall(b"PING\r\n")
                assert sock.recv(10) == b"+PONG\r\n"
            idle_cost = rss_mib(process.proc.pid) - baseline
            print(f"baseline {baseline:.1f} MiB; {IDLE_CLIENTS} idle clients: +{idle_cost:.1f} MiB")
            assert idle_cost <= IDLE_BOUND_MIB, f"{IDLE_CLIENTS} idle clients cost {idle_cost:.1f} MiB"
        finally:
            for sock in idle:
                sock.close()

        # One client pipelines GETs of a 1 KiB value and never reads: the proxy must stop reading it.
        reader_start = rss_mib(process.proc.pid)
        chunk = b"GET big\r\n" * (1024 * 1024 // 9)
        sent = 0
        with socket.create_connection((LOOPBACK, port), timeout=10) as hog:
            hog.setblocking(False)
            stalled_since = None
            deadline = time.monotonic() + 60
            view = memoryview(chunk)
            offset = 0
            while sent < PIPELINE_BYTES and time.monotonic() < deadline:
                _, writable, _ = select.select([], [hog], [], 0.2)
                if not writable:
                    stalled_since = stalled_since or time.monotonic()
                    if time.monotonic() - stalled_since > 3:
                        break
                    continue
                stalled_since = None
                try:
                    n = hog.send(view[offset:])
                except BlockingIOError:
                    continue
                sent += n
                offset = (offset + n) % len(chunk)
                if offset == 0:
                    view = memoryview(chunk)
            grown = rss_mib(process.proc.pid) - reader_start
            print(f"non-reading client: sent {sent / 2**20:.1f} MiB before the proxy stopped reading; "
                  f"proxy grew {grown:.1f} MiB")
            assert sent < PIPELINE_BYTES, "the proxy kept reading a client that never reads"
            assert grown <= NON_READER_BOUND_MIB, f"a non-reading client grew the proxy by {grown:.1f} MiB"
            # Everyone else is still served while the hog is stalled.
            other = redis.Redis(host=LOOPBACK, port=port, protocol=2, socket_timeout=10)
            assert other.get("big") == b"v" * 1024
    finally:
        process.stop()
