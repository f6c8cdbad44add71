"""A memcached cluster end to end on the file coordinator: groups of memcached servers, a
dashboard, two proxy processes and pymemcache; plus the proxy's life before and after its
topology (not ready, offline slots) and a Redis cluster through ``twinproxy.client``."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import redis
from pymemcache.client.base import Client as MemcacheClient

from tests.cluster_harness import ClusterProxy, Dashboard, admin_ok, proxies_at, status_json, wait_for_status
from tests.cluster_harness import independent_slot as slot
from tests.servers import LOOPBACK, wait_until


@pytest.fixture
def processes():
    started = []
    yield started
    for process in started:
        process.stop()


@pytest.mark.timeout(120)
def test_memcached_groups_through_two_proxies(tmp_path: Path, memcached_servers, processes) -> None:
    url = f"file://{tmp_path / 'coordinator'}"
    a1, a2, b1 = memcached_servers(3)
    dashboard = Dashboard(tmp_path / "dashboard", url, "cache", protocol="memcache").start()
    try:
        proxies = [ClusterProxy(tmp_path / f"proxy{i}", url, "cache", redis=False, processes=processes).start()
                   for i in range(2)]
        client = MemcacheClient((LOOPBACK, proxies[0].port), timeout=5)
        assert "not ready" in _server_error(client, b"k") or "offline" in _server_error(client, b"k")
        for command in (("group", "add", "1"), ("server", "add", "1", a1.address), ("server", "add", "1", a2.address),
                        ("group", "add", "2"), ("server", "add", "2", b1.address),
                        ("slots", "assign", "0-499", "1"), ("slots", "assign", "500-999", "2")):
            admin_ok(dashboard, *command)
        wait_for_status(dashboard, lambda s: proxies_at(s, 2), what="two proxies at the generation")
        status = status_json(dashboard)
        assert [r["group"] for r in status["slots"]] == [1, 2, None]

        writer = MemcacheClient((LOOPBACK, proxies[0].port), timeout=5)
        reader = MemcacheClient((LOOPBACK, proxies[1].port), timeout=5)
        keys = [f"key{i}".encode() for i in range(300)]
        online = [key for key in keys if slot(key) < 1000]
        for key in online:
            assert writer.set(key, b"v" + key, noreply=False)
        assert reader.get_many(online[:50]) == {key: b"v" + key for key in online[:50]}
        group1 = [MemcacheClient((LOOPBACK, s.port), timeout=5) for s in (a1, a2)]
        group2 = MemcacheClient((LOOPBACK, b1.port), timeout=5)
        used = set()
        for key in online:
            on1 = [index for index, c in enumerate(group1) if c.get(key) is not None]
            on2 = group2.get(key) is not None
            if slot(key) < 500:
                assert len(on1) == 1 and not on2, key
                used.add(on1[0])
            else:
                assert on1 == [] and on2, key
        assert used == {0, 1}   # both servers of group 1 serve some of its slots
        offline = next(key for key in keys if slot(key) >= 1000)
        assert "offline" in _server_error(writer, offline)
    finally:
        dashboard.stop()


def _server_error(client: MemcacheClient, key: bytes) -> str:
    try:
        client.get(key)
    except Exception as err:  # noqa: BLE001 - pymemcache raises MemcacheServerError
        return str(err)
    raise AssertionError(f"get {key!r} did not fail")


@pytest.mark.timeout(120)
def test_redis_client_on_the_discovered_pool_survives_a_killed_proxy(tmp_path: Path, redis_servers,
                                                                     processes) -> None:
    from twinproxy.client import redis_pool

    url = f"file://{tmp_path / 'coordinator'}"
    (server,) = redis_servers(1)
    dashboard = Dashboard(tmp_path / "dashboard", url, "shop").start()
    pool = None
    try:
        for command in (("group", "add", "1"), ("server", "add", "1", server.address),
                        ("slots", "assign", "0-1023", "1")):
            admin_ok(dashboard, *command)
        proxies = [ClusterProxy(tmp_path / f"proxy{i}", url, "shop", processes=processes).start()
                   for i in range(2)]
        wait_for_status(dashboard, lambda s: proxies_at(s, 2), what="two proxies registered")
        pool = redis_pool(url, "shop", socket_timeout=5)
        client = redis.Redis(connection_pool=pool)
        errors = []
        done = []
        stop = threading.Event()

        def load() -> None:
            number = 0
            while not stop.is_set() and number < 100000:
                try:
                    client.set(f"d:{number}", b"1")
                    done.append(number)
                except redis.RedisError as err:
                    errors.append(repr(err))
                number += 1

        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        wait_until(lambda: len(done) > 100, timeout=20, what="load through the discovered pool")
        proxies[0].kill()
        count = len(done)
        wait_until(lambda: len(done) > count + 300, timeout=20, what="load after a proxy was killed")
        stop.set()
        thread.join(10)
        assert errors == []
        assert redis.Redis(host=LOOPBACK, port=server.port, protocol=2).get("d:1") == b"1"
    finally:
        if pool is not None and hasattr(pool, "close"):
            pool.close()
        dashboard.stop()
