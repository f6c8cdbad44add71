"""The coordinator contract (cluster contract §2), the same tests against file, ZooKeeper and etcd.

Each test gets a URL with a root of its own (``coordinator_url``) and runs its
coordinators in the session's reactor thread; watch callbacks append to
lists the test thread polls with a deadline.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import pytest
from twisted.internet import defer

from tests.conftest import in_reactor
from tests.servers import wait_until
from twinproxy.coordinator import Conflict, CoordinatorError, Node, NotFound, Unavailable, connect
from twinproxy.coordinator.blocking import BlockingDirectory

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def session(reactor, coordinator_url) -> Callable[..., object]:
    """``session(url=None)``: a started coordinator (on the test's URL); all stopped after the test."""
    made: List[object] = []

    def make(url: str = None):
        coordinator = in_reactor(reactor, connect, url or coordinator_url, reactor)
        made.append(coordinator)
        in_reactor(reactor, coordinator.start)
        return coordinator

    yield make
    for coordinator in made:
        in_reactor(reactor, coordinator.stop)


def call(reactor, function, *args):
    """``function(*args)`` in the reactor thread, its Deferred waited for."""
    return in_reactor(reactor, function, *args)


def raises(reactor, error: type, function, *args) -> CoordinatorError:
    with pytest.raises(error) as caught:
        call(reactor, function, *args)
    return caught.value


def test_create_get_set_delete(reactor, session, coordinator_url):
    c = session()
    assert call(reactor, c.get, "/a/b") is None
    created = call(reactor, c.create, "/a/b", b"one")
    assert created.value == b"one"
    assert call(reactor, c.get, "/a/b") == created
    raises(reactor, Conflict, c.create, "/a/b", b"again")

    second = call(reactor, c.set, "/a/b", b"two", created.version)
    assert second.value == b"two" and second.version != created.version
    assert call(reactor, c.get, "/a/b") == second
    stale = raises(reactor, Conflict, c.set, "/a/b", b"three", created.version)
    assert call(reactor, c.get, "/a/b") == second
    third = call(reactor, c.set, "/a/b", b"three")  # no version: unconditional
    assert third.version not in (created.version, second.version)
    raises(reactor, NotFound, c.set, "/a/missing", b"x")
    raises(reactor, NotFound, c.set, "/a/missing", b"x", 7)

    raises(reactor, Conflict, c.delete, "/a/b", second.version)
    assert call(reactor, c.delete, "/a/b", third.version) is None
    assert call(reactor, c.get, "/a/b") is None
    raises(reactor, NotFound, c.delete, "/a/b")
    remade = call(reactor, c.create, "/a/b", b"")
    assert call(reactor, c.get, "/a/b") == Node(b"", remade.version)

    # Errors are one line naming the URL, the operation and the path.
    message = str(stale)
    assert "\n" not in message and c.url in message and "set /a/b" in message
    assert c.url in coordinator_url or coordinator_url.startswith(c.url)


def test_children(reactor, session):
    c = session()
    assert call(reactor, c.children, "/shop/proxies") == {}
    for name in ("p1", "p2", "p3"):
        call(reactor, c.create, f"/shop/proxies/{name}", name.encode())
    call(reactor, c.create, "/shop/topology", b"{}")
    children = call(reactor, c.children, "/shop/proxies")
    assert {name: node.value for name, node in children.items()} == {"p1": b"p1", "p2": b"p2", "p3": b"p3"}
    assert children["p2"] == call(reactor, c.get, "/shop/proxies/p2")
    # A name with only descendants is listed (as ZooKeeper's made parents are: empty, version 0).
    top = call(reactor, c.children, "/")
    assert set(top) == {"shop"} and top["shop"].value == b""
    assert set(call(reactor, c.children, "/shop")) == {"proxies", "topology"}
    call(reactor, c.delete, "/shop/proxies/p2")
    assert set(call(reactor, c.children, "/shop/proxies")) == {"p1", "p3"}


def test_bad_arguments_fail_at_once(reactor, session):
    c = session()
    for path in ("relative", "/a/", "/a//b", "/a/../b", "/"):
        with pytest.raises(ValueError):
            c.get(path)
    with pytest.raises(TypeError):
        c.create("/a", "text, not bytes")


def test_watch_sees_initial_then_latest(reactor, session):
    writer, watcher = session(), session()
    first = call(reactor, writer.create, "/config", b"0")
    seen: List[object] = []
    watch = in_reactor(reactor, watcher.watch, "/config", seen.append)
    wait_until(lambda: seen, timeout=5, what="the first delivery")
    assert seen[0] == first

    @defer.inlineCallbacks
    def burst():
        node = None
        for i in range(1, 31):  # back to back: deliveries may be coalesced, the last must come
            node = yield writer.set("/config", str(i).encode())
        return node

    last = call(reactor, burst)
    wait_until(lambda: seen[-1] == last, timeout=5, what="the latest value")
    assert [n.value for n in seen] == sorted((n.value for n in seen), key=int)  # in order, never back in time
    call(reactor, writer.delete, "/config")
    wait_until(lambda: seen[-1] is None, timeout=5, what="the deletion")
    call(reactor, writer.create, "/config", b"back")
    wait_until(lambda: seen[-1] is not None and seen[-1].value == b"back", timeout=5, what="the re-creation")

    in_reactor(reactor, watch.cancel)
    count = len(seen)
    call(reactor, writer.set, "/config", b"after cancel")
    assert call(reactor, watcher.get, "/config").value == b"after cancel"
    assert len(seen) == count


def test_watch_of_absent_node_sees_creation(reactor, session):
    writer, watcher = session(), session()
    seen: List[object] = []
    in_reactor(reactor, watcher.watch, "/later/node", seen.append)
    wait_until(lambda: seen == [None], timeout=5, what="the first delivery (absent)")
    made = call(reactor, writer.create, "/later/node", b"x")
    wait_until(lambda: seen[-1] == made, timeout=5, what="the creation")


def test_watch_children_follows_another_sessions_ephemeral(reactor, session):
    watcher, holder = session(), session()
    seen: List[Dict[str, Node]] = []
    in_reactor(reactor, watcher.watch_children, "/shop/proxies", seen.append)
    wait_until(lambda: seen == [{}], timeout=5, what="the first (empty) delivery")

    ephemeral = call(reactor, holder.ephemeral, "/shop/proxies/p1", b'{"generation": 1}')
    wait_until(lambda: seen[-1].keys() == {"p1"}, timeout=5, what="p1 to appear")
    assert seen[-1]["p1"].value == b'{"generation": 1}'
    call(reactor, ephemeral.update, b'{"generation": 2}')  # a child's new value is a change too
    wait_until(lambda: seen[-1].get("p1", Node(b"", 0)).value == b'{"generation": 2}', timeout=5,
               what="p1's new value")
    call(reactor, holder.create, "/shop/proxies/p2", b"persistent")
    wait_until(lambda: seen[-1].keys() == {"p1", "p2"}, timeout=5, what="p2 to appear")

    call(reactor, holder.stop)  # the session ends: its ephemeral goes, the persistent node stays
    wait_until(lambda: seen[-1].keys() == {"p2"}, timeout=5, what="p1 to disappear")
    assert call(reactor, watcher.get, "/shop/proxies/p1") is None


def test_ephemeral_is_a_lock(reactor, session):
    first, second = session(), session()
    held = call(reactor, first.ephemeral, "/shop/dashboard", b"first")
    assert held.path == "/shop/dashboard"
    taken = raises(reactor, Conflict, second.ephemeral, "/shop/dashboard", b"second")
    assert "ephemeral /shop/dashboard" in str(taken)
    raises(reactor, Conflict, first.ephemeral, "/shop/dashboard", b"twice")
    assert call(reactor, second.get, "/shop/dashboard").value == b"first"

    call(reactor, first.stop)
    mine = call(reactor, second.ephemeral, "/shop/dashboard", b"second")
    assert call(reactor, second.get, "/shop/dashboard") == mine.node
    assert mine.node.value == b"second"


def test_ephemeral_update_and_remove(reactor, session):
    owner, reader = session(), session()
    ephemeral = call(reactor, owner.ephemeral, "/e", b"v1")
    first = ephemeral.node
    node = call(reactor, ephemeral.update, b"v2")
    assert node.value == b"v2" and node.version != first.version and ephemeral.node == node
    assert call(reactor, reader.get, "/e") == node
    assert ephemeral.value == b"v2"
    # Still bound to the session: it goes with it, though it was updated.
    call(reactor, ephemeral.remove)
    assert call(reactor, reader.get, "/e") is None
    call(reactor, ephemeral.remove)  # twice is fine
    raises(reactor, NotFound, ephemeral.update, b"v3")

    again = call(reactor, owner.ephemeral, "/e", b"w1")
    call(reactor, again.update, b"w2")
    call(reactor, owner.stop)
    assert call(reactor, reader.get, "/e") is None


def test_set_keeps_an_ephemeral_bound(reactor, session):
    owner, other = session(), session()
    call(reactor, owner.ephemeral, "/bound", b"1")
    call(reactor, other.set, "/bound", b"2")  # a plain set by anyone: still the owner's ephemeral
    call(reactor, owner.stop)
    assert call(reactor, other.get, "/bound") is None


def test_states_and_stop(reactor, coordinator_url):
    coordinator = in_reactor(reactor, connect, coordinator_url, reactor)
    states: List[str] = []
    coordinator.on_state(states.append)
    assert coordinator.state == "connecting"
    raises(reactor, Unavailable, coordinator.get, "/x")  # not started
    call(reactor, coordinator.start)
    assert coordinator.state == "connected" and states == ["connected"]
    call(reactor, coordinator.stop)
    assert states == ["connected", "stopped"]
    error = raises(reactor, Unavailable, coordinator.create, "/x", b"")
    assert "stopped" in str(error)
    assert call(reactor, coordinator.stop) is None  # again: nothing to do
    watch = in_reactor(reactor, coordinator.watch, "/x", lambda node: None)
    assert watch.cancelled


def test_blocking_directory(reactor, session, coordinator_url):
    c = session()
    directory = BlockingDirectory(coordinator_url)
    try:
        assert directory.children("/shop/proxies") == {}
        assert directory.get("/shop/topology") is None
        call(reactor, c.create, "/shop/topology", b'{"generation": 1}')
        call(reactor, c.ephemeral, "/shop/proxies/p1", b"one")
        holder = session()
        call(reactor, holder.ephemeral, "/shop/proxies/p2", b"two")
        assert directory.get("/shop/topology") == b'{"generation": 1}'
        assert directory.children("/shop/proxies") == {"p1": b"one", "p2": b"two"}
        assert directory.children("/") == {"shop": b""}
        call(reactor, holder.stop)
        assert directory.children("/shop/proxies") == {"p1": b"one"}
        with pytest.raises(ValueError):
            directory.children("nope")
    finally:
        directory.close()


def test_ephemeral_conflict_names_the_holder_path_for_each_backend(reactor, session):
    first, second = session(), session()
    call(reactor, first.create, "/persistent", b"")
    raises(reactor, Conflict, second.ephemeral, "/persistent", b"")  # a persistent node is in the way too
    call(reactor, first.delete, "/persistent")
    call(reactor, second.ephemeral, "/persistent", b"")


def test_ephemeral_adopts_what_a_create_that_timed_out_made(reactor, session):
    owner, other = session(), session()
    # A create whose answer never came back (its deadline passed) and which landed all the same:
    call(reactor, owner._create, "/shop/dashboard", b"old", True)
    raises(reactor, Conflict, other.ephemeral, "/shop/dashboard", b"theirs")  # another session's: refused
    held = call(reactor, owner.ephemeral, "/shop/dashboard", b"new")  # this session's: adopted
    assert held.held and held.node.value == b"new"
    assert call(reactor, other.get, "/shop/dashboard") == held.node
    raises(reactor, Conflict, owner.ephemeral, "/shop/dashboard", b"twice")
    call(reactor, owner.stop)  # still bound to the session
    assert call(reactor, other.get, "/shop/dashboard") is None


def test_rapid_updates_end_at_the_last_value(reactor, session):
    owner, reader = session(), session()
    ephemeral = call(reactor, owner.ephemeral, "/shop/proxies/p1", b"0")

    def burst():  # none waits for the one before
        return defer.gatherResults([ephemeral.update(str(i).encode()) for i in range(1, 41)])

    nodes = call(reactor, burst)
    # Each caller hears of a write of its value or a later one; the last write is the last value.
    assert all(int(node.value) >= i for i, node in enumerate(nodes, 1)), [node.value for node in nodes]
    assert nodes[-1].value == b"40" and ephemeral.node == nodes[-1] and ephemeral.value == b"40"
    assert call(reactor, reader.get, "/shop/proxies/p1") == nodes[-1]
    with pytest.raises(TypeError):
        ephemeral.update("text")
    assert ephemeral.value == b"40"

    def burst_then_remove():
        updates = [ephemeral.update(str(i).encode()) for i in range(41, 61)]
        return defer.DeferredList([*updates, ephemeral.remove()], consumeErrors=True)

    results = call(reactor, burst_then_remove)
    for ok, result in results[:-1]:
        assert ok or result.check(NotFound), result  # written before the removal, or refused after it
    assert results[-1] == (True, None)
    assert call(reactor, reader.get, "/shop/proxies/p1") is None  # no update landed after the delete


def test_ephemeral_made_again_right_after_remove(reactor, session):
    owner, reader = session(), session()
    first = call(reactor, owner.ephemeral, "/e", b"1")

    def churn():
        first.update(b"2")  # in flight ...
        first.remove()  # ... the delete queued behind it ...
        return owner.ephemeral("/e", b"3")  # ... which this must wait for, not adopt the node it deletes

    second = call(reactor, churn)
    assert second.held and not first.held
    assert call(reactor, reader.get, "/e") == second.node and second.node.value == b"3"
