"""An adoption resumed (twinproxy.cluster.adoptions.resume): after an entry was cancelled or failed, the servers
whose keys have not moved are queued again from the placement the topology keeps; the refusals."""

from __future__ import annotations

from tests.unit.cluster.test_adopt_model import LEGACY, A, B, C, D, adopted, round_trip, run
from tests.unit.cluster.test_model_migration import refused
from twinproxy.cluster import adoptions, migrations
from twinproxy.cluster.migrations import Migration, startable
from twinproxy.cluster.model import Topology


def live(topology: Topology) -> list:
    return [(m.id, m.from_group, m.state, m.keys_per_second) for m in topology.migrations if not m.ended]


def test_a_server_cancelled_while_pending_is_queued_again_once_the_others_ended() -> None:
    topology = adopted()                                       # entries 1, 2, 3: groups 3, 1, 2
    moving = topology.advance_migration(1).advance_migration(1)
    cancelled = moving.cancel_migration(2)                     # group 1's entry, still pending
    refused(409, lambda: adoptions.resume(cancelled), "the adoption of pool 'shop' is under way",
            "adoption 1 (group 3's keys) is migrating", "wait for it to end")
    waiting = cancelled.advance_migration(1)                   # group 3 done, entry 3 pending
    refused(409, lambda: adoptions.resume(waiting), "adoption 3 (group 2's keys) is pending",
            "nothing to queue again")
    ended = run(waiting, 3)
    assert ended.adopt_states() == {3: "done", 1: "legacy", 2: "done"} and ended.adoption is None
    again = round_trip(adoptions.resume(ended, 250))
    assert again.generation == ended.generation + 1
    assert again.slots == ended.slots and again.groups == ended.groups and again.adopted == LEGACY
    assert live(again) == [(4, 1, "pending", 250)]
    assert again.migration(4) == Migration(4, 0, 1023, 1, None, "pending", 250, adopt=True)
    assert startable(again) == [4]
    done = run(again, 4)
    assert done.adopted is None and done.adopt_states() == {}
    refused(409, lambda: adoptions.resume(done), "cluster 'shop' has no adoption to resume",
            "its adoption finished")


def test_every_entry_cancelled_queues_every_server_in_the_pool_s_order() -> None:
    ended = adopted().cancel_migration(1).cancel_migration(2).cancel_migration(3)
    again = round_trip(adoptions.resume(ended, pool="shop"))
    assert live(again) == [(4, 3, "pending", None), (5, 1, "pending", None), (6, 2, "pending", None)]
    assert startable(again) == [4]


def test_a_failed_entry_whose_hold_was_released_is_queued_again() -> None:
    prepared = adopted().advance_migration(1)
    failed = prepared.fail_migration(1, "the groups run different Redis versions")
    failed = failed.cancel_migration(2).cancel_migration(3)
    again = round_trip(adoptions.resume(failed))
    assert [gid for _, gid, _, _ in live(again)] == [3, 1, 2]
    assert again.slots == adopted().slots        # every slot stable at its owner, nothing held


def test_a_resume_keeps_the_adoption_s_rate_unless_told_another() -> None:
    topology = migrations.adopt(Topology.empty("shop", "redis"), LEGACY, [A, B, C], 1500)
    assert adoptions.latest_rate(topology) == 1500
    throttled = migrations.throttle(topology, 3, 900)
    ended = throttled.cancel_migration(1).cancel_migration(2).cancel_migration(3)
    assert adoptions.latest_rate(ended) == 900              # the latest entry's, as throttled
    assert adoptions.latest_rate(Topology.empty("shop", "redis")) is None
    assert {rate for *_, rate in live(adoptions.resume(ended, 40))} == {40}


def test_a_resume_needs_no_pool_file_so_a_promoted_master_does_not_stop_it() -> None:
    ended = adopted().cancel_migration(1).cancel_migration(2).cancel_migration(3)
    promoted = ended.add_server(1, D).promote(1, D)            # group 1's master is not the pool's server now
    refused(409, lambda: migrations.adopt(promoted, LEGACY, [A, B, C]), "adopted pool 'shop' already",
            "its servers are", "adopt --resume --cluster shop")
    again = adoptions.resume(promoted)
    assert [gid for _, gid, _, _ in live(again)] == [3, 1, 2]
    assert again.group(1).master == D


def test_refusals() -> None:
    empty = Topology.empty("shop", "redis")
    refused(409, lambda: adoptions.resume(empty), "cluster 'shop' has no adoption to resume",
            "it has adopted no pool")
    ended = adopted().cancel_migration(1).cancel_migration(2).cancel_migration(3)
    refused(409, lambda: adoptions.resume(ended, pool="cart"), "cluster 'shop' has adopted pool 'shop', not 'cart'")
    refused(400, lambda: adoptions.resume(ended, 0), "keys_per_second")
    prepared = adoptions.resume(ended).advance_migration(4)
    refused(409, lambda: adoptions.resume(prepared), "adoption 4 (group 3's keys) is prepared", "wait for it")
    # Asked twice: the second finds the first's entries queued, and queues nothing twice.
    once = adoptions.resume(ended)
    refused(409, lambda: adoptions.resume(once), "adoption 4 (group 3's keys) is pending")
    refused(409, lambda: migrations.adopt(once, LEGACY, [A, B, C]), "is under way")
