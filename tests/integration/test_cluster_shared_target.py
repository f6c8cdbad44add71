"""A rebalance onto a new group moves from both old groups at once (a target may be shared; a source is
exclusive) under a recorded load through two proxies: both migrations are seen migrating together, the
history checker passes, and afterwards each moved slot's keys are on the new group only."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from tests.cluster_harness import ClusterProxy, Dashboard, admin, admin_ok, proxies_at, wait_for_status
from tests.cluster_harness import independent_slot as slot
from tests.history import check
from tests.integration.test_cluster_migration import finish, keys_in, processes, run_load  # noqa: F401 - a fixture
from tests.servers import LOOPBACK, wait_until


def migrations(dashboard) -> list:
    answer = dashboard.get("/api/migrations")
    return answer["migrations"] if isinstance(answer, dict) else answer


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_rebalance_onto_a_new_group_moves_from_both_old_groups_at_once(tmp_path: Path, redis_servers,
                                                                        processes) -> None:  # noqa: F811
    url = f"file://{tmp_path / 'coordinator'}"
    servers = redis_servers(3)
    dashboard = Dashboard(tmp_path / "dashboard", url, "shop").start()
    processes.append(dashboard)
    for command in (("group", "add", "1"), ("server", "add", "1", servers[0].address),
                    ("group", "add", "2"), ("server", "add", "2", servers[1].address),
                    ("group", "add", "3"), ("server", "add", "3", servers[2].address),
                    ("slots", "assign", "0-511", "1"), ("slots", "assign", "512-1023", "2")):
        admin_ok(dashboard, *command)
    proxies = [ClusterProxy(tmp_path / f"proxy{i}", url, "shop", processes=processes).start() for i in range(2)]
    wait_for_status(dashboard, lambda s: proxies_at(s, len(proxies)), what="the proxies at the generation")
    one, two, three = (redis.Redis(host=LOOPBACK, port=server.port, protocol=2) for server in servers)
    # Codis's even spread for 3 groups: 342-511 of group 1 and 853-1023 of group 2 go to group 3.
    from_one, from_two = keys_in(342, 511, 1500, "a"), keys_in(853, 1023, 1500, "b")
    staying = keys_in(0, 341, 300, "s") + keys_in(512, 852, 300, "t")
    for server, keys in ((one, from_one + [k for k in staying if slot(k) < 512]),
                         (two, from_two + [k for k in staying if slot(k) >= 512])):
        with server.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.set(key, b"v" + key)
            pipe.execute()
    shared = keys_in(342, 511, 8, "shared") + keys_in(853, 1023, 8, "shared") + keys_in(0, 341, 4, "shared")
    loads, history = run_load([p.address for p in proxies], shared, 90)
    wait_until(lambda: len(history) > 300, timeout=30, what="the load to run")
    # Throttled so that each move takes about two seconds: long enough to see them side by side.
    admin_ok(dashboard, "slots", "rebalance", "--keys-per-second", "700")
    plan = migrations(dashboard)
    assert sorted((m["first"], m["last"], m["to_group"]) for m in plan) == [(342, 511, 3), (853, 1023, 3)], plan
    wait_until(lambda: [m["state"] for m in migrations(dashboard)] == ["migrating", "migrating"], timeout=30,
               interval=0.05, what="both migrations migrating at once")
    done = admin(dashboard, "migration", "wait", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    count = len(history)
    wait_until(lambda: len(history) > count + 200, timeout=30, what="the load to go on after the rebalance")
    finish(loads)
    problems = check(history)
    assert problems == [], problems[:10]
    assert [error for load in loads for error in load.errors] == []
    assert [m["state"] for m in migrations(dashboard)] == ["finished", "finished"]
    moved = from_one + from_two
    assert not any(one.exists(key) or two.exists(key) for key in moved)
    assert all(three.get(key) == b"v" + key for key in moved)
    assert all((one if slot(key) < 512 else two).get(key) == b"v" + key for key in staying)
