"""The dashboard's slot migrations on real redis-servers and a file coordinator, with no proxy.

The keys are written straight into group 1's server; a Controller in the
test's reactor (tests/integration/dashboard_harness.py, one fake proxy that
acknowledges every generation) or a real ``twinproxy-dashboard`` process
(tests/cluster_harness.py) moves slots 0-511 to group 2 with its SCAN/MIGRATE
sweep.  Checked on the servers themselves: where every key is, its TTL, its
value for every data type; pause, resume, cancel mid-move, and a dashboard
killed mid-move and started again.  Last, ``slots rebalance`` queueing the
migrations of Codis's plan when a third group joins, and a rebalance stopped
midway by a coordinator write that fails.
"""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any, Dict, List

import pytest

from tests.cluster_harness import BIN, Dashboard, _env, admin, admin_ok, independent_slot
from tests.integration.dashboard_harness import Faults, Harness, coordinator_timeout, writing
from tests.servers import wait_until
from twinproxy.cluster.slots import slot_of

KEYS = 5000
LAST = 511


@pytest.fixture
def harness(reactor, tmp_path):
    made = Harness(reactor, tmp_path / "coordinator")
    yield made
    made.close()


@pytest.fixture
def processes():
    started: List[Any] = []
    yield started
    for process in started:
        process.stop()


def moving(key: bytes) -> bool:
    return slot_of(key) <= LAST


def named(prefix: str) -> bytes:
    """The first key ``prefix<n>`` whose slot is in the moving range."""
    number = 0
    while not moving(f"{prefix}{number}".encode()):
        number += 1
    return f"{prefix}{number}".encode()


def fill(server: Any) -> Dict[str, Any]:
    """5,000 keys on ``server``: strings (every 10th with a TTL) and one of each other type in the range."""
    client = server.client()
    strings = [f"k{i}".encode() for i in range(KEYS - 6)]
    with client.pipeline(transaction=False) as pipe:
        for index, key in enumerate(strings):
            pipe.set(key, b"v" + key)
            if index % 10 == 0:
                pipe.expire(key, 1000 + index)
        kinds = {name: named(name) for name in ("hash", "list", "set", "zset", "stream", "ttlhash")}
        pipe.hset(kinds["hash"], mapping={"f": "1", "g": "2"})
        pipe.rpush(kinds["list"], "x", "y", "z")
        pipe.sadd(kinds["set"], "m", "n")
        pipe.zadd(kinds["zset"], {"m": 1.5, "n": 2})
        pipe.xadd(kinds["stream"], {"f": "v"}, id="1-1")
        pipe.xadd(kinds["stream"], {"f": "w"}, id="2-1")
        pipe.xgroup_create(kinds["stream"], "readers", id="0")
        pipe.hset(kinds["ttlhash"], mapping={"a": "b"})
        pipe.expire(kinds["ttlhash"], 5000)
        pipe.execute()
    client.xreadgroup("readers", "alice", {kinds["stream"]: ">"}, count=1)
    every = strings + list(kinds.values())
    assert client.dbsize() == KEYS and sum(moving(key) for key in every) > 2000
    return {"keys": every, "kinds": kinds, "ttls": ttls(client, every)}


def ttls(client: Any, keys: List[bytes]) -> Dict[bytes, tuple]:
    """PTTL (ms) and when it was read, for the keys that have one."""
    found = {}
    for key in keys:
        pttl = client.pttl(key)
        if pttl > 0:
            found[key] = (pttl, time.monotonic())
    return found


def values(client: Any, kinds: Dict[str, bytes]) -> Dict[str, Any]:
    stream = kinds["stream"]
    groups = [(g["name"], g["pending"], g["last-delivered-id"]) for g in client.xinfo_groups(stream)]
    return {"hash": client.hgetall(kinds["hash"]), "list": client.lrange(kinds["list"], 0, -1),
            "set": client.smembers(kinds["set"]), "zset": client.zrange(kinds["zset"], 0, -1, withscores=True),
            "stream": client.xrange(stream), "groups": groups, "ttlhash": client.hgetall(kinds["ttlhash"])}


def keys_on(server: Any) -> set:
    return set(server.client().scan_iter(count=1000))


