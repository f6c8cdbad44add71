"""Online slot migration through faults, under the recorded register load of two proxies (ZooKeeper, 2 s
sessions): a proxy stopped (SIGSTOP) past its session while the dashboard goes on without it, a proxy
killed and restarted mid-migration, and a cancel mid-migration.  The history checker must pass each time,
the migration must end as asked, and the keys must be where the slots say (read on the backends)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest
import redis

from tests.cluster_harness import Dashboard, admin, admin_ok, proxies_at, wait_for_status
from tests.coordinator_servers import coordinator_url_for
from tests.history import check
from tests.integration.test_cluster_migration import build, finish, keys_in, run_load
from tests.servers import LOOPBACK, wait_until

pytestmark = [pytest.mark.slow]


@pytest.fixture
def processes():
    started: List[Any] = []
    yield started
    for process in started:
        if getattr(process, "proc", None) is not None:
            _signal_group(process, signal.SIGCONT)
        process.stop()


def _signal_group(process: Any, signum: int) -> None:
    try:
        os.killpg(process.proc.pid, signum)   # the proxy and its workers (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass


def migrations(dashboard: Dashboard) -> List[Dict[str, Any]]:
    return json.loads(admin_ok(dashboard, "migration", "status", "--json"))


def wait_for_migration(dashboard: Dashboard, predicate, what: str, timeout: float = 60) -> Dict[str, Any]:
    seen: List[Dict[str, Any]] = []

    def check_now() -> bool:
        seen[:] = migrations(dashboard)
        return bool(seen) and predicate(seen[-1])

    wait_until(check_now, timeout=timeout, what=what)
    return seen[-1]


def preload(server: Any, keys: List[bytes]) -> redis.Redis:
    client = redis.Redis(host=LOOPBACK, port=server.port, protocol=2)
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.set(key, b"v" + key)
        pipe.execute()
    return client


def only_connection_errors(errors: List[str]) -> List[str]:
    """What a client may see while its proxy is down: the connection refused or reset, nothing else."""
    return [error for error in errors if "ConnectionError" not in error and "Connection reset" not in error]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("workers", [1, 2])
def test_a_proxy_stopped_past_its_session_serves_nothing_stale_when_it_resumes(workers, request, tmp_path: Path,
                                                                              redis_servers, processes) -> None:
    """P2 is stopped before the migration starts; its session expires, the dashboard drops it and moves
    the slots.  When P2 resumes, its table still says "stable on group 1": without its lease it would
    read and write group 1.  It must wait, confirm its session, read the topology, and serve from there."""
    url = coordinator_url_for("zookeeper", request, tmp_path)
    servers = redis_servers(2)
    dashboard, proxies = build(tmp_path, url, servers, processes, workers=(1, workers))
    frozen = proxies[1].process
    moving = keys_in(0, 511, 4000, "pre")
    source = preload(servers[0], moving)
    target = redis.Redis(host=LOOPBACK, port=servers[1].port, protocol=2)
    shared = keys_in(0, 511, 20, "shared") + keys_in(512, 1023, 4, "shared")
    loads, history = run_load([p.address for p in proxies], shared, 150)
    wait_until(lambda: len(history) > 400, timeout=30, what="the load to run")

    _signal_group(frozen, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        wait_for_status(dashboard, lambda s: proxies_at(s, 1), timeout=30,
                        what="the stopped proxy dropped once its session expired")
        admin_ok(dashboard, "slots", "migrate", "0-511", "2", "--keys-per-second", "2000")
        wait_for_migration(dashboard, lambda m: m["state"] == "migrating" and m["keys_moved"] > 300,
                           what="keys moving while the proxy is stopped")
    finally:
        _signal_group(frozen, signal.SIGCONT)
    resumed_at = time.monotonic()
    assert resumed_at - stopped_at > 2.0      # past the 2 s session
    count = len(history)
    wait_until(lambda: sum(1 for op in history[count:] if op.client == "c1") > 100, timeout=30,
               what="the resumed proxy's client to go on")
    done = admin(dashboard, "migration", "wait", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    wait_for_status(dashboard, lambda s: proxies_at(s, 2), timeout=30, what="the resumed proxy registered again")
    count = len(history)
    wait_until(lambda: len(history) > count + 400, timeout=30, what="the load to go on after the migration")
    finish(loads)
    problems = check(history)
    assert problems == [], problems[:10]
    # The stopped proxy's clients: a request it had sent before the stop may time out (its server timeout
    # is 2 s and it was stopped longer); anything else is a failure.
    errors = [error for load in loads for error in load.errors
              if not (load.label in ("c1", "c3") and "timed out" in error)]
    assert errors == []
    assert "did not run for" in proxies[1].process.output()
    assert not any(source.exists(key) for key in moving)
    assert all(target.get(key) == b"v" + key for key in moving[::50])


@pytest.mark.timeout(240)
def test_a_proxy_killed_and_restarted_mid_migration_rejoins_and_routes_correctly(request, tmp_path: Path,
                                                                               redis_servers, processes) -> None:
    url = coordinator_url_for("zookeeper", request, tmp_path)
    servers = redis_servers(2)
    dashboard, proxies = build(tmp_path, url, servers, processes, workers=(1, 1))
    moving = keys_in(0, 511, 4000, "pre")
    source = preload(servers[0], moving)
    target = redis.Redis(host=LOOPBACK, port=servers[1].port, protocol=2)
    shared = keys_in(0, 511, 20, "shared") + keys_in(512, 1023, 4, "shared")
    loads, history = run_load([p.address for p in proxies], shared, 150)
    wait_until(lambda: len(history) > 400, timeout=30, what="the load to run")
    admin_ok(dashboard, "slots", "migrate", "0-511", "2", "--keys-per-second", "600")   # ~7 s
    wait_for_migration(dashboard, lambda m: m["state"] == "migrating" and m["keys_moved"] > 300,
                       what="the migration under way")
    proxies[1].kill()
    wait_for_status(dashboard, lambda s: proxies_at(s, 1), timeout=30, what="the killed proxy gone")
    proxies[1].start()
    wait_for_status(dashboard, lambda s: len(s.get("proxies", [])) == 2, timeout=30,
                    what="the restarted proxy registered")
    middle = migrations(dashboard)[-1]
    count = len(history)
    wait_until(lambda: sum(1 for op in history[count:] if op.client == "c1" and op.ok) > 100, timeout=30,
               what="the restarted proxy's client served again")
    done = admin(dashboard, "migration", "wait", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    count = len(history)
    wait_until(lambda: len(history) > count + 400, timeout=30, what="the load to go on after the migration")
    finish(loads)
    problems = check(history)
    assert problems == [], problems[:10]
    assert only_connection_errors([error for load in loads for error in load.errors]) == []
    assert middle["state"] == "migrating", middle   # it rejoined mid-migration
    assert not any(source.exists(key) for key in moving)
    assert all(target.get(key) == b"v" + key for key in moving[::50])


@pytest.mark.timeout(240)
def test_a_cancel_under_load_leaves_every_key_readable_and_one_owner(request, tmp_path: Path, redis_servers,
                                                                    processes) -> None:
    url = coordinator_url_for("zookeeper", request, tmp_path)
    servers = redis_servers(2)
    dashboard, proxies = build(tmp_path, url, servers, processes, workers=(1, 2))
    moving = keys_in(0, 511, 4000, "pre")
    source = preload(servers[0], moving)
    target = redis.Redis(host=LOOPBACK, port=servers[1].port, protocol=2)
    shared = keys_in(0, 511, 20, "shared") + keys_in(512, 1023, 4, "shared")
    loads, history = run_load([p.address for p in proxies], shared, 150)
    wait_until(lambda: len(history) > 400, timeout=30, what="the load to run")
    admin_ok(dashboard, "slots", "migrate", "0-511", "2", "--keys-per-second", "1500")
    wait_for_migration(dashboard, lambda m: m["state"] == "migrating" and m["keys_moved"] > 1000,
                       what="a third of the keys moved")
    admin_ok(dashboard, "migration", "cancel")
    done = admin(dashboard, "migration", "wait", timeout=120)
    ended = migrations(dashboard)[-1]
    count = len(history)
    wait_until(lambda: len(history) > count + 400, timeout=30, what="the load to go on after the cancel")
    finish(loads)
    assert ended["state"] == "cancelled", (ended, done.stdout, done.stderr)
    problems = check(history)
    assert problems == [], problems[:10]
    assert [error for load in loads for error in load.errors] == []
    status = json.loads(admin_ok(dashboard, "status", "--json"))
    assert [(r["first"], r["last"], r["group"], r["state"]) for r in status["slots"]] == [(0, 1023, 1, "stable")]
    # Every key readable, and on group 1 alone.
    assert all(source.get(key) == b"v" + key for key in moving)
    assert not any(target.exists(key) for key in moving)
    client = redis.Redis(host=LOOPBACK, port=proxies[0].port, protocol=2)
    assert all(value == b"v" + key for key, value in zip(moving[:500], client.mget(moving[:500])))
