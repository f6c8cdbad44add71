"""The dashboard controller on a real file coordinator and real redis-server / memcached processes.

Proxies are fake registrations (tests/integration/dashboard_harness.py): an
Ephemeral in a session of its own that the test acknowledges by hand, or
that acknowledges every generation it sees.  The promote tests are in
test_dashboard_promote.py.
"""

from __future__ import annotations

import json

import pytest

from tests.integration.dashboard_harness import Harness, fast_sync, replication, wait_replicating
from tests.servers import wait_until
from twinproxy.dashboard.errors import ControllerError, LockHeld


@pytest.fixture
def harness(reactor, tmp_path):
    made = Harness(reactor, tmp_path / "coordinator")
    yield made
    made.close()


# -- start, lock, status ---------------------------------------------------------------


def test_start_creates_the_topology_and_status_has_the_contract_shape(harness) -> None:
    controller = harness.controller()
    stored = harness.stored()
    assert (stored.cluster, stored.protocol, stored.generation, stored.offline_slots) == ("shop", "redis", 0, 1024)
    status = controller.status()
    for key in ("cluster", "protocol", "generation", "groups", "slots", "offline_slots", "slots_per_group",
                "proxies", "sentinels", "dashboard", "change"):
        assert key in status, key
    assert status["slots"] == [{"first": 0, "last": 1023, "group": None, "state": "stable"}]
    assert status["dashboard"]["addr"] == "127.0.0.1:18080" and status["writable"] is True
    lock = harness.call(harness.coordinators[0].get, "/clusters/shop/dashboard")
    assert json.loads(lock.value) == status["dashboard"]
    json.dumps(status)   # all of it is JSON


def test_a_second_controller_gets_lock_held_then_takes_over_when_the_first_stops(harness) -> None:
    first = harness.controller(addr="127.0.0.1:18081")
    second = harness.controller(start=False, addr="127.0.0.1:18082")
    error = harness.launch(second.start).failure()
    assert isinstance(error, LockHeld), repr(error)
    text = str(error)
    assert "127.0.0.1:18081" in text and f"pid {first.dashboard['pid']}" in text
    assert first.dashboard["host"] in text and "expires" in text and "session timeout" in text
    assert error.holder == first.dashboard
    waiting = harness.launch(second.start, wait=True)
    assert harness.launch(first.add_group, 1).wait()["generation"] == 1
    assert not waiting.done and not second.writable
    harness.call(first.stop)
    waiting.wait(10)
    lock = harness.call(harness.coordinators[0].get, "/clusters/shop/dashboard")
    assert second.writable and json.loads(lock.value)["addr"] == "127.0.0.1:18082"
    assert harness.launch(second.add_group, 2).wait()["generation"] == 2


def test_lost_lock_refuses_writes_with_503_and_is_taken_again(harness) -> None:
    first = harness.controller(addr="127.0.0.1:18081")
    second = harness.controller(start=False, addr="127.0.0.1:18082")
    waiting = harness.launch(second.start, wait=True)
    # What the coordinator does when a lost session's lock was re-created by someone else:
    # it forgets the Ephemeral and calls on_lost.
    coordinator = harness.coordinators[0]
    lock = first._lock

    def lose() -> None:
        del coordinator._ephemerals[lock.path]
        lock._ephemeral.on_lost("taken by another session while this session was lost")

    harness.call(coordinator.delete, lock.path)    # as if its session had expired ...
    waiting.wait(10)                                 # ... and the second dashboard took the lock
    harness.call(lose)
    error = harness.fail(first.add_group, 1)
    assert error.status == 503 and "the dashboard lost its lock" in error.message
    assert first.status()["writable"] is False
    assert harness.launch(second.add_group, 7).wait()["generation"] == 1
    harness.call(second.stop)
    wait_until(lambda: first.writable, timeout=10, what="the first dashboard to take its lock again")
    assert first.topology.generation == 1 and first.topology.group(7) is not None   # reread after regaining
    assert harness.launch(first.add_group, 1).wait()["generation"] == 2


