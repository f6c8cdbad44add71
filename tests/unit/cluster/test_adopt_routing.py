"""An adopted pool's routing on in-memory transports and a fake clock (SlotRouting with a table that has
``legacy``): each key by the state of the server the pool placed it on.

Three servers, groups 1-3 (10.0.0.1-3:6379), slots spread 0-340 / 341-681 / 682-1023.  "done" is group 3
(its entry finished first), "moving" group 1, "legacy" group 2, unless a test says otherwise.
"""

from __future__ import annotations

import pytest

from tests.unit.cluster.test_migrating import migrate
from tests.unit.cluster.test_migrating_waits import WAITING
from tests.unit.cluster.test_slot_routing import Wire, cmd
from twinproxy.cluster import migrations
from twinproxy.cluster.adopted import AdoptedPlacement, PlacedHold
from twinproxy.cluster.legacy import legacy_router, make_legacy
from twinproxy.cluster.migrating import MigratingSlot
from twinproxy.cluster.model import Topology
from twinproxy.cluster.slots import slot_of
from twinproxy.cluster.targets import HeldSlot
from twinproxy.protocols.redis_pubsub import CHANNEL
from twinproxy.request import Request

A, B, C = "10.0.0.1:6379", "10.0.0.2:6379", "10.0.0.3:6379"
ADDRESS = {1: A, 2: B, 3: C}
LEGACY = make_legacy("shop", "fnv1a_64", "ketama", None, [(1, "a", 1), (2, "b", 1), (3, "c", 1)])
PLACE = legacy_router(LEGACY, [1, 2, 3])
ADOPTED = migrations.adopt(Topology.empty("shop", "redis"), LEGACY, [A, B, C])
OWNER = [gid for gid, _ in ADOPTED.slots]

# A stopped test must not hang the suite (a request that loops between two stand-ins never returns).
pytestmark = pytest.mark.timeout(5)


def advanced(topology: Topology, mid: int, steps: int) -> Topology:
    for _ in range(steps):
        topology = topology.advance_migration(mid)
    return topology


DONE_3 = advanced(ADOPTED, 3, 3)
PREPARED = advanced(DONE_3, 1, 1)          # group 1 prepared: every slot held
MOVING = advanced(DONE_3, 1, 2)            # group 1 moving, 2 legacy, 3 done
MOVED_1 = advanced(DONE_3, 1, 3)           # 1 and 3 done, 2 legacy


def key(placed: int, owner: int, start: int = 0) -> bytes:
    """A key the pool placed on group ``placed``'s server whose slot group ``owner`` owns."""
    return next(b"k%d" % i for i in range(start, 100000)
                if PLACE(b"k%d" % i) == placed and OWNER[slot_of(b"k%d" % i)] == owner)


def wire(topology: Topology, session: str = "connected") -> Wire:
    w = Wire()
    w.serve(topology, session)
    return w


def sent(w: Wire, address: str) -> bytes:
    return b"".join(transport.value() for _, transport in w.connect_pending().get(address, []))


def sent_all(w: Wire, address: str, *commands: bytes) -> bool:
    """``address`` was sent ``commands`` and nothing else, in any order (held slots release one by one)."""
    data = sent(w, address)
    return len(data) == sum(map(len, commands)) and all(command in data for command in commands)


def test_the_table_names_the_pool_and_each_server_s_state() -> None:
    w = wire(MOVING)
    table = w.runtime.config.slots
    assert table.legacy == LEGACY and table.legacy_names == ("shop-1", "shop-2", "shop-3")
    assert table.adopt_states == ("moving", "legacy", "done")
    assert table.migrating == () and table.held == frozenset()


def test_pending_every_key_goes_to_the_server_the_pool_placed_it_on() -> None:
    w = wire(ADOPTED)
    route = w.runtime.pool.route
    for placed in (1, 2, 3):
        for owner in (1, 2, 3):
            assert route(key(placed, owner)).name == f"shop-{placed}", (placed, owner)
    client, out = w.client()
    client.dataReceived(cmd(b"GET", key(2, 1)) + cmd(b"MGET", key(1, 3), key(3, 1)))
    assert sent(w, B) == cmd(b"GET", key(2, 1))
    assert sent(w, A) == cmd(b"MGET", key(1, 3))
    assert sent(w, C) == cmd(b"MGET", key(3, 1))


