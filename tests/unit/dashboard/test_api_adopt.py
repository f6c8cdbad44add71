"""``POST /api/adopt`` (twinproxy/dashboard/api.py, adoption.py): a pool, or ``{"resume": true}``; the body's
checks, what each shape asks of the topology, and :func:`adoption.queue` against a stand-in controller (the
new entries paused, the answer saying what was queued)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Dict, List

import pytest
from twisted.internet import defer

from tests.unit.cluster.test_adopt_model import LEGACY, A, B, C
from tests.unit.dashboard.test_api import TOKEN, StandIn, answer, request
from twinproxy.cluster import migrations
from twinproxy.cluster.legacy import legacy_router
from twinproxy.cluster.model import Topology, TopologyError
from twinproxy.dashboard import adoption
from twinproxy.dashboard.adoption import AdoptRequest, RequestError, parse_request
from twinproxy.dashboard.api import ApiState, make_site
from twinproxy.dashboard.controller import Controller
from twinproxy.dashboard.errors import OperationError

pytestmark = pytest.mark.timeout(30)
POOL = {"pool": "shop", "hash": "fnv1a_64", "distribution": "ketama", "hash_tag": None,
        "servers": [{"address": A, "name": "a", "weight": 1}, {"address": B, "name": "b", "weight": 2}]}


class Adopting(StandIn):
    """The stand-in controller, with a migrator whose ``adopt`` records the request."""

    @property
    def migrator(self) -> Any:
        stand_in = self

        class Migrator:
            @staticmethod
            def adopt(wanted: AdoptRequest) -> defer.Deferred:
                stand_in.calls.append(("adopt", (wanted,)))
                if isinstance(stand_in.result, Exception):
                    return defer.fail(stand_in.result)
                return defer.succeed({"ok": True, "generation": 9, "migrations": [{"id": 4}], "resumed": True})

        return Migrator()


@pytest.fixture
def api():
    controller = Adopting()
    state = ApiState("shop", TOKEN)
    state.controller = controller
    state.ready = True
    return controller, make_site(state).resource


def test_a_pool_and_a_resume_reach_the_migrator(api) -> None:
    controller, root = api
    status, document = answer(request(root, "POST", "/api/adopt", dict(POOL, cluster="shop")))
    assert status == 200 and document["generation"] == 9
    (name, (first,)), = controller.calls
    assert name == "adopt" and not first.resume
    assert first.legacy.servers == ((1, "a", 1), (2, "b", 2)) and first.addresses == [A, B]
    assert (first.pool, first.cluster, first.keys_per_second, first.rate_given) == ("shop", "shop", None, False)
    controller.calls.clear()
    assert answer(request(root, "POST", "/api/adopt", {"resume": True, "cluster": "shop", "pool": "shop",
                                                       "keys_per_second": 300}))[0] == 200
    (_, (resume,)), = controller.calls
    assert resume.resume and resume.legacy is None and resume.addresses == []
    assert (resume.pool, resume.cluster, resume.keys_per_second, resume.rate_given) == ("shop", "shop", 300, True)


def test_a_refusal_keeps_its_status(api) -> None:
    controller, root = api
    controller.result = OperationError(409, "the adoption of pool 'shop' is under way")
    assert answer(request(root, "POST", "/api/adopt", {"resume": True})) == (
        409, {"error": "the adoption of pool 'shop' is under way"})
    assert answer(request(root, "POST", "/api/adopt", {"resume": True}, token=None))[0] == 403


@pytest.mark.parametrize("body, words", [
    ({"resume": True, "servers": []}, "unknown field servers (a resume takes resume, pool, cluster"),
    ({"resume": "yes"}, "resume must be true or false"),
    ({"resume": True, "cluster": 7}, "cluster must be a non-empty string"),
    ({"resume": True, "pool": ""}, "pool must be a non-empty string"),
    ({"resume": True, "keys_per_second": 0}, "keys_per_second"),
    ({}, "missing field pool, hash, distribution, hash_tag, servers"),
    (dict(POOL, resume=False, speed=1), "unknown field speed"),
    (dict(POOL, cluster=""), "cluster must be a non-empty string"),
])
def test_bad_bodies_are_400(api, body, words) -> None:
    controller, root = api
    status, document = answer(request(root, "POST", "/api/adopt", body))
    assert status == 400 and words in document["error"], document
    assert controller.calls == []


POOL3 = dict(POOL, servers=POOL["servers"] + [{"address": C, "name": "c", "weight": 1}])


def ended() -> Topology:
    """Pool POOL3 adopted at 900 keys/s, every entry cancelled."""
    topology = parse_request(dict(POOL3, keys_per_second=900)).edit(Topology.empty("shop", "redis"))
    return topology.cancel_migration(1).cancel_migration(2).cancel_migration(3)


def test_what_each_shape_asks_of_the_topology() -> None:
    full = parse_request(POOL3)
    # The first adoption: no rate given, none before.
    first = full.edit(Topology.empty("shop", "redis"))
    assert first == migrations.adopt(Topology.empty("shop", "redis"), full.legacy, [A, B, C])
    assert {m.keys_per_second for m in first.migrations} == {None}
    # The same pool again, or a resume: the servers left, at the adoption's latest rate unless told another.
    for again in (full, parse_request({"resume": True}), parse_request({"resume": True, "pool": "shop"})):
        assert [(m.from_group, m.keys_per_second) for m in again.edit(ended()).migrations if not m.ended] == [
            (1, 900), (2, 900), (3, 900)]
    unlimited = parse_request({"resume": True, "keys_per_second": None}).edit(ended())
    assert {m.keys_per_second for m in unlimited.migrations if not m.ended} == {None}
    with pytest.raises(TopologyError) as caught:
        parse_request({"resume": True, "cluster": "cart"}).edit(ended())
    assert caught.value.status == 409 and caught.value.message == "this dashboard serves cluster 'shop', not 'cart'"
    with pytest.raises(TopologyError) as caught:
        parse_request({"resume": True, "pool": "cart"}).edit(ended())
    assert caught.value.status == 409 and "has adopted pool 'shop', not 'cart'" in caught.value.message
    with pytest.raises(TopologyError) as caught:
        parse_request(dict(POOL3, hash="md5")).edit(ended())
    assert caught.value.status == 409 and "does not match it" in caught.value.message
    with pytest.raises(RequestError):
        parse_request([])


# -- adoption.queue, against a stand-in controller --------------------------------------------------------------


class Ctl:
    """What queue uses of the controller: the topology, its writes (at once), no proxies to wait for."""

    dry = staticmethod(Controller.dry)
    ack_timeout = 1.0

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.operations: List[str] = []

    def check_writable(self) -> None:
        pass

    def current(self) -> Topology:
        return self.topology

    def write(self, edit: Any) -> defer.Deferred:
        self.topology = self.dry(edit, self.topology)
        return defer.succeed(self.topology)

    def wait_acks(self, topology: Topology, what: str) -> defer.Deferred:
        return defer.succeed(None)

    def _operation(self, name: str, function: Any, *args: Any) -> defer.Deferred:
        self.operations.append(name)
        return defer.maybeDeferred(function, *args)

    def ok(self, topology: Topology, **extra: Any) -> Dict[str, Any]:
        return {"ok": True, "generation": topology.generation, **extra}


class Manager:
    def __init__(self, topology: Topology) -> None:
        self.ctl = Ctl(topology)
        self.entries: Dict[int, Any] = {}
        self.book = SimpleNamespace(get=lambda mid: self.entries.setdefault(mid, SimpleNamespace(paused=False)),
                                    write=lambda: defer.succeed(None))

    def idle(self, give_up: Any, timeout: Any = None) -> defer.Deferred:
        return defer.succeed(None)

    def merged(self, m: Any) -> Dict[str, Any]:
        return {"id": m.id, "from_group": m.from_group, "state": m.state, "keys_per_second": m.keys_per_second,
                "paused": self.book.get(m.id).paused}


def queued(manager: Manager, wanted: AdoptRequest) -> Any:
    results: List[Any] = []
    adoption.queue(manager, wanted).addBoth(results.append)
    assert results, "queue did not answer"
    return results[0]


def test_a_resume_queues_the_servers_left_paused_and_says_so() -> None:
    start = migrations.adopt(Topology.empty("shop", "redis"), LEGACY, [A, B, C])
    moved = start.advance_migration(1).advance_migration(1).advance_migration(1)     # group 3 done
    manager = Manager(moved.cancel_migration(2).cancel_migration(3))
    result = queued(manager, parse_request({"resume": True, "cluster": "shop", "keys_per_second": 50}))
    assert result["resumed"] is True and result["pool"] == "shop" and result["done"] == [3]
    assert [(m["id"], m["from_group"], m["state"], m["keys_per_second"], m["paused"]) for m in result["migrations"]] \
        == [(4, 1, "pending", 50, True), (5, 2, "pending", 50, True)]
    assert result["migration"]["id"] == 4 and result["generation"] == manager.ctl.topology.generation
    assert manager.ctl.operations == ["resume the adoption of pool 'shop'"]
    assert [mid for mid, entry in manager.entries.items() if entry.paused] == [4, 5]
    # Asked again: refused, nothing queued twice.
    again = queued(manager, parse_request({"resume": True}))
    assert isinstance(again.value, OperationError) and again.value.status == 409
    assert "adoption 4 (group 1's keys) is pending" in again.value.message
    assert len(manager.ctl.topology.migrations) == 5


def test_a_first_adoption_answers_resumed_false() -> None:
    manager = Manager(Topology.empty("shop", "redis"))
    wanted = parse_request(dict(POOL, cluster="shop"))
    result = queued(manager, wanted)
    assert result["resumed"] is False and result["done"] == []
    assert [(m["from_group"], m["paused"]) for m in result["migrations"]] == [(1, True), (2, True)]
    assert manager.ctl.operations == ["adopt pool 'shop'"]
    refused = queued(Manager(Topology.empty("shop", "redis")), parse_request(dict(POOL, cluster="cart")))
    assert refused.value.status == 409 and "serves cluster 'shop', not 'cart'" in refused.value.message


# -- a memcached pool -----------------------------------------------------------------------------------------


def test_a_memcached_pool_is_adopted_by_a_memcache_cluster_only_with_its_warm_up() -> None:
    wanted = parse_request(dict(POOL3, protocol="memcache", warmup_seconds=7))
    first = wanted.edit(Topology.empty("shop", "memcache"))
    assert [(m.from_group, m.warmup_seconds, m.keys_per_second) for m in first.migrations] == [
        (1, 7, None), (2, 7, None), (3, 7, None)]
    for pool, cluster in ((dict(POOL3, protocol="memcache"), "redis"), (dict(POOL3, protocol="redis"), "memcache")):
        with pytest.raises(TopologyError) as caught:
            parse_request(pool).edit(Topology.empty("shop", cluster))
        assert caught.value.status == 409 and "adopt it into a cluster of its protocol" in caught.value.message
    for body, words in ((dict(POOL3, protocol="mc"), "protocol must be redis or memcache"),
                        (dict(POOL3, warmup_seconds=-1), "warmup_seconds must be null or an integer")):
        with pytest.raises(RequestError) as refused:
            parse_request(body)
        assert words in str(refused.value)
    # A resume keeps the latest warm-up unless told another.
    cancelled = first.cancel_migration(1).cancel_migration(2).cancel_migration(3)
    for body, seconds in (({"resume": True}, 7), ({"resume": True, "warmup_seconds": 2}, 2)):
        assert {m.warmup_seconds for m in parse_request(body).edit(cancelled).migrations if not m.ended} == {seconds}


def test_a_memcache_entry_deletes_leftovers_only_after_a_cancel_of_its_server() -> None:
    first = parse_request(dict(POOL3, protocol="memcache")).edit(Topology.empty("shop", "memcache"))
    assert adoption.leftovers_of(first, first.migration(1)) is None
    moving = first.advance_migration(1).advance_migration(1)
    again = parse_request({"resume": True}).edit(moving.cancel_migration(1).advance_migration(1)
                                                 .cancel_migration(2).cancel_migration(3))
    entry = next(m for m in again.migrations if m.from_group == 1 and not m.ended)
    addresses, belongs = adoption.leftovers_of(again, entry)
    assert addresses == [B, C]
    place = legacy_router(again.adopted, [1, 2, 3])
    keys = [b"k%d" % i for i in range(200)]
    assert [belongs(key) for key in keys] == [place(key) == 1 for key in keys] and any(map(belongs, keys))
    later = next(m for m in again.migrations if m.from_group == 2 and not m.ended)
    assert adoption.leftovers_of(again, later) is not None          # group 2's entry was cancelled too (pending)
