"""CommandClient and EventSubscriber over in-memory transports and a fake clock.

Each connection attempt lands in ``reactor.tcpClients``; the test builds
the protocol from that factory over a ``StringTransport`` and plays the
sentinel or node, byte by byte.  ``StringTransport`` never reports its own
end, so a dropped connection is completed with ``connectionLost`` by hand,
as the reactor would one turn later.
"""

from __future__ import annotations

from typing import Any, List, Tuple

import pytest
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from twinproxy.credentials import Credentials
from twinproxy.protocols.resp import encode_command
from twinproxy.sentinel.client import CommandClient, CommandError, EventSubscriber
from twinproxy.sentinel.replies import ReplyError

SENTINEL = ("10.9.0.1", 26379)
CHANNELS = (b"+switch-master", b"+odown", b"-odown")


def cmd(*args: bytes) -> bytes:
    return encode_command(list(args))


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def array(*items: bytes) -> bytes:
    return b"*%d\r\n" % len(items) + b"".join(items)


def subscribed(channel: bytes, count: int) -> bytes:
    return array(bulk(b"subscribe"), bulk(channel), b":%d\r\n" % count)


class Server:
    """The far end of one connection."""

    def __init__(self, protocol, transport: StringTransport, timeout: float) -> None:
        self.protocol = protocol
        self.transport = transport
        self.timeout = timeout

    def written(self) -> bytes:
        return self.transport.value()

    def clear(self) -> None:
        self.transport.clear()

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def lose(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


def accept(reactor: MemoryReactorClock) -> Server:
    assert len(reactor.tcpClients) == 1, reactor.tcpClients
    host, port, factory, timeout, _ = reactor.tcpClients.pop(0)
    assert (host, port) == SENTINEL
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return Server(protocol, transport, timeout)


def refuse(reactor: MemoryReactorClock) -> None:
    assert len(reactor.tcpClients) == 1, reactor.tcpClients
    _, _, factory, _, _ = reactor.tcpClients.pop(0)
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))


class Outcome:
    """What one command's Deferred fired with."""

    def __init__(self, deferred) -> None:
        self.value: Any = None
        self.error: Any = None
        self.fired = False
        deferred.addCallbacks(self._value, self._error)

    def _value(self, value: Any) -> None:
        self.fired, self.value = True, value

    def _error(self, failure: Failure) -> None:
        self.fired, self.error = True, failure


# -- CommandClient ----------------------------------------------------------------


def test_commands_written_once_connected_and_answered_in_order() -> None:
    reactor = MemoryReactorClock()
    client = CommandClient(reactor, SENTINEL, timeout=0.5)
    first = Outcome(client.command(b"PING"))
    second = Outcome(client.command(b"SENTINEL", b"MASTERS"))
    third = Outcome(client.command(b"GET", b"k"))
    server = accept(reactor)                     # one connection, opened on demand
    assert server.written() == cmd(b"PING") + cmd(b"SENTINEL", b"MASTERS") + cmd(b"GET", b"k")
    server.send(b"+PONG\r\n*1\r\n$1\r\nx\r\n")
    assert (first.value, second.value, third.fired) == ("PONG", [b"x"], False)
    server.send(b"-ERR no such key\r\n")
    assert third.value == ReplyError("ERR no such key")   # an error reply is a value, not a failure
    assert third.error is None
    fourth = Outcome(client.command(b"ROLE"))
    assert reactor.tcpClients == []              # the same connection again
    assert server.written().endswith(cmd(b"ROLE"))
    server.send(b"*3\r\n$6\r\nmaster\r\n:0\r\n*0\r\n")
    assert fourth.value == [b"master", 0, []]
    assert [call for call in reactor.getDelayedCalls() if call.active()] == []


def test_a_reply_split_over_reads_is_assembled() -> None:
    reactor = MemoryReactorClock()
    client = CommandClient(reactor, SENTINEL)
    result = Outcome(client.command(b"GET", b"k"))
    server = accept(reactor)
    server.send(b"$5\r\nhel")
    assert not result.fired
    server.send(b"lo\r\n")
    assert result.value == b"hello"


