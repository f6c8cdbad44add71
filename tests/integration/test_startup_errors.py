"""A listener that cannot open stops the start with one line, under twinproxy and twistd, and leaves nothing open."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import LOOPBACK

BIN = Path(sys.executable).parent


@pytest.fixture
def taken_port():
    """A loopback port some other socket listens on, for as long as the test runs."""
    sock = socket.socket()
    sock.bind((LOOPBACK, 0))
    sock.listen(1)
    yield sock.getsockname()[1]
    sock.close()


def run(argv, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=tmp_path, env=env,
                          stdin=subprocess.DEVNULL)


def commands(config: Path, *extra: str):
    yield "twinproxy", [str(BIN / "twinproxy"), "-c", str(config), *extra]
    yield "twistd", [str(BIN / "twistd"), "-n", "--pidfile=", "twinproxy", "--config", str(config), *extra]


def pool_file(tmp_path: Path, listen: str) -> Path:
    path = tmp_path / "pools.yml"
    path.write_text(f"alpha:\n  listen: {listen}\n  servers:\n   - 127.0.0.1:1:1\n")
    return path


def assert_one_line(result: subprocess.CompletedProcess, line: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert line in output, output
    assert sum(line in text for text in output.splitlines()) == 1, output
    assert "Traceback" not in output and "CannotListenError" not in output, output


@pytest.mark.timeout(90)
def test_pool_address_in_use(tmp_path: Path, taken_port: int) -> None:
    config = pool_file(tmp_path, f"{LOOPBACK}:{taken_port}")
    for _, argv in commands(config, "-s", "0"):
        assert_one_line(run(argv, tmp_path),
                        f"twinproxy: cannot start: pool alpha: cannot listen on {LOOPBACK}:{taken_port}: "
                        "Address already in use")


@pytest.mark.timeout(90)
def test_stats_address_in_use(tmp_path: Path, taken_port: int) -> None:
    config = pool_file(tmp_path, f"{LOOPBACK}:0")
    for _, argv in commands(config, "-s", str(taken_port), "-a", LOOPBACK):
        assert_one_line(run(argv, tmp_path),
                        f"twinproxy: cannot start: stats: cannot listen on {LOOPBACK}:{taken_port}: "
                        "Address already in use")


@pytest.mark.timeout(90)
def test_http_address_in_use(tmp_path: Path, taken_port: int) -> None:
    config = pool_file(tmp_path, f"{LOOPBACK}:0")
    for _, argv in commands(config, "-s", "0", "--http-port", str(taken_port)):
        assert_one_line(run(argv, tmp_path),
                        f"twinproxy: cannot start: http: cannot listen on {LOOPBACK}:{taken_port}: "
                        "Address already in use")


@pytest.mark.timeout(90)
def test_unix_socket_in_a_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "alpha.sock"
    config = pool_file(tmp_path, str(path))
    for _, argv in commands(config, "-s", "0"):
        assert_one_line(run(argv, tmp_path),
                        f"twinproxy: cannot start: pool alpha: cannot listen on {path}: No such file or directory")


def test_a_failed_start_closes_what_already_listened(tmp_path: Path) -> None:
    """In-process: the pool listened, then the stats port failed; the pool's port is closed again."""
    from twisted.internet.error import CannotListenError
    from twisted.internet.testing import MemoryReactorClock

    from twinproxy import tap

    class StatsTaken(MemoryReactorClock):
        def listenTCP(self, port, factory, backlog=50, interface=""):
            if port == 22299:
                raise CannotListenError(interface, port, OSError(98, "Address already in use"))
            return super().listenTCP(port, factory, backlog, interface)

    reactor = StatsTaken()
    options = tap.Options()
    options.parseOptions(["-c", str(pool_file(tmp_path, "127.0.0.1:7777")), "-s", "22299"])
    top = tap.build(options, reactor)
    closed = []
    pool = top.getServiceNamed("pools").getServiceNamed("alpha")
    original = pool.listen

    def listen_and_watch() -> None:
        original()
        pool.port.stopListening = lambda: closed.append(True)

    pool.listen = listen_and_watch
    with pytest.raises(SystemExit):
        top.privilegedStartService()
    assert closed == [True] and pool.port is None
