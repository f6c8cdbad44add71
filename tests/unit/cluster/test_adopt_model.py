"""Adoption in the topology (twinproxy.cluster.migrations.adopt): the document, the states, the guards."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from tests.unit.cluster.test_model_migration import refused
from twinproxy.cluster import migrations
from twinproxy.cluster.legacy import make_legacy
from twinproxy.cluster.migrations import KEEP_ENDED, Migration, startable
from twinproxy.cluster.model import Topology, TopologyError

A, B, C, D = "127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003", "127.0.0.1:7004"
# Groups in the pool's order, not sorted: the slots spread in that order.
LEGACY = make_legacy("shop", "fnv1a_64", "ketama", None, [(3, "a", 1), (1, "b", 2), (2, "c", 1)])


def adopted(legacy=LEGACY, addresses=(A, B, C)) -> Topology:
    return migrations.adopt(Topology.empty("shop", "redis"), legacy, list(addresses))


def round_trip(topology: Topology) -> Topology:
    again = Topology.from_json(topology.to_json())
    assert again == topology
    return again


def run(topology: Topology, mid: int, steps: int = 3) -> Topology:
    for _ in range(steps):
        topology = round_trip(topology.advance_migration(mid))
    return topology


def test_adopt_makes_one_group_per_server_the_slots_spread_and_one_pending_entry_each() -> None:
    empty = Topology.empty("shop", "redis")
    topology = adopted()
    assert topology.generation == empty.generation + 1
    assert [(g.id, g.servers) for g in topology.groups] == [(1, (B,)), (2, (C,)), (3, (A,))]
    assert set(topology.slots[:341]) == {(3, "stable")}
    assert set(topology.slots[341:682]) == {(1, "stable")}
    assert set(topology.slots[682:]) == {(2, "stable")}
    assert topology.adopted == LEGACY
    assert topology.migrations == tuple(Migration(mid, 0, 1023, gid, None, "pending", adopt=True)
                                        for mid, gid in ((1, 3), (2, 1), (3, 2)))
    assert topology.adopt_states() == {3: "legacy", 1: "legacy", 2: "legacy"}
    document = json.loads(topology.to_json())
    assert document["adopted"] == LEGACY.to_dict()
    assert document["migrations"][0] == {"id": 1, "first": 0, "last": 1023, "from_group": 3, "to_group": None,
                                         "state": "pending", "keys_per_second": None, "parallel": None,
                                         "cancelling": False, "error": None, "adopt": True}
    round_trip(topology)
    assert "adopted" not in json.loads(empty.to_json())
    assert topology.migrations_of(2) == list(topology.migrations)     # an adoption involves every group


def test_adopt_refusals() -> None:
    empty = Topology.empty("shop", "redis")
    refused(400, lambda: migrations.adopt(empty, LEGACY, [A, B, C], warmup_seconds=5), "warmup_seconds is for memcache")
    refused(400, lambda: migrations.adopt(empty, LEGACY, [A, B]), "2 addresses for the 3 servers of pool 'shop'")
    refused(400, lambda: migrations.adopt(empty, LEGACY, [A, B, A]), "lists a server twice")
    refused(400, lambda: migrations.adopt(empty, LEGACY, [A, B, "nowhere"]), "is not 'host:port'")
    for busy in (empty.add_group(1), empty.add_group(1).add_server(1, D).assign_slots(0, 1023, 1),
                 empty.add_sentinel("127.0.0.1:26379").add_group(1).add_server(1, D)):
        refused(409, lambda busy=busy: migrations.adopt(busy, LEGACY, [A, B, C]), "is not empty")


def test_one_entry_at_a_time_in_order() -> None:
    topology = adopted()
    assert startable(topology) == [1]
    assert startable(topology, skip=[1]) == [2]            # paused: the next may go
    prepared = topology.advance_migration(1)
    assert startable(prepared) == []
    refused(409, lambda: prepared.advance_migration(2), "takes part in migration")
    assert startable(run(topology, 1)) == [2]


def test_the_states_pending_prepared_migrating_finished() -> None:
    topology = adopted()
    owners = [gid for gid, _ in topology.slots]
    prepared = round_trip(topology.advance_migration(1))
    assert prepared.migration(1).state == "prepared"
    assert prepared.slots == tuple((owner, "held") for owner in owners)       # every slot: the barrier
    assert prepared.adopt_states() == {3: "legacy", 1: "legacy", 2: "legacy"}
    moving = round_trip(prepared.advance_migration(1))
    assert moving.migration(1).state == "migrating"
    assert moving.slots == tuple((owner, "stable") for owner in owners)       # owners kept, never "migrating"
    assert moving.adopt_states() == {3: "moving", 1: "legacy", 2: "legacy"}
    done = round_trip(moving.advance_migration(1))
    assert done.migration(1).state == "finished" and done.slots == moving.slots
    assert done.adopt_states() == {3: "done", 1: "legacy", 2: "legacy"}
    assert done.adopted == LEGACY
    assert run(done, 2).adopt_states() == {3: "done", 1: "done", 2: "legacy"}
    last = run(run(done, 2), 3)
    assert last.adopted is None and last.adopt_states() == {}
    assert [m.state for m in last.migrations] == ["finished"] * 3
    assert [gid for gid, _ in last.slots] == owners
    assert last.generation == topology.generation + 9
    # The pool's placement is history: the cluster is an ordinary one again.
    assert last.assign_slots(0, 9, 2, force=True).slots[0] == (2, "stable")
    assert last.create_migration(0, 9, 1).migration(4).to_group == 1


def test_cancel_fail_unprepare() -> None:
    topology = adopted()
    cancelled = round_trip(topology.cancel_migration(2))
    assert cancelled.migration(2).state == "cancelled" and cancelled.adopt_states()[1] == "legacy"
    prepared = topology.advance_migration(1)
    back = round_trip(prepared.cancel_migration(1))
    assert back.migration(1).state == "cancelled" and back.slots == topology.slots
    assert startable(back) == [2]
    moving = prepared.advance_migration(1)
    refused(409, lambda: moving.cancel_migration(1), "adoption 1 is moving keys", "pause it instead")
    refused(409, lambda: moving.fail_migration(1, "x"), "only one whose keys have not started moving")
    refused(409, lambda: moving.unprepare_migration(1, "x"), "only a prepared one goes back to pending")
    failed = round_trip(prepared.fail_migration(1, "source unreachable"))
    assert failed.migration(1).state == "failed" and failed.migration(1).error == "source unreachable"
    assert failed.slots == topology.slots and failed.adopted == LEGACY
    again = round_trip(prepared.unprepare_migration(1, "a proxy did not acknowledge"))
    assert again.migration(1).state == "pending" and again.slots == topology.slots
    assert again.migration(1).error == "a proxy did not acknowledge"
    refused(409, lambda: run(topology, 1).cancel_migration(1), "has ended")


def test_guards_while_adopted() -> None:
    topology = adopted()
    for state in (topology, run(topology, 1, 1), run(topology, 1, 2), run(topology, 1)):
        # (the adoption's entries cover every slot: they are named first; prepared, the hold is)
        refused(409, lambda state=state: state.assign_slots(0, 9, 1))
        refused(409, lambda state=state: state.place({0: 1}), "cannot place", "adoption")
        refused(409, lambda state=state: state.create_migration(0, 9, 1), "adoption")
        refused(409, lambda state=state: state.remove_group(2), "holds a server of the adopted pool")
        refused(409, lambda state=state: state.remove_server(2, C), "group 2")
    # A replica of an adopted group comes and goes; only its master is the pool's server.
    with_replica = topology.add_server(2, D)
    assert with_replica.remove_server(2, D).groups == topology.groups
    # Every adoption entry ended, not every server done: still adopted, say how to go on.
    ended = topology.cancel_migration(1).cancel_migration(2).cancel_migration(3)
    for edit in (lambda: ended.assign_slots(0, 9, 1), lambda: ended.place({0: 1}),
                 lambda: ended.create_migration(0, 9, 1)):
        refused(409, edit, "the cluster serves the adopted pool 'shop'",
                "an adoption ended before every server's keys moved",
                "twinproxy-admin adopt --resume --cluster shop, then migration resume")
    refused(409, lambda: ended.remove_group(2), "holds a server of the adopted pool")


def test_adopt_again_queues_only_the_servers_not_done() -> None:
    topology = run(adopted(), 1)                            # group 3's keys moved
    refused(409, lambda: migrations.adopt(topology, LEGACY, [A, B, C]), "adoption of pool 'shop' is under way")
    ended = topology.cancel_migration(2).fail_migration(3, "x")
    refused(409, lambda: migrations.adopt(ended, LEGACY, [A, B, D]), "adopted pool 'shop' already",
            "its servers are 127.0.0.1:7001, 127.0.0.1:7002, 127.0.0.1:7004", "adopt --resume --cluster shop")
    other = replace(LEGACY, hash="md5")
    refused(409, lambda: migrations.adopt(ended, other, [A, B, C]), "adopted pool 'shop' already",
            "its hash, distribution, hash tag or servers' names and weights are not the adopted ones")
    refused(409, lambda: migrations.adopt(ended, replace(LEGACY, pool="cart"), [A, B, C]), "it names pool 'cart'")
    again = round_trip(migrations.adopt(ended, LEGACY, [A, B, C]))
    assert again.slots == ended.slots and again.groups == ended.groups
    assert [(m.id, m.from_group, m.state) for m in again.migrations if not m.ended] == [(4, 1, "pending"),
                                                                                       (5, 2, "pending")]
    assert startable(again) == [4]
    last = run(run(again, 4), 5)
    assert last.adopted is None
    assert last.adopt_states() == {}


def test_ended_adoption_entries_are_kept_while_adopted() -> None:
    count = KEEP_ENDED + 2
    legacy = make_legacy("big", "md5", "modula", None, [(gid, f"s{gid}", 1) for gid in range(1, count + 1)])
    topology = migrations.adopt(Topology.empty("shop", "redis"), legacy,
                                [f"127.0.0.1:{7000 + gid}" for gid in range(1, count + 1)])
    # All but the last finished (written directly: one edit each would take long), the last cancelled.
    finished = replace(topology, migrations=tuple(replace(m, state="finished") if m.id < count else m
                                                  for m in topology.migrations))
    cancelled = finished.cancel_migration(count)
    assert len(cancelled.migrations) == count and cancelled.adopted == legacy
    again = migrations.adopt(cancelled, legacy, [f"127.0.0.1:{7000 + gid}" for gid in range(1, count + 1)])
    assert len(again.migrations) == count + 1
    done = run(again, count + 1)
    assert done.adopted is None
    # The pool's placement dropped: the ended entries beyond KEEP_ENDED go, as for any migration.
    assert len(done.migrations) == KEEP_ENDED and done.migrations[-1].id == count + 1


def test_an_empty_group_added_meanwhile_does_not_keep_an_adoption_from_starting() -> None:
    # An adoption takes part in its pool's groups only: another one (owning nothing) is no concern of it.
    topology = adopted().add_group(9).advance_migration(1)
    assert topology.migration(1).state == "prepared"


# -- the document's rules ----------------------------------------------------------------------------------


def document(topology: Topology) -> dict:
    return json.loads(topology.to_json())


def invalid(document_: dict, *words: str) -> None:
    with pytest.raises(TopologyError) as caught:
        Topology.from_dict(document_)
    for word in words:
        assert word in caught.value.message, caught.value.message


def test_document_rules() -> None:
    pending = document(adopted())
    doc = document(adopted())
    doc["migrations"][0]["to_group"] = 2
    invalid(doc, "an adoption covers slots 0-1023 and has a null to_group")
    doc = document(adopted())
    doc["migrations"][0]["last"] = 511
    invalid(doc, "an adoption covers slots 0-1023")
    doc = document(adopted())
    doc["migrations"][0]["adopt"] = "yes"
    invalid(doc, "adopt must be true or false")
    doc = dict(pending, groups=pending["groups"] + [{"id": 4, "servers": [D]}])
    doc["migrations"] = [dict(m, from_group=4) if m["id"] == 1 else m for m in pending["migrations"]]
    invalid(doc, "adoption of group 4, which holds no server of an adopted pool")
    doc = dict(pending, adopted=None)
    invalid(doc, "which holds no server of an adopted pool")
    doc = dict(pending, migrations=[dict(pending["migrations"][0], cancelling=True)])
    invalid(doc, "a Redis adoption neither moves back nor warms up")
    doc = dict(pending, migrations=[dict(pending["migrations"][0], warmup_seconds=5)])
    invalid(doc, "warmup_seconds is set for memcache clusters' adoptions")
    doc = dict(pending, migrations=pending["migrations"] + [dict(pending["migrations"][0], id=9)])
    invalid(doc, "runs with migration")
    prepared = document(adopted().advance_migration(1))
    prepared["slots"] = [{"first": 0, "last": 0, "group": 3, "state": "stable"}] + [
        dict(run_, first=max(run_["first"], 1)) for run_ in prepared["slots"]]
    invalid(prepared, "adoption 1 is prepared, so slot 0 must be held in a group, not stable in group 3")
    moving = document(adopted().advance_migration(1).advance_migration(1))
    moving["slots"][0] = dict(moving["slots"][0], state="migrating")
    invalid(moving, "must be stable")
    doc = dict(pending, groups=[g for g in pending["groups"] if g["id"] != 2])
    doc["slots"] = [dict(run_, group=1) if run_["group"] == 2 else run_ for run_ in pending["slots"]]
    invalid(doc, "group 2 holds a server of the adopted pool 'shop': it must exist and have its server")
    doc = dict(pending, adopted=dict(pending["adopted"], distribution="random"))
    invalid(doc, "cannot be adopted")
