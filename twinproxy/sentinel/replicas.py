"""The replicas one Sentinel shard may read from, and the proxy's own check of each.

Owns: :class:`ReplicaSet` — the candidates the watcher found (listed by a
sentinel with flags exactly ``slave``, linked to the current master), one
:class:`~twinproxy.links.ServerLink` per candidate, and a check about every
second that the proxy runs itself, because a sentinel's view of a replica
lags up to 10 s: ``INFO replication`` and ``PING`` on the replica (a slave
of the current master, link up, not syncing, not loading) and the master's
``INFO replication`` for the replica's lag.  A replica is taken out at once
when it fails a read (a connection error, ``-LOADING``, ``-MASTERDOWN``), on
a Sentinel event about it, and when the master moves; it comes back only by
passing a check.  Picking is round-robin over the healthy ones.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from twisted.internet import defer
from twisted.logger import Logger

from twinproxy.backend import ERROR_REPLY
from twinproxy.config import PoolConfig, ServerSpec
from twinproxy.credentials import pool_credentials
from twinproxy.links import ServerLink
from twinproxy.pool import Server
from twinproxy.request import Request
from twinproxy.sentinel.client import CommandClient
from twinproxy.sentinel.decide import replica_problem
from twinproxy.sentinel.replies import Replication, ReplyError, parse_replication, replica_lag_ms, show_address

CHECK_EVERY = 1.0
# What a replica answers when it must not be read from now (the read was not executed).
UNFIT_REPLIES = (b"-LOADING", b"-MASTERDOWN")
# Taken out for this long at least after failing a read: a replica that
# refuses connections is not retried once per request.
COOL_DOWN = 1.0


class ReplicaCounters:
    __slots__ = ("replica_reads",)

    def __init__(self) -> None:
        self.replica_reads = 0


class ReplicaNode:
    """One replica: its link, its health and why."""

    def __init__(self, address: Tuple[str, int], link: ServerLink, client: Any) -> None:
        self.address = address
        self.label = show_address(address)
        self.link = link
        self.client = client
        self.healthy = False
        self.reason = "not checked yet"
        self.out_until = 0.0
        # Its last check found it a replica of the current master: a "master"
        # answer after that is a promotion, not a returning old master.
        self.was_slave = False


class ReplicaSet:
    """The replicas of one shard; reads pick among the healthy ones."""

    _log = Logger()

    def __init__(self, shard: Any, pool: Any, codec: Any, config: PoolConfig, reactor: Any) -> None:
        self._shard = shard
        self._pool = pool
        self._codec = codec
        self._reactor = reactor
        self.config = config
        self.counters = ReplicaCounters()
        self.nodes: List[ReplicaNode] = []
        self._healthy: List[ReplicaNode] = []
        self._turn = 0
        self._master: Optional[Tuple[str, int]] = None
        self._master_client: Optional[CommandClient] = None
        self._check_call: Any = None
        self._checking = False
        self._stopped = False
        self._next_early_check = 0.0
        # Links of replicas no longer listed, still draining (closed by stop()).
        self._draining: List[ServerLink] = []

    @property
    def healthy_count(self) -> int:
        return len(self._healthy)

    def reconfigure(self, codec: Any, config: PoolConfig, handshake_changed: bool) -> None:
        new_auth = pool_credentials(config) != pool_credentials(self.config)
        self._codec = codec
        self.config = config
        for node in self.nodes:
            node.link.reconfigure(codec, config, handshake_changed)
            if new_auth:   # the checks log in with the pool's password too
                node.client.close()
                node.client = self._check_client(node)
        if new_auth and self._master_client is not None:
            self._master_client.close()
            self._master_client = None
        self._schedule(0)

    # -- picking --------------------------------------------------------------

    def pick(self, include_master: bool = False) -> Optional[ReplicaNode]:
        """The next healthy replica, round-robin; None for "use the master"."""
        healthy = self._healthy
        count = len(healthy) + (1 if include_master else 0)
        if not healthy:
            return None
        self._turn = (self._turn + 1) % count
        return healthy[self._turn] if self._turn < len(healthy) else None

    # -- what the watcher says ------------------------------------------------

    def set_candidates(self, addresses: Sequence[Tuple[str, int]]) -> None:
        """The replicas a sentinel lists for the current master (already filtered)."""
        if self._stopped:
            return
        wanted = [address for address in addresses if address != self._master]
        known = {node.address: node for node in self.nodes}
        nodes = []
        for address in wanted:
            node = known.pop(address, None)
            nodes.append(node if node is not None else self._add(address))
        for node in known.values():
            self._drop(node)
        self.nodes = nodes
        self._refresh()
        if nodes:
            self._schedule(0)

    def master_confirmed(self, address: Tuple[str, int]) -> None:
        if address != self._master:
            self.master_moved(address)

    def master_moved(self, address: Tuple[str, int]) -> None:
        """Every replica is suspect until checked against the new master; the new master is none."""
        if self._stopped:
            return
        self._master = address
        if self._master_client is not None:
            self._master_client.close()
        self._master_client = None
        for node in list(self.nodes):
            if node.address == address:
                self.nodes.remove(node)
                self._drop(node)
            else:
                self._take_out(node, "the master moved", cut=False)
        self._refresh()

    def take_out(self, address: Tuple[str, int], reason: str) -> None:
        """A Sentinel event about this replica (down, converted, promoted)."""
        for node in self.nodes:
            if node.address == address:
                self._take_out(node, reason, cut=True)
                self._refresh()

    # -- nodes ----------------------------------------------------------------

    def _add(self, address: Tuple[str, int]) -> ReplicaNode:
        host, port = address
        label = show_address(address)
        spec = ServerSpec(name=f"{self._shard.name}/{label}", weight=1, host=host, port=port,
                          label=f"{self._shard.name}/{label}")
        link = ServerLink(Server(spec, -1), self._pool, self._codec, self.config, self._reactor)
        node = ReplicaNode(address, link, None)
        node.client = self._check_client(node)
        link.intercept = lambda request, how: self._read_failed(node, request, how)
        link.on_lost = lambda connection: self._lost(node)
        link.outbox = self._shard.master.outbox
        return node

    def _check_client(self, node: ReplicaNode) -> CommandClient:
        return CommandClient(self._reactor, node.address, pool_credentials(self.config), timeout=CHECK_EVERY,
                             on_lost=lambda: self._check_lost(node))

    def _check_lost(self, node: ReplicaNode) -> None:
        # Sentinel's promotion of a replica kills its clients: a check at once
        # sees the promotion before Sentinel announces it (a second later).
        # Only for a replica that was fine, and once a period: one that
        # accepts and closes (maxclients, protected mode) must not spin.
        now = self._reactor.seconds()
        if (node.healthy or node.was_slave) and now >= self._next_early_check:
            self._next_early_check = now + CHECK_EVERY
            self._schedule(0)

    def _drop(self, node: ReplicaNode) -> None:
        node.client.close()
        node.healthy = False
        drained = node.link.drain()
        if not drained.called:
            link = node.link
            self._draining.append(link)
            drained.addBoth(lambda _: self._draining.remove(link) if link in self._draining else None)

    def _take_out(self, node: ReplicaNode, reason: str, cut: bool) -> None:
        if node.healthy:
            self._log.info("pool {pool}: shard {shard}: replica {replica} not read from: {reason}",
                           pool=self._pool.name, shard=self._shard.name, replica=node.label, reason=reason)
        node.healthy = False
        node.reason = reason
        node.out_until = self._reactor.seconds() + COOL_DOWN
        if cut:
            # Reads in flight there are retried on the master (a read is safe to repeat).
            node.link.cut_over(node.link.target, f"replica {node.label} taken out: {reason}")

    def _refresh(self) -> None:
        self._healthy = [node for node in self.nodes if node.healthy]

    def _read_failed(self, node: ReplicaNode, request: Request, how: int) -> bool:
        reply = request.reply
        if how == ERROR_REPLY:
            if not reply.startswith(UNFIT_REPLIES):
                return False
            reason = reply[1:].split(b" ", 1)[0].decode("latin-1")
        else:
            reason = reply[1:].strip().decode("latin-1", "replace") or "connection failed"
        retry = not getattr(request, "retried", False)
        if retry:
            # Cleared first: taking the replica out fails the other reads on
            # it, and the frontend counts a request with a reply as answered.
            request.retried = True
            request.reply = None
        if node.healthy:
            self._take_out(node, reason, cut=True)
            self._refresh()
        if not retry:
            return False
        self._shard.read_again(request)   # a read is safe to repeat
        return True

    def _lost(self, node: ReplicaNode) -> None:
        if node.healthy:
            self._take_out(node, "connection lost", cut=False)
            self._refresh()

    # -- the checks -----------------------------------------------------------

    def _schedule(self, delay: float) -> None:
        if self._stopped or self._checking:
            return
        if self._check_call is not None and self._check_call.active():
            if delay > 0:
                return
            self._check_call.cancel()
        self._check_call = self._reactor.callLater(delay, self._check)

    def _check(self) -> None:
        self._check_call = None
        if self._stopped or not self.nodes or self._master is None:
            if self.nodes and not self._stopped:
                self._schedule(CHECK_EVERY)
            return
        self._checking = True
        if self._master_client is None:
            self._master_client = CommandClient(self._reactor, self._master, pool_credentials(self.config),
                                                timeout=CHECK_EVERY)
        master_info = self._master_client.command(b"INFO", b"replication")
        master_info.addCallbacks(_replication_or_none, lambda failure: None)
        nodes = list(self.nodes)
        answers = [defer.gatherResults([node.client.command(b"INFO", b"replication"),
                                        node.client.command(b"PING")], consumeErrors=True)
                   for node in nodes]
        done = defer.DeferredList([master_info, *answers], consumeErrors=True)
        done.addCallback(self._checked, nodes)
        done.addErrback(self._check_crashed)

    def _checked(self, results: List[Tuple[bool, Any]], nodes: List[ReplicaNode]) -> None:
        self._checking = False
        master_info = results[0][1] if results[0][0] else None
        now = self._reactor.seconds()
        master = self._master
        for node, (ok, value) in zip(nodes, results[1:]):
            if node not in self.nodes or master is None:
                continue
            problem, info = _problem(ok, value, node, master, master_info, self.config.max_replica_lag)
            unreachable = not ok
            if info is not None:
                if info.role == "master" and node.was_slave:
                    self._shard.fence(f"replica {node.label} says it is a master now (promoted)")
                node.was_slave = info.role == "slave" and info.master == master
            if problem is None and node.out_until > now:
                problem = node.reason
            if problem is None and not node.healthy:
                self._log.info("pool {pool}: shard {shard}: replica {replica} healthy: reading from it",
                               pool=self._pool.name, shard=self._shard.name, replica=node.label)
                node.healthy = True
                node.reason = ""
            elif problem is not None and node.healthy:
                # Unreachable: reads in flight there may never be answered
                # (a frozen replica, a pool without timeout): retried elsewhere.
                self._take_out(node, problem, cut=unreachable)
            elif problem is not None:
                node.reason = problem
        self._refresh()
        self._schedule(CHECK_EVERY)

    def _check_crashed(self, failure: Any) -> None:
        self._checking = False
        self._log.failure("pool {pool}: shard {shard}: checking replicas failed", failure,
                          pool=self._pool.name, shard=self._shard.name)
        self._schedule(CHECK_EVERY)

    # -- life -----------------------------------------------------------------

    def stop(self, drain: bool = False) -> List[defer.Deferred]:
        """End the checks and close every replica link (``drain``: after what was sent is answered)."""
        self._stopped = True
        if self._check_call is not None and self._check_call.active():
            self._check_call.cancel()
        self._check_call = None
        if self._master_client is not None:
            self._master_client.close()
        closing = [link.drain() if drain else link.stop() for link in self._draining]
        self._draining = []
        for node in self.nodes:
            node.client.close()
            closing.append(node.link.drain() if drain else node.link.stop())
        self._healthy = []
        return closing

    def describe(self) -> Dict[str, str]:
        """Each replica and whether reads may go to it (or why not)."""
        return {node.label: ("healthy" if node.healthy else node.reason) for node in self.nodes}



def _replication_or_none(value: Any) -> Any:
    if isinstance(value, bytes):
        return parse_replication(value)
    return None


def _problem(ok: bool, value: Any, node: ReplicaNode, master: Tuple[str, int], master_info: Any,
             max_lag: int) -> Tuple[Optional[str], Optional[Replication]]:
    """(why reads must not go to ``node`` or None, its INFO replication if it answered)."""
    if not ok:
        return f"no answer to the health check ({_reason(value)})", None
    raw, pong = value
    if not isinstance(raw, bytes):
        return "INFO replication refused", None
    info = parse_replication(raw)
    if isinstance(pong, ReplyError):
        return pong.message.split(" ", 1)[0] + " (PING refused)", info
    lag = replica_lag_ms(master_info, *node.address) if master_info is not None else None
    return replica_problem(info, master, lag, max_lag), info


def _reason(failure: Any) -> str:
    value = getattr(failure, "value", failure)
    inner = getattr(value, "subFailure", None)
    if inner is not None:
        value = inner.value
    return str(value) or value.__class__.__name__
