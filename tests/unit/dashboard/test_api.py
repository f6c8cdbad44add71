"""The dashboard's HTTP API (twinproxy/dashboard/api.py): routing, bodies, the token, error answers.

Driven with twisted.web's DummyRequest against a stand-in controller written
here (our own component: these tests are about the API's side of the
contract, the controller has its own tests); no reactor, no sockets.
"""

from __future__ import annotations

import io
import json
from typing import Any, Dict, List, Optional, Tuple

import pytest
from twisted.internet import defer
from twisted.web.resource import getChildForRequest
from twisted.web.test.requesthelper import DummyRequest

from twinproxy.dashboard.api import MAX_BODY, NO_TOKEN, ApiState, make_site
from twinproxy.dashboard.api_input import BoundedBody
from twinproxy.dashboard.errors import OperationError

TOKEN = b"s3cret"
STATUS = {"cluster": "shop", "protocol": "redis", "generation": 7, "groups": [], "slots": [], "offline_slots": 1024,
          "slots_per_group": {}, "proxies": [], "sentinels": [], "dashboard": {}, "change": None}


class StandIn:
    """Records each call; answers with ``result`` (a dict, an OperationError, or a Deferred to fire later)."""

    def __init__(self) -> None:
        self.calls: List[Tuple[str, tuple]] = []
        self.result: Any = None
        self.topology: Any = _Topology()

    def status(self) -> Dict[str, Any]:
        return dict(STATUS)

    def slots(self, first: int, last: int) -> Dict[str, Any]:
        self.calls.append(("slots", (first, last)))
        if first > last:
            raise OperationError(400, f"slot range {first}-{last}: the first slot is after the last")
        return {"slots": [{"first": first, "last": last, "group": None, "state": "stable"}]}

    def proxies(self) -> List[Dict[str, Any]]:
        return [{"id": "p1", "generation": 7}]

    def __getattr__(self, name: str) -> Any:
        if name not in ("add_group", "remove_group", "add_server", "remove_server", "promote", "assign_slots",
                        "rebalance", "remove_proxy", "add_sentinel", "remove_sentinel"):
            raise AttributeError(name)

        def operation(*args: Any) -> defer.Deferred:
            self.calls.append((name, args))
            if isinstance(self.result, defer.Deferred):
                return self.result
            if isinstance(self.result, Exception):
                return defer.fail(self.result)
            return defer.succeed(self.result or {"ok": True, "generation": 8})

        return operation


class _Topology:
    def to_dict(self) -> Dict[str, Any]:
        return {"cluster": "shop", "generation": 7}


@pytest.fixture
def api():
    controller = StandIn()
    state = ApiState("shop", TOKEN)
    state.controller = controller
    state.ready = True
    return state, controller, make_site(state, metrics=lambda: b"metric 1\n").resource


def request(root: Any, method: str, path: str, body: Any = None, token: Optional[bytes] = TOKEN,
            args: Optional[Dict[str, str]] = None, raw: Optional[bytes] = None) -> DummyRequest:
    """Render ``method path`` the way Site does (child lookup, then render); the request, answered or not."""
    req = DummyRequest([part.encode() for part in path.lstrip("/").split("/")])
    req.method = method.encode()
    req.path = path.encode()
    if token is not None:
        req.requestHeaders.setRawHeaders(b"authorization", [b"Bearer " + token])
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else b"")
    req.content = io.BytesIO(data)
    for name, value in (args or {}).items():
        req.addArg(name.encode(), value.encode())
    req.render(getChildForRequest(root, req))
    return req


def answer(req: DummyRequest) -> Tuple[int, Any]:
    assert req.finished, "not answered"
    return req.responseCode or 200, json.loads(b"".join(req.written))


# -- reads -------------------------------------------------------------------------


