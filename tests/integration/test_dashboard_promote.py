"""The controller's promote (Codis's two-phase barrier) and Sentinel configuration, on real servers.

A fake proxy that acknowledges every generation it sees stands for the
proxies; what it saw shows the barrier: the group's slots held, then the
new order with the slots stable.  Faults (a write that fails or lands
without its reply, a command whose reply is lost) go in through the
harness's ``Faults`` seam; each such test checks that the dashboard ends
with the slots released or the promote done without anyone running it again.
"""

from __future__ import annotations

import pytest

from tests.integration.dashboard_harness import (
    Faults,
    Harness,
    Relay,
    coordinator_timeout,
    fast_sync,
    replication,
    server_timeout,
    wait_replicating,
    writing,
)
from tests.sentinel_servers import SentinelServer
from tests.servers import wait_until

KEYS = 300


@pytest.fixture
def harness(reactor, tmp_path):
    made = Harness(reactor, tmp_path / "coordinator")
    yield made
    made.close()


def run(harness, function, *args, **kwargs):
    return harness.launch(function, *args, **kwargs).wait()


def group_of(harness, controller, master, replica, slots=True):
    """Group 1 = master + replica (told REPLICAOF by the controller), owning every slot."""
    run(harness, controller.add_group, 1)
    run(harness, controller.add_server, 1, master.address)
    run(harness, controller.add_server, 1, replica.address)
    if slots:
        run(harness, controller.assign_slots, 0, 1023, 1)


def write_keys(server, prefix="k"):
    client = server.client()
    pipe = client.pipeline(transaction=False)
    for i in range(KEYS):
        pipe.set(f"{prefix}{i}", f"v{i}")
    pipe.execute()


def has_keys(server, prefix="k"):
    values = server.client().mget([f"{prefix}{i}" for i in range(KEYS)])
    return values == [f"v{i}".encode() for i in range(KEYS)]


def test_promote_moves_the_master_through_the_barrier(harness, redis_servers) -> None:
    master, replica = fast_sync(redis_servers(2))
    controller = harness.controller()
    proxy = harness.proxy("p1", auto=True)
    group_of(harness, controller, master, replica)
    wait_replicating(replica, master)
    write_keys(master)
    before = harness.stored().generation
    result = run(harness, controller.promote, 1, replica.address)
    assert result["ok"] and result["generation"] == before + 2
    assert result["master"] == replica.address and result["old_master"] == master.address
    assert result["repointed"] == [master.address] and result["catch_up"]["replica_offset"] >= 0
    # Every write the old master acknowledged is on the new one, which is a master now.
    assert replication(replica)["role"] == "master" and has_keys(replica)
    wait_replicating(master, replica)
    replica.client().set("after", "promote")
    wait_until(lambda: master.client().get("after") == b"promote", what="the old master to follow the new")
    stored = harness.stored()
    assert stored.group(1).servers == (replica.address, master.address) and stored.change is None
    assert stored.runs() == [{"first": 0, "last": 1023, "group": 1, "state": "stable"}]
    # The proxy saw the hold first, then the new master with the slots released.
    wait_until(lambda: proxy.generation == stored.generation, what="the proxy's last ack")
    held = next(t for t in proxy.seen if t.generation == before + 1)
    assert held.change == {"op": "promote", "group": 1, "server": replica.address, "step": "held"}
    assert held.runs() == [{"first": 0, "last": 1023, "group": 1, "state": "held"}]
    assert held.group(1).servers == (master.address, replica.address)
    assert proxy.seen[-1].group(1).servers == (replica.address, master.address)
    wait_until(lambda: [s["actual_role"] for s in controller.status()["groups"][0]["servers"]] ==
               ["master", "replica"], timeout=10, what="the poller to see the new roles")


