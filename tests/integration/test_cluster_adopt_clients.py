"""What clients of an adopted pool see, through real processes: three redis-servers behind two proxies in
nutcracker mode, switched in place by ``twinproxy-admin adopt`` and a SIGHUP, then adopted.

- a client that had SELECTed another database is closed at the switch; one in database 0 stays, and its
  SELECT / MOVE are refused from then on;
- a subscriber through one proxy gets every message published through the other before, during and
  after the adoption, its channel on a server whose keys move, and every one of a stream published
  through the switch itself (its subscriber connection there is kept);
- a one-slot MSET whose keys the pool had placed on different servers, issued over and over through the
  switch and the adoption, is applied whole or refused as documented, never half; an MSETNX of such keys
  is refused until they are all at their slot's owner;
- a client with retries off, on keys that move, never loses its connection and reads its own writes.

"During" is deterministic: the adoption is queued at 1 key/s, resumed until the first server's entry is
migrating on both proxies, then paused (requests still move the keys they touch, the sweeps do not), and
at the end throttled to no limit and resumed.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.cluster_harness import TOKEN, ClusterProxy, Dashboard, admin, admin_ok, wait_for_status
from tests.cluster_harness import independent_slot as slot
from tests.integration.test_cluster_adopt import hang_up, owners
from tests.integration.test_cluster_migration import processes  # noqa: F401 - a fixture
from tests.integration.test_redis_proxy import read_lines
from tests.servers import LOOPBACK, wait_until
from twinproxy.admin_cli.adopt import cluster_file

NAMES = ("alpha", "beta", "gamma")


def pool_text(port: int, servers, hash_tag: Optional[str]) -> str:
    lines = "".join(f"    - {server.address}:1 {name}\n" for server, name in zip(servers, NAMES))
    tag = f"  hash_tag: \"{hash_tag}\"\n" if hash_tag else ""
    return (f"shop:\n  listen: {LOOPBACK}:{port}\n  redis: true\n  hash: fnv1a_64\n{tag}"
            f"  distribution: ketama\n  timeout: 2000\n  servers:\n{lines}")


def client(proxy: ClusterProxy, **options) -> redis.Redis:
    options.setdefault("socket_timeout", 10)
    return redis.Redis(host=LOOPBACK, port=proxy.port, protocol=2, **options)


def no_retry_client(proxy: ClusterProxy, single: bool = True) -> redis.Redis:
    """Connections that are never retried nor reopened (by default one): a lost connection is an error the
    caller sees, not a reconnection that hides it (a PubSub would even subscribe again by itself)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # redis-py 6 deprecates retry_on_timeout
        return client(proxy, single_connection_client=single, retry=Retry(NoBackoff(), 0), retry_on_timeout=False)


