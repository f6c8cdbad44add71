"""SentinelWatcher against three fake sentinels on in-memory transports and a fake clock.

The watcher's CommandClients and EventSubscribers connect through a
``MemoryReactorClock``; the test builds each protocol over a
``StringTransport`` and plays the sentinels (``SENTINEL MASTERS`` as
hand-built RESP flat lists, ``SENTINEL REPLICAS``, ``SUBSCRIBE``/``PING``)
and the data nodes (``ROLE``).  The shards are the pool's real
SentinelShards, so ``confirm`` really releases held requests.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import pytest
from twisted.internet.testing import MemoryReactorClock, StringTransport

from tests.unit.sentinel_harness import Peer, cmd, connect_pending
from twinproxy.backend import ConnectorFactory
from twinproxy.config import load_text
from twinproxy.runtime import PoolRuntime
from twinproxy.sentinel import watcher as watcher_module
from twinproxy.sentinel.client import CommandClient, EventSubscriber

Address = Tuple[str, int]

SENTINELS = [("10.9.0.1", 26379), ("10.9.0.2", 26379), ("10.9.0.3", 26379)]
GUESS = ("10.0.0.1", 6379)
A = ("10.1.0.1", 6379)
B = ("10.1.0.2", 6379)
C = ("10.1.0.3", 6379)

POOL = """\
alpha:
  listen: 127.0.0.1:22121
  redis: true
  timeout: 400
  failover_hold: 2000
  sentinels:
    - 10.9.0.1:26379
    - 10.9.0.2:26379
    - 10.9.0.3:26379
  servers:
    - 10.0.0.1:6379:1 s1