def test_a_timeout_fails_every_pending_command_and_drops_the_connection() -> None:
    reactor = MemoryReactorClock()
    lost: List[int] = []
    client = CommandClient(reactor, SENTINEL, timeout=0.5, on_lost=lambda: lost.append(1))
    first = Outcome(client.command(b"PING"))
    server = accept(reactor)
    reactor.advance(0.3)
    second = Outcome(client.command(b"PING"))
    reactor.advance(0.199)
    assert not first.fired and not second.fired
    reactor.advance(0.002)                       # the first command's deadline
    assert first.error.check(CommandError) and second.error.check(CommandError)
    assert "no reply from 10.9.0.1:26379 within 0.5s" in first.error.getErrorMessage()
    assert server.transport.disconnected
    assert [call for call in reactor.getDelayedCalls() if call.active()] == []
    server.send(b"+PONG\r\n+PONG\r\n")          # late replies are matched to nothing
    server.lose()
    # The next command opens a new connection.
    third = Outcome(client.command(b"PING"))
    again = accept(reactor)
    assert again.written() == cmd(b"PING")
    again.send(b"+PONG\r\n")
    assert third.value == "PONG"


def test_a_timeout_before_the_connection_is_made() -> None:
    reactor = MemoryReactorClock()
    client = CommandClient(reactor, SENTINEL, timeout=0.5)
    first = Outcome(client.command(b"PING"))
    _, _, factory, timeout, _ = reactor.tcpClients[0]
    assert timeout == 0.5                        # the connect attempt ends with the deadline too
    reactor.advance(0.5)
    assert first.error.check(CommandError)
    reactor.tcpClients.pop(0)
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    second = Outcome(client.command(b"PING"))
    server = accept(reactor)
    server.send(b"+PONG\r\n")
    assert second.value == "PONG"


def test_a_refused_connection_fails_the_commands_at_once() -> None:
    reactor = MemoryReactorClock()
    client = CommandClient(reactor, SENTINEL, timeout=0.5)
    result = Outcome(client.command(b"PING"))
    refuse(reactor)
    assert result.error.check(CommandError)
    assert "10.9.0.1:26379" in result.error.getErrorMessage()
    assert [call for call in reactor.getDelayedCalls() if call.active()] == []


def test_a_lost_connection_fails_what_is_pending_and_calls_on_lost() -> None:
    reactor = MemoryReactorClock()
    lost: List[int] = []
    client = CommandClient(reactor, SENTINEL, timeout=0.5, on_lost=lambda: lost.append(1))
    result = Outcome(client.command(b"PING"))
    server = accept(reactor)
    server.lose()
    assert result.error.check(CommandError)
    assert lost == [1]


def test_close_fails_pending_and_refuses_new_commands_without_on_lost() -> None:
    reactor = MemoryReactorClock()
    lost: List[int] = []
    client = CommandClient(reactor, SENTINEL, timeout=0.5, on_lost=lambda: lost.append(1))
    result = Outcome(client.command(b"PING"))
    server = accept(reactor)
    client.close()
    assert result.error.check(CommandError)
    assert server.transport.disconnected
    server.lose()
    assert lost == []
    later = Outcome(client.command(b"PING"))
    assert later.error.check(CommandError)
    assert reactor.tcpClients == []


def test_after_a_timeout_the_next_command_gets_a_fresh_connection_and_on_lost_is_not_called() -> None:
    reactor = MemoryReactorClock()
    lost: List[int] = []
    client = CommandClient(reactor, SENTINEL, timeout=0.5, on_lost=lambda: lost.append(1))
    Outcome(client.command(b"PING"))
    server = accept(reactor)
    reactor.advance(0.5)
    assert server.transport.disconnected
    after = Outcome(client.command(b"PING"))     # e.g. the next check, in the same reactor turn
    server.lose()                                # the reactor's connectionLost for the abort
    assert lost == []                            # actual: [1]
    assert not after.fired                       # actual: failed with the old connection's loss
    fresh = accept(reactor)
    assert fresh.written() == cmd(b"PING")
    fresh.send(b"+PONG\r\n")
    assert after.value == "PONG"


@pytest.mark.parametrize("auth,words", [(Credentials("secret"), [b"AUTH", b"secret"]),
                                        (Credentials("s3 cret"), [b"AUTH", b"s3 cret"]),
                                        (Credentials("s3cret", "watcher"), [b"AUTH", b"watcher", b"s3cret"])])
