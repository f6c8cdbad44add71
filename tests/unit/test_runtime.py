"""PoolRuntime.apply on in-memory transports and a fake clock: what a reload does to traffic in flight."""

from __future__ import annotations

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from twinproxy.config import load_text
from twinproxy.protocols.resp import encode_command
from twinproxy.runtime import PoolRuntime
from twinproxy.topology import diff_pool

POOL = """\
alpha:
  listen: 127.0.0.1:22121
  redis: true
  timeout: 400
{extra}  servers:
{servers}"""
SERVERS = ["10.0.0.1:6379:1 a", "10.0.0.2:6379:1 b"]


def config(servers=SERVERS, extra: str = ""):
    (parsed,) = load_text(POOL.format(extra=extra, servers="".join(f"   - {s}\n" for s in servers)))
    return parsed


def cmd(*args: bytes) -> bytes:
    return encode_command(list(args))


class Wire:
    """The runtime over a MemoryReactorClock; the test plays every server."""

    def __init__(self, servers=SERVERS, extra: str = "") -> None:
        self.reactor = MemoryReactorClock()
        self.runtime = PoolRuntime(config(servers, extra), self.reactor, outbox=None)
        self.backends = {}   # "host:port" -> [(protocol, transport)]

    def apply(self, servers=SERVERS, extra: str = "") -> None:
        self.runtime.apply(diff_pool(self.runtime.config, config(servers, extra)))

    def client(self):
        protocol = self.runtime.factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def key_on(self, name: str) -> bytes:
        pool = self.runtime.pool
        return next(b"k%d" % i for i in range(1000) if pool.server_for_key(b"k%d" % i).name == name)

    def connect_pending(self):
        while self.reactor.tcpClients:
            host, port, factory, _, _ = self.reactor.tcpClients.pop(0)
            protocol = factory.buildProtocol(None)
            transport = StringTransport()
            protocol.makeConnection(transport)
            self.backends.setdefault(f"{host}:{port}", []).append((protocol, transport))
        return self.backends