def test_a_stored_topology_of_another_protocol_is_refused(harness) -> None:
    first = harness.controller()
    harness.call(first.stop)
    other = harness.controller(start=False, protocol="memcache")
    error = harness.launch(other.start).failure()
    assert isinstance(error, ControllerError) and "redis cluster 'shop'" in str(error)
    assert harness.call(harness.coordinators[0].get, "/clusters/shop/dashboard") is None   # lock released


def test_a_conflicting_write_is_reread_and_redone(harness) -> None:
    controller = harness.controller()
    controller._watches[1].cancel()     # the topology watch: the controller's copy now stays stale
    outside = harness.stored().add_group(5)
    harness.call(harness.coordinators[0].set, "/clusters/shop/topology", outside.to_json())
    assert harness.launch(controller.add_group, 1).wait()["generation"] == 2
    stored = harness.stored()
    assert [group.id for group in stored.groups] == [1, 5] and controller.topology == stored


# -- acknowledgements ---------------------------------------------------------------------


def test_a_write_waits_for_every_proxy(harness) -> None:
    controller = harness.controller()
    one, two = harness.proxy("p1"), harness.proxy("p2")
    wait_until(lambda: len(controller.acks.proxies) == 2, what="the proxies to be seen")
    pending = harness.launch(controller.add_group, 1)
    wait_until(lambda: harness.stored().generation == 1, what="generation 1 written")
    one.ack(1)
    wait_until(lambda: controller.acks.proxies["p1"].generation == 1, what="p1's ack")
    assert not pending.done
    two.ack(1)
    assert pending.wait(10) == {"ok": True, "generation": 1, "group": 1}
    assert [p["id"] for p in controller.status()["proxies"]] == ["p1", "p2"]


def test_a_lagging_proxy_is_named_in_a_504_and_the_change_stays_written(harness) -> None:
    controller = harness.controller(ack_timeout=0.5)
    harness.proxy("fast", auto=True)
    harness.proxy("127.0.0.1:19000-4242")
    wait_until(lambda: len(controller.acks.proxies) == 2, what="the proxies to be seen")
    error = harness.fail(controller.add_group, 1)
    assert error.status == 504 and error.extra == {"lagging": ["127.0.0.1:19000-4242"], "generation": 1}
    assert "127.0.0.1:19000-4242" in error.message and "stays written" in error.message
    assert harness.stored().group(1) is not None and controller.status()["lagging"] == ["127.0.0.1:19000-4242"]


def test_a_proxy_that_leaves_while_waited_for_no_longer_counts(harness) -> None:
    controller = harness.controller()
    gone = harness.proxy("gone")
    wait_until(lambda: "gone" in controller.acks.proxies, what="the proxy to be seen")
    pending = harness.launch(controller.add_group, 1)
    wait_until(lambda: harness.stored().generation == 1, what="generation 1 written")
    assert not pending.done
    gone.leave()
    assert pending.wait(10)["generation"] == 1


def test_operations_run_one_at_a_time_and_a_second_is_refused_with_409(harness) -> None:
    controller = harness.controller()
    slow = harness.proxy("slow")
    wait_until(lambda: "slow" in controller.acks.proxies, what="the proxy to be seen")
    pending = harness.launch(controller.add_group, 1)
    wait_until(lambda: controller.busy is not None, what="the first operation to run")
    error = harness.fail(controller.add_group, 2)
    assert error.status == 409 and "another operation is in progress (add group 1)" in error.message
    slow.ack(1)
    pending.wait(10)
    slow.leave()
    assert harness.launch(controller.add_group, 2).wait()["generation"] == 2


