"""A memcache cluster's migrating slot on in-memory transports (twinproxy.cluster.warmup): reads served by
the new server and warmed up from the old one on a miss, writes and deletes deleting the old copy first,
requests for a key in several steps keeping their order, and a slot routed elsewhere mid-way."""

from __future__ import annotations

from types import SimpleNamespace

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from twinproxy.cluster.pools import cluster_pool, not_ready
from twinproxy.cluster.slots import slot_of
from twinproxy.config import load_text
from twinproxy.runtime import PoolRuntime
from twinproxy.topology import diff_pool

POOL = """\
cache:
  listen: 127.0.0.1:19000
  timeout: 400
  cluster: cache
  coordinator: file:///tmp/nowhere
"""
SOURCE, TARGET = "10.0.0.1:11211", "10.0.0.2:11211"


def topology(generation: int, moving=frozenset(), state: str = "migrating", owner: int = 2):
    """Slots 0-511 on group 1, 512-1023 on group 2; those in ``moving`` are ``state`` in group ``owner``."""
    groups = [SimpleNamespace(id=1, servers=(SOURCE,)), SimpleNamespace(id=2, servers=(TARGET,))]
    slots = tuple((owner, state) if slot in moving else (1 if slot < 512 else 2, "stable") for slot in range(1024))
    return SimpleNamespace(cluster="cache", protocol="memcache", generation=generation, groups=groups, slots=slots,
                           sentinels=(), migrating_from=lambda slot: 1 if slot in moving and state == "migrating"
                           else None)


def key_in(slot: int, start: int = 0) -> bytes:
    return next(b"k%d" % i for i in range(start, 100000) if slot_of(b"k%d" % i) == slot)


K = key_in(7)


class Wire:
    def __init__(self) -> None:
        (self.base,) = load_text(POOL)
        self.reactor = MemoryReactorClock()
        self.runtime = PoolRuntime(not_ready(self.base), self.reactor, outbox=None)
        self.backends = {}

    def serve(self, topo) -> None:
        self.runtime.apply(diff_pool(self.runtime.config, cluster_pool(self.base, topo)))

    def client(self):
        protocol = self.runtime.factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def backend(self, address: str):
        while self.reactor.tcpClients:
            host, port, factory, _, _ = self.reactor.tcpClients.pop(0)
            protocol = factory.buildProtocol(None)
            transport = StringTransport()
            protocol.makeConnection(transport)
            self.backends.setdefault(f"{host}:{port}", []).append((protocol, transport))
        return self.backends[address][0]

    def slot(self, slot: int = 7):
        return self.runtime.pool.slots.target_for_slot(slot)


class Case(SynchronousTestCase):
    def wire(self, moving=frozenset({7})) -> Wire:
        w = Wire()
        w.serve(topology(1, moving=moving))
        return w

    def sent(self, w: Wire, address: str, expected: bytes) -> None:
        """``address`` was sent exactly ``expected`` since the last look."""
        _, transport = w.backend(address)
        self.assertEqual(transport.value(), expected)
        transport.clear()

    def answer(self, w: Wire, address: str, reply: bytes) -> None:
        protocol, _ = w.backend(address)
        protocol.dataReceived(reply)

    def step(self, w: Wire, address: str, expected: bytes, reply: bytes) -> None:
        self.sent(w, address, expected)
        self.answer(w, address, reply)


