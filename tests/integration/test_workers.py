"""``--workers``: a worker that dies is logged, and the summed stats never go backwards."""

from __future__ import annotations

import os
import signal

import pytest
import redis

from tests.integration.test_observability import read_stats, run_cli, write_config
from tests.servers import LOOPBACK, port_of, wait_until


def worker_pids(master: int) -> list:
    with open(f"/proc/{master}/task/{master}/children") as children:
        return [int(pid) for pid in children.read().split()]


def requests_sent(document: dict) -> int:
    return sum(server["requests"] for server in document["alpha"].values() if isinstance(server, dict))


@pytest.mark.timeout(60)
def test_a_dead_workers_counters_stand_and_the_gauge_says_who_answered(redis_servers, tmp_path) -> None:
    backends = redis_servers(1)
    config = write_config(tmp_path, backends)
    process = run_cli(["-c", str(config), "--workers", "2", "-s", "0", "-a", LOOPBACK], tmp_path, "workers")
    try:
        bound = process.bound()
        port, stats_port = port_of(bound["pools"]["alpha"]), port_of(bound["stats"])
        # Enough clients that both workers (SO_REUSEPORT spreads them) have served some.
        clients = [redis.Redis(host=LOOPBACK, port=port, protocol=2, socket_timeout=5) for _ in range(40)]
        for client in clients:
            assert client.set("k", "v")
        before = read_stats(stats_port)
        assert before["workers"] == 2 and before["workers_answered"] == 2
        assert requests_sent(before) == 40
        victim = worker_pids(process.proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: read_stats(stats_port)["workers_answered"] == 1, timeout=15,
                   what=f"the master to notice:\n{process.output()}")
        after = read_stats(stats_port)
        assert requests_sent(after) == 40, "the dead worker's last counters are kept"
        assert after["alpha"]["client_eof"] >= before["alpha"]["client_eof"]
        wait_until(lambda: "did not answer for stats" in process.output(), what="the log line")
        wait_until(lambda: f"worker {victim} exited" in process.output(), what="the exit logged")
        # A reload still applies, to the worker that is left.
        config.write_text(config.read_text().replace("timeout: 1000", "timeout: 2000"))
        process.proc.send_signal(signal.SIGHUP)
        assert process.bound(generation=2)["generation"] == 2
        assert read_stats(stats_port)["reloads"] == 1
        assert "timeout 1000 -> 2000" in process.output()
        for client in clients:
            client.close()
    finally:
        process.stop()