def test_reads_are_open_and_answer_the_controllers_documents(api):
    state, controller, root = api
    assert answer(request(root, "GET", "/api/status", token=None)) == (200, STATUS)
    assert answer(request(root, "GET", "/api/status/", token=None)) == (200, STATUS)   # trailing slash
    assert answer(request(root, "GET", "/api/topology", token=None)) == (200, {"cluster": "shop", "generation": 7})
    assert answer(request(root, "GET", "/api/proxies", token=None)) == (200, {"proxies": [{"id": "p1",
                                                                                           "generation": 7}]})
    status, body = answer(request(root, "GET", "/api/slots", token=None, args={"first": "3", "last": "9"}))
    assert status == 200 and body["slots"][0]["first"] == 3 and controller.calls[-1] == ("slots", (3, 9))
    request(root, "GET", "/api/slots", token=None)
    assert controller.calls[-1] == ("slots", (0, 1023))


def test_read_errors(api):
    _, _, root = api
    assert answer(request(root, "GET", "/api/slots", args={"first": "x"}))[0] == 400
    status, body = answer(request(root, "GET", "/api/slots", args={"first": "9", "last": "3"}))
    assert status == 400 and "after the last" in body["error"]           # the controller's OperationError
    status, body = answer(request(root, "GET", "/api/slots", args={"frist": "1"}))
    assert status == 400 and "frist" in body["error"]
    status, body = answer(request(root, "GET", "/api/nothing"))
    assert status == 404 and "/api/nothing" in body["error"]
    assert request(root, "GET", "/nothing").responseCode == 404                # the page has no such file


def test_not_ready_is_503_with_the_reason(api):
    state, _, root = api
    state.ready = False
    state.reason = "waiting for the lock of cluster 'shop'"
    assert answer(request(root, "GET", "/api/status")) == (503, {"error": "waiting for the lock of cluster 'shop'"})
    assert answer(request(root, "POST", "/api/groups", {"id": 1}))[0] == 503


def test_wrong_method_is_405_with_allow(api):
    _, _, root = api
    req = request(root, "GET", "/api/groups")
    status, body = answer(req)
    assert status == 405 and "POST" in body["error"]
    assert req.responseHeaders.getRawHeaders(b"allow") == [b"POST"]
    req = request(root, "PUT", "/api/status")
    assert answer(req)[0] == 405 and req.responseHeaders.getRawHeaders(b"allow") == [b"GET, HEAD"]


# -- the token ---------------------------------------------------------------------


def test_writes_need_the_bearer_token(api):
    _, controller, root = api
    req = request(root, "POST", "/api/groups", {"id": 1}, token=None)
    status, body = answer(req)
    assert status == 403 and "Bearer" in body["error"]
    assert req.responseHeaders.getRawHeaders(b"www-authenticate")
    status, body = answer(request(root, "POST", "/api/groups", {"id": 1}, token=b"guess"))
    assert status == 403 and "wrong token" in body["error"]
    req = request(root, "DELETE", "/api/groups/1", token=None)
    req_basic = DummyRequest([b"api", b"groups"])
    req_basic.method = b"POST"
    req_basic.content = io.BytesIO(b'{"id": 1}')
    req_basic.requestHeaders.setRawHeaders(b"authorization", [b"Basic " + TOKEN])
    req_basic.render(getChildForRequest(root, req_basic))
    assert answer(req)[0] == 403 and answer(req_basic)[0] == 403
    assert controller.calls == []                                           # nothing reached the controller


def test_without_a_token_file_every_write_is_403(api):
    state, controller, root = api
    state.token = None
    assert answer(request(root, "POST", "/api/groups", {"id": 1})) == (403, {"error": NO_TOKEN})
    assert answer(request(root, "GET", "/api/status"))[0] == 200
    assert controller.calls == []


# -- writes ------------------------------------------------------------------------


