"""Sentinel's view of each group for the web page: SENTINEL MASTER replies parsed and merged, the poll's life."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import pytest
from twisted.internet import defer, task

from twinproxy.dashboard.sentinelwatch import SentinelWatch, merge, not_monitored, parse_answer, same_address
from twinproxy.dashboard.servers import ServerRefused, ServerUnreachable
from twinproxy.web.events import EventLog

pytestmark = pytest.mark.timeout(30)


def reply(ip: str = "127.0.0.1", port: int = 7001, epoch: int = 0, flags: str = "master") -> List[bytes]:
    """A RESP2 SENTINEL MASTER reply as redis-sentinel sends it (a flat field/value list)."""
    fields = {"name": "shop-1", "ip": ip, "port": str(port), "runid": "abc", "flags": flags,
              "link-pending-commands": "0", "config-epoch": str(epoch), "num-slaves": "1",
              "num-other-sentinels": "2", "quorum": "2"}
    return [item.encode() for pair in fields.items() for item in pair]


def test_parse_answer_takes_ip_port_epoch_flags() -> None:
    assert parse_answer(reply(epoch=4, flags="master,s_down")) == {
        "master": "127.0.0.1:7001", "epoch": 4, "flags": ["master", "s_down"], "error": None}
    # RESP3 answers a map; an IPv6 master is shown bracketed.
    assert parse_answer({b"ip": b"::1", b"port": b"7002", b"config-epoch": b"1"})["master"] == "[::1]:7002"
    with pytest.raises(ValueError):
        parse_answer([b"name", b"shop-1"])
    with pytest.raises(ValueError):
        parse_answer([b"odd"])


def test_same_address() -> None:
    assert same_address("127.0.0.1:1", "127.0.0.1:1")
    assert same_address("[::1]:7", "[0:0::1]:7")
    assert not same_address("127.0.0.1:1", "127.0.0.1:2")
    assert not same_address(None, "127.0.0.1:1")


def test_merge_all_agree() -> None:
    one = parse_answer(reply(epoch=2))
    document, found = merge(1, "shop-1", "127.0.0.1:7001", {"s:1": one, "s:2": dict(one)})
    assert document == {"master": "127.0.0.1:7001", "epoch": 2, "agrees": True}
    assert found == []


def test_merge_no_answer_is_unknown_and_no_alert() -> None:
    assert merge(1, "shop-1", "127.0.0.1:7001", {}) == ({"master": None, "epoch": None, "agrees": False}, [])


def test_merge_sentinels_name_another_master_than_the_topology() -> None:
    one = parse_answer(reply(port=7002, epoch=3))
    document, found = merge(1, "shop-1", "127.0.0.1:7001", {"s:1": one})
    assert document == {"master": "127.0.0.1:7002", "epoch": 3, "agrees": False}
    assert [a["kind"] for a in found] == ["sentinel"] and found[0]["subject"] == "group 1"
    assert "127.0.0.1:7002" in found[0]["text"] and "127.0.0.1:7001" in found[0]["text"]


def test_merge_sentinels_disagree_the_highest_epoch_wins() -> None:
    old = parse_answer(reply(port=7001, epoch=1))
    new = parse_answer(reply(port=7002, epoch=2))
    document, found = merge(1, "shop-1", "127.0.0.1:7001", {"s:1": old, "s:2": new})
    assert document == {"master": "127.0.0.1:7002", "epoch": 2, "agrees": False}
    assert len(found) == 1 and "disagree" in found[0]["text"]
    assert "s:1 names 127.0.0.1:7001 (epoch 1)" in found[0]["text"]
    # One sentinel that does not monitor the name at all disagrees with one that does.
    document, found = merge(1, "shop-1", "127.0.0.1:7001", {"s:1": old, "s:2": not_monitored("shop-1")})
    assert document == {"master": "127.0.0.1:7001", "epoch": 1, "agrees": False}
    assert "s:2 names no master" in found[0]["text"]


def test_merge_master_down_for_a_sentinel() -> None:
    down = parse_answer(reply(flags="master,s_down,o_down"))
    document, found = merge(1, "shop-1", "127.0.0.1:7001", {"s:1": down})
    assert document["agrees"] is True
    assert len(found) == 1 and "down for sentinel s:1" in found[0]["text"]


class Admin:
    """ServerAdmin's seam: each command is a Deferred the test fires."""

    def __init__(self) -> None:
        self.sent: List[Tuple[str, Tuple[bytes, ...], defer.Deferred]] = []
        self.closed = 0
        self.forgotten: List[set] = []

    def command(self, address: str, *args: bytes) -> defer.Deferred:
        pending: defer.Deferred = defer.Deferred()
        self.sent.append((address, args, pending))
        return pending

    def forget(self, keep: Any) -> None:
        self.forgotten.append(set(keep))

    def close(self) -> None:
        self.closed += 1
        for _, _, pending in self.sent:
            if not pending.called:
                pending.errback(ServerUnreachable("closed", "closed"))

    def answer(self, value: Any) -> Tuple[str, Tuple[bytes, ...]]:
        address, args, pending = next(item for item in self.sent if not item[2].called)
        if isinstance(value, Exception):
            pending.errback(value)
        else:
            pending.callback(value)
        return address, args


