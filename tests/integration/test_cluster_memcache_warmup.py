"""A memcache cluster's slots migrate with a warm-up, end to end: real memcached servers, a dashboard, two
proxies, the admin CLI (``slots migrate ... --warmup-seconds 3``, ``migration wait``) and a recorded
get/set/delete load.  No read may return a value older than the last set or delete acknowledged before it
(a miss is allowed: it is a cache); items read during the warm-up are on the new group afterwards with
their flags and TTL; what the new group held of the slots before (an old migration's leftovers) is never
served; the slots end stable on the new group."""

from __future__ import annotations

import bisect
import random
import socket
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
from pymemcache.client.base import Client as MemcacheClient

from tests.cluster_harness import ClusterProxy, Dashboard, admin, admin_ok, proxies_at, status_json, wait_for_status
from tests.cluster_harness import independent_slot as slot
from tests.integration.test_cluster_migration import keys_in
from tests.servers import LOOPBACK, wait_until

MOVING = (0, 511)


@pytest.fixture
def processes():
    started = []
    yield started
    for process in started:
        process.stop()


def meta(port: int, line: bytes) -> bytes:
    """One meta command sent straight to a memcached; its whole reply."""
    with socket.create_connection((LOOPBACK, port), timeout=5) as conn:
        conn.sendall(line + b"\r\nmn\r\n")
        reply = b""
        while not reply.endswith(b"MN\r\n"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            reply += chunk
    return reply[:-len(b"MN\r\n")]


class Writer(threading.Thread):
    """Sets and deletes its own keys (one writer per key: its operations are sequential) and reads them."""

    def __init__(self, name: str, address: Tuple[str, int], keys: List[bytes], deadline: float,
                 stop: threading.Event, seed: int) -> None:
        super().__init__(daemon=True, name=name)
        self.client = MemcacheClient(address, timeout=5, connect_timeout=5)
        self.keys = keys
        self.deadline = deadline
        self.stop_event = stop
        self.random = random.Random(seed)
        self.ops: Dict[bytes, List[Tuple[str, int, float, float]]] = {key: [] for key in keys}
        self.reads: List[Tuple[bytes, float, float, Optional[int]]] = []
        self.errors: List[str] = []
        self.seq: Dict[bytes, int] = {key: 0 for key in keys}

    def run(self) -> None:
        count = 0
        while not self.stop_event.is_set() and time.monotonic() < self.deadline and count < 200000:
            count += 1
            key = self.random.choice(self.keys)
            roll = self.random.random()
            start = time.monotonic()
            try:
                if roll < 0.55:
                    self.seq[key] += 1
                    seq = self.seq[key]
                    assert self.client.set(key, b"%d" % seq, noreply=False)
                    self.ops[key].append(("set", seq, start, time.monotonic()))
                elif roll < 0.7:
                    self.seq[key] += 1
                    seq = self.seq[key]
                    self.client.delete(key, noreply=False)
                    self.ops[key].append(("delete", seq, start, time.monotonic()))
                else:
                    value = self.client.get(key)
                    self.reads.append((key, start, time.monotonic(), None if value is None else int(value)))
            except Exception as err:  # noqa: BLE001 - recorded and asserted on
                self.errors.append(f"{key!r}: {err!r}")


class Reader(threading.Thread):
    """Reads everyone's keys through one proxy."""

    def __init__(self, name: str, address: Tuple[str, int], keys: List[bytes], deadline: float,
                 stop: threading.Event, seed: int) -> None:
        super().__init__(daemon=True, name=name)
        self.client = MemcacheClient(address, timeout=5, connect_timeout=5)
        self.keys = keys
        self.deadline = deadline
        self.stop_event = stop
        self.random = random.Random(seed)
        self.reads: List[Tuple[bytes, float, float, Optional[int]]] = []
        self.errors: List[str] = []

    def run(self) -> None:
        count = 0
        while not self.stop_event.is_set() and time.monotonic() < self.deadline and count < 400000:
            count += 1
            batch = self.random.sample(self.keys, 3)
            start = time.monotonic()
            try:
                if count % 2:
                    found = {batch[0]: self.client.get(batch[0])}
                else:
                    found = self.client.get_many(batch)
                end = time.monotonic()
                for key in batch if count % 2 == 0 else batch[:1]:
                    value = found.get(key)
                    self.reads.append((key, start, end, None if value is None else int(value)))
            except Exception as err:  # noqa: BLE001 - recorded and asserted on
                self.errors.append(repr(err))


def stale_reads(writers: List[Writer], reads) -> List[str]:
    """Reads that returned a value older than the last set or delete of its key acknowledged before them."""
    history = {key: ops for writer in writers for key, ops in writer.ops.items()}
    acked = {key: [op[3] for op in ops] for key, ops in history.items()}
    problems = []
    for key, start, end, value in reads:
        ops = history[key]
        if value is None:
            continue             # a miss: a cache may miss
        if not any(kind == "set" and seq == value and began <= end for kind, seq, began, _ in ops):
            problems.append(f"{key!r}: read {value}, which was never written before the read ended")
            continue
        done = bisect.bisect_left(acked[key], start)     # ops acknowledged before the read began
        if done:
            kind, seq, _, _ = ops[done - 1]
            if value < seq or (kind == "delete" and value == seq):
                problems.append(f"{key!r}: read {value} after {kind} #{seq} was acknowledged")
    return problems


@pytest.mark.timeout(180)
def test_memcache_slots_warm_up_under_load_and_no_read_is_stale(tmp_path: Path, memcached_servers,
                                                                processes) -> None:
    url = f"file://{tmp_path / 'coordinator'}"
    a1, a2, b1 = memcached_servers(3)
    dashboard = Dashboard(tmp_path / "dashboard", url, "cache", protocol="memcache").start()
    processes.append(dashboard)
    for command in (("group", "add", "1"), ("server", "add", "1", a1.address), ("server", "add", "1", a2.address),
                    ("group", "add", "2"), ("server", "add", "2", b1.address), ("slots", "assign", "0-1023", "1")):
        admin_ok(dashboard, *command)
    proxies = [ClusterProxy(tmp_path / f"proxy{i}", url, "cache", redis=False, processes=processes).start()
               for i in range(2)]
    wait_for_status(dashboard, lambda s: proxies_at(s, 2), what="two proxies at the generation")
    addresses = [(LOOPBACK, proxy.port) for proxy in proxies]
    setup = MemcacheClient(addresses[0], timeout=5, connect_timeout=5)

    # Items only read during the warm-up: they must arrive with their flags and TTL.
    warm = keys_in(*MOVING, 40, "warm")
    for key in warm:
        assert setup.set(key, b"w" + key, expire=600, flags=7, noreply=False)
    written_at = time.time()
    # What the new group still holds of the slots from long ago must never be served.
    leftover = keys_in(*MOVING, 1, "leftover")[0]
    assert setup.set(leftover, b"fresh", noreply=False)
    MemcacheClient((LOOPBACK, b1.port), timeout=5).set(leftover, b"stale", noreply=False)

    refused = admin(dashboard, "slots", "migrate", "0-511", "2", "--keys-per-second", "5")
    assert refused.returncode == 1 and "warmup_seconds" in refused.stderr, refused.stderr

    stop = threading.Event()
    deadline = time.monotonic() + 90
    owned = keys_in(*MOVING, 90, "load") + keys_in(512, 1023, 30, "load")
    random.Random(1).shuffle(owned)
    writers = [Writer(f"w{i}", addresses[i % 2], owned[i::4], deadline, stop, i) for i in range(4)]
    readers = [Reader(f"r{i}", addresses[(i + 1) % 2], owned, deadline, stop, 10 + i) for i in range(4)]
    threads = writers + readers
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: sum(len(w.reads) for w in writers) > 200, timeout=20, what="the load before")
        started = time.monotonic()
        queued = admin_ok(dashboard, "slots", "migrate", "0-511", "2", "--warmup-seconds", "3")
        assert "queued" in queued
        wait_until(lambda: dashboard.get("/api/migrations")["migrations"][-1]["state"] == "migrating",
                   timeout=30, what="the warm-up")
        assert "warming up" in admin_ok(dashboard, "migration", "status")
        reader = MemcacheClient(addresses[1], timeout=5, connect_timeout=5)
        for key in warm:
            assert reader.get(key) == b"w" + key, key
        assert reader.get(leftover) == b"fresh"
        waited = admin(dashboard, "migration", "wait", timeout=60)
        took = time.monotonic() - started
        assert waited.returncode == 0, waited.stderr + waited.stdout
        assert "finished" in waited.stdout and "warming up" in waited.stdout
        assert took >= 3.0
        count = sum(len(w.reads) for w in writers)
        wait_until(lambda: sum(len(w.reads) for w in writers) > count + 200, timeout=20, what="the load after")
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)

    errors = [error for thread in threads for error in thread.errors]
    assert errors == [], errors[:10]
    reads = [read for thread in threads for read in thread.reads]
    problems = stale_reads(writers, reads)
    assert problems == [], problems[:10]
    moving_reads = [read for read in reads if MOVING[0] <= slot(read[0]) <= MOVING[1] and read[3] is not None]
    assert len(moving_reads) > 100
    sets = sum(1 for w in writers for ops in w.ops.values() for op in ops if op[0] == "set")
    deletes = sum(1 for w in writers for ops in w.ops.values() for op in ops if op[0] == "delete")
    assert sets > 300 and deletes > 50

    # The slots are the new group's; the items read during the warm-up are there, flags and TTL kept.
    status = status_json(dashboard)
    assert {"first": 0, "last": 511, "group": 2, "state": "stable"} in status["slots"]
    wait_for_status(dashboard, lambda s: proxies_at(s, 2), what="the proxies at the last generation")
    elapsed = time.time() - written_at
    for key in warm:
        reply = meta(b1.port, b"mg %s v f t" % key)
        head, _, data = reply.partition(b"\r\n")
        tokens = head.split()
        assert tokens[0] == b"VA" and data == b"w" + key + b"\r\n", (key, reply)
        ttl = int(next(t for t in tokens if t.startswith(b"t"))[1:])
        assert b"f7" in tokens and 600 - elapsed - 3 <= ttl <= 600, (key, reply, elapsed)
    assert MemcacheClient(addresses[0], timeout=5).get(leftover) == b"fresh"
    # After the finish the proxies serve the new group alone: a key deleted there stays deleted.
    for key in owned:
        if MOVING[0] <= slot(key) <= MOVING[1]:
            setup.delete(key, noreply=False)
            assert setup.get(key) is None
            assert MemcacheClient(addresses[1], timeout=5).get(key) is None