def test_promote_refuses_a_server_that_does_not_replicate_the_master_and_releases(harness, redis_servers) -> None:
    master, replica = fast_sync(redis_servers(2))
    controller = harness.controller()
    harness.proxy("p1", auto=True)
    group_of(harness, controller, master, replica)
    replica.client().replicaof("NO", "ONE")
    before = harness.stored()
    error = harness.fail(controller.promote, 1, replica.address)
    assert error.status == 409 and "is a master itself" in error.message and "hold is released" in error.message
    after = harness.stored()
    assert after.generation == before.generation + 2          # the hold, then its release
    assert after.groups == before.groups and after.slots == before.slots and after.change is None
    assert replication(master)["role"] == "master"


def test_promote_waits_for_the_replica_to_catch_up(harness, redis_servers) -> None:
    master, replica = fast_sync(redis_servers(2))
    relay = Relay(master.port)       # the replica's link to its master goes through it
    try:
        replica.client().replicaof("127.0.0.1", relay.port)
        wait_until(lambda: replication(replica).get("master_link_status") == "up", timeout=10,
                   what="the replica to sync through the relay")
        controller = harness.controller(catchup_timeout=0.5)
        harness.proxy("p1", auto=True)
        group_of(harness, controller, master, replica)
        assert replication(replica)["master_port"] == relay.port   # seen as replicating (the master lists it)
        relay.pause()
        write_keys(master)
        error = harness.fail(controller.promote, 1, replica.address)
        assert error.status == 409 and "did not catch up" in error.message, error.message
        assert "hold is released" in error.message
        assert harness.stored().group(1).servers == (master.address, replica.address)
        assert replication(replica)["role"] == "slave"
        relay.resume()
        run(harness, controller.promote, 1, replica.address)
        assert has_keys(replica) and harness.stored().group(1).master == replica.address
    finally:
        relay.close()


def test_promote_with_the_old_master_dead(harness, redis_servers) -> None:
    master, replica = fast_sync(redis_servers(2))
    controller = harness.controller(command_timeout=0.5)
    harness.proxy("p1", auto=True)
    group_of(harness, controller, master, replica)
    wait_replicating(replica, master)
    write_keys(master)
    wait_until(lambda: has_keys(replica), what="the keys on the replica")
    master.kill()
    result = run(harness, controller.promote, 1, replica.address)
    assert "unreachable" in result["catch_up"]["old_master"]
    assert result["repointed"] == [] and any(master.address in p for p in result["problems"])
    assert replication(replica)["role"] == "master" and has_keys(replica)
    assert harness.stored().group(1).servers == (replica.address, master.address)


def test_a_proxy_that_does_not_ack_the_hold_abandons_the_promote(harness, redis_servers) -> None:
    master, replica = fast_sync(redis_servers(2))
    controller = harness.controller(ack_timeout=0.5)
    group_of(harness, controller, master, replica)
    harness.proxy("stuck", generation=harness.stored().generation)
    wait_until(lambda: "stuck" in controller.acks.proxies, what="the proxy to be seen")
    error = harness.fail(controller.promote, 1, replica.address)
    assert error.status == 504 and error.extra["lagging"] == ["stuck"]
    assert "abandoned" in error.message and "released" in error.message
    stored = harness.stored()
    assert stored.change is None and stored.group(1).master == master.address
    assert stored.runs()[0]["state"] == "stable" and replication(replica)["role"] == "slave"


def test_promote_refusals(harness, redis_servers) -> None:
    master, replica = fast_sync(redis_servers(2))
    controller = harness.controller()
    group_of(harness, controller, master, replica, slots=False)
    assert harness.fail(controller.promote, 2, replica.address).status == 404
    assert harness.fail(controller.promote, 1, "127.0.0.1:1").status == 404
    assert harness.fail(controller.promote, 1, master.address).status == 409
    run(harness, controller.promote, 1, replica.address)     # a group without slots: still fine
    assert harness.stored().group(1).master == replica.address


