"""Hot reload under load: pool files as values, client load that sees every
error and reconnect, and the check of every acknowledged write on the backends.

Used by tests/integration/test_reload.py and test_reload_workers.py.  The
pieces:

- :class:`Layout` / :class:`PoolLayout`: a pool file as data (servers named
  by the index of a real backend), rendered to nutcracker YAML; the steps
  of a reload sequence are small functions that change a copy of it.
- :class:`Timeline`: the configuration of every generation and, for each
  reload, the window in which the proxy switched (from sending SIGHUP to
  seeing the new generation in the bound-addresses file).  A request sent
  in ``[t0, t1]`` was routed by one of the generations whose window meets it.
- :class:`RedisLoad` / :class:`MemcacheLoad`: one client thread each, unique
  keys with unique values, every reply checked, connections counted.
- :func:`check_writes`: every acknowledged write is on the server a
  possible generation placed it on, with its value, and nowhere else.
"""

from __future__ import annotations

import copy
import json
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import redis
from pymemcache.client.base import Client as MemcacheClient
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.servers import LOOPBACK, bound_addresses, wait_until

CLIENT_TIMEOUT = 10  # seconds; a reply later than this is a hang, reported as an error
RELOAD_DEADLINE = 20  # seconds for one reload to show up in the bound-addresses file


# -- files and the proxy's own reports ----------------------------------------


def write_atomically(path: os.PathLike, text: str) -> None:
    """Replace ``path`` in one rename, so a reload never reads half a file."""
    path = os.fspath(path)
    partial = f"{path}.partial"
    with open(partial, "w", encoding="utf-8") as out:
        out.write(text)
    os.replace(partial, path)


def read_bound(path: os.PathLike) -> Optional[dict]:
    """The bound-addresses document, or None while it does not exist yet."""
    try:
        with open(path, encoding="utf-8") as inp:
            return json.load(inp)
    except FileNotFoundError:
        return None


def wait_for_generation(path: os.PathLike, generation: int, process=None,
                        timeout: float = RELOAD_DEADLINE) -> dict:
    """Wait until the bound-addresses file of ``process`` shows ``generation`` (or later); return it."""
    return bound_addresses(Path(path), process, generation=generation, timeout=timeout)


def split_address(address: str) -> Tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def read_stats(address: str) -> dict:
    """nutcracker's stats port: connect, read until EOF, one JSON document."""
    with socket.create_connection(split_address(address), timeout=CLIENT_TIMEOUT) as sock:
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return json.loads(b"".join(chunks))


def http(address: str, path: str, method: str = "GET") -> Tuple[int, str]:
    """(status, body) of one HTTP request to the proxy's --http-port endpoint."""
    data = b"" if method == "POST" else None
    request = urllib.request.Request(f"http://{address}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=CLIENT_TIMEOUT) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def metric(text: str, name: str) -> float:
    """The sum of every sample of ``name`` in a Prometheus text page (KeyError if absent)."""
    found = [float(match.group(2)) for match in
             re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text, re.MULTILINE)]
    if not found:
        raise KeyError(f"{name} not in /metrics:\n{text[:2000]}")
    return sum(found)


def refuses(address: str) -> bool:
    """True when nothing accepts connections at ``address`` (host:port or a socket path)."""
    try:
        if address.startswith("/"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(2)
            try:
                sock.connect(address)
            finally:
                sock.close()
        else:
            socket.create_connection(split_address(address), timeout=2).close()
    except OSError:
        return True
    return False


# -- clients that count their connections --------------------------------------


def _counting(base: type) -> type:
    class Counting(base):
        connects = 0

        def _connect(self):
            sock = super()._connect()
            type(self).connects += 1
            return sock

    return Counting


def redis_client(address: str, **kwargs) -> redis.Redis:
    """A redis-py client, no retries (a drop is an error), which counts its connects.

    Used from one thread, its pool holds one connection (commands and
    pipelines alike); a connection found closed is replaced silently, which
    ``client.connection_pool.connection_class.connects`` (how many times it
    connected) shows.
    """
    common = dict(socket_timeout=CLIENT_TIMEOUT, socket_connect_timeout=CLIENT_TIMEOUT,
                  retry=Retry(NoBackoff(), 0), protocol=2, **kwargs)
    if address.startswith("/"):
        pool = redis.ConnectionPool(connection_class=_counting(redis.UnixDomainSocketConnection),
                                    path=address, **common)
    else:
        host, port = split_address(address)
        pool = redis.ConnectionPool(connection_class=_counting(redis.Connection), host=host, port=port,
                                    **common)
    return redis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))


