"""Slot migrations in the topology (twinproxy.cluster.migrations): the document, the rules, the edits."""

from __future__ import annotations

import json

import pytest

from twinproxy.cluster import migrations
from twinproxy.cluster.migrations import KEEP_ENDED, Migration, startable
from twinproxy.cluster.model import Topology, TopologyError

A, B, C, D = "127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003", "127.0.0.1:7004"


def cluster() -> Topology:
    """Group 1 (A) owns 0-511, group 2 (B) 512-1023, group 3 (C) nothing, group 4 has no server."""
    topology = Topology.empty("shop", "redis").add_group(1).add_server(1, A).add_group(2).add_server(2, B)
    return topology.add_group(3).add_server(3, C).add_group(4).assign_slots(0, 511, 1).assign_slots(512, 1023, 2)


def refused(status: int, edit, *words: str) -> TopologyError:
    with pytest.raises(TopologyError) as caught:
        edit()
    assert caught.value.status == status, caught.value.message
    for word in words:
        assert word in caught.value.message, caught.value.message
    return caught.value


def states(topology: Topology, first: int, last: int) -> set:
    return set(topology.slots[first:last + 1])


def test_create_queues_a_pending_migration_and_changes_no_slot() -> None:
    before = cluster()
    after = before.create_migration(0, 99, 2, keys_per_second=500, parallel=2)
    assert after.generation == before.generation + 1 and after.slots == before.slots
    assert after.migrations == (Migration(1, 0, 99, 1, 2, "pending", 500, 2),)
    again = after.create_migration(100, 199, 3)
    assert [m.id for m in again.migrations] == [1, 2] and again.migration(2).from_group == 1
    document = json.loads(again.to_json())
    assert document["migrations"][0] == {"id": 1, "first": 0, "last": 99, "from_group": 1, "to_group": 2,
                                         "state": "pending", "keys_per_second": 500, "parallel": 2,
                                         "cancelling": False, "error": None}
    assert Topology.from_json(again.to_json()) == again
    # No migrations: no key (documents written before migrations existed read the same).
    assert "migrations" not in json.loads(before.to_json())


def test_create_refusals() -> None:
    topology = cluster()
    refused(400, lambda: topology.create_migration(0, 1024, 2), "out of range")
    refused(400, lambda: topology.create_migration(10, 5, 2), "after the last")
    refused(404, lambda: topology.create_migration(0, 9, 9), "no group 9")
    refused(409, lambda: topology.create_migration(0, 9, 4), "no servers")
    refused(400, lambda: topology.create_migration(0, 9, 1), "owns slots 0-9 already")
    refused(400, lambda: topology.create_migration(500, 520, 2), "group 2 owns slots 512-520")
    refused(409, lambda: topology.create_migration(500, 520, 3), "more than one group", "group 1 owns 500-511")
    refused(409, lambda: topology.assign_slots(0, 9, None, force=True).create_migration(0, 20, 2), "offline")
    refused(400, lambda: topology.create_migration(0, 9, 2, keys_per_second=0), "keys_per_second")
    refused(400, lambda: topology.create_migration(0, 9, 2, parallel=65), "parallel")
    queued = topology.create_migration(0, 99, 2)
    refused(409, lambda: queued.create_migration(50, 150, 3), "slots 50-99", "in migration 1")
    held = topology.hold_group(1, {"op": "promote", "group": 1, "server": A, "step": "held"})
    refused(409, lambda: held.create_migration(0, 9, 2), "held")
    refused(400, lambda: migrations.create(topology, 0, 9, 2, warmup_seconds=5), "warmup_seconds",
            "memcache clusters")


def test_the_states_in_order_and_migrating_from() -> None:
    topology = cluster().create_migration(0, 511, 2)
    assert topology.migrating_from(0) is None
    prepared = topology.advance_migration(1)
    assert prepared.migration(1).state == "prepared" and states(prepared, 0, 511) == {(1, "held")}
    assert states(prepared, 512, 1023) == {(2, "stable")}
    moving = prepared.advance_migration(1)
    assert moving.migration(1).state == "migrating" and states(moving, 0, 511) == {(2, "migrating")}
    assert moving.migrating_from(0) == moving.migrating_from(511) == 1 and moving.migrating_from(512) is None
    assert moving.runs()[0] == {"first": 0, "last": 511, "group": 2, "state": "migrating"}
    assert Topology.from_json(moving.to_json()).migrating_from(7) == 1
    done = moving.advance_migration(1)
    assert done.migration(1).state == "finished" and states(done, 0, 1023) == {(2, "stable")}
    assert done.migrating_from(0) is None and done.generation == topology.generation + 3
    refused(409, lambda: done.advance_migration(1), "has ended")
    refused(404, lambda: done.advance_migration(7), "no migration 7")


