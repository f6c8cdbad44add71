"""Each group's confirmed master for the sweeps (twinproxy.dashboard.masters): the pure judgement of one check,
and the watch's state on a fake clock — a promoted replica fences its master, Sentinel's switch is written
into the topology, a closed connection or a refused command makes it look again."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Tuple

import pytest
from twisted.internet import defer, task

from twinproxy.cluster.model import Topology
from twinproxy.dashboard.masters import MasterWatch, judge
from twinproxy.sentinel.replies import MasterView, Role

pytestmark = pytest.mark.timeout(30)

A, B, C, D = "127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003", "127.0.0.1:7004"
SENTINELS = ("127.0.0.1:26001", "127.0.0.1:26002", "127.0.0.1:26003")
IPS = {A: ("127.0.0.1", 7001), B: ("127.0.0.1", 7002)}


def master_role() -> Role:
    return Role("master", 100, None, "", ())


def replica_of(address: str) -> Role:
    return Role("slave", 100, IPS.get(address) or ("127.0.0.1", int(address.rpartition(":")[2])), "connected", ())


def view(address: str, epoch: int = 0, flags: str = "master", name: str = "shop-1", others: int = 2) -> MasterView:
    host, _, port = address.rpartition(":")
    return MasterView(name=name, host=host, port=int(port), run_id="", epoch=epoch, flags=frozenset(flags.split(",")),
                      num_other_sentinels=others, quorum=2, num_replicas=1)


def said(*views: Optional[MasterView]) -> List[Optional[Dict[str, MasterView]]]:
    return [None if v is None else {v.name: v} for v in views]


def check(roles: Dict[str, Any], answers=None, **kwargs):
    return judge(1, "shop-1", A, IPS, roles, answers, **kwargs)


# -- the judgement ------------------------------------------------------------------------


def test_without_sentinels_the_master_s_role_decides() -> None:
    assert check({A: master_role(), B: replica_of(A)}).problem is None
    assert "reports role replica" in check({A: replica_of(B), B: master_role()}).problem
    assert "does not answer ROLE (timeout)" in check({A: "timeout", B: replica_of(A)}).problem
    assert "not asked yet" in check({}).problem


def test_sentinels_naming_the_master_confirm_it() -> None:
    verdict = check({A: master_role()}, said(view(A, 3), view(A, 3), view(A, 3)))
    assert verdict.problem is None and verdict.epoch == 3 and verdict.follow is None


def test_a_failover_flagged_by_any_sentinel_is_waited_for() -> None:
    verdict = check({A: master_role()}, said(view(A), view(A), view(A, flags="master,failover_in_progress")))
    assert "failover of group 1 (shop-1) under way" in verdict.problem


def test_a_switch_to_a_server_of_the_group_that_answers_as_master_is_followed() -> None:
    verdict = check({A: master_role(), B: master_role()}, said(view(B, 1), view(B, 1), view(A, 0)))
    assert verdict.follow == B and verdict.epoch == 1
    assert "Sentinel made 127.0.0.1:7002 the master of group 1 (epoch 1)" in verdict.problem
    # Not while B does not say it is a master.
    verdict = check({A: master_role(), B: replica_of(A)}, said(view(B, 1), view(B, 1), view(B, 1)))
    assert verdict.follow is None and "does not answer ROLE as a master yet" in verdict.problem


def test_what_sentinel_cannot_confirm_is_waited_for() -> None:
    roles = {A: master_role()}
    assert "only 1 of 3 sentinels answered" in check(roles, said(view(A), None, None)).problem
    assert "no server of the group" in check(roles, said(*[view("127.0.0.1:9999", 1)] * 3)).problem
    assert "below the one in use 4" in check(roles, said(*[view(A, 2)] * 3), floor_epoch=4).problem
    assert "no sentinel monitors" in check(roles, said(*[view(A, name="other")] * 3)).problem


def test_a_promoted_replica_fences_until_every_sentinel_names_the_master() -> None:
    roles = {A: master_role(), B: master_role()}
    all_a = said(view(A), view(A), view(A))
    assert "says it is a master now" in check(roles, all_a, fenced=B, fence_age=0.1).problem    # the grace
    assert check(roles, all_a, fenced=B, fence_age=0.6).lift
    one_silent = said(view(A), view(A), None)
    assert "waiting for every sentinel" in check(roles, one_silent, fenced=B, fence_age=5.0).problem
    assert check(roles, one_silent, fenced=B, fence_age=10.0).lift                           # bounded
    assert check(roles, None, fenced=B, fence_age=0.6).lift           # no sentinels: an operator's doing


# -- the watch -------------------------------------------------------------------------------


class FakeController:
    def __init__(self, topology: Topology) -> None:
        self.reactor = task.Clock()
        self.protocol = "redis"
        self.cluster = "shop"
        self.topology = topology
        self.busy: Optional[str] = None
        self.writable = True
        self.command_timeout = 1.0
        self.sentinels = SimpleNamespace(name=lambda gid: f"shop-{gid}")
        self.operations: List[str] = []

    def _operation(self, name: str, function: Any, *args: Any) -> defer.Deferred:
        self.operations.append(name)
        return defer.maybeDeferred(function, *args)

    def check_writable(self) -> None:
        pass

    def current(self) -> Topology:
        return self.topology

    def write(self, edit: Any) -> defer.Deferred:
        self.topology = edit(self.topology)
        return defer.succeed(self.topology)

    def wait_acks(self, topology: Topology, what: str) -> defer.Deferred:
        return defer.succeed(None)

    def ok(self, topology: Topology, **extra: Any) -> Dict[str, Any]:
        return {"ok": True, "generation": topology.generation, **extra}


class FakeWatch(MasterWatch):
    """The watch with its queries answered from dicts (``roles``, ``views``) instead of sockets."""

    def __init__(self, ctl: FakeController) -> None:
        super().__init__(ctl)
        self.roles: Dict[str, Any] = {}
        self.views: Dict[str, Optional[Dict[str, MasterView]]] = {}
        self.asked: List[str] = []

    def _role(self, address: str) -> defer.Deferred:
        self.asked.append(address)
        return defer.succeed(self.roles.get(address, "timeout"))

    def _masters(self, sentinel: str) -> defer.Deferred:
        return defer.succeed(self.views.get(sentinel))

    def _ip(self, address: str) -> defer.Deferred:
        host, _, port = address.rpartition(":")
        return defer.succeed((host, int(port)))

    def all_say(self, *views: MasterView) -> None:
        for sentinel in SENTINELS:
            self.views[sentinel] = {v.name: v for v in views}


def cluster(sentinels=SENTINELS) -> Topology:
    topology = Topology.empty("shop", "redis")
    topology = topology.add_group(1).add_server(1, A).add_server(1, B).add_group(2).add_server(2, C)
    topology = topology.assign_slots(0, 1023, 1)
    for sentinel in sentinels:
        topology = topology.add_sentinel(sentinel)
    return topology


def watching(sentinels=SENTINELS) -> Tuple[FakeController, FakeWatch]:
    ctl = FakeController(cluster(sentinels))
    watch = FakeWatch(ctl)
    watch.roles = {A: master_role(), B: replica_of(A), C: master_role()}
    watch.all_say(view(A), view(C, name="shop-2"))
    watch.start()
    ctl.reactor.advance(0)
    return ctl, watch


def test_groups_are_confirmed_by_the_first_round_and_checked_again_on_their_periods() -> None:
    ctl, watch = watching()
    assert watch.problem(1, A) is None and watch.problem(2, C) is None
    assert "is not checked yet" in watch.problem(1, B)       # another master than the one checked
    watch.asked.clear()
    ctl.reactor.advance(0.25)
    assert watch.asked == []                                 # no migration: idle groups every second
    ctl.reactor.pump([0.25] * 4)
    assert sorted(set(watch.asked)) == [A, B, C]


def test_a_migration_s_groups_are_checked_every_quarter_second() -> None:
    ctl, watch = watching()
    ctl.topology = ctl.topology.create_migration(0, 9, 2)
    watch.asked.clear()
    ctl.reactor.advance(0.25)
    assert sorted(set(watch.asked)) == [A, B, C]


def test_a_sentinel_failover_fences_then_is_written_into_the_topology() -> None:
    ctl, watch = watching()
    ctl.reactor.advance(1.0)
    # Sentinel's leader promotes B (only it flags the failover); our connection to B is closed by the promotion.
    watch.roles[B] = master_role()
    watch.views[SENTINELS[2]] = {"shop-1": view(A, flags="master,failover_in_progress"),
                                 "shop-2": view(C, name="shop-2")}
    watch._lost(B)
    assert "connection to 127.0.0.1:7002 (group 1) closed" in watch.problem(1, A)
    ctl.reactor.advance(0)
    assert "under way" in watch.problem(1, A)
    ctl.reactor.pump([0.25] * 4)
    assert "under way" in watch.problem(1, A)                # until the leader announces the switch
    assert watch._groups[1].fence is not None
    # The switch: a majority names B at epoch 1, and B answers as a master.
    watch.all_say(view(B, 1), view(C, name="shop-2"))
    ctl.reactor.pump([0.25] * 4)
    assert ctl.operations == ["follow Sentinel's failover of group 1 to 127.0.0.1:7002"]
    assert ctl.topology.group(1).servers == (B, A)
    assert watch.problem(1, A) is not None                   # the old master is never confirmed again
    ctl.reactor.pump([0.25] * 4)
    assert watch.problem(1, B) is None
    # A stale majority naming A at the old epoch is not followed back.
    watch.all_say(view(A, 0), view(C, name="shop-2"))
    watch.roles[A] = master_role()                           # the demoted master, not reconfigured yet
    ctl.reactor.pump([0.25] * 8)
    assert ctl.topology.group(1).servers == (B, A) and len(ctl.operations) == 1
    assert "below the one in use 1" in watch.problem(1, B)


def test_a_fence_is_lifted_once_every_sentinel_names_the_master_after_the_grace() -> None:
    ctl, watch = watching()
    ctl.reactor.advance(1.0)
    watch.roles[B] = master_role()                           # an operator's REPLICAOF NO ONE on B
    ctl.reactor.advance(1.0)
    assert "says it is a master now" in watch.problem(1, A)
    ctl.reactor.advance(1.0)
    assert watch.problem(1, A) is None


def test_the_switch_waits_for_the_controller_to_be_free() -> None:
    ctl, watch = watching()
    ctl.busy = "a migration's step"
    watch.roles[B] = master_role()
    watch.all_say(view(B, 1), view(C, name="shop-2"))
    ctl.reactor.pump([0.25] * 8)
    assert ctl.operations == [] and "the topology follows it" in watch.problem(1, A)
    ctl.busy = None
    ctl.reactor.pump([0.25] * 4)
    assert ctl.topology.group(1).master == B


def test_a_refusal_by_no_writable_master_makes_it_look_again() -> None:
    ctl, watch = watching()
    watch.refused("MIGRATE from 127.0.0.1:7001 to 127.0.0.1:7003: ERR Target instance replied with error: "
                  "READONLY You can't write against a read only replica.", (1, 2))
    assert "refused a command of the sweep" in watch.problem(2, C)
    watch.roles[C] = replica_of(D)
    ctl.reactor.advance(0)
    assert "reports role replica" in watch.problem(2, C)
    watch.refused("MIGRATE: IOERR error or timeout", (1, 2))     # not a master's refusal: no new look
    assert "reports role replica" in watch.problem(2, C)


def test_without_sentinels_a_replica_s_promotion_costs_the_grace() -> None:
    ctl, watch = watching(sentinels=())
    assert watch.problem(1, A) is None
    watch.roles[B] = master_role()
    ctl.reactor.advance(1.0)
    assert "says it is a master now" in watch.problem(1, A)
    ctl.reactor.advance(1.0)
    assert watch.problem(1, A) is None


def test_memcache_and_stopped() -> None:
    ctl, watch = watching()
    watch.stop()
    assert ctl.reactor.getDelayedCalls() == []
    ctl.protocol = "memcache"
    assert watch.problem(1, "127.0.0.1:11211") is None


def slow_server(watch: FakeWatch, address: str) -> List[defer.Deferred]:
    """Makes ``address``'s ROLE answer only when the test fires one of the returned Deferreds."""
    pending: List[defer.Deferred] = []
    answer = watch._role

    def role(asked: str) -> defer.Deferred:
        if asked != address:
            return answer(asked)
        watch.asked.append(asked)
        pending.append(defer.Deferred())
        return pending[-1]

    watch._role = role      # type: ignore[method-assign]
    return pending


