"""In-memory harness for SentinelShard tests: a Sentinel pool's runtime on a fake clock, data nodes played by hand.

No sockets and no watcher: a test calls ``moving``/``confirm``/``fence``
the way :class:`~twinproxy.sentinel.watcher.SentinelWatcher` would, plays
every data node by hand (``StringTransport``s built from the factories the
links leave in ``reactor.tcpClients``) and answers the replica checks'
``INFO replication``/``PING`` itself.  Requests come in through a real
frontend, so ``request.command`` is the Redis codec's own CommandSpec.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

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
        self.received: List[List[bytes]] = []     # every command read so far
        self.unanswered: List[List[bytes]] = []   # for a test that answers later

    def written(self) -> bytes:
        return self.transport.value()

    def new_commands(self) -> List[List[bytes]]:
        data = self.transport.value()
        fresh, self._read = data[self._read:], len(data)
        commands = parse_commands(fresh)
        self.received += commands
        return commands

    def reply(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def lose(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


def connect_pending(reactor: MemoryReactorClock) -> List[Tuple[object, Peer]]:
    """Complete every connection attempt waiting in ``reactor``: (its factory, the peer playing the far end)."""
    made = []
    while reactor.tcpClients:
        host, port, factory, _, _ = reactor.tcpClients.pop(0)
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        made.append((factory, Peer((host, port), protocol, transport)))
    return made


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
        for factory, peer in connect_pending(self.reactor):
            self.attempts.append(peer.address)
            kind = self.data if isinstance(factory, ConnectorFactory) else self.checks
            kind.setdefault(peer.address, []).append(peer)

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
