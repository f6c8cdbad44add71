"""Hot reload under load: client load that sees every error and reconnect,
and the check of every acknowledged write on the backends.

Used by tests/integration/test_reload.py and test_reload_workers.py.  The
pieces:

- :class:`Timeline`: the configuration of every generation and, for each
  reload, the window in which the proxy switched (from sending SIGHUP to
  seeing the new generation in the bound-addresses file).  A request sent
  in ``[t0, t1]`` was routed by one of the generations whose window meets it.
- :class:`RedisLoad` / :class:`MemcacheLoad`: one client thread each, unique
  keys with unique values, every reply checked, connections counted.
- :func:`check_writes`: every acknowledged write is on the server a
  possible generation placed it on, with its value, and nowhere else.
- :class:`ReloadDriver` and :func:`load_through_reloads`: the proxy driven
  through a sequence of layouts under that load, every check applied.

The pool files (:class:`~tests.reload_layouts.Layout`) are in
tests/reload_layouts.py, the clients and the proxy's reports in
tests/proxy_clients.py.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import redis

from tests.proxy_clients import (
    CLIENT_TIMEOUT,
    memcache_client,
    probe,
    redis_client,
    redis_connects,
    refuses,
    split_address,
    wait_for_generation,
    write_atomically,
)
from tests.reload_layouts import Layout
from tests.servers import LOOPBACK, wait_until

# -- which generation could have routed a request ------------------------------


class Timeline:
    """Every generation's configuration, and when the proxy switched to it."""

    def __init__(self, first_text: str) -> None:
        self.texts: List[str] = [first_text]
        self.configs: List[Dict[str, object]] = [self._load(first_text)]
        # windows[g]: (SIGHUP sent, generation seen); generation 0 here is the start-up one.
        self.windows: List[Tuple[float, float]] = [(float("-inf"), float("-inf"))]
        self._pools: Dict[Tuple[int, str], object] = {}

    @staticmethod
    def _load(text: str) -> Dict[str, object]:
        from twinproxy.config import load_text

        return {config.name: config for config in load_text(text)}

    def add(self, text: str, sent: float, seen: float) -> None:
        self.texts.append(text)
        self.configs.append(self._load(text))
        self.windows.append((sent, seen))

    def candidates(self, t0: float, t1: float) -> List[int]:
        """Indexes of the generations that may have routed a request sent within ``[t0, t1]``."""
        found = []
        last = len(self.configs) - 1
        for index in range(len(self.configs)):
            began = self.windows[index][0]  # at the earliest
            ended = self.windows[index + 1][1] if index < last else float("inf")  # at the latest
            if began <= t1 and ended >= t0:
                found.append(index)
        return found

    def placement(self, index: int, pool: str, key: str) -> Optional[Tuple[str, int]]:
        """(server address, redis db) that generation ``index`` puts ``key`` on; None if no such pool."""
        config = self.configs[index].get(pool)
        if config is None:
            return None
        service = self._pools.get((index, pool))
        if service is None:
            from twisted.internet.task import Clock

            from twinproxy.pool import ServerPool

            service = self._pools[(index, pool)] = ServerPool(config, Clock())
        server = service.server_for_key(key.encode())
        return server.spec.address, config.redis_db if config.redis else 0


# -- client load -----------------------------------------------------------------


@dataclass
class Write:
    key: str
    value: str
    t0: float
    t1: float


class Load(threading.Thread):
    """One client thread: batches of unique writes read back at once, until stopped,
    ``max_batches`` or ``deadline``; every unexpected reply or exception is kept."""

    def __init__(self, pool: str, address: str, tag: str, deadline: float, max_batches: int = 100000) -> None:
        super().__init__(name=f"load-{tag}", daemon=True)
        self.pool = pool
        self.address = address
        self.tag = tag
        self.deadline = deadline
        self.max_batches = max_batches
        self.stop_event = threading.Event()
        self.batches = 0
        self.writes: List[Write] = []
        self.errors: List[str] = []
        self.wrong: List[str] = []
        # (key, t0, t1): read back as missing, allowed only across a re-shard
        self.misses: List[Tuple[str, float, float]] = []
        self.connects = 0

    def keys(self, seq: int) -> Tuple[str, str]:
        raise NotImplementedError

    def connect(self):
        raise NotImplementedError

    def batch(self, client, items: List[Tuple[str, str]], t0: float) -> None:
        raise NotImplementedError

    def connections(self, client) -> int:
        raise NotImplementedError

    def run(self) -> None:
        try:
            client = self.connect()
        except Exception as err:  # noqa: BLE001 - reported by the test
            self.errors.append(f"{self.tag}: cannot connect to {self.address}: {type(err).__name__}: {err}")
            return
        try:
            seq = 0
            while (not self.stop_event.is_set() and seq < self.max_batches
                   and time.monotonic() < self.deadline and len(self.errors) < 20):
                first, second = self.keys(seq)
                items = [(first, f"{self.tag}-{seq}-a"), (second, f"{self.tag}-{seq}-b")]
                t0 = time.monotonic()
                try:
                    self.batch(client, items, t0)
                except Exception as err:  # noqa: BLE001 - every failure is what the test reports
                    self.errors.append(f"{self.tag} batch {seq}: {type(err).__name__}: {err}")
                seq += 1
                self.batches = seq
        finally:
            self.connects = self.connections(client)
            client.close()

    def expect(self, key: str, value: str, got, t0: float) -> None:
        if got is None:
            self.misses.append((key, t0, time.monotonic()))
        elif got != value.encode():
            self.wrong.append(f"{self.tag}: {key} read {got!r}, wrote {value!r}")

    def stop(self) -> None:
        self.stop_event.set()


