"""Blocking commands on leased connections, over in-memory transports on a fake clock.

The lease primitive (twinproxy.leases: the cap, reuse, discard, retirement by
the link's runtime changes), the deadline (the command's timeout plus the
pool's), and the frontend's hold (a blocked client's later requests wait).
"""

from __future__ import annotations

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.unit.test_proxying import POOL, Harness, cmd
from twinproxy.config import load_text
from twinproxy.metrics import render
from twinproxy.stats import pool_document
from twinproxy.topology import diff_pool

TIMED_OUT = b"-ERR Connection timed out\r\n"


def lent(h: Harness, name: str = "a"):
    """The link of server ``name`` and its leases."""
    link = h.links[name]
    return link, link.leases


def blocked(h: Harness, timeout: bytes = b"0"):
    """A new client blocked in BLPOP on server a: (client, its transport, (the lease, its transport))."""
    client, out = h.client()
    client.dataReceived(cmd(b"BLPOP", h.key_on("a"), timeout))
    h.connect_pending()
    return client, out, h.backend("a")


class LeaseTests(SynchronousTestCase):
    def test_a_blocking_command_runs_alone_on_a_lease_that_the_next_one_reuses(self) -> None:
        h = Harness()
        key = h.key_on("a")
        client, out, (conn, wire) = blocked(h, b"1")
        self.assertEqual(len(h.backends["a"]), 1)
        self.assertEqual(wire.value(), cmd(b"BLPOP", key, b"1"))
        link, leases = lent(h)
        self.assertEqual((leases.in_use_count, leases.idle_count, link.connection_count), (1, 0, 1))
        conn.dataReceived(b"*-1\r\n")
        self.assertEqual(out.value(), b"*-1\r\n")
        self.assertEqual((leases.in_use_count, leases.idle_count), (0, 1))
        client.dataReceived(cmd(b"BLPOP", key, b"1"))
        self.assertEqual(h.reactor.tcpClients, [])            # no new TCP connection: the idle one
        self.assertEqual(wire.value(), cmd(b"BLPOP", key, b"1") * 2)
        conn.dataReceived(b"*2\r\n$1\r\nq\r\n$1\r\nx\r\n")
        self.assertEqual(out.value(), b"*-1\r\n*2\r\n$1\r\nq\r\n$1\r\nx\r\n")
        self.assertEqual(h.pool.counters.blocking_commands, 2)
        # Its time waiting for a key is not the server's latency.
        self.assertEqual(h.pool.servers[0].counters.latency.count, 0)
        self.assertEqual(h.pool.counters.commands["blpop"].latency.count, 2)

    def test_a_client_in_another_database_leases_a_connection_opened_there(self) -> None:
        h = Harness()
        client, out = h.client()
        key = h.key_on("a")
        client.dataReceived(cmd(b"SELECT", b"3") + cmd(b"BLPOP", key, b"0"))
        h.connect_pending()
        lease, wire = h.backend("a")
        self.assertEqual(wire.value(), cmd(b"SELECT", b"3") + cmd(b"BLPOP", key, b"0"))
        lease.dataReceived(b"+OK\r\n*-1\r\n")
        client.dataReceived(cmd(b"GET", key))                 # then its shared connections of db 3
        h.connect_pending()
        _, shared = h.backend("a")
        self.assertEqual(shared.value(), cmd(b"SELECT", b"3") + cmd(b"GET", key))
        self.assertEqual(out.value(), b"+OK\r\n*-1\r\n")

    def test_the_cap_refuses_at_once_with_a_clear_error(self) -> None:
        h = Harness("  server_leased_connections: 2\n")
        key = h.key_on("a")
        blocked = [h.client() for _ in range(2)]
        for client, _ in blocked:
            client.dataReceived(cmd(b"BLPOP", key, b"0"))
        third, out = h.client()
        third.dataReceived(cmd(b"BRPOP", key, b"0") + b"PING\r\n")
        self.assertEqual(out.value(), b"-ERR no connection to lend for BRPOP on server a: server_leased_connections "
                                      b"(2) are all in use\r\n+PONG\r\n")
        link, leases = lent(h)
        self.assertEqual((leases.in_use_count, leases.refused), (2, 1))
        self.assertEqual(len(h.reactor.tcpClients), 2)
        self.assertEqual(h.pool.counters.blocked_clients, 2)

    def test_idle_leases_are_kept_up_to_a_quarter_of_the_cap(self) -> None:
        h = Harness("  server_leased_connections: 24\n")
        key = h.key_on("a")
        clients = [h.client() for _ in range(8)]
        for client, _ in clients:
            client.dataReceived(cmd(b"BLPOP", key, b"0"))
        h.connect_pending()
        for conn, _ in h.backends["a"]:
            conn.dataReceived(b"*-1\r\n")
        link, leases = lent(h)
        self.assertEqual((leases.in_use_count, leases.idle_count), (0, 6))
        self.assertEqual(sum(1 for _, wire in h.backends["a"] if wire.disconnecting), 2)

    def test_another_profile_opens_its_own_without_closing_idle_ones_below_the_cap(self) -> None:
        h = Harness("  server_leased_connections: 2\n")
        key = h.key_on("a")
        resp2, _ = h.client()
        resp2.dataReceived(cmd(b"BLPOP", key, b"0"))
        h.connect_pending()
        h.backend("a")[0].dataReceived(b"*-1\r\n")
        resp3, out3 = h.client()
        resp3.dataReceived(cmd(b"HELLO", b"3") + cmd(b"BLPOP", key, b"0"))
        h.connect_pending()
        link, leases = lent(h)
        self.assertEqual((leases.in_use_count, leases.idle_count), (1, 1))
        self.assertFalse(h.backends["a"][0][1].disconnecting)
        self.assertTrue(h.backend("a")[1].value().startswith(cmd(b"HELLO", b"3")))
        # At the cap, the idle one of the other profile makes room.
        other, _ = h.client()
        other.dataReceived(cmd(b"HELLO", b"3") + cmd(b"BLPOP", key, b"0"))
        self.assertTrue(h.backends["a"][0][1].disconnecting)
        self.assertEqual((leases.in_use_count, leases.idle_count, leases.refused), (2, 0, 0))

    def test_a_client_that_hangs_up_while_blocked_closes_its_lease(self) -> None:
        h = Harness()
        key = h.key_on("a")
        client, _, (conn, wire) = blocked(h)
        client.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(wire.disconnecting)                  # closed, never given back
        link, leases = lent(h)
        self.assertEqual((leases.in_use_count, leases.idle_count), (0, 0))
        self.assertEqual(h.pool.counters.blocked_clients, 0)
        conn.dataReceived(b"*2\r\n$1\r\nq\r\n$1\r\nx\r\n")     # too late: nobody takes it
        again, out = h.client()
        again.dataReceived(cmd(b"BLPOP", key, b"0"))
        self.assertEqual(len(h.reactor.tcpClients), 1)        # a new connection, not the closed one

    def test_a_request_whose_client_left_while_it_waited_is_not_lent_a_connection(self) -> None:
        h = Harness()
        key = h.key_on("a")
        client, _ = h.client()
        client.dataReceived(cmd(b"SET", key, b"1") + cmd(b"BLPOP", key, b"0"))
        h.connect_pending()                                   # the SET's shared connection only
        client.connectionLost(Failure(ConnectionDone()))
        h.backend("a")[0].dataReceived(b"+OK\r\n")
        self.assertEqual(h.reactor.tcpClients, [])
        self.assertEqual(lent(h)[1].in_use_count, 0)


