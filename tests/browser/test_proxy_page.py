"""The dashboard page of a plain proxy: ``twinproxy -c pools.yml --http-port N`` over real redis-servers.

The page is read-only and has only the overview, servers, commands and
events panels.  Traffic comes from redis-py in a thread of the test; a
backend is killed and started again on its port; the proxy itself is
stopped and started again on the same HTTP port.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Iterator, List

import pytest
import redis

from tests.conftest import spawn_proxy, stop_proxy
from tests.servers import LOOPBACK, Process, free_port, port_of

BIN = Path(sys.executable).parent
RETRY_MS = 2000


class Proxy:
    """One ``twinproxy`` process with its HTTP endpoint on a fixed port (kept across a restart)."""

    def __init__(self, tmp_path: Path, backends: List[Any]) -> None:
        self.tmp_path = tmp_path
        self.config = tmp_path / "pools.yml"
        self.config.write_text(
            f"alpha:\n  listen: {LOOPBACK}:{free_port()}\n  redis: true\n  timeout: 500\n"
            f"  auto_eject_hosts: true\n  server_failure_limit: 1\n  server_retry_timeout: {RETRY_MS}\n"
            "  servers:\n" + "".join(f"   - {b.address}:1\n" for b in backends))
        self.http_port = free_port()
        self.processes: List[Process] = []
        self.runs = 0
        self.port = 0

    def start(self) -> "Proxy":
        self.runs += 1
        bound = self.tmp_path / f"bound{self.runs}.json"
        process = spawn_proxy([str(BIN / "twinproxy"), "-c", str(self.config), "--stats-port", "0", "--stats-addr",
                               LOOPBACK, "--http-port", str(self.http_port), "--bound-addresses", str(bound)],
                              self.tmp_path / f"proxy{self.runs}.log", self.processes, bound)
        self.port = port_of(process.bound()["pools"]["alpha"])
        return self

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}/"

    def stop(self) -> None:
        for process in self.processes:
            stop_proxy(process)


class Traffic:
    """redis-py SETs and GETs over ``keys`` through the proxy until ``stop``; errors counted, not raised."""

    def __init__(self, port: int, keys: List[str]) -> None:
        self.client = redis.Redis(host=LOOPBACK, port=port, socket_timeout=2, socket_connect_timeout=1)
        self.keys = keys
        self.done = threading.Event()
        self.errors = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            for key in self.keys:
                try:
                    self.client.set(key, "v")
                    self.client.get(key)
                except redis.RedisError:
                    self.errors += 1
            self.done.wait(0.005)       # a pace for the loop, not a timing assumption

    def stop(self) -> None:
        self.done.set()
        self.thread.join(10)


@pytest.fixture
def proxy_of(tmp_path: Path) -> Iterator[Any]:
    made: List[Proxy] = []

    def start(backends: List[Any]) -> Proxy:
        made.append(Proxy(tmp_path, backends).start())
        return made[-1]

    yield start
    for proxy in made:
        proxy.stop()


def open_page(page: Any, proxy: Proxy) -> None:
    page.open(proxy.url)
    page.wait_for(lambda d: page.body("data-loaded") == "true", 15, "the first state document")


def server_state(page: Any, address: str) -> str:
    return page.find(f'tr[data-server="{address}"]').get_attribute("data-state")


@pytest.mark.timeout(120)
def test_ops_per_second_follows_the_traffic(page, redis_servers, proxy_of) -> None:
    backends = redis_servers(2)
    proxy = proxy_of(backends)
    open_page(page, proxy)
    assert page.body("data-kind") == "proxy" and page.body("data-admin") == "false"
    for section in ("overview", "servers", "commands", "events"):
        assert page.testid(section).is_displayed(), section
    for section in ("proxies", "slots", "migrations", "groups"):
        assert not page.testid(section).is_displayed(), section
    assert page.find_all("button") == []
    traffic = Traffic(proxy.port, [f"key{i}" for i in range(10)])
    try:
        page.wait_for(lambda d: float(page.value("ops")) > 0, 10, "ops/s above 0")
        first = int(page.value("requests"))
        page.wait_for(lambda d: int(page.value("requests")) > first, 10, "the request total to grow")
        page.wait_for(lambda d: page.find_all('[data-testid="commands-rows"] tr[data-command="get"]'),
                      what="the get command's row")
        page.wait_for(lambda d: page.testid("spark-ops").get_attribute("d"), what="the ops/s sparkline")
    finally:
        traffic.stop()
    page.wait_for(lambda d: float(page.value("ops")) == 0, 15, "ops/s back to 0")
    for backend in backends:
        assert server_state(page, backend.address) == "up"


@pytest.mark.timeout(120)
def test_a_killed_backend_is_shown_ejected_then_up_again(page, redis_servers, proxy_of) -> None:
    backends = redis_servers(2)
    proxy = proxy_of(backends)
    client = redis.Redis(host=LOOPBACK, port=proxy.port, socket_timeout=2)
    keys = [f"e{i}" for i in range(40)]
    for key in keys:
        client.set(key, "v")
    victim = max(backends, key=lambda b: b.client().dbsize())
    on_victim = [k for k in keys if victim.client().exists(k)]
    open_page(page, proxy)
    page.wait_for(lambda d: server_state(page, victim.address) == "up", what="the backend up")
    traffic = Traffic(proxy.port, on_victim[:3])
    try:
        victim.kill()
        page.wait_for(lambda d: server_state(page, victim.address) in ("ejected", "down"),
                      RETRY_MS / 1000 + 2 + 5, "the killed backend shown ejected or down")
        row = page.find(f'tr[data-server="{victim.address}"]')
        assert row.find_element("css selector", '[data-col="state"]').text.split()[0] in ("ejected", "down")
        page.wait_for(lambda d: page.testid("servers-up").get_attribute("data-value") == "1", what="1 server up")
        victim.restart()
        page.wait_for(lambda d: server_state(page, victim.address) == "up", RETRY_MS / 1000 + 2 + 10,
                      "the restarted backend up again")
    finally:
        traffic.stop()


@pytest.mark.timeout(120)
def test_a_stopped_proxy_shows_the_banner_until_it_is_back(page, redis_servers, proxy_of) -> None:
    proxy = proxy_of(redis_servers(1))
    open_page(page, proxy)
    banner = page.testid("disconnected")
    assert not banner.is_displayed()
    # A reload is event 1 of this process; the restarted one numbers its own reload 1 again.
    os.kill(proxy.processes[-1].proc.pid, signal.SIGHUP)
    page.wait_for(lambda d: page.find_all('[data-testid="events-rows"] tr[data-event="1"][data-kind="reload"]'),
                  15, "the first process's reload event")
    page.driver.execute_script('document.querySelector(\'[data-testid="events-rows"] tr\').dataset.old = "yes"')
    page.allow_console(r"ERR_CONNECTION_REFUSED|ERR_EMPTY_RESPONSE|api/(state|series|events)")
    proxy.stop()
    page.wait_for(lambda d: banner.is_displayed(), 10, "the disconnected banner")
    assert page.text("disconnected-reason")
    proxy.start()
    page.wait_for(lambda d: not banner.is_displayed(), 20, "the banner to clear")
    polls = page.polls()
    page.wait_for(lambda d: page.polls() > polls + 1, 10, "polls to go on")
    assert not banner.is_displayed()
    os.kill(proxy.processes[-1].proc.pid, signal.SIGHUP)
    page.wait_for(lambda d: page.find_all('[data-testid="events-rows"] tr[data-event="1"]:not([data-old])'),
                  15, "the restarted process's event 1 shown (another stream: the old log is cleared)")
    assert page.find_all('[data-testid="events-rows"] tr[data-old]') == []


SYNC_DUPLICATES = """
const body = document.createElement("tbody");
const create = (item) => TP.row(["v"]);
const update = (row, item) => TP.setCells(row, { v: item.v });
const items = [{ k: "a", v: 1 }, { k: "a", v: 2 }, { k: "b", v: 3 }];
const counts = [];
for (let i = 0; i < 5; i += 1) {
  TP.syncRows(body, items, (x) => x.k, create, update);
  counts.push(body.children.length);
}
const kept = body.children[0];
TP.syncRows(body, [{ k: "a", v: 9 }], (x) => x.k, create, update);
return { counts: counts, after: body.children.length, reused: body.children[0] === kept,
         text: body.textContent };
