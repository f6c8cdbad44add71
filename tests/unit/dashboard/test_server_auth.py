"""The dashboard's credentials for the data servers, where they are pure or in memory: ServerAdmin's AUTH first
(nothing written behind it until it is accepted; a refusal is ServerAuthRefused naming the server, never the
password), the arguments MIGRATE gets for the target (the sweep's and the proxies' alike), the sweep's options,
and what Sentinel is told so it can watch a master with a password.

ServerAdmin runs over ``StringTransport`` connections taken from a ``MemoryReactorClock``; the test plays the
Redis server byte by byte (as tests/unit/test_sentinel_client.py does for CommandClient)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, List

import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from twinproxy.cluster.movescripts import ensure_moved_parts
from twinproxy.credentials import Credentials, migrate_options
from twinproxy.dashboard.bigkeys import WHOLE, batch_command, migrate_arguments
from twinproxy.dashboard.mover import Sweep
from twinproxy.dashboard.progress import Progress
from twinproxy.dashboard.runner import sweep_options
from twinproxy.dashboard.sentinels import SentinelAdmin, auth_options
from twinproxy.dashboard.servers import HealthPoller, ServerAdmin, ServerAuthRefused, ServerRefused, unanswered
from twinproxy.protocols.resp import encode_command

SERVER = "10.0.0.1:6379"
PASSWORD = Credentials("Zq9-s3cret", "mover")      # an ACL user's (--redis-auth-user mover)


def cmd(*args: bytes) -> bytes:
    return encode_command(list(args))


class Far:
    """The Redis end of one connection the admin opened."""

    def __init__(self, reactor: MemoryReactorClock, pending: int = 1, address: str = SERVER) -> None:
        assert len(reactor.tcpClients) == pending, reactor.tcpClients
        host, port, factory, _, _ = reactor.tcpClients.pop(0)
        assert f"{host}:{port}" == address
        self.protocol = factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def written(self) -> bytes:
        return self.transport.value()

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def lose(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


class Outcome:
    def __init__(self, deferred: defer.Deferred) -> None:
        self.value: Any = None
        self.error: Any = None
        deferred.addCallbacks(self._value, self._error)

    def _value(self, value: Any) -> None:
        self.value = value

    def _error(self, failure: Failure) -> None:
        self.error = failure


@pytest.mark.parametrize("auth, words", [(Credentials("s3cret"), [b"AUTH", b"s3cret"]),
                                         (Credentials("s3 cret"), [b"AUTH", b"s3 cret"]),
                                         (Credentials("s3 cret", "mover"), [b"AUTH", b"mover", b"s3 cret"])])
def test_every_connection_authenticates_before_anything_is_written(auth: Credentials, words: List[bytes]) -> None:
    reactor = MemoryReactorClock()
    admin = ServerAdmin(reactor, 2.0, auth)
    first = Outcome(admin.command(SERVER, b"INFO", b"replication"))
    second = Outcome(admin.command(SERVER, b"DBSIZE"))
    far = Far(reactor)
    assert far.written() == cmd(*words)          # the commands wait for AUTH's answer
    far.send(b"+OK\r\n")
    assert far.written() == cmd(*words) + cmd(b"INFO", b"replication") + cmd(b"DBSIZE")
    far.send(b"$4\r\nrole\r\n:7\r\n")
    assert (first.value, second.value) == (b"role", 7)
    # Later commands go straight out on the authenticated connection; a new connection authenticates again.
    third = Outcome(admin.command(SERVER, b"PING"))
    assert far.written().endswith(cmd(*words) + cmd(b"INFO", b"replication") + cmd(b"DBSIZE") + cmd(b"PING"))
    far.send(b"+PONG\r\n")
    assert third.value == "PONG"
    far.lose()
    Outcome(admin.command(SERVER, b"PING"))
    assert Far(reactor).written() == cmd(*words)


def test_a_refused_password_fails_the_commands_unsent_and_says_so() -> None:
    reactor = MemoryReactorClock()
    admin = ServerAdmin(reactor, 2.0, PASSWORD)
    result = Outcome(admin.command(SERVER, b"SCAN", b"0"))
    far = Far(reactor)
    far.send(b"-WRONGPASS invalid username-password pair or user is disabled.\r\n")
    assert far.written() == cmd(b"AUTH", b"mover", b"Zq9-s3cret")         # SCAN never went out
    assert far.transport.disconnecting
    assert result.error.check(ServerAuthRefused) and result.error.check(ServerRefused)
    message = result.error.getErrorMessage()
    assert message.startswith(f"{SERVER} refused the dashboard's credentials (WRONGPASS invalid username-password")
    assert "SCAN 0 was not sent" in message and "--redis-auth-file" in message
    assert "Zq9" not in message
    assert unanswered(result.error.value) == message                # "group 1's master 10.0.0.1:6379 refused ..."
    # Asked again, it tries again on a new connection (the file may have been fixed and the dashboard restarted,
    # or the server's password changed back): nothing is cached.
    far.lose()
    again = Outcome(admin.command(SERVER, b"PING"))
    far = Far(reactor)
    far.send(b"+OK\r\n+PONG\r\n")
    assert again.value == "PONG"


def test_a_server_without_a_password_refusing_auth_runs_nothing() -> None:
    """Redis without requirepass refuses ``AUTH x`` but would run what follows: nothing follows until it is OK."""
    reactor = MemoryReactorClock()
    admin = ServerAdmin(reactor, 2.0, Credentials("s3cret"))
    result = Outcome(admin.command(SERVER, b"REPLICAOF", b"NO", b"ONE"))
    far = Far(reactor)
    far.send(b"-ERR AUTH <password> called without any password configured for the default user. Are you sure "
             b"your configuration is correct?\r\n")
    assert far.written() == cmd(b"AUTH", b"s3cret")
    assert result.error.check(ServerAuthRefused)


def test_replication_is_not_asked_again_after_a_refused_password() -> None:
    """(A connection closed under it after earlier answers is asked again once; a refusal is an answer.)"""
    reactor = MemoryReactorClock()
    admin = ServerAdmin(reactor, 2.0, Credentials("wrong"))
    result = Outcome(admin.replication(SERVER))
    Far(reactor).send(b"-WRONGPASS invalid username-password pair or user is disabled.\r\n")
    assert result.error.check(ServerAuthRefused) and reactor.tcpClients == []


def test_a_password_the_dashboard_was_not_given_is_named() -> None:
    reactor = MemoryReactorClock()
    admin = ServerAdmin(reactor, 2.0)
    result = Outcome(admin.command(SERVER, b"INFO", b"server"))
    far = Far(reactor)
    assert far.written() == cmd(b"INFO", b"server")                  # no credentials: nothing before it
    far.send(b"-NOAUTH Authentication required.\r\n")
    assert result.error.check(ServerAuthRefused)
    assert result.error.getErrorMessage() == (f"{SERVER} refused INFO server: NOAUTH Authentication required. (it "
                                              "wants a password: give the dashboard one with --redis-auth-file)")
    other = Outcome(admin.command(SERVER, b"GET", b"k"))
    far.send(b"-ERR wrong kind\r\n")
    assert other.error.check(ServerRefused) and not other.error.check(ServerAuthRefused)


def test_the_health_poll_authenticates_on_data_servers_not_on_sentinels() -> None:
    reactor = MemoryReactorClock()
    sentinel = "10.0.0.9:26379"
    poller = HealthPoller(reactor, "redis", lambda: [SERVER, sentinel], 1.0, auth=Credentials("s3cret"),
                          sentinels=lambda: [sentinel])
    poller.poll()
    data, watcher = Far(reactor, 2, SERVER), Far(reactor, 1, sentinel)
    assert data.written() == cmd(b"AUTH", b"s3cret") and watcher.written() == cmd(b"PING")
    data.send(b"-WRONGPASS invalid username-password pair or user is disabled.\r\n")
    health = poller.health[SERVER]
    assert not health.up and "refused the dashboard's credentials (WRONGPASS" in health.error
    poller.stop()


def test_the_arguments_migrate_gets_for_the_target() -> None:
    """``AUTH password`` (the whole password, spaces and all) or ``AUTH2 user password`` after REPLACE; the
    same words for the proxies' script."""
    assert migrate_options(None) == []
    assert migrate_options(Credentials("s3cret")) == [b"AUTH", b"s3cret"]
    assert migrate_options(Credentials("mover s3 cret")) == [b"AUTH", b"mover s3 cret"]
    assert migrate_options(Credentials("s3 cret", "mover")) == [b"AUTH2", b"mover", b"s3 cret"]
    assert migrate_arguments("10.0.0.2", 6380, 5000) == [b"10.0.0.2", b"6380", b"0", b"5000"]
    assert migrate_arguments("10.0.0.2", 6380, 5000, Credentials("s3cret", "mover")) == [
        b"10.0.0.2", b"6380", b"0", b"5000", b"AUTH2", b"mover", b"s3cret"]
    _, (count, tail) = ensure_moved_parts("10.0.0.2", 6380, 0, 5000, Credentials("s3cret", "mover"), 4096)
    assert count == 8 and tail.endswith(b"$5\r\nAUTH2\r\n$5\r\nmover\r\n$6\r\ns3cret\r\n")
    _, (count, tail) = ensure_moved_parts("10.0.0.2", 6380, 0, 5000, Credentials("s3 cret"), 4096)
    assert count == 7 and tail.endswith(b"$4\r\nAUTH\r\n$7\r\ns3 cret\r\n")
    # The big-key script that MIGRATEs a key whole passes them on too (ARGV 5 onwards, before KEYS).
    assert b"for i = 5, #ARGV do" in WHOLE