def test_moving_a_key_is_moved_from_its_server_then_served_by_its_slot_s_owner() -> None:
    w = wire(MOVING)
    k = key(1, 2)
    target = w.runtime.pool.route(k)
    assert isinstance(target, MigratingSlot) and target.slot == slot_of(k)
    assert (target.source.name, target.target.name) == ("shop-1", "shop-2")
    client, out = w.client()
    client.dataReceived(cmd(b"SET", k, b"v"))
    assert sent(w, A) == migrate(k) and sent(w, B) == b""
    w.connect_pending()[A][0][0].dataReceived(b"+OK\r\n")
    assert sent(w, B) == cmd(b"SET", k, b"v")
    w.connect_pending()[B][0][0].dataReceived(b"+OK\r\n")
    assert out.value() == b"+OK\r\n"
    client.dataReceived(cmd(b"GET", k))                     # known moved: straight to the owner
    assert sent(w, A) == migrate(k) and sent(w, B) == cmd(b"SET", k, b"v") + cmd(b"GET", k)


def test_moving_a_key_whose_slot_its_own_server_owns_stays_there() -> None:
    w = wire(MOVING)
    route = w.runtime.pool.route
    assert route(key(1, 1)).name == "shop-1"
    assert route(key(2, 1)).name == "shop-2"                # legacy: where the pool put it
    assert route(key(3, 1)).name == "shop-1"                # done: its slot's owner
    assert route(key(3, 2)).name == "shop-2"
    client, out = w.client()
    client.dataReceived(cmd(b"GET", key(1, 1)))
    assert sent(w, A) == cmd(b"GET", key(1, 1))


def test_done_keys_go_to_their_slot_s_owner() -> None:
    w = wire(MOVED_1)
    route = w.runtime.pool.route
    for placed in (1, 3):
        for owner in (1, 2, 3):
            assert route(key(placed, owner)).name == f"shop-{owner}"
    assert route(key(2, 3)).name == "shop-2"
    assert w.runtime.pool.slots.migrating == {}


def test_the_moving_slots_are_kept_across_tables_and_dropped_once_done() -> None:
    w = wire(MOVING)
    k = key(1, 3)
    before = w.runtime.pool.route(k)
    w.serve(MOVING.add_server(2, "10.0.0.9:6379"))          # a new generation, same states
    assert w.runtime.pool.route(k) is before
    w.serve(MOVED_1)
    assert w.runtime.pool.route(k).name == "shop-3"


def test_a_move_answered_after_the_server_is_done_goes_to_the_owner() -> None:
    w = wire(MOVING)
    k = key(1, 2)
    client, out = w.client()
    client.dataReceived(cmd(b"GET", k))
    assert sent(w, A) == migrate(k)
    w.serve(MOVED_1)
    w.connect_pending()[A][0][0].dataReceived(b"+OK\r\n")
    assert sent(w, B) == cmd(b"GET", k)


def test_a_move_answered_during_the_next_entry_s_hold_waits_in_it() -> None:
    w = wire(MOVING)
    k = key(1, 2)
    client, out = w.client()
    client.dataReceived(cmd(b"GET", k))
    next_prepared = MOVED_1.advance_migration(2)
    w.serve(next_prepared)
    settled = w.runtime.settled()
    assert not settled.called                       # the move in flight on the source is waited for
    w.connect_pending()[A][0][0].dataReceived(b"+OK\r\n")
    assert settled.called and sent(w, B) == b""     # held: not sent yet
    w.serve(next_prepared.advance_migration(2))
    assert sent(w, B) == cmd(b"GET", k)             # group 1 done: at its slot's owner


def test_a_move_answered_after_the_session_was_lost_is_refused() -> None:
    w = wire(MOVING)
    k = key(1, 2)
    client, out = w.client()
    client.dataReceived(cmd(b"GET", k))
    w.serve(MOVING, session="suspended")
    w.connect_pending()[A][0][0].dataReceived(b"+OK\r\n")
    assert out.value().startswith(b"-TRYAGAIN slot %d of cluster 'shop' is held" % slot_of(k)), out.value()
    assert sent(w, B) == b""


