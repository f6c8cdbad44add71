"""Online slot migration on password-protected Redis servers, end to end through real processes.

The sweep's scripts pass the target's credentials to MIGRATE (``AUTH``, and ``AUTH2`` for an ACL user) on real
servers; 512 slots move from group 1 to group 2 of ``requirepass`` servers under a recorded client load through a
proxy whose pool has ``redis_auth``, a big key among them copied in chunks (``--big-key-bytes 64KiB``), the
dashboard given the password in its ``--redis-auth-file``; a dashboard whose ACL password is wrong shows it
as the migration's error and moves nothing, until the file is fixed and the dashboard restarted; and a sentinel
the dashboard adds watches a password-protected master (it is given ``auth-pass``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
import redis

from tests.cluster_harness import ClusterProxy, Dashboard, admin, admin_ok, proxies_at, status_json, wait_for_status
from tests.cluster_harness import independent_slot as slot
from tests.history import check
from tests.integration.test_cluster_migration import finish, keys_in, processes, run_load  # noqa: F401 - a fixture
from tests.sentinel_servers import SentinelServer
from tests.servers import LOOPBACK, wait_until
from twinproxy.cluster.movescripts import CLAIMS, claim_of
from twinproxy.credentials import Credentials
from twinproxy.dashboard.bigkeys import SWEEP_BATCH, WHOLE, batch_command, migrate_arguments, tmp_of

PASSWORD = "req-Pa55"                 # requirepass: the default user's, the proxies' redis_auth
MOVER = "mover"                       # an ACL user of the dashboard's own
MOVER_PASSWORD = "m0ver s3cret"      # a space is part of a password (nothing splits one)
BIG_FIELDS = 300                      # of 1000 bytes: ~330 KB, over the 64 KiB threshold below


def add_mover(server: Any) -> None:
    """The ACL user ``mover`` on ``server``, allowed everything the dashboard sends."""
    server.client().execute_command("ACL", "SETUSER", MOVER, "on", f">{MOVER_PASSWORD}", "~*", "&*", "+@all")


def cluster(tmp_path: Path, servers: List[Any], started: List[Any], dashboard_auth: str,
            extra: tuple = (), dashboard_user: Optional[str] = None) -> tuple:
    """A dashboard with ``dashboard_auth`` in its password file (and ``dashboard_user`` its --redis-auth-user),
    groups 1 and 2 (one server each), every slot on group 1, one proxy authenticating with the requirepass
    password."""
    url = f"file://{tmp_path / 'coordinator'}"
    dashboard = Dashboard(tmp_path / "dashboard", url, "shop", redis_auth=dashboard_auth, extra=extra,
                          redis_auth_user=dashboard_user).start()
    started.append(dashboard)
    for command in (("group", "add", "1"), ("server", "add", "1", servers[0].address), ("group", "add", "2"),
                    ("server", "add", "2", servers[1].address), ("slots", "assign", "0-1023", "1")):
        admin_ok(dashboard, *command)
    proxy = ClusterProxy(tmp_path / "proxy", url, "shop", processes=started,
                         extra_keys=f"  redis_auth: {PASSWORD}\n  slot_hold: 10000\n").start()
    wait_for_status(dashboard, lambda s: proxies_at(s, 1), what="the proxy at the generation")
    return dashboard, proxy


def all_up(status: Dict[str, Any]) -> bool:
    return all(server["up"] for group in status["groups"] for server in group["servers"])


def migration(dashboard: Dashboard) -> Dict[str, Any]:
    (entry,) = dashboard.get("/api/migrations")["migrations"]
    return entry


def log_of(dashboard: Dashboard) -> str:
    return "".join(path.read_text(errors="replace") for path in sorted(dashboard.workdir.glob("dashboard*.log")))


@pytest.mark.timeout(60)
def test_the_sweep_scripts_pass_the_targets_credentials(redis_servers) -> None:
    """On real servers: the batch script's MIGRATE with AUTH and with AUTH2 (an ACL user), refused with a wrong
    password; the script that MIGRATEs a big key whole passes them too."""
    one, two = redis_servers(2, password=PASSWORD)
    for server in (one, two):
        add_mover(server)
    source, target = one.client(), two.client()
    source.mset({b"a": b"1", b"b": b"2", b"c": b"3"})
    source.set(b"huge", b"y" * 70_000)

    def batch(auth: Any, keys: List[bytes]) -> Any:
        head = [b"65536", *migrate_arguments(LOOPBACK, two.port, 5000, auth)]
        return source.execute_command(*batch_command(head, keys))

    with pytest.raises(redis.ResponseError, match="NOAUTH"):
        batch(None, [b"a"])
    with pytest.raises(redis.ResponseError, match="WRONGPASS"):
        batch(Credentials("wrong", MOVER), [b"a"])
    with pytest.raises(redis.ResponseError, match="WRONGPASS"):
        batch(Credentials(f"{MOVER} {MOVER_PASSWORD}"), [b"a"])       # "user password" is one password now
    assert source.get(b"a") == b"1" and not target.exists(b"a")
    assert batch(Credentials(PASSWORD), [b"a", b"huge"]) == [b"OK", [b"huge"]]   # the big one claimed, not moved
    assert batch(Credentials(MOVER_PASSWORD, MOVER), [b"b", b"c"]) == [b"OK", []]
    assert target.mget([b"a", b"b", b"c"]) == [b"1", b"2", b"3"] and not source.exists(b"a", b"b", b"c")
    assert source.exists(claim_of(b"huge")) and source.smembers(CLAIMS) == {b"huge"}
    whole = [b"EVAL", WHOLE, b"3", claim_of(b"huge"), b"huge", CLAIMS,
             *migrate_arguments(LOOPBACK, two.port, 5000, Credentials(MOVER_PASSWORD, MOVER))]
    assert source.execute_command(*whole) == b"OK"
    assert target.strlen(b"huge") == 70_000 and not source.exists(b"huge", claim_of(b"huge"), CLAIMS)
    assert SWEEP_BATCH in batch_command([b"0"], [b"a"])


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_512_slots_move_between_password_protected_servers_under_load(tmp_path: Path, redis_servers,
                                                                      processes) -> None:  # noqa: F811
    servers = redis_servers(2, password=PASSWORD)
    dashboard, proxy = cluster(tmp_path, servers, processes, PASSWORD, extra=("--big-key-bytes", "64KiB"))
    # The health poll authenticates: both servers up, as what they are.
    wait_for_status(dashboard, all_up, timeout=10, what="both servers up")
    source, target = servers[0].client(), servers[1].client()
    moving = keys_in(0, 511, 1500, "pre")
    staying = keys_in(512, 1023, 300, "stay")
    (big,) = keys_in(0, 511, 1, "big")
    with source.pipeline(transaction=False) as pipe:
        for key in moving + staying:
            pipe.set(key, b"v" + key)
        for index, key in enumerate(moving[:100]):
            pipe.expire(key, 1000 + index)
        pipe.hset(big, mapping={b"f%d" % i: b"%d" % i + b"x" * 1000 for i in range(BIG_FIELDS)})
        pipe.expire(big, 5000)
        pipe.execute()
    assert source.memory_usage(big) > 64 * 1024
    shared = keys_in(0, 511, 20, "shared") + keys_in(512, 1023, 5, "shared")
    loads, history = run_load([proxy.address], shared, 60, password=PASSWORD)
    wait_until(lambda: len(history) > 300, timeout=20, what="the load to run")
    began = time.monotonic()
    admin_ok(dashboard, "slots", "migrate", "0-511", "2", "--keys-per-second", "1000")
    done = admin(dashboard, "migration", "wait", timeout=45)
    ended = time.monotonic()
    count = len(history)
    wait_until(lambda: len(history) > count + 300, timeout=20, what="the load to go on after the migration")
    finish(loads)
    assert done.returncode == 0, done.stdout + done.stderr + log_of(dashboard)[-3000:]
    during = [op for op in history if began <= op.start and op.end <= ended]
    assert ended - began > 1.0 and len(during) > 200, (ended - began, len(during))
    problems = check(history)
    assert problems == [], problems[:10]
    assert [error for load in loads for error in load.errors] == []
    # The moved slots' keys are on group 2 only, TTLs kept; the big hash copied in chunks, its TTL too.
    assert [key for key in source.scan_iter(count=1000) if slot(key) <= 511] == []
    assert target.mget(moving) == [b"v" + key for key in moving]
    assert source.mget(staying) == [b"v" + key for key in staying]
    ttls = [target.ttl(key) for key in moving[:100]]
    assert all(1000 + index - 60 <= ttl <= 1000 + index for index, ttl in enumerate(ttls)), ttls[:5]
    assert target.hlen(big) == BIG_FIELDS and target.hget(big, b"f7") == b"7" + b"x" * 1000
    assert 5000 - 60 <= target.ttl(big) <= 5000
    assert not source.exists(claim_of(big), CLAIMS) and not target.exists(tmp_of(big))
    log = log_of(dashboard)
    assert f"copying big key '{big.decode()}'" in log and "in chunks" in log, log[-3000:]
    assert PASSWORD not in log
    status = status_json(dashboard)
    assert [(r["first"], r["last"], r["group"]) for r in status["slots"]] == [(0, 511, 2), (512, 1023, 1)]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_wrong_dashboard_password_is_the_migrations_error_until_it_is_fixed(tmp_path: Path, redis_servers,
                                                                              processes) -> None:  # noqa: F811
    servers = redis_servers(2, password=PASSWORD)
    for server in servers:
        add_mover(server)
    dashboard, proxy = cluster(tmp_path, servers, processes, MOVER_PASSWORD, dashboard_user=MOVER)
    client = redis.Redis(host=LOOPBACK, port=proxy.port, password=PASSWORD, socket_timeout=10, protocol=2)
    moving = keys_in(0, 511, 200, "k")
    client.mset({key: b"v" + key for key in moving})
    # The ACL user's password changes in the dashboard's file only: it is refused everywhere now.
    dashboard.stop()
    dashboard.redis_auth_file.write_text("wrong-password\n")
    dashboard.start()
    admin_ok(dashboard, "slots", "migrate", "0-511", "2")

    def refused() -> bool:
        error = migration(dashboard).get("error") or ""
        return "refused the dashboard's credentials (WRONGPASS" in error

    wait_until(refused, timeout=20, what="the migration's error to name the refused credentials")
    entry = migration(dashboard)
    assert entry["state"] in ("pending", "preparing"), entry
    assert "migration 1 cannot start: group 1's master" in entry["error"] and "--redis-auth-file" in entry["error"]
    assert "wrong-password" not in json.dumps(entry)
    status = dashboard.status()
    assert not any(server["up"] for group in status["groups"] for server in group["servers"]), status["groups"]
    assert "refused the dashboard's credentials" in status["groups"][0]["servers"][0]["error"]
    log = log_of(dashboard)
    assert "refused the dashboard's credentials (WRONGPASS" in log and "wrong-password" not in log
    # Nothing moved, and the proxy still serves every key from group 1.
    assert not servers[1].client().exists(*moving)
    assert client.mget(moving) == [b"v" + key for key in moving]
    # Fixed and restarted, the dashboard takes the migration up and finishes it.
    dashboard.stop()
    dashboard.redis_auth_file.write_text(MOVER_PASSWORD + "\n")
    dashboard.start()
    done = admin(dashboard, "migration", "wait", timeout=45)
    assert done.returncode == 0, done.stdout + done.stderr + log_of(dashboard)[-3000:]
    assert migration(dashboard)["state"] == "finished"
    assert servers[1].client().mget(moving) == [b"v" + key for key in moving]
    assert not servers[0].client().exists(*moving)
    assert client.mget(moving) == [b"v" + key for key in moving]


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_a_sentinel_the_dashboard_adds_can_watch_a_password_protected_master(tmp_path: Path, redis_servers,
                                                                            processes) -> None:  # noqa: F811
    """The replica is pointed at its master by an authenticated REPLICAOF; the sentinel, told ``auth-pass``,
    reads the master's INFO (it finds the replica there), and the dashboard polls it without the password."""
    master, replica = redis_servers(2, password=PASSWORD)
    replica.client().config_set("masterauth", PASSWORD)
    sentinel = SentinelServer(tmp_path / "sentinel", masters=[]).start()
    processes.append(sentinel)
    url = f"file://{tmp_path / 'coordinator'}"
    dashboard = Dashboard(tmp_path / "dashboard", url, "shop", redis_auth=PASSWORD).start()
    processes.append(dashboard)
    for command in (("group", "add", "1"), ("server", "add", "1", master.address),
                    ("server", "add", "1", replica.address), ("slots", "assign", "0-1023", "1"),
                    ("sentinel", "add", sentinel.address)):
        admin_ok(dashboard, *command)
    wait_until(lambda: replica.client().info("replication")["master_link_status"] == "up", timeout=20,
               what="the replica to replicate its master")
    assert sentinel.master_address("shop-1") == master.address
    wait_until(lambda: sentinel.master_info("shop-1").get("num-slaves") == "1", timeout=20,
               what="the sentinel to read the master's INFO and find its replica")
    assert "s_down" not in sentinel.master_info("shop-1")["flags"]
    status = wait_for_status(dashboard, lambda s: all_up(s) and all(e["up"] for e in s["sentinel_status"]),
                             timeout=10, what="the servers and the sentinel up")
    assert [server["actual_role"] for server in status["groups"][0]["servers"]] == ["master", "replica"]
