"""SentinelShard on in-memory transports and a fake clock: holding, the switch, retries, read policies.

No sockets and no watcher: the test calls ``moving``/``confirm``/``fence``
the way :class:`~twinproxy.sentinel.watcher.SentinelWatcher` would, plays
every data node by hand (``StringTransport``s built from the factories the
links leave in ``reactor.tcpClients``) and answers the replica checks'
``INFO replication``/``PING`` itself.  Requests come in through a real
frontend, so ``request.command`` is the Redis codec's own CommandSpec.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import pytest
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from twinproxy.backend import ConnectorFactory
from twinproxy.config import load_text
from twinproxy.protocols.resp import encode_command
from twinproxy.runtime import PoolRuntime

Address = Tuple[str, int]

GUESS = ("10.0.0.1", 6379)     # the configured first guess: never connected to
A = ("10.1.0.1", 6379)         # the master the sentinels name first
B = ("10.1.0.2", 6379)         # the master after a failover
R = ("10.1.0.3", 6379)         # a replica of A
R2 = ("10.1.0.4", 6379)        # another replica of A

POOL = """\
alpha:
  listen: 127.0.0.1:22121
  redis: true
  timeout: 400
  failover_hold: {hold}
  read_policy: {policy}
  sentinels:
    - 10.9.0.1:26379
    - 10.9.0.2:26379
    - 10.9.0.3:26379
  servers:
    - 10.0.0.1:6379:1 s1
"""


def cmd(*args: bytes) -> bytes:
    return encode_command(list(args))


def parse_commands(data: bytes) -> List[List[bytes]]:
    """The RESP commands (arrays of bulk strings) in ``data``, as the proxy's own clients write them."""
    commands = []
    pos = 0
    while pos < len(data):
        assert data[pos:pos + 1] == b"*", data[pos:]
        end = data.index(b"\r\n", pos)
        count = int(data[pos + 1:end])
        pos = end + 2
        args = []
        for _ in range(count):
            end = data.index(b"\r\n", pos)
            size = int(data[pos + 1:end])
            pos = end + 2
            args.append(data[pos:pos + size])
            pos += size + 2
        commands.append(args)
    return commands


def bulk(text: str) -> bytes:
    data = text.encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


def replica_info(master: Address, link: str = "up", syncing: int = 0) -> bytes:
    return bulk("# Replication\r\nrole:slave\r\n"
                f"master_host:{master[0]}\r\nmaster_port:{master[1]}\r\n"
                f"master_link_status:{link}\r\nmaster_sync_in_progress:{syncing}\r\n"
                "slave_repl_offset:100\r\n")


def master_info(replicas: List[Address]) -> bytes:
    lines = [f"slave{i}:ip={host},port={port},state=online,offset=100,lag=0"
             for i, (host, port) in enumerate(replicas)]
    return bulk("# Replication\r\nrole:master\r\n"
                f"connected_slaves:{len(replicas)}\r\n" + "".join(line + "\r\n" for line in lines)
                + "master_repl_offset:100\r\n")