def test_auth_is_sent_first_and_its_reply_swallowed(auth: Credentials, words: List[bytes]) -> None:
    reactor = MemoryReactorClock()
    client = CommandClient(reactor, SENTINEL, auth=auth, timeout=0.5)
    result = Outcome(client.command(b"SENTINEL", b"MASTERS"))
    server = accept(reactor)
    assert server.written() == cmd(*words) + cmd(b"SENTINEL", b"MASTERS")
    server.send(b"+OK\r\n")
    assert not result.fired
    server.send(b"*0\r\n")
    assert result.value == []
    # Once per connection only.
    again = Outcome(client.command(b"PING"))
    assert server.written() == cmd(*words) + cmd(b"SENTINEL", b"MASTERS") + cmd(b"PING")
    server.send(b"+PONG\r\n")
    assert again.value == "PONG"


def test_a_refused_auth_fails_the_commands_and_drops_the_connection() -> None:
    reactor = MemoryReactorClock()
    client = CommandClient(reactor, SENTINEL, auth=Credentials("wrong"), timeout=0.5)
    result = Outcome(client.command(b"SENTINEL", b"MASTERS"))
    server = accept(reactor)
    server.send(b"-WRONGPASS invalid username-password pair or user is disabled.\r\n*0\r\n")
    assert result.error.check(CommandError)
    assert "AUTH refused: WRONGPASS" in result.error.getErrorMessage()
    assert server.transport.disconnected
    # A new command logs in again on a new connection.
    server.lose()
    Outcome(client.command(b"PING"))
    assert accept(reactor).written() == cmd(b"AUTH", b"wrong") + cmd(b"PING")


def test_a_garbled_reply_drops_the_connection() -> None:
    reactor = MemoryReactorClock()
    client = CommandClient(reactor, SENTINEL, timeout=0.5)
    result = Outcome(client.command(b"PING"))
    server = accept(reactor)
    server.send(b"?what\r\n")
    assert result.error.check(CommandError)
    assert server.transport.disconnected


# -- EventSubscriber --------------------------------------------------------------


class Events:
    def __init__(self, auth=None) -> None:
        self.reactor = MemoryReactorClock()
        self.events: List[Tuple[bytes, bytes]] = []
        self.subscriptions = 0
        self.subscriber = EventSubscriber(self.reactor, SENTINEL, CHANNELS, self._event, self._subscribed,
                                          auth=auth, label=" (test)")

    def _event(self, channel: bytes, payload: bytes) -> None:
        self.events.append((channel, payload))

    def _subscribed(self) -> None:
        self.subscriptions += 1

    def connect(self, confirm: bool = True) -> Server:
        server = accept(self.reactor)
        if confirm:
            server.send(b"".join(subscribed(channel, i) for i, channel in enumerate(CHANNELS, 1)))
        return server


def test_subscriber_subscribes_to_its_channels_and_delivers_messages() -> None:
    e = Events()
    e.subscriber.start()
    server = e.connect(confirm=False)
    assert server.timeout == 1.0
    assert server.written() == cmd(b"SUBSCRIBE", *CHANNELS)
    server.send(subscribed(CHANNELS[0], 1) + subscribed(CHANNELS[1], 2))
    assert e.subscriptions == 0 and not e.subscriber.subscribed     # not until every channel is confirmed
    server.send(subscribed(CHANNELS[2], 3))
    assert e.subscriptions == 1 and e.subscriber.subscribed
    server.send(array(bulk(b"message"), bulk(b"+switch-master"), bulk(b"s1 10.1.0.1 6379 10.1.0.2 6379"))
                + array(bulk(b"message"), bulk(b"+odown"), bulk(b"master s1 10.1.0.2 6379 #quorum 2/2")))
    assert e.events == [(b"+switch-master", b"s1 10.1.0.1 6379 10.1.0.2 6379"),
                        (b"+odown", b"master s1 10.1.0.2 6379 #quorum 2/2")]


def test_subscriber_sends_auth_before_subscribe() -> None:
    e = Events(auth=Credentials("pw", "watcher"))
    e.subscriber.start()
    server = e.connect(confirm=False)
    assert server.written() == cmd(b"AUTH", b"watcher", b"pw") + cmd(b"SUBSCRIBE", *CHANNELS)
    server.send(b"+OK\r\n" + b"".join(subscribed(channel, i) for i, channel in enumerate(CHANNELS, 1)))
    assert e.subscriptions == 1


