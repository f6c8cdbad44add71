"""Client discovery (twinproxy.client) over every coordinator, real servers standing in for proxies.

A redis-server or memcached plays each proxy; a child process registers it
under ``/clusters/c/proxies/<id>`` as an ephemeral (as a proxy would), so
killing that process takes the registration away.  Each server holds a
key ``who`` naming itself, which tells where a request went.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Dict, List

import pytest
import redis
from pymemcache.exceptions import MemcacheUnexpectedCloseError

from tests.coordinator_servers import EphemeralHolder
from tests.servers import wait_until
from twinproxy.client import ProxyDirectory, memcache_client, redis_client, redis_pool

pytestmark = pytest.mark.timeout(40)
POLL = 0.1


def registration(address: str, protocol: str) -> str:
    """A proxy registration document (cluster contract §3) for a server at ``address``."""
    return json.dumps({"id": f"{address}-{os.getpid()}", "addr": address, "admin": None, "pid": os.getpid(),
                       "host": socket.gethostname(), "start": time.time(), "version": "test", "protocol": protocol,
                       "generation": 1, "session": "test", "updated": time.time(), "workers": 1})


@pytest.fixture
def register(coordinator_url: str, tmp_path: Path):
    """``register(name, address, protocol)``: a holder process registering ``address`` as proxy ``name``."""
    holders: List[EphemeralHolder] = []

    def start(name: str, address: str, protocol: str) -> EphemeralHolder:
        entries: Dict[str, str] = {f"/clusters/c/proxies/{name}": registration(address, protocol)}
        holder = EphemeralHolder(coordinator_url, entries, tmp_path / f"register-{name}.log")
        holders.append(holder)
        return holder.start()

    yield start
    for holder in holders:
        holder.stop()


def test_redis_pool_follows_proxies_and_retries_on_another(coordinator_url, register, redis_servers):
    first, second = redis_servers(2)
    for server, name in ((first, b"first"), (second, b"second")):
        server.client().set("who", name)
    first_holder = register("p1", first.address, "redis")
    client = redis_client(coordinator_url, "c", poll_interval=POLL, socket_timeout=2, protocol=2)
    pool = client.connection_pool
    try:
        assert pool.proxies.addresses() == [first.address]
        assert client.get("who") == b"first"

        register("p2", second.address, "redis")  # a proxy joins
        wait_until(lambda: len(pool.proxies.addresses()) == 2, timeout=5, what="the second proxy to be seen")
        other = redis_pool(coordinator_url, "c", poll_interval=POLL, socket_timeout=2, protocol=2)
        try:
            held = [other.get_connection() for _ in range(4)]  # new connections alternate between the proxies
            assert sorted(connection.proxy for connection in held) == sorted([first.address, second.address] * 2)
        finally:
            other.close()

        # The client's one connection is to the first proxy, which dies: the very next request is
        # retried once, on a new connection, which goes to the other proxy.
        (connection,) = pool._available_connections
        assert connection.proxy == first.address
        first.kill()
        assert [client.get("who") for _ in range(10)] == [b"second"] * 10
        assert connection.proxy == second.address and pool._available_connections == [connection]
        first_holder.kill()  # and its registration goes (at once for file, after the session for ZK/etcd)
        wait_until(lambda: pool.proxies.addresses() == [second.address], timeout=8, what="the first to leave")
        assert client.set("k", "v") and second.client().get("k") == b"v"
    finally:
        client.close()


def test_redis_pool_leaves_a_deregistered_proxy(coordinator_url, register, redis_servers):
    first, second = redis_servers(2)
    for server, name in ((first, b"first"), (second, b"second")):
        server.client().set("who", name)
    first_holder = register("p1", first.address, "redis")
    pool = redis_pool(coordinator_url, "c", poll_interval=POLL, socket_timeout=2, protocol=2)
    client = redis.Redis(connection_pool=pool)
    try:
        assert client.get("who") == b"first"
        register("p2", second.address, "redis")
        first_holder.stop()  # a clean leave: the server still runs, yet the client moves on
        wait_until(lambda: pool.proxies.addresses() == [second.address], timeout=5, what="p1 to leave")
        assert client.get("who") == b"second"
    finally:
        pool.close()


def test_redis_pool_without_proxies_says_so(coordinator_url):
    pool = redis_pool(coordinator_url, "empty", poll_interval=POLL, socket_timeout=1, protocol=2)
    try:
        with pytest.raises(redis.ConnectionError) as caught:
            redis.Redis(connection_pool=pool).ping()
        assert "no live proxy registered under /clusters/empty/proxies" in str(caught.value)
    finally:
        pool.close()


def test_memcache_client_retries_on_another_proxy(coordinator_url, register, memcached_servers):
    first, second = memcached_servers(2)
    for server, name in ((first, b"first"), (second, b"second")):
        server.client().set("who", name)
    first_holder = register("p1", first.address, "memcache")
    client = memcache_client(coordinator_url, "c", poll_interval=POLL, timeout=2, connect_timeout=2)
    try:
        assert client.get("who") == b"first"
        assert client.set("k", b"v") is True and client.get_many(["k", "who"]) == {"k": b"v", "who": b"first"}
        register("p2", second.address, "memcache")
        wait_until(lambda: len(client.proxies.addresses()) == 2, timeout=5, what="the second proxy")
        assert client.proxy == first.address  # no reason to move yet

        first.kill()
        assert client.get("who") == b"second"  # retried once, on the other proxy
        assert client.proxy == second.address
        client.set_many({"a": b"1", "b": b"2"})
        assert second.client().get_many(["a", "b"]) == {"a": b"1", "b": b"2"}
        first_holder.kill()
        wait_until(lambda: client.proxies.addresses() == [second.address], timeout=8, what="the first to leave")
        assert client.delete("a") is True
    finally:
        client.close()


def test_memcache_client_with_one_dead_proxy_raises_its_error(coordinator_url, register, memcached_servers):
    (only,) = memcached_servers(1)
    register("p1", only.address, "memcache")
    client = memcache_client(coordinator_url, "c", poll_interval=POLL, timeout=1, connect_timeout=1)
    try:
        assert client.get("nothing") is None
        only.kill()
        with pytest.raises((OSError, MemcacheUnexpectedCloseError)):  # nowhere else to go: the error as it is
            client.get("nothing")
    finally:
        client.close()


def test_directory_reports_an_unreachable_coordinator():
    directory = ProxyDirectory("etcd://127.0.0.1:1/x?timeout=0.5", "c", poll_interval=POLL)
    try:
        assert directory.addresses() == [] and "etcd://127.0.0.1:1/x" in (directory.problem or "")
        assert "no live proxy registered under /clusters/c/proxies at etcd://127.0.0.1:1/x" in directory.no_proxy()
    finally:
        directory.close()
