"""The dashboard's view of the data servers: admin commands and health polling.

Owns :class:`ServerAdmin` (one :class:`~twinproxy.sentinel.client.CommandClient`
per Redis address, each command with its deadline, each connection
authenticated first when it has credentials; errors as
:class:`ServerError` naming the server: :class:`ServerRefused` for an error
reply — :class:`ServerAuthRefused` for refused or missing credentials —,
:class:`ServerUnreachable` for none, :class:`ServerDown` — one of
those — only when the server refused the connection or reset it before
answering anything, i.e. nothing runs there; a deadline that passed is never
that, since a slow live server may still have writes), :func:`memcache_version` (a one-shot
``version`` probe), :func:`resolve` (a host to the IP Sentinel and REPLICAOF
need) and :class:`HealthPoller`, which asks every server once a second
whether it is up and, for Redis, what it really is (``INFO replication``).
Everything runs in the reactor and never blocks it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from twisted.internet import defer
from twisted.internet import error as net_error
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from twinproxy.credentials import Credentials
from twinproxy.sentinel.client import CommandClient, CommandError
from twinproxy.sentinel.replies import Replication, ReplyError, parse_replication

Address = Tuple[str, int]


class ServerError(Exception):
    """A server did not answer, or answered with an error; the message names it."""


class ServerUnreachable(ServerError):
    """No reply: the connection failed, closed or the deadline passed (``why`` says which, see AdminClient)."""

    def __init__(self, message: str, why: str = "timeout") -> None:
        super().__init__(message)
        self.why = why


class ServerDown(ServerUnreachable):
    """Nothing listens there: the connection was refused, or reset before the server answered anything."""


class ServerRefused(ServerError):
    """The server answered with an error reply."""


class ServerAuthRefused(ServerRefused):
    """The server refused the dashboard's credentials (or asked for some it was not given): nothing ran there."""


AUTH_HINT = "every server of the cluster must accept the credentials in the dashboard's --redis-auth-file"


def unanswered(err: ServerError) -> str:
    """A check's failure after the server's role ("group 1's master ..."): it refused our credentials (the
    message says so, naming it) or did not answer."""
    return str(err) if isinstance(err, ServerAuthRefused) else f"does not answer: {err}"


def split_address(address: str) -> Address:
    """``"host:port"`` (``"[v6]:port"``) -> (host, port)."""
    host, _, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def resolve(reactor: Any, host: str) -> defer.Deferred:
    """The IP address of ``host`` (itself when it is one already)."""
    try:
        ipaddress.ip_address(host)
        return defer.succeed(host)
    except ValueError:
        pass

    def failed(failure: Failure) -> None:
        raise ServerUnreachable(f"cannot resolve {host}: {failure.getErrorMessage()}")

    return reactor.resolve(host).addErrback(failed)


class _AdminFactory(ClientFactory):
    noisy = False

    def __init__(self, client: "AdminClient") -> None:
        self.client = client

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.client._protocol()

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.client._connect_failed_with(reason)


class AdminClient(CommandClient):
    """A CommandClient that also says why its commands got no reply, in ``why`` (read by ServerAdmin).

    "refused": the connection was refused; "reset": it closed before the
    server answered anything on it; "lost": it closed after answers (the
    server may just have dropped an idle connection); "timeout": a deadline
    passed (connecting or waiting for a reply); "closed": closed by us.
    The errbacks run inside the failure that set it, so it is the reason of
    the command failing at that moment.
    """

    why = "timeout"
    _answered = False
    _authenticating = False           # AUTH sent, not answered yet: the commands wait behind it
    refusal: Optional[str] = None     # why the server refused our AUTH on the last connection

    def _connect(self) -> None:
        self._connecting = True
        host, port = self.address
        self._reactor.connectTCP(host, port, _AdminFactory(self), timeout=max(self.timeout, 0.1))

    def _connect_failed_with(self, reason: Failure) -> None:
        self.why = "refused" if reason.check(net_error.ConnectionRefusedError) else "timeout"
        self._connect_failed(reason.getErrorMessage())

    def _connected(self, protocol: Any) -> None:
        self._answered = False
        self.refusal = None
        # Nagle off: a small command after a big write (a big key's chunk, then its PEXPIRE) otherwise
        # waits for a delayed ACK (measured: a 204 MiB hash copied in 26.8 s instead of 3.3 s).
        transport = getattr(protocol, "transport", None)
        if transport is not None and hasattr(transport, "setTcpNoDelay"):
            transport.setTcpNoDelay(True)
        # Nothing is written behind AUTH until it is accepted: a server without a password refuses our AUTH
        # but would run what follows it, and a command reported refused must not have run.
        self._authenticating = self._auth is not None
        super()._connected(protocol)

    def _write_waiting(self) -> None:
        if not self._authenticating:
            super()._write_waiting()

    def _auth_answered(self, value: Any, protocol: Any) -> None:
        if protocol is not self._protocol_now:
            return
        if isinstance(value, ReplyError):
            self.refusal = value.message
            super()._auth_answered(value, protocol)     # drops the connection, failing what waits
            return
        self._authenticating = False
        self._write_waiting()

    def _reply(self, protocol: Any, raw: bytes) -> None:
        if protocol is self._protocol_now:
            self._answered = True
        super()._reply(protocol, raw)

    def _overdue(self) -> None:
        self.why = "timeout"
        self._authenticating = False
        super()._overdue()

    def _lost(self, protocol: Any, text: str) -> None:
        if protocol is self._protocol_now:
            self._authenticating = False
            self.why = "auth" if self.refusal is not None else "lost" if self._answered else "reset"
        super()._lost(protocol, text)

    def close(self) -> None:
        self.why = "closed"
        super().close()


