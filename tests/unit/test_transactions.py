"""MULTI/EXEC over in-memory transports: queued at the proxy, one block on the wire, one reply back."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.unit.test_proxying import Harness, cmd


class TransactionWireTests(SynchronousTestCase):
    def test_queued_at_the_proxy_then_sent_as_one_block(self) -> None:
        h = Harness()
        client, out = h.client()
        key = h.key_on("a")
        client.dataReceived(cmd(b"MULTI") + cmd(b"SET", key, b"1") + cmd(b"INCR", key) + cmd(b"PING"))
        self.assertEqual(out.value(), b"+OK\r\n+QUEUED\r\n+QUEUED\r\n+QUEUED\r\n")
        self.assertEqual(h.connect_pending(), {})   # nothing reached a server before EXEC
        client.dataReceived(cmd(b"EXEC"))
        a, wire = h.connect_pending()["a"][0]
        self.assertEqual(wire.value(), cmd(b"MULTI") + cmd(b"SET", key, b"1") + cmd(b"INCR", key) + cmd(b"PING")
                         + cmd(b"EXEC"))
        a.dataReceived(b"+OK\r\n+QUEUED\r\n+QUEUED\r\n")
        self.assertEqual(out.value(), b"+OK\r\n+QUEUED\r\n+QUEUED\r\n+QUEUED\r\n")   # not yet: EXEC's reply is last
        a.dataReceived(b"+QUEUED\r\n*3\r\n+OK\r\n:2\r\n+PONG\r\n")
        self.assertEqual(out.value(), b"+OK\r\n+QUEUED\r\n+QUEUED\r\n+QUEUED\r\n*3\r\n+OK\r\n:2\r\n+PONG\r\n")

    def test_other_clients_on_the_shared_connection_keep_their_replies(self) -> None:
        h = Harness()
        key = h.key_on("a")
        first, first_out = h.client()
        second, second_out = h.client()
        first.dataReceived(cmd(b"MULTI") + cmd(b"GET", key) + cmd(b"EXEC"))
        second.dataReceived(cmd(b"GET", key))
        a, wire = h.connect_pending()["a"][0]
        self.assertEqual(wire.value(), cmd(b"MULTI") + cmd(b"GET", key) + cmd(b"EXEC") + cmd(b"GET", key))
        a.dataReceived(b"+OK\r\n+QUEUED\r\n*1\r\n$1\r\nv\r\n$1\r\nv\r\n")
        self.assertEqual(first_out.value(), b"+OK\r\n+QUEUED\r\n*1\r\n$1\r\nv\r\n")
        self.assertEqual(second_out.value(), b"$1\r\nv\r\n")

    def test_a_server_side_queue_error_comes_back_as_the_server_said(self) -> None:
        h = Harness()
        client, out = h.client()
        key = h.key_on("b")
        client.dataReceived(cmd(b"MULTI") + cmd(b"SET", key, b"1") + cmd(b"EXEC"))
        b, _ = h.connect_pending()["b"][0]
        b.dataReceived(b"+OK\r\n-OOM command not allowed\r\n-EXECABORT Transaction discarded because of previous "
                       b"errors.\r\n")
        self.assertTrue(out.value().endswith(b"+QUEUED\r\n-EXECABORT Transaction discarded because of previous "
                                             b"errors.\r\n"))

    def test_cross_server_exec_is_refused_without_touching_a_server(self) -> None:
        h = Harness()
        client, out = h.client()
        ka, kb = h.key_on("a"), h.key_on("b")
        client.dataReceived(cmd(b"MULTI") + cmd(b"SET", ka, b"1") + cmd(b"MSET", kb, b"2") + cmd(b"EXEC")
                            + cmd(b"PING"))
        self.assertEqual(h.connect_pending(), {})
        replies = out.value().split(b"\r\n")
        self.assertEqual(replies[:3], [b"+OK", b"+QUEUED", b"+QUEUED"])
        self.assertTrue(replies[3].startswith(b"-EXECABORT Transaction discarded: its keys are on more than one "
                                              b"server (SET '%s' on a, MSET '%s' on b)" % (ka, kb)), replies[3])
        self.assertEqual(replies[4], b"+PONG")   # out of MULTI again

    def test_a_watched_transaction_off_the_watchs_server_is_refused_and_counted_once(self) -> None:
        h = Harness()
        client, out = h.client()
        ka, kb = h.key_on("a"), h.key_on("b")
        client.dataReceived(cmd(b"WATCH", ka))
        pin, pin_wire = h.connect_pending()["a"][0]
        pin.dataReceived(b"+OK\r\n")
        client.dataReceived(cmd(b"MULTI") + cmd(b"SET", kb, b"1") + cmd(b"EXEC"))
        self.assertEqual(out.value(), b"+OK\r\n+OK\r\n+QUEUED\r\n-EXECABORT Transaction discarded: its keys are not "
                                      b"on the server of the WATCHed keys (a); use a {tag} to keep them together\r\n")
        self.assertNotIn("b", h.backends)                        # nothing ran
        counters = h.pool.counters
        self.assertEqual((counters.transactions, counters.transactions_refused), (0, 1))
        self.assertEqual(pin_wire.value(), cmd(b"WATCH", ka) + cmd(b"UNWATCH"))
        pin.dataReceived(b"+OK\r\n")
        # Unwatched: the next transaction runs where its keys are, counted once as run.
        client.dataReceived(cmd(b"MULTI") + cmd(b"SET", kb, b"1") + cmd(b"EXEC"))
        h.connect_pending()
        self.assertEqual(h.backend("b")[1].value(), cmd(b"MULTI") + cmd(b"SET", kb, b"1") + cmd(b"EXEC"))
        self.assertEqual((counters.transactions, counters.transactions_refused), (1, 1))

    def test_keyless_transaction_goes_to_the_first_live_server(self) -> None:
        h = Harness()
        client, out = h.client()
        client.dataReceived(cmd(b"MULTI") + cmd(b"PING") + cmd(b"ECHO", b"x") + cmd(b"EXEC"))
        backends = h.connect_pending()
        self.assertEqual(list(backends), ["a"])
        a, wire = backends["a"][0]
        a.dataReceived(b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n+PONG\r\n$1\r\nx\r\n")
        self.assertTrue(out.value().endswith(b"*2\r\n+PONG\r\n$1\r\nx\r\n"))

    def test_a_lost_connection_fails_the_exec_once(self) -> None:
        h = Harness()
        client, out = h.client()
        key = h.key_on("a")
        client.dataReceived(cmd(b"MULTI") + cmd(b"INCR", key) + cmd(b"EXEC") + cmd(b"PING"))
        a, wire = h.connect_pending()["a"][0]
        a.dataReceived(b"+OK\r\n")
        wire.loseConnection()
        a.connectionLost(None)
        replies = out.value().split(b"\r\n")
        self.assertEqual(replies[:2], [b"+OK", b"+QUEUED"])
        self.assertTrue(replies[2].startswith(b"-ERR"), replies)
        self.assertEqual(replies[3], b"+PONG")


class ClusterTransactionTests(SynchronousTestCase):
    def test_keys_of_a_migrating_slot_move_before_the_transaction_runs_on_the_target(self) -> None:
        from tests.unit.cluster.test_migrating import SOURCE, TARGET, Wire, key_in, migrate, topology

        w = Wire()
        w.serve(topology(1, moving={7}))
        client, out = w.client()
        first, second = key_in(7), key_in(7, 1000)
        client.dataReceived(cmd(b"MULTI") + cmd(b"SET", first, b"1") + cmd(b"MGET", first, second) + cmd(b"EXEC"))
        source, source_wire = w.backend(SOURCE)
        self.assertEqual(source_wire.value(), migrate(first))   # each key once (key_in(7, 1000) is the first too)
        source.dataReceived(b"+OK\r\n")
        target, target_wire = w.backend(TARGET)
        self.assertEqual(target_wire.value(), cmd(b"MULTI") + cmd(b"SET", first, b"1") + cmd(b"MGET", first, second)
                         + cmd(b"EXEC"))
        target.dataReceived(b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n+OK\r\n*2\r\n$1\r\n1\r\n$-1\r\n")
        self.assertEqual(out.value(), b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n+OK\r\n*2\r\n$1\r\n1\r\n$-1\r\n")

    def test_a_transaction_over_two_slots_is_refused_naming_them(self) -> None:
        from tests.unit.cluster.test_migrating import Wire, key_in, topology

        w = Wire()
        w.serve(topology(1))
        client, out = w.client()
        a, b = key_in(3), key_in(4)
        client.dataReceived(cmd(b"MULTI") + cmd(b"SET", a, b"1") + cmd(b"SET", b, b"2") + cmd(b"EXEC"))
        self.assertEqual(w.backends, {})
        last = out.value().split(b"\r\n")[3]
        self.assertEqual(last, b"-EXECABORT Transaction discarded: its keys are in more than one slot (SET '%s' in "
                               b"slot 3, SET '%s' in slot 4); use a {tag} to keep them together" % (a, b))
