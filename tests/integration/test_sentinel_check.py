"""The blocking sentinel probe against real processes: a one-shard
:class:`~tests.sentinel_servers.Topology` (s1: a redis-server master and its
replica, then three redis-sentinel processes), started and judged ready as
the shared reference on Sentinel (§1) measured."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import pytest

from tests.sentinel_servers import ShardServer, Topology
from tests.servers import LOOPBACK, RedisServer, wait_until
from twinproxy.credentials import Credentials, sentinel_credentials
from twinproxy.sentinel.check import (
    Client,
    auth_command,
    encode_command,
    fatal_problems,
    format_report,
    probe_pool,
    unmonitored_names,
)
from twinproxy.sentinel.replies import ReplyError

pytestmark = pytest.mark.timeout(60)


@dataclass(frozen=True)
class Server:
    name: str


@dataclass
class PoolConfig:
    """The duck-typed pool configuration probe_pool reads."""

    name: str
    sentinels: Tuple[Tuple[str, int], ...]
    servers: List[Server] = field(default_factory=list)
    sentinel_auth: Optional[str] = None
    redis_auth: Optional[str] = None


def pool_config(topology: Topology, *names: str, sentinel_auth: Optional[str] = None) -> PoolConfig:
    return PoolConfig("alpha", tuple(_address(s) for s in topology.sentinels), [Server(n) for n in names],
                      sentinel_auth=sentinel_auth)


def _address(server: RedisServer) -> Tuple[str, int]:
    """A server's or a sentinel's address as the probe takes it."""
    return (LOOPBACK, server.port)


def _master(topology: Topology) -> ShardServer:
    """s1's master as started (nothing here fails s1 over)."""
    return topology.shards["s1"].servers[0]


def _replica(topology: Topology) -> ShardServer:
    (replica,) = topology.shards["s1"].servers[1:]
    return replica


def _command(address: Tuple[str, int], *args: str):
    with Client(address, timeout=1.0) as client:
        return client.command(*args)


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory):
    topology = Topology(tmp_path_factory.mktemp("sentinel-check"), names=("s1",))
    try:
        yield topology.start()
    finally:
        topology.stop()


@pytest.fixture
def fresh_topology(tmp_path: Path):
    """A topology of its own, for a test that stops or freezes sentinels."""
    topology = Topology(tmp_path / "topology", names=("s1",))
    try:
        yield topology.start()
    finally:
        topology.stop()


def _run_id(port: int) -> str:
    info = _command((LOOPBACK, port), "INFO", "server").decode()
    return next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("run_id:"))


def test_probe_finds_master_epoch_replica_and_quorum(topology: Topology) -> None:
    report = probe_pool(pool_config(topology, "s1"))
    assert report.problems == [], format_report(report)
    assert (report.answered, report.needed) == (3, 2)
    assert all(s.answered and not s.error for s in report.sentinels)
    (server,) = report.servers
    assert server.choice is not None, server.reason
    assert server.choice.address == (LOOPBACK, _master(topology).port)
    assert (server.choice.epoch, server.choice.agreeing, server.choice.answered) == (0, 3, 3)
    assert server.choice.run_id == _run_id(_master(topology).port)
    assert server.role == "master" and server.role_error == ""
    assert server.quorum.startswith("OK 3 usable Sentinels")
    (replica,) = server.replicas
    assert replica.address == (LOOPBACK, _replica(topology).port)
    assert replica.usable and replica.link_ok
    assert (replica.master_host, replica.master_port) == (LOOPBACK, _master(topology).port)
    assert fatal_problems(report) == [] and unmonitored_names(report) == []
    text = format_report(report)
    assert (f"server s1: master 127.0.0.1:{_master(topology).port} epoch 0 (3/3 sentinels agree), role master, "
            f"replicas 127.0.0.1:{_replica(topology).port} (slave, link ok), quorum: OK 3 usable Sentinels") in text
    assert "no problems" in text


def test_name_no_sentinel_monitors_is_fatal(topology: Topology) -> None:
    report = probe_pool(pool_config(topology, "s1", "ghost"))
    assert unmonitored_names(report) == ["ghost"]
    (fatal,) = fatal_problems(report)
    assert "no sentinel monitors 'ghost'" in fatal
    assert any("no sentinel monitors 'ghost'" in problem for problem in report.problems)
    s1, ghost = report.servers
    assert s1.choice is not None and s1.role == "master" and s1.problems == []
    assert ghost.choice is None and ghost.unmonitored
    assert "server ghost: no master: no sentinel monitors 'ghost'" in format_report(report)


def test_sentinel_auth(topology: Topology) -> None:
    for sentinel in topology.sentinels:
        assert _command(_address(sentinel), "ACL", "SETUSER", "probe", "on", ">secret", "~*", "&*", "+@all") == "OK"
    report = probe_pool(pool_config(topology, "s1", sentinel_auth="probe secret"))
    assert report.problems == [], format_report(report)
    refused = probe_pool(pool_config(topology, "s1", sentinel_auth="probe wrong"))
    assert refused.answered == 0
    assert all("AUTH refused" in s.error for s in refused.sentinels)
    assert "only 0 of 3 sentinels answered" in refused.problems[0]
    assert fatal_problems(refused) == []