class ReadTests(Case):
    def test_a_hit_on_the_new_server_is_one_round_trip(self) -> None:
        """A read the new server answers goes nowhere else and is passed on unchanged."""
        w = self.wire()
        client, out = w.client()
        client.dataReceived(b"get %s\r\n" % K)
        self.step(w, TARGET, b"get %s\r\n" % K, b"VALUE %s 3 1\r\nx\r\nEND\r\n" % K)
        self.assertEqual(out.value(), b"VALUE %s 3 1\r\nx\r\nEND\r\n" % K)
        self.assertNotIn(SOURCE, w.backends)

    def test_a_miss_is_warmed_up_from_the_old_server_with_its_flags_and_ttl(self) -> None:
        """Miss: read the old server, add the item to the new one, check the old still has it, read again."""
        w = self.wire()
        client, out = w.client()
        client.dataReceived(b"gets %s\r\n" % K)
        self.step(w, TARGET, b"gets %s\r\n" % K, b"END\r\n")
        self.step(w, SOURCE, b"mg %s v f t\r\n" % K, b"VA 3 f5 t100\r\nabc\r\n")
        self.step(w, TARGET, b"ms %s 3 T100 F5 ME c\r\nabc\r\n" % K, b"HD c9\r\n")
        self.step(w, SOURCE, b"mg %s\r\n" % K, b"HD\r\n")
        self.assertEqual(out.value(), b"")
        self.step(w, TARGET, b"gets %s\r\n" % K, b"VALUE %s 5 3 9\r\nabc\r\nEND\r\n" % K)
        self.assertEqual(out.value(), b"VALUE %s 5 3 9\r\nabc\r\nEND\r\n" % K)
        self.assertEqual((w.slot().copies, w.slot().races, w.slot().busy), (1, 0, 0))

    def test_ttls_no_expiry_about_to_expire_and_past_30_days(self) -> None:
        """t-1 is copied as T0; t0 is not copied (a miss); a TTL past 30 days becomes a Unix time."""
        w = self.wire()
        w.reactor.advance(1700000000)
        w.runtime.pool.slots.renew(w.reactor.seconds() + 1.0)    # the proxy ran all along
        client, out = w.client()
        client.dataReceived(b"get %s\r\n" % K)
        self.step(w, TARGET, b"get %s\r\n" % K, b"END\r\n")
        self.step(w, SOURCE, b"mg %s v f t\r\n" % K, b"VA 1 f0 t-1\r\nx\r\n")
        self.sent(w, TARGET, b"ms %s 1 T0 F0 ME c\r\nx\r\n" % K)
        self.answer(w, TARGET, b"NS c0\r\n")        # the new server has one already: no check, read it
        self.step(w, TARGET, b"get %s\r\n" % K, b"VALUE %s 0 1\r\ny\r\nEND\r\n" % K)
        self.assertEqual(out.value(), b"VALUE %s 0 1\r\ny\r\nEND\r\n" % K)
        out.clear()
        client.dataReceived(b"get %s\r\n" % K)
        self.step(w, TARGET, b"get %s\r\n" % K, b"END\r\n")
        self.step(w, SOURCE, b"mg %s v f t\r\n" % K, b"VA 1 f0 t0\r\nx\r\n")
        # Expiring within the second: not copied; read again (the new server has none: END).
        self.step(w, TARGET, b"get %s\r\n" % K, b"END\r\n")
        self.assertEqual(out.value(), b"END\r\n")
        out.clear()
        month = 31 * 86400
        client.dataReceived(b"get %s\r\n" % K)
        self.step(w, TARGET, b"get %s\r\n" % K, b"END\r\n")
        self.step(w, SOURCE, b"mg %s v f t\r\n" % K, b"VA 1 f0 t%d\r\nx\r\n" % month)
        self.sent(w, TARGET, b"ms %s 1 T%d F0 ME c\r\nx\r\n" % (K, 1700000000 + month))

    def test_a_miss_on_both_servers_is_a_miss(self) -> None:
        w = self.wire()
        client, out = w.client()
        client.dataReceived(b"get %s\r\n" % K)
        self.step(w, TARGET, b"get %s\r\n" % K, b"END\r\n")
        self.step(w, SOURCE, b"mg %s v f t\r\n" % K, b"EN\r\n")
        self.assertEqual(out.value(), b"END\r\n")
        self.sent(w, TARGET, b"")

    def test_an_unreadable_old_server_is_a_miss(self) -> None:
        """The old server failing a warm-up read costs a miss, not an error."""
        w = self.wire()
        client, out = w.client()
        client.dataReceived(b"get %s\r\n" % K)
        self.step(w, TARGET, b"get %s\r\n" % K, b"END\r\n")
        self.step(w, SOURCE, b"mg %s v f t\r\n" % K, b"SERVER_ERROR out of memory\r\n")
        self.assertEqual(out.value(), b"END\r\n")

    def test_several_keys_only_the_misses_are_warmed_and_the_order_is_kept(self) -> None:
        """get a b c with b missing: b warms up, and the reply lists a, b, c as asked."""
        a, b, c = K, key_in(7, 1 + int(K[1:])), key_in(600)
        w = self.wire()
        client, out = w.client()
        client.dataReceived(b"get %s %s %s\r\n" % (a, b, c))
        # The slot's two keys go together to the new server (group 2); c is group 2's too but another slot.
        _, target_wire = w.backend(TARGET)
        self.assertEqual(target_wire.value(), b"get %s %s\r\nget %s\r\n" % (a, b, c))
        target_wire.clear()
        self.answer(w, TARGET, b"VALUE %s 0 1\r\nA\r\nEND\r\n" % a + b"VALUE %s 0 1\r\nC\r\nEND\r\n" % c)
        self.step(w, SOURCE, b"mg %s v f t\r\n" % b, b"VA 1 f2 t50\r\nB\r\n")
        self.step(w, TARGET, b"ms %s 1 T50 F2 ME c\r\nB\r\n" % b, b"HD c4\r\n")
        self.step(w, SOURCE, b"mg %s\r\n" % b, b"HD\r\n")
        self.step(w, TARGET, b"get %s\r\n" % b, b"VALUE %s 2 1\r\nB\r\nEND\r\n" % b)
        self.assertEqual(out.value(), b"VALUE %s 0 1\r\nA\r\nVALUE %s 2 1\r\nB\r\nVALUE %s 0 1\r\nC\r\nEND\r\n"
                         % (a, b, c))

    def test_a_copy_raced_by_a_delete_elsewhere_is_taken_back(self) -> None:
        """The old server lost the item while it was copied (another proxy deleted it): the copy goes."""
        w = self.wire()
        client, out = w.client()
        client.dataReceived(b"get %s\r\n" % K)
        self.step(w, TARGET, b"get %s\r\n" % K, b"END\r\n")
        self.step(w, SOURCE, b"mg %s v f t\r\n" % K, b"VA 1 f0 t9\r\nx\r\n")
        self.step(w, TARGET, b"ms %s 1 T9 F0 ME c\r\nx\r\n" % K, b"HD c12\r\n")
        self.step(w, SOURCE, b"mg %s\r\n" % K, b"EN\r\n")
        self.step(w, TARGET, b"md %s C12\r\n" % K, b"HD\r\n")
        self.step(w, TARGET, b"get %s\r\n" % K, b"END\r\n")
        self.assertEqual(out.value(), b"END\r\n")
        self.assertEqual(w.slot().races, 1)

    def test_meta_get_quiet_and_base64(self) -> None:
        """mg keeps its flags: sent again as it came; a base64 key's steps carry b too."""
        w = self.wire()
        client, out = w.client()
        client.dataReceived(b"mg %s v q\r\n" % K)
        self.step(w, TARGET, b"mg %s v q\r\nmn\r\n" % K, b"MN\r\n")      # quiet: the miss says nothing
        self.step(w, SOURCE, b"mg %s v f t\r\n" % K, b"VA 1 f0 t-1\r\nx\r\n")
        self.step(w, TARGET, b"ms %s 1 T0 F0 ME c\r\nx\r\n" % K, b"HD c2\r\n")
        self.step(w, SOURCE, b"mg %s\r\n" % K, b"HD\r\n")
        self.step(w, TARGET, b"mg %s v q\r\nmn\r\n" % K, b"VA 1\r\nx\r\nMN\r\n")
        self.assertEqual(out.value(), b"VA 1\r\nx\r\n")
        out.clear()
        encoded = next(b"azE%d" % i for i in range(10000) if slot_of(b"azE%d" % i) == 7)
        client.dataReceived(b"mg %s b v\r\n" % encoded)
        self.step(w, TARGET, b"mg %s b v\r\n" % encoded, b"EN\r\n")
        self.step(w, SOURCE, b"mg %s b v f t\r\n" % encoded, b"EN\r\n")
        self.assertEqual(out.value(), b"EN\r\n")

    def test_a_miss_of_a_key_a_write_is_changing_stays_a_miss(self) -> None:
        """A read that misses while a write of its key is in flight (here) does not warm it up."""
        w = self.wire()
        reader, out = w.client()
        writer, written = w.client()
        reader.dataReceived(b"get %s\r\n" % K)
        writer.dataReceived(b"set %s 0 0 1\r\nv\r\n" % K)
        self.sent(w, SOURCE, b"md %s\r\n" % K)
        self.step(w, TARGET, b"get %s\r\n" % K, b"END\r\n")
        self.assertEqual(out.value(), b"END\r\n")
        self.sent(w, SOURCE, b"")


