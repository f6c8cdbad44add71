"""ClusterFollower alone: its session, registration and acknowledgements, on a stub coordinator and a Clock.

The follower is given a ``changed`` callback that only counts (ClusterSources
would run a pass) and an ``info`` the test can change; every coordinator it
makes comes from a :class:`Connector`, so a failed start's retries can be
counted.  No processes, no network, no real time.
"""

from __future__ import annotations

import json
from typing import Any, Dict

import pytest
from twisted.internet.task import Clock

from tests.unit.cluster.coordinator_stub import Connector, layout, not_found, shop_pool, unavailable
from twinproxy.cluster.follower import RESYNCING, RETRY_SECONDS, ClusterFollower

REGISTRATION = "/clusters/shop/proxies/127.0.0.1:19000-1"
TOPOLOGY = "/clusters/shop/topology"


class Harness:
    def __init__(self, fail_starts: int = 0) -> None:
        self.clock = Clock()
        self.connector = Connector(fail_starts)
        self.changes = 0
        self.info: Dict[str, Any] = {"id": "127.0.0.1:19000-1", "addr": "127.0.0.1:19000",
                                     "admin": "127.0.0.1:22222", "workers": 1}
        self.follower = ClusterFollower(shop_pool()[0], self.clock, self._changed, lambda _: dict(self.info),
                                        self.connector)

    def _changed(self) -> None:
        self.changes += 1

    @property
    def coordinator(self) -> Any:
        return self.connector.current

    def start(self, topology: Any = None) -> "Harness":
        if topology is not None:
            self.connector.set_topology(topology)
        self.follower.start()
        self.clock.advance(0)   # the watch's first delivery
        return self

    def written(self, index: int = -1) -> Dict[str, Any]:
        """A registration value, as created or updated (default: the last)."""
        values = [event[-1] for event in self.coordinator.events if event[0] in ("ephemeral", "update")]
        return json.loads(values[index])


def outcome(d: Any) -> list:
    box: list = []
    d.addBoth(box.append)
    return box


# -- 1. register first, then read --------------------------------------------------------


def test_registration_is_made_before_the_topology_is_read_with_generation_zero() -> None:
    h = Harness()
    h.connector.set_topology(layout(5))
    h.connector.prepare = lambda coordinator: coordinator.hold("ephemeral")
    h.follower.start()
    h.clock.advance(10)
    assert [event[0] for event in h.coordinator.events] == ["start", "ephemeral"]
    assert h.coordinator.events[1][1] == REGISTRATION
    assert h.written()["generation"] == 0 and h.written()["session"] == "connected"
    assert h.follower.topology is None and not h.follower.registered

    h.coordinator.release("ephemeral")
    assert [event[0] for event in h.coordinator.events] == ["start", "ephemeral", "watch"]
    assert h.coordinator.events[2][1] == TOPOLOGY
    h.clock.advance(0)
    assert h.follower.registered and h.follower.topology.generation == 5
    assert h.coordinator.calls("update") == []   # reading is not acknowledging


def test_a_start_after_a_failed_one_still_registers_before_reading() -> None:
    h = Harness(fail_starts=1).start(layout(5))
    h.clock.advance(RETRY_SECONDS)
    h.clock.advance(0)
    assert len(h.connector.made) == 2 and h.follower.topology.generation == 5
    kinds = [event[0] for event in h.coordinator.events]
    assert "ephemeral" in kinds, kinds
    first_read = min(index for index, kind in enumerate(kinds) if kind in ("get", "watch"))
    assert kinds.index("ephemeral") < first_read, kinds


# -- 7. acknowledgements that fail -------------------------------------------------------------


def test_an_acknowledgement_writes_the_generation_and_session() -> None:
    h = Harness().start(layout(5))
    assert h.follower.needs_acknowledging(5)
    h.follower.acknowledge(5)
    assert h.written()["generation"] == 5 and h.written()["session"] == "connected"
    assert h.follower.acked == 5 and not h.follower.needs_acknowledging(5)


def test_a_registration_removed_from_the_coordinator_is_made_again_after_the_retry_delay() -> None:
    h = Harness().start(layout(5))
    h.coordinator.fail("update", not_found(REGISTRATION))
    h.follower.acknowledge(5)
    assert not h.follower.registered and h.follower.acked is None
    assert len(h.coordinator.calls("ephemeral")) == 1
    h.clock.advance(RETRY_SECONDS * 0.99)
    assert len(h.coordinator.calls("ephemeral")) == 1
    h.clock.advance(RETRY_SECONDS * 0.01)
    assert len(h.coordinator.calls("ephemeral")) == 2
    assert h.follower.registered and h.written()["generation"] == 0   # nothing was acknowledged yet
    assert len(h.coordinator.calls("watch")) == 1                     # the watch stays as it was
    h.follower.acknowledge(5)
    assert h.coordinator.live[-1].value == h.coordinator.calls("update")[-1][-1]
    assert h.follower.acked == 5
    h.clock.advance(30)
    assert len(h.coordinator.calls("ephemeral")) == 2


def test_another_failed_acknowledgement_asks_for_a_pass_after_the_retry_delay_only() -> None:
    h = Harness().start(layout(5))
    h.coordinator.fail("update", unavailable("update", REGISTRATION))
    before = h.changes
    h.follower.acknowledge(5)
    assert h.follower.acked is None and h.follower.registered
    h.clock.advance(RETRY_SECONDS * 0.99)
    assert h.changes == before
    h.clock.advance(RETRY_SECONDS * 0.01)
    assert h.changes == before + 1
    h.clock.advance(30)
    assert h.changes == before + 1 and len(h.coordinator.calls("ephemeral")) == 1