def test_dead_and_frozen_sentinels_are_reported_not_fatal(fresh_topology: Topology) -> None:
    dead, frozen, alive = fresh_topology.sentinels
    dead.stop()
    report = probe_pool(pool_config(fresh_topology, "s1"), timeout=0.5)
    assert report.answered == 2
    assert (report.sentinels[0].answered, report.sentinels[0].error) == (False, "connection refused")
    assert any(f"sentinel 127.0.0.1:{dead.port} did not answer: connection refused" == p for p in report.problems)
    (server,) = report.servers
    assert server.choice is not None and server.choice.address == (LOOPBACK, _master(fresh_topology).port)
    assert (server.choice.agreeing, server.choice.answered) == (2, 2)
    assert server.role == "master"
    assert fatal_problems(report) == []

    # With a second one frozen no majority answers: no choice, and even a name nobody
    # lists is not judged (it may be on the sentinels that did not answer).
    frozen.freeze()
    started = time.monotonic()
    report = probe_pool(pool_config(fresh_topology, "s1", "ghost"), timeout=0.5)
    elapsed = time.monotonic() - started
    # Sentinels are asked in parallel: one timeout, not one per sentinel, plus slack for a busy machine.
    assert elapsed < 2.5, elapsed
    assert [s.answered for s in report.sentinels] == [False, False, True]
    assert report.sentinels[1].error == "timed out"
    assert "only 1 of 3 sentinels answered (need 2)" in report.problems
    assert all(server.choice is None for server in report.servers)
    assert unmonitored_names(report) == [] and fatal_problems(report) == []
    assert alive.alive


# --- the probe's RESP client against a scripted peer ---------------------------------------------

class ScriptedPeer:
    """A one-connection TCP peer that reads one command and answers with ``script(conn, stop)``."""

    def __init__(self, script) -> None:
        self.listener = socket.create_server((LOOPBACK, 0))
        self.listener.settimeout(10)
        self.address = self.listener.getsockname()[:2]
        self.received = b""
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(script,), daemon=True)
        self.thread.start()

    def _serve(self, script) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:  # closed, or never connected to: the test has failed already
            return
        with conn:
            conn.settimeout(5)
            while b"\r\n" not in self.received:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                self.received += chunk
            script(conn, self.stop)
            self.stop.wait(5)  # keep the connection open until the test is done

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.listener.close()


@pytest.fixture
def peer():
    peers: List[ScriptedPeer] = []

    def start(script) -> ScriptedPeer:
        peers.append(ScriptedPeer(script))
        return peers[-1]

    yield start
    for one in peers:
        one.close()


def test_client_reassembles_a_reply_sent_byte_by_byte(peer) -> None:
    reply = b"*2\r\n$9\r\n127.0.0.1\r\n*1\r\n-ERR split\r\n"

    def dribble(conn, stop) -> None:
        for index in range(len(reply)):
            conn.sendall(reply[index:index + 1])
            stop.wait(0.002)

    server = peer(dribble)
    with Client(server.address, timeout=5.0) as client:
        assert client.command("SENTINEL", "MASTERS") == [b"127.0.0.1", [ReplyError("ERR split")]]
    assert server.received == encode_command("SENTINEL", "MASTERS") == b"*2\r\n$8\r\nSENTINEL\r\n$7\r\nMASTERS\r\n"


def test_client_keeps_the_rest_of_a_pipelined_read(peer) -> None:
    server = peer(lambda conn, stop: conn.sendall(b"+OK\r\n:7\r\n"))
    with Client(server.address, timeout=5.0) as client:
        assert client.command("PING") == "OK"
        # The second reply already arrived with the first; it must not be lost.
        assert client.command("PING") == 7


def test_client_gives_up_on_silence_and_on_a_dripping_peer(peer) -> None:
    silent = peer(lambda conn, stop: None)

    def drip(conn, stop) -> None:
        conn.sendall(b"$100000\r\n")
        while not stop.wait(0.05):
            conn.sendall(b"x")

    dripping = peer(drip)
    for server in (silent, dripping):
        started = time.monotonic()
        with Client(server.address, timeout=0.3) as client:
            with pytest.raises(socket.timeout):
                client.command("ROLE")
        # One deadline per command, however many bytes trickle in.
        assert time.monotonic() - started < 2.0


def test_client_refuses_a_peer_that_is_not_redis(peer) -> None:
    server = peer(lambda conn, stop: conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n"))
    with Client(server.address, timeout=5.0) as client:
        started = time.monotonic()
        with pytest.raises(ValueError):
            client.command("ROLE")
        assert time.monotonic() - started < 2.0


def test_auth_command_forms() -> None:
    assert auth_command(Credentials("secret")) == ("AUTH", "secret")
    assert auth_command(Credentials("pass with spaces")) == ("AUTH", "pass with spaces")
    assert auth_command(Credentials("secret", "probe")) == ("AUTH", "probe", "secret")
    # sentinel_auth keeps its "user password" form; redis_auth is the whole password (redis_auth_user: the user).
    assert auth_command(sentinel_credentials("probe pass with spaces")) == ("AUTH", "probe", "pass with spaces")


def test_chosen_address_that_is_not_a_master_is_a_problem(topology: Topology) -> None:
    # Sentinels told to watch the replica as a master "s2": they agree on its address, and
    # ROLE there says slave, as it would mid-failover.
    for sentinel in topology.sentinels:
        assert _command(_address(sentinel), "SENTINEL", "MONITOR", "s2", LOOPBACK, str(_replica(topology).port),
                        "2") == "OK"
    try:
        # Until the hellos (every 2 s) the new entry shows no peers and counts as isolated.
        def chosen():
            report = probe_pool(pool_config(topology, "s2"))
            return report if report.servers[0].choice is not None else None

        report = wait_until(chosen, timeout=15, interval=0.2, what="a majority choice for s2")
        (server,) = report.servers
        assert server.choice.address == (LOOPBACK, _replica(topology).port)
        assert server.role == "slave"
        where = f"127.0.0.1:{_replica(topology).port}"
        assert f"server s2: {where} reports role slave, not master" in report.problems
        assert fatal_problems(report) == []
    finally:
        for sentinel in topology.sentinels:
            _command(_address(sentinel), "SENTINEL", "REMOVE", "s2")