"""


def bulk(value) -> bytes:
    data = value if isinstance(value, bytes) else str(value).encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


def array(*items: bytes) -> bytes:
    return b"*%d\r\n" % len(items) + b"".join(items)


def master_entry(name: str, address: Address, epoch: int, run_id: str = "", flags: str = "master",
                 others: int = 2) -> bytes:
    """One SENTINEL MASTERS entry as Redis 7.0 sends it (a flat field/value list)."""
    words = ["name", name, "ip", address[0], "port", address[1], "runid", run_id, "flags", flags,
             "link-pending-commands", 0, "link-refcount", 1, "last-ping-sent", 0, "last-ok-ping-reply", 100,
             "down-after-milliseconds", 1000, "role-reported", "master", "config-epoch", epoch,
             "num-slaves", 1, "num-other-sentinels", others, "quorum", 2, "failover-timeout", 3000,
             "parallel-syncs", 1]
    return array(*(bulk(word) for word in words))


def message(channel: bytes, payload: bytes) -> bytes:
    return array(bulk(b"message"), bulk(channel), bulk(payload))


class FakeSentinel:
    """What one sentinel says: its view per master name, and whether it answers at all."""

    def __init__(self, address: Address) -> None:
        self.address = address
        self.views: Dict[str, Tuple[Address, int, str, str]] = {}
        self.answering = True
        self.queries: List[Peer] = []
        self.events: List[Peer] = []

    def say(self, address: Address, epoch: int, run_id: str = "", name: str = "s1", flags: str = "master") -> None:
        self.views[name] = (address, epoch, run_id, flags)

    def masters_reply(self) -> bytes:
        return array(*(master_entry(name, address, epoch, run_id, flags)
                       for name, (address, epoch, run_id, flags) in self.views.items()))

    @property
    def masters_asked(self) -> int:
        return sum(1 for peer in self.queries for args in peer.received if args[:2] == [b"SENTINEL", b"MASTERS"])


class Net:
    """The pool's runtime, started, with its sentinels and data nodes played by the test."""

    def __init__(self) -> None:
        (config,) = load_text(POOL)
        self.reactor = MemoryReactorClock()
        self.runtime = PoolRuntime(config, self.reactor, outbox=None)
        self.watcher = self.runtime.sentinel.watcher
        self.shard = self.runtime.sentinel.shards["s1"]
        self.sentinels = {address: FakeSentinel(address) for address in SENTINELS}
        self.roles: Dict[Address, Optional[bytes]] = {}   # data node -> its ROLE reply (None: silent)
        self.nodes: Dict[Address, List[Peer]] = {}        # CommandClients to data nodes
        self.data: Dict[Address, List[Peer]] = {}         # the links' connections
        self.attempts: List[Address] = []

    def all_say(self, address: Address, epoch: int, run_id: str = "") -> None:
        for sentinel in self.sentinels.values():
            sentinel.say(address, epoch, run_id)

    def accept(self) -> None:
        for factory, peer in connect_pending(self.reactor):
            address = peer.address
            self.attempts.append(address)
            if isinstance(factory, ConnectorFactory):
                self.data.setdefault(address, []).append(peer)
            elif isinstance(factory.client, EventSubscriber):
                self.sentinels[address].events.append(peer)
            elif address in self.sentinels:
                assert isinstance(factory.client, CommandClient)
                self.sentinels[address].queries.append(peer)
            else:
                self.nodes.setdefault(address, []).append(peer)

    def pump(self) -> None:
        """Connect what waits and answer every command asked, until nothing new is asked."""
        while True:
            self.accept()
            busy = False
            for sentinel in self.sentinels.values():
                for peer in sentinel.events:
                    for args in peer.new_commands():
                        busy = True
                        self._event_command(peer, args)
                for peer in sentinel.queries:
                    peer.unanswered += peer.new_commands()
                    while sentinel.answering and peer.unanswered:
                        busy = True
                        self._sentinel_command(sentinel, peer, peer.unanswered.pop(0))
            for address, peers in self.nodes.items():
                for peer in peers:
                    peer.unanswered += peer.new_commands()
                    while peer.unanswered and self.roles.get(address) is not None:
                        busy = True
                        args = peer.unanswered.pop(0)
                        assert args == [b"ROLE"], args
                        peer.reply(self.roles[address])
            if not busy and not self.reactor.tcpClients:
                return

    def _event_command(self, peer: Peer, args: List[bytes]) -> None:
        name = args[0].upper()
        if name == b"SUBSCRIBE":
            for index, channel in enumerate(args[1:], 1):
                peer.reply(array(bulk(b"subscribe"), bulk(channel), b":%d\r\n" % index))
        elif name == b"PING":
            peer.reply(array(bulk(b"pong"), bulk(b"")))
        else:
            raise AssertionError(f"unexpected event-link command {args!r}")

    def _sentinel_command(self, sentinel: FakeSentinel, peer: Peer, args: List[bytes]) -> None:
        if args[:2] == [b"SENTINEL", b"MASTERS"]:
            peer.reply(sentinel.masters_reply())
        elif args[:2] == [b"SENTINEL", b"REPLICAS"]:
            peer.reply(b"*0\r\n")
        else:
            raise AssertionError(f"unexpected sentinel command {args!r}")

    def role_asked(self, address: Address) -> int:
        return sum(1 for peer in self.nodes.get(address, []) for args in peer.received if args == [b"ROLE"])

    def masters_asked(self) -> List[int]:
        return [sentinel.masters_asked for sentinel in self.sentinels.values()]

    def start(self) -> None:
        self.runtime.start()
        self.reactor.advance(0)
        self.pump()

    def look(self) -> None:
        """Let a triggered discovery run (it waits at most MIN_GAP after the last one)."""
        self.reactor.advance(watcher_module.MIN_GAP)
        self.pump()

    def client(self):
        protocol = self.runtime.factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport


MASTER_ROLE = b"*3\r\n$6\r\nmaster\r\n:100\r\n*0\r\n"


def slave_role(master: Address) -> bytes:
    return array(bulk(b"slave"), bulk(master[0]), b":%d\r\n" % master[1], bulk(b"connected"), b":100\r\n")


def started_on(address: Address, epoch: int = 0, run_id: str = "") -> Net:
    net = Net()
    net.all_say(address, epoch, run_id)
    net.roles[address] = MASTER_ROLE
    net.start()
    assert net.shard.confirmed and net.shard.address == address
    # The subscriptions completed while the first discovery ran: one more look follows it.
    net.look()
    assert net.masters_asked() == [2, 2, 2]
    return net


# -- discovery ----------------------------------------------------------------


