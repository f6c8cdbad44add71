"""Reply accounting: per-client soft and hard output limits, the process-wide budget, the uncopied writer.

Clients run on a ``StringTransport`` that has a socket of a chosen room,
as a TCP transport has, so the frontend writes it itself (pull producer);
the test says when the socket is writable again.  Servers are played by
hand on a ``MemoryReactorClock``.
"""

from __future__ import annotations

import os
import tempfile

from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from twinproxy import metrics, stats, tap
from twinproxy.config import load_text
from twinproxy.output import BIG_REPLY, INITIAL_ESTIMATE, ClientOutput, _group, peer_text
from twinproxy.protocols.resp import encode_command
from twinproxy.replybudget import ReplyBudget
from twinproxy.runtime import PoolRuntime

POOL = """\
alpha:
  listen: 127.0.0.1:22121
  redis: true
{extra}  servers:
   - 10.0.0.1:6379:1 a
"""


def cmd(*args: bytes) -> bytes:
    return encode_command(list(args))


def bulk(size: int, fill: bytes = b"v") -> bytes:
    return b"$%d\r\n%s\r\n" % (size, fill * size)


class FakeSocket:
    """A non-blocking socket that takes ``room`` bytes, then raises BlockingIOError."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.received = bytearray()
        self.error = None

    def send(self, data) -> int:
        if self.error is not None:
            raise self.error
        if not self.room:
            raise BlockingIOError()
        taken = min(len(data), self.room)
        self.received += bytes(memoryview(data)[:taken])
        self.room -= taken
        return taken


class SocketTransport(StringTransport):
    """A StringTransport with a socket and (empty) Twisted buffers, like a TCP transport's."""

    dataBuffer = b""
    offset = 0

    def __init__(self, room: int = 1 << 30) -> None:
        super().__init__()
        self.socket = FakeSocket(room)
        self._tempDataBuffer = []
        self.writing = False
        self.aborted = False

    def startWriting(self) -> None:
        self.writing = True

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class Harness:
    def __init__(self, extra: str = "", budget: ReplyBudget = None) -> None:
        (self.config,) = load_text(POOL.format(extra=extra))
        self.reactor = MemoryReactorClock()
        self.runtime = PoolRuntime(self.config, self.reactor, outbox=None)
        self.factory = self.runtime.factory
        self.factory.reply_budget = budget
        self.counters = self.runtime.pool.counters
        self.server = None

    def client(self, room: int = 1 << 30):
        protocol = self.factory.buildProtocol(None)
        transport = SocketTransport(room)
        protocol.makeConnection(transport)
        return protocol, transport

    def backend(self):
        """The (one) server connection, connected on first use; returns (protocol, wire)."""
        if self.server is None:
            _, _, factory, _, _ = self.reactor.tcpClients.pop(0)
            protocol = factory.buildProtocol(None)
            wire = StringTransport()
            protocol.makeConnection(wire)
            self.server = (protocol, wire)
        return self.server

    def answer(self, *replies: bytes) -> None:
        self.backend()[0].dataReceived(b"".join(replies))

    def requests_sent(self) -> int:
        return self.backend()[1].value().count(b"GET")


def writable(client, transport, room: int) -> None:
    """The client read ``room`` bytes: its socket takes that much more, and Twisted says so."""
    transport.socket.room += room
    transport.writing = False
    client.resumeProducing()


