"""A running memcached twemproxy pool adopted into a memcache cluster, end to end: three real memcached servers
behind a plain ketama pool served by a running proxy under a get/set/delete load through it; ``twinproxy-admin
adopt --warmup-seconds`` rewrites the pool file, the proxy reloads it and switches in place (a connection
opened before is used after), the entries are resumed and each warms its server's keys up at their slots'
owners.  No read through the proxy ever returns a value older than a set or delete acknowledged before it
(a miss is allowed: it is a cache); keys set while their server warmed up are on their slot's owner only; an
item read during the warm-up was copied there with its flags and TTL; an item nobody touched is a miss
afterwards (it stays on its old server, unreachable)."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from pymemcache.client.base import Client as MemcacheClient

from tests.cluster_harness import ClusterProxy, Dashboard, admin, admin_ok, proxies_at, status_json, wait_for_status
from tests.cluster_harness import independent_slot as slot
from tests.integration.test_cluster_memcache_warmup import Reader, Writer, meta, processes, stale_reads  # noqa: F401
from tests.integration.test_redis_proxy import read_lines
from tests.servers import LOOPBACK, wait_until
from twinproxy.cluster.legacy import even_spread, legacy_router, make_legacy

NAMES = ("alpha", "beta", "gamma")
LEGACY = make_legacy("cache", "fnv1a_64", "ketama", None, [(gid, name, 1) for gid, name in enumerate(NAMES, 1)])
PLACE = legacy_router(LEGACY, [1, 2, 3])
OWNER = even_spread([1, 2, 3], 1024)      # the slots adopt gives each group (the pool's order)
WARMUP = 6


def pool_text(port: int, servers) -> str:
    lines = "".join(f"    - {server.address}:1 {name}\n" for server, name in zip(servers, NAMES))
    return (f"cache:\n  listen: {LOOPBACK}:{port}\n  hash: fnv1a_64\n  distribution: ketama\n  timeout: 2000\n"
            f"  servers:\n{lines}")


def keys_of(prefix: str, placed: int, count: int, owner_other: bool = True) -> list:
    """``count`` keys the pool places on server ``placed`` whose slot another group owns."""
    found = [key for key in (b"%s%d" % (prefix.encode(), i) for i in range(100000))
             if PLACE(key) == placed and (OWNER[slot(key)] != placed) == owner_other]
    return found[:count]


def entries(dashboard: Dashboard) -> list:
    return dashboard.get("/api/migrations")["migrations"]


def serving_the_pool(tmp_path: Path, memcached_servers, started) -> tuple:
    """Three memcached servers and a proxy serving them as a plain ketama pool (the pool file before adopt)."""
    url = f"file://{tmp_path / 'coordinator'}"
    servers = memcached_servers(3)
    port = {gid: server.port for gid, server in enumerate(servers, 1)}
    proxy = ClusterProxy(tmp_path / "proxy", url, "cache", redis=False, processes=started)
    proxy.config.write_text(pool_text(proxy.port, servers))
    proxy.start()
    return url, servers, port, proxy


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_memcached_pool_is_adopted_under_load_and_nothing_stale_is_read(tmp_path: Path, memcached_servers,
                                                                          processes) -> None:  # noqa: F811
    url, servers, port, proxy = serving_the_pool(tmp_path, memcached_servers, processes)
    address = (LOOPBACK, proxy.port)
    setup = MemcacheClient(address, timeout=5, connect_timeout=5)
    # Group 1's items from before: one read while it warms up (copied, flags and TTL kept), one never touched.
    read_later, untouched = keys_of("pre", 1, 2)
    for key in (read_later, untouched):
        assert setup.set(key, b"old" + key, expire=600, flags=5, noreply=False)
    assert meta(port[1], b"mg %s v" % untouched).startswith(b"VA")         # the pool's ketama put it there
    written_at = time.time()
    dashboard = Dashboard(tmp_path / "dashboard", url, "cache", protocol="memcache").start()
    processes.append(dashboard)
    kept = socket.create_connection(address, timeout=10)    # opened before the switch, used after it
    kept.sendall(b"set kept 0 0 1\r\n1\r\n")
    assert read_lines(kept, 1) == b"STORED\r\n"

    stop = threading.Event()
    deadline = time.monotonic() + 150
    load = [b"load%d" % i for i in range(120)]
    random.Random(3).shuffle(load)
    writers = [Writer(f"w{i}", address, load[i::2], deadline, stop, i) for i in range(2)]
    readers = [Reader(f"r{i}", address, load, deadline, stop, 10 + i) for i in range(2)]
    threads = writers + readers
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: sum(len(w.reads) for w in writers) > 200, timeout=20, what="the load before")
        refused = admin(dashboard, "adopt", "--pool-file", str(proxy.config), "--pool", "cache", "--coordinator",
                        url, "--output", str(proxy.config), "--keys-per-second", "10")
        assert refused.returncode == 2 and "memcached pool" in refused.stderr, refused.stderr
        adopted = admin(dashboard, "adopt", "--pool-file", str(proxy.config), "--pool", "cache", "--coordinator",
                        url, "--output", str(proxy.config), "--json", "--warmup-seconds", str(WARMUP))
        assert adopted.returncode == 0, adopted.stdout + adopted.stderr
        answer = json.loads(adopted.stdout)
        assert [(m["from_group"], m["state"], m["paused"]) for m in answer["migrations"]] == [
            (1, "pending", True), (2, "pending", True), (3, "pending", True)]
        os.kill(proxy.process.proc.pid, signal.SIGHUP)
        wait_for_status(dashboard, lambda s: len(s["proxies"]) == 1
                        and s["proxies"][0]["generation"] >= answer["generation"], what="the proxy following")
        assert status_json(dashboard)["protocol"] == "memcache"
        assert setup.get(untouched) == b"old" + untouched                # nothing moved yet

        began = time.monotonic()
        admin_ok(dashboard, "migration", "resume")
        # Group 1 warming up, the proxy at that generation: what it is sent now goes to the slots' owners.
        wait_for_status(dashboard, lambda s: proxies_at(s, 1) and [(m["state"], m.get("warmed")) for m in
                                                                    entries(dashboard)][0] == ("migrating", False),
                        timeout=60, what="group 1 warming up at the proxy")
        assert setup.get(read_later) == b"old" + read_later              # missed at its owner, read through
        during = keys_of("during", 1, 20)
        for key in during:
            assert setup.set(key, b"new" + key, noreply=False)
        assert entries(dashboard)[0]["state"] == "migrating"              # (6 s: all of it within the warm-up)
        waited = admin(dashboard, "migration", "wait", timeout=120)
        ended = time.monotonic()
        assert waited.returncode == 0, waited.stdout + waited.stderr
        assert "warming up" in waited.stdout
        count = sum(len(w.reads) for w in writers)
        wait_until(lambda: sum(len(w.reads) for w in writers) > count + 200, timeout=20, what="the load after")
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)

    # One entry after another, each warming up for WARMUP seconds.
    assert ended - began >= 3 * WARMUP, ended - began
    errors = [error for thread in threads for error in thread.errors]
    assert errors == [], errors[:10]
    reads = [read for thread in threads for read in thread.reads]
    problems = stale_reads(writers, reads)
    assert problems == [], problems[:10]
    during_reads = [read for read in reads if began <= read[1] and read[2] <= ended and read[3] is not None]
    assert len(during_reads) > 100
    sets = sum(1 for w in writers for ops in w.ops.values() for op in ops if op[0] == "set" and began <= op[2])
    assert sets > 100

    status = status_json(dashboard)
    assert status.get("adopted") is None and all(m["state"] == "finished" for m in entries(dashboard))
    by_group = {group["id"]: group["servers"][0]["addr"] for group in status["groups"]}
    assert by_group == {gid: server.address for gid, server in enumerate(servers, 1)}
    wait_for_status(dashboard, lambda s: proxies_at(s, 1), what="the proxy at the last generation")
    # Set while group 1 warmed up: on the slot's owner, nowhere else.
    for key in during:
        assert meta(port[OWNER[slot(key)]], b"mg %s v" % key) == b"VA %d\r\nnew%s\r\n" % (3 + len(key), key)
        assert meta(port[1], b"mg %s v" % key) == b"EN\r\n"
        assert setup.get(key) == b"new" + key
    # Read during the warm-up: copied to its owner with its flags and TTL (and gone from the old server).
    reply = meta(port[OWNER[slot(read_later)]], b"mg %s v f t" % read_later)
    head, _, data = reply.partition(b"\r\n")
    ttl = int(next(token for token in head.split() if token.startswith(b"t"))[1:])
    assert head.startswith(b"VA") and b"f5" in head.split() and data == b"old" + read_later + b"\r\n", reply
    assert 600 - (time.time() - written_at) - 3 <= ttl <= 600
    assert setup.get(read_later) == b"old" + read_later
    # Never touched during the warm-up: left on its old server, which the cluster no longer reads: a miss.
    assert setup.get(untouched) is None
    assert meta(port[1], b"mg %s v" % untouched).startswith(b"VA")
    # The writers' keys last set after the adoption are at their slots' owners.
    for writer in writers:
        for key, ops in writer.ops.items():
            if ops and ops[-1][0] == "set" and ops[-1][2] > ended:
                owner = OWNER[slot(key)]
                assert meta(port[owner], b"mg %s v" % key).endswith(b"\r\n%d\r\n" % ops[-1][1]), key
    kept.sendall(b"get kept\r\n")
    if PLACE(b"kept") == OWNER[slot(b"kept")]:       # its own server owns its slot: never moved
        assert read_lines(kept, 3) == b"VALUE kept 0 1\r\n1\r\nEND\r\n"
    else:                                           # not touched during its server's warm-up: a miss now
        assert read_lines(kept, 1) == b"END\r\n"
    kept.close()
    stats = proxy.stats()["cache"]
    assert stats["cluster"] == "cache" and "adopted" not in stats


@pytest.mark.timeout(120)
def test_a_cancelled_entry_gives_the_server_its_keys_back_and_its_resume_serves_nothing_stale(
        tmp_path: Path, memcached_servers, processes) -> None:  # noqa: F811
    """Paused mid warm-up, its clock stops; resumed, it counts again.  Cancelled mid warm-up: the server's keys
    are its own again (a value set meanwhile went to the slot's owner,
    deleted on the server: a miss there, never the older value); a value set afterwards is on the server.  The
    resumed entry first deletes at the owner what the cancelled one left there, so its warm-up reads the
    server's newer value, not the owner's stale copy."""
    url, servers, port, proxy = serving_the_pool(tmp_path, memcached_servers, processes)
    client = MemcacheClient((LOOPBACK, proxy.port), timeout=5, connect_timeout=5)
    key, kept = keys_of("c", 1, 2)
    for name in (key, kept):
        assert client.set(name, b"old", noreply=False)
    dashboard = Dashboard(tmp_path / "dashboard", url, "cache", protocol="memcache").start()
    processes.append(dashboard)
    admin_ok(dashboard, "adopt", "--pool-file", str(proxy.config), "--pool", "cache", "--coordinator", url,
             "--output", str(proxy.config), "--warmup-seconds", "600")
    os.kill(proxy.process.proc.pid, signal.SIGHUP)
    wait_for_status(dashboard, lambda s: proxies_at(s, 1), what="the proxy following")
    admin_ok(dashboard, "migration", "resume", "1")
    wait_for_status(dashboard, lambda s: proxies_at(s, 1) and entries(dashboard)[0]["state"] == "migrating",
                    timeout=60, what="group 1 warming up at the proxy")
    assert client.set(key, b"during", noreply=False)                   # at its owner, deleted on server 1
    assert meta(port[OWNER[slot(key)]], b"mg %s v" % key).startswith(b"VA 6")
    assert client.get(kept) == b"old"
    # Paused, its warm-up clock stops (and the keys still warm up); resumed, it counts again.
    admin_ok(dashboard, "migration", "pause", "1")
    wait_until(lambda: entries(dashboard)[0]["warmup_until"] is None and entries(dashboard)[0]["warmup_left"],
               timeout=30, what="the warm-up clock stopped")
    assert entries(dashboard)[0]["state"] == "migrating" and 590 < entries(dashboard)[0]["warmup_left"] <= 600
    admin_ok(dashboard, "migration", "resume", "1")
    wait_until(lambda: entries(dashboard)[0]["warmup_until"] is not None, timeout=30, what="the clock again")
    admin_ok(dashboard, "migration", "cancel")
    waited = admin(dashboard, "migration", "wait", "1", timeout=60)
    assert waited.returncode == 1 and "cancelled" in waited.stderr, waited.stdout + waited.stderr
    wait_for_status(dashboard, lambda s: proxies_at(s, 1), what="the proxy at the cancel's generation")
    assert client.get(key) is None                                      # server 1's again: no older value
    assert client.get(kept) == b"old"
    assert client.set(key, b"after", noreply=False)
    assert meta(port[1], b"mg %s v" % key) == b"VA 5\r\nafter\r\n"
    assert meta(port[OWNER[slot(key)]], b"mg %s v" % key).startswith(b"VA 6")   # the cancelled entry's leftover

    resumed = admin(dashboard, "adopt", "--resume", "--cluster", "cache", "--warmup-seconds", "2")
    assert resumed.returncode == 0 and "warming up for 2s each" in resumed.stdout, resumed.stdout + resumed.stderr
    admin_ok(dashboard, "migration", "resume")
    wait_for_status(dashboard, lambda s: proxies_at(s, 1) and [m["state"] for m in entries(dashboard)
                                                                if m["from_group"] == 1][-1] == "migrating",
                    timeout=60, what="group 1 warming up again")
    assert meta(port[OWNER[slot(key)]], b"mg %s v" % key) == b"EN\r\n"    # deleted before the warm-up
    assert client.get(key) == b"after"
    waited = admin(dashboard, "migration", "wait", timeout=90)
    assert waited.returncode == 0, waited.stdout + waited.stderr
    wait_for_status(dashboard, lambda s: proxies_at(s, 1) and s.get("adopted") is None, what="the adoption over")
    assert client.get(key) == b"after"
    assert meta(port[OWNER[slot(key)]], b"mg %s v" % key) == b"VA 5\r\nafter\r\n"
    # Copied during the cancelled warm-up, that copy deleted before the second, not read during it: a miss.
    assert client.get(kept) is None and meta(port[1], b"mg %s v" % kept) == b"VA 3\r\nold\r\n"


@pytest.mark.timeout(120)
def test_control_a_proxy_left_on_the_old_file_makes_a_switched_one_read_a_stale_value(
        tmp_path: Path, memcached_servers, processes) -> None:  # noqa: F811
    """Control: the operator resumes with one proxy still reading the old file.  Once the key's server is done,
    that proxy's set goes where the pool placed the key and the switched proxy reads the slot's owner's older
    value: stale, and the history check says so (what the README warns about)."""
    url = f"file://{tmp_path / 'coordinator'}"
    servers = memcached_servers(3)
    switched, stale = (ClusterProxy(tmp_path / f"proxy{i}", url, "cache", redis=False, processes=processes)
                       for i in range(2))
    for proxy in (switched, stale):
        proxy.config.write_text(pool_text(proxy.port, servers))
        proxy.start()
    dashboard = Dashboard(tmp_path / "dashboard", url, "cache", protocol="memcache").start()
    processes.append(dashboard)
    admin_ok(dashboard, "adopt", "--pool-file", str(switched.config), "--pool", "cache", "--coordinator", url,
             "--output", str(switched.config), "--warmup-seconds", "1")
    os.kill(switched.process.proc.pid, signal.SIGHUP)
    wait_for_status(dashboard, lambda s: len(s["proxies"]) == 1, what="the switched proxy registered")
    admin_ok(dashboard, "migration", "resume")
    assert admin(dashboard, "migration", "wait", timeout=60).returncode == 0
    wait_for_status(dashboard, lambda s: proxies_at(s, 1), what="the switched proxy at the last generation")
    new = MemcacheClient((LOOPBACK, switched.port), timeout=5, connect_timeout=5)
    old = MemcacheClient((LOOPBACK, stale.port), timeout=5, connect_timeout=5)
    key = keys_of("moving", 1, 1)[0]
    ops = []
    for client, value in ((new, 1), (old, 2)):
        start = time.monotonic()
        assert client.set(key, b"%d" % value, noreply=False)
        ops.append(("set", value, start, time.monotonic()))
    start = time.monotonic()
    read = new.get(key)
    assert read == b"1"                 # the owner's copy: the later set went to the pool's server
    problems = stale_reads([SimpleNamespace(ops={key: ops})], [(key, start, time.monotonic(), int(read))])
    assert problems and "after set #2 was acknowledged" in problems[0], problems
