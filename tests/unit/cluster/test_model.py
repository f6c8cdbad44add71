"""The topology document (twinproxy.cluster.model): its JSON form, its validation and its edits."""

from __future__ import annotations

import json

import pytest

from twinproxy.cluster.model import Group, Topology, TopologyError, check_address, show_slots
from twinproxy.cluster.slots import slot_of

A, B, C, D = "127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003", "127.0.0.1:7004"


def two_groups(protocol: str = "redis") -> Topology:
    """Group 1 (A master, B replica) owns 0-511, group 2 (C) owns 512-1023."""
    topology = Topology.empty("shop", protocol)
    topology = topology.add_group(1).add_server(1, A).add_server(1, B).add_group(2).add_server(2, C)
    return topology.assign_slots(0, 511, 1).assign_slots(512, 1023, 2)


def refused(status: int, edit, *words: str) -> TopologyError:
    with pytest.raises(TopologyError) as caught:
        edit()
    assert caught.value.status == status, caught.value.message
    for word in words:
        assert word in caught.value.message, caught.value.message
    return caught.value


def document(**changes) -> bytes:
    base = json.loads(two_groups().to_json())
    base.update(changes)
    return json.dumps(base).encode()


# -- slot rule, as the model's users rely on it -----------------------------------


def test_codis_documented_slots_and_the_empty_tag() -> None:
    assert (slot_of(b"a"), slot_of(b"b"), slot_of(b"c")) == (579, 1017, 879)
    assert slot_of(b"{}x") == 0                      # an empty tag hashes the empty string
    assert slot_of(b"{user}:1") == slot_of(b"{user}:2") == slot_of(b"user")


# -- the document -------------------------------------------------------------------


def test_empty_topology_is_generation_zero_all_offline() -> None:
    topology = Topology.empty("shop", "redis")
    assert topology.generation == 0 and topology.groups == () and topology.offline_slots == 1024
    assert topology.runs() == [{"first": 0, "last": 1023, "group": None, "state": "stable"}]
    assert json.loads(topology.to_json()) == {
        "cluster": "shop", "protocol": "redis", "generation": 0, "groups": [],
        "slots": [{"first": 0, "last": 1023, "group": None, "state": "stable"}], "sentinels": [], "change": None}


def test_round_trip_and_contract_shape() -> None:
    topology = two_groups().add_sentinel("127.0.0.1:26379")
    data = json.loads(topology.to_json())
    assert list(data) == ["cluster", "protocol", "generation", "groups", "slots", "sentinels", "change"]
    assert data["groups"] == [{"id": 1, "servers": [A, B]}, {"id": 2, "servers": [C]}]
    assert data["slots"] == [{"first": 0, "last": 511, "group": 1, "state": "stable"},
                             {"first": 512, "last": 1023, "group": 2, "state": "stable"}]
    again = Topology.from_json(topology.to_json())
    assert again == topology and again.group(1).master == A and again.group(1).replicas == (B,)
    assert again.slots[579] == (2, "stable") and len(again.slots) == 1024


def test_every_edit_adds_exactly_one_generation() -> None:
    topology = Topology.empty("shop", "redis")
    for edit in (lambda t: t.add_group(1), lambda t: t.add_server(1, A), lambda t: t.add_server(1, B),
                 lambda t: t.assign_slots(0, 1023, 1), lambda t: t.promote(1, B), lambda t: t.add_sentinel(D),
                 lambda t: t.remove_sentinel(D), lambda t: t.hold_group(1, {"op": "promote", "group": 1,
                                                                            "server": A, "step": "held"}),
                 lambda t: t.release()):
        new = edit(topology)
        assert new.generation == topology.generation + 1
        topology = new
    assert topology.generation == 9