def test_start_connects_a_query_and_an_event_link_per_sentinel_and_subscribes() -> None:
    net = started_on(A)
    for sentinel in net.sentinels.values():
        assert len(sentinel.queries) == 1 and len(sentinel.events) == 1
        (subscribe,) = sentinel.events[0].received
        assert subscribe[0] == b"SUBSCRIBE"
        assert set(subscribe[1:]) >= {b"+switch-master", b"+odown", b"-odown", b"+sdown", b"-sdown",
                                      b"+convert-to-slave", b"+slave", b"+failover-end"}
    assert GUESS not in net.attempts             # the configured address is only a name's first guess


def test_the_majoritys_choice_is_role_checked_before_the_shard_is_confirmed() -> None:
    net = Net()
    sentinels = list(net.sentinels.values())
    sentinels[0].say(A, 0, "runA")               # stale
    sentinels[1].say(B, 1, "runB")
    sentinels[2].say(B, 1, "runB")
    net.roles[B] = None                          # B does not answer ROLE yet
    client, out = net.client()
    client.dataReceived(cmd(b"SET", b"k", b"1"))
    net.start()
    assert net.masters_asked() == [1, 1, 1]
    assert net.role_asked(B) == 1
    assert net.role_asked(A) == 0
    assert net.shard.address == B and not net.shard.confirmed
    assert net.shard.held_count == 1
    net.roles[B] = MASTER_ROLE
    net.pump()
    assert net.shard.confirmed
    assert (net.shard.address, net.shard.epoch, net.shard.run_id) == (B, 1, "runB")
    net.accept()
    assert net.data[B][0].transport.value() == cmd(b"SET", b"k", b"1")
    assert A not in net.data and GUESS not in net.data


def test_role_slave_keeps_the_shard_unconfirmed_and_looks_again_soon() -> None:
    net = Net()
    net.all_say(B, 1)
    net.roles[B] = slave_role(A)                 # a failover is under way
    net.start()
    assert net.shard.address == B and not net.shard.confirmed
    asked = net.masters_asked()
    net.reactor.advance(watcher_module.RETRY_UNCONFIRMED)
    net.pump()
    assert net.masters_asked() == [n + 1 for n in asked]
    assert not net.shard.confirmed
    net.roles[B] = MASTER_ROLE
    net.reactor.advance(watcher_module.RETRY_UNCONFIRMED)
    net.pump()
    assert net.shard.confirmed and net.shard.address == B


def test_a_minority_answering_keeps_the_current_master() -> None:
    net = started_on(A, 0, "runA")
    sentinels = list(net.sentinels.values())
    sentinels[0].say(B, 1, "runB")               # one sentinel says B...
    sentinels[1].answering = False               # ...and the others are silent
    sentinels[2].answering = False
    net.roles[B] = MASTER_ROLE
    net.watcher.trigger("test")
    net.look()
    assert net.shard.confirmed and net.shard.address == A
    net.reactor.advance(watcher_module.QUERY_TIMEOUT)
    net.pump()
    assert net.shard.confirmed and (net.shard.address, net.shard.epoch) == (A, 0)
    assert net.role_asked(B) == 0 and B not in net.attempts
    assert "only 1 of 3 sentinels answered" in net.watcher.problem
    # The silent sentinels' query connections were dropped by their deadline.
    for sentinel in sentinels[1:]:
        assert sentinel.queries[0].transport.disconnected
    # Requests keep flowing to A meanwhile.
    client, _ = net.client()
    client.dataReceived(cmd(b"GET", b"k"))
    net.accept()
    assert net.data[A][0].transport.value() == cmd(b"GET", b"k")


def test_a_lower_epoch_never_wins() -> None:
    net = started_on(B, 5, "runB")
    net.all_say(A, 3, "runA")                    # e.g. sentinels restarted from a stale file
    net.roles[A] = MASTER_ROLE
    net.watcher.trigger("test")
    net.look()
    assert net.shard.confirmed and (net.shard.address, net.shard.epoch) == (B, 5)
    assert net.role_asked(A) == 0
    assert "below the one in use 5" in net.watcher.problem