def test_an_interrupted_promote_is_finished_by_the_next_dashboard(harness, redis_servers) -> None:
    master, replica = fast_sync(redis_servers(2))
    first = harness.controller()
    group_of(harness, first, master, replica)
    wait_replicating(replica, master)
    write_keys(master)
    # The first dashboard wrote the hold and died before the switch.
    step = {"op": "promote", "group": 1, "server": replica.address, "step": "held"}
    harness.call(first.write, lambda t: t.hold_group(1, step))
    harness.call(first.stop)
    second = harness.controller()
    wait_until(lambda: harness.stored().change is None, timeout=15, what="the promote to be finished")
    assert harness.stored().group(1).master == replica.address and has_keys(replica)
    wait_until(lambda: second.busy is None, what="the resumed promote to end")
    assert run(harness, second.add_group, 2)["ok"]


def test_sentinels_monitor_each_group_master_and_follow_a_promote(harness, redis_servers, tmp_path) -> None:
    master, replica = fast_sync(redis_servers(2))
    sentinel = SentinelServer(tmp_path / "sentinel", masters=[]).start()
    try:
        controller = harness.controller()
        harness.proxy("p1", auto=True)
        group_of(harness, controller, master, replica)
        added = run(harness, controller.add_sentinel, sentinel.address)
        assert added["monitored"] == ["shop-1"] and added["problems"] == []
        assert harness.stored().sentinels == (sentinel.address,)
        info = sentinel.master_info("shop-1")
        assert info["port"] == str(master.port) and info["quorum"] == "1"
        assert info["down-after-milliseconds"] == "5000" and info["failover-timeout"] == "60000"
        assert harness.fail(controller.add_sentinel, sentinel.address).status == 409
        wait_until(lambda: controller.status()["sentinel_status"] == [
            {"addr": sentinel.address, "up": True, "error": None}], timeout=10, what="the sentinel seen up")
        promoted = run(harness, controller.promote, 1, replica.address)
        # Verified before the slots were released: the sentinel (all of them: a majority) names the new master.
        assert promoted["sentinels"] == [sentinel.address]
        assert sentinel.master_info("shop-1")["port"] == str(replica.port)
        removed = run(harness, controller.remove_sentinel, sentinel.address)
        assert removed["unmonitored"] == ["shop-1"] and harness.stored().sentinels == ()
        assert "shop-1" not in sentinel.masters_info()
        assert harness.fail(controller.remove_sentinel, sentinel.address).status == 404
    finally:
        sentinel.stop()


# -- faults: the dashboard finishes or releases a promote by itself ------------------------------


def promoted(harness, master, replica) -> bool:
    stored = harness.stored()
    return stored.change is None and stored.group(1).servers == (replica.address, master.address)


def test_a_final_write_that_fails_is_finished_by_the_dashboard_itself(harness, redis_servers) -> None:
    master, replica = fast_sync(redis_servers(2))
    controller = harness.controller()
    harness.proxy("p1", auto=True)
    group_of(harness, controller, master, replica)
    wait_replicating(replica, master)
    write_keys(master)
    writes = Faults(controller.coordinator, "set")
    writes.fail(writing(lambda t: t.change is None and t.group(1).master == replica.address), coordinator_timeout)
    error = harness.fail(controller.promote, 1, replica.address)
    assert error.status == 503 and "stay held" in error.message and "by itself" in error.message, error.message
    assert len(writes.failed) == 1
    wait_until(lambda: promoted(harness, master, replica), timeout=10, what="the dashboard to finish the promote")
    assert harness.stored().runs() == [{"first": 0, "last": 1023, "group": 1, "state": "stable"}]
    assert replication(replica)["role"] == "master" and has_keys(replica)
    wait_until(lambda: controller.busy is None, what="the recovery to end")
    assert run(harness, controller.add_group, 2)["ok"]


def test_a_final_write_that_lands_without_its_reply_is_not_written_twice(harness, redis_servers) -> None:
    master, replica = fast_sync(redis_servers(2))
    controller = harness.controller()
    harness.proxy("p1", auto=True)
    group_of(harness, controller, master, replica)
    before = harness.stored().generation
    writes = Faults(controller.coordinator, "set")
    writes.fail(writing(lambda t: t.change is None and t.group(1).master == replica.address), coordinator_timeout,
                landed=True)
    assert harness.fail(controller.promote, 1, replica.address).status == 503
    assert promoted(harness, master, replica) and harness.stored().generation == before + 2
    wait_until(lambda: controller.topology == harness.stored() and controller.busy is None,
               what="the dashboard to read what landed")
    assert harness.stored().generation == before + 2


