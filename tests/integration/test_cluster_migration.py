"""Online slot migration end to end on stock Redis: 512 slots move from group 1 to group 2 under a
recorded client load through two proxies (one with ``--workers 2``), on the file coordinator and on
ZooKeeper; the history checker must pass, and must fail when a proxy ignores the cluster."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import redis

from tests.cluster_harness import ClusterProxy, Dashboard, admin, admin_ok, proxies_at, wait_for_status
from tests.cluster_harness import independent_slot as slot
from tests.coordinator_servers import coordinator_url_for
from tests.history import RegisterLoad, check
from tests.servers import LOOPBACK, wait_until


def keys_in(first: int, last: int, count: int, prefix: str) -> list:
    found = []
    number = 0
    while len(found) < count:
        key = f"{prefix}{number}".encode()
        if first <= slot(key) <= last:
            found.append(key)
        number += 1
    return found


@pytest.fixture
def processes():
    started = []
    yield started
    for process in started:
        process.stop()


def build(tmp_path: Path, url: str, servers, processes, workers=(1, 2)):
    dashboard = Dashboard(tmp_path / "dashboard", url, "shop").start()
    processes.append(dashboard)
    for command in (("group", "add", "1"), ("server", "add", "1", servers[0].address), ("group", "add", "2"),
                    ("server", "add", "2", servers[1].address), ("slots", "assign", "0-1023", "1")):
        admin_ok(dashboard, *command)
    proxies = [ClusterProxy(tmp_path / f"proxy{i}", url, "shop", workers=count, processes=processes).start()
               for i, count in enumerate(workers)]
    wait_for_status(dashboard, lambda s: proxies_at(s, len(proxies)), what="the proxies at the generation")
    return dashboard, proxies


def run_load(addresses, keys, seconds: float, until=None, password=None):
    history = []
    deadline = time.monotonic() + seconds
    loads = [RegisterLoad(f"c{i}", addresses[i % len(addresses)], keys, deadline, history, password=password)
             for i in range(4)]
    for load in loads:
        load.start()
    return loads, history


def finish(loads) -> None:
    for load in loads:
        load.stop()
    for load in loads:
        load.join(15)


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind", ["file", "zookeeper"])
def test_512_slots_move_under_load_and_every_read_is_current(kind, request, tmp_path: Path, redis_servers,
                                                            processes) -> None:
    url = coordinator_url_for(kind, request, tmp_path)
    servers = redis_servers(2)
    dashboard, proxies = build(tmp_path, url, servers, processes)
    source = redis.Redis(host=LOOPBACK, port=servers[0].port, protocol=2)
    target = redis.Redis(host=LOOPBACK, port=servers[1].port, protocol=2)
    # Data already there: every type, some with a TTL, in the moving slots and outside them.
    moving = keys_in(0, 511, 3000, "pre")
    staying = keys_in(512, 1023, 500, "stay")
    with source.pipeline(transaction=False) as pipe:
        for key in moving + staying:
            pipe.set(key, b"v" + key)
        for index, key in enumerate(moving[:300]):
            pipe.expire(key, 1000 + index)
        for kind_key, write in ((b"h{a1}", lambda p, k: p.hset(k, mapping={"f": "1", "g": "2"})),
                                (b"l{a1}", lambda p, k: p.rpush(k, "x", "y", "z")),
                                (b"s{a1}", lambda p, k: p.sadd(k, "m", "n")),
                                (b"z{a1}", lambda p, k: p.zadd(k, {"m": 1.5, "n": 2})),
                                (b"x{a1}", lambda p, k: p.xadd(k, {"f": "v"}, id="1-1"))):
            write(pipe, kind_key)
        pipe.execute()
    assert slot(b"{a1}") <= 511
    shared = keys_in(0, 511, 20, "shared")
    loads, history = run_load([p.address for p in proxies], shared + keys_in(512, 1023, 5, "shared"), 120)
    wait_until(lambda: len(history) > 400, timeout=30, what="the load to run")
    # Throttled so the move takes seconds: the load runs through every state of it.
    began = time.monotonic()
    admin_ok(dashboard, "slots", "migrate", "0-511", "2", "--keys-per-second", "1500")
    done = admin(dashboard, "migration", "wait", timeout=150)
    ended = time.monotonic()
    during = [op for op in history if began <= op.start and op.end <= ended]
    assert ended - began > 1.5 and len(during) > 500, (ended - began, len(during))
    count = len(history)
    wait_until(lambda: len(history) > count + 400, timeout=30, what="the load to go on after the migration")
    finish(loads)
    assert done.returncode == 0, done.stdout + done.stderr
    problems = check(history)
    assert problems == [], problems[:10]
    assert [error for load in loads for error in load.errors] == []
    # Afterwards: the moved slots' keys are on group 2 only, with their TTLs and types.
    assert not any(source.exists(key) for key in moving)
    assert all(target.get(key) == b"v" + key for key in moving)
    assert all(source.get(key) == b"v" + key for key in staying)
    ttls = [target.ttl(key) for key in moving[:300]]
    assert all(1000 + index - 60 <= ttl <= 1000 + index for index, ttl in enumerate(ttls)), ttls[:5]
    assert target.hgetall(b"h{a1}") == {b"f": b"1", b"g": b"2"}
    assert target.lrange(b"l{a1}", 0, -1) == [b"x", b"y", b"z"]
    assert target.smembers(b"s{a1}") == {b"m", b"n"}
    assert target.zrange(b"z{a1}", 0, -1, withscores=True) == [(b"m", 1.5), (b"n", 2.0)]
    assert target.xrange(b"x{a1}") == [(b"1-1", {b"f": b"v"})]
    status = json.loads(admin_ok(dashboard, "status", "--json"))
    assert [(r["first"], r["last"], r["group"], r["state"]) for r in status["slots"]] == [
        (0, 1023, 2, "stable")] or [(r["first"], r["last"], r["group"]) for r in status["slots"]] == [
        (0, 511, 2), (512, 1023, 1)]


@pytest.mark.timeout(120)
def test_the_checker_fails_when_a_proxy_ignores_the_cluster(tmp_path: Path, redis_servers, processes) -> None:
    """Control: a plain pool on the old owner (a proxy that skips the barrier) next to a cluster proxy
    during a migration gives stale reads, and the checker says so."""
    url = f"file://{tmp_path / 'coordinator'}"
    servers = redis_servers(2)
    dashboard, proxies = build(tmp_path, url, servers, processes, workers=(1,))
    stale = ClusterProxy(tmp_path / "stale", url, "shop", processes=processes)
    stale.config.write_text(f"shop:\n  listen: {LOOPBACK}:{stale.port}\n  redis: true\n  servers:\n"
                            f"   - {servers[0].address}:1\n")
    stale.start()
    shared = keys_in(0, 511, 5, "shared")
    loads, history = run_load([proxies[0].address, stale.address], shared, 60)
    wait_until(lambda: len(history) > 200, timeout=30, what="the load to run")
    admin_ok(dashboard, "slots", "migrate", "0-511", "2")
    admin(dashboard, "migration", "wait", timeout=60)
    count = len(history)
    wait_until(lambda: len(history) > count + 400, timeout=30, what="the load to go on")
    finish(loads)
    assert check(history) != []