@pytest.mark.parametrize("changes, words", [
    ({"generation": -1}, ["generation"]),
    ({"generation": True}, ["generation"]),
    ({"protocol": "http"}, ["protocol"]),
    ({"cluster": "-bad"}, ["cluster name"]),
    ({"groups": [{"id": 0, "servers": []}]}, ["group id"]),
    ({"groups": [{"id": 10000, "servers": []}]}, ["group id"]),
    ({"groups": [{"id": 2, "servers": [C]}, {"id": 1, "servers": [A]}]}, ["sorted"]),
    ({"groups": [{"id": 1, "servers": [A, B]}, {"id": 2, "servers": [A]}]}, [A, "group 1 and group 2"]),
    ({"groups": [{"id": 1, "servers": ["localhost"]}, {"id": 2, "servers": [C]}]}, ["port"]),
    ({"groups": [{"id": 1, "servers": ["h:0"]}, {"id": 2, "servers": [C]}]}, ["port"]),
    ({"groups": [{"id": 1, "servers": [A, B]}]}, ["group 2", "does not exist"]),
    ({"groups": [{"id": 1, "servers": []}, {"id": 2, "servers": [C]}]}, ["group 1", "no servers"]),
    ({"slots": [{"first": 0, "last": 511, "group": 1, "state": "stable"}]}, ["cover 0-1023"]),
    ({"slots": [{"first": 0, "last": 511, "group": 1, "state": "stable"},
                {"first": 511, "last": 1023, "group": 2, "state": "stable"}]}, ["start at slot 512"]),
    ({"slots": [{"first": 0, "last": 1023, "group": 1, "state": "moving"}]}, ["unknown state"]),
    ({"slots": [{"first": 0, "last": 1024, "group": 1, "state": "stable"}]}, ["out of range"]),
    ({"slots": [{"first": 0, "last": 1023, "group": 1}]}, ["missing state"]),
    ({"sentinels": ["nope"]}, ["sentinel"]),
    ({"change": "promote"}, ["change"]),
    ({"change": {"op": "promote", "group": 1, "server": D, "step": "held"}}, ["promote"]),
    ({"extra": 1}, ["unknown extra"]),
])
def test_invalid_documents_are_refused_with_a_reason(changes, words) -> None:
    refused(400, lambda: Topology.from_json(document(**changes)), *words)


def test_not_json_and_missing_keys() -> None:
    refused(400, lambda: Topology.from_json(b"{nope"), "not JSON")
    refused(400, lambda: Topology.from_json(b"[]"), "object")
    refused(400, lambda: Topology.from_json(b'{"cluster": "x"}'), "missing protocol")


def test_addresses() -> None:
    assert check_address("[::1]:6379") == "[::1]:6379"
    assert check_address("redis.example:6379") == "redis.example:6379"
    for bad in ("::1:6379", "host", "host:", "host:65536", ":6379", "[nope]:1", "a b:1", 6379):
        refused(400, lambda bad=bad: check_address(bad))


def test_runs_of_a_range_are_clipped() -> None:
    topology = two_groups()
    assert topology.runs(500, 520) == [{"first": 500, "last": 511, "group": 1, "state": "stable"},
                                       {"first": 512, "last": 520, "group": 2, "state": "stable"}]
    refused(400, lambda: topology.runs(10, 5), "after")
    assert show_slots([5, 1, 2, 3, 9]) == "1-3, 5, 9"


# -- edits ---------------------------------------------------------------------------


def test_groups() -> None:
    topology = two_groups()
    refused(409, lambda: topology.add_group(1), "already exists")
    refused(400, lambda: topology.add_group(0), "1 to 9999")
    refused(404, lambda: topology.remove_group(7), "no group 7")
    refused(409, lambda: topology.remove_group(2), "owns 512 slots", "512-1023")
    added = topology.add_group(9999).add_group(3)
    assert [g.id for g in added.groups] == [1, 2, 3, 9999]
    assert [g.id for g in added.remove_group(3).groups] == [1, 2, 9999]
    offline = topology.assign_slots(512, 1023, None, force=True)
    assert [g.id for g in offline.remove_group(2).groups] == [1]


def test_servers_belong_to_one_group_cluster_wide() -> None:
    topology = two_groups()
    refused(409, lambda: topology.add_server(2, A), A, "group 1")
    refused(404, lambda: topology.add_server(5, D), "no group 5")
    refused(400, lambda: topology.add_server(2, "nope"), "host:port")
    assert topology.add_server(2, D).group(2).servers == (C, D)


def test_remove_server_rules() -> None:
    topology = two_groups()
    refused(404, lambda: topology.remove_server(2, A), "not in group 2")
    refused(409, lambda: topology.remove_server(1, A), "master", "promote a replica first")
    refused(409, lambda: topology.remove_server(2, C), "last server", "512 slots")
    assert topology.remove_server(1, B).group(1).servers == (A,)
    # A group without slots may lose anything, its master too.
    spare = topology.add_group(3).add_server(3, D).add_server(3, "127.0.0.1:7005")
    assert spare.remove_server(3, D).group(3).servers == ("127.0.0.1:7005",)


def test_memcache_group_servers_all_serve() -> None:
    topology = two_groups("memcache")
    assert topology.remove_server(1, A).group(1).servers == (B,)   # no master rule for memcache
    refused(409, lambda: topology.promote(1, B), "memcache")
    refused(409, lambda: topology.add_sentinel(D), "memcache")


