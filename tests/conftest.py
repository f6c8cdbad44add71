"""Fixtures: real backends on free ports, and the proxy in-process or under twistd."""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import signal
import sys
import sysconfig
import threading
from pathlib import Path
from typing import Callable, List, Optional

import pytest

from tests.coordinator_servers import coordinator_url, etcd, zookeeper  # noqa: F401
from tests.servers import LOOPBACK, MemcachedServer, Process, RedisServer, free_port, wait_until

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    """Refuse to run when the C scanners could have been built here and were not.

    Without them the C-vs-Python twin tests skip, and a suite that passes
    would say nothing about the C code a CPython install actually runs.
    """
    problem = c_scanners_problem()
    if problem:
        raise pytest.UsageError(problem)


def c_scanners_problem() -> Optional[str]:
    """Why twinproxy._speedups should be loaded and is not, or None when all is as it should be.

    It is legitimately absent on PyPy, with TWINPROXY_PURE_PYTHON set (as
    twinproxy.compiled decides), and on a CPython without a C compiler or
    Python.h, unless CI is set: CI must build it.
    """
    if platform.python_implementation() != "CPython" or os.environ.get("TWINPROXY_PURE_PYTHON"):
        return None
    from twinproxy.compiled import speedups

    if speedups is not None:
        return None
    compilers = [*os.environ.get("CC", "").split()[:1], "cc", "gcc"]
    compiler = next((found for found in map(shutil.which, compilers) if found), None)
    headers = os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    if not (compiler and headers) and not in_ci:
        return None
    try:
        from twinproxy import _speedups  # noqa: F401 - only for the reason it fails
        reason = "it imports, yet twinproxy.compiled did not load it"
    except ImportError as err:
        reason = f"ImportError: {err}"
    because = f"{compiler} and {sysconfig.get_paths()['include']}/Python.h exist" if compiler and headers \
        else "CI is set"
    return (f"twinproxy._speedups (the C scanners) is not built although {because} ({reason}).\n"
            "The C-vs-Python twin tests would silently skip. Build it and read the compiler's errors:\n"
            f"  {sys.executable} -m pip install --config-settings editable_mode=compat -e {REPO}\n"
            "(or rm .venv/.installed && make test); set TWINPROXY_PURE_PYTHON=1 to test pure Python on purpose.")


@pytest.fixture
def redis_servers(tmp_path: Path) -> Callable[..., List[RedisServer]]:
    """``redis_servers(n, password=None)`` starts n redis-servers, stopped after the test."""
    started: List[RedisServer] = []

    def start(count: int, password: str = None) -> List[RedisServer]:
        servers = []
        for _ in range(count):
            server = RedisServer(tmp_path / f"redis{len(started)}", password=password)
            started.append(server)
            servers.append(server.start())
        return servers

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def memcached_servers(tmp_path: Path) -> Callable[..., List[MemcachedServer]]:
    """``memcached_servers(n)`` starts n memcached processes, stopped after the test."""
    started: List[MemcachedServer] = []

    def start(count: int) -> List[MemcachedServer]:
        servers = []
        for _ in range(count):
            server = MemcachedServer(tmp_path / f"memcached{len(started)}")
            started.append(server)
            servers.append(server.start())
        return servers

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def reactor():
    """The global reactor, running in a daemon thread for the whole session.

    A reactor cannot be restarted, so there is one per session; unit tests
    never touch it (they use Clock and MemoryReactor).
    """
    from twisted.internet import reactor as global_reactor

    thread = threading.Thread(target=global_reactor.run, kwargs={"installSignalHandlers": False},
                              name="reactor", daemon=True)
    thread.start()
    wait_until(lambda: global_reactor.running, what="reactor to run")
    yield global_reactor
    global_reactor.callFromThread(global_reactor.stop)
    thread.join(5)


def in_reactor(reactor, function, *args, **kwargs):
    """Run ``function`` in the reactor thread and return its (waited-for) result."""
    from twisted.internet.threads import blockingCallFromThread

    return blockingCallFromThread(reactor, function, *args, **kwargs)


