"""Sentinel mode through real processes, following the masters: ``twinproxy -c`` over
a fresh topology per test (tests/sentinel_servers.py: per shard a master and a
replica, three sentinels at down-after 1000 ms / failover-timeout 3000 ms):
discovery, SENTINEL FAILOVER, SIGKILL and SIGSTOP of a master, the event
connections cut, a sentinel lost, reload, ``--check-sentinels`` and ``--workers``.
The reads from replicas are in test_sentinel_replicas.py, the load and its
helpers in tests/sentinel_load.py.

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
import time
from pathlib import Path
from typing import List, Optional

import pytest
import redis

from tests.proxy_clients import http, write_atomically
from tests.sentinel_load import (
    HOLD,
    NO_HANG,
    holding,
    shard_stats,
    start_loads,
    stats_of,
    stop_all,
    summary,
    wait_for_ack,
    wait_reached,
    writers,
)
from tests.sentinel_servers import dead_address, keys_on, pool_text
from tests.servers import LOOPBACK, wait_until

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


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
    calls = stop_all(loads)

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
    calls = stop_all(loads)

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
    calls = stop_all(loads)

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


# -- 6. one sentinel lost ----------------------------------------------------------------------


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
    calls = stop_all(loads)
    assert wrong == [] and len(seen) >= 10, f"s1 flapped: {wrong[:5]}"
    stats = stats_of(process)["alpha"]
    assert (stats["s1"]["switches"], stats["s1"]["address"]) == (1, new.address), stats["s1"]
    assert killed_wall - 1 <= stats["s1"]["last_switch"] <= time.time() + 1, stats["s1"]
    assert stats["s1"]["sentinel_epoch"] >= 1, stats["s1"]
    assert (stats["s2"]["switches"], stats["s2"]["address"]) == (0, s2_master), stats["s2"]
    failed = [call for call in calls if call.sent >= recovered and not call.ok]
    assert failed == [], f"writes failed after the recovery: {summary(failed)}"


# -- 7. reload -----------------------------------------------------------------------------------------


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


# -- 8. --check-sentinels and the start-up check ---------------------------------------------------


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


# -- 9. --workers --------------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_two_workers_follow_a_manual_failover(sentinel_topology, sentinel_proxy) -> None:
    """``--workers 2`` (each worker follows the sentinels itself) under 8 writers, so both workers
    have clients: after SENTINEL FAILOVER s1 every writer's writes reach the new master within 3 s
    of the switch and every write sent later succeeds there; the stats port (the workers' documents
    merged) shows s1 at the new master after exactly 1 switch."""
    topology = sentinel_topology
    process, client = sentinel_proxy(topology, extra_args=["--workers", "2"])
    loads = start_loads(writers(client, process.text, 8, "workers-", per_writer=4000))
    old, new = topology.master("s1"), topology.replica("s1")
    asked = topology.failover("s1")
    event = topology.watcher.wait("s1", timeout=15, after=asked)
    assert (event.old_address, event.new_address) == (old.address, new.address)
    switch = event.at
    wait_reached(loads, switch + 4.0, timeout=15, what="the writers to run 4 s past the switch")

    def followed() -> Optional[dict]:
        stats = shard_stats(process, "s1")
        return stats if stats["address"] == new.address else None

    stats = wait_until(followed, timeout=5, interval=0.1, what=f"the merged stats to show s1 at {new.address}")
    calls = stop_all(loads)
    # Checked well before the old master's conversion (~11 s after the failover) wipes it.
    assert old.role() == "master", "the old master was converted before the check"
    assert (stats["address"], stats["switches"]) == (new.address, 1), stats

    on_new = holding(new, (call.key for call in calls if call.ok and call.sent >= switch))
    for load in loads:
        after_switch = [call for call in load.calls if call.sent >= switch]
        reached = min((call.done for call in after_switch if call.ok and call.key in on_new), default=None)
        assert reached is not None, f"{load.name}: no write after the switch reached {new}: {summary(after_switch)}"
        assert reached - switch <= 3.0, \
            f"{load.name}: writes reached the new master {reached - switch:.2f}s after the switch"
        late = [call for call in after_switch if call.sent >= switch + 3.0]
        bad = [call for call in late if not (call.ok and call.key in on_new)]
        assert late and bad == [], (f"{load.name}: {len(bad)} of {len(late)} writes sent 3 s after the switch "
                                    f"failed or are not on the new master: {summary(bad)}")
    failed = sum(not call.ok for call in calls)
    print(f"\n8 writers over 2 workers: {sum(call.ok for call in calls)} writes acknowledged, {failed} failed; "
          f"switch {switch - asked:.2f}s after SENTINEL FAILOVER")


# -- a shard with nowhere to go: /health and /metrics say so ----------------------------------------


@pytest.mark.timeout(60)
def test_a_shard_with_no_master_left_is_unhealthy_and_its_requests_fail_without_hanging(
        sentinel_topology, sentinel_proxy) -> None:
    """SIGKILL both nodes of s1: there is nothing to fail over to.  A write for s1 gets an error
    within failover_hold + 1 s (no hang); /health answers 503 naming s1; /metrics shows s1's master
    unconfirmed; s2 keeps serving."""
    topology = sentinel_topology
    process, client = sentinel_proxy(topology)
    (s1_key,) = keys_on(process.text, "s1", 1, "orphan-")
    (s2_key,) = keys_on(process.text, "s2", 1, "fine-")
    connection = client()
    assert connection.set(s1_key, "1") is True
    status, _ = http(process.bound_doc["http"], "/health")
    assert status == 200
    topology.kill(topology.replica("s1"))
    topology.kill(topology.master("s1"))
    started = time.monotonic()
    with pytest.raises(redis.ResponseError) as refused:
        connection.set(s1_key, "2")
    assert time.monotonic() - started <= HOLD + 1.0
    # Held for failover_hold (no master to retry on), then TRYAGAIN; redis-py names it TryAgainError.
    assert isinstance(refused.value, redis.exceptions.TryAgainError), repr(refused.value)
    assert "no confirmed master for shard 's1'" in str(refused.value)
    assert connection.set(s2_key, "1") is True

    def unhealthy():
        status, body = http(process.bound_doc["http"], "/health")
        return (status, body) if status == 503 else None

    status, body = wait_until(unhealthy, timeout=10, what="/health to answer 503")
    assert "shard s1 has no confirmed master" in body, body
    assert "s2" not in body.replace("s1", ""), body
    _, page = http(process.bound_doc["http"], "/metrics")
    assert 'role="unconfirmed"' in page and 'server="s1"' in page, page[-2000:]
    assert shard_stats(process, "s1")["role"] == "unconfirmed"
    assert shard_stats(process, "s2")["role"] == "master"
    connection.close()