class World:
    def __init__(self) -> None:
        self.clock = task.Clock()
        self.sentinels = ["s:1", "s:2"]
        self.groups: List[Tuple[int, Optional[str]]] = [(1, "127.0.0.1:7001")]
        self.log = EventLog(self.clock.seconds)
        self.admin = Admin()
        self.watch = SentinelWatch(self.clock, lambda: self.sentinels, lambda: self.groups,
                                   lambda gid: f"shop-{gid}", 1.0, self.log.add, period=2.0, admin=self.admin)


def test_one_command_in_flight_per_sentinel_and_polls_every_period() -> None:
    world = World()
    world.watch.start()
    assert [(a, args) for a, args, _ in world.admin.sent] == [
        ("s:1", (b"SENTINEL", b"MASTER", b"shop-1")), ("s:2", (b"SENTINEL", b"MASTER", b"shop-1"))]
    world.clock.advance(2.0)
    assert len(world.admin.sent) == 2          # both still busy: nothing more sent
    world.admin.answer(reply(epoch=1))
    world.admin.answer(reply(epoch=1))
    world.clock.advance(2.0)
    assert len(world.admin.sent) == 4
    document, found = world.watch.group(1, "127.0.0.1:7001")
    assert document == {"master": "127.0.0.1:7001", "epoch": 1, "agrees": True} and found == []
    world.watch.stop()
    assert world.admin.closed == 1 and not world.watch._busy
    world.clock.advance(10.0)
    assert len(world.admin.sent) == 4          # stopped: no more polls


def test_groups_are_asked_one_after_the_other_on_a_sentinel() -> None:
    world = World()
    world.sentinels = ["s:1"]
    world.groups = [(1, "127.0.0.1:7001"), (2, "127.0.0.1:7002")]
    world.watch.start()
    assert len(world.admin.sent) == 1
    world.admin.answer(reply())
    assert world.admin.sent[-1][1] == (b"SENTINEL", b"MASTER", b"shop-2")
    world.admin.answer(ServerRefused("s:1 refused SENTINEL MASTER: ERR No such master with that name"))
    assert world.watch.answers["s:1"][2]["master"] is None
    document, found = world.watch.group(2, "127.0.0.1:7002")
    assert document == {"master": None, "epoch": None, "agrees": False} and "no master" in found[0]["text"]
    world.watch.stop()


def test_a_sentinel_not_answering_forgets_what_it_said() -> None:
    world = World()
    world.sentinels = ["s:1"]
    world.watch.start()
    world.admin.answer(reply())
    assert "s:1" in world.watch.answers
    world.clock.advance(2.0)
    world.admin.answer(ServerUnreachable("s:1 did not answer SENTINEL MASTER: timeout"))
    assert world.watch.answers == {}
    world.clock.advance(2.0)
    world.admin.answer([b"garbage"])            # not a field list: ValueError, handled the same way
    assert world.watch.answers == {} and world.watch._loop.running
    world.watch.stop()