class DeadlineTests(SynchronousTestCase):
    def test_the_deadline_is_the_commands_timeout_plus_the_pool_timeout(self) -> None:
        h = Harness()   # timeout: 400
        _, out, (_, wire) = blocked(h, b"1")
        h.reactor.advance(1.39)
        self.assertEqual(out.value(), b"")
        h.reactor.advance(0.02)
        self.assertEqual(out.value(), TIMED_OUT)
        self.assertTrue(wire.disconnecting)
        self.assertEqual(h.pool.servers[0].counters.server_timedout, 1)
        self.assertEqual(lent(h)[1].in_use_count, 0)

    def test_a_timeout_of_zero_has_no_deadline(self) -> None:
        h = Harness()
        client, out = h.client()
        client.dataReceived(cmd(b"BRPOPLPUSH", b"{a}x", b"{a}y", b"0"))
        h.connect_pending()
        (name,) = h.backends
        conn, _ = h.backend(name)
        h.reactor.advance(3600)
        self.assertEqual(out.value(), b"")
        conn.dataReceived(b"$1\r\nv\r\n")
        self.assertEqual(out.value(), b"$1\r\nv\r\n")

    def test_xread_block_counts_milliseconds(self) -> None:
        h = Harness()
        client, out = h.client()
        client.dataReceived(cmd(b"XREAD", b"BLOCK", b"1500", b"STREAMS", h.key_on("b"), b"$"))
        h.connect_pending()
        h.reactor.advance(1.89)
        self.assertEqual(out.value(), b"")
        h.reactor.advance(0.02)
        self.assertEqual(out.value(), TIMED_OUT)

    def test_a_bad_timeout_gets_the_pool_timeout_only(self) -> None:
        h = Harness()
        client, out, (conn, wire) = blocked(h, b"-1")
        self.assertEqual(wire.value(), cmd(b"BLPOP", h.key_on("a"), b"-1"))   # the server says why
        conn.dataReceived(b"-ERR timeout is negative\r\n")
        self.assertEqual(out.value(), b"-ERR timeout is negative\r\n")
        client.dataReceived(cmd(b"BLPOP", h.key_on("a"), b"x"))
        h.reactor.advance(0.41)
        self.assertEqual(out.value(), b"-ERR timeout is negative\r\n" + TIMED_OUT)

    def test_a_reused_lease_sees_a_shorter_deadline_in_time(self) -> None:
        h = Harness()
        key = h.key_on("a")
        client, out, (conn, _) = blocked(h, b"10")
        h.reactor.advance(1.0)
        conn.dataReceived(b"*-1\r\n")
        client.dataReceived(cmd(b"BLPOP", key, b"1"))        # the same connection, due at 1 + 1 + 0.4
        self.assertEqual(h.reactor.tcpClients, [])
        h.reactor.advance(1.39)
        self.assertEqual(out.value(), b"*-1\r\n")
        h.reactor.advance(0.02)
        self.assertEqual(out.value(), b"*-1\r\n" + TIMED_OUT)


