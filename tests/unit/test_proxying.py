"""Frontend and backends wired over in-memory transports on a fake clock.

No sockets: clients and servers are ``StringTransport``s, the reactor is a
``MemoryReactorClock``, and the test plays every server by hand.
"""

from __future__ import annotations

from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from twinproxy.config import load_text
from twinproxy.outbox import Outbox
from twinproxy.protocols.resp import encode_command
from twinproxy.runtime import PoolRuntime

POOL = """\
alpha:
  listen: 127.0.0.1:22121
  redis: true
  timeout: 400
  auto_eject_hosts: true
  server_failure_limit: 2
  server_retry_timeout: 1000
{extra}  servers:
   - 10.0.0.1:6379:1 a
   - 10.0.0.2:6379:1 b
"""
# The servers' names by address (10.0.0.9: where a test moves server a).
HOSTS = {"10.0.0.1": "a", "10.0.0.2": "b", "10.0.0.9": "a2"}


class HalfClosingTransport(StringTransport):
    """A StringTransport that, like TCP's, can close its writing half alone."""

    write_closed = False
    aborted = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


def cmd(*args: bytes) -> bytes:
    return encode_command(list(args))


class Harness:
    def __init__(self, extra: str = "", outbox: bool = False, turns: bool = False) -> None:
        (self.config,) = load_text(POOL.format(extra=extra))
        self.reactor = MemoryReactorClock()
        # turns: the outbox writes once per reactor turn, as in service.py (advance(0) ends a turn).
        self.outbox = Outbox(self.reactor if turns else None) if outbox or turns else None
        self.runtime = PoolRuntime(self.config, self.reactor, outbox=self.outbox)
        self.codec = self.runtime.codec
        self.pool = self.runtime.pool
        self.links = {link.server.name: link for link in self.runtime.links}
        self.factory = self.runtime.factory
        self.backends = {}

    def key_on(self, name: str, prefix: bytes = b"k") -> bytes:
        for i in range(1000):
            key = prefix + b"%d" % i
            if self.pool.server_for_key(key).name == name:
                return key
        raise AssertionError(name)

    def client(self, transport=None):
        protocol = self.factory.buildProtocol(None)
        transport = transport if transport is not None else StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def connect_pending(self):
        """Complete every connection attempt the links made; return {server: [(protocol, transport)]}."""
        while self.reactor.tcpClients:
            host, port, factory, _, _ = self.reactor.tcpClients.pop(0)
            protocol = factory.buildProtocol(None)
            transport = StringTransport()
            protocol.makeConnection(transport)
            self.connected(HOSTS[host], protocol, transport)
        return self.backends

    def connected(self, name: str, protocol, transport) -> None:
        """Keep a connection just made to server ``name`` (a subclass may sort them)."""
        self.backends.setdefault(name, []).append((protocol, transport))

    def backend(self, name: str, index: int = -1):
        return self.backends[name][index]


