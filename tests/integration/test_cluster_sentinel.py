"""A cluster whose dashboard configures Redis Sentinel (``twinproxy-admin sentinel add``): the
sentinels monitor the group's master as ``<cluster>-<gid>``, and the proxy follows a failover."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.cluster_harness import ClusterProxy, Dashboard, admin, admin_ok, proxies_at, wait_for_status
from tests.sentinel_servers import SentinelServer, ShardServer
from tests.servers import LOOPBACK, wait_until


@pytest.fixture
def processes():
    started = []
    yield started
    for process in started:
        process.stop()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sentinel_add_then_a_failover_is_followed(tmp_path: Path, processes) -> None:
    master = ShardServer(tmp_path / "m", "shop-1").start()
    processes.append(master)
    replica = ShardServer(tmp_path / "r", "shop-1", master_port=master.port).start()
    processes.append(replica)
    sentinels = []
    for index in range(3):
        sentinel = SentinelServer(tmp_path / f"sentinel{index}", masters=[]).start()
        processes.append(sentinel)
        sentinels.append(sentinel)
    wait_until(replica.linked, timeout=20, what="the replica to link")
    url = f"file://{tmp_path / 'coordinator'}"
    dashboard = Dashboard(tmp_path / "dashboard", url, "shop").start()
    processes.append(dashboard)
    for command in (("group", "add", "1"), ("server", "add", "1", master.address),
                    ("server", "add", "1", replica.address), ("slots", "assign", "0-1023", "1")):
        admin_ok(dashboard, *command)
    proxy = ClusterProxy(tmp_path / "proxy", url, "shop", processes=processes).start()
    wait_for_status(dashboard, lambda s: proxies_at(s, 1), what="the proxy at the generation")
    # One client connection, made before the sentinels are added, used throughout.
    client = redis.Redis(host=LOOPBACK, port=proxy.port, socket_timeout=5, protocol=2,
                         retry=Retry(NoBackoff(), 0), single_connection_client=True)
    assert client.set("before", b"1")
    for sentinel in sentinels:
        admin_ok(dashboard, "sentinel", "add", sentinel.address)
    for sentinel in sentinels:
        assert sentinel.master_address("shop-1") == master.address
    wait_for_status(dashboard, lambda s: proxies_at(s, 1), what="the proxy at the sentinels' generation")
    wait_until(lambda: proxy.stats()["shop"]["shop-1"].get("role") == "master", timeout=20,
               what="the proxy to follow the sentinels' master")
    assert client.set("with-sentinels", b"1")   # the same connection: the pool was not replaced
    assert redis.Redis(host=LOOPBACK, port=master.port).get("with-sentinels") == b"1"

    # A promote by the dashboard while the sentinels watch: the proxy follows it, no error.
    admin_ok(dashboard, "server", "promote", "1", replica.address)
    assert replica.role() == "master"
    assert client.set("promoted", b"1")
    assert redis.Redis(host=LOOPBACK, port=replica.port).get("promoted") == b"1"

    # A failover by Sentinel itself: followed too (the new master is the old one).
    wait_until(master.linked, timeout=20, what="the old master to replicate the new one")
    sentinels[0].call("SENTINEL", "FAILOVER", "shop-1")
    wait_until(lambda: master.role() == "master", timeout=30, what="Sentinel to fail over back")

    def written_on_new_master() -> bool:
        try:
            client.set("after", b"2")
        except redis.RedisError:
            return False
        return redis.Redis(host=LOOPBACK, port=master.port).get("after") == b"2"

    wait_until(written_on_new_master, timeout=30, what="writes through the proxy to reach the new master")
    refused = admin(dashboard, "sentinel", "remove", "127.0.0.1:1")
    assert refused.returncode == 1 and refused.stderr.strip()