def redis_connects(client: redis.Redis) -> int:
    return client.connection_pool.connection_class.connects


class CountingMemcacheClient(MemcacheClient):
    """pymemcache's client, counting how many times it (re)connected."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.connects = 0

    def _connect(self) -> None:
        super()._connect()
        self.connects += 1


def memcache_client(address: str) -> CountingMemcacheClient:
    server = address if address.startswith("/") else split_address(address)
    return CountingMemcacheClient(server, timeout=CLIENT_TIMEOUT, connect_timeout=CLIENT_TIMEOUT,
                                  default_noreply=False)


def probe(address: str, is_redis: bool, token: str) -> None:
    """A new client at ``address``: one write and its read-back, then close."""
    key, value = f"probe:{token}", f"probe-value-{token}"
    if is_redis:
        client = redis_client(address)
        try:
            assert client.set(key, value) is True
            assert client.get(key) == value.encode()
        finally:
            client.close()
    else:
        client = memcache_client(address)
        try:
            assert client.set(key, value.encode()) is True
            assert client.get(key) == value.encode()
        finally:
            client.close()


# -- pool files as data ----------------------------------------------------------


@dataclass
class Server:
    backend: int  # index into the real redis-servers (Redis pools) or memcacheds
    weight: int = 1
    name: Optional[str] = None


@dataclass
class PoolLayout:
    listen: str
    redis: bool
    servers: List[Server]
    keys: Dict[str, str] = field(default_factory=dict)

    def server(self, backend: int) -> Server:
        return next(s for s in self.servers if s.backend == backend)

    def named(self, name: str) -> Server:
        return next(s for s in self.servers if s.name == name)


@dataclass
class Layout:
    """A whole pool file; ``render`` turns backend indexes into the real addresses."""

    pools: Dict[str, PoolLayout]

    def copy(self) -> "Layout":
        return copy.deepcopy(self)

    def render(self, redis_addresses: Sequence[str], memcache_addresses: Sequence[str]) -> str:
        lines = []
        for name, pool in self.pools.items():
            addresses = redis_addresses if pool.redis else memcache_addresses
            lines += [f"{name}:", f"  listen: {pool.listen}", f"  redis: {'true' if pool.redis else 'false'}"]
            lines += [f"  {key}: {value}" for key, value in pool.keys.items()]
            lines.append("  servers:")
            for server in pool.servers:
                line = f"   - {addresses[server.backend]}:{server.weight}"
                lines.append(line + (f" {server.name}" if server.name else ""))
        return "\n".join(lines) + "\n"


Step = Tuple[str, Callable[[Layout], None]]


def apply_steps(start: Layout, steps: Sequence[Step]) -> List[Tuple[str, Layout]]:
    """The layouts after each step, cumulatively: ``[(description, layout), ...]``."""
    layouts = []
    current = start
    for description, change in steps:
        current = current.copy()
        change(current)
        layouts.append((description, current))
    return layouts


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


def initial_layout(mpool_listen: str = f"{LOOPBACK}:0") -> Layout:
    """Two pools over three of four backends each, listening on ``127.0.0.1:0`` (or ``mpool_listen``)."""
    return Layout({
        "rpool": PoolLayout(f"{LOOPBACK}:0", True, [Server(0), Server(1), Server(2)], {"timeout": "5000"}),
        "mpool": PoolLayout(mpool_listen, False, [Server(0), Server(1), Server(2)], {"timeout": "5000"}),
    })


def _each(*changes: Callable[[Layout], None]) -> Callable[[Layout], None]:
    def change(layout: Layout) -> None:
        for one in changes:
            one(layout)

    return change


def _pool(name: str, change: Callable[[PoolLayout], None]) -> Callable[[Layout], None]:
    return lambda layout: change(layout.pools[name])


def _set(**keys: Optional[str]) -> Callable[[PoolLayout], None]:
    def change(pool: PoolLayout) -> None:
        for key, value in keys.items():
            if value is None:
                pool.keys.pop(key, None)
            else:
                pool.keys[key] = value

    return change


def _listen(where: str) -> Callable[[PoolLayout], None]:
    def change(pool: PoolLayout) -> None:
        pool.listen = where

    return change


def _servers(*servers: Server) -> Callable[[PoolLayout], None]:
    def change(pool: PoolLayout) -> None:
        pool.servers = [copy.copy(s) for s in servers]

    return change


def _add_pool(name: str, pool: PoolLayout) -> Callable[[Layout], None]:
    def change(layout: Layout) -> None:
        layout.pools[name] = copy.deepcopy(pool)

    return change


def _remove_pool(name: str) -> Callable[[Layout], None]:
    def change(layout: Layout) -> None:
        del layout.pools[name]

    return change


def _weight(backend: int, weight: int) -> Callable[[PoolLayout], None]:
    def change(pool: PoolLayout) -> None:
        pool.server(backend).weight = weight

    return change


def _names(*names: Optional[str]) -> Callable[[PoolLayout], None]:
    def change(pool: PoolLayout) -> None:
        for server, name in zip(pool.servers, names):
            server.name = name

    return change


def _readdress(name: str, backend: int) -> Callable[[PoolLayout], None]:
    def change(pool: PoolLayout) -> None:
        pool.named(name).backend = backend

    return change


def _drop(backend: int) -> Callable[[PoolLayout], None]:
    def change(pool: PoolLayout) -> None:
        pool.servers = [s for s in pool.servers if s.backend != backend]

    return change


def full_steps(sock_dir: str) -> List[Step]:
    """Twenty reloads: servers added, re-weighted, renamed, removed, re-addressed; hash, distribution
    and hash tag; a third pool added, flipped to the other protocol, removed, added again; both
    pools' listen moved to a unix socket and back; settings; and one reload that changes nothing."""
    rsock, msock, xsock = (os.path.join(sock_dir, f"{n}.sock") for n in ("r", "m", "x"))
    tcp = f"{LOOPBACK}:0"
    return [
        ("add a server to each pool", _each(_pool("rpool", lambda p: p.servers.append(Server(3))),
                                            _pool("mpool", lambda p: p.servers.append(Server(3))))),
        ("re-weight", _each(_pool("rpool", _weight(0, 3)), _pool("mpool", _weight(1, 2)))),
        ("rename every server", _each(_pool("rpool", _names("ra", "rb", "rc", "rd")),
                                      _pool("mpool", _names("ma", "mb", "mc", "md")))),
        ("change the hashes", _each(_pool("rpool", _set(hash="murmur")), _pool("mpool", _set(hash="md5")))),
        ("modula; a hash tag", _each(_pool("rpool", _set(distribution="modula")),
                                     _pool("mpool", _set(hash_tag='"{}"')))),
        ("add a third pool", _add_pool("xpool", PoolLayout(tcp, True, [Server(0), Server(1)]))),
        ("move rpool to a unix socket", _pool("rpool", _listen(rsock))),
        ("remove a server from each pool", _each(_pool("rpool", _drop(1)), _pool("mpool", _drop(0)))),
        ("nothing", lambda layout: None),
        ("re-address a server in each pool", _each(_pool("rpool", _readdress("ra", 1)),
                                                   _pool("mpool", _readdress("mb", 0)))),
        ("the third pool becomes memcached", _add_pool("xpool", PoolLayout(tcp, False, [Server(2), Server(3)]))),
        ("move mpool to a unix socket", _pool("mpool", _listen(msock))),
        ("settings", _each(_pool("rpool", _set(timeout="2000", server_connections="2", redis_db="1")),
                           _pool("mpool", _set(timeout="2000", server_connections="2",
                                               client_max_pending="512")))),
        ("remove the third pool", _remove_pool("xpool")),
        ("move rpool back to TCP", _pool("rpool", _listen(tcp))),
        ("ketama and crc32; no hash tag, modula", _each(
            _pool("rpool", _set(distribution="ketama", hash="crc32")),
            _pool("mpool", _set(hash_tag=None, distribution="modula")))),
        ("move mpool back to TCP; a third pool on a unix socket", _each(
            _pool("mpool", _listen(tcp)), _add_pool("xpool", PoolLayout(xsock, False, [Server(0)])))),
        ("rpool: four unnamed equal servers, db 0", _pool("rpool", _each_pool(
            _servers(Server(0), Server(1), Server(2), Server(3)), _set(redis_db=None, server_connections=None)))),
        ("remove the third pool; mpool back to its first settings", _each(_remove_pool("xpool"), _pool(
            "mpool", _each_pool(_servers(Server(0), Server(1), Server(2), Server(3)),
                                _set(hash=None, distribution=None, server_connections=None))))),
        ("remove a server, re-weight another", _each(_pool("rpool", _each_pool(_drop(3), _weight(0, 2))),
                                                     _pool("mpool", _each_pool(_drop(2), _weight(3, 3))))),
    ]