@dataclass
class Scene:
    """A nutcracker pool behind two proxies (A and B) and the dashboard of the cluster it will become."""

    servers: list
    proxies: List[ClusterProxy]
    dashboard: Dashboard
    url: str
    ids: List[int] = field(default_factory=list)       # the adoption's entries, group 1 first
    generation: int = 0
    slot_owner: List[Optional[int]] = field(default_factory=list)

    def placed(self, keys: List[bytes]) -> Dict[bytes, int]:
        """key -> the group (1 + the pool's server index) of the one backend that holds it."""
        found: Dict[bytes, int] = {}
        for index, server in enumerate(self.servers):
            with server.client().pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.exists(key)
                answers = pipe.execute()
            for key, there in zip(keys, answers):
                if there:
                    assert key not in found, (key, found[key], index + 1)
                    found[key] = index + 1
        return found

    def adopt(self, keys_per_second: int = 1) -> None:
        """``twinproxy-admin adopt`` (A's file rewritten in place, B's by the same function): paused entries."""
        first, second = self.proxies
        done = admin(self.dashboard, "adopt", "--pool-file", str(first.config), "--pool", "shop", "--coordinator",
                     self.url, "--output", str(first.config), "--json", "--keys-per-second", str(keys_per_second))
        assert done.returncode == 0, done.stdout + done.stderr
        answer = json.loads(done.stdout)
        self.ids = [m["id"] for m in answer["migrations"]]
        assert [m["from_group"] for m in answer["migrations"]] == [1, 2, 3]
        self.generation = answer["generation"]
        second.config.write_text(cluster_file(str(second.config), "shop", "shop", self.url))
        self.slot_owner = owners(self.dashboard.status())

    def switch(self) -> None:
        """SIGHUP: both proxies reload the rewritten file and follow the cluster."""
        for proxy in self.proxies:
            hang_up(proxy)
        wait_for_status(self.dashboard, lambda s: len(s["proxies"]) == 2 and all(
            p["generation"] >= self.generation for p in s["proxies"]), what="both proxies following the cluster")

    def entries(self) -> Dict[int, str]:
        return {m["id"]: m["state"] for m in json.loads(admin_ok(self.dashboard, "migration", "status", "--json"))}

    def adopted_states(self, proxy: ClusterProxy) -> List[str]:
        return list(proxy.stats()["shop"].get("adopted", {}).values())

    def hold_first_entry_moving(self) -> None:
        """Resume, and pause again once group 1's keys are moving on both proxies (the sweeps stop there)."""
        admin_ok(self.dashboard, "migration", "resume")
        wait_until(lambda: all(self.adopted_states(p)[:1] == ["moving"] for p in self.proxies), timeout=30,
                   what="group 1's entry moving on both proxies")
        admin_ok(self.dashboard, "migration", "pause")
        assert self.entries()[self.ids[0]] == "migrating"
        assert all(self.adopted_states(p) == ["moving", "legacy", "legacy"] for p in self.proxies)

    def finish(self) -> None:
        """No limit on any entry, resumed, waited for: an ordinary cluster."""
        for mid in self.ids:
            request = urllib.request.Request(
                f"http://{self.dashboard.address}/api/migrations/{mid}/throttle", method="POST",
                data=json.dumps({"keys_per_second": None}).encode(),
                headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as answer:
                assert answer.status == 200
        admin_ok(self.dashboard, "migration", "resume")
        done = admin(self.dashboard, "migration", "wait", timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        assert set(self.entries().values()) == {"finished"}
        wait_until(lambda: all("adopted" not in p.stats()["shop"] for p in self.proxies), timeout=30,
                   what="both proxies serving an ordinary cluster")

    def one_slot_key_sets(self, sets: int, count: int) -> List[List[bytes]]:
        """``sets`` lists of ``count`` keys, each of one slot (one tag) that a group other than 1 owns, which
        the pool spread over group 1's server and others: group 1's move first, the others' stay meanwhile."""
        writer, found = client(self.proxies[0]), []
        for tag in (b"t%d" % i for i in range(200)):
            keys = [b"{%s}%d" % (tag, i) for i in range(count)]
            if self.slot_owner[slot(keys[0])] == 1:
                continue
            writer.mset({key: b"start" for key in keys})
            groups = set(self.placed(keys).values())
            if 1 in groups and len(groups) >= 2:
                found.append(keys)
                if len(found) == sets:
                    return found
        raise AssertionError(f"not {sets} tags whose keys the pool spread over group 1 and another")

    def moving_keys(self, prefix: bytes, count: int, group: Optional[int] = None) -> List[bytes]:
        """``count`` keys, written through A, that the pool placed on another group than their slot's
        (on ``group`` if given): keys the adoption moves."""
        candidates = [b"%d:%s" % (i, prefix) for i in range(40 * count)]
        writer = client(self.proxies[0])
        with writer.pipeline(transaction=False) as pipe:
            for key in candidates:
                pipe.set(key, b"0")
            pipe.execute()
        placed = self.placed(candidates)
        chosen = [key for key in candidates if placed[key] != self.slot_owner[slot(key)]
                  and (group is None or placed[key] == group)][:count]
        assert len(chosen) == count
        return chosen


def build(tmp_path: Path, redis_servers, processes, hash_tag: Optional[str] = None,  # noqa: F811
          workers=(1, 1), preload: int = 300) -> Scene:
    url = f"file://{tmp_path / 'coordinator'}"
    servers = redis_servers(3)
    proxies = []
    for index, count in enumerate(workers):
        proxy = ClusterProxy(tmp_path / f"proxy{index}", url, "shop", processes=processes, workers=count)
        proxy.config.write_text(pool_text(proxy.port, servers, hash_tag))
        proxies.append(proxy.start())
    # Keys on every server, so that each entry has keys to sweep (at 1 key/s: it lingers while moving).
    with client(proxies[0]).pipeline(transaction=False) as pipe:
        for index in range(preload):
            pipe.set(b"%d:pre" % index, b"v")
        pipe.execute()
    sizes = [server.client().dbsize() for server in servers]
    assert min(sizes) > preload // 10, sizes
    dashboard = Dashboard(tmp_path / "dashboard", url, "shop").start()
    processes.append(dashboard)
    return Scene(servers, proxies, dashboard, url)


# -- a: databases at the switch --------------------------------------------------------------------------


def command(sock: socket.socket, *words: bytes) -> bytes:
    sock.sendall(b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(word), word) for word in words))
    return read_lines(sock, 1)