class DrainTests(SynchronousTestCase):
    def test_removed_server_answers_what_it_was_sent_then_closes(self) -> None:
        w = Wire()
        client, out = w.client()
        kb = w.key_on("b")
        client.dataReceived(cmd(b"SET", kb, b"1"))
        w.connect_pending()
        b, b_wire = w.backends["10.0.0.2:6379"][0]
        w.apply(SERVERS[:1])
        self.assertNotIn("b", [s.name for s in w.runtime.pool.servers])
        self.assertEqual([link.server.name for link in w.runtime.links], ["a"])
        self.assertFalse(b_wire.disconnecting)   # still owes a reply
        client.dataReceived(cmd(b"GET", kb))     # routes by the new ring: server a
        w.connect_pending()
        a, a_wire = w.backends["10.0.0.1:6379"][0]
        self.assertEqual(a_wire.value(), cmd(b"GET", kb))
        b.dataReceived(b"+OK\r\n")
        self.assertTrue(b_wire.disconnecting)    # drained: closed after its last reply
        a.dataReceived(b"$-1\r\n")
        self.assertEqual(out.value(), b"+OK\r\n$-1\r\n")
        self.assertEqual(w.runtime.pool.counters.forward_error, 0)
        self.assertEqual(w.runtime.retiring_count, 0)

    def test_drain_fails_what_is_unanswered_at_the_timeout(self) -> None:
        w = Wire()
        client, out = w.client()
        client.dataReceived(cmd(b"GET", w.key_on("b")))
        w.connect_pending()
        _, b_wire = w.backends["10.0.0.2:6379"][0]
        self.reactor = w.reactor
        w.apply(SERVERS[:1])
        w.reactor.advance(0.399)
        self.assertEqual(out.value(), b"")
        w.reactor.advance(0.002)
        self.assertTrue(out.value().startswith(b"-ERR "))
        self.assertTrue(b_wire.disconnecting or b_wire.disconnected)

    def test_idle_connection_of_a_removed_server_closes_at_once(self) -> None:
        w = Wire()
        client, out = w.client()
        client.dataReceived(cmd(b"GET", w.key_on("b")))
        w.connect_pending()
        b, b_wire = w.backends["10.0.0.2:6379"][0]
        b.dataReceived(b"$-1\r\n")
        w.apply(SERVERS[:1])
        self.assertTrue(b_wire.disconnecting)
        self.assertEqual(w.reactor.getDelayedCalls(), [])

    def test_readdressed_server_keeps_counters_and_sends_new_requests_to_the_new_address(self) -> None:
        w = Wire()
        client, out = w.client()
        kb = w.key_on("b")
        client.dataReceived(cmd(b"SET", kb, b"1"))
        w.connect_pending()
        old, old_wire = w.backends["10.0.0.2:6379"][0]
        server = w.runtime.pool.servers[1]
        w.apply(["10.0.0.1:6379:1 a", "10.0.0.7:6390:1 b"])
        self.assertIs(w.runtime.pool.servers[1], server)
        self.assertEqual(w.key_on("b"), kb)              # same name, same keys
        client.dataReceived(cmd(b"GET", kb))
        w.connect_pending()
        new, new_wire = w.backends["10.0.0.7:6390"][0]
        self.assertEqual(new_wire.value(), cmd(b"GET", kb))
        old.dataReceived(b"+OK\r\n")
        new.dataReceived(b"$1\r\n1\r\n")
        self.assertEqual(out.value(), b"+OK\r\n$1\r\n1\r\n")
        self.assertTrue(old_wire.disconnecting)
        self.assertEqual(server.counters.requests, 2)

    def test_new_handshake_replaces_connections_behind_a_barrier(self) -> None:
        w = Wire()
        client, out = w.client()
        ka = w.key_on("a")
        client.dataReceived(cmd(b"SET", ka, b"1"))
        w.connect_pending()
        old, old_wire = w.backends["10.0.0.1:6379"][0]
        w.apply(extra="  redis_db: 3\n")
        client.dataReceived(cmd(b"GET", ka))
        w.connect_pending()
        new, new_wire = w.backends["10.0.0.1:6379"][1]
        self.assertEqual(new_wire.value(), b"")           # waits for the old connection's last reply
        old.dataReceived(b"+OK\r\n")
        self.assertTrue(old_wire.disconnecting)
        self.assertEqual(new_wire.value(), cmd(b"SELECT", b"3") + cmd(b"GET", ka))
        new.dataReceived(b"+OK\r\n$1\r\n1\r\n")
        self.assertEqual(out.value(), b"+OK\r\n$1\r\n1\r\n")

    def test_ring_change_installs_atomically_and_placement_follows_the_new_file(self) -> None:
        w = Wire(["10.0.0.1:6379:1 a", "10.0.0.2:6379:1 b", "10.0.0.3:6379:1 c"])
        w.apply(["10.0.0.1:6379:1 a", "10.0.0.2:6379:1 b", "10.0.0.3:6379:1 c"], extra="  hash: murmur\n"
                "  distribution: modula\n")
        reference = PoolRuntime(config(["10.0.0.1:6379:1 a", "10.0.0.2:6379:1 b", "10.0.0.3:6379:1 c"],
                                       "  hash: murmur\n  distribution: modula\n"), MemoryReactorClock(), None)
        keys = [b"key:%d" % i for i in range(300)]
        self.assertEqual([w.runtime.pool.server_for_key(k).name for k in keys],
                         [reference.pool.server_for_key(k).name for k in keys])

    def test_stop_leaves_no_timers(self) -> None:
        w = Wire()
        client, _ = w.client()
        client.dataReceived(cmd(b"GET", w.key_on("b")) + cmd(b"GET", w.key_on("a")))
        w.connect_pending()
        w.apply(SERVERS[:1])
        w.runtime.stop()
        self.assertEqual(w.reactor.getDelayedCalls(), [])


class AffinityTests(SynchronousTestCase):
    def test_a_clients_slot_survives_a_lost_connection(self) -> None:
        w = Wire(extra="  server_connections: 3\n")
        ka = w.key_on("a")
        clients = [w.client() for _ in range(3)]
        for client, _ in clients:
            client.dataReceived(cmd(b"GET", ka))
        w.connect_pending()
        connections = w.backends["10.0.0.1:6379"]
        self.assertEqual(len(connections), 3)
        by_slot = {protocol.slot: (protocol, wire) for protocol, wire in connections}
        slot_of = {client.client_id: client.client_id % 3 for client, _ in clients}
        for client, _ in clients:
            self.assertEqual(by_slot[slot_of[client.client_id]][1].value(), cmd(b"GET", ka))
        # The first slot's connection dies; every other client keeps its socket.
        lost, _ = by_slot[0]
        lost.connectionLost(Failure(ConnectionDone()))
        for client, _ in clients:
            client.dataReceived(cmd(b"SET", ka, b"x"))
        w.connect_pending()
        self.assertEqual(len(w.backends["10.0.0.1:6379"]), 4)
        replacement, replacement_wire = w.backends["10.0.0.1:6379"][3]
        self.assertEqual(replacement.slot, 0)
        for slot in (1, 2):
            self.assertEqual(by_slot[slot][1].value(), cmd(b"GET", ka) + cmd(b"SET", ka, b"x"))
        self.assertEqual(replacement_wire.value(), cmd(b"SET", ka, b"x"))