def test_a_claimed_key_is_asked_again_while_its_server_moves() -> None:
    w = wire(MOVING)
    k = key(1, 2)
    client, out = w.client()
    client.dataReceived(cmd(b"HGET", k, b"f"))
    source, source_wire = w.connect_pending()[A][0]
    source_wire.clear()
    source.dataReceived(WAITING)
    w.reactor.advance(0)
    assert source_wire.value() == migrate(k) and sent(w, B) == b""
    source.dataReceived(b"+NOKEY\r\n")
    assert sent(w, B) == cmd(b"HGET", k, b"f")


def test_prepared_every_slot_is_held_and_the_next_table_sends_each_request_where_its_key_goes() -> None:
    w = wire(DONE_3)
    w.serve(PREPARED)
    assert w.runtime.config.slots.held == frozenset(range(1024))
    moving, legacy, done = key(1, 2), key(2, 1), key(3, 1)
    routes = [w.runtime.pool.route(k) for k in (moving, legacy, done)]
    # Each waits on its slot's hold: seen from the server the pool placed it on while that server's keys
    # are not all moved, the hold itself once they are (they all go to the slot's owner together).
    assert all(isinstance(r, PlacedHold) and isinstance(r.hold, HeldSlot) for r in routes[:2])
    assert isinstance(routes[2], HeldSlot)
    client, out = w.client()
    client.dataReceived(cmd(b"SET", moving, b"1") + cmd(b"GET", legacy) + cmd(b"GET", done))
    assert w.connect_pending() == {} and w.runtime.pool.slots.waiting == 3
    w.serve(MOVING)
    assert sent_all(w, A, migrate(moving), cmd(b"GET", done))
    assert sent(w, B) == cmd(b"GET", legacy)
    assert w.runtime.pool.slots.waiting == 0


def test_a_hold_released_back_to_pending_sends_to_the_pool_s_servers() -> None:
    w = wire(PREPARED)
    client, out = w.client()
    client.dataReceived(cmd(b"GET", key(1, 2)))
    w.serve(PREPARED.unprepare_migration(1, "a proxy did not acknowledge"))
    assert sent(w, A) == cmd(b"GET", key(1, 2))


def tagged_pair(first: int, second: int) -> tuple:
    """Two keys of one slot (one hash tag) that the pool (no hash tag) placed on groups ``first``, ``second``."""
    for tag in range(1000):
        names = [b"{t%d}%d" % (tag, i) for i in range(50)]
        a = next((n for n in names if PLACE(n) == first), None)
        b = next((n for n in names if PLACE(n) == second), None)
        if a is not None and b is not None and OWNER[slot_of(a)] == 2:
            return a, b
    raise AssertionError("no pair")


def test_a_one_slot_command_whose_keys_the_pool_placed_apart_is_refused_held_or_not() -> None:
    a, b = tagged_pair(1, 2)
    assert slot_of(a) == slot_of(b)
    refused = (b"-ERR keys in request don't hash to the same server (use a hash tag to keep them together)\r\n")
    w = wire(PREPARED)
    client, out = w.client()
    client.dataReceived(cmd(b"RENAME", a, b))          # held: its keys wait on the hold as their servers see it
    assert out.value() == refused
    w.serve(MOVING)
    client.dataReceived(cmd(b"RENAME", a, b))          # not held: the codec sees two targets
    assert out.value() == refused * 2
    assert sent(w, A) == b"" and sent(w, B) == b""


def test_a_held_mset_is_split_by_the_server_the_pool_placed_each_key_on_and_applied_whole() -> None:
    # One slot, keys placed on groups 1 and 2: released into MOVING, group 1's key is moved to the slot's
    # owner (group 2) first, group 2's key goes to its own server: both pieces are sent, none refused.
    a, b = tagged_pair(1, 2)
    w = wire(PREPARED)
    client, out = w.client()
    client.dataReceived(cmd(b"MSET", a, b"1", b, b"2"))
    assert out.value() == b"" and w.connect_pending() == {}
    w.serve(MOVING)
    assert out.value() == b""
    assert sent(w, A) == migrate(a)                     # group 1's key moves first
    assert sent(w, B) == cmd(b"MSET", b, b"2")          # group 2's key is where the pool put it
    w.connect_pending()[A][0][0].dataReceived(b"+OK\r\n")
    assert sent(w, B) == cmd(b"MSET", b, b"2") + cmd(b"MSET", a, b"1")
    w.connect_pending()[B][0][0].dataReceived(b"+OK\r\n+OK\r\n")
    assert out.value() == b"+OK\r\n"