def test_a_hold_write_that_lands_without_its_reply_is_released(harness, redis_servers) -> None:
    master, replica = fast_sync(redis_servers(2))
    controller = harness.controller()
    harness.proxy("p1", auto=True)
    group_of(harness, controller, master, replica)
    before = harness.stored()
    writes = Faults(controller.coordinator, "set")
    writes.fail(writing(lambda t: t.change is not None), coordinator_timeout, landed=True)
    error = harness.fail(controller.promote, 1, replica.address)
    assert error.status == 503 and "abandoned" in error.message and "hold is released" in error.message
    after = harness.stored()
    assert after.generation == before.generation + 2 and after.change is None and after.groups == before.groups
    assert after.slots == before.slots and replication(replica)["role"] == "slave"


def test_a_hold_whose_outcome_cannot_be_read_is_released_when_it_can(harness, redis_servers) -> None:
    master, replica = fast_sync(redis_servers(2))
    controller = harness.controller()
    harness.proxy("p1", auto=True)
    group_of(harness, controller, master, replica)
    before = harness.stored()
    writes = Faults(controller.coordinator, "set")
    writes.fail(writing(lambda t: t.change is not None), coordinator_timeout, landed=True)
    reads = Faults(controller.coordinator, "get")
    reads.fail(lambda path: path.endswith("/topology"), coordinator_timeout)
    error = harness.fail(controller.promote, 1, replica.address)
    assert error.status == 503 and "not known" in error.message, error.message
    wait_until(lambda: harness.stored().generation == before.generation + 2, timeout=10,
               what="the dashboard to release the hold")
    after = harness.stored()
    assert after.change is None and after.groups == before.groups and after.slots == before.slots
    assert replication(replica)["role"] == "slave"


def test_a_failed_release_is_retried_and_not_turned_into_a_promote(harness, redis_servers) -> None:
    master, replica = fast_sync(redis_servers(2))
    controller = harness.controller()
    harness.proxy("p1", auto=True)
    group_of(harness, controller, master, replica)
    replica.client().replicaof("NO", "ONE")         # refused: it is a master itself
    before = harness.stored()
    writes = Faults(controller.coordinator, "set")
    writes.fail(writing(lambda t: t.change is None), coordinator_timeout)     # the release
    error = harness.fail(controller.promote, 1, replica.address)
    assert error.status == 409 and "releasing the hold failed too" in error.message, error.message
    wait_until(lambda: harness.stored().change is None, timeout=10, what="the dashboard to release the hold")
    after = harness.stored()
    assert after.generation == before.generation + 2 and after.groups == before.groups
    assert after.slots == before.slots


def test_a_dashboard_that_lost_its_lock_stops_before_the_switch(harness, redis_servers) -> None:
    master, replica = fast_sync(redis_servers(2))
    first = harness.controller(addr="127.0.0.1:18081", ack_timeout=15.0)
    group_of(harness, first, master, replica)
    wait_replicating(replica, master)
    proxy = harness.proxy("p1", generation=harness.stored().generation)
    wait_until(lambda: "p1" in first.acks.proxies, what="the proxy to be seen")
    commands = Faults(first.admin, "command")
    sentinel_commands = Faults(first.sentinel_admin, "command")
    pending = harness.launch(first.promote, 1, replica.address)
    wait_until(lambda: harness.stored().change is not None, what="the hold to be written")
    # While it waits for the hold's acknowledgement, another dashboard takes the lock.
    second = harness.controller(start=False, addr="127.0.0.1:18082")
    waiting = harness.launch(second.start, wait=True)
    coordinator, lock = harness.coordinators[0], first._lock
    harness.call(coordinator.delete, lock.path)
    waiting.wait(10)

    def lose() -> None:
        del coordinator._ephemerals[lock.path]
        lock._ephemeral.on_lost("taken by another session while this session was lost")

    harness.call(lose)
    proxy.ack(harness.stored().generation)
    error = pending.failure()
    assert error.status == 503 and "stopped before REPLICAOF NO ONE" in error.message, error.message
    assert "lost its lock" in error.message
    assert not [call for call in commands.calls if call[1] in (b"REPLICAOF", b"SENTINEL")], commands.calls
    assert sentinel_commands.calls == []
    # The dashboard holding the lock finishes the promote.
    wait_until(lambda: promoted(harness, master, replica), timeout=15, what="the second dashboard to finish it")
    proxy.ack(harness.stored().generation)
    assert replication(replica)["role"] == "master"


