"""The cluster dashboard's web documents through a real ``twinproxy-dashboard``, redis-servers and a proxy.

``GET /api/state`` (its shape; ops/s under redis-py traffic, then 0 again;
the servers' backend INFO; slot runs covering 1024 slots), ``/api/series``
growing, ``/api/events`` as Server-Sent Events and as JSON (a generation
event after a change, an audit event for an accepted and a refused POST),
the POST form of a removal, 405 for a GET on an action, 403 without a
token, and ``POST /api/migrations/{id}/throttle`` changing a running
migration's rate (kept in its topology entry).
"""

from __future__ import annotations

import http.client
import json
from typing import Any, Dict, List, Optional, Tuple

import pytest
import redis

from tests.cluster_harness import TOKEN, ClusterProxy, Dashboard, admin_ok
from tests.servers import LOOPBACK, wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def processes():
    started: List[Any] = []
    yield started
    for process in reversed(started):
        process.stop()


def call(dashboard: Dashboard, method: str, path: str, body: Any = None,
         token: Optional[str] = TOKEN) -> Tuple[int, Any, Dict[str, str]]:
    connection = http.client.HTTPConnection(LOOPBACK, dashboard.port, timeout=30)
    try:
        headers = {"content-type": "application/json"}
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        connection.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
        answer = connection.getresponse()
        data = answer.read()
        try:
            document = json.loads(data)
        except ValueError:
            document = data
        return answer.status, document, {k.lower(): v for k, v in answer.getheaders()}
    finally:
        connection.close()


def state(dashboard: Dashboard) -> Dict[str, Any]:
    status, document, _ = call(dashboard, "GET", "/api/state", token=None)
    assert status == 200, document
    return document


def events(dashboard: Dashboard, since: int = 0) -> List[Dict[str, Any]]:
    status, document, _ = call(dashboard, "GET", f"/api/events?since={since}&format=json", token=None)
    assert status == 200
    return document["events"]


def cluster(tmp_path, redis_servers, processes) -> Tuple[Dashboard, Any, Any, ClusterProxy]:
    one, two = redis_servers(2)
    url = f"file://{tmp_path / 'coordinator'}"
    dashboard = Dashboard(tmp_path / "dashboard", url, "shop").start()
    processes.append(dashboard)
    for command in (("group", "add", "1"), ("server", "add", "1", one.address), ("group", "add", "2"),
                    ("server", "add", "2", two.address), ("slots", "assign", "0-511", "1"),
                    ("slots", "assign", "512-1023", "2")):
        admin_ok(dashboard, *command)
    proxy = ClusterProxy(tmp_path / "proxy", url, "shop", processes=processes).start()
    wait_until(lambda: len(state(dashboard)["proxies"]) == 1, timeout=30, what="the proxy to register")
    return dashboard, one, two, proxy