def test_subscriber_pings_every_second_while_answered() -> None:
    e = Events()
    e.subscriber.start()
    server = e.connect()
    server.clear()
    for _ in range(5):
        e.reactor.advance(0.999)
        assert server.written() == b""
        e.reactor.advance(0.001)
        assert server.written() == cmd(b"PING")
        server.clear()
        server.send(array(bulk(b"pong"), bulk(b"")))
    assert not server.transport.disconnecting
    assert e.events == []                        # a pong is no event


def test_subscriber_declares_the_link_dead_after_3_seconds_without_data() -> None:
    e = Events()
    e.subscriber.start()
    server = e.connect()                         # the last data: at t=0
    server.clear()
    e.reactor.advance(1.0)
    e.reactor.advance(1.0)
    assert server.written() == cmd(b"PING") * 2
    assert not server.transport.disconnecting
    e.reactor.advance(1.0)                       # t=3: no answer to either PING
    assert server.transport.disconnected
    assert server.written() == cmd(b"PING") * 2
    server.lose()
    assert not e.subscriber.subscribed
    e.reactor.advance(0.1)
    again = e.connect()
    assert again.written() == cmd(b"SUBSCRIBE", *CHANNELS)
    assert e.subscriptions == 2


def test_any_data_keeps_the_link_alive() -> None:
    e = Events()
    e.subscriber.start()
    server = e.connect()
    for _ in range(10):
        e.reactor.advance(1.0)
        server.send(array(bulk(b"pong"), bulk(b"")))
    assert not server.transport.disconnecting


def test_subscriber_reconnects_with_backoff_and_resubscribes() -> None:
    e = Events()
    e.subscriber.start()
    server = e.connect()
    assert e.subscriptions == 1
    server.lose()
    assert not e.subscriber.subscribed
    # Each failed attempt waits longer: 0.1, 0.2, 0.5, 1, 2, 2 s.
    for delay in (0.1, 0.2, 0.5, 1.0, 2.0, 2.0):
        e.reactor.advance(delay - 0.001)
        assert e.reactor.tcpClients == []
        e.reactor.advance(0.002)
        refuse(e.reactor)
    e.reactor.advance(2.0)
    e.connect()
    assert e.subscriptions == 2                  # on_subscribed after the resubscription too
    assert e.subscriber.subscribed
    e.reactor.advance(0.5)
    assert e.reactor.tcpClients == []            # subscribed: no more attempts


def test_backoff_restarts_after_a_successful_subscription() -> None:
    e = Events()
    e.subscriber.start()
    e.connect().lose()
    e.reactor.advance(0.1)
    refuse(e.reactor)
    e.reactor.advance(0.2)
    server = e.connect()
    server.lose()
    e.reactor.advance(0.1)                       # back to the first step
    assert len(e.reactor.tcpClients) == 1


def test_a_link_lost_before_subscribing_keeps_backing_off() -> None:
    e = Events()
    e.subscriber.start()
    e.connect(confirm=False).lose()
    e.reactor.advance(0.1)
    e.connect(confirm=False).lose()
    e.reactor.advance(0.1)
    assert e.reactor.tcpClients == []            # 0.2 s this time
    e.reactor.advance(0.1)
    assert len(e.reactor.tcpClients) == 1
    assert e.subscriptions == 0


def test_a_refused_subscription_drops_the_link() -> None:
    e = Events(auth=Credentials("wrong"))
    e.subscriber.start()
    server = e.connect(confirm=False)
    server.send(b"-WRONGPASS invalid username-password pair\r\n")
    assert server.transport.disconnected
    assert e.subscriptions == 0
    server.lose()
    e.reactor.advance(0.1)
    assert len(e.reactor.tcpClients) == 1


def test_stop_cancels_pings_and_reconnects() -> None:
    e = Events()
    e.subscriber.start()
    server = e.connect()
    e.subscriber.stop()
    assert server.transport.disconnected
    server.lose()
    e.reactor.advance(10)
    assert e.reactor.tcpClients == []
    assert [call for call in e.reactor.getDelayedCalls() if call.active()] == []
    assert e.subscriptions == 1
