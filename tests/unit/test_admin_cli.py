"""``twinproxy-admin`` (twinproxy/admin_cli): arguments, requests, rendering, exit statuses.

The requests go over real HTTP to a canned stand-in (a stdlib HTTP server in
a thread, answering what each test tells it), so urllib, the headers and the
error paths are the real ones; the rendering is checked on canned
``/api/status`` objects.
"""

from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Tuple

import pytest

from tests.servers import free_port
from twinproxy.admin_cli import render
from twinproxy.admin_cli.http import base_url, segment
from twinproxy.admin_cli.main import main, parser, request_for

STATUS: Dict[str, Any] = {
    "cluster": "shop", "protocol": "redis", "generation": 12,
    "groups": [{"id": 1, "servers": [{"addr": "127.0.0.1:6379", "role": "master", "up": True},
                                     {"addr": "127.0.0.1:6380", "role": "replica", "up": False,
                                      "error": "connection refused"}], "slots": 512},
               {"id": 2, "servers": [], "slots": 0}],
    "slots": [{"first": 0, "last": 511, "group": 1, "state": "stable"},
              {"first": 512, "last": 1023, "group": None, "state": "stable"}],
    "offline_slots": 512, "slots_per_group": {"1": 512},
    "proxies": [{"id": "127.0.0.1:19000-4242", "addr": "127.0.0.1:19000", "admin": "127.0.0.1:22222",
                 "generation": 12, "last_seen": 997.0, "pid": 4242, "host": "h"},
                {"id": "127.0.0.1:19001-4243", "addr": "127.0.0.1:19001", "admin": None, "generation": 11,
                 "last_seen": 700.0, "pid": 4243, "host": "h"}],
    "sentinels": [], "dashboard": {"addr": "127.0.0.1:18080", "pid": 123, "host": "h", "start": 900.0},
    "change": None, "writable": True, "lagging": ["127.0.0.1:19001-4243"],
}


class StandIn:
    """A canned dashboard: ``answers[(method, path)] = (status, document or raw bytes)``; records requests."""

    def __init__(self) -> None:
        self.answers: Dict[Tuple[str, str], Tuple[int, Any]] = {}
        self.seen: List[Dict[str, Any]] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                stand_in.seen.append({"method": self.command, "path": self.path,
                                      "auth": self.headers.get("authorization"),
                                      "body": json.loads(body) if body else None})
                status, document = stand_in.answers.get((self.command, self.path.partition("?")[0]),
                                                        (404, {"error": "no such API path"}))
                data = document if isinstance(document, bytes) else json.dumps(document).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _any

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()
        self.address = f"127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def dashboard():
    stand_in = StandIn()
    yield stand_in
    stand_in.close()


def run(dashboard: Optional[StandIn], *args: str, address: Optional[str] = None) -> Tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["--dashboard", address or dashboard.address, "--timeout", "5", *args], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


# -- arguments ------------------------------------------------------------------------


@pytest.mark.parametrize("argv, expected", [
    (["status"], ("GET", "/api/status", None, None)),
    (["group", "add", "3"], ("POST", "/api/groups", {"id": 3}, None)),
    (["group", "remove", "3"], ("DELETE", "/api/groups/3", None, None)),
    (["server", "add", "3", "127.0.0.1:6390"], ("POST", "/api/groups/3/servers", {"addr": "127.0.0.1:6390"}, None)),
    (["server", "remove", "3", "[::1]:6390"], ("DELETE", "/api/groups/3/servers/%5B::1%5D:6390", None, None)),
    (["server", "promote", "3", "127.0.0.1:6391"], ("POST", "/api/groups/3/promote", {"addr": "127.0.0.1:6391"},
                                                   None)),
    (["slots", "assign", "0-511", "1"], ("POST", "/api/slots/assign", {"first": 0, "last": 511, "group": 1,
                                                                       "force": False}, None)),
    (["slots", "assign", "7", "offline", "--force"], ("POST", "/api/slots/assign", {"first": 7, "last": 7,
                                                                                    "group": None, "force": True},
                                                      None)),
    (["slots", "show"], ("GET", "/api/slots", None, None)),
    (["slots", "show", "10-20"], ("GET", "/api/slots", None, {"first": 10, "last": 20})),
    (["slots", "rebalance", "--dry-run"], ("POST", "/api/slots/rebalance", {"dry_run": True}, None)),
    (["slots", "rebalance"], ("POST", "/api/slots/rebalance", {"dry_run": False}, None)),
    (["slots", "rebalance", "--keys-per-second", "500", "--parallel", "2"],
     ("POST", "/api/slots/rebalance", {"dry_run": False, "keys_per_second": 500, "parallel": 2}, None)),
    (["proxy", "list"], ("GET", "/api/proxies", None, None)),
    (["proxy", "remove", "127.0.0.1:19000-42", "--force"], ("DELETE", "/api/proxies/127.0.0.1:19000-42", None,
                                                           {"force": 1})),
    (["sentinel", "add", "127.0.0.1:26379"], ("POST", "/api/sentinels", {"addr": "127.0.0.1:26379"}, None)),
    (["sentinel", "remove", "127.0.0.1:26379"], ("DELETE", "/api/sentinels/127.0.0.1:26379", None, None)),
])
def test_each_verb_makes_its_request(argv, expected):
    assert request_for(parser().parse_args(argv))[0] == expected