@pytest.mark.parametrize("method, path, body, args, call", [
    ("POST", "/api/groups", {"id": 3}, None, ("add_group", (3,))),
    ("DELETE", "/api/groups/3", None, None, ("remove_group", (3,))),
    ("POST", "/api/groups/3/servers", {"addr": "127.0.0.1:6390"}, None, ("add_server", (3, "127.0.0.1:6390"))),
    ("DELETE", "/api/groups/3/servers/127.0.0.1:6390", None, None, ("remove_server", (3, "127.0.0.1:6390"))),
    ("POST", "/api/groups/3/promote", {"addr": "127.0.0.1:6391"}, None, ("promote", (3, "127.0.0.1:6391"))),
    ("POST", "/api/slots/assign", {"first": 0, "last": 511, "group": 1}, None, ("assign_slots", (0, 511, 1, False))),
    ("POST", "/api/slots/assign", {"first": 5, "last": 5, "group": None, "force": True}, None,
     ("assign_slots", (5, 5, None, True))),
    ("POST", "/api/slots/rebalance", {"dry_run": True}, None, ("rebalance", (True, None, None))),
    ("POST", "/api/slots/rebalance", None, None, ("rebalance", (False, None, None))),
    ("POST", "/api/slots/rebalance", {"keys_per_second": 500, "parallel": 2}, None, ("rebalance", (False, 500, 2))),
    ("DELETE", "/api/proxies/127.0.0.1:19000-42", None, {"force": "1"}, ("remove_proxy", ("127.0.0.1:19000-42", True))),
    ("DELETE", "/api/proxies/127.0.0.1:19000-42", None, None, ("remove_proxy", ("127.0.0.1:19000-42", False))),
    ("POST", "/api/sentinels", {"addr": "127.0.0.1:26379"}, None, ("add_sentinel", ("127.0.0.1:26379",))),
    ("DELETE", "/api/sentinels/127.0.0.1:26379", None, None, ("remove_sentinel", ("127.0.0.1:26379",))),
    ("DELETE", "/api/sentinels/[::1]:26379", None, None, ("remove_sentinel", ("[::1]:26379",))),
])
def test_each_write_reaches_its_operation(api, method, path, body, args, call):
    _, controller, root = api
    assert answer(request(root, method, path, body, args=args)) == (200, {"ok": True, "generation": 8})
    assert controller.calls == [call]


@pytest.mark.parametrize("path, body, words", [
    ("/api/groups", {}, "needs the field 'id'"),
    ("/api/groups", {"id": "3"}, "group id must be an integer"),
    ("/api/groups", {"id": 0}, "group id must be an integer from 1 to 9999"),
    ("/api/groups", {"id": True}, "group id must be an integer"),
    ("/api/groups", {"id": 3, "name": "x"}, "unknown field 'name'"),
    ("/api/groups", [3], "must be a JSON object"),
    ("/api/groups/x/servers", {"addr": "127.0.0.1:1"}, "group id 'x' in the path is not a number"),
    ("/api/groups/3/servers", {"addr": "localhost"}, "is not 'host:port'"),
    ("/api/groups/3/servers", {"addr": "127.0.0.1:0"}, "needs a port"),
    ("/api/groups/3/servers", {"addr": 6379}, "non-empty 'host:port'"),
    ("/api/slots/assign", {"first": 0, "last": 1024, "group": 1}, "0 to 1023"),
    ("/api/slots/assign", {"first": 9, "last": 3, "group": 1}, "first slot is after the last"),
    ("/api/slots/assign", {"first": 0, "last": 3}, "needs the field 'group'"),
    ("/api/slots/assign", {"first": 0, "last": 3, "group": 1, "force": "yes"}, "true or false"),
    ("/api/slots/rebalance", {"dry_run": 1}, "true or false"),
    ("/api/slots/rebalance", {"keys_per_second": 0}, "keys_per_second"),
    ("/api/slots/rebalance", {"parallel": 65}, "parallel"),
    ("/api/slots/rebalance", {"speed": 1}, "unknown field 'speed'"),
])
def test_bad_bodies_are_400_with_a_reason(api, path, body, words):
    _, controller, root = api
    status, answer_body = answer(request(root, "POST", path, body))
    assert status == 400 and words in answer_body["error"], answer_body
    assert controller.calls == []


