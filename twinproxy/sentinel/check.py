"""A blocking probe of one pool's sentinels and chosen masters, for use off the
reactor: the command-line check, start-up before the reactor runs, and a
thread at reload.  It owns a tiny RESP client on plain sockets, the report it
builds, its text form, and which of its problems must refuse a start or a
reload.
"""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from twinproxy.config import ConfigError, load_file
from twinproxy.credentials import Credentials, pool_credentials, sentinel_credentials
from twinproxy.protocols.resp import encode_command as encode_arguments
from twinproxy.sentinel.decide import Choice, choose_master, majority
from twinproxy.sentinel.replies import (
    IncompleteReplyError,
    MasterView,
    ReplicaView,
    ReplyError,
    decode_prefix,
    parse_masters,
    parse_replicas,
    parse_role,
    show_address,
)

__all__ = [
    "Client", "PoolReport", "SentinelReport", "ServerReport", "auth_command", "encode_command", "fatal_problems",
    "format_report", "probe_pool", "unmonitored_names",
]

Address = Tuple[str, int]

# A reply larger than this is not one we asked for: stop rather than buffer without end.
MAX_REPLY = 64 * 1024 * 1024
# Probes run in parallel (sentinels, then masters) so that each step costs about one timeout.
MAX_THREADS = 16


def encode_command(*args: Any) -> bytes:
    """One command as a RESP array of bulk strings (non-bytes arguments as their text)."""
    return encode_arguments([arg if isinstance(arg, bytes) else str(arg).encode() for arg in args])


def auth_command(auth: Credentials) -> Tuple[str, ...]:
    """``AUTH`` for ``auth`` (the password whole, after the ACL user if there is one)."""
    return tuple(part.decode() for part in auth.auth_arguments())


class Client:
    """One blocking connection; each command must be answered within ``timeout`` seconds."""

    def __init__(self, address: Address, timeout: float = 1.0, auth: Optional[Credentials] = None) -> None:
        self.address = address
        self.timeout = timeout
        self._buffer = b""
        self._sock = socket.create_connection(address, timeout=timeout)
        try:
            if auth is not None:
                reply = self.command(*auth_command(auth))
                if isinstance(reply, ReplyError):
                    raise ConnectionError(f"AUTH refused: {reply.message}")
        except BaseException:
            self.close()
            raise

    def command(self, *args: Any) -> Any:
        """Send one command and return its decoded reply (an error reply is returned, not raised)."""
        # One deadline for the whole exchange, so a peer that drips bytes cannot stretch it.
        deadline = time.monotonic() + self.timeout
        self._sock.settimeout(self.timeout)
        self._sock.sendall(encode_command(*args))
        while True:
            if self._buffer:
                try:
                    value, end = decode_prefix(self._buffer)
                except IncompleteReplyError:
                    pass
                else:
                    self._buffer = self._buffer[end:]
                    return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("timed out")
            self._sock.settimeout(remaining)
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed by the peer")
            self._buffer += chunk
            if len(self._buffer) > MAX_REPLY:
                raise ValueError("reply too large")

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _failure(err: BaseException) -> str:
    if isinstance(err, socket.timeout):
        return "timed out"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    return str(err) or type(err).__name__


def _reply_text(reply: Any) -> str:
    if isinstance(reply, ReplyError):
        return reply.message
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)


@dataclass
class SentinelReport:
    """What one sentinel answered: ``masters`` is None when it did not answer."""

    address: Address
    answered: bool = False
    error: str = ""
    masters: Optional[Dict[str, MasterView]] = None
    quorum: Dict[str, str] = field(default_factory=dict)
    quorum_ok: Dict[str, bool] = field(default_factory=dict)
    replicas: Dict[str, List[ReplicaView]] = field(default_factory=dict)


@dataclass
class ServerReport:
    """One pool server (a sentinel master name): the choice and what was found about it."""

    name: str
    choice: Optional[Choice] = None
    reason: str = ""
    role: str = ""
    role_error: str = ""
    quorum: str = ""
    replicas: List[ReplicaView] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)
    # A majority answered and not one of them monitors this name.
    unmonitored: bool = False


@dataclass
class PoolReport:
    """Everything ``probe_pool`` found for one pool; ``problems`` lists all of it that is wrong."""

    name: str
    sentinels: List[SentinelReport]
    servers: List[ServerReport]
    answered: int
    needed: int
    problems: List[str] = field(default_factory=list)