def test_the_sweep_authenticates_and_passes_the_credentials_to_migrate() -> None:
    reactor = MemoryReactorClock()
    sweep = Sweep(reactor, SERVER, "10.0.0.2:6380", 0, 511, Progress(), big_key_bytes=65536,
                  auth=Credentials("s3cret", "mover"))
    command = batch_command(sweep._batch_head, [b"k"])
    assert command[-8:] == [b"65536", b"10.0.0.2", b"6380", b"0", b"5000", b"AUTH2", b"mover", b"s3cret"]
    assert sweep.big._migrate_args == command[-7:]
    Outcome(sweep._admin.command(SERVER, b"DBSIZE"))
    Outcome(sweep._links.command(SERVER, b"SMEMBERS", b"x"))
    # Both of its admins (the batches' and the big keys' links) log in first.
    assert [Far(reactor, pending).written() for pending in (2, 1)] == [cmd(b"AUTH", b"mover", b"s3cret")] * 2
    plain = Sweep(reactor, SERVER, "10.0.0.2:6380", 0, 511, Progress())
    assert plain._batch_head[1:] == [b"10.0.0.2", b"6380", b"0", b"5000"]


def test_every_sweep_gets_the_dashboards_options() -> None:
    auth = Credentials("s3cret")
    assert sweep_options(SimpleNamespace(big_key_bytes=65536, redis_auth=auth)) == {
        "big_key_bytes": 65536, "auth": auth}
    assert sweep_options(SimpleNamespace()) == {"auth": None}