@pytest.mark.timeout(120)
def test_a_cancelled_warm_up_gives_the_slots_back_with_nothing_stale(tmp_path: Path, memcached_servers,
                                                                     processes) -> None:
    """Cancel mid warm-up: the old group owns the slots again; a value set during the warm-up (on the new
    group) was deleted on the old one, so it is a miss there, never the older value."""
    url = f"file://{tmp_path / 'coordinator'}"
    a1, b1 = memcached_servers(2)
    dashboard = Dashboard(tmp_path / "dashboard", url, "cache", protocol="memcache").start()
    processes.append(dashboard)
    for command in (("group", "add", "1"), ("server", "add", "1", a1.address), ("group", "add", "2"),
                    ("server", "add", "2", b1.address), ("slots", "assign", "0-1023", "1")):
        admin_ok(dashboard, *command)
    proxy = ClusterProxy(tmp_path / "proxy", url, "cache", redis=False, processes=processes).start()
    wait_for_status(dashboard, lambda s: proxies_at(s, 1), what="the proxy at the generation")
    client = MemcacheClient((LOOPBACK, proxy.port), timeout=5, connect_timeout=5)
    changed, kept = keys_in(*MOVING, 2, "c")
    for key in (changed, kept):
        assert client.set(key, b"old", noreply=False)
    admin_ok(dashboard, "slots", "migrate", "0-511", "2", "--warmup-seconds", "600")
    wait_until(lambda: dashboard.get("/api/migrations")["migrations"][-1]["state"] == "migrating",
               timeout=30, what="the warm-up")
    assert client.set(changed, b"new", noreply=False)
    assert client.get(kept) == b"old"
    admin_ok(dashboard, "migration", "cancel")
    waited = admin(dashboard, "migration", "wait", "1", timeout=60)
    assert waited.returncode == 1 and "cancelled" in waited.stderr
    assert {"first": 0, "last": 1023, "group": 1, "state": "stable"} in status_json(dashboard)["slots"]
    wait_for_status(dashboard, lambda s: proxies_at(s, 1), what="the proxy at the last generation")
    assert client.get(changed) is None
    assert client.get(kept) == b"old"


