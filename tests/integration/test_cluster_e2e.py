"""Cluster mode end to end, on real ZooKeeper and etcd: a dashboard, two groups (a master and a
replica each), three proxy processes (one with ``--workers 2``) and the admin CLI.

Keys are checked on the backends directly against an independent slot
computation (zlib here, not twinproxy's own); a promote runs under write load;
the coordinator is frozen while the proxies serve; dashboards compete for the lock.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import redis

from tests.cluster_harness import (
    ClusterProxy,
    Dashboard,
    admin,
    admin_ok,
    independent_slot,
    proxies_at,
    status_json,
    wait_for_status,
)
from tests.coordinator_servers import coordinator_url_for
from tests.servers import LOOPBACK, wait_until


def direct(server) -> redis.Redis:
    return redis.Redis(host=LOOPBACK, port=server.port, socket_timeout=5, protocol=2)


def through(proxy: ClusterProxy) -> redis.Redis:
    return redis.Redis(host=LOOPBACK, port=proxy.port, socket_timeout=5, protocol=2)


class Cluster:
    """The scenario's processes, built once per coordinator kind."""

    def __init__(self, tmp_path: Path, url: str, servers, coordinator_server) -> None:
        self.url = url
        self.coordinator_server = coordinator_server
        self.m1, self.r1, self.m2, self.r2 = servers
        self.processes = []
        self.dashboard = Dashboard(tmp_path / "dashboard", url, "shop")
        self.tmp_path = tmp_path
        self.proxies = []
        self.dashboards = [self.dashboard]   # every one started, stopped at the end

    def build(self) -> "Cluster":
        self.dashboard.start()
        for command in (("group", "add", "1"), ("server", "add", "1", self.m1.address),
                        ("server", "add", "1", self.r1.address), ("group", "add", "2"),
                        ("server", "add", "2", self.m2.address), ("server", "add", "2", self.r2.address),
                        ("slots", "assign", "0-511", "1"), ("slots", "assign", "512-1023", "2")):
            admin_ok(self.dashboard, *command)
        for index, workers in enumerate((1, 1, 2)):
            proxy = ClusterProxy(self.tmp_path / f"proxy{index}", self.url, "shop", workers=workers,
                                 processes=self.processes)
            self.proxies.append(proxy.start())
        wait_for_status(self.dashboard, lambda s: proxies_at(s, 3), what="three proxies at the generation")
        return self

    def stop(self) -> None:
        for proxy in self.proxies:
            proxy.stop()
        for dashboard in self.dashboards:
            dashboard.stop()


