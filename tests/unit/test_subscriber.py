"""Pub/sub through the frontend, the hub and subscriber connections, on in-memory transports.

No sockets: clients and servers are ``StringTransport``s on a ``MemoryReactorClock``; the test
plays every server (shared and subscriber connections) by hand.  The bytes expected are Redis
7.0's (tests/integration/test_pubsub.py checks them against a real redis-server).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.unit.test_proxying import Harness as ProxyingHarness
from tests.unit.test_proxying import cmd
from twinproxy.config import ServerSpec
from twinproxy.subscriber_connection import SubscriberConnection

REFUSAL = (b"-ERR Can't execute 'get': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are "
           b"allowed in this context\r\n")


def ack(word: bytes, name: bytes, count: int, push: bool = False) -> bytes:
    return (b">3\r\n" if push else b"*3\r\n") + b"$%d\r\n%s\r\n$%d\r\n%s\r\n:%d\r\n" % (
        len(word), word, len(name), name, count)


def message(channel: bytes, data: bytes, push: bool = False) -> bytes:
    return (b">3\r\n" if push else b"*3\r\n") + b"$7\r\nmessage\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
        len(channel), channel, len(data), data)


class Harness(ProxyingHarness):
    """test_proxying's, with each server's subscriber connections kept apart from its shared ones."""

    def __init__(self, extra: str = "") -> None:
        super().__init__(extra)
        self.hub = self.runtime.subscribers
        # server name -> [(protocol, transport)] of its subscriber connections (shared ones: ``backends``)
        self.subscribers: Dict[str, List[Tuple[SubscriberConnection, StringTransport]]] = {}

    def connected(self, name: str, protocol, transport) -> None:
        if isinstance(protocol, SubscriberConnection):
            self.subscribers.setdefault(name, []).append((protocol, transport))
        else:
            super().connected(name, protocol, transport)

    def channel_on(self, name: str, prefix: bytes = b"c") -> bytes:
        """A channel server ``name`` holds (channels are placed as keys are)."""
        return self.key_on(name, prefix)

    def sub(self, name: str, index: int = -1) -> Tuple[SubscriberConnection, StringTransport]:
        return self.subscribers[name][index]


class AckTests(SynchronousTestCase):
    def test_counts_channels_and_patterns_together_and_shard_channels_apart(self) -> None:
        h = Harness()
        client, out = h.client()
        a = h.channel_on("a")
        client.dataReceived(cmd(b"SUBSCRIBE", a, b"x", a))
        h.connect_pending()
        x_server = h.pool.server_for_key(b"x").name
        # Only the servers holding the channels are connected to.
        self.assertEqual(sorted(h.subscribers), sorted({"a", x_server}))
        conn_a, wire_a = h.sub("a")
        for server in {"a", x_server}:
            conn, wire = h.sub(server)
            names = [n for n in (a, b"x") if h.pool.server_for_key(n).name == server]
            self.assertEqual(wire.value(), cmd(b"subscribe", *names))
            conn.dataReceived(b"".join(ack(b"subscribe", n, i + 1) for i, n in enumerate(names)))
        self.assertEqual(out.value(), ack(b"subscribe", a, 1) + ack(b"subscribe", b"x", 2) + ack(b"subscribe", a, 2))
        out.clear()
        client.dataReceived(cmd(b"PSUBSCRIBE", b"p*"))
        h.connect_pending()
        for server in ("a", "b"):   # a pattern goes to every server
            conn, wire = h.sub(server)
            self.assertTrue(wire.value().endswith(cmd(b"psubscribe", b"p*")))
            conn.dataReceived(ack(b"psubscribe", b"p*", 1))
        self.assertEqual(out.value(), ack(b"psubscribe", b"p*", 3))
        out.clear()
        client.dataReceived(cmd(b"SSUBSCRIBE", a))
        conn_a.dataReceived(ack(b"ssubscribe", a, 1))
        self.assertEqual(out.value(), ack(b"ssubscribe", a, 1))
        self.assertEqual(len(h.subscribers["a"]), 1)   # one connection per (client, server)

    def test_a_reply_waits_for_every_servers_ack_and_keeps_the_clients_order(self) -> None:
        h = Harness()
        client, out = h.client()
        a, b = h.channel_on("a"), h.channel_on("b")
        client.dataReceived(cmd(b"SUBSCRIBE", a, b) + b"PING\r\n")
        h.connect_pending()
        h.sub("b")[0].dataReceived(ack(b"subscribe", b, 1))
        self.assertEqual(out.value(), b"")
        h.sub("a")[0].dataReceived(ack(b"subscribe", a, 1))
        self.assertEqual(out.value(), ack(b"subscribe", a, 1) + ack(b"subscribe", b, 2)
                         + b"*2\r\n$4\r\npong\r\n$0\r\n\r\n")

    def test_bare_unsubscribe_acks_from_the_proxys_state(self) -> None:
        h = Harness()
        client, out = h.client()
        client.dataReceived(cmd(b"UNSUBSCRIBE") + cmd(b"PUNSUBSCRIBE") + cmd(b"SUNSUBSCRIBE"))
        self.assertEqual(out.value(), b"*3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n"
                                      b"*3\r\n$12\r\npunsubscribe\r\n$-1\r\n:0\r\n"
                                      b"*3\r\n$12\r\nsunsubscribe\r\n$-1\r\n:0\r\n")
        self.assertEqual(h.reactor.tcpClients, [])   # nothing to ask any server
        out.clear()
        client.dataReceived(cmd(b"HELLO", b"3"))
        out.clear()
        client.dataReceived(cmd(b"UNSUBSCRIBE"))
        self.assertEqual(out.value(), b">3\r\n$11\r\nunsubscribe\r\n_\r\n:0\r\n")

    def test_bare_unsubscribe_drops_every_channel_in_subscription_order(self) -> None:
        h = Harness()
        client, out = h.client()
        a, b = h.channel_on("a"), h.channel_on("b")
        client.dataReceived(cmd(b"SUBSCRIBE", b, a) + cmd(b"PSUBSCRIBE", b"p*"))
        h.connect_pending()
        h.sub("a")[0].dataReceived(ack(b"subscribe", a, 1) + ack(b"psubscribe", b"p*", 2))
        h.sub("b")[0].dataReceived(ack(b"subscribe", b, 1) + ack(b"psubscribe", b"p*", 2))
        out.clear()
        client.dataReceived(cmd(b"UNSUBSCRIBE") + cmd(b"PUNSUBSCRIBE"))
        self.assertTrue(h.sub("a")[1].value().endswith(cmd(b"unsubscribe", a) + cmd(b"punsubscribe", b"p*")))
        h.sub("a")[0].dataReceived(ack(b"unsubscribe", a, 1) + ack(b"punsubscribe", b"p*", 0))
        h.sub("b")[0].dataReceived(ack(b"unsubscribe", b, 1) + ack(b"punsubscribe", b"p*", 0))
        self.assertEqual(out.value(), ack(b"unsubscribe", b, 2) + ack(b"unsubscribe", a, 1)
                         + ack(b"punsubscribe", b"p*", 0))
        # At 0 each subscriber connection closes, once its server said so.
        for name in ("a", "b"):
            self.assertTrue(h.sub(name)[1].disconnecting)
        self.assertEqual((h.hub.connection_count, h.hub.subscribers, client.mode), (0, 0, None))


class ModeTests(SynchronousTestCase):
    def test_resp2_subscribed_mode_refuses_other_commands_until_unsubscribed(self) -> None:
        h = Harness()
        client, out = h.client()
        a = h.channel_on("a")
        client.dataReceived(cmd(b"SUBSCRIBE", a) + cmd(b"GET", b"k") + cmd(b"GET") + b"PING\r\n"
                            + cmd(b"PING", b"hi"))
        h.connect_pending()
        self.assertEqual(h.backends, {})   # the GET went nowhere
        h.sub("a")[0].dataReceived(ack(b"subscribe", a, 1))
        self.assertEqual(out.value(), ack(b"subscribe", a, 1) + REFUSAL
                         + b"-ERR wrong number of arguments for 'get' command\r\n"
                         + b"*2\r\n$4\r\npong\r\n$0\r\n\r\n" + b"*2\r\n$4\r\npong\r\n$2\r\nhi\r\n")
        out.clear()
        client.dataReceived(cmd(b"CLIENT", b"ID") + cmd(b"HELLO", b"3"))
        self.assertEqual(out.value(), REFUSAL.replace(b"'get'", b"'client|id'")
                         + REFUSAL.replace(b"'get'", b"'hello'"))
        out.clear()
        client.dataReceived(cmd(b"UNSUBSCRIBE", a) + cmd(b"GET", b"k"))
        h.connect_pending()
        h.sub("a")[0].dataReceived(ack(b"unsubscribe", a, 0))
        key_server = h.pool.server_for_key(b"k").name
        backend, wire = h.backends[key_server][0]
        self.assertEqual(wire.value(), cmd(b"GET", b"k"))
        backend.dataReceived(b"$1\r\nv\r\n")
        self.assertEqual(out.value(), ack(b"unsubscribe", a, 0) + b"$1\r\nv\r\n")

    def test_resp3_keeps_normal_commands_and_messages_wait_for_earlier_replies(self) -> None:
        h = Harness()
        client, out = h.client()
        a = h.channel_on("a")
        client.dataReceived(cmd(b"HELLO", b"3"))
        out.clear()
        client.dataReceived(cmd(b"SUBSCRIBE", a) + b"PING\r\n")
        h.connect_pending()
        conn, wire = h.sub("a")
        self.assertEqual(wire.value(), cmd(b"HELLO", b"3") + cmd(b"subscribe", a))   # in the client's RESP
        conn.dataReceived(b"%1\r\n$5\r\nproto\r\n:3\r\n" + ack(b"subscribe", a, 1, push=True))
        self.assertEqual(out.value(), ack(b"subscribe", a, 1, push=True) + b"+PONG\r\n")
        out.clear()
        client.dataReceived(cmd(b"GET", b"k"))
        h.connect_pending()
        backend, _ = h.backends[h.pool.server_for_key(b"k").name][0]
        conn.dataReceived(message(a, b"m", push=True))
        self.assertEqual(out.value(), b"")   # behind the GET's reply
        backend.dataReceived(b"%1\r\n+s\r\n+r\r\n_\r\n")
        self.assertEqual(out.value(), b"_\r\n" + message(a, b"m", push=True))


class RelayTests(SynchronousTestCase):
    def test_messages_are_relayed_whole_however_they_arrive(self) -> None:
        h = Harness()
        client, out = h.client()
        a = h.channel_on("a")
        client.dataReceived(cmd(b"PSUBSCRIBE", b"c*"))
        h.connect_pending()
        for name in ("a", "b"):
            h.sub(name)[0].dataReceived(ack(b"psubscribe", b"c*", 1))
        out.clear()
        frame = b"*4\r\n$8\r\npmessage\r\n$2\r\nc*\r\n$%d\r\n%s\r\n$5\r\nhello\r\n" % (len(a), a)
        conn = h.sub("a")[0]
        for byte in range(len(frame) - 1):
            conn.dataReceived(frame[byte:byte + 1])
        self.assertEqual(out.value(), b"")
        conn.dataReceived(frame[-1:] + frame)
        self.assertEqual(out.value(), frame + frame)
        self.assertEqual(h.hub.messages, 2)

    def test_a_message_for_what_was_unsubscribed_is_dropped(self) -> None:
        h = Harness()
        client, out = h.client()
        a = h.channel_on("a")
        other = h.channel_on("a", prefix=b"o")
        client.dataReceived(cmd(b"SUBSCRIBE", a, other))
        h.connect_pending()
        conn = h.sub("a")[0]
        conn.dataReceived(ack(b"subscribe", a, 1) + ack(b"subscribe", other, 2))
        client.dataReceived(cmd(b"UNSUBSCRIBE", a))
        out.clear()
        # Published before the server read the UNSUBSCRIBE: Redis would not send it after the ack.
        conn.dataReceived(message(a, b"late") + ack(b"unsubscribe", a, 1) + message(other, b"ok"))
        self.assertEqual(out.value(), ack(b"unsubscribe", a, 1) + message(other, b"ok"))

    def test_a_client_that_said_hello_2_since_reads_arrays(self) -> None:
        h = Harness()
        client, out = h.client()
        a = h.channel_on("a")
        client.dataReceived(cmd(b"HELLO", b"3") + cmd(b"SUBSCRIBE", a))
        h.connect_pending()
        conn = h.sub("a")[0]
        conn.dataReceived(b"%1\r\n$5\r\nproto\r\n:3\r\n" + ack(b"subscribe", a, 1, push=True))
        client.dataReceived(cmd(b"HELLO", b"2"))
        out.clear()
        conn.dataReceived(message(a, b"m", push=True))
        self.assertEqual(out.value(), message(a, b"m"))


class LifetimeTests(SynchronousTestCase):
    def test_a_client_that_disconnects_closes_its_subscriber_connections(self) -> None:
        h = Harness()
        client, _ = h.client()
        client.dataReceived(cmd(b"PSUBSCRIBE", b"x*"))
        h.connect_pending()
        client.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(all(wire.disconnecting for name in ("a", "b") for _, wire in h.subscribers[name]))
        self.assertEqual((h.hub.connection_count, h.hub.subscribers, len(h.hub.sessions)), (0, 0, 0))

    def test_no_idle_deadline_but_an_ack_deadline(self) -> None:
        """Silence for many timeouts keeps a subscriber; a server that never acks closes the client."""
        h = Harness()
        client, out = h.client()
        a = h.channel_on("a")
        client.dataReceived(cmd(b"SUBSCRIBE", a))
        h.connect_pending()
        conn, wire = h.sub("a")
        conn.dataReceived(ack(b"subscribe", a, 1))
        h.reactor.advance(100)
        self.assertFalse(wire.disconnecting)
        self.assertEqual(h.reactor.getDelayedCalls(), [])
        out.clear()
        client.dataReceived(cmd(b"SUBSCRIBE", a + b"more"))
        h.reactor.advance(0.399)
        self.assertFalse(out.disconnecting)
        h.reactor.advance(0.002)
        self.assertEqual(out.value(), b"-ERR subscriber connection to server 'a' failed: no ack from server "
                                      b"within 400 ms\r\n")
        self.assertTrue(out.disconnecting and wire.disconnecting)
        self.assertEqual(h.hub.lost, 1)

    def test_a_subscriber_connection_lost_closes_the_client_once_answered(self) -> None:
        h = Harness()
        client, out = h.client()
        a = h.channel_on("a")
        client.dataReceived(cmd(b"SUBSCRIBE", a))
        h.connect_pending()
        conn, _ = h.sub("a")
        conn.dataReceived(ack(b"subscribe", a, 1))
        out.clear()
        conn.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(out.value(), b"")   # no error frame: the client's library sees a closed connection
        self.assertTrue(out.disconnecting)
        self.assertEqual(h.hub.connection_count, 0)

    def test_the_per_server_cap_refuses_with_a_clear_error(self) -> None:
        h = Harness("  server_subscriber_connections: 1\n")
        first, _ = h.client()
        second, out = h.client()
        first.dataReceived(cmd(b"SUBSCRIBE", h.channel_on("a")))
        second.dataReceived(cmd(b"SUBSCRIBE", h.channel_on("b")) + cmd(b"SUBSCRIBE", h.channel_on("a")))
        h.connect_pending()
        h.sub("b")[0].dataReceived(ack(b"subscribe", h.channel_on("b"), 1))
        self.assertTrue(out.value().endswith(b"-ERR max number of subscriber connections to server 'a' reached "
                                             b"(server_subscriber_connections: 1)\r\n"))
        self.assertEqual((h.hub.refused, len(h.subscribers["a"])), (1, 1))

    def test_stop_closes_every_subscriber_connection(self) -> None:
        h = Harness()
        client, out = h.client()
        client.dataReceived(cmd(b"PSUBSCRIBE", b"x*"))
        h.connect_pending()
        h.runtime.stop()
        self.assertTrue(all(wire.disconnecting for name in ("a", "b") for _, wire in h.subscribers[name]))
        self.assertEqual(h.hub.connection_count, 0)


class TopologyTests(SynchronousTestCase):
    def test_a_new_address_moves_the_subscriptions_without_a_word_to_the_client(self) -> None:
        """A Sentinel switch or a reload's new address: the old connection closes, the new one subscribes all."""
        h = Harness()
        client, out = h.client()
        a = h.channel_on("a")
        client.dataReceived(cmd(b"SUBSCRIBE", a) + cmd(b"PSUBSCRIBE", b"p*"))
        h.connect_pending()
        old, old_wire = h.sub("a")
        old.dataReceived(ack(b"subscribe", a, 1) + ack(b"psubscribe", b"p*", 2))
        h.sub("b")[0].dataReceived(ack(b"psubscribe", b"p*", 1))
        out.clear()
        h.runtime.link("a").cut_over(ServerSpec(name="a", weight=1, host="10.0.0.9", port=6379), "switch")
        h.reactor.advance(0)   # at the end of the switch's turn
        self.assertTrue(old_wire.disconnecting)
        h.connect_pending()
        moved, wire = h.subscribers["a2"][0]
        self.assertEqual(wire.value(), cmd(b"subscribe", a) + cmd(b"psubscribe", b"p*"))
        moved.dataReceived(ack(b"subscribe", a, 1) + ack(b"psubscribe", b"p*", 2))
        moved.dataReceived(message(a, b"after"))
        self.assertEqual(out.value(), message(a, b"after"))
        self.assertEqual(h.hub.connection_count, 2)

    def test_an_ejected_server_s_channels_move_and_come_back(self) -> None:
        h = Harness()
        client, out = h.client()
        b = h.channel_on("b")
        client.dataReceived(cmd(b"SUBSCRIBE", b))
        h.connect_pending()
        conn_b, wire_b = h.sub("b")
        conn_b.dataReceived(ack(b"subscribe", b, 1))
        out.clear()
        for _ in range(2):   # server_failure_limit: 2
            h.pool.record_failure(h.pool.servers[1], "down")
        h.reactor.advance(0)
        h.connect_pending()
        conn_a, wire_a = h.sub("a")
        self.assertEqual(wire_a.value(), cmd(b"subscribe", b))   # where PUBLISH b now goes
        self.assertTrue(wire_b.value().endswith(cmd(b"unsubscribe", b)))
        conn_b.dataReceived(ack(b"unsubscribe", b, 0))
        self.assertTrue(wire_b.disconnecting)
        conn_a.dataReceived(ack(b"subscribe", b, 1))
        h.reactor.advance(1.0)   # server_retry_timeout: b is back, and so is the channel
        h.reactor.advance(0)
        h.connect_pending()
        self.assertEqual(h.sub("b")[1].value(), cmd(b"subscribe", b))
        self.assertTrue(wire_a.value().endswith(cmd(b"unsubscribe", b)))
        self.assertEqual(out.value(), b"")


