"""What the dashboard tells Redis Sentinel (codis.md §7.1): each group's master, as ``<cluster>-<gid>``.

Owns :class:`SentinelAdmin`: ``SENTINEL MONITOR`` (after a ``REMOVE`` of
the same name, so a sentinel never keeps an old master under it) with
``SET`` of the failure-detection settings (and of the data servers'
credentials, ``auth-user``/``auth-pass``, when the dashboard has some), ``REMOVE`` of one group or of
all this cluster's names on a sentinel, the quorum (a majority of the
cluster's sentinel list), ``FLUSHCONFIG`` and ``naming`` (which sentinels
name a given master for a group: a promote checks a majority agrees before
releasing its slots).  The ``*_all`` helpers go over
every sentinel and report what failed instead of stopping at the first.
The proxies follow switches themselves (the Sentinel follower); nothing
here routes traffic.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

from twisted.internet import defer

from twinproxy.cluster.model import Topology
from twinproxy.credentials import Credentials
from twinproxy.dashboard.servers import ServerAdmin, ServerError, resolve, split_address
from twinproxy.sentinel.replies import parse_masters

Check = Optional[Callable[[], None]]


def auth_options(auth: Optional[Credentials]) -> List[Tuple[str, str]]:
    """``SENTINEL SET`` options that give a sentinel a master's credentials (``auth-pass``, after
    ``auth-user`` for an ACL user); none without."""
    if auth is None:
        return []
    if auth.user is None:
        return [("auth-pass", auth.password)]
    return [("auth-user", auth.user), ("auth-pass", auth.password)]


def quorum(sentinels: Sequence[str]) -> int:
    """A majority of the listed sentinels."""
    return len(sentinels) // 2 + 1


class SentinelAdmin:
    """Configures sentinels for one cluster's groups."""

    def __init__(self, reactor: Any, cluster: str, admin: ServerAdmin, down_after_ms: int = 5000,
                 failover_timeout_ms: int = 60000, parallel_syncs: int = 1, master_auth: Optional[Credentials] = None
                 ) -> None:
        self._reactor = reactor
        self.cluster = cluster
        self._admin = admin
        # The data servers' credentials: a sentinel must have them to watch a master with a password.
        self._master_auth = master_auth
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.parallel_syncs = parallel_syncs

    def name(self, gid: int) -> str:
        return f"{self.cluster}-{gid}"

    def _command(self, sentinel: str, *args: str) -> defer.Deferred:
        return self._admin.command(sentinel, *(arg.encode() for arg in args))

    @defer.inlineCallbacks
    def unmonitor(self, sentinel: str, gid: int) -> Any:
        """``SENTINEL REMOVE <cluster>-<gid>``; a name it does not monitor is fine."""
        try:
            yield self._command(sentinel, "SENTINEL", "REMOVE", self.name(gid))
        except ServerError as err:
            if "no such master" not in str(err).lower():
                raise

    @defer.inlineCallbacks
    def monitor(self, sentinel: str, gid: int, master: str, size: int) -> Any:
        """Make ``sentinel`` monitor ``master`` as the group's name, with quorum ``size``."""
        host, port = split_address(master)
        ip = yield resolve(self._reactor, host)
        name = self.name(gid)
        yield self.unmonitor(sentinel, gid)
        yield self._command(sentinel, "SENTINEL", "MONITOR", name, ip, str(port), str(size))
        yield self._command(sentinel, "SENTINEL", "SET", name, "down-after-milliseconds", str(self.down_after_ms),
                            "failover-timeout", str(self.failover_timeout_ms),
                            "parallel-syncs", str(self.parallel_syncs))
        for option in auth_options(self._master_auth):
            # One SET each, apart from the others: an error reply never echoes them.
            yield self._command(sentinel, "SENTINEL", "SET", name, *option)

    @defer.inlineCallbacks
    def names(self, sentinel: str) -> Any:
        """This cluster's master names that ``sentinel`` monitors."""
        reply = yield self._command(sentinel, "SENTINEL", "MASTERS")
        prefix = f"{self.cluster}-"
        return sorted(name for name in parse_masters(reply)
                      if name.startswith(prefix) and name[len(prefix):].isdigit())

    @defer.inlineCallbacks
    def forget_cluster(self, sentinel: str) -> Any:
        """``SENTINEL REMOVE`` every name of this cluster on ``sentinel``; returns the names removed."""
        removed = yield self.names(sentinel)
        for name in removed:
            yield self.unmonitor(sentinel, int(name.rpartition("-")[2]))
        yield self.flush(sentinel)
        return removed

    def flush(self, sentinel: str) -> defer.Deferred:
        return self._command(sentinel, "SENTINEL", "FLUSHCONFIG")

    @defer.inlineCallbacks
    def configure(self, sentinel: str, topology: Topology, sentinels: Sequence[str]) -> Any:
        """Monitor every group with a master on ``sentinel`` (quorum from ``sentinels``); raises on failure."""
        for group in topology.groups:
            if group.master is not None:
                yield self.monitor(sentinel, group.id, group.master, quorum(sentinels))
        yield self.flush(sentinel)

    @defer.inlineCallbacks
    def monitor_all(self, topology: Topology, gid: Optional[int] = None, before: Check = None) -> Any:
        """(Re)monitor the masters of ``gid`` (or of every group) on every listed sentinel; the problems.

        ``before()`` runs before each sentinel is told (what it raises ends the loop: a lost lock).
        """
        problems: List[str] = []
        for sentinel in topology.sentinels:
            if before is not None:
                before()
            try:
                for group in topology.groups:
                    if gid is not None and group.id != gid:
                        continue
                    if group.master is None:
                        yield self.unmonitor(sentinel, group.id)
                    else:
                        yield self.monitor(sentinel, group.id, group.master, quorum(topology.sentinels))
                yield self.flush(sentinel)
            except ServerError as err:
                problems.append(f"sentinel {sentinel}: {err}")
        return problems

    @defer.inlineCallbacks
    def unmonitor_all(self, sentinels: Sequence[str], gid: int, before: Check = None) -> Any:
        """``SENTINEL REMOVE`` the group's name on every sentinel; the problems (``before`` as in monitor_all)."""
        problems: List[str] = []
        for sentinel in sentinels:
            if before is not None:
                before()
            try:
                yield self.unmonitor(sentinel, gid)
                yield self.flush(sentinel)
            except ServerError as err:
                problems.append(f"sentinel {sentinel}: {err}")
        return problems

    @defer.inlineCallbacks
    def naming(self, sentinels: Sequence[str], gid: int, master: str) -> Any:
        """Which sentinels name ``master`` for the group (``GET-MASTER-ADDR-BY-NAME``); (them, what the others said)."""
        host, port = split_address(master)
        ip = yield resolve(self._reactor, host)
        agreeing: List[str] = []
        problems: List[str] = []
        for sentinel in sentinels:
            try:
                reply = yield self._command(sentinel, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name(gid))
            except ServerError as err:
                problems.append(f"sentinel {sentinel}: {err}")
                continue
            named = _address(reply)
            if named == (ip, port):
                agreeing.append(sentinel)
            else:
                shown = f"{named[0]}:{named[1]}" if named else "no master"
                problems.append(f"sentinel {sentinel} names {shown} for {self.name(gid)}, not {master}")
        return agreeing, problems

    @defer.inlineCallbacks
    def set_quorum_all(self, topology: Topology) -> Any:
        """Set every group's quorum to a majority of the current list on every sentinel; the problems."""
        problems: List[str] = []
        size = str(quorum(topology.sentinels))
        for sentinel in topology.sentinels:
            try:
                for group in topology.groups:
                    if group.master is not None:
                        yield self._command(sentinel, "SENTINEL", "SET", self.name(group.id), "quorum", size)
                yield self.flush(sentinel)
            except ServerError as err:
                problems.append(f"sentinel {sentinel}: {err}")
        return problems


def _address(reply: Any) -> Optional[Tuple[str, int]]:
    """``GET-MASTER-ADDR-BY-NAME``'s [ip, port] as (ip, port); None for a nil or anything else."""
    if not isinstance(reply, list) or len(reply) != 2:
        return None
    host, port = (item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item) for item in reply)
    return (host, int(port)) if port.isdigit() else None
