"""A memcache cluster's migrations in the topology (twinproxy.cluster.migrations): the warm-up's fields,
states, clock and cancel, and the pool a proxy builds from them (twinproxy.cluster.pools)."""

from __future__ import annotations

import json

import pytest

from twinproxy.cluster import migrations
from twinproxy.cluster.model import Topology, TopologyError
from twinproxy.cluster.pools import cluster_pool
from twinproxy.config import load_text

A, B, C = "127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"


def cache() -> Topology:
    """Group 1 (A) owns every slot, group 2 (B and C) none."""
    topology = Topology.empty("cache", "memcache").add_group(1).add_server(1, A)
    return topology.add_group(2).add_server(2, B).add_server(2, C).assign_slots(0, 1023, 1)


def refused(status: int, edit, *words: str) -> None:
    with pytest.raises(TopologyError) as caught:
        edit()
    assert caught.value.status == status, caught.value.message
    for word in words:
        assert word in caught.value.message, caught.value.message


def states(topology: Topology, first: int, last: int) -> set:
    return set(topology.slots[first:last + 1])


def test_create_on_a_memcache_cluster_warms_up_for_60_seconds_by_default() -> None:
    topology = cache().create_migration(0, 99, 2)
    m = topology.migration(1)
    assert (m.state, m.warmup_seconds, m.warms) == ("pending", migrations.DEFAULT_WARMUP, True)
    document = json.loads(topology.to_json())["migrations"][0]
    assert document["warmup_seconds"] == 60 and document["warmed"] is False and document["warmup_until"] is None
    assert Topology.from_json(topology.to_json()) == topology
    assert migrations.create(cache(), 0, 9, 2, warmup_seconds=0).migration(1).warmup_seconds == 0


def test_create_refusals_say_which_knob_belongs_to_which_protocol() -> None:
    topology = cache()
    refused(400, lambda: migrations.create(topology, 0, 9, 2, keys_per_second=10), "keys_per_second",
            "warmup_seconds")
    refused(400, lambda: migrations.create(topology, 0, 9, 2, parallel=2), "parallel")
    refused(400, lambda: migrations.create(topology, 0, 9, 2, warmup_seconds=-1), "warmup_seconds")
    refused(400, lambda: migrations.create(topology, 0, 9, 2, warmup_seconds=True), "warmup_seconds")
    redis = Topology.empty("shop", "redis").add_group(1).add_server(1, A).add_group(2).add_server(2, B)
    refused(400, lambda: migrations.create(redis.assign_slots(0, 1023, 1), 0, 9, 2, warmup_seconds=3),
            "warmup_seconds is for memcache clusters")


def test_warm_up_states_clock_hold_and_finish() -> None:
    topology = migrations.create(cache(), 0, 511, 2, warmup_seconds=30)
    prepared = topology.advance_migration(1)
    assert states(prepared, 0, 511) == {(1, "held")}
    moving = migrations.advance(prepared, 1, now=1000.0)
    m = moving.migration(1)
    assert m.state == "migrating" and m.warmup_until == 1030.0 and states(moving, 0, 511) == {(2, "migrating")}
    assert moving.migrating_from(0) == 1
    paused = migrations.time_warmup(moving, 1, None, 12.5)
    assert (paused.migration(1).warmup_until, paused.migration(1).warmup_left) == (None, 12.5)
    assert paused.slots == moving.slots and paused.generation == moving.generation + 1
    resumed = migrations.time_warmup(paused, 1, 2000.0, None)
    assert Topology.from_json(resumed.to_json()) == resumed
    warmed = resumed.advance_migration(1)
    assert warmed.migration(1).warmed and warmed.migration(1).state == "migrating"
    assert states(warmed, 0, 511) == {(2, "held")} and warmed.migrating_from(0) == 1
    assert Topology.from_json(warmed.to_json()) == warmed
    refused(409, lambda: migrations.time_warmup(warmed, 1, 1.0), "warm-up clock")
    done = warmed.advance_migration(1)
    assert done.migration(1).state == "finished" and not done.migration(1).warmed
    assert states(done, 0, 511) == {(2, "stable")}
    refused(409, lambda: migrations.time_warmup(prepared, 1, 1.0), "warm-up clock")


@pytest.mark.parametrize("warmed", [False, True])
def test_cancel_holds_at_the_target_then_gives_the_range_straight_back(warmed: bool) -> None:
    moving = migrations.advance(cache().create_migration(0, 99, 2).advance_migration(1), 1, now=5.0)
    if warmed:
        moving = moving.advance_migration(1)
    held = moving.cancel_migration(1)
    m = held.migration(1)
    assert (m.state, m.cancelling, m.warmed, m.warmup_until) == ("prepared", True, False, None)
    assert states(held, 0, 99) == {(2, "held")}
    back = migrations.advance(held, 1, now=9.0)
    assert back.migration(1).state == "cancelled" and states(back, 0, 99) == {(1, "stable")}


def test_documents_with_broken_warm_up_fields_are_refused() -> None:
    base = json.loads(migrations.advance(cache().create_migration(0, 9, 2).advance_migration(1), 1, 3.0).to_json())

    def load(**changes):
        document = json.loads(json.dumps(base))
        document["migrations"][0].update(changes)
        return lambda: Topology.from_json(json.dumps(document))

    refused(400, load(warmup_seconds=None), "warmup_seconds is set for memcache")
    refused(400, load(warmup_until="soon"), "warmup_until")
    refused(400, load(warmup_left=-2), "warmup_left")
    refused(400, load(warmed="yes"), "warmed must be")
    refused(400, load(state="pending", warmed=True), "only a migrating one has warmed up")
    refused(400, load(warmed=True), "slot 0 must be held in group 2")


def test_the_proxy_pool_warms_each_slot_from_its_server_in_the_source_group() -> None:
    """Each migrating slot names the server it had in the source group (rendezvous), and goes to its new one."""
    before = Topology.empty("cache", "memcache").add_group(1).add_server(1, A).add_server(1, C)
    before = before.add_group(2).add_server(2, B).assign_slots(0, 1023, 1)
    (base,) = load_text("cache:\n  listen: 127.0.0.1:0\n  cluster: cache\n  coordinator: file:///tmp/x\n")
    old = cluster_pool(base, before).slots
    moving = migrations.advance(before.create_migration(0, 511, 2).advance_migration(1), 1, now=1.0)
    table = cluster_pool(base, moving).slots
    sources = dict(table.migrating)
    assert sorted(sources) == list(range(512))
    assert all(sources[slot] == old.owners[slot] for slot in range(512))
    assert {old.owners[slot] for slot in range(512)} == {"cache-1-" + A, "cache-1-" + C}
    assert set(table.owners[:512]) == {"cache-2-" + B}
    held = cluster_pool(base, moving.advance_migration(1)).slots
    assert held.migrating == () and set(range(512)) <= held.held