def test_a_higher_epoch_at_a_new_address_switches() -> None:
    net = started_on(A, 0, "runA")
    client, out = net.client()
    client.dataReceived(cmd(b"SET", b"k", b"1"))
    net.accept()
    old = net.data[A][0]
    net.all_say(B, 1, "runB")
    net.roles[B] = MASTER_ROLE
    net.watcher.trigger("test")
    net.look()
    assert (net.shard.address, net.shard.epoch, net.shard.confirmed) == (B, 1, True)
    assert b"unknown" in out.value()             # what was in flight on A
    assert old.transport.disconnected
    assert net.shard.switches == 1


def test_the_same_node_under_another_name_is_not_a_switch() -> None:
    net = started_on(A, 0, "runA")
    net.all_say(("a.example", 6379), 0, "runA")  # same run_id
    net.watcher.trigger("test")
    net.look()
    assert net.shard.address == A and net.shard.confirmed
    assert net.shard.switches == 0


def test_reconcile_every_5_seconds() -> None:
    net = started_on(A)
    asked = net.masters_asked()
    net.reactor.advance(watcher_module.RECONCILE_EVERY - 0.01)
    net.pump()
    assert net.masters_asked() == asked
    net.reactor.advance(0.01)
    net.pump()
    assert net.masters_asked() == [n + 1 for n in asked]


# -- triggers -------------------------------------------------------------------


def test_a_switch_master_event_triggers_a_discovery() -> None:
    net = started_on(A, 0, "runA")
    asked = net.masters_asked()
    net.all_say(B, 1, "runB")
    net.roles[B] = MASTER_ROLE
    events = net.sentinels[SENTINELS[1]].events[0]
    events.reply(message(b"+switch-master", b"s1 10.1.0.1 6379 10.1.0.2 6379"))
    net.look()
    assert net.masters_asked() == [n + 1 for n in asked]
    assert (net.shard.address, net.shard.epoch, net.shard.confirmed) == (B, 1, True)


def test_a_switch_master_event_alone_moves_nothing_without_the_majority() -> None:
    # redis/redis#12798: one sentinel's +switch-master is a trigger, not the truth.
    net = started_on(A, 0, "runA")
    net.sentinels[SENTINELS[0]].say(B, 1, "runB")
    net.roles[B] = MASTER_ROLE
    net.sentinels[SENTINELS[0]].events[0].reply(message(b"+switch-master", b"s1 10.1.0.1 6379 10.1.0.2 6379"))
    net.look()
    assert net.shard.address == A and net.shard.confirmed
    assert net.role_asked(B) == 0


@pytest.mark.parametrize("channel,payload", [
    (b"+odown", b"master s1 10.1.0.1 6379 #quorum 2/2"),
    (b"+sdown", b"master s1 10.1.0.1 6379"),
    (b"-sdown", b"master s1 10.1.0.1 6379"),
])
def test_down_events_about_the_master_move_nothing_and_trigger_nothing(channel: bytes, payload: bytes) -> None:
    net = started_on(A)
    asked = net.masters_asked()
    net.sentinels[SENTINELS[0]].events[0].reply(message(channel, payload))
    net.look()
    assert net.masters_asked() == asked
    assert net.shard.confirmed and net.shard.address == A


def test_an_event_for_a_name_not_in_the_pool_is_ignored() -> None:
    net = started_on(A)
    asked = net.masters_asked()
    net.sentinels[SENTINELS[0]].events[0].reply(message(b"+switch-master", b"other 10.2.0.1 6379 10.2.0.2 6379"))
    net.look()
    assert net.masters_asked() == asked


def test_repeated_triggers_fold_into_one_discovery() -> None:
    net = started_on(A)
    # Start-up itself: the start trigger and three subscriptions made two discoveries, not four.
    assert net.masters_asked() == [2, 2, 2]
    for sentinel in net.sentinels.values():
        sentinel.answering = False
    for _ in range(3):
        net.watcher.trigger("burst")
    net.look()
    assert net.masters_asked() == [3, 3, 3]
    # While that one is in flight, more triggers (all three sentinels announce the same switch).
    for sentinel in net.sentinels.values():
        sentinel.events[0].reply(message(b"+switch-master", b"s1 10.1.0.1 6379 10.1.0.2 6379"))
    net.watcher.trigger("again")
    net.look()
    assert net.masters_asked() == [3, 3, 3]      # one discovery at a time
    for sentinel in net.sentinels.values():
        sentinel.answering = True
    net.pump()                                   # the one in flight ends...
    net.look()
    assert net.masters_asked() == [4, 4, 4]      # ...and exactly one more runs for all that came meanwhile
    net.reactor.advance(1.0)
    net.pump()
    assert net.masters_asked() == [4, 4, 4]


