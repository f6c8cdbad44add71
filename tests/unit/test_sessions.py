"""Sessions through the frontend and backends, in memory: databases, CLIENT REPLY, RESET, CLIENT KILL/LIST.

The harness of test_proxying: StringTransports for clients and servers, a
MemoryReactorClock, every server played by hand.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.unit.test_proxying import POOL, Harness, cmd
from twinproxy.config import load_text
from twinproxy.request import profile_of
from twinproxy.topology import diff_pool


def replies(backend, *answers: bytes) -> None:
    backend.dataReceived(b"".join(answers))


class DatabaseTests(SynchronousTestCase):
    def test_each_database_gets_its_own_connections_opened_with_select(self) -> None:
        h = Harness()
        plain, plain_out = h.client()
        selected, selected_out = h.client()
        key = h.key_on("a")
        selected.dataReceived(cmd(b"SELECT", b"5"))
        self.assertEqual(selected_out.value(), b"+OK\r\n")
        self.assertEqual(h.reactor.tcpClients, [])   # SELECT opens nothing and is sent nowhere
        plain.dataReceived(cmd(b"GET", key))
        selected.dataReceived(cmd(b"GET", key))
        h.connect_pending()
        (db0, db0_wire), (db5, db5_wire) = h.backends["a"]
        self.assertEqual(db0_wire.value(), cmd(b"GET", key))
        self.assertEqual(db5_wire.value(), cmd(b"SELECT", b"5") + cmd(b"GET", key))
        replies(db5, b"+OK\r\n", b"$2\r\nv5\r\n")
        replies(db0, b"$2\r\nv0\r\n")
        self.assertEqual((plain_out.value(), selected_out.value()), (b"$2\r\nv0\r\n", b"+OK\r\n$2\r\nv5\r\n"))
        # Back to 0: the first connection again, none opened.
        selected.dataReceived(cmd(b"SELECT", b"0") + cmd(b"GET", key))
        self.assertEqual(h.reactor.tcpClients, [])
        self.assertEqual(db0_wire.value(), cmd(b"GET", key) * 2)

    def test_redis_db_is_database_0_and_the_base_of_the_others(self) -> None:
        h = Harness("  redis_db: 2\n")
        client, _ = h.client()
        key = h.key_on("b")
        client.dataReceived(cmd(b"GET", key) + cmd(b"SELECT", b"3") + cmd(b"GET", key))
        h.connect_pending()
        (_, first), (_, second) = h.backends["b"]
        self.assertEqual(first.value(), cmd(b"SELECT", b"2") + cmd(b"GET", key))
        self.assertEqual(second.value(), cmd(b"SELECT", b"5") + cmd(b"GET", key))

    def test_hello_3_and_select_make_one_profile(self) -> None:
        h = Harness()
        client, _ = h.client()
        key = h.key_on("a")
        client.dataReceived(cmd(b"SELECT", b"1") + cmd(b"HELLO", b"3") + cmd(b"GET", key))
        self.assertEqual(client.profile, profile_of(3, 1))
        h.connect_pending()
        self.assertEqual(h.backend("a")[1].value(), cmd(b"HELLO", b"3") + cmd(b"SELECT", b"1") + cmd(b"GET", key))

    def test_a_split_command_goes_to_each_servers_connection_of_the_database(self) -> None:
        h = Harness()
        client, out = h.client()
        ka, kb = h.key_on("a"), h.key_on("b")
        client.dataReceived(cmd(b"SELECT", b"7") + cmd(b"MGET", ka, kb))
        h.connect_pending()
        for name, key in (("a", ka), ("b", kb)):
            self.assertEqual(h.backend(name)[1].value(), cmd(b"SELECT", b"7") + cmd(b"MGET", key))
            replies(h.backend(name)[0], b"+OK\r\n", b"*1\r\n$1\r\n%s\r\n" % name.encode())
        self.assertEqual(out.value(), b"+OK\r\n*2\r\n$1\r\na\r\n$1\r\nb\r\n")

    def test_a_reload_that_changes_redis_db_retires_every_databases_connections(self) -> None:
        h = Harness()
        client, _ = h.client()
        key = h.key_on("a")
        client.dataReceived(cmd(b"GET", key) + cmd(b"SELECT", b"4") + cmd(b"GET", key))
        h.connect_pending()
        (db0, db0_wire), (db4, db4_wire) = h.backends["a"]
        replies(db0, b"$1\r\nx\r\n")
        replies(db4, b"+OK\r\n", b"$1\r\ny\r\n")
        (new,) = load_text(POOL.format(extra="  redis_db: 10\n"))
        h.runtime.apply(diff_pool(h.config, new))
        self.assertTrue(db0_wire.disconnecting and db4_wire.disconnecting)   # idle: closed at once
        client.dataReceived(cmd(b"GET", key) + cmd(b"SELECT", b"0") + cmd(b"GET", key))
        h.connect_pending()
        self.assertEqual(h.backends["a"][2][1].value(), cmd(b"SELECT", b"14") + cmd(b"GET", key))
        self.assertEqual(h.backends["a"][3][1].value(), cmd(b"SELECT", b"10") + cmd(b"GET", key))

    def test_move_is_sent_by_key_with_its_database_mapped(self) -> None:
        h = Harness("  redis_db: 1\n")
        client, _ = h.client()
        key = h.key_on("b")
        client.dataReceived(cmd(b"MOVE", key, b"2"))
        h.connect_pending()
        self.assertEqual(h.backend("b")[1].value(), cmd(b"SELECT", b"1") + cmd(b"MOVE", key, b"3"))


class ReplyModeTests(SynchronousTestCase):
    def test_reply_off_then_on_sends_only_the_final_ok_in_order(self) -> None:
        h = Harness()
        client, out = h.client()
        ka, kb = h.key_on("a"), h.key_on("b")
        client.dataReceived(cmd(b"GET", ka) + cmd(b"CLIENT", b"REPLY", b"OFF") + cmd(b"SET", kb, b"v")
                            + cmd(b"GET") + cmd(b"CLIENT", b"REPLY", b"ON") + cmd(b"PING"))
        h.connect_pending()
        self.assertEqual(out.value(), b"")   # the first GET's reply holds everything behind it
        replies(h.backend("b")[0], b"+OK\r\n")
        self.assertEqual(out.value(), b"")
        replies(h.backend("a")[0], b"$1\r\nA\r\n")
        self.assertEqual(out.value(), b"$1\r\nA\r\n+OK\r\n+PONG\r\n")
        self.assertNotIn("_flush", client.__dict__)   # the frontend's own flush again
        self.assertEqual(h.pool.counters.commands["get"].errors, 1)   # muted, still counted

    def test_skip_mutes_the_next_reply_only_as_redis_does(self) -> None:
        h = Harness()
        client, out = h.client()
        # Redis 7.0 answers these three pipelines $1 x, then +PONG +OK +PONG, then +RESET +PONG.
        client.dataReceived(cmd(b"CLIENT", b"REPLY", b"SKIP") + cmd(b"CLIENT", b"REPLY", b"SKIP") + cmd(b"PING")
                            + cmd(b"PING", b"x"))
        self.assertEqual(out.value(), b"$1\r\nx\r\n")
        out.clear()
        client.dataReceived(cmd(b"CLIENT", b"REPLY", b"SKIP") + cmd(b"PING") + cmd(b"PING")
                            + cmd(b"CLIENT", b"REPLY", b"SKIP") + cmd(b"CLIENT", b"REPLY", b"ON") + cmd(b"PING"))
        self.assertEqual(out.value(), b"+PONG\r\n+OK\r\n+PONG\r\n")
        out.clear()
        client.dataReceived(cmd(b"CLIENT", b"REPLY", b"OFF") + cmd(b"CLIENT", b"REPLY", b"SKIP") + cmd(b"PING")
                            + cmd(b"RESET") + cmd(b"PING"))
        self.assertEqual(out.value(), b"+RESET\r\n+PONG\r\n")
        self.assertNotIn("_flush", client.__dict__)

    def test_a_muted_request_still_counts_against_the_pending_limit(self) -> None:
        h = Harness("  client_max_pending: 2\n")
        client, out = h.client()
        key = h.key_on("a")
        client.dataReceived(cmd(b"CLIENT", b"REPLY", b"OFF") + cmd(b"GET", key) + cmd(b"GET", key) + cmd(b"GET", key))
        h.connect_pending()
        a, wire = h.backend("a")
        self.assertEqual(wire.value(), cmd(b"GET", key) * 2)   # the third waits in the parser
        replies(a, b"$1\r\n1\r\n", b"$1\r\n2\r\n")
        self.assertEqual(wire.value(), cmd(b"GET", key) * 3)
        self.assertEqual(out.value(), b"")


class ResetAndClientTests(SynchronousTestCase):
    def test_reset_clears_database_dialect_name_and_login(self) -> None:
        h = Harness("  redis_auth: pw\n")
        client, out = h.client()
        client.dataReceived(cmd(b"AUTH", b"pw") + cmd(b"SELECT", b"3") + cmd(b"HELLO", b"3")
                            + cmd(b"CLIENT", b"SETNAME", b"me"))
        self.assertEqual((client.profile, client.client_name, client.authenticated), (profile_of(3, 3), b"me", True))
        hooks = []
        client.reset_hooks.append(lambda: hooks.append(client.profile))
        out.clear()
        client.dataReceived(cmd(b"RESET") + cmd(b"GET", b"k"))
        self.assertEqual(out.value(), b"+RESET\r\n-NOAUTH Authentication required.\r\n")
        self.assertEqual((client.profile, client.db, client.dialect, client.client_name, client.authenticated),
                         (profile_of(2), 0, 2, None, False))
        self.assertEqual(hooks, [profile_of(2)])   # run after the session is back to a fresh one's

    def test_client_kill_id_closes_another_client_and_list_shows_names(self) -> None:
        h = Harness()
        worker, worker_out = h.client()
        admin, admin_out = h.client()
        worker.dataReceived(cmd(b"CLIENT", b"SETNAME", b"bull:worker") + cmd(b"GET", h.key_on("a")))
        admin.dataReceived(cmd(b"CLIENT", b"LIST"))
        listing = admin_out.value()
        self.assertIn(b"id=%d addr=192.168.1.1:54321 laddr=10.0.0.1:12345 fd=-1 name=bull:worker " % worker.client_id,
                      listing)
        self.assertIn(b"cmd=get user=default", listing)
        self.assertIn(b"id=%d " % admin.client_id, listing)
        admin_out.clear()
        admin.dataReceived(cmd(b"CLIENT", b"KILL", b"ID", b"%d" % worker.client_id) + cmd(b"PING"))
        self.assertEqual(admin_out.value(), b":1\r\n+PONG\r\n")
        self.assertTrue(worker.transport.disconnecting)
        replies(h.connect_pending()["a"][0][0], b"$1\r\nv\r\n")   # its request in flight is answered to nobody
        self.assertEqual(worker_out.value(), b"+OK\r\n")

    def test_client_kill_of_itself_answers_then_closes(self) -> None:
        h = Harness()
        client, out = h.client()
        client.dataReceived(cmd(b"CLIENT", b"KILL", b"ID", b"%d" % client.client_id, b"SKIPME", b"no")
                            + cmd(b"PING"))
        self.assertEqual(out.value(), b":1\r\n")
        self.assertTrue(out.disconnecting)


class TransactionInterplayTests(SynchronousTestCase):
    def test_a_transaction_runs_on_its_databases_connection(self) -> None:
        h = Harness()
        client, out = h.client()
        key = h.key_on("a")
        client.dataReceived(cmd(b"SELECT", b"3") + cmd(b"MULTI") + cmd(b"SET", key, b"1") + cmd(b"SELECT", b"4")
                            + cmd(b"EXEC"))
        self.assertEqual(out.value(), b"+OK\r\n+OK\r\n+QUEUED\r\n-ERR 'select' inside MULTI is not supported by "
                                      b"twinproxy\r\n-EXECABORT Transaction discarded because of previous errors.\r\n")
        out.clear()
        client.dataReceived(cmd(b"MULTI") + cmd(b"SET", key, b"1") + cmd(b"EXEC"))
        (_, wire), = h.connect_pending()["a"]
        self.assertEqual(wire.value(), cmd(b"SELECT", b"3") + cmd(b"MULTI") + cmd(b"SET", key, b"1") + cmd(b"EXEC"))

    def test_reset_inside_multi_ends_it_as_in_redis(self) -> None:
        h = Harness()
        client, out = h.client()
        key = h.key_on("a")
        client.dataReceived(cmd(b"MULTI") + cmd(b"SET", key, b"1") + cmd(b"RESET") + cmd(b"EXEC"))
        self.assertEqual(out.value(), b"+OK\r\n+QUEUED\r\n+RESET\r\n-ERR EXEC without MULTI\r\n")
        self.assertEqual(h.connect_pending(), {})

    def test_watch_leases_a_connection_of_the_database_and_reset_gives_it_back(self) -> None:
        h = Harness()
        client, out = h.client()
        key = h.key_on("a")
        client.dataReceived(cmd(b"SELECT", b"2") + cmd(b"WATCH", key))
        (leased, wire), = h.connect_pending()["a"]
        self.assertEqual(wire.value(), cmd(b"SELECT", b"2") + cmd(b"WATCH", key))
        leased.dataReceived(b"+OK\r\n+OK\r\n")
        client.dataReceived(cmd(b"SELECT", b"5") + cmd(b"SELECT", b"2"))
        self.assertEqual(out.value(), b"+OK\r\n+OK\r\n-ERR SELECT of another database while a WATCH is active is "
                                      b"not supported by twinproxy: EXEC, DISCARD or UNWATCH first\r\n+OK\r\n")
        out.clear()
        # RESET into database 0: the db-2 pin leaves the routing at once and closes (which unwatches).
        client.dataReceived(cmd(b"RESET") + cmd(b"GET", key))
        self.assertEqual(out.value(), b"+RESET\r\n")
        self.assertIsNone(client.watch_pin)
        self.assertTrue(wire.disconnecting)
        self.assertEqual(wire.value(), cmd(b"SELECT", b"2") + cmd(b"WATCH", key))
        (_, shared), = h.connect_pending()["a"][1:]
        self.assertEqual(shared.value(), cmd(b"GET", key))

    def test_reset_in_the_same_database_unwatches_on_the_pin_first(self) -> None:
        h = Harness()
        client, out = h.client()
        key = h.key_on("a")
        client.dataReceived(cmd(b"WATCH", key))
        (leased, wire), = h.connect_pending()["a"]
        leased.dataReceived(b"+OK\r\n")
        client.dataReceived(cmd(b"RESET") + cmd(b"GET", key))
        self.assertEqual(wire.value(), cmd(b"WATCH", key) + cmd(b"UNWATCH") + cmd(b"GET", key))  # in order
        leased.dataReceived(b"+OK\r\n$1\r\nv\r\n")
        self.assertEqual(out.value(), b"+OK\r\n+RESET\r\n$1\r\nv\r\n")

    def test_hello_may_not_switch_protocol_under_a_watch(self) -> None:
        h = Harness()
        client, out = h.client()
        client.dataReceived(cmd(b"WATCH", h.key_on("a")))
        h.connect_pending()["a"][0][0].dataReceived(b"+OK\r\n")
        client.dataReceived(cmd(b"HELLO", b"3") + cmd(b"HELLO", b"2"))
        self.assertTrue(out.value().startswith(b"+OK\r\n-ERR HELLO switching the protocol while a WATCH is active"))
        self.assertIn(b"\r\n*14\r\n", out.value())   # HELLO 2, the protocol it speaks: answered
        self.assertEqual(client.dialect, 2)
