"""Sentinel mode through real processes: ``twinproxy -c`` over a fresh topology per test
(tests/sentinel_servers.py: per shard a master and a replica, three sentinels at
down-after 1000 ms / failover-timeout 3000 ms).

Every time comes from the topology (the SwitchWatcher's ``+switch-master``, the
moment a fault was injected) or from the load threads' own call records, and every
wait is a deadline (wait_until); the only windows are bounded observations ("no
flapping for 5 s", "the ~11 s zombie window"), measured on the load's clock.

The reference for the timings is /work/shared/reference/sentinel.md (§2: the switch
comes 1.2 s after SENTINEL FAILOVER, 2.3 s after a SIGKILL, 2.3-3.1 s after a
SIGSTOP; a returning old master stays master ~10 s, 11 s after a manual failover).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set

import pytest
import redis

from tests.reload_load import http, read_stats, write_atomically
from tests.sentinel_servers import (
    Resp,
    ShardServer,
    cmdstat_calls,
    dead_address,
    keys_on,
    parse_info,
    pool_text,
    query,
)
from tests.servers import LOOPBACK, wait_until

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]

# The pool's defaults in these tests (pool_text): timeout 1000 ms, failover_hold 2000 ms.
TIMEOUT = 1.0
HOLD = 2.0
NO_HANG = TIMEOUT + HOLD + 1.0  # no client call may take longer (seconds)


# -- load: one client per thread, every call recorded ---------------------------------------


@dataclass(frozen=True)
class Call:
    key: str
    sent: float  # time.monotonic() just before the call
    done: float  # just after its reply (or error)
    outcome: str  # "ok", "error" (an exception) or "wrong" (a read with another value)
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    @property
    def seconds(self) -> float:
        return self.done - self.sent


_LOADS: List["Load"] = []  # every Load of the running test, stopped at its teardown


@pytest.fixture(autouse=True)
def _stop_loads():
    """A test that fails half-way must not leave its load threads running into the next one."""
    yield
    while _LOADS:
        load = _LOADS.pop()
        if load.is_alive():
            load.stop()


class Load(threading.Thread):
    """SETs of unique keys (value = key) or GETs of keys whose value is the key itself, one at a
    time through one client, paced by ``interval``; bounded by the number of keys (writes),
    ``max_seconds`` and ``stop()``."""

    def __init__(self, make_client: Callable, keys: Sequence[str], read: bool = False, interval: float = 0.005,
                 max_seconds: float = 60.0, name: str = "load") -> None:
        super().__init__(name=name, daemon=True)
        self._client = make_client()
        self._keys = list(keys)
        self._read = read
        self._interval = interval
        self._max_seconds = max_seconds
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._calls: List[Call] = []
        _LOADS.append(self)

    def run(self) -> None:
        deadline = time.monotonic() + self._max_seconds
        number = 0
        try:
            while not self._stopping.is_set() and time.monotonic() < deadline:
                if not self._read and number >= len(self._keys):
                    break
                key = self._keys[number % len(self._keys)]
                number += 1
                sent = time.monotonic()
                try:
                    if self._read:
                        value = self._client.get(key)
                        outcome, detail = ("ok", "") if value == key.encode() else ("wrong", repr(value))
                    else:
                        reply = self._client.set(key, key)
                        outcome, detail = ("ok", "") if reply is True else ("wrong", repr(reply))
                except redis.RedisError as err:
                    outcome, detail = "error", f"{type(err).__name__}: {err}"
                call = Call(key, sent, time.monotonic(), outcome, detail)
                with self._lock:
                    self._calls.append(call)
                self._stopping.wait(self._interval)
        finally:
            self._client.close()

    def stop(self) -> List[Call]:
        self._stopping.set()
        self.join(30)
        assert not self.is_alive(), f"{self.name} did not stop"
        return self.calls

    @property
    def calls(self) -> List[Call]:
        with self._lock:
            return list(self._calls)

    def acked(self) -> int:
        return sum(call.ok for call in self.calls)

    def reached(self, moment: float) -> bool:
        """Whether a call sent at or after ``moment`` has completed."""
        with self._lock:
            return bool(self._calls) and self._calls[-1].sent >= moment


def start_loads(loads: Iterable[Load], at_least: int = 20, timeout: float = 30.0) -> List[Load]:
    """Start the loads and wait until each has ``at_least`` acknowledged calls."""
    loads = list(loads)
    for load in loads:
        load.start()
    try:
        wait_until(lambda: all(load.acked() >= at_least for load in loads), timeout=timeout,
                   what=f"{at_least} acknowledged calls per load")
    except AssertionError as err:
        raise AssertionError(f"{err}; the last calls: {[summary(load.calls[-2:]) for load in loads]}") from None
    return loads


def wait_reached(loads: Sequence[Load], moment: float, timeout: float, what: str) -> None:
    wait_until(lambda: all(load.reached(moment) or not load.is_alive() for load in loads), timeout=timeout,
               interval=0.02, what=what)


def all_calls(loads: Iterable[Load]) -> List[Call]:
    return sorted((call for load in loads for call in load.calls), key=lambda call: call.sent)


def _stop_all(loads: Sequence[Load]) -> List[Call]:
    for load in loads:
        load.stop()
    return all_calls(loads)


def first_ack(calls: Iterable[Call], sent_after: float) -> Optional[Call]:
    """The acknowledged call sent at or after ``sent_after`` that completed first."""
    return min((call for call in calls if call.ok and call.sent >= sent_after), key=lambda call: call.done,
               default=None)


def wait_for_ack(loads: Sequence[Load], after: float, timeout: float, process) -> float:
    """When the first write sent at or after ``after`` was acknowledged (waiting up to ``timeout``)."""
    try:
        call = wait_until(lambda: first_ack(all_calls(loads), after), timeout=timeout, interval=0.02,
                          what="a write to be acknowledged")
    except AssertionError as err:
        raise AssertionError(f"{err}; the last calls: {summary(all_calls(loads)[-3:])}\n"
                             f"proxy log:\n{process.output()}") from None
    return call.done


def holding(server: ShardServer, keys: Iterable[str]) -> Set[str]:
    """Which of ``keys`` ``server`` holds with their own name as value (MGET, read directly)."""
    keys = sorted(set(keys))
    found: Set[str] = set()
    client = server.client()
    try:
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            found.update(key for key, value in zip(chunk, client.mget(chunk)) if value == key.encode())
    finally:
        client.close()
    return found


def summary(calls: Sequence[Call], limit: int = 5) -> str:
    return "; ".join(f"{call.key} +{call.seconds:.2f}s {call.outcome} {call.detail}" for call in calls[:limit])


# -- the proxy's reports -------------------------------------------------------------------------


def stats_of(process) -> dict:
    return read_stats(process.bound_doc["stats"])


def shard_stats(process, name: str) -> dict:
    return stats_of(process)["alpha"][name]


def writers(client: Callable, text: str, count: int, prefix: str, per_writer: int = 8000,
            max_seconds: float = 60.0) -> List[Load]:
    """``count`` write loads over unique keys that the pool of ``text`` places on s1."""
    keys = keys_on(text, "s1", per_writer * count, prefix)
    return [Load(client, keys[number::count], max_seconds=max_seconds, name=f"{prefix}{number}")
            for number in range(count)]


def populate(client: Callable, text: str, name: str, count: int, prefix: str) -> List[str]:
    """``count`` keys of shard ``name`` written through the proxy (value = key)."""
    keys = keys_on(text, name, count, prefix)
    connection = client()
    try:
        for key in keys:
            assert connection.set(key, key) is True
    finally:
        connection.close()
    return keys


def wait_reads_reach(server: ShardServer, client: Callable, key: str, timeout: float = 10.0) -> None:
    """GET ``key`` through the proxy until ``server`` counts a GET (the proxy's replica checks may
    take a moment after start-up)."""
    connection = client()
    base = server.calls("get")
    try:
        wait_until(lambda: connection.get(key) == key.encode() and server.calls("get") > base, timeout=timeout,
                   interval=0.05, what=f"a GET through the proxy to reach {server}")
    finally:
        connection.close()


# -- 1. discovery ------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_discovery_ignores_stale_guesses(sentinel_topology, sentinel_proxy) -> None:
    """s1's configured address is its replica's, s2's a dead port: SETs land on each shard's real
    master, and the stats show it with role master and no switch."""
    topology = sentinel_topology
    guesses = {"s1": topology.replica("s1").address, "s2": dead_address()}
    process, client = sentinel_proxy(topology, guesses=guesses)
    connection = client()
    for name in ("s1", "s2"):
        keys = keys_on(process.text, name, 20, f"discovery-{name}-")
        for key in keys:
            assert connection.set(key, key) is True, key
        master = topology.master(name)
        assert holding(master, keys) == set(keys), f"writes for {name} are not on its master {master}"
        stats = shard_stats(process, name)
        assert (stats["address"], stats["role"]) == (master.address, "master"), stats
        assert (stats["switches"], stats["last_switch"], stats["sentinel_epoch"]) == (0, 0, 0), stats
    connection.close()
    status, body = http(process.bound_doc["http"], "/health")
    assert status == 200, body


@pytest.mark.timeout(60)
def test_discovery_through_sentinels_that_require_a_password(make_topology, sentinel_proxy) -> None:
    """Sentinels with requirepass and the pool's sentinel_auth: discovery works as without (s1's
    guess is its replica), and the password never shows in the stats."""
    topology = make_topology(names=("s1",), sentinel_password="sentinel-secret")
    process, client = sentinel_proxy(topology, guesses={"s1": topology.replica("s1").address})
    assert "sentinel_auth: sentinel-secret" in process.text
    keys = keys_on(process.text, "s1", 20, "auth-")
    connection = client()
    for key in keys:
        assert connection.set(key, key) is True, key
    connection.close()
    master = topology.master("s1")
    assert holding(master, keys) == set(keys)
    document = stats_of(process)
    assert (document["alpha"]["s1"]["address"], document["alpha"]["s1"]["role"]) == (master.address, "master")
    assert "sentinel-secret" not in repr(document)


# -- 2. SENTINEL FAILOVER ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_manual_failover_moves_writes_within_3s_and_none_acknowledged_after_it_is_lost(
        sentinel_topology, sentinel_proxy) -> None:
    """SENTINEL FAILOVER s1 under a steady writer: writes reach the new master within 3 s of the
    first +switch-master; every write acknowledged later than switch + 0.5 s is on the new master,
    and none of them is only on the old master (which stays master for ~11 s)."""
    topology = sentinel_topology
    process, client = sentinel_proxy(topology)
    (writer,) = start_loads(writers(client, process.text, 1, "manual-"))
    old, new = topology.master("s1"), topology.replica("s1")
    asked = topology.failover("s1")
    event = topology.watcher.wait("s1", timeout=15, after=asked)
    assert (event.old_address, event.new_address) == (old.address, new.address)
    switch = event.at
    wait_reached([writer], switch + 4.0, timeout=15, what="the writer to run 4 s past the switch")
    calls = writer.stop()
    # Checked well before the old master's conversion (~11 s after the failover) wipes it.
    assert new.role() == "master" and old.role() == "master"

    after_switch = [call for call in calls if call.ok and call.sent >= switch]
    on_new = holding(new, (call.key for call in after_switch))
    reached = min((call.done for call in after_switch if call.key in on_new), default=None)
    assert reached is not None, f"no write sent after the switch reached {new}: {summary(after_switch)}"
    assert reached - switch <= 3.0, f"writes reached the new master {reached - switch:.2f}s after the switch"

    late = [call for call in calls if call.ok and call.done > switch + 0.5]
    assert late, "no write was acknowledged after switch + 0.5 s"
    late_keys = [call.key for call in late]
    on_new, on_old = holding(new, late_keys), holding(old, late_keys)
    missing = [call for call in late if call.key not in on_new]
    only_old = [call for call in missing if call.key in on_old]
    assert (len(missing), len(only_old)) == (0, 0), (
        f"{len(missing)} of {len(late)} writes acknowledged after switch + 0.5 s are not on the new master, "
        f"{len(only_old)} of them only on the old master: {summary(missing)}")


# -- 3. SIGKILL under load -----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_killed_master_writes_resume_within_5s_on_the_new_master_without_hangs(
        sentinel_topology, sentinel_proxy) -> None:
    """SIGKILL s1's master under 4 writer threads: writes succeed again within 5 s, every write
    acknowledged after the kill is on the new master, and no call takes longer than
    timeout + failover_hold + 1 s."""
    topology = sentinel_topology
    process, client = sentinel_proxy(topology)
    loads = start_loads(writers(client, process.text, 4, "kill-", per_writer=4000))
    old, new = topology.master("s1"), topology.replica("s1")
    killed = topology.kill(old)
    recovered = wait_for_ack(loads, killed, 12, process)
    event = topology.watcher.wait("s1", timeout=5, after=killed)
    assert event.new_address == new.address
    wait_reached(loads, recovered + 2.0, timeout=15, what="the writers to run 2 s past the recovery")
    calls = _stop_all(loads)

    assert recovered - killed <= 5.0, f"writes resumed {recovered - killed:.2f}s after the kill"
    after = [call for call in calls if call.ok and (call.sent >= killed or call.done >= recovered)]
    on_new = holding(new, (call.key for call in after))
    missing = [call for call in after if call.key not in on_new]
    assert missing == [], f"{len(missing)} of {len(after)} acknowledged writes are not on {new}: {summary(missing)}"
    slowest = max(calls, key=lambda call: call.seconds)
    assert slowest.seconds <= NO_HANG, f"a call took {slowest.seconds:.2f}s: {summary([slowest])}"
    print(f"\nswitch {event.at - killed:.2f}s, writes resumed {recovered - killed:.2f}s after the kill; "
          f"{sum(call.ok for call in calls)} acknowledged, {sum(not call.ok for call in calls)} failed")


# -- 4. SIGSTOP, then the zombie window -------------------------------------------------------------


@pytest.mark.timeout(90)
def test_frozen_master_fails_in_flight_requests_and_no_write_goes_to_the_zombie(
        sentinel_topology, sentinel_proxy) -> None:
    """SIGSTOP s1's master (timeout 500 ms): the requests in flight get an error within the timeout
    + 1 s; after the switch, SIGCONT it and keep writing through its ~10 s as a zombie master,
    until it shows role:slave: 0 writes acknowledged since the switch are missing on the new
    master."""
    topology = sentinel_topology
    timeout = 0.5
    process, client = sentinel_proxy(topology, timeout="500")
    loads = start_loads(writers(client, process.text, 2, "freeze-", per_writer=6000, max_seconds=80))
    old, new = topology.master("s1"), topology.replica("s1")
    frozen = topology.freeze(old)
    try:
        event = topology.watcher.wait("s1", timeout=15, after=frozen)
        assert event.new_address == new.address
        # SIGCONT only once the proxy has switched too: a reply the old master sends on waking to a
        # request the proxy still (rightly) believed to be on the master would be a loss no proxy
        # can prevent.  Once switched, nothing may be pending on the old master any more.
        wait_until(lambda: shard_stats(process, "s1")["address"] == new.address, timeout=10, interval=0.01,
                   what=f"the proxy's stats to show the switch to {new.address}")
        followed = time.monotonic()
    finally:
        thawed = topology.thaw(old)
    switch = event.at

    def demoted() -> bool:
        info = old.info("replication", timeout=1)
        return info["role"] == "slave" and info.get("master_link_status") == "up"

    wait_until(demoted, timeout=25, interval=0.05, what=f"{old} to become a linked replica")
    demoted_at = time.monotonic()
    calls = _stop_all(loads)

    for load in loads:
        mine = [call for call in load.calls if call.sent >= frozen]
        assert mine, f"{load.name} made no call after the freeze"
        first = mine[0]
        assert not first.ok and first.seconds <= timeout + 1.0, \
            f"the request in flight at the freeze: {summary([first])}"
    overlapping = [call for call in calls if call.sent < frozen < call.done]
    assert all(call.done - frozen <= timeout + 1.0 for call in overlapping), summary(overlapping)
    slowest = max(calls, key=lambda call: call.seconds)
    assert slowest.seconds <= timeout + HOLD + 1.0, f"a call took {slowest.seconds:.2f}s: {summary([slowest])}"

    since = [call for call in calls if call.ok and call.done >= switch]
    zombie_window = [call for call in since if thawed <= call.sent <= demoted_at]
    assert zombie_window, "no write was acknowledged while the old master was back as a master"
    on_new = holding(new, (call.key for call in since))
    missing = [call for call in since if call.key not in on_new]
    timing = (f"switch {switch - frozen:.2f}s after SIGSTOP, followed by the proxy {followed - switch:.3f}s later, "
              f"SIGCONT {thawed - switch:.3f}s after the switch; old master a replica {demoted_at - thawed:.2f}s "
              f"after SIGCONT")
    missing = [f"{call.key} sent {call.sent - switch:+.3f}s done {call.done - switch:+.3f}s" for call in missing]
    assert missing == [], (f"{len(missing)} of {len(since)} writes acknowledged since the switch are missing on "
                           f"the new master ({timing}): {missing[:5]}")
    print(f"\n{timing}; {len(since)} writes acknowledged since the switch, {len(zombie_window)} in the zombie "
          "window")


# -- 5. events cut: the reconcile path --------------------------------------------------------------


@pytest.mark.timeout(60)
def test_with_event_connections_cut_a_killed_master_is_still_followed(sentinel_topology, sentinel_proxy) -> None:
    """The proxy reaches every sentinel through a SentinelRelay; its event connections are cut
    silently (no message, no pong, nothing closed), then s1's master is SIGKILLed: writes succeed
    again within 10 s (the 5 s reconcile period + sentinel's ~2.3 s + margin), all of them on the
    new master."""
    topology = sentinel_topology
    relays = [topology.relay(sentinel) for sentinel in topology.sentinels]
    process, client = sentinel_proxy(topology, sentinels=[relay.address for relay in relays])
    wait_until(lambda: sum(relay.open_event_connections for relay in relays) >= 1, timeout=10,
               what="the proxy to subscribe to a sentinel through the relays")
    loads = start_loads(writers(client, process.text, 1, "cut-"))
    for relay in relays:
        relay.cut_events(True)
    old, new = topology.master("s1"), topology.replica("s1")
    killed = topology.kill(old)
    event = topology.watcher.wait("s1", timeout=15, after=killed)
    assert event.new_address == new.address
    recovered = wait_for_ack(loads, killed, 15, process)
    wait_reached(loads, recovered + 1.0, timeout=10, what="the writer to run 1 s past the recovery")
    calls = _stop_all(loads)

    assert recovered - killed <= 10.0, f"writes resumed {recovered - killed:.2f}s after the kill"
    assert sum(relay.dropped_bytes for relay in relays) > 0, "the cut withheld nothing from the proxy"
    after = [call for call in calls if call.ok and call.sent >= killed]
    on_new = holding(new, (call.key for call in after))
    missing = [call for call in after if call.key not in on_new]
    assert missing == [], summary(missing)
    print(f"\nswitch {event.at - killed:.2f}s, writes resumed {recovered - killed:.2f}s after the kill")


@pytest.mark.timeout(60)
def test_with_event_connections_cut_a_manual_failover_is_still_followed(sentinel_topology, sentinel_proxy) -> None:
    """Events cut, then SENTINEL FAILOVER s1: the old master stays healthy (no EOF, no READONLY for
    ~11 s), so no event and no error tells the proxy; the 5 s reconcile (or its own look at the
    replicas) must: writes reach the new master within 6.5 s of the switch, and every write
    acknowledged after that is there."""
    topology = sentinel_topology
    relays = [topology.relay(sentinel) for sentinel in topology.sentinels]
    process, client = sentinel_proxy(topology, sentinels=[relay.address for relay in relays])
    wait_until(lambda: sum(relay.open_event_connections for relay in relays) >= 1, timeout=10,
               what="the proxy to subscribe to a sentinel through the relays")
    (writer,) = start_loads(writers(client, process.text, 1, "reconcile-"))
    for relay in relays:
        relay.cut_events(True)
    old, new = topology.master("s1"), topology.replica("s1")
    asked = topology.failover("s1")
    event = topology.watcher.wait("s1", timeout=15, after=asked)
    assert event.new_address == new.address
    switch = event.at
    wait_reached([writer], switch + 8.0, timeout=15, what="the writer to run 8 s past the switch")
    calls = writer.stop()
    assert old.role() == "master", "the old master was converted before the check"

    after_switch = [call for call in calls if call.ok and call.sent >= switch]
    on_new = holding(new, (call.key for call in after_switch))
    reached = min((call.done for call in after_switch if call.key in on_new), default=None)
    assert reached is not None, f"no write sent after the switch reached {new}: {summary(after_switch)}"
    assert reached - switch <= 6.5, f"writes reached the new master {reached - switch:.2f}s after the switch"
    late = [call for call in after_switch if call.done > switch + 6.5]
    missing = [call for call in late if call.key not in on_new]
    assert late and missing == [], (f"{len(missing)} of {len(late)} writes acknowledged 6.5 s after the switch are "
                                    f"not on the new master: {summary(missing)}")
    assert sum(relay.dropped_bytes for relay in relays) > 0, "the cut withheld nothing from the proxy"
    print(f"\nwrites reached the new master {reached - switch:.2f}s after the switch (events cut)")


# -- 6. reads from replicas --------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_prefer_replica_reads_the_replica_then_the_master_when_it_dies(sentinel_topology, sentinel_proxy) -> None:
    """read_policy prefer-replica: GETs go to the replica (its cmdstat_get grows, the master's
    does not); SIGKILL the replica: every read keeps succeeding and reads reach the master within
    2 s."""
    topology = sentinel_topology
    process, client = sentinel_proxy(topology, read_policy="prefer-replica", max_replica_lag="5000")
    keys = populate(client, process.text, "s1", 50, "replica-")
    master, replica = topology.master("s1"), topology.replica("s1")
    wait_until(lambda: holding(replica, keys) == set(keys), timeout=10, what="the replica to have the keys")
    wait_reads_reach(replica, client, keys[0])

    before = (master.calls("get"), replica.calls("get"))
    connection = client()
    for key in keys:
        assert connection.get(key) == key.encode(), key
    connection.close()
    after = (master.calls("get"), replica.calls("get"))
    assert (after[0] - before[0], after[1] - before[1]) == (0, len(keys)), (before, after)

    (reader,) = start_loads([Load(client, keys, read=True, max_seconds=40, name="reader")])
    base = master.calls("get")
    killed = topology.kill(replica)
    wait_until(lambda: master.calls("get") > base, timeout=10, interval=0.02,
               what="a read through the proxy to reach the master")
    moved = time.monotonic()
    wait_reached([reader], moved + 1.0, timeout=10, what="the reader to run 1 s past the move")
    calls = reader.stop()
    failed = [call for call in calls if not call.ok]
    assert failed == [], f"{len(failed)} reads failed: {summary(failed)}"
    assert moved - killed <= 2.0, f"reads reached the master {moved - killed:.2f}s after the replica died"
    slowest = max(calls, key=lambda call: call.seconds)
    assert slowest.seconds <= NO_HANG, summary([slowest])


@pytest.mark.timeout(60)
def test_prefer_replica_stops_reading_a_frozen_replica(sentinel_topology, sentinel_proxy) -> None:
    """SIGSTOP the replica: every read still succeeds (those in flight may take up to timeout + 1 s);
    from ~2 s on (2.5 s here: a 1 s check and a 1 s timeout) reads are fast and served by the master."""
    topology = sentinel_topology
    process, client = sentinel_proxy(topology, read_policy="prefer-replica", max_replica_lag="5000")
    keys = populate(client, process.text, "s1", 50, "frozen-replica-")
    master, replica = topology.master("s1"), topology.replica("s1")
    wait_until(lambda: holding(replica, keys) == set(keys), timeout=10, what="the replica to have the keys")
    wait_reads_reach(replica, client, keys[0])

    (reader,) = start_loads([Load(client, keys, read=True, max_seconds=40, name="reader")])
    frozen = topology.freeze(replica)
    try:
        wait_reached([reader], frozen + 2.5, timeout=10, what="the reader to run 2.5 s past the freeze")
        base = master.calls("get")
        settled = time.monotonic()
        wait_reached([reader], settled + 2.0, timeout=10, what="the reader to run 2 s more")
        measured = time.monotonic()
        served = master.calls("get") - base
        calls = reader.stop()
    finally:
        topology.thaw(replica)
    failed = [call for call in calls if not call.ok]
    assert failed == [], f"{len(failed)} reads failed: {summary(failed)}"
    slowest = max(calls, key=lambda call: call.seconds)
    assert slowest.seconds <= TIMEOUT + 1.0, summary([slowest])
    late = [call for call in calls if call.sent >= frozen + 2.5]
    slow = [call for call in late if call.seconds >= TIMEOUT]
    assert late and slow == [], f"reads sent 2.5 s after the freeze still waited on the replica: {summary(slow)}"
    expected = [call for call in calls if call.sent >= settled and call.done <= measured]
    assert expected and served >= len(expected), f"the master served {served} of {len(expected)} reads"


@pytest.mark.timeout(60)
def test_prefer_replica_stops_reading_a_replica_that_left_its_master(sentinel_topology, sentinel_proxy) -> None:
    """REPLICAOF NO ONE on the replica: sentinel still lists it as a healthy replica for up to 10 s
    (its INFO period), so only the proxy's own check can see it: from 2.5 s on it is not read from
    any more (its cmdstat_get stays put, the master serves the reads).

    To the proxy a replica turning master looks like a promotion, so it may hold the shard's
    master requests for failover_hold while it asks the sentinels: reads sent within 1 s + hold
    of the detach may answer TRYAGAIN, nothing else may fail, and every read after that succeeds."""
    topology = sentinel_topology
    process, client = sentinel_proxy(topology, read_policy="prefer-replica", max_replica_lag="5000")
    keys = populate(client, process.text, "s1", 50, "detached-")
    master, replica = topology.master("s1"), topology.replica("s1")
    wait_until(lambda: holding(replica, keys) == set(keys), timeout=10, what="the replica to have the keys")
    wait_reads_reach(replica, client, keys[0])

    (reader,) = start_loads([Load(client, keys, read=True, max_seconds=40, name="reader")])
    assert query(replica.port, "REPLICAOF", "NO", "ONE") == "OK"
    detached = time.monotonic()
    fenced_until = detached + 1.0 + HOLD
    wait_reached([reader], detached + 2.5, timeout=10, what="the reader to run 2.5 s past the detach")
    before = (master.calls("get"), replica.calls("get"))
    settled = time.monotonic()
    wait_reached([reader], fenced_until + 2.0, timeout=10, what="the reader to run 2 s past the hold")
    measured = time.monotonic()
    after = (master.calls("get"), replica.calls("get"))
    calls = reader.stop()
    listed = [entry["flags"] for entry in topology.sentinels[0].replicas_info("s1")
              if entry["port"] == str(replica.port)]

    assert after[1] == before[1], f"the detached replica served {after[1] - before[1]} reads 2.5 s after it left"
    served = [call for call in calls if call.ok and call.sent >= settled and call.done <= measured]
    assert after[0] - before[0] >= len(served), f"the master served {after[0] - before[0]} of {len(served)} reads"
    failed = [call for call in calls if not call.ok]
    unexpected = [call for call in failed if not ("TRYAGAIN" in call.detail.upper() and call.sent <= fenced_until)]
    assert unexpected == [], f"{len(unexpected)} reads failed: {summary(unexpected)}"
    assert [call for call in calls if call.ok and call.sent > fenced_until], "no read succeeded after the hold"
    slowest = max(calls, key=lambda call: call.seconds)
    assert slowest.seconds <= NO_HANG, summary([slowest])
    print(f"\n{len(failed)} reads answered TRYAGAIN; sentinel's flags for the detached replica at the end: {listed}")


@pytest.mark.timeout(90)
def test_prefer_replica_never_reads_a_returning_old_master_before_its_link_is_up(
        sentinel_topology, sentinel_proxy) -> None:
    """After a SIGKILL failover, restart the old master: it is back as an (empty) master for ~10 s
    while sentinel lists it as a replica. No read may go to it before its master_link_status is up:
    its cmdstat_get is 0 when the test first sees the link up, and no read returns a wrong value."""
    topology = sentinel_topology
    process, client = sentinel_proxy(topology, read_policy="prefer-replica", max_replica_lag="5000")
    keys = populate(client, process.text, "s1", 50, "returning-")
    old, new = topology.master("s1"), topology.replica("s1")
    wait_until(lambda: holding(new, keys) == set(keys), timeout=10, what="the replica to have the keys")
    killed = topology.kill(old)
    event = topology.watcher.wait("s1", timeout=15, after=killed)
    assert event.new_address == new.address
    wait_until(lambda: new.role() == "master", timeout=5, what=f"{new} to report role:master")

    (reader,) = start_loads([Load(client, keys, read=True, max_seconds=60, name="reader")], at_least=5,
                            timeout=15)
    topology.restart(old)
    restarted = time.monotonic()
    snapshot: Dict[str, str] = {}
    watch: List[Resp] = []

    def linked() -> bool:
        # One INFO for both sections: the role, the link and the GET count of the same moment.
        # The connection is killed at the conversion (CLIENT KILL TYPE normal): then a new one.
        if not watch:
            watch.append(Resp(old.port, timeout=1))
        try:
            reply = watch[0].call("INFO", "replication", "commandstats")
        except OSError:
            watch.pop().close()
            raise
        if not isinstance(reply, str):  # an error reply (LOADING...)
            return False
        info = parse_info(reply)
        if info.get("role") == "slave" and info.get("master_link_status") == "up":
            snapshot.update(info)
            return True
        return False

    try:
        wait_until(linked, timeout=30, interval=0.005, what=f"{old} to come back as a linked replica")
    finally:
        for connection in watch:
            connection.close()
    linked_at = time.monotonic()
    calls = reader.stop()

    assert cmdstat_calls(snapshot, "get") == 0, \
        f"{old} served {cmdstat_calls(snapshot, 'get')} GETs before its link to the master was up"
    after = [call for call in calls if call.sent >= restarted]
    bad = [call for call in after if not call.ok]
    assert after and bad == [], f"{len(bad)} of {len(after)} reads since the restart failed: {summary(bad)}"
    print(f"\nold master linked as a replica {linked_at - restarted:.2f}s after its restart; {len(after)} reads")


@pytest.mark.timeout(60)
def test_replica_policy_answers_an_error_when_no_replica_is_left(sentinel_topology, sentinel_proxy) -> None:
    """read_policy replica with the replica SIGKILLed: every read answers an error reply, within
    timeout + failover_hold + 1 s, and none goes to the master."""
    topology = sentinel_topology
    process, client = sentinel_proxy(topology, read_policy="replica", max_replica_lag="5000")
    keys = populate(client, process.text, "s1", 20, "replica-only-")
    master, replica = topology.master("s1"), topology.replica("s1")
    wait_until(lambda: holding(replica, keys) == set(keys), timeout=10, what="the replica to have the keys")
    wait_reads_reach(replica, client, keys[0])

    base = master.calls("get")
    topology.kill(replica)
    connection = client()
    results = []
    try:
        for key in keys:
            sent = time.monotonic()
            try:
                outcome = repr(connection.get(key))
            except redis.ResponseError as err:
                outcome = f"error reply: {err}"
            except redis.RedisError as err:
                outcome = f"{type(err).__name__}: {err}"
            results.append((key, time.monotonic() - sent, outcome))
    finally:
        connection.close()
    not_errors = [result for result in results if not result[2].startswith("error reply")]
    assert not_errors == [], f"reads with the replica dead: {not_errors}"
    slowest = max(results, key=lambda result: result[1])
    assert slowest[1] <= NO_HANG, f"a read took {slowest[1]:.2f}s: {slowest}"
    assert master.calls("get") == base, "read_policy replica read from the master"


# -- 7. one sentinel lost ----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_with_one_sentinel_dead_a_kill_is_followed_once_and_nothing_flaps(sentinel_topology, sentinel_proxy) -> None:
    """Kill 1 of the 3 sentinels, then SIGKILL s1's master: writes work within 5 s; for 5 s more
    every write succeeds and the stats keep s1 at exactly 1 switch to the new master; s2 has 0."""
    topology = sentinel_topology
    process, client = sentinel_proxy(topology)
    loads = start_loads(writers(client, process.text, 1, "one-down-"))
    topology.kill(topology.sentinels[2])
    old, new = topology.master("s1"), topology.replica("s1")
    s2_master = topology.master_address("s2")
    killed_wall = time.time()
    killed = topology.kill(old)
    recovered = wait_for_ack(loads, killed, 12, process)
    assert recovered - killed <= 5.0, f"writes resumed {recovered - killed:.2f}s after the kill"
    event = topology.watcher.wait("s1", timeout=5, after=killed)
    assert event.new_address == new.address

    seen: List[dict] = []
    wrong: List[dict] = []

    def five_seconds_on() -> bool:
        stats = shard_stats(process, "s1")
        seen.append(stats)
        if stats["switches"] != 1 or stats["address"] != new.address or stats["role"] != "master":
            wrong.append({key: stats[key] for key in ("switches", "address", "role", "sentinel_epoch")})
        return all(load.reached(recovered + 5.0) for load in loads)

    wait_until(five_seconds_on, timeout=15, interval=0.1, what="5 s of writing after the recovery")
    calls = _stop_all(loads)
    assert wrong == [] and len(seen) >= 10, f"s1 flapped: {wrong[:5]}"
    stats = stats_of(process)["alpha"]
    assert (stats["s1"]["switches"], stats["s1"]["address"]) == (1, new.address), stats["s1"]
    assert killed_wall - 1 <= stats["s1"]["last_switch"] <= time.time() + 1, stats["s1"]
    assert stats["s1"]["sentinel_epoch"] >= 1, stats["s1"]
    assert (stats["s2"]["switches"], stats["s2"]["address"]) == (0, s2_master), stats["s2"]
    failed = [call for call in calls if call.sent >= recovered and not call.ok]
    assert failed == [], f"writes failed after the recovery: {summary(failed)}"


# -- 8. reload -----------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_reload_adds_a_shard_found_through_sentinel_and_refuses_an_unmonitored_one(
        sentinel_topology, sentinel_proxy) -> None:
    """Start with s1 only; reload with s1 and s2 (s2's guess is its replica): keys placed on s2 land
    on s2's real master. Then a reload adding s9, which no sentinel monitors, fails: reload_failures
    is 1, the generation stays 2, and both shards keep serving from their masters."""
    topology = sentinel_topology
    process, client = sentinel_proxy(topology, names=["s1"])
    connection = client()
    first = keys_on(process.text, "s1", 10, "before-")
    for key in first:
        assert connection.set(key, key) is True
    assert holding(topology.master("s1"), first) == set(first)

    text = pool_text(topology, names=["s1", "s2"], guesses={"s2": topology.replica("s2").address})
    write_atomically(process.config_path, text)
    process.proc.send_signal(signal.SIGHUP)
    assert process.bound(generation=2)["generation"] == 2

    def served(token: str) -> None:
        for name in ("s1", "s2"):
            keys = keys_on(text, name, 10, f"{token}-{name}-")
            for key in keys:
                assert connection.set(key, key) is True, key
            master = topology.master(name)
            assert holding(master, keys) == set(keys), f"{token}: writes for {name} are not on {master}"

    served("added")
    assert shard_stats(process, "s2")["address"] == topology.master_address("s2")

    bad = pool_text(topology, names=["s1", "s2", "s9"],
                    guesses={"s2": topology.replica("s2").address, "s9": dead_address()})
    write_atomically(process.config_path, bad)
    process.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: stats_of(process)["reload_failures"] == 1, timeout=20, what="reload_failures to be 1")
    stats = stats_of(process)
    assert stats["config_generation"] == 2 and "s9" not in stats["alpha"], stats
    served("after-bad")
    assert process.alive
    connection.close()


# -- 9. --check-sentinels and the start-up check ---------------------------------------------------


def run_to_exit(argv: List[str], cwd: Path, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Run ``argv`` until it exits by itself (AssertionError, with its output, if it does not)."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate(timeout=10)
        raise AssertionError(f"{argv} did not exit within {timeout}s:\n{stdout}{stderr}") from None
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


@pytest.mark.timeout(90)
def test_check_sentinels_reports_the_masters_and_unmonitored_names_stop_a_start(sentinel_topology,
                                                                                 tmp_path) -> None:
    """``twinproxy --check-sentinels -c FILE`` exits 0 and names both real masters (the guesses are
    stale); with a server s9 no sentinel monitors it exits non-zero saying so, and ``twinproxy -c``
    on that file exits non-zero at start with one line "no sentinel monitors 's9'"."""
    topology = sentinel_topology
    good = tmp_path / "good.yml"
    write_atomically(good, pool_text(topology, guesses={"s1": topology.replica("s1").address,
                                                        "s2": dead_address()}))
    result = run_to_exit([str(BIN / "twinproxy"), "--check-sentinels", "-c", str(good)], tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for name in ("s1", "s2"):
        assert name in output and topology.master_address(name) in output, output

    bad = tmp_path / "bad.yml"
    write_atomically(bad, pool_text(topology, names=["s1", "s9"], guesses={"s9": dead_address()}))
    result = run_to_exit([str(BIN / "twinproxy"), "--check-sentinels", "-c", str(bad)], tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "no sentinel monitors" in output, output

    result = run_to_exit([str(BIN / "twinproxy"), "-c", str(bad), "-s", "0", "-a", LOOPBACK], tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    lines = [line for line in output.splitlines() if "no sentinel monitors 's9'" in line]
    assert len(lines) == 1, output
    assert "Traceback" not in output, output