def closed(sock: socket.socket) -> bool:
    """The proxy closed ``sock`` (EOF or reset; nothing else was sent on it since)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_client_in_another_database_is_closed_at_the_switch_and_one_in_database_0_stays(
        tmp_path: Path, redis_servers, processes) -> None:  # noqa: F811
    # B with --workers 2: its master reloads and each worker closes its own such clients.
    scene = build(tmp_path, redis_servers, processes, hash_tag="{}", workers=(1, 2), preload=100)
    other, zero = [], []
    for proxy in scene.proxies:
        for _ in range(3):
            sock = socket.create_connection((LOOPBACK, proxy.port), timeout=10)
            assert command(sock, b"SELECT", b"1") == b"+OK\r\n"
            assert command(sock, b"SET", b"db1key%d" % len(other), b"x") == b"+OK\r\n"
            other.append(sock)
            kept = no_retry_client(proxy)
            assert kept.set(b"db0key%d" % len(zero), b"before")
            zero.append(kept)
    scene.adopt(keys_per_second=1000)
    scene.switch()
    for sock in other:
        sock.settimeout(0.05)
    wait_until(lambda: all(closed(sock) for sock in other), timeout=10,
               what="every client that had selected database 1 closed")
    for index, kept in enumerate(zero):
        assert kept.get(b"db0key%d" % index) == b"before"
        with pytest.raises(redis.ResponseError, match="SELECT is not allowed in a twinproxy cluster pool"):
            kept.execute_command("SELECT", "1")
        with pytest.raises(redis.ResponseError, match="MOVE is not allowed in a twinproxy cluster pool"):
            kept.move(b"db0key%d" % index, 1)
        assert kept.execute_command("SELECT", "0") is True
        assert kept.set(b"db0key%d" % index, b"after")
    # A new connection is refused database 1 too, and database 1's keys are where they were (not moved).
    with pytest.raises(redis.ResponseError, match="SELECT is not allowed"):
        client(scene.proxies[0]).execute_command("SELECT", "1")
    assert sum(server.client(db=1).dbsize() for server in scene.servers) == len(other)
    scene.finish()
    for index, kept in enumerate(zero):     # the same connections, after the adoption
        assert kept.get(b"db0key%d" % index) == b"after"
    for sock in other:
        sock.close()


# -- b: pub/sub ------------------------------------------------------------------------------------------


class Publisher(threading.Thread):
    """PUBLISH 0, 1, 2... on ``channel`` through one proxy, as fast as it answers, until stopped."""

    def __init__(self, proxy: ClusterProxy, channel: bytes) -> None:
        super().__init__(daemon=True)
        self.client = client(proxy)
        self.channel = channel
        self.receivers: List[int] = []
        self.problems: List[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                self.receivers.append(self.client.publish(self.channel, b"%d" % len(self.receivers)))
        except Exception as err:  # noqa: BLE001 - reported by the test
            self.problems.append(repr(err))

    def stop(self) -> None:
        self.stopping.set()
        self.join(15)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_subscriber_gets_every_message_published_before_during_and_after_the_adoption(
        tmp_path: Path, redis_servers, processes) -> None:  # noqa: F811
    scene = build(tmp_path, redis_servers, processes)
    scene.adopt()
    # A channel whose name, as a key, the pool placed on group 1's server and whose slot another group owns:
    # it lives on group 1's server until group 1's keys move, then at its slot's owner.
    channel = scene.moving_keys(b"news", 1, group=1)[0]
    home_after = scene.slot_owner[slot(channel)]
    subscriber = no_retry_client(scene.proxies[0], single=False).pubsub()
    subscriber.subscribe(channel)
    first = subscriber.get_message(timeout=10)
    assert first is not None and first["type"] == "subscribe", first
    publisher = client(scene.proxies[1])

    def subscribed_on(group: int) -> bool:
        counts = [dict(server.client().pubsub_numsub(channel))[channel] for server in scene.servers]
        return counts == [1 if index + 1 == group else 0 for index in range(3)]

    def received(count: int) -> List[bytes]:
        got: List[bytes] = []
        deadline = time.monotonic() + 10
        while len(got) < count and time.monotonic() < deadline:
            message = subscriber.get_message(timeout=max(0.0, deadline - time.monotonic()))
            if message is not None and message["type"] == "message":
                got.append(message["data"])
        return got

    def arrives(text: bytes, on: int) -> None:
        # Where the subscription is: after a change, once the proxy has moved it (a steady state).
        wait_until(lambda: subscribed_on(on), timeout=10, what=f"the subscription on group {on}'s server only")
        assert publisher.publish(channel, text) >= 1, text
        assert received(1) == [text], f"{text!r} published through B did not reach the subscriber on A"

    def subscriber_connections() -> List[int]:
        return [entry["id"] for entry in scene.servers[0].client().client_list(_type="pubsub")]

    arrives(b"before the switch", on=1)
    before = subscriber_connections()
    # Through the switch itself, published without a pause: the channel stays on its server, and so does
    # the proxy's subscriber connection there (a new one would miss what is published meanwhile).
    flow = Publisher(scene.proxies[1], channel)
    flow.start()
    wait_until(lambda: len(flow.receivers) > 50 or not flow.is_alive(), timeout=10, what="publishes")
    scene.switch()
    count = len(flow.receivers)
    wait_until(lambda: len(flow.receivers) > count + 50 or not flow.is_alive(), timeout=10,
               what="publishes after the switch")
    flow.stop()
    assert flow.problems == [] and 0 not in flow.receivers, (flow.problems, flow.receivers.count(0))
    assert received(len(flow.receivers)) == [b"%d" % i for i in range(len(flow.receivers))]
    assert subscriber_connections() == before
    arrives(b"after the switch", on=1)
    scene.hold_first_entry_moving()
    arrives(b"while group 1 moves", on=home_after)
    scene.finish()
    arrives(b"after the adoption", on=home_after)
    subscriber.close()


# -- c: one-slot MSET over servers of the pool -----------------------------------------------------------

def allowed(err: redis.ResponseError) -> bool:
    """The errors the README documents for a multi-key command during an adoption (redis-py strips the
    TRYAGAIN code into its class)."""
    return isinstance(err, redis.exceptions.TryAgainError) or "don't hash to the same server" in str(err)


class MsetLoop(threading.Thread):
    """MSET every key to the round's value, then MGET them: each MGET sees one value for all."""

    def __init__(self, proxy: ClusterProxy, keys: List[bytes]) -> None:
        super().__init__(daemon=True)
        self.client = client(proxy)
        self.keys = keys
        self.rounds = 0
        self.refused: List[str] = []
        self.problems: List[str] = []
        self.stopping = threading.Event()
        self.current = b"start"

    def run(self) -> None:
        try:
            while not self.stopping.is_set() and not self.problems:
                self.round()
        except Exception as err:  # noqa: BLE001 - reported by the test
            self.problems.append(f"round {self.rounds}: {err!r}")

    def round(self) -> None:
        value = b"r%d" % self.rounds
        try:
            self.client.mset({key: value for key in self.keys})
            acknowledged = True
        except redis.ResponseError as err:
            if not allowed(err):
                self.problems.append(f"MSET {value!r}: {type(err).__name__} {err}")
                return
            self.refused.append(f"{type(err).__name__} {err}")
            acknowledged = False
        seen = self.read()
        if seen is None:
            return
        if acknowledged and seen != {value}:
            self.problems.append(f"MSET {value!r} answered OK, then MGET read {sorted(seen)}")
        elif not acknowledged and seen not in ({value}, {self.current}):
            self.problems.append(f"MSET {value!r} refused, then MGET read {sorted(seen)} (half applied)")
        self.current = seen.pop() if len(seen) == 1 else self.current
        self.rounds += 1

    def read(self) -> Optional[set]:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                return set(self.client.mget(self.keys))
            except redis.ResponseError as err:
                if not allowed(err):
                    self.problems.append(f"MGET: {type(err).__name__} {err}")
                    return None
        self.problems.append("MGET refused for 10 s")
        return None

    def after(self, rounds: int, what: str) -> None:
        """Wait until ``rounds`` more rounds are done (or a problem is found)."""
        goal = self.rounds + rounds
        wait_until(lambda: self.rounds >= goal or self.problems or not self.is_alive(), timeout=20,
                   what=f"{rounds} MSET rounds {what}")
        assert self.problems == [], self.problems[:5]

    def stop(self) -> None:
        self.stopping.set()
        self.join(15)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_one_slot_mset_over_servers_of_the_pool_is_applied_whole_through_the_adoption(
        tmp_path: Path, redis_servers, processes) -> None:  # noqa: F811
    # No hash tag in the pool: "{t}..." keys are spread over its servers, yet share one slot in the cluster.
    scene = build(tmp_path, redis_servers, processes, hash_tag=None)
    scene.adopt()
    *key_sets, unsplit = scene.one_slot_key_sets(4, 12)
    # One writer per key set (two through A, one through B), without a pause: every state and every
    # change between them (the barriers' holds included) sees some of their rounds.
    loops = [MsetLoop(scene.proxies[index % 2], keys) for index, keys in enumerate(key_sets)]
    for loop in loops:
        loop.start()

    def rounds(what: str) -> None:
        for loop in loops:
            loop.after(20, what)

    # A multi-key command that is not split by key (MSETNX) needs its keys on one server: refused while the
    # pool's placement has them apart, served once they are all at their slot's owner.
    refusing = client(scene.proxies[1])
    rounds("in nutcracker mode")
    for phase in (scene.switch, scene.hold_first_entry_moving, scene.finish):
        with pytest.raises(redis.ResponseError, match="don't hash to the same server"):
            refusing.msetnx({key: b"x" for key in unsplit})
        phase()
        rounds(f"after {phase.__name__}")
    assert refusing.msetnx({key: b"x" for key in unsplit}) is False      # served: every key exists
    for loop in loops:
        loop.stop()
        assert loop.problems == [], loop.problems[:5]
        # Read through the other proxy; every key on its slot's group only.
        reader = client(scene.proxies[1 - loops.index(loop) % 2])
        assert set(reader.mget(loop.keys)) == {loop.current}
        owner = scene.slot_owner[slot(loop.keys[0])]
        assert scene.placed(loop.keys) == {key: owner for key in loop.keys}


