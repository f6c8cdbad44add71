"""Fan-out commands through the frontend and the backends, over in-memory transports on a fake clock.

The test plays both servers (a and b) by hand, as in test_proxying: what
each server is sent, on which connection, and what the client gets back,
in its order.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.unit.test_proxying import Harness, cmd
from twinproxy.protocols import resp
from twinproxy.protocols.redis_scripts import sha1_hex

BODY = b"return redis.call('GET', KEYS[1])"
SHA = sha1_hex(BODY)
NOSCRIPT = b"-NOSCRIPT No matching script. Please use EVAL.\r\n"


class FanoutProxyingTests(SynchronousTestCase):
    def test_a_fan_out_is_answered_in_the_clients_order(self) -> None:
        h = Harness()
        client, out = h.client()
        ka, kb = h.key_on("a"), h.key_on("b")
        client.dataReceived(cmd(b"GET", ka) + cmd(b"DBSIZE") + cmd(b"GET", kb))
        h.connect_pending()
        a, a_wire = h.backend("a")
        b, b_wire = h.backend("b")
        self.assertEqual(a_wire.value(), cmd(b"GET", ka) + cmd(b"DBSIZE"))
        self.assertEqual(b_wire.value(), cmd(b"DBSIZE") + cmd(b"GET", kb))
        b.dataReceived(b":5\r\n$1\r\nB\r\n")
        self.assertEqual(out.value(), b"")
        a.dataReceived(b"$1\r\nA\r\n:2\r\n")
        self.assertEqual(out.value(), b"$1\r\nA\r\n:7\r\n$1\r\nB\r\n")
        self.assertEqual(h.pool.counters.fanouts, 1)
        self.assertEqual(h.pool.counters.commands["dbsize"].calls, 1)

    def test_noscript_is_healed_on_the_clients_connection_once(self) -> None:
        h = Harness("  server_connections: 2\n")
        client, out = h.client()
        key = h.key_on("a")
        client.dataReceived(cmd(b"SCRIPT", b"LOAD", BODY))
        h.connect_pending()
        slot = client.client_id % 2
        a, a_wire = h.backends["a"][slot]
        b, b_wire = h.backends["b"][slot]
        a.dataReceived(resp.bulk(SHA))
        b.dataReceived(resp.bulk(SHA))
        self.assertEqual(out.value(), resp.bulk(SHA))
        a_wire.clear()
        client.dataReceived(cmd(b"EVALSHA", SHA, b"1", key) + cmd(b"GET", key))
        self.assertEqual(a_wire.value(), cmd(b"EVALSHA", SHA, b"1", key) + cmd(b"GET", key))
        a_wire.clear()
        a.dataReceived(NOSCRIPT)          # this server lost its script cache
        self.assertEqual(a_wire.value(), cmd(b"SCRIPT", b"LOAD", BODY) + cmd(b"EVALSHA", SHA, b"1", key))
        a.dataReceived(b"$1\r\nv\r\n")    # the GET sent before the heal
        self.assertEqual(out.value(), resp.bulk(SHA))   # the EVALSHA's reply comes first, and is not here yet
        a.dataReceived(resp.bulk(SHA) + b"$1\r\nv\r\n")
        self.assertEqual(out.value(), resp.bulk(SHA) + b"$1\r\nv\r\n" * 2)
        self.assertEqual(h.pool.counters.scripts_healed, 1)
        self.assertEqual(h.pool.counters.commands["evalsha"].latency.count, 1)   # one observation, not two
        # A second NOSCRIPT after the heal reaches the client.
        a_wire.clear()
        client.dataReceived(cmd(b"EVALSHA", SHA, b"1", key))
        a.dataReceived(NOSCRIPT)
        a.dataReceived(resp.bulk(SHA) + NOSCRIPT)
        self.assertTrue(out.value().endswith(NOSCRIPT))
        self.assertEqual(h.pool.counters.scripts_healed, 1)

    def test_an_unknown_sha_passes_noscript_through(self) -> None:
        h = Harness()
        client, out = h.client()
        key = h.key_on("b")
        client.dataReceived(cmd(b"EVALSHA", b"f" * 40, b"1", key))
        h.connect_pending()
        b, b_wire = h.backend("b")
        b.dataReceived(NOSCRIPT)
        self.assertEqual(out.value(), NOSCRIPT)
        self.assertEqual(b_wire.value(), cmd(b"EVALSHA", b"f" * 40, b"1", key))

    def test_an_eval_body_is_remembered_for_evalsha(self) -> None:
        h = Harness()
        client, out = h.client()
        key = h.key_on("b")
        client.dataReceived(cmd(b"EVAL", BODY, b"1", key) + cmd(b"EVALSHA", SHA.upper(), b"1", key))
        h.connect_pending()
        b, b_wire = h.backend("b")
        b.dataReceived(b"$-1\r\n" + NOSCRIPT)
        self.assertEqual(out.value(), b"$-1\r\n")
        b.dataReceived(resp.bulk(SHA) + b"$-1\r\n")
        self.assertEqual(out.value(), b"$-1\r\n$-1\r\n")

    def test_scan_walks_the_servers_in_configuration_order(self) -> None:
        h = Harness()
        client, out = h.client()
        client.dataReceived(cmd(b"SCAN", b"0", b"COUNT", b"2"))
        h.connect_pending()
        a, a_wire = h.backend("a")
        self.assertEqual(a_wire.value(), cmd(b"SCAN", b"0", b"COUNT", b"2"))
        a.dataReceived(b"*2\r\n$2\r\n17\r\n*1\r\n$1\r\nx\r\n")
        cursor = b"%d" % (17 << 10)
        self.assertEqual(out.value(), b"*2\r\n" + resp.bulk(cursor) + b"*1\r\n$1\r\nx\r\n")
        out.clear()
        client.dataReceived(cmd(b"SCAN", cursor, b"COUNT", b"2"))
        a.dataReceived(b"*2\r\n$1\r\n0\r\n*0\r\n")
        self.assertEqual(out.value(), b"*2\r\n$1\r\n1\r\n*0\r\n")     # server b next, from its start
        out.clear()
        client.dataReceived(cmd(b"SCAN", b"1", b"COUNT", b"2"))
        h.connect_pending()
        b, b_wire = h.backend("b")
        self.assertEqual(b_wire.value(), cmd(b"SCAN", b"0", b"COUNT", b"2"))
        b.dataReceived(b"*2\r\n$1\r\n0\r\n*1\r\n$1\r\ny\r\n")
        self.assertEqual(out.value(), b"*2\r\n$1\r\n0\r\n*1\r\n$1\r\ny\r\n")
        self.assertEqual(h.pool.counters.scans, 3)