class WriterTests(SynchronousTestCase):
    def test_a_client_on_a_socket_is_a_pull_producer_and_written_directly(self) -> None:
        """On a socket transport the frontend sends itself; Twisted's buffer stays empty."""
        h = Harness()
        client, transport = h.client()
        self.assertIs(transport.producer, client)
        self.assertFalse(transport.streaming)
        client.dataReceived(cmd(b"GET", b"k"))
        h.answer(b"$1\r\nv\r\n")
        self.assertEqual(bytes(transport.socket.received), b"$1\r\nv\r\n")
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.writing)

    def test_what_the_socket_does_not_take_is_queued_uncopied_and_sent_in_order(self) -> None:
        """The rest of a reply waits as a view of the reply itself, and goes out when the socket is writable."""
        h = Harness()
        client, transport = h.client(room=10)
        client.dataReceived(cmd(b"GET", b"k") * 3)
        first, second = bulk(100, b"a"), bulk(50000, b"b")
        h.answer(first)
        self.assertEqual(client._output.queued, len(first) - 10)
        self.assertTrue(transport.writing)
        queued = client._output._chunks[0]
        self.assertIsInstance(queued, memoryview)
        h.answer(second, bulk(3, b"c"))
        self.assertEqual(client._output.queued, len(first) - 10 + len(second) + len(bulk(3)))
        writable(client, transport, 1000)
        self.assertEqual(client._output.queued, len(first) + len(second) + len(bulk(3)) - 1010)
        writable(client, transport, 1 << 20)
        self.assertEqual(bytes(transport.socket.received), first + second + bulk(3, b"c"))
        self.assertEqual(client._output.queued, 0)
        self.assertFalse(transport.writing)

    def test_big_replies_are_queued_as_they_are_and_small_ones_joined(self) -> None:
        """A big burst keeps each big reply object; the small ones between are joined."""
        big = b"x" * BIG_REPLY
        grouped = _group([b"a", b"b", big, b"c"])
        self.assertEqual(grouped, [b"ab", big, b"c"])
        self.assertIs(grouped[1], big)

    def test_estimate_follows_bigger_replies_at_once_and_smaller_ones_slowly(self) -> None:
        """The in-flight estimate jumps up to a bigger reply and decays by a sixteenth toward smaller ones."""
        output = ClientOutput(StringTransport(), None)
        self.assertEqual(output.estimate, INITIAL_ESTIMATE)
        output.write([b"x" * 100])
        self.assertEqual(output.estimate, 100)
        output.write([b"x" * 6000])
        self.assertEqual(output.estimate, 6000)
        output.write([b"x" * 400, b"x" * 400])
        self.assertEqual(output.estimate, 6000 - (6000 - 400) // 16)

    def test_a_broken_socket_drops_the_queue_and_lets_twisted_close(self) -> None:
        """A send that fails (reset) forgets the queue and asks Twisted to write, which meets the error."""
        h = Harness()
        client, transport = h.client(room=0)
        client.dataReceived(cmd(b"GET", b"k"))
        h.answer(bulk(100))
        self.assertEqual(client._output.queued, len(bulk(100)))
        transport.socket.error = ConnectionResetError()
        writable(client, transport, 10)
        self.assertEqual(client._output.queued, 0)
        self.assertTrue(transport.writing)

    def test_close_after_queued_replies_waits_for_the_socket(self) -> None:
        """QUIT closes only once every queued reply is sent; the pull producer is unregistered first."""
        h = Harness()
        client, transport = h.client(room=0)
        client.dataReceived(cmd(b"GET", b"k") + b"QUIT\r\n")
        h.answer(bulk(100))
        self.assertFalse(transport.disconnecting)
        writable(client, transport, 1 << 20)
        self.assertEqual(bytes(transport.socket.received), bulk(100) + b"+OK\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(transport.producer)

    def test_peer_text_names_the_client(self) -> None:
        """The log line's client address: host:port for TCP."""
        self.assertEqual(peer_text(StringTransport()), "192.168.1.1:54321")


class ClientLimitTests(SynchronousTestCase):
    def test_a_read_is_dispatched_only_as_far_as_max_pending_allows(self) -> None:
        """Ten requests in one read, client_max_pending 4: four go out, the rest wait in the parser."""
        h = Harness("  client_max_pending: 4\n")
        client, transport = h.client()
        client.dataReceived(cmd(b"GET", b"k") * 10)
        self.assertEqual(h.requests_sent(), 4)
        self.assertEqual(transport.producerState, "paused")
        h.answer(b":1\r\n" * 2)   # 2 left: half of 4, reading and dispatch resume
        self.assertEqual(h.requests_sent(), 6)
        h.answer(b":1\r\n" * 4)
        h.answer(b":1\r\n" * 2)
        h.answer(b":1\r\n" * 2)
        self.assertEqual(h.requests_sent(), 10)
        self.assertEqual(bytes(transport.socket.received), b":1\r\n" * 10)
        self.assertEqual(transport.producerState, "producing")

    def test_soft_limit_stops_reading_and_dispatch_until_half_is_read(self) -> None:
        """Unread replies plus in-flight estimates at the soft limit: nothing more is dispatched or read."""
        h = Harness("  client_output_soft_limit: 10000\n  client_output_hard_limit: 0\n")
        client, transport = h.client(room=0)
        client.dataReceived(cmd(b"GET", b"k"))
        h.answer(bulk(3000))                      # estimate: 3 KiB a reply
        client.dataReceived(cmd(b"GET", b"k") * 10)
        # 3009 queued; each request in flight counts 3009: three more reach 10000.
        self.assertEqual(h.requests_sent(), 1 + 3)
        self.assertEqual(transport.producerState, "paused")
        h.answer(bulk(3000) * 3)                  # 12036 queued, nothing in flight
        self.assertEqual(h.requests_sent(), 4)
        writable(client, transport, 6100)         # 5936 left: above half of 10000
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(h.requests_sent(), 4)
        writable(client, transport, 1000)         # 4936: two more fit
        self.assertEqual(h.requests_sent(), 6)
        answered = 4
        for _ in range(20):
            in_flight = h.requests_sent() - answered
            if not in_flight:
                break
            h.answer(bulk(3000) * in_flight)
            answered += in_flight
            writable(client, transport, 1 << 30)
        self.assertEqual(answered, 11)
        self.assertEqual(len(transport.socket.received), 11 * len(bulk(3000)))
        self.assertEqual(transport.producerState, "producing")

    def test_hard_limit_closes_the_client_counts_and_logs_once(self) -> None:
        """Past the hard limit the client is aborted, counted, logged with pool and address, and forgotten."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        budget = ReplyBudget(1 << 30)
        h = Harness("  client_output_hard_limit: 1000\n", budget=budget)
        client, transport = h.client(room=0)
        client.dataReceived(cmd(b"GET", b"k") * 3)
        h.answer(bulk(600))
        self.assertFalse(transport.aborted)
        h.answer(bulk(600))
        self.assertTrue(transport.aborted)
        self.assertEqual(h.counters.client_output_limit_closed, 1)
        self.assertEqual(client._output.queued, 0)
        self.assertEqual(budget.used, 0)
        h.answer(bulk(600))                       # a late reply is dropped
        self.assertEqual(budget.used, 0)
        client.connectionLost(Failure(ConnectionAborted()))
        self.assertEqual((h.counters.client_err, h.counters.client_eof), (0, 0))
        lines = [e for e in events if "client_output_hard_limit" in e.get("log_format", "")]
        self.assertEqual(len(lines), 1)
        self.assertEqual((lines[0]["pool"], lines[0]["client"]), ("alpha", "192.168.1.1:54321"))

    def test_limits_are_pool_keys_with_defaults_and_zero_for_none(self) -> None:
        """client_output_soft_limit / client_output_hard_limit: 8 MiB and 32 MiB unless set; 0 is no limit."""
        (config,) = load_text(POOL.format(extra=""))
        self.assertEqual((config.client_output_soft_limit, config.client_output_hard_limit), (8 << 20, 32 << 20))
        (config,) = load_text(POOL.format(extra="  client_output_soft_limit: 0\n  client_output_hard_limit: 5\n"))
        self.assertEqual((config.client_output_soft_limit, config.client_output_hard_limit), (0, 5))

    def test_counter_in_stats_document_and_metrics(self) -> None:
        """client_output_limit_closed is a pool field of the stats JSON and a Prometheus counter."""
        h = Harness()
        h.counters.client_output_limit_closed = 3
        self.assertEqual(stats.pool_document(h.runtime)["client_output_limit_closed"], 3)
        self.assertIn("client_output_limit_closed", [name for name, _ in stats.POOL_FIELDS])
        text = metrics.render(lambda: [h.runtime], 0.0, h.reactor).decode()
        self.assertIn('twinproxy_pool_client_output_limit_closed_total{pool="alpha"} 3.0', text)


class BudgetTests(SynchronousTestCase):
    def test_budget_trips_at_the_limit_and_releases_at_half(self) -> None:
        """Charges add up; over at the limit; waiting clients are told once it falls to half."""
        budget = ReplyBudget(1000)
        told = []

        class Waiter:
            def budget_released(self) -> None:
                told.append(self)

        budget.charge(999)
        self.assertFalse(budget.over)
        budget.charge(1)
        self.assertTrue(budget.over)
        waiter = Waiter()
        budget.wait(waiter)
        budget.charge(-499)
        self.assertEqual(told, [])
        budget.charge(-1)
        self.assertFalse(budget.over)
        self.assertEqual(told, [waiter])
        self.assertEqual(budget.trips, 1)

    def test_small_changes_are_counted_once_they_add_up(self) -> None:
        """A client's share is brought up to date when it moved by the quantum, or fell to nothing."""
        budget = ReplyBudget(1 << 30)
        self.assertEqual(budget.quantum, 16 * 1024)
        h = Harness(budget=budget)
        client, transport = h.client(room=0)
        client.dataReceived(cmd(b"GET", b"k"))
        self.assertEqual(budget.used, 0)          # 1 KiB estimated: not worth a call yet
        h.answer(bulk(20000))
        self.assertEqual(budget.used, len(bulk(20000)))
        writable(client, transport, 1 << 30)
        self.assertEqual(budget.used, 0)

    def test_zero_is_no_limit(self) -> None:
        """--max-reply-buffer 0: the budget counts but never trips."""
        budget = ReplyBudget(0)
        budget.charge(1 << 50)
        self.assertFalse(budget.over)

    def test_over_budget_non_readers_wait_and_readers_go_one_request_at_a_time(self) -> None:
        """Past the process-wide limit a client holding replies is not read; one holding none gets
        one request served at a time; all resume when the sum falls to half."""
        budget = ReplyBudget(10000)
        h = Harness(budget=budget)
        hog, hog_wire = h.client(room=0)
        reader, reader_wire = h.client()
        hog.dataReceived(cmd(b"GET", b"k") * 4)
        h.answer(bulk(3000) * 4)                  # 12028 unread: over
        self.assertTrue(budget.over)
        hog.dataReceived(cmd(b"GET", b"k") * 2)
        self.assertEqual(h.requests_sent(), 4)
        self.assertEqual(hog_wire.producerState, "paused")
        reader.dataReceived(cmd(b"GET", b"k") * 3)
        self.assertEqual(h.requests_sent(), 5)     # one of the reader's three
        self.assertEqual(reader_wire.producerState, "paused")
        h.answer(b":1\r\n")
        self.assertEqual(h.requests_sent(), 6)     # the reader's next
        h.answer(b":2\r\n")
        self.assertEqual(h.requests_sent(), 7)
        h.answer(b":3\r\n")
        self.assertEqual(bytes(reader_wire.socket.received), b":1\r\n:2\r\n:3\r\n")
        self.assertEqual(reader_wire.producerState, "producing")
        writable(hog, hog_wire, 7100)             # 4936 left: under half, the hog's two go out
        self.assertEqual(h.requests_sent(), 9)
        h.answer(bulk(3000) * 2)
        writable(hog, hog_wire, 1 << 30)
        self.assertEqual(len(hog_wire.socket.received), 6 * len(bulk(3000)))
        self.assertEqual(budget.used, 0)
        self.assertFalse(budget.over)
        self.assertEqual(hog_wire.producerState, "producing")

    def test_clients_that_go_give_their_share_back(self) -> None:
        """A closed client's queued replies and in-flight estimates leave the budget."""
        budget = ReplyBudget(1 << 30)
        h = Harness(budget=budget)
        client, _ = h.client(room=0)
        client.dataReceived(cmd(b"GET", b"k") * 3)
        h.answer(bulk(30000))
        self.assertEqual(budget.used, 3 * len(bulk(30000)))   # one queued, two in flight at its size
        client.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(budget.used, 0)


class OptionTests(SynchronousTestCase):
    def _options(self, *args: str):
        directory = tempfile.TemporaryDirectory()   # not trial's mktemp: that writes under the cwd
        self.addCleanup(directory.cleanup)
        path = os.path.join(directory.name, "pools.yml")
        with open(path, "w") as out:
            out.write("alpha:\n  listen: 127.0.0.1:22121\n  redis: true\n  servers:\n   - 127.0.0.1:6379:1\n"
                      "beta:\n  listen: 127.0.0.1:22122\n  servers:\n   - 127.0.0.1:11211:1\n")
        options = tap.Options()
        options.parseOptions(["--config", path, *args])
        return options

    def test_max_reply_buffer_defaults_to_256_mib_and_refuses_negatives(self) -> None:
        """--max-reply-buffer BYTES: 256 MiB unless given; a negative size is a usage error."""
        self.assertEqual(self._options()["max-reply-buffer"], 256 << 20)
        self.assertEqual(self._options("--max-reply-buffer", "0")["max-reply-buffer"], 0)
        self.assertRaises(usage.UsageError, self._options, "--max-reply-buffer", "-1")

    def test_every_pool_of_a_process_shares_one_budget(self) -> None:
        """tap.build makes one ReplyBudget of the option's size and gives it to every pool's factory."""
        top = tap.build(self._options("--max-reply-buffer", "12345"), MemoryReactorClock())
        budgets = {id(pool.factory.reply_budget) for pool in top.getServiceNamed("pools")}
        self.assertEqual(len(budgets), 1)
        self.assertEqual(top.getServiceNamed("pools").getServiceNamed("alpha").factory.reply_budget.limit, 12345)
