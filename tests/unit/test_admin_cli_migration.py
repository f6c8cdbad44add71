"""``twinproxy-admin``'s migration verbs: their requests, their text, ``migration wait``'s exit statuses.

Over real HTTP to the canned stand-in of test_admin_cli.py (a stdlib HTTP
server in a thread); ``wait`` also driven directly with a scripted client.
"""

from __future__ import annotations

import io
import json
from typing import Any, Dict, List

import pytest

from tests.unit.test_admin_cli import StandIn, run
from twinproxy.admin_cli import migrations
from twinproxy.admin_cli.http import Unreachable
from twinproxy.admin_cli.main import parser, request_for

ENTRY = {"id": 3, "first": 0, "last": 511, "from_group": 1, "to_group": 2, "state": "migrating", "cancelling": False,
         "keys_per_second": None, "parallel": None, "keys_moved": 1200, "keys_left": 800, "rate": 400.0, "eta": 2.0,
         "error": None, "paused": False, "owner": 2}


@pytest.fixture
def dashboard():
    stand_in = StandIn()
    yield stand_in
    stand_in.close()


@pytest.mark.parametrize("argv, expected", [
    (["slots", "migrate", "0-511", "2"], ("POST", "/api/slots/migrate", {"first": 0, "last": 511, "group": 2,
                                                                         "keys_per_second": None, "parallel": None},
                                          None)),
    (["slots", "migrate", "7", "3", "--keys-per-second", "500", "--parallel", "4"],
     ("POST", "/api/slots/migrate", {"first": 7, "last": 7, "group": 3, "keys_per_second": 500, "parallel": 4},
      None)),
    (["slots", "migrate", "0-9", "2", "--warmup-seconds", "3"],
     ("POST", "/api/slots/migrate", {"first": 0, "last": 9, "group": 2, "keys_per_second": None, "parallel": None,
                                     "warmup_seconds": 3}, None)),
    (["migration", "status"], ("GET", "/api/migrations", None, None)),
    (["migration", "pause"], ("POST", "/api/migrations/pause", None, None)),
    (["migration", "pause", "3"], ("POST", "/api/migrations/3/pause", None, None)),
    (["migration", "resume", "3"], ("POST", "/api/migrations/3/resume", None, None)),
    (["migration", "cancel"], ("POST", "/api/migrations/cancel", None, None)),
    (["migration", "cancel", "3"], ("POST", "/api/migrations/3/cancel", None, None)),
])
def test_each_migration_verb_makes_its_request(argv, expected):
    assert request_for(parser().parse_args(argv))[0] == expected


@pytest.mark.parametrize("argv", [["slots", "migrate", "0-511"], ["slots", "migrate", "0-511", "2",
                                                                   "--keys-per-second", "0"],
                                  ["migration", "pause", "x"], ["migration", "frob"],
                                  ["slots", "migrate", "0-9", "2", "--warmup-seconds", "-1"]])
def test_usage_errors_exit_2(argv, capsys):
    from twinproxy.admin_cli.main import main

    assert main(argv) == 2


def test_status_json_is_the_list(dashboard):
    dashboard.answers[("GET", "/api/migrations")] = (200, {"migrations": [ENTRY]})
    code, out, err = run(dashboard, "migration", "status", "--json")
    assert code == 0 and json.loads(out) == [ENTRY]
    code, out, err = run(dashboard, "migration", "status")
    assert code == 0 and "#3" in out and "1 -> 2" in out and "1200 moved, ~800 left, 400 keys/s, ETA 2s" in out


def test_migrate_and_cancel_text(dashboard):
    dashboard.answers[("POST", "/api/slots/migrate")] = (200, {"ok": True, "generation": 9, "migration": dict(
        ENTRY, state="pending")})
    code, out, _ = run(dashboard, "slots", "migrate", "0-511", "2")
    assert code == 0 and "queued as pending" in out and "migration wait 3" in out
    dashboard.answers[("POST", "/api/migrations/3/cancel")] = (200, {
        "ok": True, "generation": 10, "migration": dict(ENTRY, state="prepared", cancelling=True), "owner": 1,
        "note": "its keys move back to group 1"})
    code, out, _ = run(dashboard, "migration", "cancel", "3")
    assert code == 0 and "group 1's" in out and "move back" in out
    dashboard.answers[("POST", "/api/migrations/3/pause")] = (409, {"error": "cannot pause migration 3: it has "
                                                                             "ended (finished)"})
    code, _, err = run(dashboard, "migration", "pause", "3")
    assert code == 1 and "has ended" in err


class Scripted:
    """``get`` answers the documents in turn (an exception is raised), the last one forever."""

    def __init__(self, answers: List[Any]) -> None:
        self.answers = answers
        self.asked = 0

    def get(self, path: str) -> Dict[str, Any]:
        assert path == "/api/migrations"
        answer = self.answers[min(self.asked, len(self.answers) - 1)]
        self.asked += 1
        if isinstance(answer, Exception):
            raise answer
        return {"migrations": answer}


def waited(answers: List[Any], mid: Any = None, as_json: bool = False, patience: float = 60.0) -> tuple:
    out, err = io.StringIO(), io.StringIO()
    code = migrations.wait(Scripted(answers), mid, out, err, as_json, interval=0.001, unreachable=Unreachable,
                           patience=patience)
    return code, out.getvalue(), err.getvalue()


def test_wait_ends_0_when_finished_even_across_a_dashboard_restart():
    finished = dict(ENTRY, state="finished", keys_left=0)
    code, out, err = waited([[ENTRY], Unreachable("down"), [dict(ENTRY, keys_moved=1500)], [finished]])
    assert code == 0 and err == ""
    assert out.count("\n") == 3 and "1500 keys moved" in out and out.splitlines()[-1].endswith("owned by group 2")
    code, out, _ = waited([[ENTRY], [finished]], as_json=True)
    assert code == 0 and json.loads(out) == [finished]


def test_wait_ends_1_when_cancelled_or_failed_and_says_why():
    cancelled = dict(ENTRY, state="cancelled", owner=1)
    failed = dict(ENTRY, id=4, state="failed", error="the target is older", owner=1)
    code, out, err = waited([[ENTRY, dict(ENTRY, id=4, state="pending")], [cancelled, failed]])
    assert code == 1 and "ended cancelled" in err and "the target is older" in err and "group 1's" in err
    assert waited([[ENTRY], []])[0] == 1                      # gone from the topology
    assert waited([[ENTRY]], mid=9)[0] == 1                   # no such migration


def test_wait_with_nothing_to_wait_for_and_an_unreachable_dashboard():
    code, out, _ = waited([[dict(ENTRY, state="finished")]])
    assert code == 0 and "no migration in progress" in out
    code, _, err = waited([[ENTRY], Unreachable("cannot reach the dashboard")], patience=0.0)
    assert code == 3 and "cannot reach" in err


def test_a_memcache_migration_shows_its_warm_up_not_keys_moved():
    """A migration with warmup_seconds: its line and status row say how much warm-up is left."""
    warming = dict(ENTRY, keys_moved=0, keys_left=None, warmup_seconds=60, warmup_left=12.0, warmed=False)
    text = migrations.line(warming)
    assert "warming up, 12s of 1m 0s left" in text and "keys moved" not in text
    assert "warmed up, finishing" in migrations.line(dict(warming, warmed=True))
    status = migrations.status_text({"migrations": [warming, dict(warming, id=4, state="pending")]})
    assert "warming up, 12s of 1m 0s left" in status and "warm-up 1m 0s" in status
