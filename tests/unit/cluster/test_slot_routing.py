"""A cluster pool's routing on in-memory transports and a fake clock: slots, holds, offline, not ready."""

from __future__ import annotations

from types import SimpleNamespace

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from twinproxy.cluster.pools import cluster_pool, not_ready
from twinproxy.cluster.slots import slot_of
from twinproxy.cluster.targets import STARTUP_WAIT
from twinproxy.config import load_text
from twinproxy.protocols.resp import encode_command
from twinproxy.runtime import PoolRuntime
from twinproxy.topology import diff_pool

REDIS_POOL = """\
shop:
  listen: 127.0.0.1:19000
  redis: true
  timeout: 400
  slot_hold: 1000
  cluster: shop
  coordinator: file:///tmp/nowhere
"""
MEMCACHE_POOL = """\
cache:
  listen: 127.0.0.1:19001
  cluster: cache
  coordinator: file:///tmp/nowhere
"""


def cmd(*args: bytes) -> bytes:
    return encode_command(list(args))


def topology(generation=1, owners=None, held=(), groups=None, protocol="redis"):
    """A stand-in for model.Topology: groups 1 and 2, slots 0-511 on 1 and 512-1023 on 2 by default."""
    groups = groups or [SimpleNamespace(id=1, servers=("10.0.0.1:6379", "10.0.0.1:6380")),
                        SimpleNamespace(id=2, servers=("10.0.0.2:6379",))]
    owners = owners or [1 if slot < 512 else 2 for slot in range(1024)]
    slots = tuple((owner, "held" if slot in held else "stable") for slot, owner in enumerate(owners))
    return SimpleNamespace(cluster="shop", protocol=protocol, generation=generation, groups=groups, slots=slots,
                           sentinels=())


def key_in(slot: int) -> bytes:
    return next(b"k%d" % i for i in range(100000) if slot_of(b"k%d" % i) == slot)


class Wire:
    def __init__(self, text: str = REDIS_POOL) -> None:
        (self.base,) = load_text(text)
        self.reactor = MemoryReactorClock()
        self.runtime = PoolRuntime(not_ready(self.base), self.reactor, outbox=None)
        self.backends = {}

    def serve(self, topo, session="connected") -> None:
        self.runtime.apply(diff_pool(self.runtime.config, cluster_pool(self.base, topo, session)))

    def client(self):
        protocol = self.runtime.factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def connect_pending(self):
        self.reactor.advance(0)   # the moves' scripts gathered this turn leave (movebatch)
        while self.reactor.tcpClients:
            host, port, factory, _, _ = self.reactor.tcpClients.pop(0)
            protocol = factory.buildProtocol(None)
            transport = StringTransport()
            protocol.makeConnection(transport)
            self.backends.setdefault(f"{host}:{port}", []).append((protocol, transport))
        return self.backends