class HoldTests(SynchronousTestCase):
    def test_later_requests_wait_for_the_blocking_reply(self) -> None:
        h = Harness()
        client, out = h.client()
        ka, kb = h.key_on("a"), h.key_on("b")
        client.dataReceived(cmd(b"BLPOP", ka, b"5") + cmd(b"GET", kb) + b"PING\r\n")
        h.connect_pending()
        self.assertNotIn("b", h.backends)                    # the GET is not sent
        self.assertEqual(out.value(), b"")
        self.assertEqual(client.transport.producerState, "producing")   # read on: a hang-up is seen
        h.backend("a")[0].dataReceived(b"*2\r\n$1\r\nq\r\n$1\r\nx\r\n")
        h.connect_pending()
        b, b_wire = h.backend("b")
        self.assertEqual(b_wire.value(), cmd(b"GET", kb))
        b.dataReceived(b"$1\r\nB\r\n")
        self.assertEqual(out.value(), b"*2\r\n$1\r\nq\r\n$1\r\nx\r\n$1\r\nB\r\n+PONG\r\n")
        self.assertEqual(h.pool.counters.blocked_clients, 0)

    def test_a_blocking_command_waits_for_the_clients_earlier_requests(self) -> None:
        """It runs on another socket than the DEL before it, so it is sent only once the DEL is answered."""
        h = Harness()
        client, out = h.client()
        key = h.key_on("a")
        client.dataReceived(cmd(b"DEL", key) + cmd(b"BLPOP", key, b"1"))
        h.connect_pending()
        self.assertEqual(len(h.backends["a"]), 1)
        shared, shared_wire = h.backend("a")
        self.assertEqual(shared_wire.value(), cmd(b"DEL", key))
        self.assertEqual(client.transport.producerState, "paused")
        shared.dataReceived(b":1\r\n")
        h.connect_pending()
        _, lease_wire = h.backend("a")
        self.assertEqual(lease_wire.value(), cmd(b"BLPOP", key, b"1"))
        self.assertEqual(client.transport.producerState, "producing")
        self.assertEqual(out.value(), b":1\r\n")

    def test_pipelined_blocking_commands_run_one_after_the_other_on_one_lease(self) -> None:
        h = Harness()
        client, out = h.client()
        key = h.key_on("a")
        client.dataReceived(cmd(b"BLPOP", key, b"1") + cmd(b"BRPOP", key, b"1"))
        h.connect_pending()
        conn, wire = h.backend("a")
        self.assertEqual(wire.value(), cmd(b"BLPOP", key, b"1"))
        conn.dataReceived(b"*-1\r\n")
        self.assertEqual(wire.value(), cmd(b"BLPOP", key, b"1") + cmd(b"BRPOP", key, b"1"))
        self.assertEqual(h.reactor.tcpClients, [])
        conn.dataReceived(b"*-1\r\n")
        self.assertEqual(out.value(), b"*-1\r\n*-1\r\n")

    def test_cross_server_keys_are_refused_and_nothing_is_held(self) -> None:
        h = Harness()
        client, out = h.client()
        client.dataReceived(cmd(b"BRPOP", h.key_on("a"), h.key_on("b"), b"1") + b"PING\r\n")
        self.assertEqual(out.value(), b"-ERR keys in request don't hash to the same server (use a hash tag to keep "
                                      b"them together)\r\n+PONG\r\n")
        self.assertEqual(h.reactor.tcpClients, [])

    def test_inside_multi_it_is_queued_and_rides_the_transaction(self) -> None:
        h = Harness()
        client, out = h.client()
        key = h.key_on("a")
        client.dataReceived(cmd(b"MULTI") + cmd(b"BLPOP", key, b"0") + cmd(b"EXEC"))
        h.connect_pending()
        conn, wire = h.backend("a")
        self.assertEqual(wire.value(), cmd(b"MULTI") + cmd(b"BLPOP", key, b"0") + cmd(b"EXEC"))
        self.assertEqual(lent(h)[1].in_use_count, 0)

    def test_a_watching_client_blocks_on_its_pinned_connection(self) -> None:
        h = Harness()
        client, out = h.client()
        key = h.key_on("a")
        client.dataReceived(cmd(b"WATCH", key) + cmd(b"BLPOP", key, b"1"))
        h.connect_pending()
        pin, wire = h.backend("a")
        pin.dataReceived(b"+OK\r\n")
        self.assertEqual(wire.value(), cmd(b"WATCH", key) + cmd(b"BLPOP", key, b"1"))
        self.assertEqual(h.reactor.tcpClients, [])
        h.reactor.advance(1.39)
        self.assertEqual(out.value(), b"+OK\r\n")
        pin.dataReceived(b"*-1\r\n")
        self.assertEqual(out.value(), b"+OK\r\n*-1\r\n")

    def test_drain_waits_for_the_blocked_reply_then_answers_what_waited(self) -> None:
        h = Harness()
        client, out = h.client()
        ka = h.key_on("a")
        client.dataReceived(cmd(b"BLPOP", ka, b"0") + b"PING\r\n")
        h.connect_pending()
        drained = h.factory.drain()
        self.assertNoResult(drained)
        h.backend("a")[0].dataReceived(b"*-1\r\n")
        self.assertEqual(out.value(), b"*-1\r\n+PONG\r\n")
        self.assertTrue(client.transport.disconnecting)

    def test_stats_and_metrics_count_blocked_clients_and_leases(self) -> None:
        h = Harness("  server_leased_connections: 1\n")
        key = h.key_on("a")
        blocked(h)
        refused, _ = h.client()
        refused.dataReceived(cmd(b"BLPOP", key, b"0"))
        document = pool_document(h.runtime)
        self.assertEqual((document["blocked_clients"], document["blocking_commands"]), (1, 1))
        server = document[h.pool.servers[0].spec.stats_name]
        self.assertEqual((server["leased_connections"], server["leased_idle"], server["leases_refused"]), (1, 0, 1))
        text = render(lambda: [h.runtime], 0.0, h.reactor).decode()
        self.assertIn('twinproxy_pool_blocked_clients{pool="alpha"} 1.0', text)
        self.assertIn('twinproxy_pool_blocking_commands_total{pool="alpha"} 1.0', text)
        self.assertIn("# TYPE twinproxy_server_leased_connections gauge", text)
        self.assertIn("twinproxy_server_leases_refused_total{pool=\"alpha\",server=", text)


