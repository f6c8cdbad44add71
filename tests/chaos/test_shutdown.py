"""SIGTERM: stop accepting, finish what is in flight (up to shutdown_timeout), exit 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading

import pytest
import redis

from tests.servers import LOOPBACK, Process, port_of, wait_until


def start(tmp_path, backends, extra: str = "") -> tuple:
    config = tmp_path / "pools.yml"
    config.write_text(f"alpha:\n  listen: {LOOPBACK}:0\n  redis: true\n  timeout: 5000\n{extra}"
                      "  servers:\n" + "".join(f"   - {b.address}:1\n" for b in backends))
    twinproxy = os.path.join(os.path.dirname(sys.executable), "twinproxy")
    process = Process([twinproxy, "-c", str(config), "-s", "0", "-a", LOOPBACK,
                       "--bound-addresses", str(tmp_path / "bound.json")], tmp_path / "proxy.out")
    process.bound_path = tmp_path / "bound.json"
    process.spawn()
    try:
        bound = process.bound()
        port, process.stats_port = port_of(bound["pools"]["alpha"]), port_of(bound["stats"])
        client = redis.Redis(host=LOOPBACK, port=port, protocol=2, socket_timeout=10, socket_connect_timeout=1)
        assert client.ping()
    except BaseException:
        process.stop()
        raise
    return process, port, client


def out_queue(stats_port: int) -> int:
    with socket.create_connection((LOOPBACK, stats_port), timeout=5) as sock:
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    pool = json.loads(data)["alpha"]
    return sum(server["out_queue"] for server in pool.values() if isinstance(server, dict))


def test_sigterm_lets_in_flight_requests_finish(redis_servers, tmp_path) -> None:
    backends = redis_servers(1)
    process, port, client = start(tmp_path, backends)
    try:
        client.set("k", "v")
        backends[0].freeze()
        result = {}
        thread = threading.Thread(target=lambda: result.setdefault("value", client.get("k")))
        thread.start()
        wait_until(lambda: out_queue(process.stats_port) == 1, what="the request to be in flight")
        process.proc.send_signal(signal.SIGTERM)
        # No new clients once stopping.
        wait_until(lambda: _refused(port), timeout=5, what="the listener to close")
        backends[0].thaw()
        thread.join(10)
        assert result.get("value") == b"v"
        assert process.proc.wait(10) == 0
    finally:
        backends[0].thaw()
        process.stop()


def test_sigterm_gives_up_after_shutdown_timeout(redis_servers, tmp_path) -> None:
    backends = redis_servers(1)
    process, port, _ = start(tmp_path, backends, "  shutdown_timeout: 300\n")
    # No retries: redis-py 8 would otherwise reconnect, with backoff, to a proxy that is gone.
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client = redis.Redis(host=LOOPBACK, port=port, protocol=2, socket_timeout=10, retry=Retry(NoBackoff(), 0))
    try:
        client.set("k", "v")
        backends[0].freeze()
        errors = []

        def read() -> None:
            try:
                client.get("k")
            except redis.ConnectionError as err:
                errors.append(err)

        thread = threading.Thread(target=read)
        thread.start()
        wait_until(lambda: out_queue(process.stats_port) == 1, what="the request to be in flight")
        process.proc.send_signal(signal.SIGTERM)
        assert process.proc.wait(10) == 0
        thread.join(20)
        assert not thread.is_alive(), "the client hangs"
        assert errors, "the client should see its connection closed"
    finally:
        backends[0].thaw()
        process.stop()


def _refused(port: int) -> bool:
    try:
        socket.create_connection((LOOPBACK, port), timeout=1).close()
    except OSError:
        return True
    return False


@pytest.fixture(autouse=True)
def _no_leftover_threads():
    yield
    assert threading.active_count() < 50