def _each_pool(*changes: Callable[[PoolLayout], None]) -> Callable[[PoolLayout], None]:
    def change(pool: PoolLayout) -> None:
        for one in changes:
            one(pool)

    return change


def worker_layout(sock_dir: str) -> Layout:
    """The start of :func:`worker_steps`: mpool on a unix socket, which ``--workers`` opens before
    forking (a unix listen cannot be added by a reload there, only left)."""
    return initial_layout(mpool_listen=os.path.join(sock_dir, "m.sock"))


def worker_steps(port: int) -> List[Step]:
    """Eight reloads for ``--workers``: the same kinds of change, fewer of them.  rpool's listen
    moves from ``127.0.0.1:0`` to ``127.0.0.1:port`` and back; mpool's from its unix socket to TCP."""
    tcp = f"{LOOPBACK}:0"
    return [
        ("add a server to each pool", _each(_pool("rpool", lambda p: p.servers.append(Server(3))),
                                            _pool("mpool", lambda p: p.servers.append(Server(3))))),
        ("re-weight and rename", _each(_pool("rpool", _each_pool(_weight(0, 3), _names("ra", "rb", "rc", "rd"))),
                                       _pool("mpool", _each_pool(_weight(1, 2), _names("ma", "mb", "mc", "md"))))),
        ("hash and distribution", _each(_pool("rpool", _set(hash="murmur", distribution="modula")),
                                        _pool("mpool", _set(hash="md5", hash_tag='"{}"')))),
        ("add a third pool", _add_pool("xpool", PoolLayout(tcp, True, [Server(0), Server(1)]))),
        ("move rpool to another port; mpool from its unix socket to TCP", _each(
            _pool("rpool", _listen(f"{LOOPBACK}:{port}")), _pool("mpool", _listen(tcp)))),
        ("remove a server from each pool; re-address one", _each(
            _pool("rpool", _each_pool(_drop(1), _readdress("ra", 1))), _pool("mpool", _drop(0)))),
        ("remove the third pool", _remove_pool("xpool")),
        ("move rpool back; ketama", _pool("rpool", _each_pool(_listen(tcp), _set(distribution="ketama")))),
    ]


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
