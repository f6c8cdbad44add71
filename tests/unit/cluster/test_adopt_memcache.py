"""A memcached pool adopted by a memcache cluster: the model's entries (warmed up, not moved) and the proxy's
routing on in-memory transports (each key by the state of the server the pool placed it on; the moving
server's keys through a WarmingSlot from it to their slot's owner).

Three servers a, b, c (10.0.0.1-3:11211) became groups 1-3, slots spread 0-340 / 341-681 / 682-1023.  "done"
is group 3 (its entry ended first), "moving" group 1, "legacy" group 2, unless a test says otherwise.
"""

from __future__ import annotations

import pytest
from twisted.internet.testing import MemoryReactorClock

from tests.unit.cluster.test_slot_routing import Wire as RoutingWire
from twinproxy.cluster import adoptions, migrations
from twinproxy.cluster.legacy import legacy_router, make_legacy
from twinproxy.cluster.model import Topology, TopologyError
from twinproxy.cluster.pools import not_ready
from twinproxy.cluster.slots import slot_of
from twinproxy.cluster.warmup import WarmingSlot
from twinproxy.config import load_text
from twinproxy.runtime import PoolRuntime
from twinproxy.topology import diff_pools

pytestmark = pytest.mark.timeout(5)

A, B, C = "10.0.0.1:11211", "10.0.0.2:11211", "10.0.0.3:11211"
ADDRESS = {1: A, 2: B, 3: C}
LEGACY = make_legacy("cache", "fnv1a_64", "ketama", None, [(1, "a", 1), (2, "b", 1), (3, "c", 1)])
PLACE = legacy_router(LEGACY, [1, 2, 3])
ADOPTED = adoptions.adopt(Topology.empty("cache", "memcache"), LEGACY, [A, B, C], warmup_seconds=30)
OWNER = [gid for gid, _ in ADOPTED.slots]
CLUSTER_POOL = "cache:\n  listen: 127.0.0.1:19000\n  timeout: 400\n  cluster: cache\n  coordinator: file:///tmp/x\n"
PLAIN_POOL = """\
cache:
  listen: 127.0.0.1:19000
  timeout: 400
  hash: fnv1a_64
  distribution: ketama
  servers:
   - 10.0.0.1:11211:1 a
   - 10.0.0.2:11211:1 b
   - 10.0.0.3:11211:1 c
"""


def advanced(topology: Topology, mid: int, steps: int) -> Topology:
    for _ in range(steps):
        topology = topology.advance_migration(mid)
    return topology


DONE_3 = advanced(ADOPTED, 3, 4)           # pending, prepared, migrating (warming up), warmed (held), finished
MOVING = advanced(DONE_3, 1, 2)            # group 1 warming up, 2 legacy, 3 done
WARMED = advanced(DONE_3, 1, 3)            # group 1's warm-up over: every slot held
MOVED_1 = advanced(DONE_3, 1, 4)           # 1 and 3 done, 2 legacy


def key(placed: int, owner: int, start: int = 0) -> bytes:
    """A key the pool placed on group ``placed``'s server whose slot group ``owner`` owns."""
    return next(b"k%d" % i for i in range(start, 100000)
                if PLACE(b"k%d" % i) == placed and OWNER[slot_of(b"k%d" % i)] == owner)


class Wire(RoutingWire):
    """A runtime serving the cluster pool (or, ``plain``, the pool file before the switch)."""

    def __init__(self, topology: Topology = None, plain: bool = False) -> None:
        (self.base,) = load_text(CLUSTER_POOL)
        self.reactor = MemoryReactorClock()
        start = load_text(PLAIN_POOL)[0] if plain else not_ready(self.base)
        self.runtime = PoolRuntime(start, self.reactor, outbox=None)
        self.backends = {}
        if topology is not None:
            self.serve(topology)

    def connections(self, address: str) -> list:
        return self.connect_pending().get(address, [])

    def sent(self, address: str) -> bytes:
        """What ``address`` was sent since the last look."""
        found = b""
        for _, transport in self.connections(address):
            found += transport.value()
            transport.clear()
        return found

    def step(self, address: str, expected: bytes, reply: bytes) -> None:
        assert self.sent(address) == expected
        self.connections(address)[0][0].dataReceived(reply)