def test_a_source_takes_part_in_one_migration_at_a_time_a_target_may_be_shared() -> None:
    topology = cluster().create_migration(0, 99, 3).create_migration(100, 199, 3).create_migration(512, 600, 3)
    topology = topology.create_migration(200, 299, 2)
    # 1 and 2 move from group 1 (its source, one at a time); 3 from group 2 into group 3, which it shares with
    # 1 as a target only; 4 from group 1 again.
    assert startable(topology) == [1, 3]
    started = topology.advance_migration(1)
    assert startable(started) == [3]
    refused(409, lambda: started.advance_migration(2), "group 1 takes part in migration 1")
    refused(409, lambda: started.advance_migration(4), "group 1 takes part in migration 1")
    both = started.advance_migration(3)
    assert [m.state for m in both.migrations] == ["prepared", "pending", "prepared", "pending"]
    assert startable(topology, skip=[1]) == [2, 3]          # a paused one lets the next go
    finished = both.advance_migration(1).advance_migration(1)
    assert startable(finished) == [2]
    # Disjoint groups run side by side.
    side = cluster().add_group(5).add_server(5, D).create_migration(0, 99, 3).create_migration(512, 600, 5)
    assert startable(side) == [1, 2]


def test_a_group_is_never_a_source_and_a_target_at_once() -> None:
    # 1 -> 3 runs: 3 -> 2 may not start (3 would MIGRATE out while 1 MIGRATEs into it), nor 2 -> 1.
    topology = cluster().assign_slots(900, 1023, 3, force=True).create_migration(0, 99, 3)
    topology = topology.create_migration(900, 950, 2)
    topology = topology.create_migration(512, 600, 1)
    started = topology.advance_migration(1)
    assert startable(started) == []
    refused(409, lambda: started.advance_migration(2), "group 3 takes part in migration 1")
    refused(409, lambda: started.advance_migration(3), "group 1 is the source of migration 1")


def test_cancels_of_migrations_sharing_a_target_close_no_circle() -> None:
    # 1 -> 3 and 2 -> 3 migrating; both cancelled: 3 moves back to 1 and to 2 at once, a star, no circle.
    topology = cluster().create_migration(0, 99, 3).create_migration(512, 600, 3)
    moving = topology.advance_migration(1).advance_migration(1).advance_migration(2).advance_migration(2)
    assert [m.state for m in moving.migrations] == ["migrating", "migrating"]
    back = moving.cancel_migration(1).cancel_migration(2)
    assert [(m.source, m.target) for m in back.migrations] == [(3, 1), (3, 2)]


def test_a_promote_in_progress_keeps_a_migration_from_starting_and_the_other_way_round() -> None:
    topology = cluster().create_migration(0, 99, 2)
    held = topology.hold_group(1, {"op": "promote", "group": 1, "server": A, "step": "held"})
    assert startable(held) == []
    refused(409, lambda: held.advance_migration(1), "promote in progress")
    assert held.release().slots == topology.slots        # released: the pending one can start
    moving = topology.advance_migration(1)
    refused(409, lambda: moving.hold_group(1, {"op": "promote", "group": 1, "server": A}), "migration 1")
    refused(409, lambda: moving.hold_group(2, {"op": "promote", "group": 2, "server": B}), "migration 1")
    # Another group's barrier ends without touching the migration's held slots.
    side = moving.add_group(5).add_server(5, D).assign_slots(600, 700, 5, force=True)
    side = side.hold_group(5, {"op": "promote", "group": 5, "server": D, "step": "held"}).release()
    assert states(side, 0, 99) == {(1, "held")} and states(side, 600, 700) == {(5, "stable")}


def test_cancel_before_the_keys_move_releases_at_the_source() -> None:
    topology = cluster().create_migration(0, 99, 2)
    cancelled = topology.cancel_migration(1)
    assert cancelled.migration(1).state == "cancelled" and cancelled.slots == topology.slots
    prepared = topology.advance_migration(1)
    released = prepared.cancel_migration(1)
    assert released.migration(1).state == "cancelled" and states(released, 0, 511) == {(1, "stable")}
    refused(409, lambda: released.cancel_migration(1), "has ended")


def test_cancel_while_migrating_moves_back_with_the_same_states() -> None:
    moving = cluster().create_migration(0, 99, 2).advance_migration(1).advance_migration(1)
    back = moving.cancel_migration(1)
    m = back.migration(1)
    assert (m.state, m.cancelling, m.source, m.target) == ("prepared", True, 2, 1)
    assert states(back, 0, 99) == {(2, "held")}        # held at the range's owner while migrating
    refused(409, lambda: back.cancel_migration(1), "being cancelled already")
    refused(409, lambda: back.fail_migration(1, "x"), "cancel it instead")
    returning = back.advance_migration(1)
    assert states(returning, 0, 99) == {(1, "migrating")} and returning.migrating_from(50) == 2
    ended = returning.advance_migration(1)
    assert ended.migration(1).state == "cancelled" and states(ended, 0, 511) == {(1, "stable")}
    assert Topology.from_json(returning.to_json()) == returning


