"""A plain (nutcracker-mode) Redis pool joins its cluster in place: the reload's diff, the pool's switch to
slots, the runtime keeping its clients, and ClusterSources serving the running pool until the topology is read.
"""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from tests.unit.cluster.coordinator_stub import layout, shop_pool
from tests.unit.cluster.test_adopt_routing import ADOPTED, MOVING, PLACE, key
from tests.unit.cluster.test_migrating import migrate
from tests.unit.cluster.test_slot_routing import Wire, cmd
from tests.unit.cluster.test_sources import Harness, outcome
from twinproxy.cluster.pools import cluster_pool
from twinproxy.cluster.slots import slot_of
from twinproxy.cluster.targets import SlotRouting
from twinproxy.config import load_text
from twinproxy.pool import ServerPool
from twinproxy.runtime import PoolRuntime
from twinproxy.topology import diff_pools

# The pool that was adopted (tests/unit/cluster/test_adopt_routing.py: servers a, b, c became groups 1-3),
# and the same pool naming its cluster instead of its servers (coordinator_stub's "shop").
PLAIN = """\
shop:
  listen: {listen}
  redis: true
  timeout: 400
  hash: fnv1a_64
  distribution: ketama
  servers:
   - 10.0.0.1:6379:1 a
   - 10.0.0.2:6379:1 b
   - 10.0.0.3:6379:1 c
"""
ADDRESS = {1: "10.0.0.1:6379", 2: "10.0.0.2:6379", 3: "10.0.0.3:6379"}


def plain(listen: str = "127.0.0.1:19000", **changes: str):
    text = PLAIN.format(listen=listen)
    for old, new in changes.items():
        text = text.replace(old, new)
    return load_text(text)


def test_a_plain_redis_pool_that_names_its_cluster_is_changed_in_place() -> None:
    diff = diff_pools(plain(), shop_pool())
    assert [d.name for d in diff.changed] == ["shop"] and not diff.replaced and not diff.added
    (changed,) = diff.changed
    assert [s.name for s in changed.removed] == ["a", "b", "c"]


MEMCACHE_PLAIN = "shop:\n  listen: 127.0.0.1:19000\n  servers:\n   - 10.0.0.1:11211:1\n"
MEMCACHE_CLUSTER = "shop:\n  listen: 127.0.0.1:19000\n  cluster: shop\n  coordinator: file:///tmp/x\n"
SENTINEL = ("shop:\n  listen: 127.0.0.1:19000\n  redis: true\n  sentinels:\n   - 127.0.0.1:26379\n"
            "  servers:\n   - 10.0.0.1:6379:1 s1\n")


def test_a_plain_memcache_pool_that_names_its_cluster_is_changed_in_place_too() -> None:
    """(Adopted as a Redis pool is: tests/unit/cluster/test_adopt_memcache.py.)"""
    diff = diff_pools(load_text(MEMCACHE_PLAIN), load_text(MEMCACHE_CLUSTER))
    assert [d.name for d in diff.changed] == ["shop"] and not diff.replaced


@pytest.mark.parametrize("old, new", [
    (lambda: load_text(SENTINEL), shop_pool),                                    # a Sentinel pool
    (shop_pool, plain),                                                          # leaving a cluster
], ids=["sentinel", "leaving"])
def test_other_switches_still_replace_the_pool(old, new) -> None:
    diff = diff_pools(old(), new())
    assert [(o.name, n.name) for o, n in diff.replaced] == [("shop", "shop")] and not diff.changed


def test_install_turns_a_plain_pool_into_a_slot_routed_one() -> None:
    (config,) = plain()
    pool = ServerPool(config, Clock())
    assert pool.slots is None and pool.slot_of is None
    before = {k: pool.route(k).name for k in (key(1, 2), key(2, 3), key(3, 1))}
    gone = pool.install(cluster_pool(shop_pool()[0], ADOPTED))
    assert isinstance(pool.slots, SlotRouting) and pool.slot_of is slot_of
    assert sorted(server.name for server in gone) == ["a", "b", "c"]
    assert [server.name for server in pool.servers] == ["shop-1", "shop-2", "shop-3"]
    # Pending: the same servers as before, now under their groups' names.
    group_of = {"a": "shop-1", "b": "shop-2", "c": "shop-3"}
    assert {k: pool.route(k).name for k in before} == {k: group_of[name] for k, name in before.items()}


class Joined(Wire):
    """A runtime serving the plain pool, one client connected, then switched to the adopted cluster."""

    def __init__(self) -> None:
        (self.base,) = shop_pool()
        (config,) = plain()
        self.reactor = MemoryReactorClock()
        self.runtime = PoolRuntime(config, self.reactor, outbox=None)
        self.backends = {}
        self.client, self.out = self.client()

    def join(self, topology=ADOPTED) -> None:
        self.serve(topology)

    def connections(self, address: str) -> list:
        return self.connect_pending().get(address, [])


def test_the_runtime_keeps_its_clients_and_routes_them_by_the_cluster() -> None:
    j = Joined()
    k = key(1, 2)
    j.client.dataReceived(cmd(b"GET", k))
    (old, old_wire), = j.connections(ADDRESS[1])
    old.dataReceived(b"$1\r\nv\r\n")
    j.join(MOVING)
    assert not j.out.disconnecting and j.runtime.pool.slots is not None
    assert [s.name for s in j.runtime.pool.servers] == ["shop-1", "shop-2", "shop-3"]
    j.client.dataReceived(cmd(b"INCR", k))                # group 1 moving: moved first, then at group 2
    assert len(j.connections(ADDRESS[1])) == 1            # the same server under its group's name: its link kept
    assert old_wire.value() == cmd(b"GET", k) + migrate(k)
    assert j.runtime.retiring_count == 0