def check_moved(data: Dict[str, Any], source: Any, target: Any, before: Dict[str, Any]) -> None:
    """Every key of slots 0-511 on the target only, the others on the source only; TTLs and values kept."""
    expected_moved = {key for key in data["keys"] if moving(key)}
    assert keys_on(target) == expected_moved
    assert keys_on(source) == set(data["keys"]) - expected_moved
    client = target.client()
    for key, (pttl, when) in data["ttls"].items():
        if moving(key):
            now_pttl = client.pttl(key)
            expected = pttl - (time.monotonic() - when) * 1000
            assert abs(now_pttl - expected) < 1000, (key, now_pttl, expected)
    assert values(client, data["kinds"]) == before
    strings = [key for key in data["keys"] if key.startswith(b"k")]
    assert all(client.get(key) == b"v" + key for key in strings if moving(key))


def build(harness: Harness, redis_servers) -> tuple:
    one, two = redis_servers(2)
    controller = harness.controller()
    harness.proxy("p1", auto=True)
    wait_until(lambda: len(controller.acks.proxies) == 1, what="the proxy to be seen")
    for operation, args in ((controller.add_group, (1,)), (controller.add_server, (1, one.address)),
                            (controller.add_group, (2,)), (controller.add_server, (2, two.address)),
                            (controller.assign_slots, (0, 1023, 1))):
        harness.launch(operation, *args).wait()
    return controller, one, two


def listing(harness: Harness, controller: Any) -> Dict[int, Dict[str, Any]]:
    return {m["id"]: m for m in harness.call(controller.migrations)["migrations"]}


def wait_state(harness: Harness, controller: Any, mid: int, state: str, timeout: float = 60.0) -> Dict[str, Any]:
    seen: Dict[str, Any] = {}

    def reached() -> bool:
        seen.update(listing(harness, controller)[mid])
        return seen["state"] == state

    try:
        wait_until(reached, timeout=timeout, what=f"migration {mid} to be {state}")
    except AssertionError as err:
        raise AssertionError(f"{err}; last seen: {seen}") from None
    return dict(seen)


def stays(predicate: Any, seconds: float, what: str) -> None:
    """``predicate()`` holds every time it is asked for ``seconds``."""
    end = time.monotonic() + seconds

    def held() -> bool:
        assert predicate(), what
        return time.monotonic() >= end

    wait_until(held, timeout=seconds + 5, what=what)


@pytest.mark.timeout(120)
def test_slots_0_511_move_with_every_key_ttl_and_type(harness, redis_servers) -> None:
    controller, one, two = build(harness, redis_servers)
    data = fill(one)
    before = values(one.client(), data["kinds"])
    answer = harness.launch(controller.migrate, 0, LAST, 2).wait()
    m = answer["migration"]
    assert (m["id"], m["first"], m["last"], m["from_group"], m["to_group"]) == (1, 0, LAST, 1, 2)
    assert m["state"] == "pending" and m["keys_moved"] == 0 and isinstance(answer["generation"], int)
    done = wait_state(harness, controller, 1, "finished")
    assert done["keys_left"] == 0 and done["owner"] == 2 and done["error"] is None
    assert done["keys_moved"] == sum(moving(key) for key in data["keys"])
    check_moved(data, one, two, before)
    stored = harness.stored()
    assert stored.runs() == [{"first": 0, "last": LAST, "group": 2, "state": "stable"},
                             {"first": LAST + 1, "last": 1023, "group": 1, "state": "stable"}]
    # Every step waited for the proxy, which saw the slots held, then migrating, then stable.
    seen = [(t.slots[0], t.migration(1).state if t.migration(1) else None) for t in harness.proxies[0].seen]
    assert [step for step in seen if step[1] is not None][-4:] == [
        ((1, "stable"), "pending"), ((1, "held"), "prepared"), ((2, "migrating"), "migrating"),
        ((2, "stable"), "finished")]
    def progress() -> Dict[str, Any]:
        node = harness.call(harness.coordinators[0].get, "/clusters/shop/migration-progress")
        return json.loads(node.value)["1"]

    wait_until(lambda: progress()["keys_left"] == 0, timeout=5, what="the progress to be written")
    assert progress()["keys_moved"] == done["keys_moved"] and progress()["paused"] is False


