"""The dashboard API's migration routes (twinproxy/dashboard/api.py) against a stand-in controller."""

from __future__ import annotations

from typing import Any, Dict, Optional

import pytest
from twisted.internet import defer

from tests.unit.dashboard.test_api import TOKEN, StandIn, answer, request
from twinproxy.dashboard.api import ApiState, make_site
from twinproxy.dashboard.errors import OperationError


class Migrating(StandIn):
    """The stand-in, with the migration operations (reads and pause/resume answer at once, as the real ones)."""

    def migrations(self) -> Dict[str, Any]:
        self.calls.append(("migrations", ()))
        return {"migrations": [{"id": 1, "state": "pending"}]}

    def migrate(self, *args: Any) -> defer.Deferred:
        self.calls.append(("migrate", args))
        if isinstance(self.result, Exception):
            return defer.fail(self.result)
        return defer.succeed({"ok": True, "generation": 8, "migration": {"id": 1}})

    @property
    def migrator(self) -> Any:
        stand_in = self

        class Migrator:
            @staticmethod
            def migrate(*args: Any) -> defer.Deferred:
                stand_in.calls.append(("migrator.migrate", args))
                if isinstance(stand_in.result, Exception):
                    return defer.fail(stand_in.result)
                return defer.succeed({"ok": True, "generation": 8, "migration": {"id": 1}})

        return Migrator()

    def pause(self, mid: Optional[int]) -> Dict[str, Any]:
        self.calls.append(("pause", (mid,)))
        if isinstance(self.result, Exception):
            raise self.result
        return {"ok": True, "generation": 8, "paused": [mid or 1]}

    def resume(self, mid: Optional[int]) -> Dict[str, Any]:
        self.calls.append(("resume", (mid,)))
        return {"ok": True, "generation": 8, "resumed": [mid or 1]}

    def cancel(self, mid: Optional[int]) -> defer.Deferred:
        self.calls.append(("cancel", (mid,)))
        return defer.succeed({"ok": True, "generation": 9, "owner": 1})


@pytest.fixture
def api():
    controller = Migrating()
    state = ApiState("shop", TOKEN)
    state.controller = controller
    state.ready = True
    return controller, make_site(state).resource


@pytest.mark.parametrize("method, path, body, call", [
    ("POST", "/api/slots/migrate", {"first": 0, "last": 511, "group": 2}, ("migrate", (0, 511, 2, None, None))),
    ("POST", "/api/slots/migrate", {"first": 3, "last": 3, "group": 2, "keys_per_second": 100, "parallel": 4},
     ("migrate", (3, 3, 2, 100, 4))),
    ("POST", "/api/slots/migrate", {"first": 3, "last": 3, "group": 2, "keys_per_second": None, "parallel": None},
     ("migrate", (3, 3, 2, None, None))),
    ("POST", "/api/slots/migrate", {"first": 3, "last": 9, "group": 2, "warmup_seconds": 3},
     ("migrator.migrate", (3, 9, 2, None, None, 3))),
    ("POST", "/api/slots/migrate", {"first": 3, "last": 9, "group": 2, "warmup_seconds": None},
     ("migrate", (3, 9, 2, None, None))),
    ("GET", "/api/migrations", None, ("migrations", ())),
    ("POST", "/api/migrations/pause", None, ("pause", (None,))),
    ("POST", "/api/migrations/7/pause", None, ("pause", (7,))),
    ("POST", "/api/migrations/resume", {}, ("resume", (None,))),
    ("POST", "/api/migrations/7/resume", None, ("resume", (7,))),
    ("POST", "/api/migrations/cancel", None, ("cancel", (None,))),
    ("POST", "/api/migrations/7/cancel", None, ("cancel", (7,))),
])
def test_each_route_reaches_its_operation(api, method, path, body, call):
    controller, root = api
    status, _ = answer(request(root, method, path, body))
    assert status == 200 and controller.calls == [call]


@pytest.mark.parametrize("path, body, words", [
    ("/api/slots/migrate", {"first": 0, "last": 511}, "needs the field 'group'"),
    ("/api/slots/migrate", {"first": 0, "last": 511, "group": None}, "group id"),
    ("/api/slots/migrate", {"first": 9, "last": 3, "group": 2}, "after the last"),
    ("/api/slots/migrate", {"first": 0, "last": 1024, "group": 2}, "slot"),
    ("/api/slots/migrate", {"first": 0, "last": 5, "group": 2, "keys_per_second": 0}, "keys_per_second"),
    ("/api/slots/migrate", {"first": 0, "last": 5, "group": 2, "parallel": "4"}, "parallel"),
    ("/api/slots/migrate", {"first": 0, "last": 5, "group": 2, "speed": 1}, "unknown field 'speed'"),
    ("/api/slots/migrate", {"first": 0, "last": 5, "group": 2, "warmup_seconds": -1}, "warmup_seconds"),
    ("/api/slots/migrate", {"first": 0, "last": 5, "group": 2, "warmup_seconds": "3"}, "warmup_seconds"),
    ("/api/migrations/x/pause", None, "not a positive number"),
    ("/api/migrations/0/cancel", None, "not a positive number"),
    ("/api/migrations/1/pause", {"now": True}, "unknown field 'now'"),
])
def test_bad_requests_are_400(api, path, body, words):
    controller, root = api
    status, document = answer(request(root, "POST", path, body))
    assert status == 400 and words in document["error"], document
    assert controller.calls == []


def test_writes_need_the_token_and_refusals_keep_their_status(api):
    controller, root = api
    assert answer(request(root, "POST", "/api/migrations/pause", token=None))[0] == 403
    assert answer(request(root, "POST", "/api/slots/migrate", {"first": 0, "last": 1, "group": 2},
                          token=b"guess"))[0] == 403
    assert answer(request(root, "GET", "/api/migrations", token=None))[0] == 200      # a read
    assert answer(request(root, "GET", "/api/migrations/pause"))[0] == 405
    controller.result = OperationError(409, "slots 0-9 are in migration 1 already")
    status, document = answer(request(root, "POST", "/api/slots/migrate", {"first": 0, "last": 9, "group": 2}))
    assert (status, document) == (409, {"error": "slots 0-9 are in migration 1 already"})
    controller.result = OperationError(404, "there is no migration 5")
    assert answer(request(root, "POST", "/api/migrations/5/pause")) == (404, {"error": "there is no migration 5"})


def test_a_warm_up_asked_of_a_redis_cluster_is_its_400(api):
    """The model's refusal (a Redis cluster has no warm-up) comes back as the 400 it is."""
    controller, root = api
    controller.result = OperationError(400, "warmup_seconds is for memcache clusters: a Redis cluster's keys are "
                                            "moved, not warmed up")
    status, document = answer(request(root, "POST", "/api/slots/migrate",
                                      {"first": 0, "last": 9, "group": 2, "warmup_seconds": 3}))
    assert status == 400 and "memcache clusters" in document["error"]
