"""ClusterSources: passes (apply, settle, acknowledge), reloads, and their turns, on a stub coordinator.

The Applier is a recording fake whose ``apply`` and ``settle`` Deferreds the
test can fail or hold unfired; the followers' coordinators come from a
:class:`Connector`; the reactor is a Clock.  No processes, no network.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from tests.unit.cluster.coordinator_stub import Connector, StubCoordinator, layout, not_found, shop_pool, unavailable
from twinproxy.cluster.follower import RESYNCING, RETRY_SECONDS
from twinproxy.cluster.sources import Applier, ClusterSources
from twinproxy.config import PoolConfig

CART = """\
cart:
  listen: 127.0.0.1:19001
  redis: true
  cluster: cart
  coordinator: file:///tmp/x
"""


class FakeApplier:
    """Records every apply; ``hold_*`` keeps the Deferreds unfired, ``failures`` fails the next applies."""

    def __init__(self) -> None:
        self.applied: List[List[PoolConfig]] = []
        self.failures: List[Exception] = []
        self.hold_apply = False
        self.held_applies: List[defer.Deferred] = []
        self.hold_settle = False
        self.held_settles: List[defer.Deferred] = []
        self.settles = 0
        self.in_flight = 0
        self.most_in_flight = 0

    def apply(self, pools: List[PoolConfig]) -> defer.Deferred:
        self.applied.append(list(pools))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        if self.hold_apply:
            d: defer.Deferred = defer.Deferred()
            self.held_applies.append(d)
        elif self.failures:
            d = defer.fail(self.failures.pop(0))
        else:
            d = defer.succeed([f"apply {len(self.applied)}"])
        return d.addBoth(self._done)

    def _done(self, result: Any) -> Any:
        self.in_flight -= 1
        return result

    def settle(self) -> defer.Deferred:
        self.settles += 1
        if self.hold_settle:
            d: defer.Deferred = defer.Deferred()
            self.held_settles.append(d)
            return d
        return defer.succeed(None)

    def last(self, name: str = "shop") -> Optional[PoolConfig]:
        return next((pool for pool in self.applied[-1] if pool.name == name), None)


class Harness:
    def __init__(self, pools: Optional[List[PoolConfig]] = None) -> None:
        self.clock = Clock()
        self.connector = Connector()
        self.applier = FakeApplier()
        self.sources = ClusterSources(shop_pool() if pools is None else pools,
                                      Applier(self.applier.apply, self.applier.settle, workers=1), self.clock,
                                      address_of=lambda config: str(config.listen),
                                      admin_address=lambda: "127.0.0.1:22222", connect=self.connector)

    def start(self, topology: Any = None) -> "Harness":
        if topology is not None:
            self.connector.set_topology(topology)
        self.sources.startService()
        self.clock.advance(0)
        return self

    def coordinator(self, cluster: str = "shop") -> StubCoordinator:
        return self.sources.followers[cluster].coordinator

    def acks(self, coordinator: Optional[StubCoordinator] = None) -> List[Dict[str, Any]]:
        """Every acknowledgement written, in order."""
        return [json.loads(event[-1]) for event in (coordinator or self.coordinator()).calls("update")]


def outcome(d: defer.Deferred) -> list:
    box: list = []
    d.addBoth(box.append)
    return box


# -- 2. a pass ---------------------------------------------------------------------------------------


def test_a_pass_applies_the_topology_then_settles_then_acknowledges() -> None:
    h = Harness().start()
    assert h.sources.followers["shop"].registered
    assert h.applier.last().slots is None and h.applier.last().servers == ()   # "not ready" until a topology
    assert h.acks() == []

    h.applier.hold_settle = True
    h.coordinator().set_topology(layout(5, held=(7,)))
    h.clock.advance(0)
    applied = h.applier.last()
    assert applied.slots.generation == 5 and applied.slots.session == "connected"
    assert applied.slots.held == frozenset({7}) and applied.slots.owners[0] == "shop-1"
    assert [server.name for server in applied.servers] == ["shop-1", "shop-2"]
    assert applied.listen == h.sources._file_pools[0].listen   # the file's settings, filled in
    assert len(h.applier.held_settles) == 1
    h.clock.advance(30)
    assert h.acks() == []                                       # not settled: not acknowledged

    h.applier.held_settles.pop().callback(None)
    (ack,) = h.acks()
    assert ack["generation"] == 5 and ack["addr"] == "127.0.0.1:19000" and ack["workers"] == 1
    assert h.sources.followers["shop"].acked == 5
    h.applier.hold_settle = False
    h.clock.advance(30)
    assert len(h.acks()) == 1


# -- 3. a failed pass ---------------------------------------------------------------------------------


def test_a_failed_apply_is_not_acknowledged_and_is_tried_again_after_the_retry_delay() -> None:
    h = Harness().start()
    h.applier.failures.append(RuntimeError("worker 2 did not commit"))
    h.coordinator().set_topology(layout(5))
    h.clock.advance(0)
    applies = len(h.applier.applied)
    assert h.applier.last().slots.generation == 5 and h.acks() == []
    h.clock.advance(RETRY_SECONDS * 0.99)
    assert len(h.applier.applied) == applies and h.acks() == []
    h.clock.advance(RETRY_SECONDS * 0.01)
    assert len(h.applier.applied) == applies + 1
    assert [ack["generation"] for ack in h.acks()] == [5]


# -- 4. reloads -----------------------------------------------------------------------------------------


def test_a_failed_reload_keeps_the_file_and_the_followers() -> None:
    h = Harness().start(layout(5))
    shop = h.sources.followers["shop"]
    file_pools = list(h.sources._file_pools)
    h.applier.failures.append(RuntimeError("bad"))
    failed = outcome(h.sources.apply_file(shop_pool(extra=CART)))      # adds cluster pool cart
    assert isinstance(failed[0].value, RuntimeError)
    assert [pool.name for pool in h.applier.applied[-1]] == ["shop", "cart"]
    assert h.applier.last("cart").slots is None                       # tried as "not ready"
    h.applier.failures.append(RuntimeError("bad"))
    failed = outcome(h.sources.apply_file(_cart()))                    # drops shop
    assert isinstance(failed[0].value, RuntimeError)
    h.clock.advance(30)
    assert h.sources._file_pools == file_pools
    assert h.sources.followers == {"shop": shop} and len(h.connector.made) == 1
    assert shop.coordinator.calls("remove") == [] and shop.coordinator.state == "connected"
    h.coordinator().set_topology(layout(6))
    h.clock.advance(0)
    assert [pool.name for pool in h.applier.applied[-1]] == ["shop"]    # later passes: the old file
    assert [ack["generation"] for ack in h.acks()] == [5, 6]


def test_a_reload_adopts_new_cluster_pools_and_drops_removed_ones() -> None:
    h = Harness().start(layout(5))
    shop = h.sources.followers["shop"]
    old = shop.coordinator
    done = outcome(h.sources.apply_file(_cart()))
    assert done == [[f"apply {len(h.applier.applied)}"]]
    assert list(h.sources.followers) == ["cart"] and h.sources._file_pools == _cart()
    assert old.calls("remove") and old.state == "stopped"
    cart = h.sources.followers["cart"]
    assert cart.registered and cart.coordinator is h.connector.current
    assert cart.coordinator.calls("ephemeral")[0][1] == f"/clusters/cart/proxies/127.0.0.1:19001-{os.getpid()}"
    h.clock.advance(0)
    assert [pool.name for pool in h.applier.applied[-1]] == ["cart"]


def _cart() -> List[PoolConfig]:
    from twinproxy.config import load_text

    return load_text(CART)


# -- 5. one apply at a time --------------------------------------------------------------------------------


def test_a_reload_waits_for_the_pass_in_progress() -> None:
    h = Harness().start()
    h.applier.hold_apply = True
    h.coordinator().set_topology(layout(5))
    h.clock.advance(0)
    applies = len(h.applier.applied)
    reloaded = outcome(h.sources.apply_file(shop_pool()))
    h.clock.advance(30)
    assert len(h.applier.applied) == applies and reloaded == []
    h.applier.hold_apply = False
    h.applier.held_applies.pop().callback(["pass"])
    assert len(h.applier.applied) == applies + 1 and reloaded
    assert h.applier.most_in_flight == 1
    assert [ack["generation"] for ack in h.acks()] == [5]


def test_a_pass_waits_for_the_reload_in_progress() -> None:
    h = Harness().start()
    h.applier.hold_apply = True
    reloaded = outcome(h.sources.apply_file(shop_pool()))
    applies = len(h.applier.applied)
    h.coordinator().set_topology(layout(5))
    h.clock.advance(30)
    assert len(h.applier.applied) == applies and h.acks() == []
    h.applier.hold_apply = False
    h.applier.held_applies.pop().callback(["reload"])
    assert reloaded == [["reload"]]
    h.clock.advance(0)
    assert len(h.applier.applied) == applies + 1 and h.applier.last().slots.generation == 5
    assert h.applier.most_in_flight == 1
    assert [ack["generation"] for ack in h.acks()] == [5]


# -- 6. the session ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["suspended", "lost"])
def test_an_untrusted_session_fences_and_nothing_is_acknowledged_until_re_read(state: str) -> None:
    h = Harness().start(layout(5, held=(3,)))
    coordinator = h.coordinator()
    assert [ack["generation"] for ack in h.acks()] == [5]
    coordinator.set_state(state)
    h.clock.advance(0)
    assert h.applier.last().slots.session == state and h.applier.last().slots.held == frozenset({3})
    coordinator.set_topology(layout(6), notify=False)
    coordinator.hold("get")
    coordinator.set_state("connected")
    assert coordinator.calls("get") == [("get", "/clusters/shop/topology")]
    h.clock.advance(30)
    assert h.applier.last().slots.session == RESYNCING and h.applier.last().slots.fenced
    assert len(h.acks()) == 1

    coordinator.release("get")
    h.clock.advance(0)
    assert h.applier.last().slots.session == "connected" and h.applier.last().slots.generation == 6
    assert [(ack["generation"], ack["session"]) for ack in h.acks()] == [(5, "connected"), (6, "connected")]


def test_a_pass_that_applied_a_fenced_config_does_not_acknowledge_even_if_the_re_read_lands_meanwhile() -> None:
    h = Harness().start(layout(5))
    coordinator = h.coordinator()
    coordinator.set_state("suspended")
    h.clock.advance(0)
    coordinator.set_topology(layout(6), notify=False)
    coordinator.hold("get")
    h.applier.hold_apply = True
    coordinator.set_state("connected")
    h.clock.advance(0)                                   # a pass applying generation 6, fenced
    assert h.applier.last().slots.session == RESYNCING and len(h.applier.held_applies) == 1
    coordinator.release("get")                           # trusted now, while that apply is in flight
    h.applier.hold_apply = False
    h.applier.held_applies.pop().callback([])
    assert [ack["generation"] for ack in h.acks()] == [5]
    h.clock.advance(0)                                   # the pass the re-read asked for
    assert h.applier.last().slots.session == "connected"
    assert [ack["generation"] for ack in h.acks()] == [5, 6]


def test_a_topology_seen_while_suspended_is_applied_fenced_and_not_acknowledged() -> None:
    h = Harness().start(layout(5))
    coordinator = h.coordinator()
    coordinator.set_state("suspended")
    coordinator.set_topology(layout(6), notify=True)    # a watch that still delivers
    h.clock.advance(30)
    assert h.applier.last().slots.generation == 6 and h.applier.last().slots.session == "suspended"
    assert [ack["generation"] for ack in h.acks()] == [5]


# -- 7. acknowledgements that fail ------------------------------------------------------------------------------


def test_a_failing_acknowledgement_is_retried_once_per_retry_delay() -> None:
    h = Harness()
    h.connector.prepare = lambda coordinator: coordinator.fail("update", unavailable(), times=1000)
    h.start(layout(5))
    assert len(h.acks()) == 1
    for _ in range(50):
        h.clock.advance(RETRY_SECONDS / 10)
    assert 2 <= len(h.acks()) <= 6 and len(h.applier.applied) <= 10
    h.coordinator().clear_failures("update")
    h.clock.advance(RETRY_SECONDS)
    assert h.sources.followers["shop"].acked == 5
    count = len(h.acks())
    h.clock.advance(30)
    assert len(h.acks()) == count


def test_a_registration_removed_by_the_dashboard_is_made_again_and_acknowledged() -> None:
    h = Harness()
    h.connector.prepare = lambda coordinator: coordinator.fail("update", not_found())
    h.start(layout(5))
    coordinator = h.coordinator()
    assert len(coordinator.calls("ephemeral")) == 1 and h.sources.followers["shop"].acked is None
    h.clock.advance(RETRY_SECONDS * 0.99)
    assert len(coordinator.calls("ephemeral")) == 1
    h.clock.advance(RETRY_SECONDS * 0.01)
    assert len(coordinator.calls("ephemeral")) == 2
    assert coordinator.ephemerals[-1].writes[-1] == coordinator.calls("update")[-1][-1]
    assert h.sources.followers["shop"].acked == 5
    h.clock.advance(30)
    assert len(coordinator.calls("ephemeral")) == 2


# -- 9. a reload that changes what the registration says ---------------------------------------------------------


def test_a_reload_with_a_new_listen_acknowledges_again_at_the_same_generation() -> None:
    h = Harness().start(layout(5))
    shop = h.sources.followers["shop"]
    assert [ack["generation"] for ack in h.acks()] == [5]
    outcome(h.sources.apply_file(shop_pool("127.0.0.1:19009")))
    h.clock.advance(0)
    assert h.sources.followers["shop"] is shop and len(h.connector.made) == 1   # the session stays
    assert [(ack["generation"], ack["addr"]) for ack in h.acks()] == [(5, "127.0.0.1:19000"), (5, "127.0.0.1:19009")]
    h.clock.advance(30)
    assert len(h.acks()) == 2


# -- 10. leaving ---------------------------------------------------------------------------------------------------


def test_stopping_removes_registrations_before_ending_sessions() -> None:
    h = Harness().start(layout(5))
    coordinator = h.coordinator()
    coordinator.hold("remove")
    stopped = outcome(h.sources.stopService())
    assert coordinator.calls("remove") and coordinator.calls("stop") == [] and stopped == []
    coordinator.release("remove")
    assert [event[0] for event in coordinator.events][-2:] == ["remove", "stop"] and stopped == [[None]]
    applies = len(h.applier.applied)
    coordinator.set_state("suspended")
    h.clock.advance(30)
    assert len(h.applier.applied) == applies


# -- 7. the slot lease ----------------------------------------------------------------------------------------


class LeaseHarness(Harness):
    def __init__(self) -> None:
        super().__init__()
        self.renewals: List[float] = []
        self.sources._applier.renew = self.renewals.append


def test_the_lease_is_renewed_every_tick_for_a_third_of_the_session() -> None:
    from twinproxy.cluster.sources import TICK

    h = LeaseHarness().start(layout(5))
    assert h.sources.lease_seconds() == pytest.approx(10.0 / 3)      # the stub's session: 10 s
    first = len(h.renewals)
    for _ in range(4):
        h.clock.advance(TICK)
    assert len(h.renewals) == first + 4
    assert h.renewals[-1] == h.clock.seconds() + h.sources.lease_seconds()


def test_a_stall_past_the_lease_renews_only_after_the_session_is_confirmed_and_re_read() -> None:
    from twinproxy.cluster.sources import TICK

    h = LeaseHarness().start(layout(5))
    coordinator = h.coordinator()
    h.clock.advance(TICK)
    renewed = len(h.renewals)
    applies = len(h.applier.applied)
    coordinator.set_topology(layout(6), notify=False)    # written while this process was stopped
    coordinator.hold("update")
    h.clock.advance(h.sources.lease_seconds() + 3)      # one late tick: the lease ran out
    assert len(h.renewals) == renewed and h.sources.stalls == 1
    h.clock.advance(TICK * 4)
    assert len(h.renewals) == renewed                   # the registration write has not answered
    coordinator.release("update")
    h.clock.advance(0)
    assert h.applier.last().slots.generation == 6       # read again and applied first
    assert len(h.applier.applied) > applies
    assert h.renewals[renewed:] == [h.clock.seconds() + h.sources.lease_seconds()]
    assert [ack["generation"] for ack in h.acks()][-1] == 6


def test_after_a_stall_no_renewal_until_a_pass_applied_what_was_read() -> None:
    h = LeaseHarness().start(layout(5))
    coordinator = h.coordinator()
    renewed = len(h.renewals)
    coordinator.set_topology(layout(6), notify=False)
    h.applier.failures.extend([RuntimeError("worker 2 unreachable")] * 3)
    h.clock.advance(h.sources.lease_seconds() + 1)
    for _ in range(40):
        h.clock.advance(0.25)
        if len(h.renewals) > renewed:
            break
        assert h.applier.failures or h.sources._confirming
    assert len(h.renewals) == renewed + 1
    assert h.applier.failures == [] and h.applier.last().slots.generation == 6


def test_confirming_never_takes_an_acknowledgement_back() -> None:
    h = LeaseHarness().start(layout(5))
    coordinator = h.coordinator()
    coordinator.hold("update")
    coordinator.set_topology(layout(6))
    h.clock.advance(0)                                  # the ack of 6 is in flight
    h.clock.advance(h.sources.lease_seconds() + 1)      # and the process stalls: confirm writes too
    coordinator.release("update")
    h.clock.advance(0)
    coordinator.release("update")
    h.clock.advance(1)
    assert [ack["generation"] for ack in h.acks()][-1] == 6
    assert h.sources.followers["shop"].acked == 6


def test_a_lost_registration_is_made_again_before_the_lease_is_renewed() -> None:
    from twinproxy.cluster.follower import CONFIRM_RETRY_SECONDS

    h = LeaseHarness().start(layout(5))
    coordinator = h.coordinator()
    renewed = len(h.renewals)
    coordinator.fail("update", not_found())             # the session expired while stopped
    h.clock.advance(h.sources.lease_seconds() + 2)
    assert len(h.renewals) == renewed
    h.clock.advance(RETRY_SECONDS + CONFIRM_RETRY_SECONDS * 2)
    assert len(coordinator.calls("ephemeral")) == 2     # registered again
    h.clock.advance(CONFIRM_RETRY_SECONDS * 2)
    assert len(h.renewals) > renewed


def test_no_cluster_pool_no_lease_to_have_missed() -> None:
    h = LeaseHarness().start(layout(5))
    h.sources.followers.clear()
    h.clock.advance(3600)
    assert h.sources._lease_until is None and h.sources.stalls == 0
