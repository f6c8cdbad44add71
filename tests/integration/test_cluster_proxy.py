"""A cluster pool's proxy against each real coordinator, with the topology written by the test
(the dashboard has its own tests): not ready, then serving, then every change acknowledged in
its registration — by a single process and by ``--workers 2`` — and a hold that waits."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import redis

from tests.cluster_harness import ClusterProxy
from tests.conftest import in_reactor
from tests.servers import LOOPBACK, wait_until
from twinproxy.cluster.model import Group, Topology
from twinproxy.cluster.slots import slot_of


class Writer:
    """The test's own coordinator session, in the reactor thread, standing in for the dashboard."""

    def __init__(self, reactor, url: str) -> None:
        from twinproxy.coordinator import connect

        self.reactor = reactor
        self.coordinator = in_reactor(reactor, connect, url, reactor)
        in_reactor(reactor, self.coordinator.start)
        self.version = None

    def write(self, topology: Topology) -> None:
        path = f"/clusters/{topology.cluster}/topology"

        def put():
            if self.version is None:
                return self.coordinator.create(path, topology.to_json())
            return self.coordinator.set(path, topology.to_json(), self.version)

        node = in_reactor(self.reactor, put)
        self.version = node.version

    def registrations(self, cluster: str) -> dict:
        nodes = in_reactor(self.reactor, self.coordinator.children, f"/clusters/{cluster}/proxies")
        return {name: json.loads(node.value) for name, node in nodes.items() if node.value}

    def stop(self) -> None:
        in_reactor(self.reactor, self.coordinator.stop)


def layout(generation: int, masters, held=()) -> Topology:
    groups = tuple(Group(id=gid, servers=(address,)) for gid, address in enumerate(masters, start=1))
    slots = tuple((1 if slot < 512 else 2, "held" if slot in held else "stable") for slot in range(1024))
    return Topology(cluster="shop", protocol="redis", generation=generation, groups=groups, slots=slots)


@pytest.fixture
def processes():
    started = []
    yield started
    for process in started:
        process.stop()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("workers", [1, 2])
def test_proxy_follows_and_acknowledges(coordinator_url, reactor, tmp_path: Path, redis_servers, processes,
                                        workers) -> None:
    a, b = redis_servers(2)
    writer = Writer(reactor, coordinator_url)
    try:
        proxy = ClusterProxy(tmp_path / "proxy", coordinator_url, "shop", workers=workers, processes=processes,
                             extra_keys="  slot_hold: 8000\n").start()
        client = redis.Redis(host=LOOPBACK, port=proxy.port, socket_timeout=10, protocol=2)
        with pytest.raises(redis.ResponseError, match="cluster 'shop' not ready"):
            client.get("a")
        writer.write(layout(1, [a.address, b.address]))

        def acked(generation: int) -> bool:
            found = writer.registrations("shop")
            return len(found) == 1 and next(iter(found.values()))["generation"] == generation

        wait_until(lambda: acked(1), timeout=20, what="the proxy to acknowledge generation 1")
        (registration,) = writer.registrations("shop").values()
        assert registration["addr"] == proxy.address and registration["workers"] == workers
        keys = [f"k{i}".encode() for i in range(200)]
        for key in keys:
            client.set(key, b"1")
        direct = {1: redis.Redis(host=LOOPBACK, port=a.port), 2: redis.Redis(host=LOOPBACK, port=b.port)}
        for key in keys:
            assert direct[1 if slot_of(key) < 512 else 2].exists(key), key

        # Hold slot 579 ("a"): a request for it waits; release it onto group 1's server.
        writer.write(layout(2, [a.address, b.address], held={579}))
        wait_until(lambda: acked(2), timeout=20, what="the hold to be acknowledged")
        answered = []
        waiting = threading.Thread(target=lambda: answered.append(client.set("a", b"held")), daemon=True)
        waiting.start()
        waiting.join(0.5)
        assert answered == [] and direct[2].get("a") is None
        other = redis.Redis(host=LOOPBACK, port=proxy.port, socket_timeout=5, protocol=2)
        assert other.set("k1", b"2")            # other slots serve meanwhile
        writer.write(layout(3, [a.address, b.address]).assign_slots(579, 579, 1, force=True))
        waiting.join(10)
        assert answered == [True]
        assert direct[1].get("a") == b"held"
        wait_until(lambda: acked(4), timeout=20, what="generation 4 to be acknowledged")
        stats = proxy.stats()["shop"]
        assert stats["cluster"] == "shop" and stats["cluster_generation"] == 4
    finally:
        writer.stop()