def test_remove_proxy(harness, redis_servers) -> None:
    (live,) = fast_sync(redis_servers(1))
    controller = harness.controller()
    harness.proxy("dead", addr="127.0.0.1:1")
    harness.proxy("alive", addr=live.address)      # something answers PING there
    wait_until(lambda: len(controller.acks.proxies) == 2, what="the proxies to be seen")
    assert harness.fail(controller.remove_proxy, "nobody").status == 404
    error = harness.fail(controller.remove_proxy, "alive")
    assert error.status == 409 and "still answers" in error.message and "force" in error.message
    harness.launch(controller.remove_proxy, "dead").wait()
    harness.launch(controller.remove_proxy, "alive", force=True).wait()
    wait_until(lambda: not controller.acks.proxies, what="both registrations to go")


# -- groups, servers, slots on real servers ------------------------------------------------------


def test_groups_servers_and_slots_with_real_redis(harness, redis_servers) -> None:
    master, replica, other = fast_sync(redis_servers(3))
    controller = harness.controller()
    harness.proxy("p1", auto=True)
    run = lambda function, *args, **kwargs: harness.launch(function, *args, **kwargs).wait()  # noqa: E731
    run(controller.add_group, 1)
    assert run(controller.add_server, 1, master.address)["role"] == "master"
    assert replication(master)["role"] == "master"
    added = run(controller.add_server, 1, replica.address)
    assert added["role"] == "replica" and any("REPLICAOF" in note for note in added["notes"])
    wait_replicating(replica, master)
    assert harness.fail(controller.add_server, 1, replica.address).status == 409
    assert harness.fail(controller.assign_slots, 0, 511, 2).status == 404
    run(controller.add_group, 2)
    error = harness.fail(controller.assign_slots, 0, 511, 2)
    assert error.status == 409 and "no servers" in error.message
    run(controller.add_server, 2, other.address)
    assert run(controller.assign_slots, 0, 511, 1)["slots"] == [
        {"first": 0, "last": 511, "group": 1, "state": "stable"}]
    error = harness.fail(controller.assign_slots, 500, 600, 2)
    assert error.status == 409 and "group 1 owns 500-511" in error.message
    run(controller.assign_slots, 500, 600, 2, force=True)
    assert harness.fail(controller.remove_group, 1).status == 409
    error = harness.fail(controller.remove_server, 1, master.address)
    assert error.status == 409 and "promote a replica first" in error.message
    assert harness.fail(controller.remove_server, 2, master.address).status == 404

    def polled() -> bool:
        groups = controller.status()["groups"]
        servers = [server for group in groups for server in group["servers"]]
        return all(server["up"] for server in servers) and [s["actual_role"] for s in groups[0]["servers"]] == [
            "master", "replica"]

    wait_until(polled, timeout=10, what="the poller to see every server")
    status = controller.status()
    assert status["groups"][0]["servers"][1] == {**status["groups"][0]["servers"][1], "addr": replica.address,
                                                 "role": "replica", "up": True, "replicates": master.address}
    assert status["slots_per_group"] == {"1": 500, "2": 101} and status["offline_slots"] == 423
    assert status["proxies"][0]["generation"] == status["generation"] == harness.stored().generation
    other.stop()
    wait_until(lambda: not controller.status()["groups"][1]["servers"][0]["up"], timeout=10,
               what="the poller to see a server down")


def test_a_server_that_already_replicates_the_master_is_not_told_again(harness, redis_servers) -> None:
    master, replica = fast_sync(redis_servers(2))
    replica.client().replicaof("127.0.0.1", master.port)
    wait_replicating(replica, master)
    controller = harness.controller()
    harness.launch(controller.add_group, 1).wait()
    harness.launch(controller.add_server, 1, master.address).wait()
    added = harness.launch(controller.add_server, 1, replica.address).wait()
    assert added["notes"] == [f"{replica.address} already replicates {master.address}"]
    assert replication(replica)["master_link_status"] == "up"    # no resync was forced