def test_an_event_link_that_resubscribes_triggers_a_discovery() -> None:
    net = started_on(A)
    asked = net.masters_asked()
    events = net.sentinels[SENTINELS[2]].events[0]
    events.lose()
    net.reactor.advance(0.1)                     # EventSubscriber's first backoff
    net.pump()
    assert len(net.sentinels[SENTINELS[2]].events) == 2
    net.look()
    assert net.masters_asked() == [n + 1 for n in asked]


def test_a_lost_master_connection_triggers_a_discovery() -> None:
    net = started_on(A, 0, "runA")
    client, out = net.client()
    client.dataReceived(cmd(b"GET", b"k"))
    net.accept()
    asked = net.masters_asked()
    net.data[A][0].lose()
    net.look()
    assert net.masters_asked() == [n + 1 for n in asked]


def test_a_readonly_reply_triggers_a_discovery_and_the_write_goes_to_the_new_master() -> None:
    net = started_on(A, 0, "runA")
    client, out = net.client()
    client.dataReceived(cmd(b"SET", b"k", b"1"))
    net.accept()
    net.all_say(B, 1, "runB")
    net.roles[B] = MASTER_ROLE
    net.data[A][0].reply(b"-READONLY You can't write against a read only replica.\r\n")
    assert out.value() == b""
    net.look()
    assert net.shard.address == B and net.shard.confirmed
    net.accept()
    assert net.data[B][0].transport.value() == cmd(b"SET", b"k", b"1")
    net.data[B][0].reply(b"+OK\r\n")
    assert out.value() == b"+OK\r\n"


def test_stop_leaves_no_timers_and_closes_every_link() -> None:
    net = started_on(A)
    net.runtime.stop()
    assert [call for call in net.reactor.getDelayedCalls() if call.active()] == []
    for sentinel in net.sentinels.values():
        assert sentinel.queries[0].transport.disconnected
        assert sentinel.events[0].transport.disconnected


# -- bugs -------------------------------------------------------------------------


def test_a_switch_back_to_the_old_master_is_followed() -> None:
    net = started_on(A, 0, "runA")
    # Right after +switch-master a sentinel has reset the master: its runid is empty for a moment.
    net.all_say(B, 1, "")
    net.roles[B] = MASTER_ROLE
    net.watcher.trigger("switch")
    net.look()
    assert net.shard.address == B and net.shard.confirmed
    net.all_say(B, 1, "runB")                    # the sentinels learn B's run_id
    net.reactor.advance(watcher_module.RECONCILE_EVERY)
    net.pump()
    # B fails over back to A.
    net.all_say(A, 2, "runA")
    net.roles[A] = MASTER_ROLE
    net.watcher.trigger("switch back")
    net.look()
    assert net.shard.address == A and net.shard.epoch == 2    # actual: B, epoch 1, forever
    net.reactor.advance(watcher_module.RECONCILE_EVERY * 3)
    net.pump()
    assert net.shard.address == A


def test_the_epoch_in_use_follows_the_majority_at_the_same_address() -> None:
    net = started_on(A, 0, "runA")
    net.all_say(A, 2, "runA")                    # A -> B -> A while the proxy looked away
    net.watcher.trigger("test")
    net.look()
    assert net.shard.epoch == 2                  # actual: 0
    net.all_say(B, 1, "runB")
    net.roles[B] = MASTER_ROLE
    net.watcher.trigger("test")
    net.look()
    assert net.shard.address == A


