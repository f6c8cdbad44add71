"""Codis's rebalance (twinproxy.cluster.planner) on hand-made topologies."""

from __future__ import annotations

from typing import Dict, Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twinproxy.cluster.model import Topology, TopologyError
from twinproxy.cluster.planner import move_runs, moves, placements, plan_runs, rebalance_plan


def cluster(groups: Iterable[int], servers: bool = True) -> Topology:
    topology = Topology.empty("shop", "redis")
    for gid in groups:
        topology = topology.add_group(gid)
        if servers:
            topology = topology.add_server(gid, f"127.0.0.1:{7000 + gid}")
    return topology


def sizes(topology: Topology, plan: Dict[int, int]) -> Dict[int, int]:
    return topology.place(plan).slot_counts()


def test_no_group_with_servers() -> None:
    with pytest.raises(TopologyError) as caught:
        rebalance_plan(cluster([1, 2], servers=False))
    assert caught.value.status == 409 and "no group has a server" in caught.value.message


def test_all_offline_two_groups_split_in_halves_in_id_order() -> None:
    topology = cluster([1, 2])
    plan = rebalance_plan(topology)
    assert plan_runs(plan) == [{"first": 0, "last": 511, "group": 1}, {"first": 512, "last": 1023, "group": 2}]
    assert placements(topology, plan) == plan and moves(topology, plan) == {}


def test_three_groups_all_offline() -> None:
    topology = cluster([1, 2, 3])
    plan = rebalance_plan(topology)
    assert sizes(topology, plan) == {1: 342, 2: 341, 3: 341}
    assert plan_runs(plan) == [{"first": 0, "last": 341, "group": 1}, {"first": 342, "last": 682, "group": 2},
                               {"first": 683, "last": 1023, "group": 3}]


def test_balanced_gives_an_empty_plan() -> None:
    topology = cluster([1, 2]).assign_slots(0, 511, 1).assign_slots(512, 1023, 2)
    assert rebalance_plan(topology) == {}


def test_new_group_takes_the_highest_numbered_slots_of_each_source() -> None:
    topology = cluster([1, 2]).assign_slots(0, 511, 1).assign_slots(512, 1023, 2).add_group(3)
    topology = topology.add_server(3, "127.0.0.1:7003")
    plan = rebalance_plan(topology)
    assert set(plan.values()) == {3} and len(plan) == 341
    assert plan_runs(plan) == [{"first": 342, "last": 511, "group": 3}, {"first": 853, "last": 1023, "group": 3}]
    assert moves(topology, plan) == plan and placements(topology, plan) == {}
    assert sizes(topology, plan) == {1: 342, 2: 341, 3: 341}
    assert move_runs(topology, plan) == [{"first": 342, "last": 511, "from_group": 1, "group": 3},
                                         {"first": 853, "last": 1023, "from_group": 2, "group": 3}]


def test_offline_slots_go_to_the_smallest_groups_first() -> None:
    # Group 1 owns 0-699, group 2 nothing: the 324 offline slots all go to group 2, then 188 move.
    topology = cluster([1, 2]).assign_slots(0, 699, 1)
    plan = rebalance_plan(topology)
    placed, moved = placements(topology, plan), moves(topology, plan)
    assert set(placed) == set(range(700, 1024)) and set(placed.values()) == {2}
    assert set(moved) == set(range(512, 700)) and set(moved.values()) == {2}
    assert sizes(topology, plan) == {1: 512, 2: 512}
    # Placing the offline part moves no data; the rest is one migration.
    assert topology.place(placed).slot_counts() == {1: 700, 2: 324}
    assert move_runs(topology, plan) == [{"first": 512, "last": 699, "from_group": 1, "group": 2}]


def test_groups_without_servers_take_nothing() -> None:
    topology = cluster([1, 2]).add_group(3)
    plan = rebalance_plan(topology)
    assert set(plan.values()) == {1, 2}