class WriteTests(Case):
    def test_a_set_deletes_the_old_copy_first_and_a_get_behind_it_waits(self) -> None:
        """set: md on the old server, then the new one; a pipelined get of the key goes only after."""
        w = self.wire()
        client, out = w.client()
        client.dataReceived(b"set %s 1 0 1\r\nv\r\nget %s\r\n" % (K, K))
        self.sent(w, SOURCE, b"md %s\r\n" % K)
        self.assertNotIn(TARGET, w.backends)
        self.answer(w, SOURCE, b"NF\r\n")
        self.step(w, TARGET, b"set %s 1 0 1\r\nv\r\n" % K, b"STORED\r\n")
        self.step(w, TARGET, b"get %s\r\n" % K, b"VALUE %s 1 1\r\nv\r\nEND\r\n" % K)
        self.assertEqual(out.value(), b"STORED\r\nVALUE %s 1 1\r\nv\r\nEND\r\n" % K)

    def test_a_delete_is_deleted_when_either_copy_was(self) -> None:
        w = self.wire()
        client, out = w.client()
        client.dataReceived(b"delete %s\r\n" % K)
        self.step(w, SOURCE, b"md %s\r\n" % K, b"HD\r\n")
        self.step(w, TARGET, b"delete %s\r\n" % K, b"NOT_FOUND\r\n")
        client.dataReceived(b"delete %s\r\n" % K)
        self.step(w, SOURCE, b"md %s\r\n" % K, b"NF\r\n")
        self.step(w, TARGET, b"delete %s\r\n" % K, b"NOT_FOUND\r\n")
        client.dataReceived(b"md %s\r\n" % K)
        self.step(w, SOURCE, b"md %s\r\n" % K, b"HD\r\n")
        self.step(w, TARGET, b"md %s\r\n" % K, b"NF\r\n")
        self.assertEqual(out.value(), b"DELETED\r\nNOT_FOUND\r\nHD\r\n")

    def test_an_old_server_that_cannot_delete_fails_the_write(self) -> None:
        """No delete on the old server, no write: a stale copy left there could be warmed up later."""
        w = self.wire()
        client, out = w.client()
        client.dataReceived(b"set %s 0 0 1\r\nv\r\nget %s\r\n" % (K, K))
        self.step(w, SOURCE, b"md %s\r\n" % K, b"SERVER_ERROR busy\r\n")
        self.assertIn(b"SERVER_ERROR", out.value())
        self.assertIn(b"nothing was written", out.value())
        self.assertEqual(w.slot().failures, 1)
        self.sent(w, TARGET, b"get %s\r\n" % K)    # the get behind it goes on

    def test_incr_carries_on_from_the_old_item(self) -> None:
        """A write that reads the item warms it up first, then deletes the old copy, then runs."""
        w = self.wire()
        client, out = w.client()
        client.dataReceived(b"incr %s 2\r\n" % K)
        self.step(w, SOURCE, b"mg %s v f t\r\n" % K, b"VA 1 f0 t-1\r\n5\r\n")
        self.step(w, TARGET, b"ms %s 1 T0 F0 ME c\r\n5\r\n" % K, b"HD c3\r\n")
        self.step(w, SOURCE, b"mg %s\r\n" % K, b"HD\r\n")
        self.step(w, SOURCE, b"md %s\r\n" % K, b"HD\r\n")
        self.step(w, TARGET, b"incr %s 2\r\n" % K, b"7\r\n")
        self.assertEqual(out.value(), b"7\r\n")
        client.dataReceived(b"append %s 0 0 1\r\nz\r\n" % K)
        self.step(w, SOURCE, b"mg %s v f t\r\n" % K, b"EN\r\n")     # nothing there: nothing to delete
        self.step(w, TARGET, b"append %s 0 0 1\r\nz\r\n" % K, b"STORED\r\n")
        self.assertEqual(out.value(), b"7\r\nSTORED\r\n")

    def test_meta_set_modes(self) -> None:
        """ms in set mode is a blind write; in add mode it reads the item first."""
        w = self.wire()
        client, out = w.client()
        client.dataReceived(b"ms %s 1 T5 MS\r\nv\r\n" % K)
        self.step(w, SOURCE, b"md %s\r\n" % K, b"NF\r\n")
        self.step(w, TARGET, b"ms %s 1 T5 MS\r\nv\r\n" % K, b"HD\r\n")
        client.dataReceived(b"ms %s 1 ME\r\nv\r\n" % K)
        self.sent(w, SOURCE, b"mg %s v f t\r\n" % K)

    def test_noreply_writes_are_still_ordered(self) -> None:
        w = self.wire()
        client, out = w.client()
        client.dataReceived(b"set %s 0 0 1 noreply\r\nv\r\nget %s\r\n" % (K, K))
        self.step(w, SOURCE, b"md %s\r\n" % K, b"HD\r\n")
        self.step(w, TARGET, b"set %s 0 0 1\r\nv\r\n" % K, b"STORED\r\n")
        self.step(w, TARGET, b"get %s\r\n" % K, b"VALUE %s 0 1\r\nv\r\nEND\r\n" % K)
        self.assertEqual(out.value(), b"VALUE %s 0 1\r\nv\r\nEND\r\n" % K)