class ServerAdmin:
    """Commands to Redis servers (and sentinels) by ``host:port``, one connection each.

    With ``auth`` (the cluster's :class:`~twinproxy.credentials.Credentials`) every connection
    sends ``AUTH`` first and nothing else until it is accepted; a refusal is
    :class:`ServerAuthRefused` for the commands that waited (none of them ran).
    The data servers' admin has the cluster's credentials, the sentinels' none.
    """

    def __init__(self, reactor: Any, timeout: float, auth: Optional[Credentials] = None) -> None:
        self._reactor = reactor
        self.timeout = timeout
        self._auth = auth
        self._clients: Dict[str, CommandClient] = {}

    def command(self, address: str, *args: bytes) -> defer.Deferred:
        """The decoded reply; ServerError when there is none in time or it is an error reply."""
        client = self._clients.get(address)
        if client is None:
            client = self._clients[address] = AdminClient(self._reactor, split_address(address), auth=self._auth,
                                                            timeout=self.timeout)
        name = b" ".join(args[:2]).decode("utf-8", "replace")

        def answered(value: Any) -> Any:
            if isinstance(value, ReplyError):
                if value.message.startswith("NOAUTH"):
                    raise ServerAuthRefused(f"{address} refused {name}: {value.message} (it wants a password: "
                                            "give the dashboard one with --redis-auth-file)")
                raise ServerRefused(f"{address} refused {name}: {value.message}")
            return value

        def failed(failure: Failure) -> None:
            failure.trap(CommandError)
            why = client.why
            if why == "auth":
                raise ServerAuthRefused(f"{address} refused the dashboard's credentials ({client.refusal}), so "
                                        f"{name} was not sent: {AUTH_HINT}")
            if why in ("refused", "reset"):
                raise ServerDown(f"{address} refuses connections ({name} not answered: "
                                 f"{failure.getErrorMessage()})", why)
            raise ServerUnreachable(f"{address} did not answer {name}: {failure.getErrorMessage()}", why)

        return client.command(*args).addCallbacks(answered, failed)

    @defer.inlineCallbacks
    def replication(self, address: str) -> Any:
        """``INFO replication`` of ``address`` as a :class:`Replication`.

        Asked again once, on a new connection, when the connection closed
        under it after earlier answers (a server dropping an idle client):
        that says nothing about the server yet.
        """
        try:
            text = yield self.command(address, b"INFO", b"replication")
        except ServerUnreachable as err:
            if err.why != "lost":
                raise
            text = yield self.command(address, b"INFO", b"replication")
        return parse_replication(text if isinstance(text, (bytes, str)) else b"")

    @defer.inlineCallbacks
    def replicate(self, address: str, master: Optional[str]) -> Any:
        """``REPLICAOF <master's ip> <port>`` on ``address``, or ``REPLICAOF NO ONE`` for None."""
        if master is None:
            yield self.command(address, b"REPLICAOF", b"NO", b"ONE")
            return
        host, port = split_address(master)
        ip = yield resolve(self._reactor, host)
        yield self.command(address, b"REPLICAOF", ip.encode(), str(port).encode())

    def forget(self, keep: Iterable[str]) -> None:
        """Close the connections to every address not in ``keep``."""
        keep = set(keep)
        for address in [a for a in self._clients if a not in keep]:
            self._clients.pop(address).close()

    def close(self) -> None:
        self.forget(())