class ClusterTests(SynchronousTestCase):
    def test_channels_follow_their_slots_owner(self) -> None:
        """A cluster pool: a channel is subscribed on its slot's owner, and moves with the slot."""
        from tests.unit.cluster.test_slot_routing import Wire, key_in, topology

        wire = Wire()
        client, out = wire.client()
        channel = key_in(600)
        client.dataReceived(cmd(b"SUBSCRIBE", channel))
        self.assertEqual(out.value(), b"-ERR cluster 'shop' not ready: its topology is not loaded yet\r\n")
        out.clear()
        wire.serve(topology())
        client.dataReceived(cmd(b"SUBSCRIBE", channel))
        subscribers = [(host, factory) for host, _, factory, _, _ in wire.reactor.tcpClients
                       if isinstance(factory.connection, SubscriberConnection)]
        self.assertEqual([host for host, _ in subscribers], ["10.0.0.2"])
        wire.connect_pending()
        (conn, conn_wire), = [pair for pair in wire.backends["10.0.0.2:6379"]
                              if isinstance(pair[0], SubscriberConnection)]
        conn.dataReceived(ack(b"subscribe", channel, 1))
        self.assertEqual(out.value(), ack(b"subscribe", channel, 1))
        wire.serve(topology(generation=2, owners=[1] * 1024))
        wire.reactor.advance(0)
        wire.connect_pending()
        (moved, moved_wire), = [pair for pair in wire.backends["10.0.0.1:6379"]
                                if isinstance(pair[0], SubscriberConnection)]
        self.assertEqual(moved_wire.value(), cmd(b"subscribe", channel))
        self.assertTrue(conn_wire.value().endswith(cmd(b"unsubscribe", channel)))