class RoutedElsewhereTests(Case):
    def test_a_read_mid_warm_up_copies_nothing_once_the_slot_is_held(self) -> None:
        """The end's hold arrives while the old server is read: no copy, the miss is the answer."""
        w = self.wire()
        client, out = w.client()
        client.dataReceived(b"get %s\r\n" % K)
        self.step(w, TARGET, b"get %s\r\n" % K, b"END\r\n")
        self.sent(w, SOURCE, b"mg %s v f t\r\n" % K)
        w.serve(topology(2, moving={7}, state="held"))
        self.answer(w, SOURCE, b"VA 1 f0 t-1\r\nx\r\n")
        self.assertEqual(out.value(), b"END\r\n")
        self.sent(w, TARGET, b"")

    def test_a_write_mid_way_goes_where_the_slot_goes_now(self) -> None:
        """Cancelled while the old copy is deleted: the set then goes to the old server, which owns it again."""
        w = self.wire()
        client, out = w.client()
        client.dataReceived(b"set %s 0 0 1\r\nv\r\nget %s\r\n" % (K, K))
        self.sent(w, SOURCE, b"md %s\r\n" % K)
        w.serve(topology(2, moving={7}, state="stable", owner=1))
        self.answer(w, SOURCE, b"HD\r\n")
        self.step(w, SOURCE, b"set %s 0 0 1\r\nv\r\nget %s\r\n" % (K, K), b"STORED\r\nEND\r\n")
        self.assertEqual(out.value(), b"STORED\r\nEND\r\n")
        self.assertNotIn(TARGET, w.backends)

    def test_the_slot_object_is_kept_across_tables_of_the_same_move(self) -> None:
        w = self.wire()
        first = w.slot()
        w.serve(topology(2, moving={7}))
        self.assertIs(w.slot(), first)
        self.assertEqual(type(first).__name__, "WarmingSlot")