class Peer:
    """One connection the proxy made, played by the test."""

    def __init__(self, address: Address, protocol, transport: StringTransport) -> None:
        self.address = address
        self.protocol = protocol
        self.transport = transport
        self._read = 0

    def written(self) -> bytes:
        return self.transport.value()

    def new_commands(self) -> List[List[bytes]]:
        data = self.transport.value()
        fresh, self._read = data[self._read:], len(data)
        return parse_commands(fresh)

    def reply(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def lose(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


class Wire:
    """One Sentinel pool (shard ``s1``) over a MemoryReactorClock; the watcher is not started."""

    def __init__(self, policy: str = "master", hold: int = 2000) -> None:
        (config,) = load_text(POOL.format(hold=hold, policy=policy))
        self.reactor = MemoryReactorClock()
        self.runtime = PoolRuntime(config, self.reactor, outbox=None)
        self.shard = self.runtime.sentinel.shards["s1"]
        self.triggers: List[str] = []
        self.shard._trigger = self.triggers.append    # what would ask the watcher to look again
        self.data: Dict[Address, List[Peer]] = {}      # the links' connections (requests)
        self.checks: Dict[Address, List[Peer]] = {}    # the replica checks' CommandClients
        self.attempts: List[Address] = []

    def client(self):
        protocol = self.runtime.factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def accept(self) -> None:
        """Complete every pending connection attempt."""
        while self.reactor.tcpClients:
            host, port, factory, _, _ = self.reactor.tcpClients.pop(0)
            address = (host, port)
            self.attempts.append(address)
            protocol = factory.buildProtocol(None)
            transport = StringTransport()
            protocol.makeConnection(transport)
            kind = self.data if isinstance(factory, ConnectorFactory) else self.checks
            kind.setdefault(address, []).append(Peer(address, protocol, transport))

    def refuse(self, address: Address) -> None:
        """Fail the pending connection attempt to ``address`` (connection refused)."""
        for index, (host, port, factory, _, _) in enumerate(self.reactor.tcpClients):
            if (host, port) == address:
                del self.reactor.tcpClients[index]
                self.attempts.append(address)
                factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
                return
        raise AssertionError(f"no connection attempt to {address}")

    def pending_to(self, address: Address) -> List:
        return [entry for entry in self.reactor.tcpClients if (entry[0], entry[1]) == address]

    def link(self, address: Address, index: int = -1) -> Peer:
        return self.data[address][index]

    def serve_checks(self, master: Address = A, replicas: Optional[Dict[Address, bytes]] = None) -> None:
        """Answer what the replica checks asked: INFO replication and PING."""
        self.accept()
        for address, peers in self.checks.items():
            for peer in peers:
                for args in peer.new_commands():
                    name = args[0].upper()
                    if name == b"PING":
                        peer.reply(b"+PONG\r\n")
                    elif name == b"INFO" and address == master:
                        peer.reply(master_info([node.address for node in self.shard.replicas.nodes]))
                    elif name == b"INFO":
                        answer = (replicas or {}).get(address)
                        peer.reply(answer if answer is not None else replica_info(master))
                    else:
                        raise AssertionError(f"unexpected check command {args!r}")

    def healthy_replicas(self, *addresses: Address, master: Address = A) -> None:
        """Make ``addresses`` candidates and let them pass one check."""
        self.shard.replicas.set_candidates(list(addresses))
        self.reactor.advance(0)
        self.serve_checks(master)
        assert self.shard.replicas.healthy_count == len(addresses), self.shard.replicas.describe()


# -- holding while no master is confirmed ------------------------------------


def test_requests_wait_while_unconfirmed_and_go_out_in_order_on_confirm() -> None:
    w = Wire()
    client, out = w.client()
    client.dataReceived(cmd(b"SET", b"k1", b"1") + cmd(b"GET", b"k2") + cmd(b"INCR", b"k3"))
    assert w.shard.held_count == 3
    assert w.reactor.tcpClients == []           # nowhere to go yet: the guess is never used
    w.shard.moving(A, 0, "runA")                # chosen, not yet ROLE-checked: still held
    assert w.shard.held_count == 3
    assert w.reactor.tcpClients == []
    w.shard.confirm(A, 0, "runA")
    assert w.shard.held_count == 0
    w.accept()
    assert list(w.data) == [A]
    a = w.link(A)
    assert a.written() == cmd(b"SET", b"k1", b"1") + cmd(b"GET", b"k2") + cmd(b"INCR", b"k3")
    a.reply(b"+OK\r\n$1\r\nv\r\n:1\r\n")
    assert out.value() == b"+OK\r\n$1\r\nv\r\n:1\r\n"
    assert GUESS not in w.attempts


def test_held_requests_get_tryagain_after_failover_hold() -> None:
    w = Wire(hold=2000)
    first, first_out = w.client()
    second, second_out = w.client()
    first.dataReceived(cmd(b"SET", b"k", b"1"))
    w.reactor.advance(1.0)
    second.dataReceived(cmd(b"GET", b"k"))
    w.reactor.advance(0.999)
    assert (first_out.value(), second_out.value()) == (b"", b"")
    w.reactor.advance(0.002)
    assert first_out.value().startswith(b"-TRYAGAIN ")
    assert b"s1" in first_out.value()
    assert second_out.value() == b""             # its own 2 s run from when it arrived
    assert w.shard.held_count == 1
    w.reactor.advance(0.997)                     # t = 2.998
    assert second_out.value() == b""
    w.reactor.advance(0.003)                     # t = 3.001
    assert second_out.value().startswith(b"-TRYAGAIN ")
    assert w.shard.held_count == 0
    assert w.runtime.pool.counters.forward_error == 2
    assert w.reactor.tcpClients == []
    # A later confirm has nothing left to release.
    w.shard.confirm(A, 0, "runA")
    assert w.reactor.tcpClients == []


def test_confirm_before_the_hold_passes_cancels_the_tryagain() -> None:
    w = Wire(hold=500)
    client, out = w.client()
    client.dataReceived(cmd(b"GET", b"k"))
    w.reactor.advance(0.3)
    w.shard.confirm(A, 0, "runA")
    w.accept()
    w.reactor.advance(0.3)                       # past the hold deadline (0.5 s), within the timeout (0.4 s)
    assert out.value() == b""
    w.link(A).reply(b"$1\r\nv\r\n")
    assert out.value() == b"$1\r\nv\r\n"


# -- the switch ---------------------------------------------------------------


def _confirmed_with_a_write_in_flight(w: Wire):
    w.shard.confirm(A, 0, "runA")
    client, out = w.client()
    client.dataReceived(cmd(b"SET", b"k", b"1"))
    w.accept()
    a = w.link(A)
    assert a.written() == cmd(b"SET", b"k", b"1")
    return client, out, a


def test_moving_fails_in_flight_requests_as_unknown_and_never_writes_to_the_old_master_again() -> None:
    w = Wire()
    client, out, a = _confirmed_with_a_write_in_flight(w)
    w.shard.moving(B, 1, "runB")
    reply = out.value()
    assert reply.startswith(b"-ERR failover: ")
    assert b"outcome" in reply and b"unknown" in reply
    assert b"10.1.0.1:6379" in reply and b"10.1.0.2:6379" in reply
    assert a.transport.disconnected              # dropped at once, not drained
    assert not w.shard.confirmed
    before = a.written()
    # New requests wait for the new master, then go there.
    client.dataReceived(cmd(b"SET", b"k", b"2"))
    assert w.shard.held_count == 1
    assert w.reactor.tcpClients == []
    w.shard.confirm(B, 1, "runB")
    w.accept()
    assert w.link(B).written() == cmd(b"SET", b"k", b"2")
    # The frozen old master wakes and answers what it held: nobody is told +OK.
    a.reply(b"+OK\r\n")
    a.lose()
    w.link(B).reply(b"+OK\r\n")
    assert out.value() == reply + b"+OK\r\n"
    client.dataReceived(cmd(b"GET", b"k"))
    w.accept()
    assert a.written() == before
    assert w.attempts.count(A) == 1
    assert w.link(B).written() == cmd(b"SET", b"k", b"2") + cmd(b"GET", b"k")
    assert w.shard.switches == 1
    assert w.triggers == []                      # a cut the proxy made itself is no news


def test_moving_error_text_says_outcome_unknown() -> None:
    w = Wire()
    _, out, _ = _confirmed_with_a_write_in_flight(w)
    w.shard.moving(B, 1, "runB")
    assert b"outcome unknown" in out.value()


def test_moving_to_the_same_address_cuts_nothing() -> None:
    w = Wire()
    _, out, a = _confirmed_with_a_write_in_flight(w)
    w.shard.moving(A, 1, "runA")
    assert out.value() == b""
    assert not a.transport.disconnecting
    a.reply(b"+OK\r\n")
    assert out.value() == b"+OK\r\n"


# -- replies that mean "not executed": one retry ------------------------------


@pytest.mark.parametrize("error", [b"-READONLY You can't write against a read only replica.\r\n",
                                   b"-MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set "
                                   b"to 'no'.\r\n",
                                   b"-LOADING Redis is loading the dataset in memory\r\n"])
def test_not_executed_reply_is_retried_once_on_the_next_confirmed_master(error: bytes) -> None:
    w = Wire()
    client, out, a = _confirmed_with_a_write_in_flight(w)
    a.reply(error)
    assert out.value() == b""                    # not answered: it waits for the next master
    assert not w.shard.confirmed
    assert w.shard.held_count == 1
    word = error[1:error.index(b" ")].decode()
    assert w.triggers == [f"shard s1: answered {word}"]
    w.shard.moving(B, 1, "runB")
    w.shard.confirm(B, 1, "runB")
    w.accept()
    b = w.link(B)
    assert b.written() == cmd(b"SET", b"k", b"1")
    b.reply(error)                               # again: now the client is told
    assert out.value() == error
    assert w.shard.held_count == 0
    w.shard.confirm(B, 1, "runB")
    assert b.written() == cmd(b"SET", b"k", b"1")
    assert a.written() == cmd(b"SET", b"k", b"1")


def test_readonly_retry_on_the_same_master_reconfirmed() -> None:
    w = Wire()
    client, out, a = _confirmed_with_a_write_in_flight(w)
    a.reply(b"-READONLY You can't write against a read only replica.\r\n")
    w.shard.confirm(A, 0, "runA")                # ROLE said master again (e.g. it was demoted and back)
    assert a.written() == cmd(b"SET", b"k", b"1") * 2
    a.reply(b"+OK\r\n")
    assert out.value() == b"+OK\r\n"


def test_readonly_retry_still_held_at_failover_hold_gets_tryagain() -> None:
    w = Wire(hold=2000)
    _, out, a = _confirmed_with_a_write_in_flight(w)
    a.reply(b"-READONLY You can't write against a read only replica.\r\n")
    w.reactor.advance(2.0)
    assert out.value().startswith(b"-TRYAGAIN ")


def test_other_error_replies_are_passed_through() -> None:
    w = Wire()
    _, out, a = _confirmed_with_a_write_in_flight(w)
    a.reply(b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n")
    assert out.value() == b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"
    assert w.shard.confirmed
    assert w.triggers == []


def test_a_timeout_on_the_master_is_not_retried() -> None:
    w = Wire()
    client, out, a = _confirmed_with_a_write_in_flight(w)
    w.reactor.advance(0.4)
    assert out.value() == b"-ERR Connection timed out\r\n"
    assert a.transport.disconnected
    assert w.shard.held_count == 0
    a.lose()
    w.shard.moving(B, 1, "runB")
    w.shard.confirm(B, 1, "runB")
    w.accept()
    assert B not in w.data                       # nothing was sent again anywhere
    assert a.written() == cmd(b"SET", b"k", b"1")


def test_a_lost_master_connection_fails_in_flight_without_retry_and_triggers_a_look() -> None:
    w = Wire()
    client, out, a = _confirmed_with_a_write_in_flight(w)
    a.lose()                                     # sentinel's CLIENT KILL on demotion, or a crash
    assert out.value() == b"-ERR Connection reset by peer\r\n"
    assert w.shard.held_count == 0
    assert w.triggers == ["shard s1: connection to master 10.1.0.1:6379 lost"]
    w.shard.moving(B, 1, "runB")
    w.shard.confirm(B, 1, "runB")
    assert w.reactor.tcpClients == []
    assert a.written() == cmd(b"SET", b"k", b"1")


def test_a_refused_master_connection_holds_the_request_and_sends_it_once_to_the_next_master() -> None:
    # Refused: the request was never written, so it is safe to send again.
    w = Wire()
    w.shard.confirm(A, 0, "runA")
    client, out = w.client()
    client.dataReceived(cmd(b"SET", b"k", b"1"))
    w.refuse(A)
    assert out.value() == b""
    assert w.shard.held_count == 1
    assert not w.shard.confirmed
    assert w.triggers[0] == "shard s1: unreachable (ERR Connection refused)"
    w.shard.confirm(B, 1, "runB")
    w.accept()
    assert w.link(B).written() == cmd(b"SET", b"k", b"1")
    w.link(B).reply(b"+OK\r\n")
    assert out.value() == b"+OK\r\n"


def test_a_request_refused_twice_gets_the_error() -> None:
    w = Wire()
    w.shard.confirm(A, 0, "runA")
    client, out = w.client()
    client.dataReceived(cmd(b"SET", b"k", b"1"))
    w.refuse(A)
    w.shard.confirm(A, 0, "runA")    # the same master is back (no failover)
    w.refuse(A)
    assert out.value() == b"-ERR Connection refused\r\n"
    assert w.shard.held_count == 0


# -- read policies --------------------------------------------------------------


def test_prefer_replica_sends_reads_to_a_healthy_replica_and_writes_to_the_master() -> None:
    w = Wire(policy="prefer-replica")
    w.shard.confirm(A, 0, "runA")
    client, out = w.client()
    client.dataReceived(cmd(b"GET", b"k"))       # no replica known yet: the master serves it
    w.accept()
    assert w.link(A).written() == cmd(b"GET", b"k")
    w.link(A).reply(b"$1\r\na\r\n")
    w.healthy_replicas(R)
    client.dataReceived(cmd(b"GET", b"k") + cmd(b"SET", b"k", b"2") + cmd(b"HGETALL", b"h"))
    w.accept()
    assert w.link(R).written() == cmd(b"GET", b"k") + cmd(b"HGETALL", b"h")
    assert w.link(A).written() == cmd(b"GET", b"k") + cmd(b"SET", b"k", b"2")
    w.link(A).reply(b"+OK\r\n")
    w.link(R).reply(b"$1\r\nr\r\n*0\r\n")
    assert out.value() == b"$1\r\na\r\n$1\r\nr\r\n+OK\r\n*0\r\n"
    assert w.shard.stats()["replica_reads"] == 2


def test_read_policy_master_never_reads_from_a_replica() -> None:
    w = Wire(policy="master")
    w.shard.confirm(A, 0, "runA")
    w.healthy_replicas(R)
    client, _ = w.client()
    client.dataReceived(cmd(b"GET", b"k"))
    w.accept()
    assert w.link(A).written() == cmd(b"GET", b"k")
    assert R not in w.data


def test_reads_round_robin_over_healthy_replicas() -> None:
    w = Wire(policy="prefer-replica")
    w.shard.confirm(A, 0, "runA")
    w.healthy_replicas(R, R2)
    client, _ = w.client()
    client.dataReceived(cmd(b"GET", b"k") * 4)
    w.accept()
    assert w.link(R).written() == cmd(b"GET", b"k") * 2
    assert w.link(R2).written() == cmd(b"GET", b"k") * 2
    assert A not in w.data


def test_a_refused_replica_connection_retries_the_read_on_the_master() -> None:
    w = Wire(policy="prefer-replica")
    w.shard.confirm(A, 0, "runA")
    w.healthy_replicas(R)
    client, out = w.client()
    client.dataReceived(cmd(b"GET", b"k"))
    w.refuse(R)
    assert w.shard.replicas.healthy_count == 0
    assert w.shard.replicas.describe()[f"{R[0]}:{R[1]}"] != "healthy"
    w.accept()
    assert w.link(A).written() == cmd(b"GET", b"k")
    w.link(A).reply(b"$1\r\nm\r\n")
    assert out.value() == b"$1\r\nm\r\n"
    client.dataReceived(cmd(b"GET", b"k"))       # taken out: the next read goes to the master too
    w.accept()
    assert w.link(A).written() == cmd(b"GET", b"k") * 2
    assert w.runtime.pool.counters.forward_error == 0


def test_a_replica_lost_with_a_read_in_flight_retries_it_on_the_master() -> None:
    w = Wire(policy="prefer-replica")
    w.shard.confirm(A, 0, "runA")
    w.healthy_replicas(R)
    client, out = w.client()
    client.dataReceived(cmd(b"GET", b"k1"))
    w.accept()
    assert w.link(R).written() == cmd(b"GET", b"k1")
    w.link(R).lose()                             # promotion kills every client of the replica
    assert out.value() == b""
    assert w.shard.replicas.healthy_count == 0
    w.accept()
    assert w.link(A).written() == cmd(b"GET", b"k1")
    w.link(A).reply(b"$1\r\n1\r\n")
    assert out.value() == b"$1\r\n1\r\n"


STALE_REPLY = ("BUG: a request taken over by link.intercept keeps the error reply the backend wrote into "
               "request.reply (backend.py _fail_pending/_replies set it before calling intercept; "
               "SentinelShard._master_failed and ReplicaSet._read_failed re-send it without clearing it), "
               "so the frontend's _flush, which takes 'reply is not None' for answered, sends that stale "
               "error as soon as an earlier request of the same client completes, and drops the real reply")


def test_reads_retried_on_the_master_are_answered_by_the_master_not_by_the_lost_connections_error() -> None:
    w = Wire(policy="prefer-replica")
    w.shard.confirm(A, 0, "runA")
    w.healthy_replicas(R)
    client, out = w.client()
    client.dataReceived(cmd(b"GET", b"k1") + cmd(b"GET", b"k2"))
    w.accept()
    assert w.link(R).written() == cmd(b"GET", b"k1") + cmd(b"GET", b"k2")
    w.link(R).lose()
    w.accept()
    assert w.link(A).written() == cmd(b"GET", b"k1") + cmd(b"GET", b"k2")   # both retried
    w.link(A).reply(b"$1\r\n1\r\n")
    assert out.value() == b"$1\r\n1\r\n"                                  # actual: + "-ERR Connection reset..."
    w.link(A).reply(b"$1\r\n2\r\n")
    assert out.value() == b"$1\r\n1\r\n$1\r\n2\r\n"


def test_a_write_retried_after_readonly_is_not_answered_readonly_while_the_retry_runs() -> None:
    # The client is told -READONLY (not executed) and the retry then executes the write on the new master.
    w = Wire(policy="prefer-replica")
    w.shard.confirm(A, 0, "runA")
    w.healthy_replicas(R)
    client, out = w.client()
    client.dataReceived(cmd(b"GET", b"k") + cmd(b"INCR", b"n"))
    w.accept()
    assert w.link(R).written() == cmd(b"GET", b"k")
    assert w.link(A).written() == cmd(b"INCR", b"n")
    w.link(A).reply(b"-READONLY You can't write against a read only replica.\r\n")
    assert w.shard.held_count == 1
    w.link(R).reply(b"$1\r\nv\r\n")
    assert out.value() == b"$1\r\nv\r\n"                                  # actual: + "-READONLY ..."
    w.shard.confirm(B, 1, "runB")
    w.accept()
    assert w.link(B).written() == cmd(b"INCR", b"n")
    w.link(B).reply(b":1\r\n")
    assert out.value() == b"$1\r\nv\r\n:1\r\n"


@pytest.mark.parametrize("error", [b"-LOADING Redis is loading the dataset in memory\r\n",
                                   b"-MASTERDOWN Link with MASTER is down\r\n"])
def test_a_replica_answering_loading_or_masterdown_is_taken_out_and_the_read_retried(error: bytes) -> None:
    w = Wire(policy="prefer-replica")
    w.shard.confirm(A, 0, "runA")
    w.healthy_replicas(R)
    client, out = w.client()
    client.dataReceived(cmd(b"GET", b"k"))
    w.accept()
    w.link(R).reply(error)
    assert w.shard.replicas.healthy_count == 0
    w.accept()
    assert w.link(A).written() == cmd(b"GET", b"k")
    w.link(A).reply(b"$1\r\nm\r\n")
    assert out.value() == b"$1\r\nm\r\n"


def test_read_policy_replica_without_a_healthy_replica_answers_an_error() -> None:
    w = Wire(policy="replica")
    w.shard.confirm(A, 0, "runA")
    client, out = w.client()
    client.dataReceived(cmd(b"GET", b"k"))
    assert out.value().startswith(b"-ERR no healthy replica for shard 's1'")
    assert w.reactor.tcpClients == []
    client.dataReceived(cmd(b"SET", b"k", b"1"))   # writes still go to the master
    w.accept()
    assert w.link(A).written() == cmd(b"SET", b"k", b"1")


def test_read_policy_replica_reads_a_healthy_replica() -> None:
    w = Wire(policy="replica")
    w.shard.confirm(A, 0, "runA")
    w.healthy_replicas(R)
    client, out = w.client()
    client.dataReceived(cmd(b"GET", b"k"))
    w.accept()
    assert w.link(R).written() == cmd(b"GET", b"k")
    assert A not in w.data


def test_a_replica_not_linked_to_the_master_is_not_read_from() -> None:
    w = Wire(policy="prefer-replica")
    w.shard.confirm(A, 0, "runA")
    w.shard.replicas.set_candidates([R])
    w.reactor.advance(0)
    w.serve_checks(A, replicas={R: replica_info(A, link="down")})
    assert w.shard.replicas.healthy_count == 0
    assert w.shard.replicas.describe() == {"10.1.0.3:6379": "master link down"}


# -- fence ----------------------------------------------------------------------


def test_fence_keeps_the_fenced_master_while_a_sentinel_reports_the_failover() -> None:
    w = Wire(hold=2000)
    w.shard.confirm(A, 0, "runA")
    w.shard.fence("replica 10.1.0.3:6379 says it is a master now (promoted)")
    assert not w.shard.confirmed
    assert w.triggers == ["shard s1: replica 10.1.0.3:6379 says it is a master now (promoted)"]
    assert not w.shard.may_confirm(A, failover_running=False)   # the grace: the flag may not show yet
    assert w.shard.may_confirm(B, failover_running=True)
    client, out = w.client()
    client.dataReceived(cmd(b"SET", b"k", b"1"))
    assert w.shard.held_count == 1               # writes wait while fenced
    w.reactor.advance(0.6)
    assert not w.shard.may_confirm(A, failover_running=True)
    w.reactor.advance(9.4)
    assert w.shard.may_confirm(A, failover_running=True)        # not for ever


def test_a_promotion_that_is_no_failover_costs_only_the_grace() -> None:
    w = Wire(hold=2000)
    w.shard.confirm(A, 0, "runA")
    w.shard.fence("replica 10.1.0.3:6379 says it is a master now (promoted)")
    client, out = w.client()
    client.dataReceived(cmd(b"SET", b"k", b"1"))
    w.reactor.advance(0.5)
    assert w.shard.may_confirm(A, failover_running=False)
    w.shard.confirm(A, 0, "runA")                # an operator's REPLICAOF NO ONE: the old master serves
    assert w.shard.held_count == 0


def test_a_replica_promoted_under_the_master_fences_it() -> None:
    w = Wire(policy="prefer-replica")
    w.shard.confirm(A, 0, "runA")
    w.healthy_replicas(R)
    w.reactor.advance(1.0)                       # the next check: R now says it is a master
    w.accept()
    for peer in w.checks[R]:
        for args in peer.new_commands():
            peer.reply(b"+PONG\r\n" if args[0] == b"PING" else bulk("role:master\r\nmaster_repl_offset:100\r\n"))
    for peer in w.checks[A]:
        for _ in peer.new_commands():
            peer.reply(master_info([]))
    assert not w.shard.confirmed
    assert not w.shard.may_confirm(A, failover_running=False)
    assert w.shard.replicas.healthy_count == 0
    assert any("promoted" in reason for reason in w.triggers)
