"""The Sentinel fixture library itself (tests/sentinel_servers.py, sentinel_events.py and
resp_client.py), against real processes.

No proxy here: a topology becomes ready, a manual failover is seen by
``wait_switch`` and the SwitchWatcher, and a SentinelRelay forwards queries
and can silence event connections only.
"""

from __future__ import annotations

import time

import pytest

from tests.resp_client import Resp, RespError
from tests.sentinel_events import SentinelRelay
from tests.servers import wait_until


@pytest.mark.timeout(60)
def test_topology_is_ready_and_follows_a_manual_failover(sentinel_topology) -> None:
    topology = sentinel_topology
    print(f"\ntopology ready in {topology.ready_seconds:.2f}s")
    assert topology.ready_seconds < 20
    assert topology._not_ready() == []
    for name in ("s1", "s2"):
        shard = topology.shards[name]
        assert topology.master(name) is shard.servers[0]
        assert topology.replica(name) is shard.servers[1]
        assert shard.servers[0].role() == "master" and shard.servers[1].linked()
        for sentinel in topology.sentinels:
            assert sentinel.master_info(name)["flags"] == "master"
            assert sentinel.master_info(name)["config-epoch"] == "0"
    for server in topology.servers:
        assert server.config_path.exists()
    assert len(set(topology.sentinel_addresses)) == 3

    old, replica = topology.master("s1"), topology.replica("s1")
    asked = topology.failover("s1")
    address, seen = topology.wait_switch("s1", old.address, timeout=15)
    assert address == replica.address
    event = topology.watcher.wait("s1", timeout=5)
    assert (event.old_address, event.new_address) == (old.address, replica.address)
    assert asked <= event.at <= seen + 1
    print(f"+switch-master {event.at - asked:.2f}s after SENTINEL FAILOVER; majority {seen - asked:.2f}s")
    assert topology.master("s1") is replica and topology.replica("s1") is old
    wait_until(lambda: replica.role() == "master", timeout=5, what="the promoted replica to report role:master")
    assert topology.watcher.first("s2") is None
    wait_until(lambda: topology.watcher.count("s1") == 3, timeout=10, what="all 3 sentinels to publish the switch")


@pytest.mark.timeout(60)
def test_relay_forwards_queries_and_cuts_event_connections_only(make_topology) -> None:
    topology = make_topology(names=("s1",))
    sentinel = topology.sentinels[0]
    relay = topology.relay(sentinel)
    assert isinstance(relay, SentinelRelay)

    query = Resp(relay.port, timeout=2)
    assert query.call("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "s1") == ["127.0.0.1", str(topology.master("s1").port)]
    events = Resp(relay.port, timeout=2)
    assert events.call("SUBSCRIBE", "+switch-master") == ["subscribe", "+switch-master", 1]
    assert events.call("PING") == ["pong", ""]
    assert relay.event_connections == 1 and relay.open_event_connections == 1 and relay.connections == 2

    relay.cut_events(True)
    events.send("PING")
    # Cut: the pong is swallowed, the connection stays open; queries still get answers.
    assert query.call("PING") == "PONG"
    wait_until(lambda: relay.dropped_bytes > 0, timeout=5, what="the relay to drop the pong")
    started = time.monotonic()
    with pytest.raises(OSError):
        events.read(timeout=0.5)
    assert time.monotonic() - started >= 0.45
    assert relay.open_event_connections == 1
    # A failover's messages do not come through either.
    old = topology.master("s1")
    topology.failover("s1")
    topology.watcher.wait("s1", timeout=15)
    with pytest.raises(OSError):
        events.read(timeout=0.5)
    assert query.call("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "s1") != ["127.0.0.1", str(old.port)]
    # New query connections work; a new event connection is cut from its first reply.
    other = Resp(relay.port, timeout=2)
    assert isinstance(other.call("SENTINEL", "MASTERS"), list)
    late = Resp(relay.port, timeout=2)
    late.send("PSUBSCRIBE", "*")
    with pytest.raises(OSError):
        late.read(timeout=0.5)
    assert relay.event_connections == 2

    relay.cut_events(False)
    events.send("PING")
    reply = events.read(timeout=2)
    while reply != ["pong", ""]:  # the swallowed pongs are gone; only replies from now on arrive
        reply = events.read(timeout=2)
    assert isinstance(query.call("SENTINEL", "CKQUORUM", "nope"), RespError)

    for connection in (query, events, other, late):
        connection.close()
    relay.stop()
    wait_until(lambda: _refused(relay.port), timeout=5, what="the relay to stop listening")


def _refused(port: int) -> bool:
    try:
        Resp(port, timeout=0.5).close()
    except OSError:
        return True
    return False


@pytest.mark.timeout(60)
def test_topology_with_a_sentinel_password(make_topology) -> None:
    """requirepass on every sentinel: they still find each other (they AUTH with it), queries
    without it are refused, and the watcher (which AUTHs) sees a switch."""
    topology = make_topology(names=("s1",), sentinel_password="pw")
    assert topology._not_ready() == []
    sentinel = topology.sentinels[0]
    with Resp(sentinel.port, timeout=2) as connection:
        refused = connection.call("SENTINEL", "MASTERS")
    assert isinstance(refused, RespError) and refused.text.startswith("NOAUTH"), refused
    old, replica = topology.master("s1"), topology.replica("s1")
    topology.failover("s1")
    assert topology.wait_switch("s1", old.address)[0] == replica.address
    assert topology.watcher.wait("s1", timeout=5).new_address == replica.address