class SlotRoutingTests(SynchronousTestCase):
    def test_before_a_topology_requests_wait_for_it(self) -> None:
        # A just-started proxy: what arrives before the first topology waits for it, in order.
        w = Wire()
        client, out = w.client()
        client.dataReceived(cmd(b"GET", b"a") + cmd(b"GET", key_in(3)) + cmd(b"GET", b"b"))
        self.assertEqual(out.value(), b"")
        self.assertEqual(w.runtime.pool.slots.waiting, 3)
        w.serve(topology())
        backends = w.connect_pending()
        self.assertEqual(backends["10.0.0.2:6379"][0][1].value(), cmd(b"GET", b"a") + cmd(b"GET", b"b"))
        self.assertEqual(backends["10.0.0.1:6379"][0][1].value(), cmd(b"GET", key_in(3)))
        self.assertEqual(w.runtime.pool.slots.waiting, 0)

    def test_before_a_topology_a_request_waits_a_moment_then_is_not_ready(self) -> None:
        w = Wire()
        client, out = w.client()
        client.dataReceived(cmd(b"GET", b"a"))
        w.reactor.advance(STARTUP_WAIT - 0.01)
        self.assertEqual(out.value(), b"")
        w.reactor.advance(0.02)
        self.assertEqual(out.value(), b"-ERR cluster 'shop' not ready: its topology is not loaded yet "
                                      b"(waited 1000 ms)\r\n")

    def test_keys_go_to_the_group_their_slot_names(self) -> None:
        w = Wire()
        w.serve(topology())
        self.assertEqual([s.name for s in w.runtime.pool.servers], ["shop-1", "shop-2"])
        client, out = w.client()
        client.dataReceived(cmd(b"GET", b"a") + cmd(b"GET", b"b"))   # a -> 579, b -> 1017: both group 2
        client.dataReceived(cmd(b"GET", key_in(3)))
        backends = w.connect_pending()
        self.assertEqual(backends["10.0.0.2:6379"][0][1].value(), cmd(b"GET", b"a") + cmd(b"GET", b"b"))
        self.assertEqual(backends["10.0.0.1:6379"][0][1].value(), cmd(b"GET", key_in(3)))

    def test_offline_slot_is_a_clear_error_naming_it(self) -> None:
        w = Wire()
        w.serve(topology(owners=[None] * 1024))
        client, out = w.client()
        client.dataReceived(cmd(b"GET", b"a"))
        self.assertEqual(out.value(), b"-ERR slot 579 is offline in cluster 'shop' (no group serves it)\r\n")

    def test_multi_key_split_by_owner_and_cross_slot_refused(self) -> None:
        w = Wire()
        w.serve(topology())
        client, out = w.client()
        k1, k2 = key_in(1), key_in(600)
        client.dataReceived(cmd(b"MGET", k1, k2))
        backends = w.connect_pending()
        self.assertEqual(backends["10.0.0.1:6379"][0][1].value(), cmd(b"MGET", k1))
        self.assertEqual(backends["10.0.0.2:6379"][0][1].value(), cmd(b"MGET", k2))
        backends["10.0.0.1:6379"][0][0].dataReceived(b"*1\r\n$1\r\nx\r\n")
        backends["10.0.0.2:6379"][0][0].dataReceived(b"*1\r\n$1\r\ny\r\n")
        self.assertEqual(out.value(), b"*2\r\n$1\r\nx\r\n$1\r\ny\r\n")
        client.dataReceived(cmd(b"RENAME", key_in(1), key_in(2)))
        self.assertIn(b"-CROSSSLOT keys in request don't hash to the same slot", out.value())
        self.assertIn(b"in slot 1, ", out.value())
        self.assertIn(b"in slot 2)", out.value())

    def test_held_slot_waits_then_goes_to_the_new_owner(self) -> None:
        w = Wire()
        w.serve(topology())
        client, out = w.client()
        key = key_in(7)
        w.serve(topology(generation=2, held={7}))
        client.dataReceived(cmd(b"SET", key, b"v"))
        self.assertEqual(w.connect_pending(), {})      # nothing sent: it waits
        owners = [1 if slot < 512 else 2 for slot in range(1024)]
        owners[7] = 2
        w.serve(topology(generation=3, owners=owners))
        backends = w.connect_pending()
        protocol, wire = backends["10.0.0.2:6379"][0]
        self.assertEqual(wire.value(), cmd(b"SET", key, b"v"))
        protocol.dataReceived(b"+OK\r\n")
        self.assertEqual(out.value(), b"+OK\r\n")

    def test_held_slot_gives_up_after_slot_hold(self) -> None:
        w = Wire()
        w.serve(topology(held={7}))
        client, out = w.client()
        client.dataReceived(cmd(b"GET", key_in(7)))
        w.reactor.advance(0.999)
        self.assertEqual(out.value(), b"")
        w.reactor.advance(0.002)
        self.assertTrue(out.value().startswith(b"-TRYAGAIN slot 7 of cluster 'shop' is held"))

    def test_lost_session_fences_held_slots(self) -> None:
        w = Wire()
        w.serve(topology(held={7}))
        client, out = w.client()
        client.dataReceived(cmd(b"GET", key_in(7)))
        w.serve(topology(held={7}), session="suspended")
        self.assertIn(b"has lost its coordinator session", out.value())
        client.dataReceived(cmd(b"GET", key_in(8)))   # an unheld slot serves on
        self.assertIn("10.0.0.1:6379", w.connect_pending())

    def test_hold_settles_once_in_flight_requests_are_answered(self) -> None:
        w = Wire()
        w.serve(topology())
        client, out = w.client()
        client.dataReceived(cmd(b"GET", key_in(7)))
        protocol, wire = w.connect_pending()["10.0.0.1:6379"][0]
        w.serve(topology(generation=2, held={7}))
        settled = w.runtime.settled()
        self.assertFalse(settled.called)
        protocol.dataReceived(b"$-1\r\n")
        self.assertTrue(settled.called)
        self.assertEqual(out.value(), b"$-1\r\n")

    def test_requests_held_through_a_promote_go_to_the_new_master(self) -> None:
        w = Wire()
        w.serve(topology())
        held = set(range(512))
        w.serve(topology(generation=2, held=held))
        client, out = w.client()
        client.dataReceived(cmd(b"SET", key_in(1), b"v"))
        self.assertEqual(w.connect_pending(), {})
        promoted = [SimpleNamespace(id=1, servers=("10.0.0.1:6380", "10.0.0.1:6379")),
                    SimpleNamespace(id=2, servers=("10.0.0.2:6379",))]
        w.serve(topology(generation=3, groups=promoted))
        backends = w.connect_pending()
        self.assertEqual(list(backends), ["10.0.0.1:6380"])
        self.assertEqual(backends["10.0.0.1:6380"][0][1].value(), cmd(b"SET", key_in(1), b"v"))

    def test_promote_is_a_new_address_under_the_same_name(self) -> None:
        w = Wire()
        w.serve(topology())
        server = w.runtime.pool.servers[0]
        promoted = [SimpleNamespace(id=1, servers=("10.0.0.1:6380", "10.0.0.1:6379")),
                    SimpleNamespace(id=2, servers=("10.0.0.2:6379",))]
        w.serve(topology(generation=2, groups=promoted))
        self.assertIs(w.runtime.pool.servers[0], server)
        client, out = w.client()
        client.dataReceived(cmd(b"GET", key_in(1)))
        self.assertIn("10.0.0.1:6380", w.connect_pending())