def test_switch_master_event_when_sentinel_master_changes() -> None:
    world = World()
    world.sentinels = ["s:1"]
    world.watch.start()
    world.admin.answer(reply(port=7001, epoch=0))
    world.clock.advance(2.0)
    world.admin.answer(reply(port=7001, epoch=0))
    assert [e["kind"] for e in world.log.since(0)] == []
    world.clock.advance(2.0)
    world.admin.answer(reply(port=7002, epoch=1))
    events = world.log.since(0)
    assert [e["kind"] for e in events] == ["switch-master"]
    assert events[0]["subject"] == "group 1" and events[0]["old"] == "127.0.0.1:7001"
    assert events[0]["new"] == "127.0.0.1:7002" and events[0]["epoch"] == 1
    world.watch.stop()


def test_a_lower_epoch_answer_after_the_highest_sentinel_goes_is_no_switch() -> None:
    world = World()
    world.watch.start()                          # s:1 then s:2, every round
    world.admin.answer(reply(port=7001, epoch=1))
    world.admin.answer(reply(port=7001, epoch=1))
    world.clock.advance(2.0)
    world.admin.answer(reply(port=7002, epoch=2))   # s:1 saw the failover
    world.admin.answer(reply(port=7001, epoch=1))   # s:2 not yet
    assert [e["new"] for e in world.log.since(0)] == ["127.0.0.1:7002"]
    world.clock.advance(2.0)
    world.admin.answer(ServerUnreachable("s:1 did not answer SENTINEL MASTER: timeout"))
    world.admin.answer(reply(port=7001, epoch=1))   # only the older configuration is left
    assert world.watch.group(1, "127.0.0.1:7001")[0]["epoch"] == 1
    world.clock.advance(2.0)
    world.admin.answer(reply(port=7002, epoch=2))   # s:1 is back
    world.admin.answer(reply(port=7002, epoch=2))
    assert [e["new"] for e in world.log.since(0)] == ["127.0.0.1:7002"]   # no switch back and forth
    assert world.watch._epochs == {1: 2}
    world.groups = []
    world.clock.advance(2.0)
    assert world.watch._epochs == {} and world.watch._masters == {}     # a group that goes is forgotten
    world.watch.stop()


def test_removed_sentinels_and_groups_are_dropped() -> None:
    world = World()
    world.watch.start()
    world.admin.answer(reply())
    world.admin.answer(reply())
    assert set(world.watch.answers) == {"s:1", "s:2"}
    world.sentinels = ["s:2"]
    world.groups = []
    world.clock.advance(2.0)
    assert set(world.watch.answers) == {"s:2"} and world.watch._masters == {}
    assert world.admin.forgotten[-1] == {"s:2"}
    world.watch.stop()


def test_an_answer_after_stop_is_ignored() -> None:
    world = World()
    world.sentinels = ["s:1"]
    world.watch.start()
    pending = world.admin.sent[0][2]
    world.watch._stopped = True               # as stop() does, before the command's failure comes
    pending.callback(reply())
    assert world.watch.answers == {}


def test_a_poll_that_raises_does_not_stop_the_loop() -> None:
    world = World()
    calls: Dict[str, int] = {"n": 0}

    def broken() -> List[str]:
        calls["n"] += 1
        raise RuntimeError("boom")
    world.watch._sentinels = broken
    world.watch.start()
    world.clock.advance(2.0)
    assert calls["n"] == 2 and world.watch._loop.running
    world.watch.stop()


def test_a_hostname_master_is_compared_by_its_ip() -> None:
    world = World()
    resolved: Dict[str, defer.Deferred] = {}

    def resolve(host: str, timeout: Any = None) -> defer.Deferred:
        resolved[host] = defer.Deferred()
        return resolved[host]
    world.clock.resolve = resolve
    world.sentinels = ["s:1"]
    world.groups = [(1, "redis-a:7001")]
    world.watch.start()
    resolved["redis-a"].callback("127.0.0.1")
    world.admin.answer(reply())
    document, found = world.watch.group(1, "redis-a:7001")
    assert document["agrees"] is True and found == []
    world.watch.stop()