class _Exchange(Protocol):
    """Sends one memcached text request and fires ``result`` with ``parse(answer so far)`` once that is not None."""

    def __init__(self, request: bytes, parse: Callable[[bytes], Any], result: defer.Deferred) -> None:
        self.request = request
        self.parse = parse
        self.result = result
        self.buffer = b""

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if self.result.called:
            return
        try:
            value = self.parse(self.buffer)
        except ServerError as err:
            self.result.errback(err)
        else:
            if value is None:
                return
            self.result.callback(value)
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:
        if not self.result.called:
            self.result.errback(ServerError("connection closed before the answer ended"))


class _ExchangeFactory(ClientFactory):
    noisy = False

    def __init__(self, request: bytes, parse: Callable[[bytes], Any], result: defer.Deferred) -> None:
        self.request = request
        self.parse = parse
        self.result = result

    def buildProtocol(self, addr: Any) -> Protocol:
        return _Exchange(self.request, self.parse, self.result)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if not self.result.called:
            self.result.errback(ServerError(reason.getErrorMessage()))


def with_deadline(reactor: Any, result: defer.Deferred, connector: Any, timeout: float,
                  overdue_text: str) -> defer.Deferred:
    """``result`` (fired by a one-shot text exchange over ``connector``), failed with ServerError(overdue_text)
    and the connection dropped when it has not fired within ``timeout`` seconds."""
    def overdue() -> None:
        if not result.called:
            result.errback(ServerError(overdue_text))
            connector.disconnect()

    call = reactor.callLater(timeout, overdue)

    def done(value: Any) -> Any:
        if call.active():
            call.cancel()
        return value

    return result.addBoth(done)


def memcache_exchange(reactor: Any, address: str, request: bytes, parse: Callable[[bytes], Any],
                      timeout: float) -> defer.Deferred:
    """One request on a connection of its own to the memcached at ``address``, bounded by ``timeout``.

    ``parse(answer so far)`` answers None until the answer is whole, then its
    value (or raises ServerError); errors name the server.
    """
    result: defer.Deferred = defer.Deferred()
    host, port = split_address(address)
    connector = reactor.connectTCP(host, port, _ExchangeFactory(request, parse, result), timeout=timeout)

    def named(value: Any) -> Any:
        if isinstance(value, Failure):
            raise ServerError(f"{address}: {value.getErrorMessage()}")
        return value

    return with_deadline(reactor, result, connector, timeout, f"no reply within {timeout:g}s").addBoth(named)


def _first_line(answer: bytes) -> Optional[str]:
    line, found, _ = answer.partition(b"\r\n")
    return line.decode("utf-8", "replace") if found else None


def memcache_version(reactor: Any, address: str, timeout: float) -> defer.Deferred:
    """The first line a memcached answers to ``version`` (ServerError naming it otherwise)."""
    return memcache_exchange(reactor, address, b"version\r\n", _first_line, timeout)


@dataclass(frozen=True)
class Health:
    """What the last poll of one server found.  ``role`` is what the server says it is."""

    up: bool
    role: Optional[str] = None          # "master" | "replica" | None (not known, or memcached)
    master: Optional[Address] = None    # whom a replica replicates
    link_up: bool = False
    offset: int = 0
    error: Optional[str] = None
    checked: float = 0.0


class Poller:
    """``poll()`` every ``period`` seconds on the reactor from :meth:`start` to :meth:`stop`.

    Each tick starts a round without waiting for the last (a server that
    times out must not slow the polls of the others); a poll that raises is
    logged and the loop goes on (a LoopingCall whose call raises stops for
    good).  :meth:`stop` closes ``self._admin``'s connections, failing the
    commands in flight so their polls end; ``_stopped`` tells late answers
    to drop themselves.
    """

    _log = Logger()
    _what = "poll"

    def __init__(self, reactor: Any, period: float, admin: "ServerAdmin") -> None:
        self._reactor = reactor
        self._period = period
        self._admin = admin
        self._loop: Optional[LoopingCall] = None
        self._stopped = False

    def poll(self) -> Any:
        raise NotImplementedError

    def start(self) -> None:
        self._stopped = False
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._reactor
        self._loop.start(self._period, now=True)

    def stop(self) -> None:
        self._stopped = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        self._admin.close()

    def _tick(self) -> None:
        try:
            self.poll()
        except Exception:  # noqa: BLE001 - logged: the next tick tries again
            self._log.failure("{what} failed", what=self._what)


