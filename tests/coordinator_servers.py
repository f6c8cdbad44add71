"""Real coordinators for the tests: a ZooKeeper and an etcd process, and the fixtures over them.

``ZooKeeperServer`` runs Debian's ZooKeeper 3.8 jar standalone (its own
zoo.cfg, tickTime 200 ms so sessions may be 0.4-4 s), ready once it accepts
a real session; ``EtcdServer`` runs etcd 3.4 as a single member with 10/100
ms raft timings, ready once ``/health`` says so.  Both take free loopback
ports (retrying on a port race), stop with SIGCONT + SIGTERM (SIGKILL after
5 s), remove their directory, and ``freeze``/``thaw`` (SIGSTOP/SIGCONT) and
``down``/``up`` (stopped, then started again on the same ports) for liveness
tests.  A missing program fails the test, naming the Debian package.

``EphemeralHolder`` is a child process holding ephemerals through the
Twisted API (``python -m tests.coordinator_servers hold URL PATH VALUE ...``),
for tests where the holder must die for real.

Fixtures: ``zookeeper`` and ``etcd`` (one server per test session, started
the first time a test asks), and ``coordinator_url``, parametrized over the
three backends, a URL with a root of its own per test and short timeouts.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import sys
import urllib.request
import uuid
from pathlib import Path
from typing import Dict, List

import pytest

from tests.servers import LOOPBACK, Process, free_port, wait_until

ZOOKEEPER_JAR = "/usr/share/java/zookeeper.jar"
SLF4J_SIMPLE = "/usr/share/java/slf4j-simple.jar"
JVM_FLAGS = ["-XX:-UsePerfData", "-Xms32m", "-Xmx128m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Xss512k",
             "-Dzookeeper.forceSync=no", "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn"]
# The session timeouts the tests ask for: short, so liveness tests are quick (ZK's tick 200 allows 0.4-4 s).
SESSION_TIMEOUT = {"file": 2, "etcd": 2, "zookeeper": 2}


def _missing(program: str, package: str) -> None:
    pytest.fail(f"{program} is not installed: apt-get install --no-install-recommends {package} "
                "(scripts/ensure-system-deps.sh does it)")


def zookeeper_ready(port: int) -> bool:
    """Whether the server on ``port`` grants a session (then closed again)."""
    request = struct.pack(">iqiqi16s?", 0, 0, 4000, 0, 16, b"\0" * 16, False)
    with socket.create_connection((LOOPBACK, port), timeout=1) as sock:
        sock.sendall(struct.pack(">i", len(request)) + request)
        reply = b""
        while len(reply) < 4 + 16:
            chunk = sock.recv(1024)
            if not chunk:  # a server with no quorum (or not ready) closes the socket
                return False
            reply += chunk
        session_id = struct.unpack(">q", reply[12:20])[0]
        sock.sendall(struct.pack(">iii", 8, 1, -11))  # closeSession, so the probe leaves nothing behind
        return session_id != 0


def etcd_healthy(port: int) -> bool:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/health", timeout=1) as response:
        return json.loads(response.read()).get("health") == "true"


class _Server(Process):
    """What both servers share: a directory, start with retries, stop and clean up."""

    name = "server"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = 0
        super().__init__([], directory / f"{self.name}.log")

    def start(self) -> "_Server":
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            self._prepare()
            self.spawn()
            try:
                wait_until(lambda: not self.alive or self._ready(), timeout=30, what=f"{self.name} on {self.port}")
            except AssertionError:
                super().stop()
                raise AssertionError(f"{self.name} did not get ready:\n{self.output()}") from None
            if self.alive:
                return self
            # It exited: most likely another process took the port first; try other ports.
        raise AssertionError(f"{self.name} did not start:\n{self.output()}")

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def restart(self) -> "_Server":
        """Stop (SIGTERM) and start again on the same ports with the same data."""
        return self.down().up()

    def down(self) -> "_Server":
        """Stop the process (SIGTERM), keeping its ports and data for ``up``."""
        Process.stop(self)
        return self

    def up(self) -> "_Server":
        """Start again after ``down``, on the same ports with the same data."""
        self.spawn()
        wait_until(lambda: not self.alive or self._ready(), timeout=30, what=f"{self.name} again on {self.port}")
        if not self.alive:
            raise AssertionError(f"{self.name} did not start again:\n{self.output()}")
        return self

    def _prepare(self) -> None:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"


class ZooKeeperServer(_Server):
    """A standalone ZooKeeper 3.8 (Debian's jar) on a free loopback port."""

    name = "zookeeper"

    def __init__(self, directory: Path, tick_ms: int = 200) -> None:
        self.tick_ms = tick_ms
        super().__init__(directory)

    def _prepare(self) -> None:
        java = shutil.which("java")
        if not os.path.exists(ZOOKEEPER_JAR):
            _missing(ZOOKEEPER_JAR, "zookeeper")
        if java is None:
            _missing("java", "default-jre-headless")
        self.port = free_port()
        data = self.directory / "data"
        data.mkdir(exist_ok=True)
        config = self.directory / "zoo.cfg"
        config.write_text("\n".join([
            f"tickTime={self.tick_ms}", "initLimit=20", "syncLimit=10", f"dataDir={data}",
            f"clientPort={self.port}", f"clientPortAddress={LOOPBACK}", "admin.enableServer=false",
            "4lw.commands.whitelist=", "maxClientCnxns=0", "autopurge.purgeInterval=0", ""]))
        classpath = ZOOKEEPER_JAR + (f":{SLF4J_SIMPLE}" if os.path.exists(SLF4J_SIMPLE) else "")
        self.argv = [java, *JVM_FLAGS, "-cp", classpath, "org.apache.zookeeper.server.quorum.QuorumPeerMain",
                     str(config)]

    def _ready(self) -> bool:
        return zookeeper_ready(self.port)


class EtcdServer(_Server):
    """A single-member etcd 3.4 on free loopback client and peer ports."""

    name = "etcd"

    def _prepare(self) -> None:
        etcd = shutil.which("etcd")
        if etcd is None:
            _missing("etcd", "etcd-server")
        self.port, peer = free_port(), free_port()
        client_url, peer_url = f"http://{LOOPBACK}:{self.port}", f"http://{LOOPBACK}:{peer}"
        shutil.rmtree(self.directory / "data", ignore_errors=True)  # a failed attempt's member must not linger
        self.argv = [etcd, "--name", "t", "--data-dir", str(self.directory / "data"),
                     "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
                     "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
                     "--initial-cluster", f"t={peer_url}", "--initial-cluster-state", "new",
                     # Unique per server: a stale member with the same token would refuse to join.
                     "--initial-cluster-token", uuid.uuid4().hex,
                     "--heartbeat-interval", "10", "--election-timeout", "100",
                     "--logger", "zap", "--log-level", "warn"]

    def _ready(self) -> bool:
        return etcd_healthy(self.port)


def _server(tmp_path_factory: pytest.TempPathFactory, kind: type) -> _Server:
    server = kind(tmp_path_factory.mktemp(kind.name))
    return server.start()


@pytest.fixture(scope="session")
def zookeeper(tmp_path_factory: pytest.TempPathFactory) -> ZooKeeperServer:
    """One ZooKeeper for the whole test session (tests isolate themselves with a chroot)."""
    server = _server(tmp_path_factory, ZooKeeperServer)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> EtcdServer:
    """One etcd for the whole test session (tests isolate themselves with a key prefix)."""
    server = _server(tmp_path_factory, EtcdServer)
    yield server
    server.stop()


def coordinator_url_for(kind: str, request: pytest.FixtureRequest, tmp_path: Path, timeout: float = 5) -> str:
    """A URL of ``kind`` with a root of its own (the servers started on demand)."""
    options = f"session_timeout={SESSION_TIMEOUT[kind]}&timeout={timeout:g}"
    if kind == "file":
        return f"file://{tmp_path}/coordinator?{options}"
    server = request.getfixturevalue(kind)
    return f"{kind}://{server.address}/t-{uuid.uuid4().hex}?{options}"


@pytest.fixture(params=["file", "zookeeper", "etcd"])
def coordinator_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A coordinator URL per backend, rooted apart from every other test's."""
    return coordinator_url_for(request.param, request, tmp_path)


class EphemeralHolder(Process):
    """A child process holding ephemerals ``{path: value}`` at ``url`` until it is stopped or killed."""

    def __init__(self, url: str, entries: Dict[str, str], log: Path) -> None:
        argv = [sys.executable, "-m", "tests.coordinator_servers", "hold", url]
        for path, value in entries.items():
            argv += [path, value.decode() if isinstance(value, bytes) else value]
        repo = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
        super().__init__(argv, log, env=env)

    def start(self) -> "EphemeralHolder":
        self.spawn()
        wait_until(lambda: not self.alive or self.said("held"), timeout=20, what="the holder to hold")
        if not self.alive or self.said("failed"):
            raise AssertionError(f"the holder failed:\n{self.output()}")
        return self

    def said(self, line_start: str) -> bool:
        """Whether a line of the holder's output starts with ``line_start`` ("held", "state lost", "on_lost")."""
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return False
        return any(line.startswith(line_start) for line in lines)


def _hold(url: str, pairs: List[str]) -> None:
    """The holder's main: start a session, make the ephemerals, say "held", run until stopped."""
    from twisted.internet import reactor

    from twinproxy.coordinator import connect

    coordinator = connect(url, reactor)
    coordinator.on_state(lambda state: print("state", state, flush=True))

    def go() -> None:
        d = coordinator.start()
        for path, value in zip(pairs[::2], pairs[1::2]):
            d.addCallback(lambda _, p=path, v=value: coordinator.ephemeral(
                p, v.encode(), on_lost=lambda reason: print("on_lost", reason, flush=True)))

        def failed(failure) -> None:
            print("failed", failure.getErrorMessage(), flush=True)
            reactor.stop()

        d.addCallbacks(lambda _: print("held", flush=True), failed)

    reactor.callWhenRunning(go)
    # A SIGTERM ends the session cleanly (its ephemerals go at once); a SIGKILL leaves that to liveness.
    reactor.addSystemEventTrigger("before", "shutdown", coordinator.stop)
    reactor.run()


if __name__ == "__main__" and sys.argv[1:2] == ["hold"]:
    _hold(sys.argv[2], sys.argv[3:])