def test_a_slow_server_delays_only_its_own_group_s_checks() -> None:
    ctl, watch = watching()
    ctl.topology = ctl.topology.create_migration(0, 9, 2)
    pending = slow_server(watch, C)
    watch.asked.clear()
    ctl.reactor.pump([0.25] * 4)
    # Group 1 is checked every quarter second while group 2's one check waits for C (up to QUERY_TIMEOUT).
    assert watch.asked.count(A) == 4 and watch.asked.count(C) == 1 and len(pending) == 1
    watch.roles[A] = replica_of(B)
    ctl.reactor.advance(0.25)
    assert "reports role replica" in watch.problem(1, A)        # group 1's news is not held up by C
    pending[0].callback(master_role())
    assert watch.problem(2, C) is None
    ctl.reactor.advance(0.25)
    assert watch.asked.count(C) == 2                            # its next check on its own period


def test_trouble_seen_during_a_group_s_check_makes_it_look_again_once_that_check_ends() -> None:
    ctl, watch = watching()
    pending = slow_server(watch, C)
    ctl.reactor.advance(1.0)                # group 2's check is in flight, waiting for C
    assert len(pending) == 1
    watch._lost(C)
    assert "closed: checking group 2's master again" in watch.problem(2, C)
    pending[0].callback(master_role())      # that check started before the trouble: it does not clear it
    assert "checking group 2's master again" in watch.problem(2, C)
    ctl.reactor.advance(0)
    assert len(pending) == 2                # a new check at once
    pending[1].callback(master_role())
    assert watch.problem(2, C) is None