def test_state_series_and_events(tmp_path, redis_servers, processes) -> None:
    dashboard, one, two, proxy = cluster(tmp_path, redis_servers, processes)
    first = state(dashboard)
    assert first["kind"] == "cluster" and first["name"] == "shop" and first["admin"] is True
    assert set(first["overview"]) == {"coordinator", "generation", "ops_per_second", "requests", "clients",
                                      "servers_up", "servers_total", "p99_ms"}
    assert first["overview"]["coordinator"]["kind"] == "file"
    runs = first["slots"]["runs"]
    assert sum(run["to"] - run["from"] + 1 for run in runs) == 1024 and {r["group"] for r in runs} == {1, 2}
    assert [g["id"] for g in first["groups"]] == [1, 2] and first["groups"][0]["sentinel"] is None

    def backend_known(document: Dict[str, Any]) -> bool:
        return all(row["backend"] is not None and row["backend"]["memory"] for row in document["servers"])

    wait_until(lambda: backend_known(state(dashboard)), timeout=20, what="the servers' INFO")

    client = redis.Redis(host=LOOPBACK, port=proxy.port, socket_timeout=10, protocol=2)
    seen: Dict[str, Any] = {}

    def busy() -> bool:
        for number in range(200):
            client.set(f"key{number}", "v")
        seen.update(state(dashboard))
        return seen["overview"]["ops_per_second"] > 0

    wait_until(busy, timeout=30, what="ops/s above 0 under traffic")
    assert seen["proxies"][0]["ops_per_second"] > 0 and seen["overview"]["requests"] > 0
    assert sum(row["requests_per_second"] for row in seen["servers"]) > 0
    assert seen["overview"]["servers_up"] == seen["overview"]["servers_total"] == 2
    wait_until(lambda: state(dashboard)["overview"]["ops_per_second"] == 0, timeout=30, what="ops/s back to 0")
    wait_until(lambda: sum(g["keys"] or 0 for g in state(dashboard)["slots"]["groups"]) >= 200, timeout=20,
               what="the groups' key counts")

    status, series, _ = call(dashboard, "GET", "/api/series?seconds=300", token=None)
    assert status == 200 and series["period"] == 1.0
    count = len(series["points"])
    wait_until(lambda: len(call(dashboard, "GET", "/api/series", token=None)[1]["points"]) > count, timeout=10,
               what="the series to grow")

    # The SSE stream, opened before a change: it sends the generation and the audit of the POST.
    stream = http.client.HTTPConnection(LOOPBACK, dashboard.port, timeout=20)
    stream.request("GET", "/api/events")
    answer = stream.getresponse()
    assert answer.status == 200 and answer.getheader("content-type") == "text/event-stream"
    last = events(dashboard)[-1]["id"] if events(dashboard) else 0
    status, done, _ = call(dashboard, "POST", "/api/groups", {"id": 3})
    assert status == 200, done
    streamed: List[Dict[str, Any]] = []
    while not any(e["kind"] == "audit" and e["body"] == {"id": 3} for e in streamed):
        line = answer.fp.readline()
        assert line, "the event stream ended"
        if line.startswith(b"data: "):
            streamed.append(json.loads(line[6:]))
    stream.close()
    assert any(e["kind"] == "generation" and e["generation"] == done["generation"] for e in streamed), streamed
    audit = [e for e in streamed if e["kind"] == "audit"][-1]
    assert audit["method"] == "POST" and audit["status"] == 200 and audit["body"] == {"id": 3}
    assert audit["client"].startswith("127.0.0.1:")

    # Refused: no token, a wrong one; each in the audit too.
    status, refused, headers = call(dashboard, "POST", "/api/groups", {"id": 4}, token=None)
    assert status == 403 and "Bearer" in refused["error"] and "www-authenticate" in headers
    assert call(dashboard, "POST", "/api/groups", {"id": 4}, token="guess")[0] == 403
    found = [e for e in events(dashboard, last) if e["kind"] == "audit"]
    assert [(e["status"], e["body"]) for e in found][-2:] == [(403, {"id": 4}), (403, {"id": 4})]
    assert "403" in found[-1]["text"] and found[-1]["error"].startswith("wrong token")

    # The POST form of a removal; a GET on an action is 405.
    assert call(dashboard, "GET", "/api/groups/3/remove")[0] == 405
    status, removed, _ = call(dashboard, "POST", "/api/groups/3/remove", {})
    assert status == 200 and removed["group"] == 3, removed
    assert [g["id"] for g in state(dashboard)["groups"]] == [1, 2]
    assert call(dashboard, "POST", "/api/proxies/nobody/remove", {"force": "yes"})[0] == 400
    assert call(dashboard, "GET", "/api/state", token=None)[0] == 200
    assert call(dashboard, "POST", "/api/state")[0] == 405
    status, page, headers = call(dashboard, "GET", "/", token=None)
    assert status == 200 and headers["content-type"].startswith("text/html")

    # The proxy stops: after 3 missed samples it is stale, with an event.
    proxy.stop()
    wait_until(lambda: state(dashboard)["proxies"] == [] or state(dashboard)["proxies"][0]["stale"], timeout=30,
               what="the proxy to go stale or away")