"""


@pytest.mark.timeout(60)
def test_page_helpers_rows_with_shared_keys_plans_and_addresses(page, redis_servers, proxy_of) -> None:
    proxy = proxy_of(redis_servers(1))
    open_page(page, proxy)
    rows = page.driver.execute_script(SYNC_DUPLICATES)
    assert rows == {"counts": [3, 3, 3, 3, 3], "after": 1, "reused": True, "text": "9"}
    steps = page.driver.execute_script(
        "return TP.rebalanceSteps(arguments[0]).map((s) => s.step + ' ' + s.first + '-' + s.last);",
        {"plan": [{"first": 0, "last": 9, "group": 1}], "moves": [{"first": 5, "last": 9, "from_group": 2,
                                                                   "group": 1}],
         "placements": [{"first": 0, "last": 4, "group": 1}]})
    assert steps == ["place 0-4", "move 5-9"]
    only_placed = page.driver.execute_script("return TP.rebalanceSteps(arguments[0]).length;",
                                             {"plan": [], "moves": [], "placements": [{"first": 0, "last": 1023,
                                                                                      "group": 1}]})
    assert only_placed == 1
    checks = page.driver.execute_script("return arguments[0].map(TP.isServerAddress);",
                                        ["127.0.0.1:6379", "[::1]:6379", "[2001:db8::2]:7000", "redis-a:1",
                                         "::1:6379", "[::1]", "host:99999", "a b:1", "host"])
    assert checks == [True, True, True, True, False, False, False, False, False]
    # The proxy's command rows name their pool: the pool column is shown, one row per (pool, command).
    client = redis.Redis(host=LOOPBACK, port=proxy.port, socket_timeout=2)
    client.set("k", "v")
    page.wait_for(lambda d: page.find_all('[data-testid="commands-rows"] tr[data-command="set"][data-pool="alpha"]'),
                  10, "the set command's row in pool alpha")
    assert page.testid("commands-pool-head").is_displayed()
    cell = page.find('[data-testid="commands-rows"] tr[data-command="set"] [data-col="pool"]')
    assert cell.text == "alpha"
    page.wait_polls(2)
    assert len(page.find_all('[data-testid="commands-rows"] tr[data-command="set"]')) == 1