# -- the model ---------------------------------------------------------------------------------------------


def test_a_memcache_adoption_is_one_warming_entry_per_server() -> None:
    assert [(m.from_group, m.state, m.warmup_seconds, m.adopt) for m in ADOPTED.migrations] == [
        (1, "pending", 30, True), (2, "pending", 30, True), (3, "pending", 30, True)]
    assert ADOPTED.adopted == LEGACY and ADOPTED.protocol == "memcache"
    assert Topology.from_json(ADOPTED.to_json()) == ADOPTED
    default = adoptions.adopt(Topology.empty("cache", "memcache"), LEGACY, [A, B, C])
    assert {m.warmup_seconds for m in default.migrations} == {migrations.DEFAULT_WARMUP}


def test_tuning_that_belongs_to_the_other_protocol_is_refused() -> None:
    for call, text in ((lambda: adoptions.adopt(Topology.empty("c", "memcache"), LEGACY, [A, B, C], 100),
                        "keys_per_second tunes a Redis adoption"),
                       (lambda: adoptions.adopt(Topology.empty("c", "redis"), LEGACY, [A, B, C], None, 5),
                        "warmup_seconds is for memcache clusters")):
        with pytest.raises(TopologyError) as caught:
            call()
        assert text in caught.value.message and caught.value.status == 400


def test_the_states_warm_up_hold_and_finish() -> None:
    prepared = advanced(ADOPTED, 1, 1)
    assert {state for _, state in prepared.slots} == {"held"}
    moving = migrations.advance(prepared, 1, now=1000.0)
    assert moving.migration(1).warmup_until == 1030.0 and moving.adopt_states()[1] == "moving"
    assert {state for _, state in moving.slots} == {"stable"}
    assert [owner for owner, _ in moving.slots] == OWNER           # the owners never change
    paused = migrations.time_warmup(moving, 1, None, 12.5)
    assert paused.migration(1).warmup_left == 12.5
    warmed = moving.advance_migration(1)
    assert warmed.migration(1).warmed and {state for _, state in warmed.slots} == {"held"}
    assert warmed.adopt_states()[1] == "moving"
    done = warmed.advance_migration(1)
    assert done.migration(1).state == "finished" and done.adopt_states() == {1: "done", 2: "legacy", 3: "legacy"}
    assert {state for _, state in done.slots} == {"stable"}
    assert advanced(MOVED_1, 2, 4).adopted is None                  # the last server done: the placement goes


def test_a_cancel_while_warming_up_holds_then_gives_the_server_its_keys_back() -> None:
    for topology in (MOVING, WARMED):
        cancelling = topology.cancel_migration(1)
        entry = cancelling.migration(1)
        assert (entry.state, entry.cancelling, entry.warmed) == ("prepared", True, False)
        assert {state for _, state in cancelling.slots} == {"held"} and cancelling.adopt_states()[1] == "legacy"
        back = cancelling.advance_migration(1)
        assert back.migration(1).state == "cancelled" and {state for _, state in back.slots} == {"stable"}
        assert back.adopt_states() == {1: "legacy", 2: "legacy", 3: "done"}
        resumed = adoptions.resume(back.cancel_migration(2))     # (group 2's entry cancelled while pending)
        assert [(m.from_group, m.state, m.warmup_seconds) for m in resumed.migrations if not m.ended] == [
            (1, "pending", 30), (2, "pending", 30)]


# -- the proxy's routing -----------------------------------------------------------------------------------


def test_pending_every_key_goes_to_the_server_the_pool_placed_it_on() -> None:
    w = Wire(ADOPTED)
    route = w.runtime.pool.route
    for placed in (1, 2, 3):
        for owner in (1, 2, 3):
            assert route(key(placed, owner)) is w.runtime.pool.servers[placed - 1], (placed, owner)