@pytest.mark.timeout(120)
def test_a_paused_warm_up_stops_its_clock_and_a_restarted_dashboard_goes_on(tmp_path: Path, memcached_servers,
                                                                            processes) -> None:
    """Paused: the warm-up does not end, even across a dashboard killed and started again; resumed, it ends
    after the seconds it had left."""
    url = f"file://{tmp_path / 'coordinator'}"
    a1, b1 = memcached_servers(2)
    dashboard = Dashboard(tmp_path / "dashboard", url, "cache", protocol="memcache").start()
    processes.append(dashboard)
    for command in (("group", "add", "1"), ("server", "add", "1", a1.address), ("group", "add", "2"),
                    ("server", "add", "2", b1.address), ("slots", "assign", "0-1023", "1")):
        admin_ok(dashboard, *command)
    proxy = ClusterProxy(tmp_path / "proxy", url, "cache", redis=False, processes=processes).start()
    wait_for_status(dashboard, lambda s: proxies_at(s, 1), what="the proxy at the generation")
    client = MemcacheClient((LOOPBACK, proxy.port), timeout=5, connect_timeout=5)
    key = keys_in(*MOVING, 1, "p")[0]
    assert client.set(key, b"kept", noreply=False)

    def entry() -> dict:
        return dashboard.get("/api/migrations")["migrations"][-1]

    admin_ok(dashboard, "slots", "migrate", "0-511", "2", "--warmup-seconds", "3")
    wait_until(lambda: entry()["state"] == "migrating", timeout=30, what="the warm-up")
    admin_ok(dashboard, "migration", "pause")
    wait_until(lambda: entry()["warmup_until"] is None and entry()["warmup_left"] is not None, timeout=30,
               what="the warm-up clock stopped")
    left = entry()["warmup_left"]
    assert 0 < left <= 3
    dashboard.kill()
    dashboard.start()
    paused_at = time.monotonic()
    wait_until(lambda: time.monotonic() - paused_at > left + 1.5, timeout=10, interval=0.2, what="time passing")
    m = entry()
    assert (m["state"], m["paused"], m["warmup_left"]) == ("migrating", True, left)
    assert client.get(key) == b"kept"      # served (warmed up) all the while
    resumed = time.monotonic()
    admin_ok(dashboard, "migration", "resume")
    waited = admin(dashboard, "migration", "wait", "1", timeout=60)
    assert waited.returncode == 0, waited.stderr
    assert time.monotonic() - resumed >= left - 0.5
    assert {"first": 0, "last": 511, "group": 2, "state": "stable"} in status_json(dashboard)["slots"]


@pytest.mark.timeout(60)
def test_a_redis_cluster_refuses_a_warm_up(tmp_path: Path) -> None:
    dashboard = Dashboard(tmp_path / "dashboard", f"file://{tmp_path / 'coordinator'}", "shop").start()
    try:
        done = admin(dashboard, "slots", "migrate", "0-9", "2", "--warmup-seconds", "3")
        assert done.returncode == 1 and "warmup_seconds is for memcache clusters" in done.stderr, done.stderr
    finally:
        dashboard.stop()