@pytest.mark.timeout(120)
def test_refusals_and_the_queue(harness, redis_servers) -> None:
    controller, one, two = build(harness, redis_servers)
    assert harness.fail(controller.migrate, 0, LAST, 9).status == 404
    assert harness.fail(controller.migrate, 0, LAST, 1).status == 400
    assert harness.fail(controller.migrate, 10, 5, 2).status == 400
    assert harness.launch(controller.pause, None).wait()["paused"] == []    # nothing to pause: fine
    # Two migrations of the same groups queue: the second starts when the first ends.
    harness.launch(controller.migrate, 0, 99, 2).wait()
    harness.launch(controller.migrate, 100, 199, 2).wait()
    assert harness.fail(controller.migrate, 50, 150, 2).status == 409
    wait_state(harness, controller, 2, "finished")
    assert listing(harness, controller)[1]["state"] == "finished"
    assert harness.stored().runs()[0] == {"first": 0, "last": 199, "group": 2, "state": "stable"}
    assert harness.fail(controller.cancel, 1).status == 409
    assert harness.fail(controller.cancel, 7).status == 404


@pytest.mark.timeout(120)
def test_pause_then_resume(harness, redis_servers) -> None:
    controller, one, two = build(harness, redis_servers)
    data = fill(one)
    before = values(one.client(), data["kinds"])
    harness.launch(controller.migrate, 0, LAST, 2, 400).wait()
    wait_until(lambda: listing(harness, controller)[1]["keys_moved"] >= 300, timeout=30, what="keys to move")
    answer = harness.launch(controller.pause, 1).wait()
    assert answer["paused"] == [1] and answer["migrations"][0]["paused"] is True
    # A batch in flight when it was paused answers; after that nothing moves.
    last = {"size": -1, "since": time.monotonic()}

    def settled() -> bool:
        size = one.client().dbsize()
        if size != last["size"]:
            last.update(size=size, since=time.monotonic())
        return time.monotonic() - last["since"] >= 0.3

    wait_until(settled, timeout=5, what="the batch in flight to answer")
    stays(lambda: one.client().dbsize() == last["size"], 1.5, "no key to move while paused")
    paused = listing(harness, controller)[1]
    assert paused["state"] == "migrating" and paused["paused"] is True and 0 < paused["keys_moved"] < 2500
    assert harness.stored().migrating_from(0) == 1
    assert harness.call(controller.status)["slots"][0] == {"first": 0, "last": LAST, "group": 2,
                                                           "state": "migrating"}
    # A dashboard started again keeps it paused (the progress in the coordinator says so) and counting on.
    harness.call(controller.stop)
    controller = harness.controller()
    again = listing(harness, controller)[1]
    assert again["paused"] is True and again["keys_moved"] == paused["keys_moved"]
    stays(lambda: one.client().dbsize() == last["size"], 1.0, "no key to move while paused, after a restart")
    assert harness.launch(controller.resume, None).wait()["resumed"] == [1]
    done = wait_state(harness, controller, 1, "finished")
    assert done["paused"] is False
    check_moved(data, one, two, before)


@pytest.mark.timeout(120)
def test_cancel_mid_migration_moves_the_keys_back(harness, redis_servers) -> None:
    controller, one, two = build(harness, redis_servers)
    data = fill(one)
    before = values(one.client(), data["kinds"])
    harness.launch(controller.migrate, 0, LAST, 2, 500).wait()
    wait_until(lambda: listing(harness, controller)[1]["keys_moved"] >= 500, timeout=30, what="keys to move")
    assert keys_on(two) and len(keys_on(one)) < KEYS      # some keys on each side
    answer = harness.launch(controller.cancel, 1).wait()
    assert answer["owner"] == 1 and answer["migration"]["cancelling"] is True
    assert answer["migration"]["state"] == "prepared" and "move back" in answer["note"]
    done = wait_state(harness, controller, 1, "cancelled")
    assert done["owner"] == 1 and done["cancelling"] is True
    assert keys_on(two) == set() and keys_on(one) == set(data["keys"])    # every key on exactly one server
    assert values(one.client(), data["kinds"]) == before
    assert harness.stored().runs() == [{"first": 0, "last": 1023, "group": 1, "state": "stable"}]
    # Cancelling a pending one changes no slot.
    harness.launch(controller.pause, None).wait()
    harness.launch(controller.migrate, 0, 9, 2).wait()
    harness.launch(controller.pause, 2).wait()
    cancelled = harness.launch(controller.cancel, None).wait()
    assert cancelled["owners"] == {"2": 1} and listing(harness, controller)[2]["state"] == "cancelled"