class RedisLoad(Load):
    """Pipelines of SET, SET, GET, MGET (two keys, usually two servers), GET."""

    def keys(self, seq: int) -> Tuple[str, str]:
        return f"r{self.tag}:{seq}:a", f"r{self.tag}:{seq}:b"

    def connect(self):
        client = redis_client(self.address)
        client.ping()
        return client

    def connections(self, client) -> int:
        return redis_connects(client)

    def batch(self, client, items, t0) -> None:
        (k1, v1), (k2, v2) = items
        pipe = client.pipeline(transaction=False)
        pipe.set(k1, v1)
        pipe.set(k2, v2)
        pipe.get(k1)
        pipe.mget(k1, k2)
        pipe.get(k2)
        replies = pipe.execute(raise_on_error=False)
        t1 = time.monotonic()
        for (key, value), reply in zip(items, replies[:2]):
            if reply is True:
                self.writes.append(Write(key, value, t0, t1))
            else:
                self.errors.append(f"{self.tag}: SET {key} answered {reply!r}")
        got_mget = replies[3] if isinstance(replies[3], list) and len(replies[3]) == 2 else None
        if got_mget is None:
            self.errors.append(f"{self.tag}: MGET {k1} {k2} answered {replies[3]!r}")
            got_mget = [v1.encode(), v2.encode()]
        for (key, value), got in zip(items + items, [replies[2], replies[4], *got_mget]):
            if isinstance(got, Exception):
                self.errors.append(f"{self.tag}: GET {key} answered {got!r}")
            else:
                self.expect(key, value, got, t0)


class MemcacheLoad(Load):
    """A pipelined two-key set, a two-key get (fan-out), one get."""

    def keys(self, seq: int) -> Tuple[str, str]:
        # A hash-tag part, for the steps that give the pool a hash_tag.
        return f"m{self.tag}:{{t{seq % 97}}}:{seq}:a", f"m{self.tag}:{{t{(seq * 7) % 89}}}:{seq}:b"

    def connect(self):
        client = memcache_client(self.address)
        client.version()
        return client

    def connections(self, client) -> int:
        return client.connects

    def batch(self, client, items, t0) -> None:
        (k1, v1), (k2, v2) = items
        failed = client.set_many({k1: v1.encode(), k2: v2.encode()})
        t1 = time.monotonic()
        for key, value in items:
            if key in failed:
                self.errors.append(f"{self.tag}: set {key} was not stored")
            else:
                self.writes.append(Write(key, value, t0, t1))
        both = client.get_many([k1, k2])
        unexpected = set(both) - {k1, k2}
        if unexpected:
            self.wrong.append(f"{self.tag}: get {k1} {k2} answered keys {sorted(unexpected)}")
        self.expect(k1, v1, both.get(k1), t0)
        self.expect(k2, v2, both.get(k2), t0)
        self.expect(k1, v1, client.get(k1), t0)


def progress(loads: Iterable[Load], at_least: int, timeout: float = 20.0) -> None:
    """Wait until every load thread has done ``at_least`` more batches than now."""
    loads = list(loads)
    targets = [(load, load.batches + at_least) for load in loads]

    def done() -> object:
        if any(not load.is_alive() for load, _ in targets):
            return "ended"
        return all(load.batches >= target for load, target in targets)

    if wait_until(done, timeout=timeout, interval=0.02, what=f"{at_least} more batches from every client") == "ended":
        dead = [load.tag for load, _ in targets if not load.is_alive()]
        raise AssertionError(f"load threads ended early: {dead}; errors: "
                             f"{[e for load in loads for e in load.errors][:5]}")


# -- the check on the backends ---------------------------------------------------


def _chunks(items: Sequence, size: int = 500):
    for start in range(0, len(items), size):
        yield items[start:start + size]