def test_a_moving_server_s_key_misses_at_the_owner_is_read_from_its_server_and_copied() -> None:
    w = Wire(MOVING)
    k = key(1, 2)
    target = w.runtime.pool.route(k)
    assert isinstance(target, WarmingSlot) and target.slot == slot_of(k)
    assert (target.source.spec.address, target.target.spec.address) == (A, B)
    client, out = w.client()
    client.dataReceived(b"get %s\r\n" % k)
    w.step(B, b"get %s\r\n" % k, b"END\r\n")                               # the owner misses
    w.step(A, b"mg %s v f t\r\n" % k, b"VA 3 f7 t-1\r\nold\r\n")         # the placed server has it
    w.step(B, b"ms %s 3 T0 F7 ME c\r\nold\r\n" % k, b"HD c11\r\n")       # copied, flags and TTL kept
    w.step(A, b"mg %s\r\n" % k, b"HD\r\n")                                # still there: the copy stands
    assert out.value() == b""
    w.step(B, b"get %s\r\n" % k, b"VALUE %s 7 3\r\nold\r\nEND\r\n" % k)
    assert out.value() == b"VALUE %s 7 3\r\nold\r\nEND\r\n" % k
    assert target.copies == 1
    client.dataReceived(b"get %s\r\n" % k)                                # a hit at the owner: one trip
    w.step(B, b"get %s\r\n" % k, b"VALUE %s 7 3\r\nold\r\nEND\r\n" % k)
    assert w.sent(A) == b""


def test_a_moving_server_s_key_written_is_deleted_on_its_server_first() -> None:
    w = Wire(MOVING)
    k = key(1, 3)
    client, out = w.client()
    client.dataReceived(b"set %s 0 0 3\r\nnew\r\n" % k)
    w.step(A, b"md %s\r\n" % k, b"HD\r\n")
    assert w.sent(C) == b"set %s 0 0 3\r\nnew\r\n" % k
    w.connections(C)[0][0].dataReceived(b"STORED\r\n")
    assert out.value() == b"STORED\r\n"
    client.dataReceived(b"delete %s\r\n" % k)
    w.step(A, b"md %s\r\n" % k, b"NF\r\n")
    w.step(C, b"delete %s\r\n" % k, b"DELETED\r\n")
    assert out.value() == b"STORED\r\nDELETED\r\n"


def test_keys_not_moving_go_where_their_server_s_state_says() -> None:
    w = Wire(MOVING)
    route = w.runtime.pool.route
    servers = w.runtime.pool.servers
    assert route(key(1, 1)) is servers[0]            # moving, but its own server owns its slot: stays there
    assert route(key(2, 1)) is servers[1]            # legacy: where the pool put it
    assert route(key(3, 1)) is servers[0]            # done: its slot's owner
    assert route(key(3, 2)) is servers[1]
    client, out = w.client()
    client.dataReceived(b"get %s %s\r\n" % (key(3, 1), key(2, 3)))
    assert w.sent(A) == b"get %s\r\n" % key(3, 1) and w.sent(B) == b"get %s\r\n" % key(2, 3)
    assert w.sent(C) == b""


def test_a_multi_key_get_is_split_by_where_each_key_is_now_and_answered_in_order() -> None:
    w = Wire(MOVING)
    warming, legacy, done = key(1, 2), key(2, 3), key(3, 1)
    client, out = w.client()
    client.dataReceived(b"get %s %s %s\r\n" % (warming, legacy, done))
    sent_b = w.sent(B)
    assert sorted(sent_b.split(b"\r\n")[:-1]) == sorted([b"get %s" % warming, b"get %s" % legacy])
    assert w.sent(A) == b"get %s\r\n" % done                          # done: at its slot's owner (group 1)
    first_b = sent_b.split(b"\r\n")[0]
    replies = {b"get %s" % warming: b"END\r\n", b"get %s" % legacy: b"VALUE %s 0 1\r\nl\r\nEND\r\n" % legacy}
    backend = w.connections(B)[0][0]
    backend.dataReceived(replies[first_b])
    backend.dataReceived(replies[sent_b.split(b"\r\n")[1]])
    w.connections(A)[0][0].dataReceived(b"VALUE %s 0 1\r\nd\r\nEND\r\n" % done)
    w.step(A, b"mg %s v f t\r\n" % warming, b"VA 1 f0 t-1\r\nw\r\n")   # the warming key's miss, read through
    w.step(B, b"ms %s 1 T0 F0 ME c\r\nw\r\n" % warming, b"HD c3\r\n")
    w.step(A, b"mg %s\r\n" % warming, b"HD\r\n")
    w.step(B, b"get %s\r\n" % warming, b"VALUE %s 0 1\r\nw\r\nEND\r\n" % warming)
    assert out.value() == (b"VALUE %s 0 1\r\nw\r\n" % warming + b"VALUE %s 0 1\r\nl\r\n" % legacy
                           + b"VALUE %s 0 1\r\nd\r\nEND\r\n" % done)