class MemcacheClusterTests(SynchronousTestCase):
    def test_group_servers_share_its_slots(self) -> None:
        w = Wire(MEMCACHE_POOL)
        groups = [SimpleNamespace(id=1, servers=("10.0.0.1:11211", "10.0.0.2:11211"))]
        w.serve(topology(owners=[1] * 1024, groups=groups, protocol="memcache"))
        table = w.runtime.config.slots
        counts = {}
        for owner in table.owners:
            counts[owner] = counts.get(owner, 0) + 1
        self.assertEqual(sorted(counts), ["cache-1-10.0.0.1:11211", "cache-1-10.0.0.2:11211"])
        self.assertTrue(all(300 < count < 724 for count in counts.values()), counts)
        client, out = w.client()
        client.dataReceived(b"get a\r\n")
        self.assertEqual(len(w.connect_pending()), 1)

    def test_offline_is_a_server_error(self) -> None:
        w = Wire(MEMCACHE_POOL)
        w.serve(topology(owners=[None] * 1024, protocol="memcache"))
        client, out = w.client()
        client.dataReceived(b"get a\r\n")
        self.assertTrue(out.value().startswith(b"SERVER_ERROR slot 579 is offline"), out.value())


class LeaseTests(SynchronousTestCase):
    """The slot lease: a route made after it ran out waits until the next renewal (a stopped process)."""

    def renewed(self) -> Wire:
        w = Wire()
        w.serve(topology())
        w.runtime.pool.slots.renew(w.reactor.seconds() + 1.0)
        return w

    def test_the_first_table_is_good_for_one_lease(self) -> None:
        w = Wire()
        w.serve(topology())
        client, out = w.client()
        w.reactor.advance(0.9)
        client.dataReceived(cmd(b"GET", key_in(3)))
        self.assertIn("10.0.0.1:6379", w.connect_pending())
        w.reactor.advance(0.2)                      # never renewed: the proxy may have been stopped
        client.dataReceived(cmd(b"GET", key_in(600)))
        self.assertEqual(w.connect_pending().get("10.0.0.2:6379"), None)
        self.assertTrue(w.runtime.pool.slots.stalled)

    def test_routes_wait_after_the_lease_and_go_on_in_order_when_renewed(self) -> None:
        w = self.renewed()
        client, out = w.client()
        w.reactor.advance(1.5)                      # stopped past the lease
        client.dataReceived(cmd(b"SET", key_in(3), b"1") + cmd(b"GET", key_in(600)) + cmd(b"GET", key_in(3)))
        self.assertEqual(w.connect_pending(), {})
        slots = w.runtime.pool.slots
        self.assertTrue(slots.stalled)
        self.assertEqual((slots.stalls, slots.waiting), (1, 3))
        slots.renew(w.reactor.seconds() + 1.0)
        backends = w.connect_pending()
        self.assertEqual(backends["10.0.0.1:6379"][0][1].value(), cmd(b"SET", key_in(3), b"1") +
                         cmd(b"GET", key_in(3)))
        self.assertEqual(backends["10.0.0.2:6379"][0][1].value(), cmd(b"GET", key_in(600)))
        self.assertFalse(slots.stalled)

    def test_a_renewal_already_over_releases_nothing(self) -> None:
        w = self.renewed()
        client, out = w.client()
        w.reactor.advance(3)
        client.dataReceived(cmd(b"GET", key_in(3)))
        w.runtime.pool.slots.renew(w.reactor.seconds() - 1.0)   # sent before the stop, read after
        self.assertEqual(w.connect_pending(), {})
        self.assertTrue(w.runtime.pool.slots.stalled)

    def test_a_table_installed_while_stalled_waits_behind_the_holds(self) -> None:
        w = self.renewed()
        client, out = w.client()
        w.reactor.advance(2)
        client.dataReceived(cmd(b"GET", key_in(3)))
        owners = [2] * 1024                         # meanwhile every slot moved to group 2
        w.serve(topology(generation=2, owners=owners))
        client.dataReceived(cmd(b"GET", key_in(4)))
        self.assertEqual(w.connect_pending(), {})
        w.runtime.pool.slots.renew(w.reactor.seconds() + 1.0)
        backends = w.connect_pending()
        self.assertEqual(list(backends), ["10.0.0.2:6379"])
        self.assertEqual(backends["10.0.0.2:6379"][0][1].value(), cmd(b"GET", key_in(3)) + cmd(b"GET", key_in(4)))

    def test_a_stall_hold_gives_up_after_slot_hold(self) -> None:
        w = self.renewed()
        client, out = w.client()
        w.reactor.advance(2)
        client.dataReceived(cmd(b"GET", key_in(3)))
        w.reactor.advance(1.001)
        self.assertTrue(out.value().startswith(b"-TRYAGAIN slot 3 of cluster 'shop' is waiting for this proxy "
                                               b"to confirm its coordinator session"), out.value())

    def test_a_held_slot_released_while_stalled_waits_for_the_renewal(self) -> None:
        w = Wire()
        w.serve(topology(held={3}))
        w.runtime.pool.slots.renew(w.reactor.seconds() + 1.0)
        client, out = w.client()
        client.dataReceived(cmd(b"GET", key_in(3)))          # waits on the real hold
        w.reactor.advance(0.9)
        w.runtime.pool.slots.renew(w.reactor.seconds() + 0.05)
        w.reactor.advance(0.06)                               # now stalled, latched by the next route
        client.dataReceived(cmd(b"GET", key_in(600)))
        w.serve(topology(generation=2))                       # the hold ends while stalled
        self.assertEqual(w.connect_pending(), {})
        w.runtime.pool.slots.renew(w.reactor.seconds() + 1.0)
        backends = w.connect_pending()
        self.assertEqual(backends["10.0.0.1:6379"][0][1].value(), cmd(b"GET", key_in(3)))
        self.assertEqual(backends["10.0.0.2:6379"][0][1].value(), cmd(b"GET", key_in(600)))

    def test_a_request_released_by_a_hold_during_a_stall_keeps_its_place(self) -> None:
        w = Wire()
        w.serve(topology(held={3}))
        slots = w.runtime.pool.slots
        slots.renew(w.reactor.seconds() + 0.5)
        client, out = w.client()
        client.dataReceived(cmd(b"SET", key_in(3), b"1"))     # waits on the real hold (1 s at most)
        w.reactor.advance(0.6)
        client.dataReceived(cmd(b"SET", key_in(3), b"2"))     # after the stall: behind it
        w.serve(topology(generation=2))                       # the hold ends while stalled
        slots.renew(w.reactor.seconds() + 1.0)
        self.assertEqual(w.connect_pending()["10.0.0.1:6379"][0][1].value(),
                         cmd(b"SET", key_in(3), b"1") + cmd(b"SET", key_in(3), b"2"))

    def test_a_table_after_the_lease_releases_nothing_even_before_any_route(self) -> None:
        w = Wire()
        w.serve(topology(held={3}))
        w.runtime.pool.slots.renew(w.reactor.seconds() + 1.0)
        client, out = w.client()
        client.dataReceived(cmd(b"GET", key_in(3)))
        w.reactor.advance(1.5)                                # no route since the lease ran out
        w.serve(topology(generation=2))
        self.assertEqual(w.connect_pending(), {})
        self.assertTrue(w.runtime.pool.slots.stalled)
