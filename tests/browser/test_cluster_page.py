"""The dashboard page of a real cluster: ``twinproxy-dashboard`` on a file coordinator, real redis-servers.

Each test starts its own dashboard (with a token file, so the page offers
actions, except the read-only one) with groups 1 and 2 and drives the page
in the module's headless Chromium (tests/browser/conftest.py).  What the
page sent is checked on the dashboard (its /api/migrations, its audit
events) and what it did on the redis-servers themselves.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, List

import pytest

from tests.cluster_harness import TOKEN, Dashboard, admin_ok, independent_slot
from tests.integration.dashboard_harness import fast_sync, replication, wait_replicating
from tests.servers import wait_until

REPO = Path(__file__).resolve().parents[2]


class ReadOnlyDashboard(Dashboard):
    """A dashboard started without ``--token-file``: no action is allowed."""

    def argv(self) -> List[str]:
        argv = super().argv()
        at = argv.index("--token-file")
        return argv[:at] + argv[at + 2:]


@pytest.fixture
def processes():
    started: List[Any] = []
    yield started
    for process in started:
        process.stop()


def start_cluster(tmp_path: Path, servers: List[Any], processes: List[Any], assign: tuple = ((0, 1023, 1),),
                  cls: type = Dashboard) -> Dashboard:
    """Groups 1..n, one server each (``servers``), the slots assigned as ``assign`` says."""
    dashboard = Dashboard(tmp_path / "dashboard", f"file://{tmp_path / 'coordinator'}", "shop").start()
    processes.append(dashboard)
    for gid, server in enumerate(servers, start=1):
        admin_ok(dashboard, "group", "add", str(gid))
        admin_ok(dashboard, "server", "add", str(gid), server.address)
    for first, last, gid in assign:
        admin_ok(dashboard, "slots", "assign", f"{first}-{last}", str(gid))
    if cls is not Dashboard:
        dashboard.stop()
        readonly = cls(tmp_path / "dashboard", dashboard.coordinator, "shop")
        readonly.port = dashboard.port
        processes.append(readonly.start())
        return readonly
    return dashboard


def url(dashboard: Dashboard) -> str:
    return f"http://{dashboard.address}/"


def open_page(page: Any, dashboard: Dashboard, token: str = TOKEN) -> None:
    page.open(url(dashboard))
    page.wait_for(lambda d: page.body("data-loaded") == "true", 15, "the first state document")
    if token is not None and page.body("data-admin") == "true":
        page.type_into("token-input", token)
        page.testid("token-save").click()
        page.wait_for(lambda d: page.testid("token-form").get_attribute("data-token") == "set", what="the token")


def post(dashboard: Dashboard, path: str, body: Dict[str, Any], token: str = TOKEN) -> tuple:
    request = urllib.request.Request(f"http://{dashboard.address}{path}", data=json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json",
                                                             "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def audits(dashboard: Dashboard) -> List[Dict[str, Any]]:
    return [e for e in dashboard.get("/api/events?since=0&format=json")["events"] if e["kind"] == "audit"]


def fill(server: Any, count: int = 3000) -> List[bytes]:
    keys = [f"w{i}".encode() for i in range(count)]
    with server.client().pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.set(key, b"v" + key)
        pipe.execute()
    return keys


def rect_widths(page: Any) -> Dict[str, int]:
    widths: Dict[str, int] = {}
    for rect in page.find_all('[data-testid="slot-runs"] rect[data-range]'):
        group = rect.get_attribute("data-group")
        widths[group] = widths.get(group, 0) + int(float(rect.get_attribute("width")))
    return widths


def migration_row(page: Any, mid: int) -> Any:
    return page.find(f'tr[data-migration="{mid}"]')


def confirm(page: Any, ok: bool) -> None:
    page.wait_for(lambda d: page.testid("confirm-dialog").is_displayed(), what="the confirmation dialog")
    page.testid("confirm-ok" if ok else "confirm-cancel").click()
    page.wait_for(lambda d: not page.testid("confirm-dialog").is_displayed(), what="the dialog to close")


@pytest.mark.timeout(120)
def test_slot_bar_and_panels_match_the_state_document(page, tmp_path, redis_servers, processes) -> None:
    dashboard = start_cluster(tmp_path, redis_servers(2), processes,
                              assign=((0, 499, 1), (500, 1000, 2)))      # 1001-1023 left offline
    open_page(page, dashboard)
    page.wait_for(lambda d: sum(rect_widths(page).values()) == 1024, what="the slot bar")
    state = dashboard.get("/api/state")
    widths = rect_widths(page)
    assert widths == {"1": 500, "2": 501, "none": 23}
    assert {str(g["id"]): g["slots"] for g in state["slots"]["groups"]} == {"1": 500, "2": 501}
    ranges = [r.get_attribute("data-range") for r in page.find_all('[data-testid="slot-runs"] rect')]
    assert ranges == [f"{r['from']}-{r['to']}" for r in state["slots"]["runs"]]
    offline = page.find('rect[data-range="1001-1023"]')
    assert offline.get_attribute("data-state") == "offline"
    # Every cluster panel is there; the balance table and the group cards are keyed by group.
    for section in ("overview", "servers", "proxies", "slots", "migrations", "groups", "events"):
        assert page.testid(section).is_displayed(), section
    assert page.find('[data-testid="balance-rows"] tr[data-group="2"]').get_attribute("data-slots") == "501"
    assert page.find('.card[data-group="1"]').is_displayed()
    assert page.text("generation") == str(state["overview"]["generation"])
    # The admin commands given before the page opened are in its event log (the audit trail).
    page.wait_for(lambda d: page.find_all('[data-testid="events-rows"] tr[data-kind="audit"]'), what="audit events")


@pytest.mark.timeout(150)
def test_a_migration_started_from_the_form_moves_the_keys(page, tmp_path, redis_servers, processes) -> None:
    one, two = redis_servers(2)
    dashboard = start_cluster(tmp_path, [one, two], processes)
    keys = fill(one)
    open_page(page, dashboard)
    page.type_into("migrate-first", "0")
    page.type_into("migrate-last", "99")
    page.type_into("migrate-group", "2")
    page.testid("migrate-submit").click()
    page.wait_for(lambda d: page.find_all('tr[data-migration="1"]'), 15, "the migration's row")
    moved: List[int] = []

    def finished(driver: Any) -> bool:
        row = migration_row(page, 1)
        moved.append(int(row.get_attribute("data-keys-moved") or 0))
        return row.get_attribute("data-state") == "finished"

    page.wait_for(finished, 60, "the migration to finish")
    assert moved == sorted(moved), f"progress went backwards: {moved}"
    assert page.posts() == 1
    entry = dashboard.get("/api/migrations")["migrations"]
    assert [(m["first"], m["last"], m["from_group"], m["to_group"], m["state"]) for m in entry] == \
        [(0, 99, 1, 2, "finished")]
    # Exactly the request the form means, as the dashboard's audit trail recorded it.
    sent = [(e["path"], e["body"], e["status"]) for e in audits(dashboard) if e["path"] == "/api/slots/migrate"]
    assert sent == [("/api/slots/migrate", {"first": 0, "last": 99, "group": 2}, 200)]
    inside = [k for k in keys if independent_slot(k) <= 99]
    outside = [k for k in keys if independent_slot(k) > 99]
    assert two.client().get(inside[0]) == b"v" + inside[0] and one.client().get(inside[0]) is None
    assert one.client().get(outside[0]) == b"v" + outside[0]
    page.wait_for(lambda d: page.find('rect[data-range="0-99"]').get_attribute("data-group") == "2",
                  what="the slot bar to show 0-99 on group 2")


@pytest.mark.timeout(120)
def test_a_wrong_form_sends_nothing_and_a_refusal_shows_the_servers_message(page, tmp_path, redis_servers,
                                                                             processes) -> None:
    dashboard = start_cluster(tmp_path, redis_servers(2), processes)
    open_page(page, dashboard)
    before = len(audits(dashboard))
    for first, last, group, message in (("1000", "1024", "2", "0 to 1023"), ("", "10", "2", "0 to 1023"),
                                        ("20", "10", "2", "after the last"), ("0", "10", "9", "no group 9")):
        page.type_into("migrate-first", first)
        page.type_into("migrate-last", last)
        page.type_into("migrate-group", group)
        page.testid("migrate-submit").click()
        page.wait_for(lambda d, wanted=message: wanted in page.text("migrate-error"),
                      what=f"the inline error {message!r}")
    assert page.posts() == 0
    assert dashboard.get("/api/migrations")["migrations"] == []
    assert len(audits(dashboard)) == before
    # The form kept what was typed through the polls since.
    page.wait_polls(2)
    assert [page.testid(f"migrate-{name}").get_attribute("value") for name in ("first", "last", "group")] == \
        ["0", "10", "9"]
    # A refusal by the dashboard: its own message in the page.
    page.allow_console(r"status of 403")
    page.testid("token-forget").click()
    page.type_into("token-input", "not-the-token")
    page.testid("token-save").click()
    page.type_into("migrate-first", "0")
    page.type_into("migrate-last", "10")
    page.type_into("migrate-group", "2")
    page.testid("migrate-submit").click()
    page.wait_for(lambda d: page.testid("action-result").get_attribute("data-outcome") == "error", what="the refusal")
    assert "wrong token" in page.text("action-result")
    assert page.posts() == 1 and dashboard.get("/api/migrations")["migrations"] == []


@pytest.mark.timeout(150)
def test_cancel_from_the_page_after_confirming(page, tmp_path, redis_servers, processes) -> None:
    one, two = redis_servers(2)
    dashboard = start_cluster(tmp_path, [one, two], processes)
    fill(one, 5000)
    admin_ok(dashboard, "slots", "migrate", "0-511", "2", "--keys-per-second", "200")
    open_page(page, dashboard)
    page.wait_for(lambda d: migration_row(page, 1).get_attribute("data-state") == "migrating"
                  and int(migration_row(page, 1).get_attribute("data-keys-moved")) > 0, 30, "the migration to move")
    page.wait_for(lambda d: page.find_all('[data-testid="slot-hatches"] rect'), what="the hatched range")
    # The README's picture: TWINPROXY_DOCS_SCREENSHOT=1 writes it to docs/, a plain run into the tmp dir.
    docs = os.environ.get("TWINPROXY_DOCS_SCREENSHOT") == "1"
    page.screenshot((REPO / "docs" if docs else tmp_path) / "dashboard.png")
    # The throttle, typed into the row: the row (and what is typed) survives the polls.
    throttle = migration_row(page, 1).find_element("css selector", '[data-testid="migration-throttle"]')
    throttle.send_keys("150")
    page.wait_polls(2)
    assert throttle.get_attribute("value") == "150"
    migration_row(page, 1).find_element("css selector", '[data-testid="migration-throttle-set"]').click()
    wait_until(lambda: dashboard.get("/api/migrations")["migrations"][0]["keys_per_second"] == 150,
               what="the throttle to reach the dashboard")
    assert page.posts() == 1
    migration_row(page, 1).find_element("css selector", '[data-testid="migration-cancel"]').click()
    confirm(page, ok=False)
    assert page.posts() == 1 and migration_row(page, 1).get_attribute("data-state") == "migrating"
    migration_row(page, 1).find_element("css selector", '[data-testid="migration-cancel"]').click()
    confirm(page, ok=True)
    page.wait_for(lambda d: migration_row(page, 1).get_attribute("data-state") == "cancelled", 60,
                  "the migration to be cancelled")
    assert page.posts() == 2
    page.wait_for(lambda d: page.find('rect[data-range="0-1023"]').get_attribute("data-group") == "1",
                  what="the slots back on group 1")
    assert [e["path"] for e in audits(dashboard) if e["path"].endswith("/cancel")] == ["/api/migrations/1/cancel"]


@pytest.mark.timeout(120)
def test_rebalance_preview_then_force_assign_behind_the_typed_name(page, tmp_path, redis_servers, processes) -> None:
    dashboard = start_cluster(tmp_path, redis_servers(2), processes)
    open_page(page, dashboard)
    generation = dashboard.get("/api/state")["overview"]["generation"]
    page.testid("rebalance-preview").click()
    page.wait_for(lambda d: page.testid("rebalance-plan-box").is_displayed(), what="the rebalance plan")
    plan = [li.get_attribute("data-range") for li in page.find_all('[data-testid="rebalance-plan"] li')]
    assert plan == ["512-1023"] and page.posts() == 1
    assert dashboard.get("/api/state")["overview"]["generation"] == generation     # a dry run changes nothing
    page.testid("rebalance-discard").click()
    # Force-assign: disabled until the cluster's name is typed; Cancel sends nothing, OK one request.
    page.type_into("force-first", "0")
    page.type_into("force-last", "9")
    page.type_into("force-group", "2")
    submit = page.testid("force-submit")
    page.type_into("force-name", "sho")
    assert not submit.is_enabled()
    page.testid("force-name").send_keys("p")
    page.wait_for(lambda d: submit.is_enabled(), what="force-assign enabled by the name")
    submit.click()
    confirm(page, ok=False)
    assert page.posts() == 1
    submit.click()
    confirm(page, ok=True)
    page.wait_for(lambda d: page.find('rect[data-range="0-9"]').get_attribute("data-group") == "2",
                  what="slots 0-9 on group 2")
    assert page.posts() == 2
    sent = [(e["path"], e["body"]) for e in audits(dashboard) if e["path"] == "/api/slots/assign"]
    assert sent[-1] == ("/api/slots/assign", {"first": 0, "last": 9, "group": 2, "force": True})
    assert not submit.is_enabled()      # the name is asked again for the next one


@pytest.mark.timeout(120)
def test_promote_from_the_ha_panel_after_confirming(page, tmp_path, redis_servers, processes) -> None:
    master, replica = fast_sync(redis_servers(2))
    dashboard = start_cluster(tmp_path, [master], processes)
    admin_ok(dashboard, "server", "add", "1", replica.address)
    wait_replicating(replica, master)
    open_page(page, dashboard)
    row_css = f'.card[data-group="1"] tr[data-server="{replica.address}"]'
    page.wait_for(lambda d: page.find(row_css).get_attribute("data-actual-role") == "replica", 15, "the replica")
    page.find(row_css + ' [data-testid="promote"]').click()
    confirm(page, ok=False)
    assert page.posts() == 0 and replication(replica)["role"] == "slave"
    page.find(row_css + ' [data-testid="promote"]').click()
    confirm(page, ok=True)
    page.wait_for(lambda d: page.find(row_css).get_attribute("data-expected-role") == "master", 30,
                  "the replica shown as the master")
    assert page.posts() == 1
    assert replication(replica)["role"] == "master"
    promotes = [(e["path"], e["body"]) for e in audits(dashboard) if e["path"].endswith("/promote")]
    assert promotes == [("/api/groups/1/promote", {"addr": replica.address})]
    page.wait_for(lambda d: page.testid("action-result").get_attribute("data-outcome") == "ok", what="the answer")


@pytest.mark.timeout(120)
def test_read_only_dashboard_shows_no_buttons_and_refuses_posts(page, tmp_path, redis_servers, processes) -> None:
    dashboard = start_cluster(tmp_path, redis_servers(2), processes, cls=ReadOnlyDashboard)
    open_page(page, dashboard, token=None)
    page.wait_for(lambda d: page.find_all('[data-testid="slot-runs"] rect'), what="the slot bar")
    page.wait_polls(1)
    assert page.body("data-admin") == "false" and page.text("mode") == "read-only"
    assert page.find_all("button") == [] and page.find_all("input") == [] and page.find_all("form") == []
    status, answer = post(dashboard, "/api/slots/migrate", {"first": 0, "last": 1, "group": 2})
    assert status == 403 and "token" in answer["error"]


@pytest.mark.timeout(120)
def test_a_stopped_dashboard_shows_the_banner_until_it_is_back(page, tmp_path, redis_servers, processes) -> None:
    dashboard = start_cluster(tmp_path, redis_servers(1), processes)
    open_page(page, dashboard)
    banner = page.testid("disconnected")
    assert not banner.is_displayed()
    page.allow_console(r"ERR_CONNECTION_REFUSED|ERR_EMPTY_RESPONSE|api/(state|series|events)")
    dashboard.stop()
    page.wait_for(lambda d: banner.is_displayed(), 10, "the disconnected banner")
    dashboard.start()
    page.wait_for(lambda d: not banner.is_displayed(), 30, "the banner to clear")
    generation = dashboard.get("/api/state")["overview"]["generation"]
    page.wait_for(lambda d: page.text("generation") == str(generation), what="the values to resume")
    wait_until(lambda: dashboard.get("/api/state"), what="the dashboard answering")