Found = Dict[str, List[Tuple[Tuple[str, int], bytes]]]  # key -> [((address, db), value)]


def redis_locations(keys: Sequence[str], backends, dbs: Iterable[int]) -> Found:
    """Where each key is, read on every backend directly."""
    found: Found = {}
    for backend in backends:
        for db in dbs:
            client = redis.Redis(host=LOOPBACK, port=backend.port, db=db, protocol=2,
                                 socket_timeout=CLIENT_TIMEOUT)
            try:
                for chunk in _chunks(list(keys)):
                    for key, value in zip(chunk, client.mget(chunk)):
                        if value is not None:
                            found.setdefault(key, []).append(((backend.address, db), value))
            finally:
                client.close()
    return found


def memcache_locations(keys: Sequence[str], backends) -> Found:
    found: Found = {}
    for backend in backends:
        client = backend.client()
        try:
            for chunk in _chunks(list(keys), 100):
                for key, value in client.get_many(chunk).items():
                    found.setdefault(key, []).append(((backend.address, 0), value))
        finally:
            client.close()
    return found


@dataclass
class Verdict:
    checked: int = 0
    absent: int = 0  # cache pools only: allowed when the write met a re-shard
    problems: List[str] = field(default_factory=list)


def check_writes(timeline: Timeline, pool: str, writes: Sequence[Write],
                 found: Found, cache: bool) -> Verdict:
    """Every acknowledged write is on a server some possible generation placed it on, with its
    value, and on no other server; a cache pool may have lost it only across a re-shard."""
    verdict = Verdict()
    for write in writes:
        verdict.checked += 1
        places = {timeline.placement(index, pool, write.key)
                  for index in timeline.candidates(write.t0, write.t1)} - {None}
        where = found.get(write.key, [])
        if not where:
            if cache and len(places) > 1:
                verdict.absent += 1
            else:
                verdict.problems.append(f"{pool}: {write.key} (written in {write.t0:.3f}-{write.t1:.3f}) is "
                                        f"on no backend; expected on {sorted(places)}")
            continue
        if len(where) > 1:
            verdict.problems.append(f"{pool}: {write.key} is on several backends: {where}")
        location, value = where[0]
        if value != write.value.encode():
            verdict.problems.append(f"{pool}: {write.key} has {value!r} on {location}, wrote {write.value!r}")
        elif location not in places:
            verdict.problems.append(f"{pool}: {write.key} is on {location}; the generations that could have "
                                    f"routed it ({timeline.candidates(write.t0, write.t1)}) put it on "
                                    f"{sorted(places)}")
    return verdict


def check_misses(timeline: Timeline, pool: str, misses: Sequence[Tuple[str, float, float]]) -> List[str]:
    """A read-back that found nothing is allowed only when a reload that moved the key met the batch."""
    problems = []
    for key, t0, t1 in misses:
        places = {timeline.placement(index, pool, key) for index in timeline.candidates(t0, t1)} - {None}
        if len(places) < 2:
            problems.append(f"{pool}: {key} read back as missing at {t0:.3f}-{t1:.3f} with no re-shard "
                            f"in between (always on {sorted(places)})")
    return problems


# -- the proxy, driven through its reloads -----------------------------------------


class ReloadDriver:
    """Rewrites the pool file, signals the proxy, waits for the new generation and
    records the window in the :class:`Timeline`."""

    def __init__(self, process, config_path: os.PathLike, bound_path: os.PathLike, redis_backends,
                 memcache_backends, layout: Layout) -> None:
        self.process = process
        self.config_path = config_path
        self.bound_path = bound_path
        self.redis_addresses = [b.address for b in redis_backends]
        self.memcache_addresses = [b.address for b in memcache_backends]
        self.layout = layout
        text = self.render(layout)
        with open(config_path, encoding="utf-8") as inp:
            assert inp.read() == text, "start the proxy on driver.render(layout)"
        self.timeline = Timeline(text)
        self.bound = wait_for_generation(bound_path, 1, process)
        assert self.bound["generation"] == 1, self.bound

    def render(self, layout: Layout) -> str:
        return layout.render(self.redis_addresses, self.memcache_addresses)

    def reload(self, layout: Layout) -> dict:
        """Apply ``layout`` by SIGHUP; return the new bound-addresses document."""
        import signal

        generation = self.bound["generation"] + 1
        text = self.render(layout)
        write_atomically(self.config_path, text)
        sent = time.monotonic()
        self.process.proc.send_signal(signal.SIGHUP)
        bound = wait_for_generation(self.bound_path, generation, self.process)
        seen = time.monotonic()
        assert bound["generation"] == generation, f"one SIGHUP, one generation: {bound}"
        self.timeline.add(text, sent, seen)
        self.layout, self.bound = layout, bound
        return bound