def test_assign_slots() -> None:
    topology = Topology.empty("shop", "redis").add_group(1).add_group(2).add_server(2, C)
    refused(409, lambda: topology.assign_slots(0, 10, 1), "no servers")
    refused(404, lambda: topology.assign_slots(0, 10, 3), "no group 3")
    refused(400, lambda: topology.assign_slots(0, 1024, 2), "out of range")
    refused(400, lambda: topology.assign_slots(9, 3, 2), "after")
    owned = topology.add_server(1, A).assign_slots(0, 99, 1)
    refused(409, lambda: owned.assign_slots(50, 150, 2), "group 1 owns 50-99", "force")
    refused(409, lambda: owned.assign_slots(0, 9, None), "force")
    assert owned.assign_slots(0, 99, 1).slot_counts() == {1: 100, 2: 0}   # its own slots again: fine
    forced = owned.assign_slots(50, 150, 2, force=True)
    assert forced.runs() == [{"first": 0, "last": 49, "group": 1, "state": "stable"},
                             {"first": 50, "last": 150, "group": 2, "state": "stable"},
                             {"first": 151, "last": 1023, "group": None, "state": "stable"}]
    assert forced.offline_slots == 873 and forced.slots_of(1) == list(range(50))


def test_hold_release_and_promote() -> None:
    topology = two_groups()
    change = {"op": "promote", "group": 1, "server": B, "step": "held"}
    held = topology.hold_group(1, change)
    assert held.change == change
    assert held.runs() == [{"first": 0, "last": 511, "group": 1, "state": "held"},
                           {"first": 512, "last": 1023, "group": 2, "state": "stable"}]
    assert Topology.from_json(held.to_json()) == held
    refused(409, lambda: held.hold_group(2, {"op": "promote", "group": 2, "server": C}), "in progress")
    refused(409, lambda: held.assign_slots(0, 0, 2, force=True), "held")
    refused(409, lambda: held.remove_server(1, B), "change in progress")
    refused(409, lambda: held.add_server(1, D), "change in progress")
    refused(409, lambda: held.remove_group(1), "change in progress")
    assert held.release().slots == topology.slots and held.release().change is None
    promoted = held.promote(1, B)      # the new order and the release in one generation
    assert promoted.group(1).servers == (B, A) and promoted.change is None
    assert promoted.generation == held.generation + 1 and promoted.slots == topology.slots


def test_promote_order() -> None:
    topology = Topology.empty("shop", "redis").add_group(1)
    for server in (A, B, C, D):
        topology = topology.add_server(1, server)
    assert topology.promote(1, C).group(1).servers == (C, B, D, A)
    refused(409, lambda: topology.promote(1, A), "already the master")
    refused(404, lambda: topology.promote(1, "127.0.0.1:1"), "not in group 1")
    refused(404, lambda: topology.promote(2, A), "no group 2")


def test_a_sentinel_failover_reorders_the_group_only() -> None:
    topology = two_groups().add_sentinel(D)
    migrating = topology.create_migration(0, 9, 2).advance_migration(1).advance_migration(1)
    assert migrating.slots[0] == (2, "migrating")
    followed = migrating.promote(1, B, sentinel_failover=True)
    assert followed.group(1).servers == (B, A) and followed.generation == migrating.generation + 1
    assert followed.slots == migrating.slots and followed.migrations == migrating.migrations
    # A promote of another group in progress is kept; one of this group refuses it (it has its own sentinels' say).
    held = topology.hold_group(2, {"op": "promote", "group": 2, "server": C, "step": "held"})
    assert held.promote(1, B, sentinel_failover=True).change == held.change
    assert held.promote(1, B, sentinel_failover=True).slots == held.slots
    held_one = topology.hold_group(1, {"op": "promote", "group": 1, "server": B, "step": "held"})
    refused(409, lambda: held_one.promote(1, B, sentinel_failover=True), "in progress")
    refused(409, lambda: topology.promote(1, A, sentinel_failover=True), "already the master")


def test_sentinels() -> None:
    topology = two_groups().add_sentinel(D)
    refused(409, lambda: topology.add_sentinel(D), "already")
    refused(404, lambda: topology.remove_sentinel(A), "not listed")
    assert topology.remove_sentinel(D).sentinels == ()


def test_frozen() -> None:
    topology = two_groups()
    with pytest.raises(AttributeError):
        topology.generation = 5
    assert Group(1, (A,)).master == A and Group(2).master is None
