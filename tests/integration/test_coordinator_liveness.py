"""Coordinator liveness with real processes: frozen servers, frozen and killed session holders, deadlines.

etcd and ZooKeeper get a server of their own per test (it is frozen); a
holder of ephemerals runs as a child process when it must die or freeze
for real.  Sessions are 2 s, so "suspended" comes at about 1.3 s.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import urllib.request
import uuid
from pathlib import Path
from typing import List

import pytest

from tests.conftest import in_reactor
from tests.coordinator_servers import EphemeralHolder, EtcdServer, ZooKeeperServer
from tests.servers import free_port, wait_until
from twinproxy.coordinator import Conflict, Unavailable, connect
from twinproxy.coordinator.blocking import BlockingDirectory

pytestmark = pytest.mark.timeout(40)

SERVERS = {"etcd": EtcdServer, "zookeeper": ZooKeeperServer}


@pytest.fixture
def own_server(tmp_path: Path):
    """``own_server(kind)``: a server of ``kind`` for this test alone (frozen by it), stopped after."""
    started = []

    def start(kind: str):
        server = SERVERS[kind](tmp_path / kind)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def coordinators(reactor):
    """``coordinators(url)``: a started coordinator; all stopped after the test."""
    made = []

    def make(url: str, start: bool = True):
        coordinator = in_reactor(reactor, connect, url, reactor)
        made.append(coordinator)
        if start:
            in_reactor(reactor, coordinator.start)
        return coordinator

    yield make
    for coordinator in made:
        in_reactor(reactor, coordinator.stop)


@pytest.fixture
def holders(tmp_path: Path):
    """``holders(url, {path: value})``: a started EphemeralHolder process; all killed after the test."""
    started: List[EphemeralHolder] = []

    def start(url: str, entries):
        holder = EphemeralHolder(url, entries, tmp_path / f"holder{len(started)}.log")
        started.append(holder)
        return holder.start()

    yield start
    for holder in started:
        holder.kill()


def url_of(kind: str, server, session_timeout: float = 2, timeout: float = 1) -> str:
    return (f"{kind}://{server.address}/t-{uuid.uuid4().hex}"
            f"?session_timeout={session_timeout:g}&timeout={timeout:g}")


def after(seconds: float) -> None:
    """Let wall-clock time pass while a process is frozen (nothing to observe meanwhile)."""
    deadline = time.monotonic() + seconds
    wait_until(lambda: time.monotonic() >= deadline, timeout=seconds + 1, interval=0.05, what=f"{seconds} s")


@pytest.mark.parametrize("kind", ["etcd", "zookeeper"])
def test_frozen_server_suspends_then_session_is_lost_and_renewed(reactor, own_server, coordinators, kind):
    server = own_server(kind)
    url = url_of(kind, server)
    c = coordinators(url)
    states: List[str] = []
    c.on_state(states.append)
    held = in_reactor(reactor, c.ephemeral, "/shop/dashboard", b"me")
    leaving = coordinators(url)
    seen: List[object] = []
    in_reactor(reactor, c.watch, "/shop/topology", seen.append)
    wait_until(lambda: seen == [None], timeout=5, what="the watch's first delivery")

    frozen_at = time.monotonic()
    server.freeze()
    try:
        wait_until(lambda: "suspended" in states, timeout=6, what="suspended")
        suspended_after = time.monotonic() - frozen_at
        # 2/3 of the 2 s session: neither at once nor after the session is over.
        assert 0.6 < suspended_after < 3.0, suspended_after
        # A per-operation deadline answers, nothing hangs.
        started = time.monotonic()
        with pytest.raises(Unavailable) as caught:
            in_reactor(reactor, c.get, "/shop/dashboard")
        assert time.monotonic() - started < 2.5
        assert "get /shop/dashboard" in str(caught.value) and c.url in str(caught.value)
        started = time.monotonic()
        in_reactor(reactor, leaving.stop)  # stopping never hangs either, even with nobody answering
        assert time.monotonic() - started < 2.5 and leaving.state == "stopped"
        after(3.2 - (time.monotonic() - frozen_at))  # the session (2 s) is over by the server's clock
    finally:
        server.thaw()
    if kind == "etcd":
        wait_until(lambda: states[-1:] == ["connected"] and "lost" in states, timeout=10,
                   what=f"lost, then connected (states: {states})")
        assert states.index("suspended") < states.index("lost") < len(states) - 1
    else:
        # On waking, ZooKeeper expires the session and kazoo learns it on reconnecting (lost, then a new
        # session: connected) -- unless the reconnect is served before the expiry thread runs, which
        # revives the session (connected).  Either way the ephemeral is there, and was never lost twice.
        wait_until(lambda: states[-1:] == ["connected"], timeout=10, what=f"connected again (states: {states})")
        assert states[:2] == ["suspended", "lost" if "lost" in states else "connected"], states
    assert held.held
    assert in_reactor(reactor, c.get, "/shop/dashboard").value == b"me"  # made again under the new session
    # The watch is armed again: a write by another session after the recovery reaches it.
    node = in_reactor(reactor, coordinators(url).create, "/shop/topology", b"{}")
    wait_until(lambda: seen[-1] == node, timeout=5, what="the watch after the recovery")
    with BlockingDirectory(url) as directory:
        assert directory.children("/shop") == {"dashboard": b"me", "topology": b"{}"}


@pytest.mark.parametrize("kind", ["etcd", "zookeeper"])
def test_holder_frozen_past_its_session_loses_the_path_to_another(reactor, own_server, coordinators, holders,
                                                                 kind):
    server = own_server(kind)
    url = url_of(kind, server)
    holder = holders(url, {"/shop/dashboard": "old"})
    c = coordinators(url)
    seen: List[object] = []
    in_reactor(reactor, c.watch, "/shop/dashboard", seen.append)
    wait_until(lambda: seen and seen[-1] is not None, timeout=5, what="the holder's node")
    with pytest.raises(Conflict):
        in_reactor(reactor, c.ephemeral, "/shop/dashboard", b"new")

    holder.freeze()
    try:
        # The server ends the frozen holder's session after 2 s; others then see the node go.
        wait_until(lambda: seen[-1] is None, timeout=8, what="the frozen holder's node to go")
        mine = in_reactor(reactor, c.ephemeral, "/shop/dashboard", b"new")
    finally:
        holder.thaw()
    # The holder learns of the expiry on waking, makes a new session, finds the path taken: on_lost.
    wait_until(lambda: holder.said("on_lost"), timeout=10, what=f"on_lost in the holder:\n{holder.output()}")
    assert holder.said("state lost") and holder.said("state connected")
    assert in_reactor(reactor, c.get, "/shop/dashboard") == mine.node


def test_file_ephemeral_of_a_killed_process_disappears_for_everyone(reactor, coordinators, holders, tmp_path):
    url = f"file://{tmp_path}/coordinator?session_timeout=2&timeout=2"
    holder = holders(url, {"/shop/proxies/p1": "one", "/shop/dashboard": "lock"})
    c = coordinators(url)
    seen: List[dict] = []
    in_reactor(reactor, c.watch_children, "/shop/proxies", seen.append)
    wait_until(lambda: seen and set(seen[-1]) == {"p1"}, timeout=5, what="the holder's registration")
    with pytest.raises(Conflict):
        in_reactor(reactor, c.ephemeral, "/shop/dashboard", b"mine")
    with BlockingDirectory(url) as directory:
        assert directory.children("/shop/proxies") == {"p1": b"one"}

        killed_at = time.monotonic()
        holder.kill()  # SIGKILL: no goodbye, only the kernel dropping its flock
        wait_until(lambda: seen[-1] == {}, timeout=3, what="the killed holder's node to go")
        assert time.monotonic() - killed_at < 1.5
        assert directory.children("/shop/proxies") == {}
        assert directory.get("/shop/dashboard") is None
    assert in_reactor(reactor, c.get, "/shop/proxies/p1") is None
    in_reactor(reactor, c.ephemeral, "/shop/dashboard", b"mine")
    # The dead files are reaped by the next poll: only the live ephemeral is left on disk.
    nodes = tmp_path / "coordinator" / "nodes"
    wait_until(lambda: sorted(os.listdir(nodes)) == ["shop%2Fdashboard"], timeout=3, what="the reap")


def test_file_write_deadline_when_the_store_stays_locked(reactor, coordinators, tmp_path):
    url = f"file://{tmp_path}/coordinator?timeout=0.5"
    c = coordinators(url)
    in_reactor(reactor, c.create, "/a", b"1")
    with open(tmp_path / "coordinator" / "data.lck", "rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another writer that never lets go
        started = time.monotonic()
        with pytest.raises(Unavailable) as caught:
            in_reactor(reactor, c.set, "/a", b"2")
        assert time.monotonic() - started < 1.5
        assert "set /a" in str(caught.value)
        assert in_reactor(reactor, c.get, "/a").value == b"1"  # reads need no lock
    assert in_reactor(reactor, c.set, "/a", b"3").value == b"3"


@pytest.mark.parametrize("kind", ["etcd", "zookeeper"])
def test_start_without_a_server_fails_within_the_deadline(reactor, coordinators, kind):
    url = f"{kind}://127.0.0.1:{free_port()}/x?timeout=1"
    c = coordinators(url, start=False)
    started = time.monotonic()
    with pytest.raises(Unavailable) as caught:
        in_reactor(reactor, c.start)
    assert time.monotonic() - started < 2.5
    assert "start" in str(caught.value) and f"{kind}://127.0.0.1" in str(caught.value)
    assert c.state == "connecting"  # not stopped: it may be started again (and fails again, as quickly)
    started = time.monotonic()
    with pytest.raises(Unavailable) as caught:
        in_reactor(reactor, c.start)
    assert time.monotonic() - started < 2.5 and "already started" not in str(caught.value)


@pytest.mark.parametrize("kind", ["etcd", "zookeeper"])
def test_a_start_that_failed_is_retried_once_the_server_is_up(reactor, own_server, coordinators, kind):
    server = own_server(kind).down()  # its port is known, nobody listens on it
    url = url_of(kind, server)
    c = coordinators(url, start=False)
    states: List[str] = []
    c.on_state(states.append)
    seen: List[object] = []
    in_reactor(reactor, c.watch, "/k", seen.append)  # made before the start: kept through the failures
    for _ in range(2):
        started = time.monotonic()
        with pytest.raises(Unavailable):
            in_reactor(reactor, c.start)
        assert time.monotonic() - started < 2.5
        assert c.state == "connecting"
    server.up()
    in_reactor(reactor, c.start)
    assert c.state == "connected" and states == ["connected"]
    wait_until(lambda: seen == [None], timeout=5, what="the watch's first delivery")
    held = in_reactor(reactor, c.ephemeral, "/e", b"me")
    node = in_reactor(reactor, coordinators(url).create, "/k", b"v")
    wait_until(lambda: seen[-1] == node, timeout=5, what="the watch after the late start")
    with BlockingDirectory(url) as directory:
        assert directory.children("/") == {"e": b"me", "k": b"v"}
    assert held.held


def test_file_start_that_failed_is_retried(reactor, coordinators, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("")  # a file where the store's directory should go: the start cannot make it
    c = coordinators(f"file://{blocker}/coordinator?timeout=1", start=False)
    with pytest.raises(Unavailable) as caught:
        in_reactor(reactor, c.start)
    assert "start" in str(caught.value) and c.state == "connecting"
    blocker.unlink()
    in_reactor(reactor, c.start)
    assert c.state == "connected"
    assert in_reactor(reactor, c.ephemeral, "/e", b"me").node.value == b"me"


def test_etcd_fails_over_to_the_next_endpoint(reactor, coordinators, etcd):
    dead = f"127.0.0.1:{free_port()}"
    url = f"etcd://{dead},{etcd.address}/t-{uuid.uuid4().hex}?session_timeout=2&timeout=2"
    c = coordinators(url)
    seen: List[object] = []
    in_reactor(reactor, c.watch, "/k", seen.append)
    node = in_reactor(reactor, c.create, "/k", b"v")
    assert in_reactor(reactor, c.get, "/k") == node
    wait_until(lambda: seen and seen[-1] == node, timeout=5, what="the watch through the live endpoint")
    with BlockingDirectory(url) as directory:
        assert directory.get("/k") == b"v"


def test_etcd_user_auth(reactor, own_server, coordinators):
    server = own_server("etcd")

    def post(api: str, body: dict) -> None:
        request = urllib.request.Request(f"http://{server.address}/v3/{api}", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=5).read()

    for api, body in [("auth/user/add", {"name": "root", "password": "pw"}), ("auth/role/add", {"name": "root"}),
                      ("auth/user/grant", {"user": "root", "role": "root"}), ("auth/enable", {})]:
        post(api, body)
    url = f"etcd://root:pw@{server.address}/t?session_timeout=2&timeout=2"
    c = coordinators(url)
    seen: List[object] = []
    in_reactor(reactor, c.watch, "/a", seen.append)
    node = in_reactor(reactor, c.create, "/a", b"1")
    in_reactor(reactor, c.ephemeral, "/e", b"2")
    wait_until(lambda: seen and seen[-1] == node, timeout=5, what="the watch with a token")
    with BlockingDirectory(url) as directory:
        assert directory.children("/") == {"a": b"1", "e": b"2"}
    wrong = coordinators(f"etcd://root:nope@{server.address}/t?timeout=2", start=False)
    with pytest.raises(Unavailable) as caught:
        in_reactor(reactor, wrong.start)
    assert "authentication failed" in str(caught.value) and "nope" not in str(caught.value)


def test_etcd_restart_ends_the_watch_stream_which_comes_back(reactor, own_server, coordinators):
    server = own_server("etcd")
    url = url_of("etcd", server, timeout=2)
    watcher, writer = coordinators(url), coordinators(url)
    states: List[str] = []
    watcher.on_state(states.append)
    held = in_reactor(reactor, watcher.ephemeral, "/registration", b"me")
    seen: List[object] = []
    in_reactor(reactor, watcher.watch, "/k", seen.append)
    wait_until(lambda: seen == [None], timeout=5, what="the first delivery")

    server.restart()  # the stream ends with the server; the coordinator opens it again and reads again
    node = in_reactor(reactor, writer.create, "/k", b"after restart")
    wait_until(lambda: seen[-1] == node, timeout=8, what="the change after the restart")
    wait_until(lambda: watcher.state == "connected", timeout=8, what=f"connected (states: {states})")
    assert held.held
    wait_until(lambda: in_reactor(reactor, writer.get, "/registration") is not None, timeout=8,
               what="the ephemeral (its lease kept, or made again)")


def etcd_post(server, api: str, body: dict) -> dict:
    request = urllib.request.Request(f"http://{server.address}/v3/{api}", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def etcd_metric(server, name: str) -> float:
    with urllib.request.urlopen(f"http://{server.address}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def test_etcd_watch_stream_that_goes_silent_is_noticed(reactor, etcd, coordinators):
    url = url_of("etcd", etcd)  # a 2 s session: the watches read again every second
    watcher, writer = coordinators(url), coordinators(url)
    seen: List[object] = []
    in_reactor(reactor, watcher.watch, "/k", seen.append)
    wait_until(lambda: seen == [None], timeout=5, what="the first delivery")
    wait_until(lambda: watcher._stream is not None and watcher._stream.revision > 0, timeout=5,
               what="the stream's creation")
    silent = watcher._stream
    # Half-open, as after a lost connection nobody told us of: up, yet nothing comes through it.
    in_reactor(reactor, silent.transport.pauseProducing)

    node = in_reactor(reactor, writer.create, "/k", b"1")
    wait_until(lambda: seen[-1] == node, timeout=5, what="the change, read by the safety net")
    wait_until(lambda: watcher._stream is not None and watcher._stream is not silent, timeout=5,
               what="the silent stream to be replaced")
    assert silent._closed
    node = in_reactor(reactor, writer.set, "/k", b"2")
    wait_until(lambda: seen[-1] == node, timeout=5, what="the next change")


def test_etcd_stop_while_the_watch_stream_is_being_opened(reactor, own_server, coordinators):
    server = own_server("etcd")
    c = coordinators(url_of("etcd", server))

    def watch_then_stop():
        c.watch("/k", lambda node: None)  # starts opening the stream ...
        return c.stop()  # ... which the stop must not leave behind

    in_reactor(reactor, watch_then_stop)
    assert c._stream is None and c._stream_opening is None
    after(1.0)  # time for a stream that survived to reach the server
    assert etcd_metric(server, "etcd_debugging_mvcc_watcher_total") == 0
    assert c._stream is None


def test_etcd_watches_read_again_before_connected_after_a_lost_session(reactor, etcd, coordinators):
    url = url_of("etcd", etcd)
    c, writer = coordinators(url), coordinators(url)
    held = in_reactor(reactor, c.ephemeral, "/registration", b"me")
    seen: List[object] = []
    in_reactor(reactor, c.watch, "/k", seen.append)
    wait_until(lambda: seen == [None], timeout=5, what="the first delivery")
    wait_until(lambda: c._stream is not None, timeout=5, what="the watch stream")
    states: List[str] = []
    at_connected: List[object] = []

    def on_state(state: str) -> None:
        states.append(state)
        if state == "connected":
            at_connected.append(seen[-1])

    c.on_state(on_state)

    def blind() -> None:  # the watch learns nothing by itself now: a silent stream, no safety net
        c._stream.transport.pauseProducing()
        c._resync.stop()

    in_reactor(reactor, blind)
    node = in_reactor(reactor, writer.create, "/k", b"while blind")
    etcd_post(etcd, "lease/revoke", {"ID": c._lease})  # the session ends behind its back
    wait_until(lambda: at_connected, timeout=10, what=f"connected again (states: {states})")
    assert states == ["lost", "connected"]
    assert at_connected == [node]  # the re-read was delivered before "connected" was
    assert held.held
    assert in_reactor(reactor, writer.get, "/registration").value == b"me"
