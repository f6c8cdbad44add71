"""Each Redis group's confirmed master, as the migrations' sweeps need it, and Sentinel's failovers followed.

Owns :class:`MasterWatch` (the controller's ``masters``) and the pure
:func:`judge`.  Why it exists: a sweep (``mover``, ``bigkeys``) MIGRATEs
into the target group's master and deletes from the source group's.
Through a Sentinel failover either may be a *demoted* master: a replica
answers ``READONLY`` (nothing is lost), but a demoted master the sentinels
have not reconfigured yet (about 10 s after ``SENTINEL FAILOVER``) takes
the keys — and drops them when it resyncs from the new master.  So before
each command a sweep asks :meth:`MasterWatch.problem` about both masters
and waits while there is one (its text is the migration's ``error``).

A group's master ``M`` (the topology's first server) is confirmed when the
last check — started after any sign of trouble — found:

- ``M`` answering ``ROLE`` as a master;
- with sentinels listed, a majority naming ``M`` (the proxies' own rule,
  :func:`~twinproxy.sentinel.decide.choose_master`: the highest epoch a
  majority reports *with* the same address) and none reporting a failover
  of the group under way;
- no server that replicated ``M`` at the check before now saying it is a
  master (Sentinel promotes about a second before it announces the
  switch).  That fence is lifted as the proxies lift theirs
  (:meth:`~twinproxy.sentinel.shard.SentinelShard.may_confirm`): after
  0.5 s once every sentinel names ``M`` at one epoch, none failing over
  (at once after the grace without sentinels), after 10 s in any case, or
  when that server is a replica again.

Checks run every 0.25 s for the groups of a migration that has not ended
and every 1 s for the others (``ROLE`` on each server of the group,
``SENTINEL MASTERS`` on each sentinel — one per round, shared by the
round's groups — every command bounded by :data:`QUERY_TIMEOUT`), at most
one check of a group in flight, so a slow server delays only its own
group's checks; at once when a connection to one of their servers
closes (a promotion or a demotion closes every client) or a sweep's
command was refused as by no writable master (:meth:`refused`).

Following: when a majority of sentinels names another server ``S`` of the
group (never at an epoch below one followed before), none failing over,
and ``S`` answers ``ROLE`` as a master, the watch writes ``S`` as the
group's master (``Topology.promote(gid, S, sentinel_failover=True)``: the
group reordered, nothing else) as one of the controller's operations and
waits for the proxies — which follow Sentinel by themselves already; the
topology catches up, and a sweep on the old master stops and starts again
on the new one.  A master Sentinel names that is no server of the group is
not followed (the problem says so).  Runs in the reactor, never blocking it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from twinproxy.dashboard.servers import AdminClient, ServerAdmin, ServerError, resolve, split_address
from twinproxy.sentinel.client import CommandClient
from twinproxy.sentinel.decide import choose_master
from twinproxy.sentinel.replies import MasterView, Role, parse_masters, parse_role, show_address
from twinproxy.sentinel.shard import FENCE_GRACE, FENCE_LIMIT

if TYPE_CHECKING:
    from twinproxy.dashboard.controller import Controller

PERIOD = 0.25          # seconds between two checks of a migration's groups
IDLE_PERIOD = 1.0      # of the other groups
QUERY_TIMEOUT = 1.0    # seconds for each ROLE and SENTINEL MASTERS
# A sweep's refusal that says a server is no writable master (now): look again at once.
NOT_WRITABLE = ("READONLY", "NOREPLICAS", "MASTERDOWN", "LOADING")

Address = Tuple[str, int]
Answers = Sequence[Optional[Mapping[str, MasterView]]]


@dataclass(frozen=True)
class Verdict:
    """One check of one group: ``problem`` None when its master is confirmed."""

    problem: Optional[str] = None
    follow: Optional[str] = None      # a server of the group Sentinel made master: the topology follows it
    epoch: int = -1                   # the epoch a majority of sentinels agreed on (-1: none, or no sentinels)
    lift: bool = False                # the fence (a promoted replica) may be lifted


def judge(gid: int, name: str, master: str, servers: Mapping[str, Address], roles: Mapping[str, Any],
          answers: Optional[Answers], floor_epoch: int = -1, fenced: Optional[str] = None,
          fence_age: float = 0.0) -> Verdict:
    """Whether group ``gid``'s topology master ``master`` is confirmed now (pure).

    ``servers``: the group's addresses as listed -> (ip, port), as Sentinel
    and ROLE name them; ``roles``: address -> its parsed ROLE (a
    :class:`Role`) or why there is none (a string); ``answers``: None
    without sentinels, else one parsed ``SENTINEL MASTERS`` (or None: no
    answer) per listed sentinel; ``name``: the group's Sentinel name;
    ``fenced``: a server that replicated ``master`` and says it is a master
    now, for ``fence_age`` seconds.
    """
    where = f"group {gid}'s master {master}"
    choice = None
    if answers is not None:
        choice, why = choose_master(name, answers, len(answers), floor_epoch)
        if choice is None:
            return Verdict(f"Sentinel does not confirm {where}: {why}")
        if any(answer is not None and name in answer and answer[name].failover_in_progress for answer in answers):
            return Verdict(f"a sentinel reports a failover of group {gid} ({name}) under way", epoch=choice.epoch)
        named = next((address for address in sorted(servers) if servers[address] == choice.address), None)
        shown = f"{show_address(choice.address)} (epoch {choice.epoch})"
        if named is None:
            return Verdict(f"Sentinel names {shown} as the master of group {gid} ({name}), which is no server "
                           "of the group", epoch=choice.epoch)
        if named != master:
            role = roles.get(named)
            if isinstance(role, Role) and role.kind == "master":
                return Verdict(f"Sentinel made {named} the master of group {gid} (epoch {choice.epoch}), not "
                               f"{master}: the topology follows it", follow=named, epoch=choice.epoch)
            return Verdict(f"Sentinel names {shown} as the master of group {gid}, which does not answer ROLE "
                           "as a master yet", epoch=choice.epoch)
    epoch = choice.epoch if choice is not None else -1
    role = roles.get(master)
    if not isinstance(role, Role):
        return Verdict(f"{where} does not answer ROLE ({role or 'not asked yet'})", epoch=epoch)
    if role.kind != "master":
        return Verdict(f"{where} reports role {'replica' if role.kind == 'slave' else role.kind}", epoch=epoch)
    if fenced is not None:
        unanimous = choice is None or choice.agreeing == len(answers or ())
        if fence_age < FENCE_LIMIT and (fence_age < FENCE_GRACE or not unanimous):
            return Verdict(f"{fenced}, a replica of {where}, says it is a master now (promoted?): waiting for "
                           "every sentinel to name the group's master", epoch=epoch)
        return Verdict(epoch=epoch, lift=True)
    return Verdict(epoch=epoch)


@dataclass
class _Group:
    """What the watch knows of one group under one master."""

    master: str
    verdict: Optional[Verdict] = None
    checked_in: int = 0                                 # the number of the round that gave ``verdict``
    replicas: Set[str] = field(default_factory=set)     # servers that replicated ``master`` at the last check
    fence: Optional[Tuple[str, float]] = None           # (a promoted replica, since)
    suspect: Optional[Tuple[int, str]] = None           # (rounds started by then, why): trouble seen since
    last: float = -1.0                                  # when its last check started
    # The highest epoch a majority named ``master`` at (or followed it at): a stale majority naming the
    # old master at a lower epoch right after a switch is not followed back.
    floor: int = -1


class MasterWatch:
    """The controller's view of each Redis group's confirmed master (see the module docstring)."""

    _log = Logger()

    def __init__(self, ctl: "Controller", period: float = PERIOD, idle_period: float = IDLE_PERIOD) -> None:
        self._ctl = ctl
        self._reactor = ctl.reactor
        self._period = period
        self._idle_period = idle_period
        self._sentinels = ServerAdmin(ctl.reactor, QUERY_TIMEOUT)
        self._roles: Dict[str, CommandClient] = {}
        self._ips: Dict[str, str] = {}
        self._groups: Dict[int, _Group] = {}
        self._followed: Dict[int, Tuple[str, int]] = {}     # gid -> (the master written, its epoch)
        self._sentinel_list: Tuple[str, ...] = ()
        self._running = False
        self._checking: Set[int] = set()      # the groups whose check is in flight
        self._call: Any = None
        self._following: Optional[int] = None
        self._rounds = 0          # rounds started so far

    # -- what the sweeps ask ---------------------------------------------------------

    def problem(self, gid: int, master: Optional[str]) -> Optional[str]:
        """None when ``master`` is group ``gid``'s confirmed master, else why the sweep must wait."""
        if self._ctl.protocol != "redis" or master is None:
            return None
        state = self._groups.get(gid)
        if state is None or state.master != master or state.verdict is None:
            self._soon()
            return f"group {gid}'s master {master} is not checked yet"
        if state.suspect is not None and state.checked_in <= state.suspect[0]:
            return f"{state.suspect[1]}: checking group {gid}'s master again"
        return state.verdict.problem

    def refused(self, reason: str, gids: Sequence[int]) -> None:
        """A sweep's command failed with ``reason``; a server that is no writable master: look again now."""
        if any(word in reason for word in NOT_WRITABLE):
            for gid in gids:
                self._suspect(gid, f"a server of group {gid} refused a command of the sweep")

    # -- life ------------------------------------------------------------------------

    def start(self) -> None:
        if self._ctl.protocol != "redis":
            return      # memcache groups have no master: nothing to confirm
        self._running = True
        self._schedule(0)

    def stop(self) -> None:
        self._running = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        for client in self._roles.values():
            client.close()
        self._roles.clear()
        self._sentinels.close()

    def _schedule(self, delay: float) -> None:
        if not self._running:
            return
        if self._call is not None and self._call.active():
            if self._call.getTime() <= self._reactor.seconds() + delay:
                return
            self._call.cancel()
        self._call = self._reactor.callLater(delay, self._tick)

    def _soon(self) -> None:
        self._schedule(0)

    def _suspect(self, gid: int, why: str) -> None:
        state = self._groups.get(gid)
        if state is not None and state.suspect is None:
            state.suspect = (self._rounds, why)
        self._soon()

    def _lost(self, address: str) -> None:
        topology = self._ctl.topology
        gid = topology.owner_of(address) if topology is not None else None
        if gid is not None:
            self._suspect(gid, f"the connection to {address} (group {gid}) closed")

    # -- the checks ------------------------------------------------------------------

    def _tick(self) -> None:
        self._call = None
        if not self._running:
            return
        try:
            self._round()
        except Exception:
            self._log.failure("cluster {cluster}: master check failed", cluster=self._ctl.cluster)
        self._schedule(self._period)

    def _due(self, topology: Any, now: float) -> List[Any]:
        busy: Set[int] = set()
        for m in topology.migrations:
            if not m.ended:
                busy.update(gid for gid in (m.from_group, m.to_group) if gid is not None)
                if m.adopt and topology.adopted is not None:
                    busy.update(topology.adopted.gids)
        due = []
        for group in topology.groups:
            if group.master is None or group.id in self._checking:
                continue
            state = self._groups.get(group.id)
            if state is None or state.master != group.master:
                due.append(group)
                continue
            period = self._period if group.id in busy else self._idle_period
            if state.suspect is not None or now - state.last >= period - 0.01:
                due.append(group)
        return due

    def _round(self) -> None:
        """Starts a check of every group that is due and has none in flight.

        Each group is judged as soon as its own servers and every sentinel
        answered: a slow or unreachable server (each query waits up to
        :data:`QUERY_TIMEOUT`) delays only its group's checks, not the
        other groups' — every group has at most one check in flight.
        """
        topology = self._ctl.topology
        if topology is None or self._ctl.protocol != "redis":
            return
        now = self._reactor.seconds()
        known = {group.id for group in topology.groups if group.master is not None}
        for gid in [gid for gid in self._groups if gid not in known]:
            del self._groups[gid]
        addresses = {address for group in topology.groups for address in group.servers}
        for address in [a for a in self._roles if a not in addresses]:
            self._roles.pop(address).close()
        self._sentinels.forget(topology.sentinels)
        if tuple(topology.sentinels) != self._sentinel_list:
            # Other sentinels count their epochs from their own start.
            self._sentinel_list = tuple(topology.sentinels)
            self._followed.clear()
            for state in self._groups.values():
                state.floor = -1
        due = self._due(topology, now)
        if not due:
            return
        self._rounds += 1
        number = self._rounds
        sentinels = list(topology.sentinels)
        # One SENTINEL MASTERS per sentinel for the round, its answers shared by the round's groups.
        answers = _Shared(defer.gatherResults([self._masters(sentinel) for sentinel in sentinels])
                          if sentinels else defer.succeed(None))
        for group in due:
            self._checking.add(group.id)
            servers = list(group.servers)
            asked = [self._role(address) for address in servers] + [self._ip(address) for address in servers]
            asked.append(answers.copy())
            checked = defer.gatherResults(asked)
            checked.addCallback(self._checked, group, servers, topology, now, number)
            checked.addErrback(lambda failure: self._log.failure("cluster {cluster}: master check failed", failure,
                                                                 cluster=self._ctl.cluster))
            checked.addBoth(self._check_ended, group.id)

    def _checked(self, results: List[Any], group: Any, servers: List[str], topology: Any, started: float,
                 number: int) -> None:
        if not self._running or (topology is not self._ctl.topology and self._changed(topology)):
            return      # the groups changed meanwhile: the next round looks again
        count = len(servers)
        roles = dict(zip(servers, results[:count]))
        ips = dict(zip(servers, results[count:2 * count]))
        answers = results[2 * count]
        self._judged(group, roles, ips, answers, started, number)

    def _check_ended(self, _: Any, gid: int) -> None:
        self._checking.discard(gid)
        state = self._groups.get(gid)
        if state is not None and state.suspect is not None:
            self._schedule(0)       # trouble seen while this check was in flight: look again now

    def _changed(self, seen: Any) -> bool:
        """Did a group's servers change since ``seen`` (a new topology that only moved slots changes nothing)?"""
        return [g.servers for g in seen.groups] != [g.servers for g in self._ctl.topology.groups]

    def _judged(self, group: Any, roles: Dict[str, Any], ips: Dict[str, Address], answers: Optional[list],
                started: float, number: int) -> None:
        gid, master = group.id, group.master
        state = self._groups.get(gid)
        if state is None or state.master != master:
            followed = self._followed.pop(gid, None)
            state = self._groups[gid] = _Group(master, floor=followed[1] if followed and followed[0] == master
                                               else -1)
        master_ip = ips[master]
        now_replicas = {address for address in group.replicas if _replicates(roles.get(address), master_ip)}
        if state.fence is None:
            promoted = sorted(address for address in state.replicas
                              if isinstance(roles.get(address), Role) and roles[address].kind == "master")
            if promoted:
                state.fence = (promoted[0], started)
                self._log.warn("cluster {cluster}: group {gid}: {server}, a replica of {master}, says it is a "
                               "master now: migrations wait for the group's master to be confirmed",
                               cluster=self._ctl.cluster, gid=gid, server=promoted[0], master=master)
        elif state.fence[0] in now_replicas:
            state.fence = None          # a replica again: nothing was promoted after all
        fenced, since = state.fence if state.fence is not None else (None, started)
        verdict = judge(gid, self._ctl.sentinels.name(gid), master, {a: ips[a] for a in group.servers}, roles,
                        answers, state.floor, fenced, self._reactor.seconds() - since)
        if verdict.lift:
            state.fence = None
        before = state.verdict.problem if state.verdict is not None else None
        if verdict.problem != before and (verdict.problem is not None or state.verdict is not None):
            if verdict.problem is None:
                self._log.info("cluster {cluster}: group {gid}: master {master} confirmed",
                               cluster=self._ctl.cluster, gid=gid, master=master)
            else:
                self._log.info("cluster {cluster}: group {gid}: {problem}", cluster=self._ctl.cluster, gid=gid,
                               problem=verdict.problem)
        state.verdict, state.checked_in, state.last = verdict, number, started
        state.replicas = now_replicas
        if state.suspect is not None and state.suspect[0] < number:
            state.suspect = None
        if verdict.problem is None:
            state.floor = max(state.floor, verdict.epoch)
        if verdict.follow is not None:
            self._follow(gid, master, verdict.follow, verdict.epoch)

    def _role(self, address: str) -> defer.Deferred:
        client = self._roles.get(address)
        if client is None:
            # The admin's client: nothing is written behind AUTH until it is accepted.
            client = self._roles[address] = AdminClient(self._reactor, split_address(address),
                                                        getattr(self._ctl, "redis_auth", None),
                                                        timeout=QUERY_TIMEOUT,
                                                          on_lost=lambda: self._lost(address))

        def parsed(value: Any) -> Any:
            try:
                return parse_role(value)
            except (ValueError, TypeError, IndexError) as err:
                return f"ROLE answered {str(err)[:100]}"

        return client.command(b"ROLE").addCallbacks(parsed, lambda failure: failure.getErrorMessage())

    def _masters(self, sentinel: str) -> defer.Deferred:
        def parsed(value: Any) -> Any:
            try:
                return parse_masters(value)
            except (ValueError, TypeError, KeyError):
                return None

        def failed(failure: Any) -> None:
            failure.trap(ServerError)
            return None

        return self._sentinels.command(sentinel, b"SENTINEL", b"MASTERS").addCallbacks(parsed, failed)

    def _ip(self, address: str) -> defer.Deferred:
        host, port = split_address(address)
        known = self._ips.get(host)
        if known is not None:
            return defer.succeed((known, port))

        def found(ip: str) -> Address:
            self._ips[host] = ip
            return (ip, port)

        return resolve(self._reactor, host).addCallbacks(found, lambda failure: (host, port))

    # -- following Sentinel ------------------------------------------------------------

    def _follow(self, gid: int, old: str, new: str, epoch: int) -> None:
        ctl = self._ctl
        if self._following is not None or ctl.busy is not None or not ctl.writable:
            return      # the next round asks again
        self._following = gid

        def done(_: Any) -> None:
            self._following = None
            self._soon()

        ctl._operation(f"follow Sentinel's failover of group {gid} to {new}", self._write, gid, old, new,
                       epoch).addErrback(lambda failure: None).addBoth(done)     # _operation logged it

    @defer.inlineCallbacks
    def _write(self, gid: int, old: str, new: str, epoch: int) -> Any:
        ctl = self._ctl
        ctl.check_writable()
        group = ctl.current().group(gid)
        if group is None or group.master != old or new not in group.servers:
            return ctl.ok(ctl.current())      # changed meanwhile
        self._followed[gid] = (new, epoch)      # the next check of ``new`` starts from that epoch
        written = yield ctl.write(lambda t: t.promote(gid, new, sentinel_failover=True))
        self._log.warn("cluster {cluster}: group {gid}: Sentinel made {new} the master (epoch {epoch}), not {old}: "
                       "written as generation {generation}", cluster=ctl.cluster, gid=gid, new=new, epoch=epoch,
                       old=old, generation=written.generation)
        yield ctl.wait_acks(written, f"Sentinel's failover of group {gid} to {new}")
        return ctl.ok(written, group=gid, master=new, old_master=old)


class _Shared:
    """One Deferred's result for several waiters: each :meth:`copy` fires with it (errors too)."""

    def __init__(self, source: defer.Deferred) -> None:
        self._waiting: List[defer.Deferred] = []
        self._result: Optional[List[Any]] = None
        source.addBoth(self._fire)

    def _fire(self, result: Any) -> None:
        self._result = [result]
        waiting, self._waiting = self._waiting, []
        for copy in waiting:
            self._deliver(copy)

    def _deliver(self, copy: defer.Deferred) -> None:
        result = self._result[0]
        if isinstance(result, Failure):
            copy.errback(result)
        else:
            copy.callback(result)

    def copy(self) -> defer.Deferred:
        copy: defer.Deferred = defer.Deferred()
        if self._result is None:
            self._waiting.append(copy)
        else:
            self._deliver(copy)
        return copy


def _replicates(role: Any, master: Address) -> bool:
    return isinstance(role, Role) and role.kind == "slave" and role.master is not None and tuple(role.master) == master