def test_a_hold_s_keys_of_servers_already_moved_wait_together() -> None:
    # Group 3's keys all moved: a held MSET of two of its keys in one slot is one piece (to the owner).
    names = [b"{u%d}%d" % (tag, i) for tag in range(200) for i in range(30)]
    slot_keys = {}
    for name in names:
        if PLACE(name) == 3:
            slot_keys.setdefault(slot_of(name), []).append(name)
    a, b = next(keys[:2] for keys in slot_keys.values() if len(keys) >= 2)
    w = wire(advanced(DONE_3, 1, 1))
    route = w.runtime.pool.route
    assert route(a) is route(b) and isinstance(route(a), HeldSlot)


def test_the_placement_stand_in_refuses_a_keyless_request_and_forwards_one_target() -> None:
    answered, got = [], []
    target = type("Target", (), {"send": lambda self, request: got.append(request)})()
    placement = AdoptedPlacement("shop", lambda key, slot: target, lambda request, text, code="ERR":
                                 answered.append((code, text)), lambda source, slot: target)
    keyless = Request(cmd(b"PING"))
    placement.send(keyless)
    assert answered == [("TRYAGAIN", "cluster 'shop': a keyless request reached the adopted placement")]
    one = Request(cmd(b"GET", b"x"))
    one.key = b"x"
    placement.send(one)
    assert got == [one]


def test_the_lease_stall_holds_adopted_keys_too() -> None:
    w = wire(MOVING)
    slots = w.runtime.pool.slots
    slots.renew(w.reactor.seconds() + 1.0)
    w.reactor.advance(1.5)                              # stopped past the lease
    client, out = w.client()
    client.dataReceived(cmd(b"GET", key(2, 1)) + cmd(b"GET", key(1, 2)) + cmd(b"GET", key(3, 1)))
    assert w.connect_pending() == {} and slots.stalled and slots.waiting == 3
    slots.renew(w.reactor.seconds() + 1.0)
    assert sent(w, B) == cmd(b"GET", key(2, 1))
    assert sent_all(w, A, migrate(key(1, 2)), cmd(b"GET", key(3, 1)))
    assert not slots.stalled


def test_a_fenced_session_fences_the_moving_server_s_keys_only() -> None:
    w = wire(MOVING, session="suspended")
    client, out = w.client()
    client.dataReceived(cmd(b"GET", key(1, 2)))
    assert out.value().startswith(b"-TRYAGAIN slot %d of cluster 'shop' is held for a topology change and this "
                                  b"proxy has lost its coordinator session" % slot_of(key(1, 2))), out.value()
    assert w.runtime.pool.slots.migrating == {}
    client.dataReceived(cmd(b"GET", key(1, 1)) + cmd(b"GET", key(2, 3)) + cmd(b"GET", key(3, 2)))
    assert sent(w, A) == cmd(b"GET", key(1, 1))
    assert sent(w, B) == cmd(b"GET", key(2, 3)) + cmd(b"GET", key(3, 2))


def test_after_the_last_entry_the_pool_is_an_ordinary_cluster() -> None:
    w = wire(MOVED_1)
    done = advanced(MOVED_1, 2, 3)
    assert done.adopted is None
    w.serve(done)
    table = w.runtime.config.slots
    assert table.legacy is None and table.adopt_states == ()
    for placed in (1, 2, 3):
        assert w.runtime.pool.route(key(placed, 1)).name == "shop-1"


def test_a_channel_is_subscribed_where_its_publishes_go_by_its_server_s_state() -> None:
    # PUBLISH routes by its channel as by a key: a subscription must be made on that same server.
    w = wire(MOVING)
    hub = w.runtime.subscribers
    legacy, moving, done = key(2, 1), key(1, 2), key(3, 1)
    assert hub.servers_of(CHANNEL, legacy) == ["shop-2"]        # still on the server the pool placed it on
    assert hub.servers_of(CHANNEL, moving) == ["shop-2"]        # its slot's owner (where a moving slot's go)
    assert hub.servers_of(CHANNEL, done) == ["shop-1"]
    w.serve(MOVED_1)
    assert hub.servers_of(CHANNEL, legacy) == ["shop-2"] and hub.servers_of(CHANNEL, key(2, 3)) == ["shop-2"]
    w.serve(ADOPTED)
    assert hub.servers_of(CHANNEL, key(2, 1)) == ["shop-2"] and hub.servers_of(CHANNEL, key(1, 3)) == ["shop-1"]