class HealthPoller(Poller):
    """Polls every address ``addresses()`` names, every ``period`` seconds; ``health[addr]`` is the latest.

    The data servers are asked with ``auth``; the addresses ``sentinels()``
    names without it (a sentinel has credentials of its own).
    """

    _what = "health poll"

    def __init__(self, reactor: Any, protocol: str, addresses: Callable[[], Iterable[str]],
                 timeout: float, period: float = 1.0, on_change: Optional[Callable[[str, Health], None]] = None,
                 auth: Optional[Credentials] = None, sentinels: Callable[[], Iterable[str]] = lambda: ()) -> None:
        super().__init__(reactor, period, ServerAdmin(reactor, timeout, auth))
        self._sentinel_admin = ServerAdmin(reactor, timeout)
        self._sentinels = sentinels
        self._protocol = protocol
        self._addresses = addresses
        self._timeout = timeout
        self.on_change = on_change      # (address, Health) on a change of up or role
        self._polling: Dict[str, defer.Deferred] = {}
        self.health: Dict[str, Health] = {}

    def stop(self) -> None:
        super().stop()
        self._sentinel_admin.close()

    def poll(self) -> defer.Deferred:
        """One round over every address (one poll in flight per address at most); fires when all answered."""
        addresses = set(self._addresses())
        sentinels = addresses & set(self._sentinels())
        for gone in [a for a in self.health if a not in addresses]:
            del self.health[gone]
        self._admin.forget(addresses - sentinels)
        self._sentinel_admin.forget(sentinels)
        rounds: List[defer.Deferred] = []
        for address in sorted(addresses):
            pending = self._polling.get(address)
            if pending is None:
                pending = self._poll_one(address, self._sentinel_admin if address in sentinels else self._admin)
                if not pending.called:
                    self._polling[address] = pending
            rounds.append(pending)
        return defer.DeferredList(rounds, consumeErrors=True)

    @defer.inlineCallbacks
    def _poll_one(self, address: str, admin: ServerAdmin) -> Any:
        try:
            if self._protocol == "memcache":
                yield memcache_version(self._reactor, address, self._timeout)
                health = Health(up=True, checked=self._reactor.seconds())
            else:
                yield admin.command(address, b"PING")
                replication: Replication = yield admin.replication(address)
                role = {"master": "master", "slave": "replica"}.get(replication.role)
                health = Health(up=True, role=role, master=replication.master, link_up=replication.link_up,
                                offset=replication.offset, checked=self._reactor.seconds())
        except (ServerError, ValueError) as err:
            health = Health(up=False, error=str(err), checked=self._reactor.seconds())
        finally:
            self._polling.pop(address, None)
        if self._stopped:
            return
        before = self.health.get(address)
        if address in set(self._addresses()):
            self.health[address] = health
        if before is None or before.up != health.up or before.role != health.role:
            if before is not None or not health.up:
                self._log.info("server {server}: {state}", server=address,
                               state=("up as " + (health.role or "server")) if health.up
                               else f"down ({health.error})")
            if self.on_change is not None:
                self.on_change(address, health)


@defer.inlineCallbacks
def same_server(reactor: Any, one: Address, other: Address) -> Any:
    """Whether two (host, port) name the same server: equal ports and hosts resolving to the same IP."""
    if one[1] != other[1]:
        return False
    if one[0] == other[0]:
        return True
    try:
        first = yield resolve(reactor, one[0])
        second = yield resolve(reactor, other[0])
    except ServerError:
        return False
    return first == second


@defer.inlineCallbacks
def answers(reactor: Any, protocol: str, address: str, timeout: float) -> Any:
    """None when something answers a PING (Redis, any reply) or ``version`` (memcache) there, else why not."""
    if protocol == "memcache":
        try:
            yield memcache_version(reactor, address, timeout)
            return None
        except ServerError as err:
            return str(err)
    client = CommandClient(reactor, split_address(address), timeout=timeout)
    try:
        yield client.command(b"PING")     # an error reply is an answer too
        return None
    except CommandError as err:
        return str(err)
    finally:
        client.close()


@defer.inlineCallbacks
def replicates(admin: ServerAdmin, replica: str, seen: Replication, master: str,
               master_seen: Optional[Replication] = None) -> Any:
    """Whether ``replica`` (whose INFO is ``seen``) replicates ``master``.

    Yes when the replica names the master, or when the master lists the
    replica among its own (which also holds through NAT or a relay).
    """
    if seen.role != "slave":
        return False
    reactor = admin._reactor
    if seen.master is not None and (yield same_server(reactor, seen.master, split_address(master))):
        return True
    if master_seen is None:
        try:
            master_seen = yield admin.replication(master)
        except ServerError:
            return False
    host, port = split_address(replica)
    for link in master_seen.replicas:
        if link.port == port and (yield same_server(reactor, (link.host, link.port), (host, port))):
            return True
    return False