class RetireTests(SynchronousTestCase):
    def test_new_settings_drain_leases_without_holding_new_shared_connections(self) -> None:
        h = Harness()
        _, out, (_, wire) = blocked(h)
        idle_client, _ = h.client()
        idle_client.dataReceived(cmd(b"BLPOP", h.key_on("a", b"i"), b"0"))
        h.connect_pending()
        idle, idle_wire = h.backend("a")
        idle.dataReceived(b"*-1\r\n")                          # now idle
        link, leases = lent(h)
        settled = link.settle()                              # a slot hold's barrier
        self.assertTrue(idle_wire.disconnecting)              # the idle one is closed at once
        other, other_out = h.client()
        other.dataReceived(cmd(b"GET", h.key_on("a")))
        h.connect_pending()
        _, shared_wire = h.backend("a")
        self.assertEqual(shared_wire.value(), cmd(b"GET", h.key_on("a")))   # not gated behind the blocked one
        self.assertNoResult(settled)
        h.reactor.advance(0.41)                              # the drain deadline: the pool's timeout
        self.assertTrue(out.value().startswith(b"-ERR server connection retired by the proxy"))
        self.successResultOf(settled)
        self.assertEqual((leases.in_use_count, leases.idle_count), (0, 0))

    def test_a_new_handshake_closes_idle_leases_and_drains_the_blocked_one(self) -> None:
        h = Harness()
        _, out, (_, wire) = blocked(h)
        spare, _ = h.client()
        spare.dataReceived(cmd(b"BLPOP", h.key_on("a", b"s"), b"0"))
        h.connect_pending()
        idle, idle_wire = h.backend("a")
        idle.dataReceived(b"*-1\r\n")
        link, leases = lent(h)
        (new,) = load_text(POOL.format(extra="  redis_db: 3\n"))
        h.runtime.apply(diff_pool(h.config, new))
        self.assertTrue(idle_wire.disconnecting)
        self.assertFalse(wire.disconnecting)                  # its reply may still come: it drains
        late, late_out = h.client()
        late.dataReceived(cmd(b"BLPOP", h.key_on("a"), b"0"))
        h.connect_pending()
        new_conn, new_wire = h.backend("a")
        self.assertEqual(new_wire.value(), cmd(b"SELECT", b"3") + cmd(b"BLPOP", h.key_on("a"), b"0"))
        new_conn.dataReceived(b"+OK\r\n")                     # the handshake's reply (its own deadline)
        h.reactor.advance(0.41)
        self.assertTrue(out.value().startswith(b"-ERR server connection retired by the proxy"))
        self.assertEqual(late_out.value(), b"")
        self.assertEqual(leases.in_use_count, 1)

    def test_a_new_address_sends_new_leases_there_and_drains_the_old(self) -> None:
        h = Harness()
        _, out, (conn, wire) = blocked(h)
        link, leases = lent(h)
        (new,) = load_text(POOL.format(extra="").replace("10.0.0.1:6379:1 a", "10.0.0.9:6379:1 a"))
        h.runtime.apply(diff_pool(h.config, new))
        other, _ = h.client()
        other.dataReceived(cmd(b"BLPOP", h.key_on("a", b"o"), b"0"))
        self.assertEqual(h.reactor.tcpClients[-1][0], "10.0.0.9")
        conn.dataReceived(b"*-1\r\n")                        # the old address answers what it was sent
        self.assertEqual(out.value(), b"*-1\r\n")
        self.assertTrue(wire.disconnecting)                   # and is closed, not kept idle
        self.assertEqual((leases.in_use_count, leases.idle_count), (1, 0))

    def test_a_removed_server_drains_its_blocked_commands_by_the_deadline(self) -> None:
        h = Harness()
        _, out, (_, wire) = blocked(h)
        link, _ = lent(h)
        drained = link.drain()
        self.assertNoResult(drained)
        h.reactor.advance(0.41)
        self.assertTrue(out.value().startswith(b"-ERR server connection retired by the proxy"))
        self.successResultOf(drained)

    def test_a_master_switch_fails_a_blocked_command_at_once(self) -> None:
        h = Harness()
        _, out, (_, wire) = blocked(h)
        link, leases = lent(h)
        failed = link.cut_over(link.target, "failover: outcome unknown")
        self.assertEqual((failed, out.value()), (1, b"-ERR failover: outcome unknown\r\n"))
        self.assertTrue(wire.disconnecting)
        self.assertEqual(leases.in_use_count, 0)

    def test_a_server_leaving_the_pool_lends_nothing_more(self) -> None:
        h = Harness()
        link, leases = lent(h)
        link.drain()
        client, out = h.client()
        client.dataReceived(cmd(b"BLPOP", h.key_on("a"), b"0"))
        self.assertEqual(out.value(), b"-ERR no connection to lend for BLPOP: server a is leaving the pool\r\n")
        self.assertEqual(leases.refused, 1)

    def test_stop_closes_leased_connections_and_waits_for_them(self) -> None:
        h = Harness()
        _, out, (conn, wire) = blocked(h)
        link, leases = lent(h)
        stopped = link.stop()
        self.assertTrue(wire.disconnecting)
        self.assertEqual(out.value(), b"-ERR server connection closed by the proxy\r\n")
        self.assertNoResult(stopped)
        conn.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(stopped)