def test_an_old_master_that_does_not_answer_in_time_stops_the_promote(harness, redis_servers) -> None:
    master, replica = fast_sync(redis_servers(2))
    controller = harness.controller(command_timeout=0.5)
    harness.proxy("p1", auto=True)
    group_of(harness, controller, master, replica)
    wait_replicating(replica, master)
    before = harness.stored()
    master.freeze()                 # alive, holding whatever it has, but silent
    try:
        error = harness.fail(controller.promote, 1, replica.address)
    finally:
        master.thaw()
    assert error.status == 502 and f"cannot tell what the master {master.address} has" in error.message
    assert "hold is released" in error.message
    after = harness.stored()
    assert after.change is None and after.groups == before.groups and replication(replica)["role"] == "slave"


def test_a_replicaof_no_one_whose_reply_is_lost_is_checked(harness, redis_servers) -> None:
    master, replica = fast_sync(redis_servers(2))
    controller = harness.controller()
    harness.proxy("p1", auto=True)
    group_of(harness, controller, master, replica)
    wait_replicating(replica, master)
    commands = Faults(controller.admin, "command")

    def no_one(address, *args):
        return address == replica.address and args == (b"REPLICAOF", b"NO", b"ONE")

    # Not done, reply lost: it is still a replica, so the promote is abandoned and the hold released.
    commands.fail(no_one, server_timeout(replica.address))
    error = harness.fail(controller.promote, 1, replica.address)
    assert error.status == 502 and "is still a replica" in error.message and "hold is released" in error.message
    assert harness.stored().group(1).master == master.address and replication(replica)["role"] == "slave"
    # Done, reply lost: it is a master now, so the promote goes on rather than leave two masters.
    commands.fail(no_one, server_timeout(replica.address), landed=True)
    result = run(harness, controller.promote, 1, replica.address)
    assert any("is a master now" in problem for problem in result["problems"]), result
    assert promoted(harness, master, replica) and replication(replica)["role"] == "master"
    wait_replicating(master, replica)


def test_with_sentinels_the_slots_stay_held_until_a_majority_names_the_new_master(harness, redis_servers,
                                                                                  tmp_path) -> None:
    master, replica = fast_sync(redis_servers(2))
    sentinel = SentinelServer(tmp_path / "sentinel", masters=[]).start()
    try:
        controller = harness.controller()
        harness.proxy("p1", auto=True)
        group_of(harness, controller, master, replica)
        run(harness, controller.add_sentinel, sentinel.address)
        commands = Faults(controller.sentinel_admin, "command")      # the sentinels' (no data servers' credentials)
        commands.fail(lambda address, *args: args[:2] == (b"SENTINEL", b"MONITOR"), server_timeout(sentinel.address))
        error = harness.fail(controller.promote, 1, replica.address)
        assert error.status == 502 and "only 0 of 1 sentinels name" in error.message, error.message
        assert "stay held" in error.message and replication(replica)["role"] == "master"
        wait_until(lambda: promoted(harness, master, replica), timeout=10, what="the dashboard to finish it")
        assert sentinel.master_address("shop-1") == f"127.0.0.1:{replica.port}"
        asked = [call for call in commands.calls if call[1:3] == (b"SENTINEL", b"GET-MASTER-ADDR-BY-NAME")]
        assert len(asked) == 2          # once failing, once agreeing (before the final write)
    finally:
        sentinel.stop()