# -- d: a client that does not retry ---------------------------------------------------------------------


class KeptClient(threading.Thread):
    """One connection, retries off: SET then GET, round after round, on keys that move."""

    def __init__(self, proxy: ClusterProxy, keys: List[bytes]) -> None:
        super().__init__(daemon=True)
        self.client = no_retry_client(proxy)
        self.keys = keys
        self.done = 0
        self.problems: List[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                key = self.keys[self.done % len(self.keys)]
                value = b"%d" % self.done
                assert self.client.set(key, value) is True
                got = self.client.get(key)
                if got != value:
                    self.problems.append(f"GET {key!r} after SET {value!r}: {got!r}")
                    return
                self.done += 1
        except redis.ConnectionError as err:
            self.problems.append(f"connection error after {self.done} rounds: {err!r}")
        except Exception as err:  # noqa: BLE001 - reported by the test
            self.problems.append(f"after {self.done} rounds: {err!r}")

    def after(self, rounds: int, what: str) -> None:
        goal = self.done + rounds
        wait_until(lambda: self.done >= goal or self.problems or not self.is_alive(), timeout=20,
                   what=f"{rounds} rounds {what}")
        assert self.problems == [], self.problems


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_client_without_retries_keeps_its_connection_and_reads_its_writes(tmp_path: Path, redis_servers,
                                                                           processes) -> None:  # noqa: F811
    scene = build(tmp_path, redis_servers, processes)
    scene.adopt()
    keys = scene.moving_keys(b"kept", 30)
    assert {scene.placed(keys)[key] for key in keys} == {1, 2, 3}
    kept = [KeptClient(proxy, keys[index::2]) for index, proxy in enumerate(scene.proxies)]
    for one in kept:
        one.start()
    phases: List[Callable[[], None]] = [scene.switch, scene.hold_first_entry_moving, scene.finish]
    for one in kept:
        one.after(50, "before the switch")
    for phase in phases:
        phase()
        for one in kept:
            one.after(50, f"after {phase.__name__}")
    for one in kept:
        one.stopping.set()
        one.join(15)
        assert one.problems == []
    status = scene.dashboard.status()
    assert scene.placed(keys) == {key: owners(status)[slot(key)] for key in keys}