def test_throttle_changes_a_running_migrations_rate(tmp_path, redis_servers, processes) -> None:
    dashboard, one, two, proxy = cluster(tmp_path, redis_servers, processes)
    source = one.client()
    with source.pipeline(transaction=False) as pipe:
        for number in range(20000):
            pipe.set(f"k{number}", "v")
        pipe.execute()
    status, queued, _ = call(dashboard, "POST", "/api/slots/migrate",
                             {"first": 0, "last": 511, "group": 2, "keys_per_second": 200})
    assert status == 200, queued
    mid = queued["migration"]["id"]

    def migration() -> Dict[str, Any]:
        return [m for m in state(dashboard)["migrations"]["migrations"] if m["id"] == mid][0]

    wait_until(lambda: migration()["state"] == "migrating" and migration()["keys_moved"] > 200, timeout=30,
               what="the migration to move keys")
    assert migration()["rate"] <= 400
    assert call(dashboard, "GET", f"/api/migrations/{mid}/throttle")[0] == 405
    assert call(dashboard, "POST", f"/api/migrations/{mid}/throttle", {"keys_per_second": 0})[0] == 400
    status, answer, _ = call(dashboard, "POST", f"/api/migrations/{mid}/throttle", {"keys_per_second": 100000})
    assert status == 200 and answer["migration"]["keys_per_second"] == 100000, answer
    topology = call(dashboard, "GET", "/api/topology", token=None)[1]
    assert [m["keys_per_second"] for m in topology["migrations"] if m["id"] == mid] == [100000]
    # At 200 keys a second the rest would take over a minute.
    wait_until(lambda: migration()["state"] == "finished", timeout=30, what="the throttled-up migration to end")
    kinds = [(e["kind"], e["text"]) for e in events(dashboard) if e["kind"] == "migration"]
    assert any("running" in text for _, text in kinds) and any("finished" in text for _, text in kinds)
    assert any(e["kind"] == "audit" and e["path"].endswith("/throttle") and e["status"] == 200
               for e in events(dashboard))


def test_state_shows_what_sentinel_names_for_each_group(tmp_path, redis_servers, processes) -> None:
    from tests.sentinel_servers import SentinelServer

    one, two = redis_servers(2)
    url = f"file://{tmp_path / 'coordinator'}"
    dashboard = Dashboard(tmp_path / "dashboard", url, "shop").start()
    processes.append(dashboard)
    sentinel = SentinelServer(tmp_path / "sentinel", masters=[]).start()
    processes.append(sentinel)
    for command in (("group", "add", "1"), ("server", "add", "1", one.address), ("group", "add", "2"),
                    ("server", "add", "2", two.address), ("slots", "assign", "0-1023", "1"),
                    ("sentinel", "add", sentinel.address)):
        admin_ok(dashboard, *command)

    def group(document: Dict[str, Any], gid: int) -> Dict[str, Any]:
        return next(g for g in document["groups"] if g["id"] == gid)

    wait_until(lambda: group(state(dashboard), 1)["sentinel"] == {"master": one.address, "epoch": 0,
                                                                   "agrees": True}
               and group(state(dashboard), 2)["sentinel"] == {"master": two.address, "epoch": 0, "agrees": True},
               timeout=20, what="the sentinel's masters in the state document")
    assert not [a for a in state(dashboard)["alerts"] if a["kind"] == "sentinel"]

    # Sentinel is told another master for group 1 behind the dashboard's back: an alert and a switch-master event.
    sentinel.call("SENTINEL", "REMOVE", "shop-1")
    sentinel.call("SENTINEL", "MONITOR", "shop-1", LOOPBACK, two.port, 1)
    wait_until(lambda: group(state(dashboard), 1)["sentinel"]["master"] == two.address, timeout=20,
               what="the sentinel's new master for group 1")
    document = state(dashboard)
    assert group(document, 1)["sentinel"]["agrees"] is False
    assert any(a["kind"] == "sentinel" and a["subject"] == "group 1" for a in document["alerts"]), document["alerts"]
    switched = [e for e in events(dashboard) if e["kind"] == "switch-master" and e.get("source") == "sentinel"]
    assert switched and switched[-1]["old"] == one.address and switched[-1]["new"] == two.address, switched