@pytest.fixture(params=["zookeeper", "etcd"])
def cluster(request, tmp_path: Path, redis_servers):
    url = coordinator_url_for(request.param, request, tmp_path)
    servers = redis_servers(4)
    built = Cluster(tmp_path, url, servers, request.getfixturevalue(request.param))
    try:
        yield built.build()
    finally:
        built.stop()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_cluster_on_a_real_coordinator(cluster: Cluster) -> None:
    dashboard = cluster.dashboard

    # -- status --json: the contract scripts rely on ---------------------------------
    status = status_json(dashboard)
    assert status["cluster"] == "shop"
    assert isinstance(status["generation"], int) and status["generation"] >= 8
    groups = {group["id"]: group for group in status["groups"]}
    assert [s["addr"] for s in groups[1]["servers"]] == [cluster.m1.address, cluster.r1.address]
    assert [s["role"] for s in groups[1]["servers"]] == ["master", "replica"]
    assert all(isinstance(s["up"], bool) for g in status["groups"] for s in g["servers"])
    assert [(r["first"], r["last"], r["group"], r["state"]) for r in status["slots"]] == [
        (0, 511, 1, "stable"), (512, 1023, 2, "stable")]
    assert len(status["proxies"]) == 3
    assert {p["addr"] for p in status["proxies"]} == {p.address for p in cluster.proxies}
    assert all(p["generation"] == status["generation"] for p in status["proxies"])

    # -- keys land on the group their slot names, through any proxy --------------------
    clients = [through(proxy) for proxy in cluster.proxies]
    keys = [f"key:{i}".encode() for i in range(300)] + [b"{user1}:a", b"{user1}:b", b"{}x"]
    for index, key in enumerate(keys):
        assert clients[index % 3].set(key, b"v" + key)
    m1, m2 = direct(cluster.m1), direct(cluster.m2)
    for key in keys:
        owner, other = (m1, m2) if independent_slot(key) < 512 else (m2, m1)
        assert owner.get(key) == b"v" + key, key
        assert other.get(key) is None, key
    assert clients[1].mget(keys[:20]) == [b"v" + key for key in keys[:20]]
    with pytest.raises(redis.ResponseError, match="same slot"):   # CROSSSLOT (redis-py keeps the code apart)
        clients[0].rename(b"key:1", b"key:2") if independent_slot(b"key:1") != independent_slot(b"key:2") \
            else clients[0].rename(b"key:1", b"key:3")
    stats = cluster.proxies[0].stats()["shop"]
    assert stats["cluster"] == "shop" and stats["cluster_generation"] == status["generation"]
    assert stats["coordinator_session"] == "connected"

    # -- server promote under write load: no client error, writes on the new master ----
    written = []
    errors = []
    stop = threading.Event()

    def load() -> None:
        client = through(cluster.proxies[0])
        number = 0
        while not stop.is_set() and number < 200000:
            key = f"load:{number}".encode()
            try:
                client.set(key, b"1")
                written.append(key)
            except redis.RedisError as err:
                errors.append(repr(err))
            number += 1

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    wait_until(lambda: len(written) > 200, timeout=20, what="load to run")
    admin_ok(dashboard, "server", "promote", "1", cluster.r1.address)
    count = len(written)
    wait_until(lambda: len(written) > count + 200, timeout=20, what="load to go on after the promote")
    stop.set()
    thread.join(10)
    assert errors == []
    r1 = direct(cluster.r1)
    assert r1.info("replication")["role"] == "master"
    # Every write acknowledged before, during and after the promote is on the new master.
    on_group_1 = [key for key in written if independent_slot(key) < 512]
    assert on_group_1
    missing = [key for key in on_group_1 if not r1.exists(key)]
    assert missing == []
    status = status_json(dashboard)
    groups = {group["id"]: group for group in status["groups"]}
    assert groups[1]["servers"][0]["addr"] == cluster.r1.address
    assert groups[1]["servers"][0]["role"] == "master"
    wait_for_status(dashboard, lambda s: proxies_at(s, 3))

    # -- the coordinator frozen: proxies keep serving the last topology --------------
    server = cluster.coordinator_server
    server.freeze()
    try:
        # Past the session timeout (2 s): the proxies' sessions are suspended, traffic is not.
        frozen_until = time.monotonic() + 3.5
        index = 0
        while time.monotonic() < frozen_until and index < 100000:
            key = f"frozen:{index}".encode()
            assert clients[index % 3].set(key, b"1")
            assert clients[(index + 1) % 3].get(key) == b"1"
            index += 1
        assert index > 100
    finally:
        server.thaw()
    # The sessions expired during the freeze: proxies register again, the dashboard takes its lock again.
    wait_for_status(dashboard, lambda s: proxies_at(s, 3) and s["writable"], timeout=40,
                    what="proxies and the dashboard's lock back after the freeze")

    # -- a second dashboard for the same cluster refuses --------------------------------
    second = Dashboard(cluster.tmp_path / "second", cluster.url, "shop")
    cluster.dashboards.append(second)
    process = second.spawn()
    wait_until(lambda: not process.alive, timeout=30, what="the second dashboard to refuse")
    assert process.proc.returncode == 1
    assert "already has a dashboard" in process.output()

    # -- a killed proxy leaves the list within its session timeout ------------------------
    cluster.proxies[1].kill()
    wait_for_status(dashboard, lambda s: len(s["proxies"]) == 2, timeout=30, what="the killed proxy to leave")

    # -- the dashboard killed: its lock expires and a new one takes over -----------------
    dashboard.kill()
    successor = Dashboard(cluster.tmp_path / "successor", cluster.url, "shop", extra=("--wait",))
    cluster.dashboards.append(successor)
    successor.start(timeout=40)
    cluster.dashboard = successor
    done = admin(successor, "group", "add", "3")
    assert done.returncode == 0, done.stderr
    assert status_json(successor)["generation"] > status["generation"]