class GuardedCompletionTests(SynchronousTestCase):
    def test_a_completion_that_raises_answers_that_request_and_keeps_the_connection(self) -> None:
        w = Wire()
        ka = w.key_on("a")
        first, first_out = w.client()
        second, second_out = w.client()
        first.dataReceived(cmd(b"GET", ka))
        second.dataReceived(cmd(b"GET", ka))
        w.connect_pending()
        a, a_wire = w.backends["10.0.0.1:6379"][0]

        def broken(request):
            raise ValueError("a bug in completing")

        first.request_done = broken
        a.dataReceived(b"$1\r\n1\r\n$1\r\n2\r\n")
        self.assertFalse(a_wire.disconnecting)
        self.assertEqual(second_out.value(), b"$1\r\n2\r\n")
        self.assertTrue(first_out.value().startswith(b"-ERR proxy error"))
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_a_merge_that_raises_answers_that_request(self) -> None:
        w = Wire()
        client, out = w.client()
        codec = w.runtime.factory.codec

        def broken(request):
            raise KeyError("merge")

        codec.coalesce = broken
        client.dataReceived(cmd(b"MGET", w.key_on("a"), w.key_on("b")) + b"PING\r\n")
        w.connect_pending()
        for wires in w.backends.values():
            wires[0][0].dataReceived(b"*1\r\n$-1\r\n")
        self.assertEqual(out.value(), b"-ERR proxy error: the replies could not be merged\r\n+PONG\r\n")
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)


class BarrierTests(SynchronousTestCase):
    def test_two_handshake_changes_in_a_row_keep_the_order_and_fail_nothing(self) -> None:
        w = Wire()
        ka = w.key_on("a")
        first, first_out = w.client()
        second, second_out = w.client()
        third, third_out = w.client()
        first.dataReceived(cmd(b"GET", ka))
        w.connect_pending()
        old, old_wire = w.backends["10.0.0.1:6379"][0]
        w.apply(extra="  redis_db: 1\n")
        second.dataReceived(cmd(b"GET", ka))
        w.connect_pending()
        middle, middle_wire = w.backends["10.0.0.1:6379"][1]
        w.apply(extra="  redis_db: 2\n")
        third.dataReceived(cmd(b"GET", ka))
        w.connect_pending()
        last, last_wire = w.backends["10.0.0.1:6379"][2]
        self.assertEqual((middle_wire.value(), last_wire.value()), (b"", b""))
        w.reactor.advance(0.3)   # held requests' timeouts do not run while they wait
        old.dataReceived(b"$1\r\n1\r\n")
        self.assertEqual(middle_wire.value(), cmd(b"SELECT", b"1") + cmd(b"GET", ka))
        self.assertEqual(last_wire.value(), b"")          # still behind the middle one
        w.reactor.advance(0.3)
        middle.dataReceived(b"+OK\r\n$1\r\n2\r\n")
        self.assertTrue(middle_wire.disconnecting)
        self.assertEqual(last_wire.value(), cmd(b"SELECT", b"2") + cmd(b"GET", ka))
        last.dataReceived(b"+OK\r\n$1\r\n3\r\n")
        self.assertEqual([first_out.value(), second_out.value(), third_out.value()],
                         [b"$1\r\n1\r\n", b"$1\r\n2\r\n", b"$1\r\n3\r\n"])
        self.assertEqual(w.runtime.pool.counters.forward_error, 0)
        self.assertEqual(w.runtime.pool.servers[0].failure_count, 0)


class RemovedPoolTests(SynchronousTestCase):
    def test_a_draining_client_gets_answers_to_requests_a_limit_held_back(self) -> None:
        w = Wire(extra="  client_max_pending: 2\n")
        client, out = w.client()
        key = w.key_on("a")
        client.dataReceived(cmd(b"GET", key) * 5)   # two go out, three wait in the parser
        w.connect_pending()
        a, wire = w.backends["10.0.0.1:6379"][0]
        self.assertEqual(wire.value(), cmd(b"GET", key) * 2)
        client.drain()                              # the pool is removed
        self.assertEqual(wire.value(), cmd(b"GET", key) * 5)
        a.dataReceived(b"$1\r\nv\r\n" * 5)
        self.assertEqual(out.value(), b"$1\r\nv\r\n" * 5)
        self.assertTrue(out.disconnecting)