@pytest.fixture
def proxy(reactor):
    """``proxy(config_text_or_PoolConfig)`` starts a PoolService in-process and returns it.

    The listen address is replaced by 127.0.0.1 on a port the OS picks, so
    tests never race for ports; ``service.port_number`` tells which.
    """
    from twinproxy.config import ListenSpec, PoolConfig, load_text
    from twinproxy.service import PoolService

    services = []

    def start(config) -> PoolService:
        if not isinstance(config, PoolConfig):
            (config,) = load_text(config)
        if not config.listen.is_unix:
            config = dataclasses.replace(config, listen=ListenSpec(host=LOOPBACK, port=0))

        def build():
            service = PoolService(config, reactor)
            service.startService()
            return service

        service = in_reactor(reactor, build)
        service.port_number = service.address.port if not config.listen.is_unix else None
        services.append(service)
        return service

    yield start
    for service in services:
        in_reactor(reactor, service.stopService)


def key_on(service, index: int, prefix: str = "k") -> str:
    """A key that ``service``'s pool places on its ``index``-th server."""
    name = service.pool.servers[index].name
    return next(f"{prefix}{i}" for i in range(100000)
                if service.pool.server_for_key(f"{prefix}{i}".encode()).name == name)


def pool_yaml(servers, **keys) -> str:
    """A one-pool nutcracker file (pool ``alpha``) over ``servers``; a Redis pool
    for RedisServers, memcached for MemcachedServers."""
    lines = ["alpha:", "  listen: 127.0.0.1:1"]
    keys.setdefault("redis", "false" if servers and isinstance(servers[0], MemcachedServer) else "true")
    for key, value in keys.items():
        lines.append(f"  {key}: {value}")
    lines.append("  servers:")
    for server in servers:
        lines.append(f"   - {server.address}:1")
    return "\n".join(lines) + "\n"


def spawn_proxy(argv: List[str], log: Path, processes: List[Process], bound_path: Optional[Path] = None) -> Process:
    """Start a proxy command (twistd or twinproxy) from this checkout; remember it in ``processes``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    process = Process(argv, log, env=env)
    process.bound_path = bound_path
    process.spawn()
    processes.append(process)
    return process


def stop_proxy(process: Process) -> None:
    """Stop a proxy from ``spawn_proxy`` and whatever is left of its session.

    Workers a ``--workers`` master could not stop in time must not outlive
    the test: they are in the session start_new_session made for this
    master, whose group id is the master's pid.
    """
    process.stop()
    try:
        os.killpg(process.proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture
def twistd(tmp_path: Path):
    """``twistd(config_path)`` runs ``twistd -n twinproxy`` as a real subprocess.

    It writes ``--bound-addresses`` (unless the test names its own file), so
    with ``listen: 127.0.0.1:0`` pools ``process.bound()`` tells the ports.
    """
    processes = []

    def start(config_path: Path, *extra: str) -> Process:
        return spawn_twistd(config_path, tmp_path / f"twistd{len(processes)}", processes, *extra)

    yield start
    for process in processes:
        process.stop()


def spawn_twistd(config_path: Path, stem: Path, processes: List[Process], *extra: str) -> Process:
    """Start ``twistd -n twinproxy --config config_path`` from this checkout, its log at ``stem``.log.

    It gets ``--stats-port 0`` and ``--bound-addresses stem.bound.json`` unless ``extra`` names its own.
    """
    twistd_bin = os.path.join(os.path.dirname(sys.executable), "twistd")
    if "-s" not in extra and "--stats-port" not in extra:
        extra = (*extra, "--stats-port", "0")  # never the fixed default 22222 in tests
    if "--bound-addresses" in extra:
        bound_path = Path(extra[extra.index("--bound-addresses") + 1])
    else:
        bound_path = stem.with_name(stem.name + ".bound.json")
        extra = (*extra, "--bound-addresses", str(bound_path))
    return spawn_proxy([twistd_bin, "--nodaemon", "--pidfile=", "twinproxy", "--config", str(config_path), *extra],
                       stem.with_name(stem.name + ".log"), processes, bound_path)


__all__ = ["free_port", "key_on", "pool_yaml", "in_reactor", "wait_until"]