def test_global_options_go_before_or_after_the_verb():
    args = parser().parse_args(["--dashboard", "h:1", "status", "--json", "--token-file", "t"])
    assert (args.dashboard, args.json, args.token_file) == ("h:1", True, "t")
    args = parser().parse_args(["--json", "status"])
    assert args.json and args.dashboard == "127.0.0.1:18080" and args.token_file is None


@pytest.mark.parametrize("argv", [
    [], ["frobnicate"], ["group"], ["group", "add"], ["group", "add", "x"], ["slots", "assign", "0-2000", "1"],
    ["slots", "assign", "9-3", "1"], ["server", "add", "1", "nohost"], ["--timeout", "0", "status"],
])
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    assert "twinproxy-admin" in capsys.readouterr().err


def test_bad_dashboard_address_and_token_file_exit_2(tmp_path, capsys):
    assert main(["--dashboard", "https://h:1", "status"]) == 2
    assert "plain http" in capsys.readouterr().err
    assert main(["--dashboard", "h:1", "--token-file", str(tmp_path / "none"), "group", "add", "1"]) == 2
    assert "cannot read the token file" in capsys.readouterr().err
    assert base_url("http://127.0.0.1:18080/") == "http://127.0.0.1:18080"
    assert segment("127.0.0.1:1/x") == "127.0.0.1:1%2Fx"


# -- exit statuses and output ------------------------------------------------------------


def test_status_json_prints_exactly_the_api_object(dashboard):
    dashboard.answers[("GET", "/api/status")] = (200, STATUS)
    code, out, err = run(dashboard, "status", "--json")
    assert code == 0 and json.loads(out) == STATUS and err == ""
    assert dashboard.seen[0]["auth"] is None          # reads send no token


