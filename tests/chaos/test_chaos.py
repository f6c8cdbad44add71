"""Load from both protocols while backends are killed, frozen and restarted on a schedule.

Afterwards: every request was answered (a value or an error, never a hang or
a dropped connection), no reply reached the wrong client or key, and every
write the proxy acknowledged is readable.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Dict, List

import redis
from pymemcache import Client
from pymemcache.exceptions import MemcacheServerError

from tests.conftest import pool_yaml
from tests.servers import LOOPBACK

LOAD_SECONDS = 12
TIMEOUT_MS = 400
CLIENT_TIMEOUT = TIMEOUT_MS / 1000 + 3   # a reply later than this is a hang
KEYS_PER_CLIENT = 40


class Tracker:
    """One client's writes: the last acknowledged value of each key, and later unacknowledged ones."""

    def __init__(self) -> None:
        self.acked: Dict[str, int] = {}
        self.unacked: Dict[str, List[int]] = {}
        self.answered = 0
        self.errors = 0
        self.problems: List[str] = []

    def allowed(self, key: str, n: int) -> bool:
        last = self.acked.get(key, -1)
        return n == last or (n > last and n in self.unacked.get(key, ()))


def value_parts(value: bytes):
    client_id, key, n = value.decode().split("|")
    return client_id, key, int(n)


def redis_worker(port: int, client_id: str, keys: List[str], tracker: Tracker, stop: threading.Event) -> None:
    client = redis.Redis(host=LOOPBACK, port=port, protocol=2, socket_timeout=CLIENT_TIMEOUT)
    n = 0
    rng = random.Random(client_id)
    while not stop.is_set():
        key = rng.choice(keys)
        n += 1
        try:
            if rng.random() < 0.5:
                value = f"{client_id}|{key}|{n}"
                tracker.unacked.setdefault(key, []).append(n)
                if client.set(key, value):
                    tracker.acked[key] = n
            else:
                value = client.get(key)
                if value is not None:
                    owner, owner_key, written = value_parts(value)
                    if (owner, owner_key) != (client_id, key) or not tracker.allowed(key, written):
                        tracker.problems.append(f"{key}: read {value!r}")
            tracker.answered += 1
        except redis.ResponseError:
            tracker.answered += 1
            tracker.errors += 1
        except (redis.TimeoutError, redis.ConnectionError) as err:
            tracker.problems.append(f"{key}: no answer: {err!r}")
            client = redis.Redis(host=LOOPBACK, port=port, protocol=2, socket_timeout=CLIENT_TIMEOUT)


def memcache_worker(port: int, client_id: str, keys: List[str], tracker: Tracker, stop: threading.Event) -> None:
    client = Client((LOOPBACK, port), timeout=CLIENT_TIMEOUT, default_noreply=False)
    n = 0
    rng = random.Random(client_id)
    while not stop.is_set():
        key = rng.choice(keys)
        n += 1
        try:
            if rng.random() < 0.5:
                tracker.unacked.setdefault(key, []).append(n)
                if client.set(key, f"{client_id}|{key}|{n}".encode()):
                    tracker.acked[key] = n
            else:
                values = client.get_many([key, rng.choice(keys)])
                for got_key, value in values.items():
                    owner, owner_key, written = value_parts(value)
                    if (owner, owner_key) != (client_id, got_key) or not tracker.allowed(got_key, written):
                        tracker.problems.append(f"{got_key}: read {value!r}")
            tracker.answered += 1
        except MemcacheServerError:
            tracker.answered += 1
            tracker.errors += 1
        except Exception as err:  # noqa: BLE001 - any other outcome is a failure to report
            tracker.problems.append(f"{key}: no answer: {err!r}")
            client = Client((LOOPBACK, port), timeout=CLIENT_TIMEOUT, default_noreply=False)


def keys_on(service, indexes, prefix: str, count: int) -> List[str]:
    names = {service.pool.servers[i].name for i in indexes}
    found = []
    i = 0
    while len(found) < count:
        key = f"{prefix}{i}"
        if service.pool.server_for_key(key.encode()).name in names:
            found.append(key)
        i += 1
    return found


def test_chaos_both_protocols(redis_servers, memcached_servers, proxy) -> None:
    redis_backends = redis_servers(3)
    caches = memcached_servers(3)
    keys = dict(timeout=str(TIMEOUT_MS), hash="murmur", server_connections="2")
    redis_pool = proxy(pool_yaml(redis_backends, **keys))
    cache_pool = proxy(pool_yaml(caches, **keys).replace("alpha:", "beta:"))

    stop = threading.Event()
    trackers: Dict[str, Tracker] = {}
    threads = []
    for i in range(4):
        client_id = f"r{i}"
        trackers[client_id] = Tracker()
        own = keys_on(redis_pool, (0, 1, 2), f"{client_id}:", KEYS_PER_CLIENT)
        threads.append(threading.Thread(target=redis_worker, args=(redis_pool.port_number, client_id, own,
                                                                   trackers[client_id], stop)))
    for i in range(4):
        client_id = f"m{i}"
        trackers[client_id] = Tracker()
        # Tracked memcached keys live on servers 0 and 1; server 2 is the one that gets restarted.
        own = keys_on(cache_pool, (0, 1), f"{client_id}:", KEYS_PER_CLIENT)
        threads.append(threading.Thread(target=memcache_worker, args=(cache_pool.port_number, client_id, own,
                                                                      trackers[client_id], stop)))
    for thread in threads:
        thread.start()

    rng = random.Random(7)
    faults: List[str] = []
    try:
        deadline = time.monotonic() + LOAD_SECONDS
        while time.monotonic() < deadline:
            action = rng.choice(["freeze-redis", "kill-connections", "restart-memcached", "freeze-memcached"])
            if action == "freeze-redis":
                victim = rng.choice(redis_backends)
                victim.freeze()
                stop.wait(rng.uniform(0.2, 0.9))
                victim.thaw()
            elif action == "kill-connections":
                rng.choice(redis_backends).client().client_kill_filter(_type="normal")
            elif action == "restart-memcached":
                caches[2].restart()
            else:
                victim = rng.choice(caches[:2])
                victim.freeze()
                stop.wait(rng.uniform(0.2, 0.9))
                victim.thaw()
            faults.append(action)
            stop.wait(rng.uniform(0.3, 0.8))
    finally:
        stop.set()
        for backend in [*redis_backends, *caches]:
            backend.thaw()
        for thread in threads:
            thread.join(30)
    assert not any(thread.is_alive() for thread in threads), "a client is stuck"

    problems = [f"{cid}: {p}" for cid, t in trackers.items() for p in t.problems]
    assert not problems, "\n".join(problems[:20])
    assert all(t.answered > 20 for t in trackers.values()), {cid: t.answered for cid, t in trackers.items()}
    assert len(faults) >= 8

    # Every acknowledged write is there (or a later one whose reply was an error).
    rc = redis.Redis(host=LOOPBACK, port=redis_pool.port_number, protocol=2, socket_timeout=10)
    mc = Client((LOOPBACK, cache_pool.port_number), timeout=10, default_noreply=False)
    lost = []
    for client_id, tracker in trackers.items():
        for key, n in tracker.acked.items():
            value = rc.get(key) if client_id.startswith("r") else mc.get(key)
            if value is None or not tracker.allowed(key, value_parts(value)[2]):
                lost.append(f"{key}: acknowledged {n}, read {value!r}")
    assert not lost, "\n".join(lost[:20])
    print({cid: (t.answered, t.errors) for cid, t in trackers.items()}, faults)
