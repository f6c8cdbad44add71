"""Sentinel mode through real processes, reading from replicas: ``read_policy``
prefer-replica and replica over a fresh topology per test (tests/sentinel_servers.py),
the replica killed, frozen, detached from its master, and an old master returning
as a replica before its link is up.

As in test_sentinel_failover.py every time comes from the topology or from the
load threads' own call records (tests/sentinel_load.py), and every wait is a
deadline.
"""

from __future__ import annotations

import time
from typing import Dict, List

import pytest
import redis

from tests.resp_client import Resp, cmdstat_calls, parse_info, query
from tests.sentinel_load import (
    HOLD,
    NO_HANG,
    TIMEOUT,
    Load,
    holding,
    populate,
    start_loads,
    summary,
    wait_reached,
    wait_reads_reach,
)
from tests.servers import wait_until


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


@pytest.mark.timeout(90)
def test_prefer_replica_never_reads_a_replica_while_it_resyncs(sentinel_topology, sentinel_proxy) -> None:
    """Restart the replica (no persistence: it comes back empty) over a master holding 1M keys (its
    load outlasts the proxy's 1 s cool-down): while it connects, takes the full sync and loads it, it
    is not read from — every read through the proxy returns the value, never the empty replica's
    nil — and once in sync it is read from again."""
    topology = sentinel_topology
    process, client = sentinel_proxy(topology, read_policy="prefer-replica", max_replica_lag="5000")
    keys = populate(client, process.text, "s1", 50, "marker-")
    master, replica = topology.master("s1"), topology.replica("s1")
    # Bulk for the full sync to take a while, written in short MSETs: one long script would block
    # the master past down-after-milliseconds and make the sentinels fail it over.
    filler = master.client()
    try:
        for start in range(0, 1_000_000, 10_000):
            filler.mset({f"filler:{number}": "x" * 32 for number in range(start, start + 10_000)})
    finally:
        filler.close()
    wait_until(lambda: holding(replica, keys) == set(keys), timeout=20, what="the replica to have the keys")
    wait_reads_reach(replica, client, keys[0], timeout=20)

    (reader,) = start_loads([Load(client, keys, read=True, interval=0.001, max_seconds=60, name="reader")])
    topology.restart(replica)
    restarted = time.monotonic()

    def in_sync_and_read() -> bool:
        info = replica.info("replication", timeout=2)
        return info.get("master_link_status") == "up" and info.get("master_sync_in_progress") == "0"

    wait_until(in_sync_and_read, timeout=30, interval=0.05, what=f"{replica} to finish its full sync")
    base = replica.calls("get")
    wait_until(lambda: replica.calls("get") > base, timeout=10, interval=0.05,
               what="reads through the proxy to reach the resynced replica")
    calls = reader.stop()
    during = [call for call in calls if call.sent >= restarted]
    assert during, "no read after the restart"
    wrong = [call for call in during if not call.ok]
    assert wrong == [], f"{len(wrong)} of {len(during)} reads after the restart failed or saw stale data: " \
                        f"{summary(wrong)}"