class _Sentinel:
    """An admin whose every command is answered at once; records them."""

    def __init__(self) -> None:
        self.sent: List[tuple] = []

    def command(self, address: str, *args: bytes) -> defer.Deferred:
        self.sent.append(args)
        return defer.succeed(b"OK")


@pytest.mark.parametrize("auth, options", [
    (None, []), (Credentials("s3cret"), [(b"auth-pass", b"s3cret")]),
    (Credentials("mover s3 cret"), [(b"auth-pass", b"mover s3 cret")]),
    (Credentials("s3 cret", "mover"), [(b"auth-user", b"mover"), (b"auth-pass", b"s3 cret")])])
def test_sentinel_is_given_the_masters_credentials(auth, options) -> None:
    assert auth_options(auth) == [(name.decode(), value.decode()) for name, value in options]
    admin = _Sentinel()
    sentinels = SentinelAdmin(MemoryReactorClock(), "shop", admin, master_auth=auth)
    Outcome(sentinels.monitor("10.0.0.9:26379", 1, "10.0.0.1:6379", 2))
    assert admin.sent[:2] == [(b"SENTINEL", b"REMOVE", b"shop-1"),
                              (b"SENTINEL", b"MONITOR", b"shop-1", b"10.0.0.1", b"6379", b"2")]
    assert admin.sent[2][:4] == (b"SENTINEL", b"SET", b"shop-1", b"down-after-milliseconds")
    assert admin.sent[3:] == [(b"SENTINEL", b"SET", b"shop-1", name, value) for name, value in options]