def test_the_same_client_keeps_its_order_across_the_switch() -> None:
    """A request after the switch goes on the same connection as the one before it: Redis answers in order."""
    j = Joined()
    k = next(b"k%d" % i for i in range(1000) if PLACE(b"k%d" % i) == 1)
    j.client.dataReceived(cmd(b"SET", k, b"1"))
    (old, wire), = j.connections(ADDRESS[1])
    j.join()
    j.client.dataReceived(cmd(b"GET", k))
    assert j.connections(ADDRESS[1]) == [(old, wire)] and j.runtime.retiring_count == 0
    assert wire.value() == cmd(b"SET", k, b"1") + cmd(b"GET", k)
    old.dataReceived(b"+OK\r\n$1\r\n1\r\n")
    assert j.out.value() == b"+OK\r\n$1\r\n1\r\n"


def test_a_client_in_another_database_is_closed_at_the_switch_and_database_0_is_all_that_is_left() -> None:
    """A cluster serves database 0: a client that SELECTed another is closed rather than have its
    keys moved into database 0 (the ensure-moved MIGRATE names db 0); the others stay and are held to 0."""
    j = Joined()
    other, other_out = Wire.client(j)
    other.dataReceived(cmd(b"SELECT", b"1"))
    assert other_out.value() == b"+OK\r\n" and other.db == 1
    j.join(MOVING)
    assert other_out.disconnecting and not j.out.disconnecting
    j.client.dataReceived(cmd(b"SELECT", b"1") + cmd(b"MOVE", key(2, 1), b"1"))
    assert j.out.value().startswith(b"-ERR SELECT is not allowed in a twinproxy cluster pool")
    assert b"-ERR MOVE is not allowed in a twinproxy cluster pool" in j.out.value()
    assert j.client.db == 0


def test_a_subscriber_connection_stays_at_the_switch_its_channel_on_the_same_server() -> None:
    """Its server only changes its name: a new connection would miss what is published until it is
    subscribed, and the old one's messages in flight would be dropped with it."""
    j = Joined()
    channel = key(1, 2)
    j.client.dataReceived(cmd(b"SUBSCRIBE", channel))
    (backend, wire), = j.connections(ADDRESS[1])
    assert wire.value() == cmd(b"subscribe", channel)
    backend.dataReceived(b"*3\r\n$9\r\nsubscribe\r\n$%d\r\n%s\r\n:1\r\n" % (len(channel), channel))
    acked = j.out.value()
    j.join()
    j.reactor.advance(0)                                   # the subscriptions' recheck
    assert j.connections(ADDRESS[1]) == [(backend, wire)] and not wire.disconnecting
    assert wire.value() == cmd(b"subscribe", channel)     # nothing sent again
    message = b"*3\r\n$7\r\nmessage\r\n$%d\r\n%s\r\n$2\r\nhi\r\n" % (len(channel), channel)
    backend.dataReceived(message)
    assert j.out.value() == acked + message
    assert j.runtime.subscribers.connection_count == 1
    # Once group 1's keys move, the channel lives at its slot's owner (group 2): it moves there.
    j.join(MOVING)
    j.reactor.advance(0)
    (_, moved), = j.connections(ADDRESS[2])
    assert moved.value().endswith(cmd(b"subscribe", channel))
    assert wire.value() == cmd(b"subscribe", channel) + cmd(b"unsubscribe", channel)


# -- ClusterSources: the running pool until the follower has read the topology ---------------------------------


def test_a_joining_pool_serves_as_it_was_until_its_topology_is_read() -> None:
    (running,) = plain()
    h = Harness(pools=[running]).start()          # no cluster pool: nothing applied, the file runs as loaded
    assert h.applier.applied == [] and not h.sources.followers
    done = outcome(h.sources.apply_file(shop_pool()))
    assert done and h.applier.last() is running            # the reload itself changes nothing yet
    assert "shop" in h.sources.followers
    h.clock.advance(30)
    assert h.sources.followers["shop"].topology is None
    assert h.applier.last() is running and h.sources.resolve() == [running]
    h.coordinator().set_topology(layout(5))
    h.clock.advance(0)
    joined = h.applier.last()
    assert joined.cluster == "shop" and joined.slots.generation == 5
    assert [s.name for s in joined.servers] == ["shop-1", "shop-2"]
    assert h.sources.resolve()[0].slots.generation == 5
    assert [ack["generation"] for ack in h.acks()] == [5]


def test_a_new_cluster_pool_is_not_ready_until_read_a_joining_memcache_one_serves_as_it_was() -> None:
    other = load_text(PLAIN.format(listen="127.0.0.1:19001").replace("shop:", "cart:"))
    h = Harness(pools=other).start()
    (resolved,) = h.sources.resolve(shop_pool())         # no pool 'shop' runs: nothing to keep serving
    assert resolved.servers == () and resolved.slots is None
    (running,) = load_text(MEMCACHE_PLAIN)
    h = Harness(pools=[running]).start()
    (resolved,) = h.sources.resolve(load_text(MEMCACHE_CLUSTER))
    assert resolved is running