class ProxyingTests(SynchronousTestCase):
    def test_requests_forwarded_byte_exact_and_answered_in_client_order(self) -> None:
        h = Harness()
        client, out = h.client()
        ka, kb = h.key_on("a"), h.key_on("b")
        client.dataReceived(cmd(b"GET", ka) + cmd(b"GET", kb) + b"PING\r\n")
        h.connect_pending()
        a, a_wire = h.backend("a")
        b, b_wire = h.backend("b")
        self.assertEqual(a_wire.value(), cmd(b"GET", ka))
        self.assertEqual(b_wire.value(), cmd(b"GET", kb))
        b.dataReceived(b"$1\r\nB\r\n")
        self.assertEqual(out.value(), b"")  # b's reply waits for a's
        a.dataReceived(b"$1\r\nA\r\n")
        self.assertEqual(out.value(), b"$1\r\nA\r\n$1\r\nB\r\n+PONG\r\n")

    def test_many_clients_share_one_backend_connection(self) -> None:
        h = Harness()
        key = h.key_on("a")
        clients = [h.client() for _ in range(3)]
        for client, _ in clients:
            client.dataReceived(cmd(b"GET", key))
        h.connect_pending()
        self.assertEqual(len(h.backends["a"]), 1)
        a, wire = h.backend("a")
        self.assertEqual(wire.value(), cmd(b"GET", key) * 3)
        a.dataReceived(b":1\r\n:2\r\n:3\r\n")
        self.assertEqual([out.value() for _, out in clients], [b":1\r\n", b":2\r\n", b":3\r\n"])

    def test_mget_across_servers_merged(self) -> None:
        h = Harness()
        client, out = h.client()
        ka, kb = h.key_on("a"), h.key_on("b")
        client.dataReceived(cmd(b"MGET", ka, kb, ka))
        h.connect_pending()
        a, a_wire = h.backend("a")
        b, b_wire = h.backend("b")
        self.assertEqual(a_wire.value(), cmd(b"MGET", ka, ka))
        self.assertEqual(b_wire.value(), cmd(b"MGET", kb))
        a.dataReceived(b"*2\r\n$1\r\n1\r\n$1\r\n1\r\n")
        self.assertEqual(out.value(), b"")
        b.dataReceived(b"*1\r\n$-1\r\n")
        self.assertEqual(out.value(), b"*3\r\n$1\r\n1\r\n$-1\r\n$1\r\n1\r\n")

    def test_timeout_fails_every_pending_request_once_and_counts(self) -> None:
        h = Harness()
        client, out = h.client()
        ka, kb = h.key_on("a"), h.key_on("b")
        client.dataReceived(cmd(b"GET", ka) + cmd(b"GET", ka) + cmd(b"GET", kb))
        h.connect_pending()
        b, _ = h.backend("b")
        b.dataReceived(b"$1\r\nB\r\n")
        h.reactor.advance(0.399)
        self.assertEqual(out.value(), b"")
        h.reactor.advance(0.002)
        error = b"-ERR Connection timed out\r\n"
        self.assertEqual(out.value(), error + error + b"$1\r\nB\r\n")
        a, a_wire = h.backend("a")
        self.assertTrue(a_wire.disconnecting or a_wire.disconnected)
        self.assertEqual(h.pool.servers[0].failure_count, 1)
        # A late reply on the dead connection goes nowhere.
        a.dataReceived(b"$1\r\nlate\r\n")
        self.assertEqual(out.value(), error + error + b"$1\r\nB\r\n")

    def test_connection_refused_answers_at_once_and_ejects_at_limit(self) -> None:
        h = Harness()
        client, out = h.client()
        ka = h.key_on("a")
        for _ in range(2):
            client.dataReceived(cmd(b"GET", ka))
            _, _, factory, _, _ = h.reactor.tcpClients.pop()
            factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertEqual(out.value(), b"-ERR Connection refused\r\n" * 2)
        self.assertEqual([s.name for s in h.pool.live_servers], ["b"])
        # While a is ejected its keys go to b.
        client.dataReceived(cmd(b"GET", ka))
        h.connect_pending()
        self.assertEqual(h.backend("b")[1].value(), cmd(b"GET", ka))
        h.reactor.advance(1.0)
        self.assertEqual(len(h.pool.live_servers), 2)

    def test_lost_connection_fails_pending_and_reconnects_on_demand(self) -> None:
        h = Harness()
        client, out = h.client()
        ka = h.key_on("a")
        client.dataReceived(cmd(b"GET", ka))
        h.connect_pending()
        a, _ = h.backend("a")
        a.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(out.value(), b"-ERR Connection reset by peer\r\n")
        client.dataReceived(cmd(b"GET", ka))
        h.connect_pending()
        self.assertEqual(len(h.backends["a"]), 2)
        h.backend("a")[0].dataReceived(b"$1\r\nx\r\n")
        self.assertEqual(out.value(), b"-ERR Connection reset by peer\r\n$1\r\nx\r\n")

    def test_handshake_is_written_first_and_its_reply_swallowed(self) -> None:
        h = Harness("  redis_auth: pw\n  redis_db: 3\n")
        client, out = h.client()
        client.dataReceived(cmd(b"AUTH", b"pw") + cmd(b"GET", b"k"))
        h.connect_pending()
        name = h.pool.server_for_key(b"k").name
        backend, wire = h.backend(name)
        self.assertEqual(wire.value(), cmd(b"AUTH", b"pw") + cmd(b"SELECT", b"3") + cmd(b"GET", b"k"))
        backend.dataReceived(b"+OK\r\n+OK\r\n$1\r\nv\r\n")
        self.assertEqual(out.value(), b"+OK\r\n$1\r\nv\r\n")

    def test_failed_handshake_aborts_with_the_servers_reason(self) -> None:
        h = Harness("  redis_auth: pw\n")
        client, out = h.client()
        client.dataReceived(cmd(b"AUTH", b"pw") + cmd(b"GET", b"k"))
        h.connect_pending()
        backend, wire = h.backend(h.pool.server_for_key(b"k").name)
        backend.dataReceived(b"-WRONGPASS invalid username-password pair\r\n")
        self.assertEqual(out.value(), b"+OK\r\n-ERR backend handshake failed: WRONGPASS invalid "
                                      b"username-password pair\r\n")
        self.assertTrue(wire.disconnecting or wire.disconnected)

    def test_resp3_clients_get_their_own_backend_connection(self) -> None:
        h = Harness()
        key = h.key_on("a")
        old, old_out = h.client()
        new, new_out = h.client()
        new.dataReceived(cmd(b"HELLO", b"3"))
        self.assertTrue(new_out.value().startswith(b"%7\r\n"))
        old.dataReceived(cmd(b"GET", key))
        new.dataReceived(cmd(b"GET", key))
        h.connect_pending()
        (resp2, wire2), (resp3, wire3) = h.backends["a"]
        self.assertEqual(wire2.value(), cmd(b"GET", key))
        self.assertEqual(wire3.value(), cmd(b"HELLO", b"3") + cmd(b"GET", key))
        resp3.dataReceived(b"%1\r\n+server\r\n+redis\r\n_\r\n")
        resp2.dataReceived(b"$-1\r\n")
        self.assertEqual(old_out.value(), b"$-1\r\n")
        self.assertTrue(new_out.value().endswith(b"_\r\n"))

    def test_protocol_error_answers_then_closes(self) -> None:
        h = Harness()
        client, out = h.client()
        client.dataReceived(b"PING\r\n*1\r\n+x\r\nPING\r\n")
        self.assertEqual(out.value(), b"+PONG\r\n-ERR Protocol error: expected '$', got '+'\r\n")
        self.assertTrue(out.disconnecting)

    def test_protocol_error_lingers_reading_until_the_client_hangs_up(self) -> None:
        """After a protocol error the proxy half-closes and drops further input, so the error is not reset away."""
        h = Harness()
        out = HalfClosingTransport()
        client, _ = h.client(out)
        client.pauseProducing()  # replies backed up: reading paused
        client.dataReceived(b"*1\r\n+x\r\n")
        client.resumeProducing()
        self.assertEqual(out.value(), b"-ERR Protocol error: expected '$', got '+'\r\n")
        self.assertTrue(out.write_closed)
        self.assertFalse(out.disconnecting)
        self.assertEqual(out.producerState, "producing")
        client.dataReceived(b"x" * 100_000)  # the rest of what the client was sending: dropped
        self.assertEqual(out.value(), b"-ERR Protocol error: expected '$', got '+'\r\n")
        client.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(h.reactor.getDelayedCalls(), [])
        self.assertEqual(h.pool.counters.client_err, 1)

    def test_protocol_error_linger_is_bounded(self) -> None:
        """A client that never stops sending is cut off after the linger time, or the linger bytes."""
        from twinproxy.frontend import LINGER_BYTES, LINGER_SECONDS

        h = Harness()
        slow = HalfClosingTransport()
        client, _ = h.client(slow)
        client.dataReceived(b"*1\r\n+x\r\n")
        h.reactor.advance(LINGER_SECONDS)
        self.assertTrue(slow.aborted)
        flood = HalfClosingTransport()
        client, _ = h.client(flood)
        client.dataReceived(b"*1\r\n+x\r\n")
        client.dataReceived(b"x" * LINGER_BYTES)
        self.assertFalse(flood.aborted)
        client.dataReceived(b"x")
        self.assertTrue(flood.aborted)
        self.assertEqual(h.reactor.getDelayedCalls(), [])

    def test_quit_answers_ok_then_closes(self) -> None:
        h = Harness()
        client, out = h.client()
        client.dataReceived(b"QUIT\r\nPING\r\n")
        self.assertEqual(out.value(), b"+OK\r\n")
        self.assertTrue(out.disconnecting)

    def test_client_connections_cap(self) -> None:
        h = Harness("  client_connections: 1\n")
        h.client()
        refused = h.factory.buildProtocol(None)
        transport = StringTransport()
        refused.makeConnection(transport)
        self.assertEqual(transport.value(), b"-ERR max number of clients reached\r\n")
        self.assertTrue(transport.disconnecting)

    def test_disconnected_client_replies_are_dropped(self) -> None:
        h = Harness()
        client, out = h.client()
        client.dataReceived(cmd(b"GET", h.key_on("a")))
        h.connect_pending()
        client.connectionLost(Failure(ConnectionDone()))
        a, _ = h.backend("a")
        a.dataReceived(b"$1\r\nx\r\n")
        self.assertEqual(out.value(), b"")
        self.assertEqual(h.factory.clients, set())

    def test_link_stop_closes_connections(self) -> None:
        h = Harness()
        client, _ = h.client()
        client.dataReceived(cmd(b"GET", h.key_on("a")))
        h.connect_pending()
        done = h.links["a"].stop()
        _, wire = h.backend("a")
        self.assertTrue(wire.disconnecting or wire.disconnected)
        h.backend("a")[0].connectionLost(Failure(ConnectionDone()))
        self.successResultOf(done)

    def test_server_connections_opened_together_and_each_client_keeps_one(self) -> None:
        h = Harness("  server_connections: 3\n")
        key = h.key_on("a")
        first, first_out = h.client()
        second, second_out = h.client()
        first.dataReceived(cmd(b"SET", key, b"1"))
        h.connect_pending()
        self.assertEqual(len(h.backends["a"]), 3)
        first.dataReceived(cmd(b"GET", key))
        second.dataReceived(cmd(b"GET", key))
        wires = [wire.value() for _, wire in h.backends["a"]]
        self.assertIn(cmd(b"SET", key, b"1") + cmd(b"GET", key), wires)
        self.assertEqual(sorted(w.count(b"GET") for w in wires), [0, 1, 1])

    def test_reading_pauses_at_client_max_pending_and_resumes_at_half(self) -> None:
        h = Harness("  client_max_pending: 4\n")
        client, out = h.client()
        key = h.key_on("a")
        client.dataReceived(cmd(b"GET", key) * 6)
        self.assertEqual(out.producerState, "paused")
        h.connect_pending()
        a, _ = h.backend("a")
        a.dataReceived(b":1\r\n" * 3)
        self.assertEqual(out.producerState, "paused")  # 3 left: above half of 4
        a.dataReceived(b":1\r\n")
        self.assertEqual(out.producerState, "producing")
        self.assertEqual(out.value(), b":1\r\n" * 4)

    def test_reading_pauses_while_replies_back_up_in_the_transport(self) -> None:
        h = Harness()
        client, out = h.client()
        self.assertIs(out.producer, client)
        client.pauseProducing()  # what the transport does when its buffer is full
        self.assertEqual(out.producerState, "paused")
        client.resumeProducing()
        self.assertEqual(out.producerState, "producing")

    def test_pending_bytes_limit(self) -> None:
        h = Harness("  client_max_pending_bytes: 100\n")
        client, out = h.client()
        client.dataReceived(cmd(b"SET", h.key_on("a"), b"x" * 200))
        self.assertEqual(out.producerState, "paused")

    def test_oversized_request_is_a_protocol_error(self) -> None:
        h = Harness("  max_request_bytes: 1000\n")
        client, out = h.client()
        client.dataReceived(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2000\r\n")
        self.assertTrue(out.value().startswith(b"-ERR Protocol error: invalid bulk length"))
        self.assertTrue(out.disconnecting)

    def test_drain_answers_what_was_sent_then_closes(self) -> None:
        h = Harness()
        client, out = h.client()
        client.dataReceived(cmd(b"GET", h.key_on("a")))
        h.connect_pending()
        done = h.factory.drain()
        self.assertNoResult(done)
        self.assertFalse(out.disconnecting)
        client.dataReceived(cmd(b"GET", b"more"))  # read after drain began: ignored
        h.backend("a")[0].dataReceived(b"$1\r\nv\r\n")
        self.assertEqual(out.value(), b"$1\r\nv\r\n")
        self.assertTrue(out.disconnecting)
        client.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(done)

    def test_outbox_gives_each_client_one_write_per_server_read(self) -> None:
        h = Harness(outbox=True)
        key = h.key_on("a")
        client, out = h.client()
        writes = []
        real_write = out.write
        out.write = lambda data: (writes.append(data), real_write(data))
        client.dataReceived(cmd(b"GET", key) * 3 + b"PING\r\n")
        h.connect_pending()
        a, _ = h.backend("a")
        a.dataReceived(b":1\r\n:2\r\n")
        self.assertEqual(writes, [b":1\r\n:2\r\n"])  # one write; the PING waits behind the third GET
        a.dataReceived(b":3\r\n")
        self.assertEqual(writes, [b":1\r\n:2\r\n", b":3\r\n+PONG\r\n"])

    def test_outbox_writes_once_per_reactor_turn(self) -> None:
        """Requests of several clients read in one turn go to their server connection in one write."""
        h = Harness(turns=True)
        key = h.key_on("a")
        first, first_out = h.client()
        second, second_out = h.client()
        first.dataReceived(cmd(b"SET", key, b"1"))
        h.connect_pending()
        (a, wire), = h.backends["a"]
        h.reactor.advance(0)
        wire.clear()
        first.dataReceived(cmd(b"GET", key))
        second.dataReceived(cmd(b"GET", key))
        self.assertEqual(wire.value(), b"")
        h.reactor.advance(0)
        self.assertEqual(wire.value(), cmd(b"GET", key) * 2)
        a.dataReceived(b"+OK\r\n$1\r\n1\r\n$1\r\n1\r\n")
        self.assertEqual(first_out.value(), b"")
        h.reactor.advance(0)
        self.assertEqual(first_out.value(), b"+OK\r\n$1\r\n1\r\n")
        self.assertEqual(second_out.value(), b"$1\r\n1\r\n")
        self.assertEqual([c for c in h.reactor.getDelayedCalls() if c.func == h.outbox.flush], [])

    def test_outbox_local_replies_and_quit(self) -> None:
        h = Harness(outbox=True)
        client, out = h.client()
        client.dataReceived(b"PING\r\nECHO a\r\nQUIT\r\n")
        self.assertEqual(out.value(), b"+PONG\r\n$1\r\na\r\n+OK\r\n")
        self.assertTrue(out.disconnecting)

    def test_outbox_flushes_on_timeout(self) -> None:
        h = Harness(outbox=True)
        client, out = h.client()
        client.dataReceived(cmd(b"GET", h.key_on("a")))
        h.connect_pending()
        h.reactor.advance(1)
        self.assertEqual(out.value(), b"-ERR Connection timed out\r\n")

    def test_a_request_with_a_terminator_gathers_replies_up_to_it(self) -> None:
        h = Harness()
        client, out = h.client()
        key = h.key_on("a")
        client.dataReceived(cmd(b"GET", key) + cmd(b"GET", key))
        first = client._in_order[0]
        first.terminator = b"+END\r\n"
        first.gathered = []
        h.connect_pending()
        a, _ = h.backend("a")
        a.dataReceived(b":1\r\n:2\r\n+END\r\n:3\r\n")
        self.assertEqual(out.value(), b":1\r\n:2\r\n:3\r\n")