def test_a_lost_registration_is_made_again_after_the_retry_delay() -> None:
    h = Harness().start(layout(5))
    (registration,) = h.coordinator.live
    registration.on_lost("another session holds it")
    assert not h.follower.registered
    h.clock.advance(RETRY_SECONDS)
    assert len(h.coordinator.calls("ephemeral")) == 2 and h.follower.registered


# -- 8. a coordinator that cannot be reached ------------------------------------------------------


def test_a_failed_start_makes_a_new_coordinator_after_the_retry_delay() -> None:
    h = Harness(fail_starts=2).start(layout(5))
    first = h.connector.made[0]
    assert len(h.connector.made) == 1 and first.calls("stop")       # a failed session is ended
    assert h.follower.coordinator is None and not h.follower.registered
    h.clock.advance(RETRY_SECONDS * 0.99)
    assert len(h.connector.made) == 1
    h.clock.advance(RETRY_SECONDS * 0.01)
    assert len(h.connector.made) == 2 and h.connector.made[1].calls("start")
    h.clock.advance(RETRY_SECONDS)
    assert len(h.connector.made) == 3
    h.clock.advance(0)
    assert h.follower.coordinator is h.connector.made[2] and h.follower.registered
    assert h.follower.topology.generation == 5
    h.clock.advance(30)
    assert len(h.connector.made) == 3
    first.set_state("suspended")   # an abandoned session is not listened to
    assert h.follower.session == "connected"


# -- 6. the session, as the config shows it ------------------------------------------------------


@pytest.mark.parametrize("state", ["suspended", "lost"])
def test_an_untrusted_session_fences_until_the_topology_is_read_again(state: str) -> None:
    h = Harness().start(layout(5, held=(3,)))
    assert h.follower.trusted and not h.follower.config().slots.fenced
    h.coordinator.set_state(state)
    assert not h.follower.trusted and h.follower.config().slots.session == state
    assert h.follower.config().servers   # the last topology keeps serving
    assert not h.follower.needs_acknowledging(5)
    h.follower.acknowledge(5)
    assert h.coordinator.calls("update") == []

    h.coordinator.hold("get")
    h.coordinator.set_topology(layout(6), notify=False)   # written while this session could not see it
    h.coordinator.set_state("connected")
    assert h.coordinator.calls("get") == [("get", TOPOLOGY)]
    assert h.follower.session == "connected" and not h.follower.trusted
    assert h.follower.config().slots.session == RESYNCING and h.follower.config().slots.fenced
    h.follower.acknowledge(6)
    assert h.coordinator.calls("update") == []

    h.coordinator.release("get")
    assert h.follower.trusted and h.follower.topology.generation == 6
    assert not h.follower.config().slots.fenced
    assert h.follower.needs_acknowledging(6)


def test_a_failed_re_read_is_tried_again_after_the_retry_delay() -> None:
    h = Harness().start(layout(5))
    h.coordinator.set_state("suspended")
    h.coordinator.fail("get", unavailable("get", TOPOLOGY))
    h.coordinator.set_state("connected")
    assert len(h.coordinator.calls("get")) == 1 and not h.follower.trusted
    h.clock.advance(RETRY_SECONDS)
    assert len(h.coordinator.calls("get")) == 2 and h.follower.trusted


# -- 9. what the registration says ------------------------------------------------------------------


def test_a_new_address_needs_acknowledging_at_the_same_generation() -> None:
    h = Harness().start(layout(5))
    h.follower.acknowledge(5)
    assert not h.follower.needs_acknowledging(5) and not h.follower.needs_acknowledging(None)
    h.info.update(addr="127.0.0.1:19001", id="127.0.0.1:19001-1")
    assert h.follower.needs_acknowledging(5) and h.follower.needs_acknowledging(None)
    h.follower.acknowledge(5)
    assert h.written()["addr"] == "127.0.0.1:19001" and h.written()["generation"] == 5
    assert not h.follower.needs_acknowledging(5)


def test_only_the_fields_that_matter_need_acknowledging() -> None:
    h = Harness().start(layout(5))
    h.follower.acknowledge(5)
    h.clock.advance(60)   # "updated" moves on: not a reason to write
    assert not h.follower.needs_acknowledging(5)
    h.info["workers"] = 2
    assert h.follower.needs_acknowledging(5)


# -- 10. leaving -------------------------------------------------------------------------------------


def test_stop_removes_the_registration_before_stopping_the_coordinator() -> None:
    h = Harness().start(layout(5))
    coordinator = h.coordinator
    coordinator.hold("remove")
    stopped = outcome(h.follower.stop())
    assert coordinator.calls("remove") == [("remove", REGISTRATION)]
    assert coordinator.calls("stop") == [] and stopped == []
    assert coordinator.watches[0].cancelled
    coordinator.release("remove")
    assert [event[0] for event in coordinator.events][-2:] == ["remove", "stop"]
    assert stopped == [None] and coordinator.state == "stopped"


def test_stop_cancels_pending_retries() -> None:
    h = Harness(fail_starts=1).start()
    stopped = outcome(h.follower.stop())
    assert stopped == [None]
    h.clock.advance(30)
    assert len(h.connector.made) == 1


def test_a_registration_made_after_stop_is_removed() -> None:
    h = Harness()
    h.connector.prepare = lambda coordinator: coordinator.hold("ephemeral")
    h.start(layout(5))
    coordinator = h.coordinator
    h.follower.stop()
    coordinator.release("ephemeral")
    assert coordinator.calls("remove") and coordinator.calls("watch") == []
