"""One shard of a Sentinel pool: where its requests go while its master moves.

Owns: :class:`SentinelShard` — the target the ring gives for one server
name.  It routes writes (and reads under ``read_policy: master``) to the
confirmed master, reads to a healthy replica as the policy says, and holds
requests for at most ``failover_hold`` while no master is confirmed.  It
owns the switch itself: every connection to the old master is dropped at
once and what was in flight there fails as "outcome unknown" (a frozen old
master would answer ``+OK`` later and the write would be lost), never
retried; a request answered ``-READONLY``/``-MASTERDOWN``/``-LOADING`` was
not executed and is retried once on the master confirmed next.  It never
decides where the master is: :class:`~twinproxy.sentinel.watcher.SentinelWatcher`
does, from a majority of sentinels, and calls :meth:`SentinelShard.moving`
and :meth:`SentinelShard.confirm`.

::

    send --> confirmed? --read & policy--> ReplicaSet.pick() --> replica link
                 |                                   (fails, LOADING: take it out, retry on master)
                 +--------------------------------> master link
                 +-- no: held (FIFO, one timer) --> released on confirm, or -TRYAGAIN at the deadline
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from twisted.internet import defer
from twisted.logger import Logger

from twinproxy.backend import ERROR_REPLY, LOST
from twinproxy.config import PoolConfig, ServerSpec
from twinproxy.links import ServerLink
from twinproxy.protocols import resp
from twinproxy.request import Request
from twinproxy.sentinel.replicas import ReplicaSet
from twinproxy.sentinel.replies import show_address

# Replies that mean the node did not execute the command because it is not
# (or not yet) a writable master: safe to send again elsewhere.
NOT_EXECUTED = (b"-READONLY", b"-MASTERDOWN", b"-LOADING")
# A promoted replica fences its old master for this long at least, and after
# that until every sentinel answers naming it with no failover under way, up to the limit.
FENCE_GRACE = 0.5
FENCE_LIMIT = 10.0


class SentinelShard:
    """The target of one server name in a Sentinel pool."""

    _log = Logger()

    def __init__(self, server: Any, pool: Any, codec: Any, config: PoolConfig, reactor: Any,
                 trigger: Callable[[str], None]) -> None:
        self.server = server
        self.name = server.name
        self._pool = pool
        self._reactor = reactor
        self._trigger = trigger
        self.master = ServerLink(server, pool, codec, config, reactor)
        self.master.target = None      # nowhere until a majority of sentinels says where
        self.master.intercept = self._master_failed
        self.master.on_lost = self._master_lost
        self.master.shard = self
        self.replicas = ReplicaSet(self, pool, codec, config, reactor)
        server.send = self.send
        # Where the master is: confirmed (ROLE said master) or only chosen.
        self.address: Optional[Tuple[str, int]] = None
        self.epoch = -1
        self.run_id = ""
        self.confirmed = False
        self._confirmed_address: Optional[Tuple[str, int]] = None   # the last one ROLE confirmed
        self.switches = 0
        self.last_switch = 0.0
        self._held: Deque[Tuple[float, Request]] = deque()
        self._hold_call: Any = None
        # (address, since): that master is not confirmed again for now (see fence).
        self._fenced: Tuple[Optional[Tuple[str, int]], float] = (None, 0.0)
        # Moves on at every suspicion: a ROLE answer asked for before it is stale.
        self.generation = 0
        self.removed = False
        self._configure(config)

    def _configure(self, config: PoolConfig) -> None:
        self.config = config
        self._hold = config.failover_hold / 1000.0
        self._policy = config.read_policy
        self._tryagain = resp.error(f"TRYAGAIN no confirmed master for shard '{self.name}' within "
                                    f"{config.failover_hold} ms (failover in progress?)")
        self._no_replica = resp.error(f"ERR no healthy replica for shard '{self.name}' (read_policy: replica)")

    def reconfigure(self, codec: Any, config: PoolConfig, handshake_changed: bool) -> None:
        self._configure(config)
        self.master.reconfigure(codec, config, handshake_changed)
        self.replicas.reconfigure(codec, config, handshake_changed)

    @property
    def role(self) -> str:
        return "master" if self.confirmed else "unconfirmed"

    # -- routing --------------------------------------------------------------

    def send(self, request: Request) -> None:
        if self._policy != "master":
            command = request.command
            if command is not None and command.readonly:
                self._send_read(request)
                return
        if self.confirmed:
            self.master.send(request)
        else:
            self._hold_request(request)

    def _send_read(self, request: Request) -> None:
        policy = self._policy
        if policy == "prefer-master" and self.confirmed:
            self.master.send(request)
            return
        node = self.replicas.pick(include_master=policy == "any" and self.confirmed)
        if node is not None:
            self.replicas.counters.replica_reads += 1
            node.link.send(request)
        elif policy == "replica":
            self._answer(request, self._no_replica)
        elif self.confirmed:
            self.master.send(request)
        else:
            self._hold_request(request)

    def read_again(self, request: Request) -> None:
        """A replica could not serve a read: another healthy replica, or the master, as the policy says."""
        self._send_read(request)

    # -- holding --------------------------------------------------------------

    def _hold_request(self, request: Request) -> None:
        self._held.append((self._reactor.seconds() + self._hold, request))
        if self._hold_call is None:
            self._hold_call = self._reactor.callLater(self._hold, self._hold_overdue)

    def _hold_overdue(self) -> None:
        self._hold_call = None
        now = self._reactor.seconds()
        held = self._held
        while held and held[0][0] <= now + 1e-6:
            _, request = held.popleft()
            self._pool.counters.forward_error += 1
            self._answer(request, self._tryagain)
        if held:
            self._hold_call = self._reactor.callLater(held[0][0] - now, self._hold_overdue)

    def _release(self) -> None:
        if self._hold_call is not None and self._hold_call.active():
            self._hold_call.cancel()
        self._hold_call = None
        held, self._held = self._held, deque()
        for _, request in held:
            self.send(request)

    def _answer(self, request: Request, reply: bytes) -> None:
        request.reply = reply
        try:
            request.owner.request_done(request)
        except Exception:  # noqa: BLE001 - one request's bug must not stop the others
            self._log.failure("pool {pool}: shard {shard}: completing a request failed",
                              pool=self._pool.name, shard=self.name)

    @property
    def held_count(self) -> int:
        return len(self._held)

    # -- the master moves (called by the watcher) -----------------------------

    def moving(self, address: Tuple[str, int], epoch: int, run_id: str) -> None:
        """A majority of sentinels names ``address`` (at ``epoch``): stop using the old master now.

        Requests wait (``failover_hold`` at most) until :meth:`confirm`.
        """
        old = self.address
        if old is not None and old != address:
            text = (f"failover: shard '{self.name}' master moved from {show_address(old)} to "
                    f"{show_address(address)}: outcome unknown (the request may or may not have been executed)")
            failed = self.master.cut_over(_target(self.server, address), text)
            self._log.info("pool {pool}: shard {shard}: a majority of sentinels names {new} (epoch {epoch}), "
                           "not {old}: connections to {old} closed, {failed} requests in flight there failed "
                           "(outcome unknown)", pool=self._pool.name, shard=self.name, new=show_address(address),
                           epoch=epoch, old=show_address(old), failed=failed)
            self.replicas.master_moved(address)
        elif old is None:
            self.master.target = _target(self.server, address)
        if address != self.address:
            self.generation += 1
            self.run_id = run_id   # even empty: the old node's id must not stick to the new address
        elif run_id:
            self.run_id = run_id
        self.address = address
        self.epoch = max(self.epoch, epoch)
        self.confirmed = False

    def confirm(self, address: Tuple[str, int], epoch: int, run_id: str) -> None:
        """``address`` answered ROLE as a master: route to it and release what waits."""
        if address != self.address:
            self.moving(address, epoch, run_id)
        if not self.confirmed:
            before = self._confirmed_address
            if before is None:
                self._log.info("pool {pool}: shard {shard}: master is {new} (epoch {epoch})",
                               pool=self._pool.name, shard=self.name, new=show_address(address), epoch=epoch)
            elif before != address:
                self.switches += 1
                self.last_switch = time.time()
                self._log.warn("pool {pool}: shard {shard}: master switched from {old} to {new} (epoch {epoch})",
                               pool=self._pool.name, shard=self.name, old=show_address(before),
                               new=show_address(address), epoch=epoch)
            self._confirmed_address = address
        self.epoch = max(self.epoch, epoch)
        self.run_id = run_id or self.run_id
        self.confirmed = True
        self.replicas.master_confirmed(address)
        if self.config.preconnect:
            self.master.preconnect(self.master.codec.default_dialect)
        self._release()

    def fence(self, reason: str) -> None:
        """A replica of this master was promoted: its writes would be lost, so hold them.

        Sentinel promotes first and announces one to three seconds later;
        meanwhile the old master still answers ROLE as a master.  It is not
        confirmed again until every sentinel has answered naming it, none
        reporting the failover under way (and a short grace has passed, for
        the flag to show): a promotion that was no failover (an operator's
        ``REPLICAOF NO ONE``) costs only the grace.
        """
        self._fenced = (self.address, self._reactor.seconds())
        self.suspect(reason)

    @property
    def fencing(self) -> bool:
        """Is the address the shard would route to fenced (see :meth:`fence`)?"""
        return self._fenced[0] is not None and self._fenced[0] == self.address

    def may_confirm(self, address: Tuple[str, int], failover_running: bool, unanimous: bool = True) -> bool:
        """May ``address`` be confirmed as this shard's master now (see :meth:`fence`)?

        A fenced address only once every configured sentinel has answered and
        named it at one epoch (``unanimous``) with none reporting a failover:
        the leader of a failover is the only sentinel that flags it, and the
        others still name the old master until the leader announces the switch,
        so a majority's answer lifts nothing.  ``FENCE_LIMIT`` bounds the wait.
        """
        fenced, since = self._fenced
        if address != fenced:
            return True
        elapsed = self._reactor.seconds() - since
        if elapsed < FENCE_LIMIT and (elapsed < FENCE_GRACE or failover_running or not unanimous):
            return False
        self._fenced = (None, 0.0)
        return True

    def suspect(self, reason: str) -> None:
        """The master said it is not writable: hold new requests until the watcher confirms one."""
        self.generation += 1
        if self.confirmed:
            self._log.info("pool {pool}: shard {shard}: master {address} {reason}; looking again",
                           pool=self._pool.name, shard=self.name, address=show_address(self.address), reason=reason)
            self.confirmed = False
        self._trigger(f"shard {self.name}: {reason}")

    # -- what the links report ------------------------------------------------

    def _master_failed(self, request: Request, how: int) -> bool:
        if how == LOST:
            return False   # the outcome is unknown: never sent again
        reply = request.reply
        if how == ERROR_REPLY:
            if not reply.startswith(NOT_EXECUTED):
                return False
            word = reply[1:reply.find(b" ")].decode("latin-1") if b" " in reply else "an error"
            reason = f"answered {word}"
        else:   # never written: the master could not be reached (down, or moving)
            reason = f"unreachable ({reply[1:].strip().decode('latin-1', 'replace')})"
        if self.confirmed or how == ERROR_REPLY:
            self.suspect(reason)
        if getattr(request, "retried", False):
            return False
        request.retried = True
        request.reply = None   # not answered yet: the frontend sends replies in order as they are set
        self._hold_request(request)
        return True

    def _master_lost(self, connection: Any) -> None:
        if self.confirmed:
            self._trigger(f"shard {self.name}: connection to master {show_address(self.address)} lost")

    # -- life -----------------------------------------------------------------

    def stop(self) -> List[defer.Deferred]:
        """Close everything: the master link, the replica links and their checks; fail what is held."""
        self._answer_held(resp.error("ERR server connection closed by the proxy"))
        return [*self.replicas.stop(), self.master.stop()]

    def drain(self) -> defer.Deferred:
        """The shard left the pool: answer what is held; what was sent gets its reply, then all closes."""
        self.removed = True
        self.confirmed = False
        self._answer_held(resp.error(f"ERR shard '{self.name}' left the pool (reload) before its request "
                                     "was sent"))
        return defer.gatherResults([*self.replicas.stop(drain=True), self.master.drain()])

    def _answer_held(self, reply: bytes) -> None:
        if self._hold_call is not None and self._hold_call.active():
            self._hold_call.cancel()
        self._hold_call = None
        held, self._held = self._held, deque()
        for _, request in held:
            self._answer(request, reply)

    def stats(self) -> Dict[str, Any]:
        return {
            "address": show_address(self.address) if self.address is not None else "",
            "sentinel_epoch": max(self.epoch, 0),
            "switches": self.switches,
            "last_switch": int(self.last_switch),
            "role": self.role,
            "replicas_healthy": self.replicas.healthy_count,
            "replica_reads": self.replicas.counters.replica_reads,
            "held": len(self._held),
        }


def _target(server: Any, address: Tuple[str, int]) -> ServerSpec:
    host, port = address
    return ServerSpec(name=server.name, weight=server.spec.weight, host=host, port=port, label=server.spec.label)
