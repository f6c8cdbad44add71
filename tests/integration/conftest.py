"""Fixtures of the integration tests: Redis Sentinel topologies and a proxy in Sentinel mode."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, List, Sequence, Tuple

import pytest

from tests.conftest import spawn_proxy, stop_proxy
from tests.proxy_clients import redis_client, write_atomically
from tests.sentinel_load import stop_leftover_loads
from tests.sentinel_servers import Topology, pool_text
from tests.servers import LOOPBACK, Process

BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _stop_loads():
    """A test that fails half-way must not leave its load threads (tests/sentinel_load.py) running
    into the next one."""
    yield
    stop_leftover_loads()


@pytest.fixture
def make_topology(tmp_path: Path) -> Callable[..., Topology]:
    """``make_topology(names=("s1", "s2"), sentinel_count=3, sentinel_password=None)``: a started
    Topology in its own directory; every one is stopped (SIGCONT, SIGKILL) after the test."""
    started: List[Topology] = []

    def start(**options) -> Topology:
        topology = Topology(tmp_path / f"topology{len(started)}", **options)
        started.append(topology)
        return topology.start()

    yield start
    for topology in started:
        topology.stop()


@pytest.fixture
def sentinel_topology(make_topology) -> Topology:
    """A fresh, ready topology: shards s1 and s2 (a master and a replica each) and 3 sentinels."""
    return make_topology()


@pytest.fixture
def sentinel_proxy(tmp_path: Path) -> Callable[..., Tuple[Process, Callable]]:
    """``sentinel_proxy(topology, names=None, guesses=None, sentinels=None, wait=True, extra_args=(),
    **keys)`` writes a Sentinel pool file (``pool_text``) and starts ``twinproxy -c`` on it, with the
    stats port and the HTTP endpoint on system-picked loopback ports, and ``extra_args`` last (with
    ``--workers``, which refuses ``--http-port``, there is no HTTP endpoint).

    Returns (process, client): ``client(**kwargs)`` is a new redis-py client of pool ``alpha``
    (no retries, counts its connects); the process also has ``config_path``, ``text`` and
    ``bound_doc`` (the first bound-addresses document). With ``wait=False`` it returns as soon
    as the process is spawned (client is then None).
    """
    processes: List[Process] = []

    def start(topology: Topology, names=None, guesses=None, sentinels=None, wait: bool = True,
              extra_args: Sequence[str] = (), **keys) -> Tuple[Process, Callable]:
        number = len(processes)
        text = pool_text(topology, names=names, guesses=guesses, sentinels=sentinels, **keys)
        config = tmp_path / f"sentinel-pools{number}.yml"
        write_atomically(config, text)
        bound_path = tmp_path / f"sentinel-proxy{number}.bound.json"
        http = [] if any(arg.startswith("--workers") for arg in extra_args) else ["--http-port", "0"]
        process = spawn_proxy([str(BIN / "twinproxy"), "-c", str(config), "--stats-port", "0",
                               "--stats-addr", LOOPBACK, *http, "--bound-addresses", str(bound_path),
                               *extra_args], tmp_path / f"sentinel-proxy{number}.log", processes, bound_path)
        process.config_path = config
        process.text = text
        if not wait:
            return process, None
        process.bound_doc = process.bound(timeout=30)
        address = process.bound_doc["pools"]["alpha"]

        def client(**kwargs):
            return redis_client(address, **kwargs)

        return process, client

    yield start
    for process in processes:
        stop_proxy(process)
