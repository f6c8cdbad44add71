"""Review of 9a80ed5/01e4323 (shared targets), d2dcfa7 (gathered ensure-moved scripts) and 68c6351 (Draining):
what a proxy sent or routed wrongly (each fixed since), on in-memory transports and a fake clock.

- a step asked again after its batch's WAIT or error reply goes to the source even once the slot is held (a
  cancel's hold) and its settle has counted the batch as answered: a MIGRATE (or a claim) the barrier missed;
- a MigratingSlot kept through a fenced table keeps a MoveBatcher that the next table no longer knows: what it
  gathers in a table's turn is not sent by that install, so the settle misses it;
- a MigratingSlot replaced by a new one for the same slot (a reload changing slot_hold mid-migration) gets no
  Draining: the client's later request overtakes its earlier one;
- a Draining dropped by an intermediate hold (a promote of the new owner just after the finish) is not put back
  when the slot is released: the client's later request overtakes its earlier one;
- a Draining stays in the table after its lines emptied: WATCH of its slot is refused until the next table;
- a hot claimed (big) key joins every turn's batch: the script stops at the claim, so no other key of the move
  moves while it is copied;
- (the model) ``startable`` offers migrations that ``advance`` then refuses (a chain 1 -> 3 -> 4 queued, a shared
  target under a promote), and lets a later one take an earlier pending one's target as its source.
"""

from __future__ import annotations

import pytest

from tests.unit.cluster.test_migrating import POOL, SOURCE, TARGET, Wire, cmd, key_in, migrate, topology
from tests.unit.cluster.test_migrating_order import finished, write_in_flight
from tests.unit.cluster.test_migrating_waits import WAITING
from twinproxy.cluster.concurrency import startable
from twinproxy.cluster.model import Topology, TopologyError
from twinproxy.cluster.pools import cluster_pool
from twinproxy.config import load_text
from twinproxy.topology import diff_pool

pytestmark = pytest.mark.timeout(10)

IOERR = b"-IOERR error or timeout reading to target instance\r\n"


def held_at(generation: int, owner: int, slot: int = 7):
    """Slot ``slot`` held at group ``owner`` (a cancel's hold at the target, or a promote's phase one)."""
    topo = topology(generation)
    slots = list(topo.slots)
    slots[slot] = (owner, "held")
    topo.slots = tuple(slots)
    return topo


def sent_since(w: Wire, address: str) -> bytes:
    """Everything written to ``address`` on the connections opened after the first one."""
    w.backend(address)
    return b"".join(wire.value() for _, wire in w.backends[address][1:])


def two_gets_in_one_batch(w: Wire):
    (a, _), (b, _) = w.client(), w.client()
    ka, kb = key_in(7), key_in(7, 5000)
    assert ka != kb
    a.dataReceived(cmd(b"GET", ka))
    b.dataReceived(cmd(b"GET", kb))
    source, source_wire = w.backend(SOURCE)
    assert source_wire.value() == migrate(ka, kb)
    return source, ka, kb


def test_a_step_asked_again_after_a_wait_is_not_sent_once_its_slot_is_held_and_settled() -> None:
    w = Wire()
    w.serve(topology(1, moving={7}))
    source, ka, kb = two_gets_in_one_batch(w)
    w.serve(held_at(2, 2))                      # the cancel's hold, at the range's owner
    settled = w.runtime.settled()
    assert not settled.called                   # the batch is in flight on the source
    source.dataReceived(WAITING)                # ka claimed: nothing moved
    assert settled.called                       # the proxy acknowledges the hold now
    w.reactor.advance(0)
    # kb's request must wait in the hold (it goes back to group 1 with the cancel), not MIGRATE kb now.
    assert migrate(kb) not in sent_since(w, SOURCE)


def test_steps_of_a_failed_batch_are_not_sent_again_once_their_slot_is_held_and_settled() -> None:
    w = Wire()
    w.serve(topology(1, moving={7}))
    source, ka, kb = two_gets_in_one_batch(w)
    w.serve(held_at(2, 2))
    settled = w.runtime.settled()
    source.dataReceived(IOERR)
    assert settled.called
    w.reactor.advance(0)
    again = sent_since(w, SOURCE)
    assert migrate(ka) not in again and migrate(kb) not in again


def test_a_slot_kept_through_a_fenced_table_still_has_its_gathered_script_sent_by_the_next_install() -> None:
    w = Wire()
    w.serve(topology(1, moving={7}))
    w.serve(topology(1, moving={7}), session="suspended")      # a brief session loss: the slot is kept
    w.serve(topology(2, moving={7}))                           # trusted again: the same MigratingSlot
    client, _ = w.client()
    client.dataReceived(cmd(b"GET", key_in(7)))                # gathered for this turn's script ...
    w.serve(held_at(3, 2))                                     # ... when, in the same turn, a cancel's hold comes
    assert w.reactor.tcpClients                                # sent by the install (as without the fence)
    assert not w.runtime.settled().called                      # so the settle waits for it


def with_slot_hold(milliseconds: int):
    (base,) = load_text(POOL + f"  slot_hold: {milliseconds}\n")
    return base