def test_a_replica_back_from_sdown_refreshes_the_replica_list() -> None:
    net = started_on(A)
    asked = net.masters_asked()
    net.sentinels[SENTINELS[0]].events[0].reply(message(b"-sdown", b"slave 10.1.0.3:6379 10.1.0.3 6379 @ s1 "
                                                                   b"10.1.0.1 6379"))
    net.look()
    assert net.masters_asked() == [n + 1 for n in asked]


# -- the fence a promoted replica puts on its master ---------------------------------------


def fenced_on(address: Address) -> Net:
    net = started_on(address, 0, "runA")
    net.shard.fence("replica 10.1.0.3:6379 says it is a master now (promoted)")
    assert not net.shard.confirmed and net.shard.fencing
    return net


def test_a_fence_is_kept_while_the_last_sentinel_to_answer_reports_the_failover() -> None:
    # Only the failover's leader flags it; the other two still name A at epoch 0. A discovery that
    # settled on the first two answers lifted the fence after its grace: writes went to A, whose
    # replica had been promoted (lost once A is turned into a replica).
    net = fenced_on(A)
    net.sentinels[SENTINELS[2]].say(A, 0, "runA", flags="master,failover_in_progress")
    for _ in range(int(2.0 / watcher_module.RETRY_UNCONFIRMED)):
        net.reactor.advance(watcher_module.RETRY_UNCONFIRMED)
        net.pump()
        assert not net.shard.confirmed
    assert "waiting for the sentinels" in net.watcher._notes["s1"]
    # The leader announces the switch; the others follow it.
    net.all_say(B, 1, "runB")
    net.roles[B] = MASTER_ROLE
    net.reactor.advance(watcher_module.RETRY_UNCONFIRMED)
    net.pump()
    assert (net.shard.address, net.shard.confirmed) == (B, True)


def test_a_fence_waits_for_a_sentinel_that_is_slow_to_answer() -> None:
    net = fenced_on(A)
    leader = net.sentinels[SENTINELS[2]]
    leader.answering = False
    net.reactor.advance(0.6)                     # past the grace
    net.pump()
    roles = net.role_asked(A)
    net.reactor.advance(watcher_module.RETRY_UNCONFIRMED)
    net.pump()                                   # a discovery asks, two sentinels answer at once
    assert not net.shard.confirmed and net.role_asked(A) == roles     # the two answers did not decide
    leader.say(A, 0, "runA", flags="master,failover_in_progress")
    leader.answering = True
    net.pump()                                   # its late answer is the one that counts
    assert net.role_asked(A) == roles + 1 and not net.shard.confirmed


def test_a_silent_sentinel_keeps_the_fence_until_its_limit() -> None:
    net = fenced_on(A)
    net.sentinels[SENTINELS[2]].answering = False
    while net.reactor.seconds() < 9.5:
        net.reactor.advance(watcher_module.QUERY_TIMEOUT)
        net.pump()
        assert not net.shard.confirmed
    net.reactor.advance(1.0)
    net.pump()
    net.reactor.advance(watcher_module.QUERY_TIMEOUT)
    net.pump()
    assert net.shard.confirmed and net.shard.address == A and not net.shard.fencing


def test_a_fence_needs_every_sentinel_to_name_the_master_at_one_epoch() -> None:
    net = fenced_on(A)
    net.sentinels[SENTINELS[2]].say(B, 1, "runB")      # the leader switched; the others have not heard yet
    net.roles[B] = MASTER_ROLE
    net.reactor.advance(0.6)
    net.pump()
    net.reactor.advance(watcher_module.RETRY_UNCONFIRMED)
    net.pump()
    assert not net.shard.confirmed and net.shard.address == A
    net.all_say(A, 0, "runA")                    # (a failover that was aborted): all of them name A again
    net.reactor.advance(watcher_module.RETRY_UNCONFIRMED)
    net.pump()
    assert net.shard.confirmed and net.shard.address == A


def test_a_promotion_that_was_no_failover_is_lifted_after_the_grace_once_all_answered() -> None:
    net = fenced_on(A)
    net.reactor.advance(watcher_module.RETRY_UNCONFIRMED)
    net.pump()
    assert not net.shard.confirmed               # the grace
    net.reactor.advance(0.5)
    net.pump()
    assert net.shard.confirmed and net.shard.address == A