def _ask_sentinel(address: Address, names: Sequence[str], timeout: float,
                  auth: Optional[Credentials]) -> SentinelReport:
    report = SentinelReport(address)
    try:
        with Client(address, timeout, auth) as client:
            reply = client.command("SENTINEL", "MASTERS")
            if isinstance(reply, ReplyError):
                report.error = reply.message
                return report
            report.masters = parse_masters(reply)
            report.answered = True
            for name in names:
                if name not in report.masters:
                    continue
                quorum = client.command("SENTINEL", "CKQUORUM", name)
                report.quorum[name] = _reply_text(quorum)
                report.quorum_ok[name] = not isinstance(quorum, ReplyError)
                replicas = client.command("SENTINEL", "REPLICAS", name)
                if not isinstance(replicas, ReplyError):
                    report.replicas[name] = parse_replicas(replicas)
    except (OSError, ValueError) as err:
        # A sentinel that fails half-way still counts for MASTERS if that arrived.
        report.error = _failure(err)
    return report


def _role_of(address: Address, timeout: float, auth: Optional[Credentials]) -> Tuple[str, str]:
    """The ROLE kind at ``address`` and an error text (one of the two is empty)."""
    try:
        with Client(address, timeout, auth) as client:
            reply = client.command("ROLE")
        return parse_role(reply).kind, ""
    except (OSError, ValueError) as err:
        return "", _failure(err)


def _server_names(config: Any) -> List[str]:
    names: List[str] = []
    for server in config.servers:
        if server.name not in names:
            names.append(server.name)
    return names


def probe_pool(config: Any, timeout: float = 1.0) -> PoolReport:
    """Ask every sentinel of ``config`` about every server name, choose masters and ROLE them.

    ``config`` needs ``.name``, ``.sentinels`` ((host, port) pairs),
    ``.sentinel_auth``, ``.servers`` (each with ``.name``) and
    ``.redis_auth`` (with ``.redis_auth_user``).  Sentinels are asked in parallel, so the probe takes
    about one ``timeout`` per step even with frozen sentinels.
    """
    addresses = [tuple(address) for address in config.sentinels]
    names = _server_names(config)
    sentinel_auth = sentinel_credentials(getattr(config, "sentinel_auth", None))
    redis_auth = pool_credentials(config)
    if addresses:
        with ThreadPoolExecutor(max_workers=min(len(addresses), MAX_THREADS)) as pool:
            sentinels = list(pool.map(lambda a: _ask_sentinel(a, names, timeout, sentinel_auth), addresses))
    else:
        sentinels = []
    answered = sum(1 for s in sentinels if s.answered)
    needed = majority(len(addresses))
    report = PoolReport(config.name, sentinels, [], answered, needed)
    if not addresses:
        report.problems.append("no sentinels configured")
    elif answered < needed:
        report.problems.append(f"only {answered} of {len(addresses)} sentinels answered (need {needed})")
    for sentinel in sentinels:
        if not sentinel.answered:
            report.problems.append(f"sentinel {show_address(sentinel.address)} did not answer: {sentinel.error}")
        elif sentinel.error:
            report.problems.append(f"sentinel {show_address(sentinel.address)} failed after SENTINEL MASTERS: "
                                   f"{sentinel.error}")
    answers = [s.masters if s.answered else None for s in sentinels]
    report.servers = [_check_server(name, sentinels, answers, len(addresses), answered >= needed) for name in names]
    _check_roles(report.servers, timeout, redis_auth)
    for server in report.servers:
        report.problems.extend(f"server {server.name}: {problem}" for problem in server.problems)
    return report


def _check_server(name: str, sentinels: List[SentinelReport], answers: list, count: int,
                  enough: bool) -> ServerReport:
    server = ServerReport(name)
    server.choice, server.reason = choose_master(name, answers, count)
    knowing = [s for s in sentinels if s.masters is not None and name in s.masters]
    if enough and not knowing:
        server.unmonitored = True
        server.problems.append(server.reason)
        return server
    if server.choice is None and enough:
        server.problems.append(f"no master chosen: {server.reason}")
    knowing_ids = {id(s) for s in knowing}
    for sentinel in sentinels:
        if sentinel.answered and id(sentinel) not in knowing_ids:
            server.problems.append(f"sentinel {show_address(sentinel.address)} does not monitor '{name}'")
        elif sentinel.answered and not sentinel.quorum_ok.get(name, True):
            server.problems.append(f"sentinel {show_address(sentinel.address)}: {sentinel.quorum[name]}")
    # Quorum and replicas as told by a sentinel that agrees with the choice, if any.
    agreeing = [s for s in knowing if server.choice is not None
                and (s.masters[name].epoch, s.masters[name].address) == (server.choice.epoch, server.choice.address)]
    source = (agreeing or knowing or [None])[0]
    if source is not None:
        server.quorum = source.quorum.get(name, "")
        server.replicas = list(source.replicas.get(name, []))
    return server


