"""Hot reload of ``twinproxy --workers 2``: SIGHUP to the master, every worker applies the file."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import spawn_proxy, stop_proxy
from tests.proxy_clients import read_stats, wait_for_generation, write_atomically
from tests.reload_layouts import apply_steps, worker_layout, worker_steps
from tests.reload_load import ReloadDriver, load_through_reloads
from tests.servers import LOOPBACK, Process, free_port


@pytest.fixture
def sock_dir():
    """A short directory for unix sockets (tmp_path can exceed the 107-byte socket path limit)."""
    path = tempfile.mkdtemp(prefix="tpw-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def twinproxy_command(tmp_path: Path):
    """``twinproxy_command(config_path, *args)`` runs the ``twinproxy`` console script; the master
    and its workers (one session, one process group) are stopped after the test."""
    processes = []

    def start(config_path: Path, *extra: str) -> Process:
        command = os.path.join(os.path.dirname(sys.executable), "twinproxy")
        return spawn_proxy([command, "-c", str(config_path), *extra], tmp_path / f"twinproxy{len(processes)}.log",
                           processes)

    yield start
    for process in processes:
        stop_proxy(process)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_eight_reloads_under_load_with_two_workers(redis_servers, memcached_servers, twinproxy_command,
                                                   tmp_path, sock_dir) -> None:
    """Eight SIGHUPs to the master of ``--workers 2`` under 4 redis-py and 4 pymemcache clients (spread
    over both workers): no error, no reconnect, no wrong reply, every write where its generation put
    it, and the stats port (every worker summed) counts 8 applied reloads."""
    backends, caches = redis_servers(4), memcached_servers(4)
    layout = worker_layout(sock_dir)
    layouts = apply_steps(layout, worker_steps(free_port()))
    assert len(layouts) == 8
    config, bound_path = tmp_path / "pools.yml", tmp_path / "bound.json"
    write_atomically(config, layout.render([b.address for b in backends], [c.address for c in caches]))
    process = twinproxy_command(config, "--workers", "2", "-s", "0", "-a", LOOPBACK,
                                "--bound-addresses", str(bound_path))
    wait_for_generation(bound_path, 1, process, timeout=30)
    driver = ReloadDriver(process, config, bound_path, backends, caches, layout)
    assert driver.bound["pid"] == process.proc.pid
    started = time.monotonic()
    summary = load_through_reloads(driver, layouts, backends, caches)
    print(f"\n8 reloads under load, 2 workers, in {time.monotonic() - started:.1f}s: {summary}")
    stats = read_stats(driver.bound["stats"])
    # The master's count: a reload is applied once every worker applied it.
    assert (stats["reloads"], stats["reload_failures"], stats["config_generation"]) == (8, 0, 9), stats
    for pool in ("rpool", "mpool"):
        assert (stats[pool]["client_err"], stats[pool]["forward_error"]) == (0, 0), stats[pool]
    process.proc.send_signal(signal.SIGTERM)
    assert process.proc.wait(20) == 0
    log = process.log.read_text(errors="replace")
    assert "Traceback" not in log and "Unhandled error" not in log, log[-4000:]