def check_addresses(old_layout: Layout, new_layout: Layout, old_bound: dict, new_bound: dict, token: str) -> None:
    """After a reload: the bound pools are the file's; an unchanged ``:0`` kept its port; a new client
    is served at every pool's (new) address; an address no pool has any more refuses connections."""
    assert set(new_bound["pools"]) == set(new_layout.pools), new_bound
    for name, pool in new_layout.pools.items():
        address = new_bound["pools"][name]
        if pool.listen.startswith("/"):
            assert address == pool.listen.split()[0], (name, new_bound)
        else:
            assert address.startswith(f"{LOOPBACK}:") and split_address(address)[1] > 0, (name, new_bound)
            if not pool.listen.endswith(":0"):
                assert address == pool.listen, (name, new_bound)
            before = old_layout.pools.get(name)
            if before is not None and (before.listen, before.redis) == (pool.listen, pool.redis):
                assert address == old_bound["pools"][name], f"pool {name} changed port: {old_bound} -> {new_bound}"
        probe(address, pool.redis, f"{token}-{name}")
    still = set(new_bound["pools"].values())
    for name, address in old_bound["pools"].items():
        if address not in still:
            wait_until(lambda address=address: refuses(address), timeout=10,
                       what=f"the old address {address} of pool {name} to close")


def load_through_reloads(driver: ReloadDriver, layouts: Sequence[Tuple[str, Layout]], redis_backends,
                         memcache_backends, clients: int = 4, seconds: float = 100.0,
                         batches_between: int = 20) -> Dict[str, int]:
    """``clients`` Redis and ``clients`` memcached client threads on ``rpool`` and ``mpool`` while
    every layout is applied in turn; then every check of the module.  Returns counts for the report."""
    deadline = time.monotonic() + seconds
    pools = driver.bound["pools"]
    loads: List[Load] = [RedisLoad("rpool", pools["rpool"], f"r{i}", deadline) for i in range(clients)]
    loads += [MemcacheLoad("mpool", pools["mpool"], f"m{i}", deadline) for i in range(clients)]
    for load in loads:
        load.start()
    try:
        progress(loads, batches_between)
        for number, (description, layout) in enumerate(layouts, 1):
            old_layout, old_bound = driver.layout, driver.bound
            try:
                new_bound = driver.reload(layout)
                check_addresses(old_layout, layout, old_bound, new_bound, f"g{new_bound['generation']}")
                progress(loads, batches_between)
            except AssertionError as err:
                raise AssertionError(f"reload {number} ({description}): {err}") from None
    finally:
        for load in loads:
            load.stop()
        for load in loads:
            load.join(CLIENT_TIMEOUT + 5)
    assert not [load.tag for load in loads if load.is_alive()], "a client thread hangs"
    errors = [error for load in loads for error in load.errors]
    assert errors == [], f"{len(errors)} errors, first: {errors[:10]}"
    wrong = [text for load in loads for text in load.wrong]
    assert wrong == [], f"{len(wrong)} wrong replies, first: {wrong[:10]}"
    reconnects = {load.tag: load.connects for load in loads if load.connects != 1}
    assert reconnects == {}, f"clients that connected more than once (a dropped connection): {reconnects}"
    timeline = driver.timeline
    summary = {"batches": sum(load.batches for load in loads), "reloads": len(layouts),
               "slowest_reload_ms": int(1000 * max(seen - sent for sent, seen in timeline.windows[1:]))}
    problems: List[str] = []
    for pool, cache in (("rpool", False), ("mpool", True)):
        mine = [load for load in loads if load.pool == pool]
        misses = [miss for load in mine for miss in load.misses]
        problems += check_misses(timeline, pool, misses)
        writes = [write for load in mine for write in load.writes]
        keys = [write.key for write in writes]
        if cache:
            found = memcache_locations(keys, memcache_backends)
        else:
            dbs = sorted({config.redis_db for configs in timeline.configs for config in configs.values()
                          if config.redis})
            found = redis_locations(keys, redis_backends, dbs)
        verdict = check_writes(timeline, pool, writes, found, cache)
        problems += verdict.problems
        summary[f"{pool}_writes"] = verdict.checked
        summary[f"{pool}_misses"] = len(misses)
        summary[f"{pool}_absent"] = verdict.absent
    assert problems == [], f"{len(problems)} misplaced or lost writes, first: {problems[:10]}"
    return summary


__all__ = ["Load", "MemcacheLoad", "RedisLoad", "ReloadDriver", "Timeline", "Verdict", "Write", "check_addresses",
           "check_misses", "check_writes", "load_through_reloads", "memcache_locations", "progress",
           "redis_locations"]