def test_body_that_is_not_json_and_too_large(api):
    _, controller, root = api
    status, body = answer(request(root, "POST", "/api/groups", raw=b"{id: 3"))
    assert status == 400 and "not JSON" in body["error"]
    assert answer(request(root, "POST", "/api/groups", raw=b"\xff\xfe"))[0] == 400
    big = json.dumps({"id": 1, "pad": "x" * MAX_BODY}).encode()
    status, body = answer(request(root, "POST", "/api/groups", raw=big))
    assert status == 413 and str(MAX_BODY) in body["error"]
    assert controller.calls == []
    assert answer(request(root, "DELETE", "/api/proxies/p1", args={"force": "maybe"}))[0] == 400


def test_bounded_body_drops_what_passes_the_limit():
    declared = BoundedBody(10, 11)
    assert declared.too_large
    streamed = BoundedBody(10, None)
    streamed.write(b"12345")
    assert not streamed.too_large
    streamed.write(b"123456")
    assert streamed.too_large and streamed.getvalue() == b"12345"


@pytest.mark.parametrize("error, status, extra", [
    (OperationError(404, "there is no group 9"), 404, {}),
    (OperationError(409, "group 1 owns 512 slots"), 409, {}),
    (OperationError(503, "coordinator unavailable"), 503, {}),
    (OperationError(504, "proxies p1 did not acknowledge", {"lagging": ["p1"], "generation": 9}), 504,
     {"lagging": ["p1"], "generation": 9}),
    (OperationError(800, "a Codis-style status"), 500, None),
    (RuntimeError("a bug"), 500, None),
])
def test_operation_errors_keep_their_status_and_fields(api, error, status, extra):
    _, controller, root = api
    controller.result = error
    code, body = answer(request(root, "POST", "/api/groups", {"id": 1}))
    assert code == status
    if extra is not None:
        assert body == {"error": error.message, **extra}
    else:
        assert body["error"].startswith("internal error")


def test_an_operation_answers_when_its_deferred_fires(api):
    _, controller, root = api
    controller.result = defer.Deferred()
    req = request(root, "POST", "/api/groups/1/promote", {"addr": "127.0.0.1:1"})
    assert not req.finished
    controller.result.callback({"ok": True, "generation": 12, "group": 1})
    assert answer(req) == (200, {"ok": True, "generation": 12, "group": 1})


def test_a_client_that_hung_up_gets_nothing_written(api):
    _, controller, root = api
    controller.result = defer.Deferred()
    req = request(root, "POST", "/api/groups", {"id": 1})
    req.processingFailed(Exception("connection lost"))     # what the channel does on a lost connection
    controller.result.callback({"ok": True, "generation": 2})
    assert req.written == []


def test_metrics_and_the_root(api):
    _, _, root = api
    req = DummyRequest([b"metrics"])
    req.render(getChildForRequest(root, req))
    assert b"".join(req.written) == b"metric 1\n"
    assert req.responseHeaders.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    for path in ([b""], [b"dashboard", b""]):
        req = DummyRequest(path)
        req.render(getChildForRequest(root, req))
        assert b"app.js?v=" in b"".join(req.written)                     # the web page


def test_one_log_line_per_failed_write(api):
    from twisted.logger import globalLogPublisher

    state, controller, root = api
    events: List[Dict[str, Any]] = []
    observer = events.append
    globalLogPublisher.addObserver(observer)
    try:
        request(root, "POST", "/api/groups", {"id": 1}, token=None)         # refused by the API: it logs
        request(root, "POST", "/api/groups", {"id": "x"})
        request(root, "GET", "/api/slots", args={"first": "x"})              # a read: not logged
    finally:
        globalLogPublisher.removeObserver(observer)
    mine = [event for event in events if event.get("log_namespace") == "twinproxy.dashboard.api"]
    assert [(event["status"], event["request"]) for event in mine] == [(403, "POST /api/groups"),
                                                                        (400, "POST /api/groups")]