def test_a_done_server_s_keys_go_to_their_slot_s_owner_and_nothing_warms_any_more() -> None:
    w = Wire(MOVED_1)
    route = w.runtime.pool.route
    for placed in (1, 3):
        for owner in (1, 2, 3):
            assert route(key(placed, owner)) is w.runtime.pool.servers[owner - 1]
    assert w.runtime.pool.slots.migrating == {}
    client, out = w.client()
    client.dataReceived(b"get %s\r\n" % key(1, 2))
    w.step(B, b"get %s\r\n" % key(1, 2), b"END\r\n")                     # a miss is a miss now
    assert out.value() == b"END\r\n" and w.sent(A) == b""


def test_the_warming_slots_are_kept_across_tables_and_the_end_s_hold_releases_to_the_owner() -> None:
    w = Wire(MOVING)
    k = key(1, 2)
    before = w.runtime.pool.route(k)
    w.serve(MOVING.add_server(2, "10.0.0.9:11211").remove_server(2, "10.0.0.9:11211"))
    assert w.runtime.pool.route(k) is before
    w.serve(WARMED)                                                      # the warm-up is over: every slot held
    client, out = w.client()
    client.dataReceived(b"get %s\r\n" % k)
    assert w.sent(A) == b"" and w.sent(B) == b""
    w.serve(MOVED_1)
    w.step(B, b"get %s\r\n" % k, b"END\r\n")
    assert out.value() == b"END\r\n" and w.sent(A) == b""


def test_a_read_answered_after_the_server_is_done_copies_nothing() -> None:
    w = Wire(MOVING)
    k = key(1, 2)
    client, out = w.client()
    client.dataReceived(b"get %s\r\n" % k)
    assert w.sent(B) == b"get %s\r\n" % k
    w.serve(WARMED)
    w.connections(B)[0][0].dataReceived(b"END\r\n")
    assert out.value() == b"END\r\n" and w.sent(A) == b""


def test_a_cancelled_server_s_keys_go_back_to_it() -> None:
    w = Wire(MOVING)
    back = MOVING.cancel_migration(1).advance_migration(1)
    w.serve(back)
    assert w.runtime.pool.route(key(1, 2)) is w.runtime.pool.servers[0]
    assert w.runtime.pool.slots.migrating == {}


# -- the switch from the pool file's servers to the cluster, clients kept -----------------------------------


def test_a_plain_memcache_pool_that_names_its_cluster_is_changed_in_place() -> None:
    diff = diff_pools(load_text(PLAIN_POOL), load_text(CLUSTER_POOL))
    assert [d.name for d in diff.changed] == ["cache"] and not diff.replaced


def test_the_switch_keeps_the_client_and_its_server_links() -> None:
    w = Wire(plain=True)
    client, out = w.client()
    k = key(1, 2)
    client.dataReceived(b"get %s\r\n" % k)
    (backend, wire), = w.connections(A)
    w.serve(ADOPTED)
    assert not out.disconnecting
    client.dataReceived(b"get %s\r\n" % k)                        # pending: still the pool's own server
    assert w.connections(A) == [(backend, wire)]
    assert wire.value() == b"get %s\r\n" % k * 2
    backend.dataReceived(b"VALUE %s 0 1\r\nv\r\nEND\r\n" % k * 2)
    assert out.value() == b"VALUE %s 0 1\r\nv\r\nEND\r\n" % k * 2
    w.serve(MOVING)
    client.dataReceived(b"set %s 0 0 1\r\nw\r\n" % k)              # warming up: deleted on a first, set on b
    assert wire.value().endswith(b"md %s\r\n" % k) and len(w.connections(A)) == 1
    assert w.runtime.retiring_count == 0