def test_a_read_after_a_write_keeps_its_order_when_a_reload_makes_a_new_migrating_slot() -> None:
    w, client, out, key, source, source_wire = write_in_flight()
    assert source_wire.value() == migrate(key)
    # A reload of the pool file with another slot_hold: the slot's MigratingSlot is made again.
    w.runtime.apply(diff_pool(w.runtime.config, cluster_pool(with_slot_hold(3000), topology(2, moving={7}),
                                                             "connected")))
    client.dataReceived(cmd(b"GET", key))
    w.backend(SOURCE)
    source.dataReceived(b"+OK\r\n")                            # the SET's key moved
    w.reactor.advance(0)
    source.dataReceived(b"+NOKEY\r\n" * (source_wire.value().count(b"EVAL") - 1))
    target, target_wire = w.backend(TARGET)
    assert target_wire.value().startswith(cmd(b"SET", key, b"1"))


def test_a_read_after_a_write_keeps_its_order_across_a_hold_after_the_finish() -> None:
    w, client, out, key, source, source_wire = write_in_flight()
    w.serve(finished(2))                                       # finished while the script is on its way
    w.serve(held_at(3, 2))                                     # a promote of group 2: phase one
    client.dataReceived(cmd(b"GET", key))                      # waits in the hold
    w.serve(finished(4))                                       # the promote's release
    source.dataReceived(b"+OK\r\n")
    target, target_wire = w.backend(TARGET)
    assert target_wire.value() == cmd(b"SET", key, b"1") + cmd(b"GET", key)


def test_watch_of_a_finished_slot_is_served_once_its_lines_are_empty() -> None:
    w = Wire()
    w.serve(topology(1, moving={7}))
    writer, _ = w.client()
    key = key_in(7)
    writer.dataReceived(cmd(b"SET", key, b"1"))
    source, _ = w.backend(SOURCE)
    w.serve(finished(2))
    source.dataReceived(b"+OK\r\n")                            # the line is empty now
    target, target_wire = w.backend(TARGET)
    target.dataReceived(b"+OK\r\n")
    watcher, watcher_out = w.client()
    watcher.dataReceived(cmd(b"WATCH", key))
    assert b"not available" not in watcher_out.value(), watcher_out.value()


def _scripts(data: bytes) -> list:
    """The ensure-moved scripts in ``data``, each as its bytes from its EVAL on."""
    marker = b"$4\r\nEVAL\r\n"
    return [marker + part for part in data.split(marker)[1:]]


def _bulk(key: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(key), key)


def test_a_hot_claimed_key_does_not_keep_other_keys_of_the_move_from_moving() -> None:
    w = Wire()
    w.serve(topology(1, moving={7, 8}))
    big, small = key_in(7), key_in(8)
    (a, _), (b, _) = w.client(), w.client()
    a.dataReceived(cmd(b"HGETALL", big))
    b.dataReceived(cmd(b"GET", small))
    source, source_wire = w.backend(SOURCE)
    answered = 0
    for _ in range(4):
        # The source answers what it was sent: WAIT (naming the big key) while it is claimed, OK otherwise.
        scripts = _scripts(source_wire.value())[answered:]
        answered += len(scripts)
        replies = []
        for script in scripts:
            if _bulk(big) in script:
                index = 1 if _bulk(small) not in script or script.index(_bulk(big)) < script.index(_bulk(small)) else 2
                replies.append(b"*2\r\n$4\r\nWAIT\r\n:%d\r\n" % index)
            else:
                replies.append(b"+OK\r\n")
        source.dataReceived(b"".join(replies))
        # A hot big key: in every turn another client touches it.
        client, _ = w.client()
        client.dataReceived(cmd(b"HGET", big, b"f"))
        w.reactor.advance(0)
    assert TARGET in w.backends or w.reactor.tcpClients, "GET small never left: it waited for the claim of another key"


def groups(count: int, servers: int = 1) -> Topology:
    """Groups 1..count (``servers`` each), the slots spread over the first four (over three when there are three)."""
    topology = Topology.empty("shop", "redis")
    for gid in range(1, count + 1):
        topology = topology.add_group(gid)
        for index in range(servers):
            topology = topology.add_server(gid, f"127.0.0.1:{7000 + 100 * index + gid}")
    topology = topology.assign_slots(0, 255, 1).assign_slots(256, 511, 2).assign_slots(512, 1023, 3)
    return topology.assign_slots(768, 1023, 4, force=True) if count >= 4 else topology


def startable_ones_start(topology: Topology) -> bool:
    """Every migration ``startable`` offers may be advanced, one after the other, as the runners do."""
    for mid in startable(topology):
        try:
            topology = topology.advance_migration(mid)
        except TopologyError:
            return False
    return True


def test_startable_keeps_first_come_first_served_for_a_chain_of_groups() -> None:
    chain = groups(4).create_migration(0, 99, 3).create_migration(512, 600, 4)     # 1 -> 3, then 3 -> 4
    assert startable_ones_start(chain)
    # Group 1 busy (1 -> 5): 1 -> 3 waits for it, and 3 -> 4, queued after it, must not take group 3 first.
    busy = groups(5).create_migration(0, 49, 5).advance_migration(1)
    busy = busy.create_migration(50, 99, 3).create_migration(512, 600, 4)
    assert startable(busy) == []


def test_startable_offers_no_migration_into_a_group_under_a_promote() -> None:
    topology = groups(3, servers=2).create_migration(0, 99, 3).create_migration(256, 300, 3)   # 1 -> 3, 2 -> 3
    held = topology.hold_group(3, {"op": "promote", "group": 3, "server": "127.0.0.1:7103", "step": "held"})
    assert startable(held) == []