def test_a_write_sends_the_token_and_prints_what_it_did(dashboard, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    dashboard.answers[("POST", "/api/groups/1/servers")] = (200, {"ok": True, "generation": 4, "role": "replica",
                                                                  "notes": ["127.0.0.1:6380 told REPLICAOF x"],
                                                                  "problems": ["sentinel s did not answer"]})
    code, out, err = run(dashboard, "--token-file", str(token), "server", "add", "1", "127.0.0.1:6380")
    assert code == 0
    assert dashboard.seen[0]["auth"] == "Bearer s3cret" and dashboard.seen[0]["body"] == {"addr": "127.0.0.1:6380"}
    assert out.startswith("ok: 127.0.0.1:6380 added to group 1 as its replica (generation 4)")
    assert "told REPLICAOF" in out and "warning: sentinel s did not answer" in err


@pytest.mark.parametrize("status, body, expected", [
    (401, {"error": "writes need 'Authorization: Bearer <token>'"},
     "twinproxy-admin: writes need 'Authorization: Bearer <token>' (give --token-file FILE)\n"),
    (409, {"error": "group 1 owns 512 slots"}, "twinproxy-admin: group 1 owns 512 slots\n"),
    (504, {"error": "proxies p did not acknowledge", "lagging": ["p"]},
     "twinproxy-admin: proxies p did not acknowledge\ntwinproxy-admin: lagging proxies: p\n"),
    (503, {"error": "the coordinator session is suspended"}, "twinproxy-admin: the coordinator session is suspended\n"),
])
def test_a_refused_operation_exits_1_with_the_apis_reason(dashboard, status, body, expected):
    dashboard.answers[("DELETE", "/api/groups/1")] = (status, body)
    code, out, err = run(dashboard, "group", "remove", "1")
    assert (code, out, err) == (1, "", expected)


def test_a_refusal_with_json_prints_the_error_object_too(dashboard):
    dashboard.answers[("POST", "/api/groups")] = (409, {"error": "group 1 already exists"})
    code, out, err = run(dashboard, "--json", "group", "add", "1")
    assert (code, json.loads(out), err) == (1, {"error": "group 1 already exists"},
                                            "twinproxy-admin: group 1 already exists\n")


def test_unreachable_exits_3():
    code, out, err = run(None, "status", address=f"127.0.0.1:{free_port()}")
    assert code == 3 and out == "" and err.startswith("twinproxy-admin: cannot reach the dashboard at http://127.0.0.1:")


def test_something_else_answering_exits_3(dashboard):
    dashboard.answers[("GET", "/api/status")] = (200, b"<html>not a dashboard</html>")
    code, _, err = run(dashboard, "status")
    assert code == 3 and "is not the dashboard's JSON" in err


# -- rendering ------------------------------------------------------------------------------


def test_status_text():
    text = render.status_text(STATUS, now=1000.0)
    lines = text.splitlines()
    assert lines[0] == "cluster shop (redis), generation 12"
    assert "dashboard 127.0.0.1:18080 (pid 123 on host h, started 1m 40s ago)" in lines
    assert "  group 1: 512 slots, 2 servers" in lines
    assert any(line.split() == ["master", "up", "127.0.0.1:6379"] for line in lines)
    assert any(line.split()[:3] == ["replica", "down", "127.0.0.1:6380"] and "connection refused" in line
               for line in lines)
    assert "  group 2: 0 slots, 0 servers" in lines
    assert "slots (512 offline):" in lines
    assert any(line.split() == ["0-511", "group", "1"] for line in lines)
    assert any(line.split() == ["512-1023", "offline"] for line in lines)
    proxy_lines = [line for line in lines if "127.0.0.1:1900" in line]
    assert "generation 12" in proxy_lines[0] and "last seen 3s ago" in proxy_lines[0]
    assert "BEHIND" in proxy_lines[1] and "last seen 5m 0s ago" in proxy_lines[1]


def test_status_text_of_a_dashboard_that_cannot_write_and_a_held_slot():
    status = dict(STATUS, writable=False, problem="the coordinator session is suspended", proxies=[],
                  slots=[{"first": 0, "last": 1023, "group": 1, "state": "held"}],
                  change={"op": "promote", "group": 1, "server": "127.0.0.1:6380", "step": "held"})
    text = render.status_text(status, now=1000.0)
    assert "NOT WRITABLE: the coordinator session is suspended" in text
    assert "change in progress: op promote, group 1, server 127.0.0.1:6380, step held" in text
    assert "group 1 (held)" in text and "(none registered)" in text


@pytest.mark.parametrize("seconds, text", [(0, "0s ago"), (59, "59s ago"), (61, "1m 1s ago"), (3700, "1h 1m ago"),
                                           (90000, "1d 1h ago"), (-5, "0s ago")])
def test_ago(seconds, text):
    assert render.ago(1000.0 - seconds, 1000.0) == text
    assert render.ago(None, 1000.0) == "never"


def test_plan_and_slots_text():
    plan = {"ok": True, "generation": 3, "applied": False, "plan": [{"first": 0, "last": 511, "group": 1}],
            "placements": [], "moves": [], "note": "an older dashboard's note"}
    text = render.plan_text(plan)
    assert text.startswith("not applied, generation 3") and "0-511  group 1" in text and "(none)" in text
    assert "note: an older dashboard's note" in text and "migration wait" not in text
    assert render.slots_text({"slots": [{"first": 5, "last": 5, "group": None, "state": "stable"}]}) == "5  offline\n"


REBALANCED = {
    "ok": True, "generation": 9, "applied": True,
    "plan": [{"first": 342, "last": 511, "group": 3}, {"first": 853, "last": 1023, "group": 3}], "placements": [],
    "moves": [{"first": 342, "last": 511, "from_group": 1, "group": 3},
              {"first": 853, "last": 1023, "from_group": 2, "group": 3}],
    "migrations": [{"id": 4, "first": 342, "last": 511, "from_group": 1, "to_group": 3, "state": "pending"},
                   {"id": 5, "first": 853, "last": 1023, "from_group": 2, "to_group": 3, "state": "pending"}],
    "notes": ["migration 2 has not ended: its slots count for the group it ends at and are not planned again"],
}


def test_plan_text_names_the_queued_migrations_and_how_to_follow_them():
    text = render.plan_text(REBALANCED)
    lines = text.splitlines()
    assert lines[0] == "applied, generation 9"
    assert "owned slots moving, a migration each:" in lines
    assert "  342-511   group 1 -> group 3" in lines and "  853-1023  group 2 -> group 3" in lines
    assert "migrations queued (2):" in lines
    assert "  #4  slots 342-511   group 1 -> 3  pending" in lines
    assert "follow them with: twinproxy-admin migration wait" in lines
    assert lines[-1].startswith("note: migration 2 has not ended")
    dry = dict(REBALANCED, applied=False, migrations=[], notes=[])
    text = render.plan_text(dry)
    assert "owned slots that would move:" in text and "group 1 -> group 3" in text and "migration wait" not in text


def test_a_rebalance_stopped_midway_names_what_it_queued(dashboard, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    body = {"error": "rebalance stopped: migration 4 queued; queueing migration 2 of 2 (...) failed: coordinator "
                     "unavailable", "migrations": [REBALANCED["migrations"][0]], "failed": REBALANCED["moves"][1],
            "not_queued": []}
    dashboard.answers[("POST", "/api/slots/rebalance")] = (503, body)
    code, out, err = run(dashboard, "--token-file", str(token), "slots", "rebalance", "--parallel", "2")
    assert code == 1 and out == "" and dashboard.seen[0]["body"] == {"dry_run": False, "parallel": 2}
    assert err.splitlines() == [f"twinproxy-admin: {body['error']}",
                                "twinproxy-admin: migrations queued: #4 (follow them with: twinproxy-admin migration "
                                "wait)"]