def test_fail_and_unprepare() -> None:
    topology = cluster().create_migration(0, 99, 2)
    failed = topology.fail_migration(1, "the target is older")
    assert (failed.migration(1).state, failed.migration(1).error) == ("failed", "the target is older")
    prepared = topology.advance_migration(1)
    assert states(prepared.fail_migration(1, "x"), 0, 99) == {(1, "stable")}
    again = prepared.unprepare_migration(1, "proxies p1 did not acknowledge")
    assert again.migration(1).state == "pending" and again.slots == topology.slots
    assert again.migration(1).error == "proxies p1 did not acknowledge"
    assert again.advance_migration(1).migration(1).error is None
    moving = prepared.advance_migration(1)
    refused(409, lambda: moving.fail_migration(1, "x"), "cancel it instead")
    refused(409, lambda: moving.unprepare_migration(1, "x"), "only a prepared one")


def test_other_edits_respect_migrations() -> None:
    pending = cluster().create_migration(0, 99, 3)
    refused(409, lambda: pending.assign_slots(0, 10, 2, force=True), "in migration 1")
    refused(409, lambda: pending.place({5: 2}), "in migration 1")
    refused(409, lambda: pending.remove_group(3), "migration 1")
    refused(409, lambda: pending.remove_server(3, C), "migration 1")
    assert pending.assign_slots(100, 110, 2, force=True).slots[100] == (2, "stable")
    moving = pending.advance_migration(1).advance_migration(1)
    refused(409, lambda: moving.assign_slots(0, 10, 2, force=True), "migrating")
    with_replica = moving.add_server(3, D)
    refused(409, lambda: with_replica.remove_server(3, C), "master")       # a migration's master stays
    assert with_replica.remove_server(3, D).group(3).servers == (C,)      # a replica may go


def test_ended_migrations_are_pruned_beyond_the_last_fifty() -> None:
    topology = cluster()
    for number in range(KEEP_ENDED + 5):
        topology = topology.create_migration(number, number, 3).cancel_migration(number + 1)
    ids = [m.id for m in topology.migrations]
    assert len(ids) == KEEP_ENDED and ids[0] == 6 and ids[-1] == KEEP_ENDED + 5
    topology = topology.create_migration(900, 901, 1)
    assert topology.migrations[-1].id == KEEP_ENDED + 6 and len(topology.migrations) == KEEP_ENDED + 1


def _doc(migrations, slots=None) -> bytes:
    document = json.loads(cluster().to_json())
    document["migrations"] = migrations
    if slots is not None:
        document["slots"] = slots
    return json.dumps(document).encode()


def _entry(**changes):
    entry = {"id": 1, "first": 0, "last": 99, "from_group": 1, "to_group": 2, "state": "pending"}
    entry.update(changes)
    return entry


MIGRATING_SLOTS = [{"first": 0, "last": 99, "group": 2, "state": "migrating"},
                   {"first": 100, "last": 511, "group": 1, "state": "stable"},
                   {"first": 512, "last": 1023, "group": 2, "state": "stable"}]


@pytest.mark.parametrize("migrations, slots, words", [
    ("x", None, ["must be a list"]),
    ([_entry(state="moving")], None, ["unknown state"]),
    ([_entry(extra=1)], None, ["unknown extra"]),
    ([{"id": 1}], None, ["missing first"]),
    ([_entry(id=0)], None, ["positive"]),
    ([_entry(to_group=1)], None, ["to itself"]),
    ([_entry(to_group=9)], None, ["group 9", "does not exist"]),
    ([_entry(), _entry(id=1, first=200, last=300)], None, ["ordered by id"]),
    ([_entry(), _entry(id=2, first=50, last=150, to_group=3)], None, ["slot 50 is in migrations 1 and 2"]),
    ([_entry(state="prepared")], None, ["must be held in group 1"]),
    ([_entry(state="migrating")], None, ["must be migrating in group 2"]),
    ([_entry(first=512, last=600)], None, ["must be stable in group 1"]),
    ([], MIGRATING_SLOTS, ["no migration covers them"]),
    ([_entry(state="migrating"), _entry(id=2, first=512, last=599, from_group=2, to_group=1, state="prepared")],
     [{"first": 0, "last": 99, "group": 2, "state": "migrating"},
      {"first": 100, "last": 511, "group": 1, "state": "stable"},
      {"first": 512, "last": 599, "group": 2, "state": "held"},
      {"first": 600, "last": 1023, "group": 2, "state": "stable"}], ["migrations 1, 2 move keys in a circle"]),
    ([_entry(keys_per_second=-1)], None, ["keys_per_second"]),
    ([_entry(cancelling=True)], None, ["only a prepared or migrating one moves back"]),
])
def test_invalid_migration_documents_are_refused(migrations, slots, words) -> None:
    refused(400, lambda: Topology.from_json(_doc(migrations, slots)), *words)


def test_a_document_the_proxy_side_writes_by_hand_loads() -> None:
    """Just the contract's six keys: the rest default."""
    loaded = Topology.from_json(_doc([_entry(state="migrating")], MIGRATING_SLOTS))
    assert loaded.migration(1) == Migration(1, 0, 99, 1, 2, "migrating")
    assert loaded.migrating_from(99) == 1
    ended = Topology.from_json(_doc([_entry(state="finished", to_group=9)]))     # ended: its groups may be gone
    assert ended.migration(1).ended