def test_adding_an_unreachable_replica_is_refused_with_502(harness, redis_servers) -> None:
    (master,) = fast_sync(redis_servers(1))
    controller = harness.controller(command_timeout=0.5)
    harness.launch(controller.add_group, 1).wait()
    harness.launch(controller.add_server, 1, master.address).wait()
    error = harness.fail(controller.add_server, 1, "127.0.0.1:1")
    assert error.status == 502 and "127.0.0.1:1" in error.message
    assert harness.stored().group(1).servers == (master.address,)


def test_rebalance_places_offline_slots_and_queues_the_moves(harness, redis_servers) -> None:
    one, two, three = fast_sync(redis_servers(3))
    controller = harness.controller()
    run = lambda function, *args, **kwargs: harness.launch(function, *args, **kwargs).wait()  # noqa: E731
    for gid, server in ((1, one), (2, two)):
        run(controller.add_group, gid)
        run(controller.add_server, gid, server.address)
    run(controller.assign_slots, 0, 699, 1)
    assert harness.fail(controller.rebalance, keys_per_second=0).status == 400
    dry = run(controller.rebalance, dry_run=True)
    assert dry["applied"] is False and dry["generation"] == harness.stored().generation and dry["migrations"] == []
    assert dry["placements"] == [{"first": 700, "last": 1023, "group": 2}]
    assert dry["moves"] == [{"first": 512, "last": 699, "from_group": 1, "group": 2}] and "notes" not in dry
    done = run(controller.rebalance, keys_per_second=1000)
    assert done["applied"] is True and done["generation"] == dry["generation"] + 2      # placed, then queued
    (m,) = done["migrations"]
    assert (m["id"], m["first"], m["last"], m["from_group"], m["to_group"], m["state"], m["keys_per_second"]) == (
        1, 512, 699, 1, 2, "pending", 1000)
    wait_until(lambda: harness.stored().migration(1).state == "finished", timeout=30, what="the migration to end")
    assert harness.stored().slot_counts() == {1: 512, 2: 512}
    again = run(controller.rebalance)
    assert again["applied"] is False and again["plan"] == [] and again["migrations"] == []
    run(controller.add_group, 3)      # no server: it takes no part
    assert run(controller.rebalance)["plan"] == []


def test_memcache_cluster(harness, memcached_servers) -> None:
    first, second = memcached_servers(2)
    controller = harness.controller(protocol="memcache")
    run = lambda function, *args, **kwargs: harness.launch(function, *args, **kwargs).wait()  # noqa: E731
    run(controller.add_group, 1)
    run(controller.add_server, 1, first.address)
    assert run(controller.add_server, 1, second.address)["role"] == "master"    # every server serves
    run(controller.assign_slots, 0, 1023, 1)
    assert harness.fail(controller.promote, 1, second.address).status == 409
    run(controller.remove_server, 1, first.address)     # another server is left to serve
    wait_until(lambda: all(s["up"] for s in controller.status()["groups"][0]["servers"]), timeout=10,
               what="memcached to be seen up")


def test_a_memcache_rebalance_places_the_offline_slots_and_queues_warm_ups(harness, memcached_servers) -> None:
    first, second = memcached_servers(2)
    controller = harness.controller(protocol="memcache")
    run = lambda function, *args, **kwargs: harness.launch(function, *args, **kwargs).wait()  # noqa: E731
    for gid, server in ((1, first), (2, second)):
        run(controller.add_group, gid)
        run(controller.add_server, gid, server.address)
    run(controller.assign_slots, 0, 767, 1)
    done = run(controller.rebalance)
    assert done["applied"] is True
    assert done["placements"] == [{"first": 768, "last": 1023, "group": 2}]
    assert done["moves"] == [{"first": 512, "last": 767, "from_group": 1, "group": 2}]
    (queued,) = done["migrations"]
    assert (queued["first"], queued["last"], queued["to_group"], queued["warmup_seconds"]) == (512, 767, 2, 60)
