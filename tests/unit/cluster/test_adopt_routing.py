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
from twinproxy.cluster.legacy import legacy_router, make_legacy
from twinproxy.cluster.migrating import MigratingSlot
from twinproxy.cluster.model import Topology
from twinproxy.cluster.slots import slot_of
from twinproxy.cluster.targets import AdoptedPlacement, HeldSlot
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
    assert all(isinstance(w.runtime.pool.route(k), HeldSlot) for k in (moving, legacy, done))
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


def test_a_released_request_whose_keys_go_to_different_places_is_refused() -> None:
    a, b = tagged_pair(1, 2)
    assert slot_of(a) == slot_of(b)
    w = wire(PREPARED)
    client, out = w.client()
    client.dataReceived(cmd(b"RENAME", a, b))          # one slot: it waits whole on the hold
    w.serve(MOVING)
    assert out.value() == (b"-TRYAGAIN cluster 'shop': this command's keys were on different servers of the "
                           b"adopted pool and are not all moved yet; try again\r\n")
    assert sent(w, A) == b"" and sent(w, B) == b""
    client.dataReceived(cmd(b"RENAME", a, b))          # not held: the codec sees two targets
    assert out.value().endswith(b"-ERR keys in request don't hash to the same server (use a hash tag to keep "
                                b"them together)\r\n")


def test_the_placement_stand_in_refuses_a_keyless_request_and_forwards_one_target() -> None:
    answered, got = [], []
    target = type("Target", (), {"send": lambda self, request: got.append(request)})()
    placement = AdoptedPlacement("shop", lambda key: target, lambda request, text, code="ERR":
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