def test_held_slots_stay_and_count_for_their_owner() -> None:
    topology = cluster([1, 2]).assign_slots(0, 1023, 1)
    topology = topology.hold_group(1, {"op": "promote", "group": 1, "server": "127.0.0.1:7001", "step": "held"})
    assert rebalance_plan(topology) == {}
    mixed = cluster([1, 2, 3]).assign_slots(0, 599, 1).assign_slots(600, 1023, 2)
    mixed = mixed.hold_group(2, {"op": "promote", "group": 2, "server": "127.0.0.1:7002", "step": "held"})
    plan = rebalance_plan(mixed)
    assert not any(slot >= 600 for slot in plan)         # group 2's slots are in a change


def three_groups() -> Topology:
    topology = cluster([1, 2]).assign_slots(0, 511, 1).assign_slots(512, 1023, 2).add_group(3)
    return topology.add_server(3, "127.0.0.1:7003")


def test_move_runs_cut_at_a_new_source_or_target_and_at_gaps() -> None:
    topology = cluster([1, 2, 3]).assign_slots(0, 9, 1).assign_slots(10, 19, 2)
    plan = {3: 3, 4: 3, 5: 2, 6: 2, 8: 2, 9: 3, 10: 3, 11: 3, 20: 1}
    assert move_runs(topology, plan) == [
        {"first": 3, "last": 4, "from_group": 1, "group": 3}, {"first": 5, "last": 6, "from_group": 1, "group": 2},
        {"first": 8, "last": 8, "from_group": 1, "group": 2}, {"first": 9, "last": 9, "from_group": 1, "group": 3},
        {"first": 10, "last": 11, "from_group": 2, "group": 3}]       # slot 20 is offline: a placement


def test_a_rebalance_asked_again_while_its_migrations_are_pending_plans_nothing_twice() -> None:
    topology = three_groups()
    plan = rebalance_plan(topology)
    queued = topology
    for run in move_runs(topology, plan):
        queued = queued.create_migration(run["first"], run["last"], run["group"])
    assert all(queued.slots[slot][1] == "stable" for slot in plan)       # pending: nothing changed yet
    assert rebalance_plan(queued) == {}
    # One of them further on (held, then migrating to the target) or moving back counts the same way.
    assert rebalance_plan(queued.advance_migration(1)) == {}
    assert rebalance_plan(queued.advance_migration(1).advance_migration(1)) == {}
    back = queued.advance_migration(1).advance_migration(1).cancel_migration(1)
    assert back.migration(1).cancelling and back.migration(1).target == 1
    again = rebalance_plan(back)        # they end at group 1 again: group 1 gives 170 others meanwhile
    assert len(again) == 170 and set(again.values()) == {3} and not set(again) & set(range(342, 512))
    # Ended migrations do not count.
    assert rebalance_plan(queued.cancel_migration(1).cancel_migration(2)) == plan


def test_a_pending_migration_counts_for_its_target_and_the_rest_is_planned_around_it() -> None:
    topology = three_groups().create_migration(0, 99, 3)        # group 1 -> 3, queued by hand
    plan = rebalance_plan(topology)
    assert not set(plan) & set(range(0, 100))
    counts = topology.place(plan).slot_counts()
    counts[1], counts[3] = counts[1] - 100, counts[3] + 100      # slots 0-99 end at group 3
    assert sorted(counts.values()) == [341, 341, 342]


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 6), st.lists(st.tuples(st.integers(0, 1023), st.integers(0, 1023), st.integers(1, 6)),
                                   max_size=6))
def test_result_is_even_within_one_slot(groups, assignments) -> None:
    topology = cluster(range(1, groups + 1))
    for a, b, gid in assignments:
        if gid <= groups:
            topology = topology.assign_slots(min(a, b), max(a, b), gid, force=True)
    plan = rebalance_plan(topology)
    assert all(topology.slots[slot][0] != gid for slot, gid in plan.items())
    counts = sizes(topology, plan)
    assert max(counts.values()) - min(counts.values()) <= 1
    assert sum(counts.values()) == 1024
    assert rebalance_plan(topology.place(plan)) == {}
    runs = move_runs(topology, plan)
    assert sum(run["last"] - run["first"] + 1 for run in runs) == len(moves(topology, plan))
    assert all(topology.slots[slot][0] == run["from_group"] and plan[slot] == run["group"]
               for run in runs for slot in range(run["first"], run["last"] + 1))
