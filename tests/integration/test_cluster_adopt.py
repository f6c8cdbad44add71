"""A running twemproxy pool adopted into a cluster, under a recorded load through two proxies: the proxies
reload the file ``twinproxy-admin adopt`` wrote and switch in place (their client connections stay), the
adoption moves every key from where the pool's ketama placed it to where its slot says, the history checker
passes, and afterwards every key is on its slot's group only, with its value, type and TTL; the checker fails
when a proxy was left on the old file (the control); a pool that cannot be adopted is refused."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import redis

from tests.cluster_harness import ClusterProxy, Dashboard, admin, admin_ok, wait_for_status
from tests.cluster_harness import independent_slot as slot
from tests.coordinator_servers import coordinator_url_for
from tests.history import Op, check
from tests.integration.test_cluster_migration import finish, processes, run_load  # noqa: F401 - a fixture
from tests.integration.test_redis_proxy import read_lines
from tests.servers import LOOPBACK, wait_until
from twinproxy.admin_cli.adopt import cluster_file
from twinproxy.cluster.legacy import even_spread, legacy_router, make_legacy

KEYS = 3000


def pool_text(port: int, servers) -> str:
    lines = "".join(f"    - {server.address}:1 {name}\n" for server, name in zip(servers, ("alpha", "beta", "gamma")))
    return (f"shop:\n  listen: {LOOPBACK}:{port}\n  redis: true\n  hash: fnv1a_64\n  hash_tag: \"{{}}\"\n"
            f"  distribution: ketama\n  timeout: 2000\n  servers:\n{lines}")


def plain_proxy(tmp_path: Path, name: str, url: str, servers, processes, workers: int = 1) -> ClusterProxy:  # noqa: F811
    proxy = ClusterProxy(tmp_path / name, url, "shop", processes=processes, workers=workers)
    proxy.config.write_text(pool_text(proxy.port, servers))
    return proxy.start()


def hang_up(proxy: ClusterProxy) -> None:
    os.kill(proxy.process.proc.pid, signal.SIGHUP)


def owners(status) -> list:
    table = [None] * 1024
    for run in status["slots"]:
        for number in range(run["first"], run["last"] + 1):
            table[number] = run["group"]
    return table


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind", ["file", "zookeeper"])
def test_a_pool_is_adopted_under_load_and_every_key_ends_where_its_slot_says(kind, request, tmp_path: Path,
                                                                            redis_servers, processes) -> None:  # noqa: F811
    url = coordinator_url_for(kind, request, tmp_path)
    servers = redis_servers(3)
    # The second proxy with --workers 2: its master reloads, every worker switches.
    proxies = [plain_proxy(tmp_path, f"proxy{i}", url, servers, processes, workers=1 + i) for i in range(2)]
    first = redis.Redis(host=LOOPBACK, port=proxies[0].port, protocol=2)
    keys = [f"pre{i}".encode() for i in range(KEYS)]
    with first.pipeline(transaction=False) as pipe:
        for index, key in enumerate(keys):
            pipe.set(key, b"v" + key)
            if index < 300:
                pipe.expire(key, 1000 + index)
        pipe.hset(b"h{a}", mapping={"f": "1", "g": "2"})
        pipe.rpush(b"l{a}", "x", "y", "z")
        pipe.sadd(b"s{a}", "m", "n")
        pipe.zadd(b"z{a}", {"m": 1.5, "n": 2})
        pipe.xadd(b"x{a}", {"f": "v"}, id="1-1")
        pipe.execute()
    assert all(server.client().dbsize() > 0 for server in servers)       # the ring spread them
    dashboard = Dashboard(tmp_path / "dashboard", url, "shop").start()
    processes.append(dashboard)
    # Connections opened before the switch, used after it: the switch must not close them.
    kept = [socket.create_connection((LOOPBACK, proxy.port), timeout=10) for proxy in proxies]
    for sock in kept:
        sock.sendall(b"*3\r\n$3\r\nSET\r\n$4\r\nkept\r\n$1\r\n1\r\n")
        assert read_lines(sock, 1) == b"+OK\r\n"
    loads, history = run_load([proxy.address for proxy in proxies], [f"shared{i}".encode() for i in range(30)], 150)
    wait_until(lambda: len(history) > 300, timeout=30, what="the load to run")

    adopted = admin(dashboard, "adopt", "--pool-file", str(proxies[0].config), "--pool", "shop",
                    "--coordinator", url, "--output", str(proxies[0].config), "--json", "--keys-per-second", "1500")
    assert adopted.returncode == 0, adopted.stdout + adopted.stderr
    answer = json.loads(adopted.stdout)
    assert [m["from_group"] for m in answer["migrations"]] == [1, 2, 3]
    assert all(m["paused"] and m["state"] == "pending" for m in answer["migrations"])
    proxies[1].config.write_text(cluster_file(str(proxies[1].config), "shop", "shop", url))
    for proxy in proxies:
        hang_up(proxy)
    wait_for_status(dashboard, lambda s: len(s["proxies"]) == 2 and all(
        p["generation"] >= answer["generation"] for p in s["proxies"]), what="both proxies following the cluster")
    assert [m["state"] for m in json.loads(admin_ok(dashboard, "migration", "status", "--json"))] == ["pending"] * 3
    # Nothing has moved yet, and every key still reads through both proxies.
    assert all(redis.Redis(host=LOOPBACK, port=p.port, protocol=2).get(keys[7]) == b"v" + keys[7] for p in proxies)

    began = time.monotonic()
    admin_ok(dashboard, "migration", "resume")
    done = admin(dashboard, "migration", "wait", timeout=150)
    ended = time.monotonic()
    assert done.returncode == 0, done.stdout + done.stderr
    count = len(history)
    wait_until(lambda: len(history) > count + 300, timeout=30, what="the load to go on after the adoption")
    finish(loads)
    during = [op for op in history if began <= op.start and op.end <= ended]
    # Throttled so that each server's keys take a while: the load runs through every state.
    assert ended - began > 1.5 and len(during) > 300, (ended - began, len(during))
    problems = check(history)
    assert problems == [], problems[:10]
    assert [error for load in loads for error in load.errors] == []
    for sock in kept:
        sock.sendall(b"*2\r\n$3\r\nGET\r\n$4\r\nkept\r\n")
        assert read_lines(sock, 2) == b"$1\r\n1\r\n"
        sock.close()

    status = json.loads(admin_ok(dashboard, "status", "--json"))
    table = owners(status)
    by_group = {group["id"]: group["servers"][0]["addr"] for group in status["groups"]}
    assert sorted(by_group.values()) == sorted(server.address for server in servers)
    misplaced = []
    for gid, address in by_group.items():
        backend = redis.Redis(host=LOOPBACK, port=int(address.rpartition(":")[2]), protocol=2)
        misplaced += [key for key in backend.scan_iter(count=1000) if table[slot(key)] != gid]
    assert misplaced == []
    reader = redis.Redis(host=LOOPBACK, port=proxies[1].port, protocol=2)
    assert all(value == b"v" + key for key, value in zip(keys, reader.mget(keys)))
    ttls = [reader.ttl(key) for key in keys[:300]]
    assert all(1000 + index - 120 <= ttl <= 1000 + index for index, ttl in enumerate(ttls)), ttls[:5]
    assert reader.hgetall(b"h{a}") == {b"f": b"1", b"g": b"2"}
    assert reader.lrange(b"l{a}", 0, -1) == [b"x", b"y", b"z"]
    assert reader.smembers(b"s{a}") == {b"m", b"n"}
    assert reader.zrange(b"z{a}", 0, -1, withscores=True) == [(b"m", 1.5), (b"n", 2.0)]
    assert reader.xrange(b"x{a}") == [(b"1-1", {b"f": b"v"})]
    stats = proxies[0].stats()["shop"]
    assert stats["cluster"] == "shop" and "adopted" not in stats      # an ordinary cluster now


@pytest.mark.timeout(60)
def test_a_pool_under_random_distribution_is_refused(tmp_path: Path, redis_servers) -> None:
    servers = redis_servers(2)
    path = tmp_path / "pools.yml"
    path.write_text(pool_text(0, servers).replace("ketama", "random"))
    dashboard = Dashboard(tmp_path / "dashboard", f"file://{tmp_path / 'coordinator'}", "shop").start()
    try:
        refused = admin(dashboard, "adopt", "--pool-file", str(path), "--pool", "shop", "--coordinator",
                        "file:///nowhere", "--output", str(path))
    finally:
        dashboard.stop()
    assert refused.returncode == 2 and "random" in refused.stderr
    assert "servers:" in path.read_text()


def timed(history: list, client: str, kind: str, key: bytes, call) -> None:
    start = time.monotonic()
    value = call()
    history.append(Op(client, kind, key, value if kind == "read" else None, start, time.monotonic(), True))


def a_key_that_moves() -> bytes:
    """A key the pool's ketama places on another server than its slot's group (group k: the k-th server)."""
    legacy = make_legacy("shop", "fnv1a_64", "ketama", "{}", [(1, "alpha", 1), (2, "beta", 1), (3, "gamma", 1)])
    place, spread = legacy_router(legacy, [1, 2, 3]), even_spread([1, 2, 3], 1024)
    return next(key for key in (b"moving%d" % i for i in range(1000)) if place(key) != spread[slot(key)])


@pytest.mark.timeout(120)
def test_the_checker_fails_when_a_proxy_was_not_switched(tmp_path: Path, redis_servers, processes) -> None:  # noqa: F811
    """Control: the operator resumes with one proxy still reading the old file.  Once a key has moved, that
    proxy's write goes where the pool placed it and the switched proxy reads the moved copy: a stale read,
    and the checker says so (what the README warns about)."""
    url = f"file://{tmp_path / 'coordinator'}"
    servers = redis_servers(3)
    switched, stale = [plain_proxy(tmp_path, f"proxy{i}", url, servers, processes) for i in range(2)]
    dashboard = Dashboard(tmp_path / "dashboard", url, "shop").start()
    processes.append(dashboard)
    admin_ok(dashboard, "adopt", "--pool-file", str(switched.config), "--pool", "shop", "--coordinator", url,
             "--output", str(switched.config))
    hang_up(switched)
    wait_for_status(dashboard, lambda s: len(s["proxies"]) == 1, what="the switched proxy registered")
    old = redis.Redis(host=LOOPBACK, port=stale.port, protocol=2)
    new = redis.Redis(host=LOOPBACK, port=switched.port, protocol=2)
    key, history = a_key_that_moves(), []
    timed(history, "stale", "write", key, lambda: old.set(key, b"stale:1"))
    admin_ok(dashboard, "migration", "resume")
    assert admin(dashboard, "migration", "wait", timeout=60).returncode == 0
    timed(history, "stale", "write", key, lambda: old.set(key, b"stale:2"))
    timed(history, "switched", "read", key, lambda: new.get(key))
    assert history[-1].value == b"stale:1"        # the moved copy: the later write went to the old server
    assert check(history) != []