class ClusterTests(SynchronousTestCase):
    def test_a_blocking_command_on_a_migrating_slot_moves_its_keys_first(self) -> None:
        """The move's script rides the source's shared connection; the pop then runs on a lease of the target's."""
        from tests.unit.cluster.test_migrating import SOURCE, TARGET, Wire, key_in, migrate, topology

        w = Wire()
        w.serve(topology(1, moving={7}))
        client, out = w.client()
        a, b = b"{" + key_in(7) + b"}a", b"{" + key_in(7) + b"}b"
        client.dataReceived(cmd(b"BLMOVE", a, b, b"LEFT", b"RIGHT", b"1"))
        source, source_wire = w.backend(SOURCE)
        self.assertEqual(source_wire.value(), migrate(a, b))
        self.assertEqual(w.runtime.link("shop-1").leases.in_use_count, 0)
        source.dataReceived(b"+OK\r\n")
        target, target_wire = w.backend(TARGET)
        self.assertEqual(target_wire.value(), cmd(b"BLMOVE", a, b, b"LEFT", b"RIGHT", b"1"))
        self.assertEqual(w.runtime.link("shop-2").leases.in_use_count, 1)
        target.dataReceived(b"$-1\r\n")
        self.assertEqual(out.value(), b"$-1\r\n")

    def test_a_held_slot_holds_a_blocking_command_like_any_request(self) -> None:
        from tests.unit.cluster.test_migrating import SOURCE, Wire, key_in, topology

        w = Wire()
        held = topology(1)
        held.slots = tuple((1, "held") if slot == 7 else entry for slot, entry in enumerate(held.slots))
        w.serve(held)
        client, out = w.client()
        key = key_in(7)
        client.dataReceived(cmd(b"BLPOP", key, b"1"))
        self.assertEqual(w.reactor.tcpClients, [])
        w.serve(topology(2))                                  # released
        _, wire = w.backend(SOURCE)
        self.assertEqual(wire.value(), cmd(b"BLPOP", key, b"1"))
        self.assertEqual(w.runtime.link("shop-1").leases.in_use_count, 1)

    def test_keys_in_two_slots_are_refused_naming_them(self) -> None:
        from tests.unit.cluster.test_migrating import Wire, key_in, topology

        w = Wire()
        w.serve(topology(1))
        client, out = w.client()
        client.dataReceived(cmd(b"BRPOP", key_in(3), key_in(4), b"1"))
        self.assertTrue(out.value().startswith(b"-CROSSSLOT keys in request don't hash to the same slot"))
        self.assertIn(b"use a {tag}", out.value())
