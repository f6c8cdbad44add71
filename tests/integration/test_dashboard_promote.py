"""The controller's promote (Codis's two-phase barrier) and Sentinel configuration, on real servers.

A fake proxy that acknowledges every generation it sees stands for the
proxies; what it saw shows the barrier: the group's slots held, then the
new order with the slots stable.
"""

from __future__ import annotations

import pytest

from tests.integration.dashboard_harness import Harness, Relay, fast_sync, replication, wait_replicating
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
        run(harness, controller.promote, 1, replica.address)
        assert sentinel.master_info("shop-1")["port"] == str(replica.port)
        removed = run(harness, controller.remove_sentinel, sentinel.address)
        assert removed["unmonitored"] == ["shop-1"] and harness.stored().sentinels == ()
        assert "shop-1" not in sentinel.masters_info()
        assert harness.fail(controller.remove_sentinel, sentinel.address).status == 404
    finally:
        sentinel.stop()