def test_cancel_of_a_paused_migration_moves_the_keys_back(harness, redis_servers) -> None:
    controller, one, two = build(harness, redis_servers)
    data = fill(one)
    harness.launch(controller.migrate, 0, LAST, 2, 500).wait()
    wait_until(lambda: listing(harness, controller)[1]["keys_moved"] >= 500, timeout=30, what="keys to move")
    harness.launch(controller.pause, 1).wait()
    harness.launch(controller.cancel, 1).wait()
    done = wait_state(harness, controller, 1, "cancelled")
    assert done["paused"] is False
    assert keys_on(two) == set() and keys_on(one) == set(data["keys"])


@pytest.mark.timeout(180)
def test_a_dashboard_killed_mid_migration_finishes_it_after_a_restart(tmp_path, redis_servers, processes) -> None:
    one, two = redis_servers(2)
    dashboard = Dashboard(tmp_path / "dashboard", f"file://{tmp_path / 'coordinator'}", "shop").start()
    processes.append(dashboard)
    for command in (("group", "add", "1"), ("server", "add", "1", one.address), ("group", "add", "2"),
                    ("server", "add", "2", two.address), ("slots", "assign", "0-1023", "1")):
        admin_ok(dashboard, *command)
    data = fill(one)
    before = values(one.client(), data["kinds"])
    refused = admin(dashboard, "slots", "migrate", "0-511", "9")
    assert refused.returncode == 1 and "no group 9" in refused.stderr
    assert "queued" in admin_ok(dashboard, "slots", "migrate", "0-511", "2", "--keys-per-second", "300")

    def status() -> List[Dict[str, Any]]:
        return json.loads(admin_ok(dashboard, "migration", "status", "--json"))

    wait_until(lambda: status()[0]["keys_moved"] >= 300, timeout=30, what="keys to move")
    # A wait started before the crash waits through it.
    waiting = subprocess.Popen([str(BIN / "twinproxy-admin"), "--dashboard", dashboard.address, "migration", "wait"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        wait_until(lambda: status()[0]["keys_moved"] >= 400, timeout=30, what="more keys to move")
        dashboard.kill()
        moved = len(keys_on(two))
        assert 0 < moved < 2500
        dashboard.start()
        wait_until(lambda: status()[0]["state"] == "finished", timeout=60, what="the migration to finish")
        out, err = waiting.communicate(timeout=30)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.communicate()
    assert waiting.returncode == 0 and out.splitlines()[-1].startswith("migration 1 (slots 0-511, group 1 -> 2): "
                                                                       "finished"), out + err
    entry = status()[0]
    assert entry["keys_moved"] >= moved and entry["keys_left"] == 0
    done = admin(dashboard, "migration", "wait", "1")
    assert done.returncode == 0 and "finished" in done.stdout, done.stdout + done.stderr
    assert "taking up migration 1" in (dashboard.workdir / "dashboard2.log").read_text()
    check_moved(data, one, two, before)
    text = admin_ok(dashboard, "migration", "status")
    assert "#1" in text and "finished" in text


@pytest.mark.timeout(120)
def test_a_hold_a_proxy_does_not_acknowledge_is_released_and_tried_again(harness, redis_servers) -> None:
    one, two = redis_servers(2)
    controller = harness.controller(ack_timeout=1.0)
    for operation, args in ((controller.add_group, (1,)), (controller.add_server, (1, one.address)),
                            (controller.add_group, (2,)), (controller.add_server, (2, two.address)),
                            (controller.assign_slots, (0, 1023, 1))):
        harness.launch(operation, *args).wait()
    proxy = harness.proxy("p1", generation=harness.stored().generation)      # acknowledges by hand
    wait_until(lambda: "p1" in controller.acks.proxies, what="the proxy to be seen")
    one.client().set(b"k1", b"v")
    queued = harness.launch(controller.migrate, 0, LAST, 2)
    wait_until(lambda: harness.stored().migrations, what="the migration to be written")
    proxy.ack(harness.stored().generation)
    queued.wait()
    seen: Dict[str, Any] = {}

    def back_to_pending() -> bool:
        seen.update(listing(harness, controller)[1])
        return seen["state"] == "pending" and "p1 did not acknowledge" in (seen["error"] or "")

    wait_until(back_to_pending, timeout=10, what="the unacknowledged hold to be released")
    stored = harness.stored()
    assert stored.slots[0] == (1, "stable") and stored.migration(1).error is not None
    assert proxy.generation < stored.generation       # it never saw the hold acknowledged

    def acknowledged() -> bool:
        proxy.ack(harness.stored().generation)
        return listing(harness, controller)[1]["state"] == "finished"

    wait_until(acknowledged, timeout=60, interval=0.05, what="the migration to go through once acknowledged")
    assert harness.stored().runs()[0] == {"first": 0, "last": LAST, "group": 2, "state": "stable"}
    assert (b"k1" in keys_on(two)) == moving(b"k1")


@pytest.mark.timeout(120)
def test_a_dashboard_that_loses_its_lock_stops_moving_keys(harness, redis_servers) -> None:
    first, one, two = build(harness, redis_servers)
    data = fill(one)
    harness.launch(first.migrate, 0, LAST, 2, 300).wait()
    wait_until(lambda: listing(harness, first)[1]["keys_moved"] >= 300, timeout=30, what="keys to move")
    second = harness.controller(start=False, addr="127.0.0.1:18082")
    waiting = harness.launch(second.start, wait=True)
    coordinator, lock = harness.coordinators[0], first._lock

    def lose() -> None:      # what the coordinator does when a lost session's lock was taken by another
        del coordinator._ephemerals[lock.path]
        lock._ephemeral.on_lost("taken by another session while this session was lost")

    harness.call(coordinator.delete, lock.path)
    waiting.wait(10)
    harness.call(lose)
    assert not first.writable
    # The new dashboard takes the migration up, then cancels it: every key goes back to group 1.
    wait_until(lambda: second.migrator.runners.get(1) is not None, what="the second dashboard to take it up")
    answer = harness.launch(second.cancel, 1).wait()
    assert answer["owner"] == 1
    wait_state(harness, second, 1, "cancelled")
    assert keys_on(two) == set() and keys_on(one) == set(data["keys"])
    # The first dashboard moved nothing meanwhile, and after taking its lock back it sees the end.
    harness.call(second.stop)
    wait_until(lambda: first.writable, timeout=10, what="the first dashboard to take its lock again")
    wait_state(harness, first, 1, "cancelled", timeout=10)
    stays(lambda: not keys_on(two), 1.0, "no key moved by the dashboard that lost its lock")
    assert first.migrator.runners == {}


# -- rebalance -----------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_rebalance_onto_a_new_group_moves_every_key_to_its_slots_new_owner(tmp_path, redis_servers,
                                                                            processes) -> None:
    servers = dict(zip((1, 2, 3), redis_servers(3)))
    dashboard = Dashboard(tmp_path / "dashboard", f"file://{tmp_path / 'coordinator'}", "shop").start()
    processes.append(dashboard)
    for command in (("group", "add", "1"), ("server", "add", "1", servers[1].address), ("group", "add", "2"),
                    ("server", "add", "2", servers[2].address), ("slots", "assign", "0-511", "1"),
                    ("slots", "assign", "512-1023", "2")):
        admin_ok(dashboard, *command)
    keys = [f"r{i}".encode() for i in range(600)]
    for gid, first, last in ((1, 0, 511), (2, 512, 1023)):
        with servers[gid].client().pipeline(transaction=False) as pipe:
            for key in keys:
                if first <= independent_slot(key) <= last:
                    pipe.set(key, b"v" + key)
            pipe.execute()
    admin_ok(dashboard, "group", "add", "3")
    admin_ok(dashboard, "server", "add", "3", servers[3].address)
    dry = json.loads(admin_ok(dashboard, "slots", "rebalance", "--dry-run", "--json"))
    runs = [{"first": 342, "last": 511, "from_group": 1, "group": 3},
            {"first": 853, "last": 1023, "from_group": 2, "group": 3}]
    assert (dry["applied"], dry["placements"], dry["moves"], dry["migrations"]) == (False, [], runs, [])
    # Throttled so that both are still queued or moving when the rebalance is asked again.
    text = admin_ok(dashboard, "slots", "rebalance", "--keys-per-second", "50", "--parallel", "2")
    assert "migrations queued (2):" in text and "follow them with: twinproxy-admin migration wait" in text
    assert "#1  slots 342-511   group 1 -> 3" in text and "#2  slots 853-1023  group 2 -> 3" in text
    again = json.loads(admin_ok(dashboard, "slots", "rebalance", "--json"))
    assert (again["applied"], again["plan"], again["migrations"]) == (False, [], [])
    assert again["notes"][0].startswith("migrations 1, 2 have not ended")
    waited = admin(dashboard, "migration", "wait", timeout=60)
    assert waited.returncode == 0, waited.stdout + waited.stderr
    status = json.loads(admin_ok(dashboard, "status", "--json"))
    assert status["slots_per_group"] == {"1": 342, "2": 341, "3": 341}
    owner = {}
    for run in status["slots"]:
        assert run["state"] == "stable"
        owner.update({slot: run["group"] for slot in range(run["first"], run["last"] + 1)})
    where = {gid: keys_on(server) for gid, server in servers.items()}
    for key in keys:
        assert [gid for gid in where if key in where[gid]] == [owner[independent_slot(key)]], key
    for gid, server in servers.items():
        mine = [key for key in keys if owner[independent_slot(key)] == gid]
        assert len(mine) > 50 and server.client().mget(mine) == [b"v" + key for key in mine]
    listed = json.loads(admin_ok(dashboard, "migration", "status", "--json"))
    assert [(m["id"], m["state"], m["keys_per_second"], m["parallel"]) for m in listed] == [
        (1, "finished", 50, 2), (2, "finished", 50, 2)]
    assert json.loads(admin_ok(dashboard, "slots", "rebalance", "--json"))["plan"] == []


@pytest.mark.timeout(60)
def test_a_rebalance_stopped_midway_keeps_what_it_queued_and_names_what_is_left(harness, redis_servers) -> None:
    servers = redis_servers(3)
    controller = harness.controller()
    for gid, server in zip((1, 2, 3), servers):
        harness.launch(controller.add_group, gid).wait()
        harness.launch(controller.add_server, gid, server.address).wait()
    harness.launch(controller.assign_slots, 0, 511, 1).wait()
    harness.launch(controller.assign_slots, 512, 1023, 2).wait()
    writes = Faults(controller.coordinator, "set")
    writes.fail(writing(lambda t: len(t.migrations) == 2), coordinator_timeout)
    error = harness.fail(controller.rebalance)
    assert error.status == 503
    assert error.message.startswith("rebalance stopped: migration 1 queued; queueing migration 2 of 2 (slots "
                                    "853-1023 from group 2 to group 3) failed: coordinator unavailable"), error.message
    assert "run the rebalance again" in error.message
    assert [m["id"] for m in error.extra["migrations"]] == [1] and error.extra["not_queued"] == []
    assert error.extra["failed"]["first"] == 853 and error.extra["applied"] is True
    assert [(m.id, m.first, m.last, m.to_group) for m in harness.stored().migrations] == [(1, 342, 511, 3)]
    # Asked again, it queues only the rest; this time the write lands but its answer is lost.
    writes.fail(writing(lambda t: any(m.first == 853 for m in t.migrations)), coordinator_timeout, landed=True)
    error = harness.fail(controller.rebalance)
    assert error.status == 503 and error.message.startswith(
        "rebalance stopped: migration 1 of 1 (slots 853-1023 from group 2 to group 3) was queued as migration 2, "
        "but: coordinator unavailable"), error.message
    assert [m["id"] for m in error.extra["migrations"]] == [2]
    for mid in (1, 2):
        wait_state(harness, controller, mid, "finished")
    assert harness.stored().slot_counts() == {1: 342, 2: 341, 3: 341}


def test_a_cancel_puts_back_the_big_keys_claimed_on_the_old_source(harness, redis_servers, monkeypatch) -> None:
    """A key a proxy claimed after the sweep stopped is served by nobody on the way back: the cancel renames
    its claim back to the key on the old source while the range is held (else it reads as missing there)."""
    from twisted.internet import defer

    from twinproxy.cluster.movescripts import CLAIMS, claim_of
    from twinproxy.dashboard.bigkeys import BigKeyMover

    monkeypatch.setattr(BigKeyMover, "serve", lambda self, extra=(): defer.succeed(0))   # nobody serves claims
    controller, one, two = build(harness, redis_servers)
    data = fill(one)
    harness.launch(controller.migrate, 0, LAST, 2, 500).wait()
    wait_until(lambda: listing(harness, controller)[1]["keys_moved"] >= 200, timeout=30, what="keys to move")
    harness.launch(controller.pause, 1).wait()
    source = one.client()
    key = next(k for k in data["keys"] if moving(k) and source.type(k) == b"string")
    value = source.get(key)
    source.rename(key, claim_of(key))          # what a proxy's ensure-moved does to a big key
    source.sadd(CLAIMS, key)
    harness.launch(controller.cancel, 1).wait()
    wait_state(harness, controller, 1, "cancelled")
    assert source.get(key) == value and not source.exists(claim_of(key)) and not source.sismember(CLAIMS, key)
    assert keys_on(two) == set() and keys_on(one) == set(data["keys"])