def _check_roles(servers: List[ServerReport], timeout: float, redis_auth: Optional[Credentials]) -> None:
    """ROLE every chosen master, in parallel so that frozen masters cost one timeout in all."""
    chosen = [server for server in servers if server.choice is not None]
    if not chosen:
        return
    with ThreadPoolExecutor(max_workers=min(len(chosen), MAX_THREADS)) as pool:
        roles = list(pool.map(lambda server: _role_of(server.choice.address, timeout, redis_auth), chosen))
    for server, (role, error) in zip(chosen, roles):
        server.role, server.role_error = role, error
        where = show_address(server.choice.address)
        if server.role_error:
            server.problems.append(f"ROLE on {where} failed: {server.role_error}")
        elif server.role != "master":
            # A failover is in flight (or sentinel lags): the proxy would re-query, the check reports.
            server.problems.append(f"{where} reports role {server.role}, not master")


def _describe_replica(replica: ReplicaView) -> str:
    flags = ",".join(sorted(replica.flags)) or "no flags"
    return f"{show_address(replica.address)} ({flags}, link {'ok' if replica.link_ok else 'err'})"


def format_report(report: PoolReport) -> str:
    """The report as human-readable lines (no trailing newline)."""
    lines = [f"pool {report.name}: {report.answered} of {len(report.sentinels)} sentinels answered "
             f"(need {report.needed})"]
    for sentinel in report.sentinels:
        state = "ok" if sentinel.answered else f"no answer ({sentinel.error})"
        if sentinel.answered and sentinel.error:
            state = f"answered MASTERS, then failed ({sentinel.error})"
        lines.append(f"  sentinel {show_address(sentinel.address)}: {state}")
    for server in report.servers:
        if server.choice is None:
            lines.append(f"  server {server.name}: no master: {server.reason}")
            continue
        choice = server.choice
        role = server.role or f"unknown ({server.role_error})"
        replicas = ", ".join(_describe_replica(r) for r in server.replicas) or "none"
        lines.append(f"  server {server.name}: master {show_address(choice.address)} epoch {choice.epoch} "
                     f"({choice.agreeing}/{choice.answered} sentinels agree), role {role}, "
                     f"replicas {replicas}, quorum: {server.quorum or 'unknown'}")
    if report.problems:
        lines.append("problems:")
        lines.extend(f"  - {problem}" for problem in report.problems)
    else:
        lines.append("no problems")
    return "\n".join(lines)


def unmonitored_names(report: PoolReport) -> List[str]:
    """Server names that no sentinel monitors, judged only when a majority answered."""
    return [server.name for server in report.servers if server.unmonitored]


def fatal_problems(report: PoolReport) -> List[str]:
    """The problems that must refuse a start or reload.

    Only a name no answering sentinel monitors (with a majority answering) is
    a configuration mistake; unreachable sentinels, disagreement or a master
    mid-failover are states the running proxy keeps retrying through.
    """
    return [f"server {server.name}: {server.reason}" for server in report.servers if server.unmonitored]


def check_pools(pools: Sequence[Any], path: str, timeout: float = 1.0) -> None:
    """Refuse a pool file whose Sentinel pools name a master no sentinel monitors.

    Blocking: called before the reactor runs (start-up) or in a thread
    (reload).  Raises the usual one-line :class:`~twinproxy.config.ConfigError`.
    """
    for config in pools:
        if not config.sentinels:
            continue
        problems = fatal_problems(probe_pool(config, timeout))
        if problems:
            raise ConfigError(path, "; ".join(problems), config.name, "servers")


def load_checked(path: str) -> List[Any]:
    """:func:`~twinproxy.config.load_file`, then :func:`check_pools` (the start-up and reload check)."""
    pools = load_file(path)
    check_pools(pools, path)
    return pools
