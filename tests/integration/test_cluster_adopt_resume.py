"""An adoption resumed after one of its entries was cancelled: a pool of two redis-servers adopted through a
proxy that switches in place, the first server's entry moving keys slowly while the second's (pending) is
cancelled; a resume is refused while the first runs, and queues the second server again once it has ended
(the rewritten pool file cannot be adopted again: the pool follows the cluster); resumed, every key ends on
its slot's group only, with its value, and reads through the proxy."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
import redis

from tests.cluster_harness import TOKEN, Dashboard, admin, admin_ok, wait_for_status
from tests.cluster_harness import independent_slot as slot
from tests.integration.test_cluster_adopt import hang_up, owners, plain_proxy
from tests.integration.test_cluster_migration import processes  # noqa: F401 - a fixture
from tests.servers import LOOPBACK, wait_until

KEYS = 1200


def entries(dashboard: Dashboard) -> dict:
    return {m["id"]: m for m in json.loads(admin_ok(dashboard, "migration", "status", "--json"))}


def throttle(dashboard: Dashboard, mid: int, keys_per_second) -> None:
    """``POST /api/migrations/<id>/throttle`` (the CLI has no verb for it)."""
    request = urllib.request.Request(f"http://{dashboard.address}/api/migrations/{mid}/throttle", method="POST",
                                     data=json.dumps({"keys_per_second": keys_per_second}).encode(),
                                     headers={"Authorization": f"Bearer {TOKEN}",
                                              "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert json.loads(answer.read())["ok"] is True


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_a_cancelled_entry_is_queued_again_by_a_resume_and_the_adoption_completes(tmp_path: Path, redis_servers,
                                                                                    processes) -> None:  # noqa: F811
    url = f"file://{tmp_path / 'coordinator'}"
    servers = redis_servers(2)
    proxy = plain_proxy(tmp_path, "proxy", url, servers, processes)
    client = redis.Redis(host=LOOPBACK, port=proxy.port, protocol=2)
    keys = [f"k{i}".encode() for i in range(KEYS)]
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.set(key, b"v" + key)
        pipe.execute()
    assert all(server.client().dbsize() > 0 for server in servers)
    dashboard = Dashboard(tmp_path / "dashboard", url, "shop").start()
    processes.append(dashboard)

    # Slow enough that the first server's entry (a quarter of the keys) moves for many seconds.
    adopted = json.loads(admin_ok(dashboard, "adopt", "--pool-file", str(proxy.config), "--pool", "shop",
                                  "--coordinator", url, "--output", str(proxy.config), "--keys-per-second", "20",
                                  "--json"))
    assert [m["from_group"] for m in adopted["migrations"]] == [1, 2] and adopted["resumed"] is False
    hang_up(proxy)
    wait_for_status(dashboard, lambda s: len(s["proxies"]) == 1 and s["proxies"][0]["generation"]
                    >= adopted["generation"], what="the proxy following the cluster")

    admin_ok(dashboard, "migration", "resume", "1")             # only the first: the second stays pending
    wait_until(lambda: entries(dashboard)[1]["state"] == "migrating", timeout=30, what="adoption 1 moving keys")
    admin_ok(dashboard, "migration", "pause", "1")              # from here nothing depends on its pace
    assert entries(dashboard)[2]["state"] == "pending"
    cancelled = admin(dashboard, "migration", "cancel", "2")
    assert cancelled.returncode == 0, cancelled.stderr
    assert entries(dashboard)[2]["state"] == "cancelled"

    # While the first runs, neither form of the resume queues anything.
    for argv in (("adopt", "--resume", "--cluster", "shop"),
                 ("adopt", "--pool-file", str(proxy.config), "--pool", "shop", "--coordinator", url,
                  "--output", str(proxy.config))):
        refused = admin(dashboard, *argv)
        assert refused.returncode == 1 and "adoption 1 (group 1's keys) is migrating" in refused.stderr, (
            refused.stdout + refused.stderr)
    throttle(dashboard, 1, None)
    admin_ok(dashboard, "migration", "resume", "1")
    assert admin(dashboard, "migration", "wait", "1", timeout=60).returncode == 0
    assert [m["state"] for m in entries(dashboard).values()] == ["finished", "cancelled"]

    # Adopted still, group 2's keys where the pool put them: the guards name the command that goes on.
    guarded = admin(dashboard, "slots", "assign", "0-9", "2", "--force")
    assert guarded.returncode == 1 and "twinproxy-admin adopt --resume --cluster shop" in guarded.stderr
    wait_until(lambda: list(proxy.stats()["shop"].get("adopted", {}).values()) == ["done", "legacy"], timeout=10,
               what="the proxy routing the first server's keys by their slots, the second's by the pool")

    resumed = admin(dashboard, "adopt", "--resume", "--cluster", "shop", "--keys-per-second", "5000", "--json")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    answer = json.loads(resumed.stdout)
    assert answer["resumed"] is True and answer["done"] == [1]
    assert [(m["id"], m["from_group"], m["state"], m["paused"], m["keys_per_second"])
            for m in answer["migrations"]] == [(3, 2, "pending", True, 5000)]
    again = admin(dashboard, "adopt", "--resume", "--cluster", "shop")
    assert again.returncode == 1 and "adoption 3 (group 2's keys) is pending" in again.stderr
    admin_ok(dashboard, "migration", "resume")
    assert admin(dashboard, "migration", "wait", timeout=60).returncode == 0

    topology = dashboard.get("/api/topology")
    assert "adopted" not in topology            # every server's keys moved: an ordinary cluster
    assert [m["state"] for m in topology["migrations"]] == ["finished", "cancelled", "finished"]
    status = json.loads(admin_ok(dashboard, "status", "--json"))
    table = owners(status)
    misplaced, found = [], 0
    for group in status["groups"]:
        address = group["servers"][0]["addr"]
        backend = redis.Redis(host=LOOPBACK, port=int(address.rpartition(":")[2]), protocol=2)
        for key in backend.scan_iter(count=1000):
            found += 1
            if table[slot(key)] != group["id"]:
                misplaced.append(key)
    assert misplaced == [] and found == KEYS
    assert all(value == b"v" + key for key, value in zip(keys, client.mget(keys)))
