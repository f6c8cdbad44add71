"""The dashboard's HTTP JSON API (contract §5): routing, bodies, the write token, error answers.

Owns :func:`make_site` (the twisted.web Site: ``/api/...``, ``/metrics``
and ``/``, the web page: docs/web-dashboard.md), :class:`ApiState` (what the API answers
from: the controller once it has started, else why not) and the request
side of every write: the bearer-token check (``hmac.compare_digest``), the
JSON body (read and checked by :mod:`~twinproxy.dashboard.api_input`) and
the answer: 200 ``{"ok": true, "generation": N, ...}`` or
``{"error": "<one line>", ...}`` with 400/403/404/405/409/413/5xx.
What an operation does is the controller's; a refusal the API makes itself
(token, body, route) is logged here, one line per failed write, while the
controller logs the failures of the operations it runs.  Nothing here
blocks: the operations' Deferreds answer when they fire.  Slot migrations:
``POST /api/slots/migrate``, ``GET /api/migrations`` and ``POST
/api/migrations[/<id>]/pause|resume|cancel`` (without an id: every
migration that has not ended); ``POST /api/adopt`` (a twemproxy pool taken
over, or ``{"resume": true}``: its servers left queued again after a cancel
or a failure; :mod:`~twinproxy.dashboard.adoption`).
"""

from __future__ import annotations

import hmac
import json
from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from twinproxy.admin import Page
from twinproxy.cluster.slots import SLOT_COUNT
from twinproxy.dashboard.api_input import (  # noqa: F401 - ApiError, MAX_BODY, read_body: the API's names too
    MAX_BODY,
    ApiError,
    BoundedBody,
    body_fields,
    path_address,
    path_group,
    path_migration,
    query_args,
    query_flag,
    query_int,
    read_body,
)

WRITE_METHODS = ("POST", "PUT", "DELETE")
NO_TOKEN = "writes are disabled: the dashboard was started without --token-file"
_log = Logger()


class ApiState:
    """What the API serves from: ``controller`` once ``ready``; until then 503 with ``reason``."""

    def __init__(self, cluster: str, token: Optional[bytes]) -> None:
        self.cluster = cluster
        self.token = token
        self.controller: Any = None
        self.ready = False
        self.reason = "the dashboard is starting"
        # Told of every write request and its outcome: (method, path, client, body, status, error).
        self.audit: Optional[Callable[..., None]] = None

    def live(self) -> Any:
        """The started controller, or ApiError 503 saying why there is none."""
        if not self.ready or self.controller is None:
            raise ApiError(503, self.reason)
        return self.controller


# -- request bodies and parameters -------------------------------------------------


ROUTES: List[Tuple[Tuple[str, ...], Dict[str, str]]] = [
    (("status",), {"GET": "get_status"}),
    (("slots",), {"GET": "get_slots"}),
    (("topology",), {"GET": "get_topology"}),
    (("proxies",), {"GET": "get_proxies"}),
    (("groups",), {"POST": "add_group"}),
    (("groups", "{gid}"), {"DELETE": "remove_group"}),
    (("groups", "{gid}", "servers"), {"POST": "add_server"}),
    (("groups", "{gid}", "servers", "{addr}"), {"DELETE": "remove_server"}),
    (("groups", "{gid}", "promote"), {"POST": "promote"}),
    (("slots", "assign"), {"POST": "assign_slots"}),
    (("slots", "rebalance"), {"POST": "rebalance"}),
    (("proxies", "{id}"), {"DELETE": "remove_proxy"}),
    (("sentinels",), {"POST": "add_sentinel"}),
    (("sentinels", "{addr}"), {"DELETE": "remove_sentinel"}),
    (("slots", "migrate"), {"POST": "migrate"}),
    (("adopt",), {"POST": "adopt"}),
    (("migrations",), {"GET": "get_migrations"}),
    # The literal routes before the one with an id: /api/migrations/pause is "every migration".
    (("migrations", "pause"), {"POST": "pause_all"}),
    (("migrations", "resume"), {"POST": "resume_all"}),
    (("migrations", "cancel"), {"POST": "cancel_all"}),
    (("migrations", "{id}", "pause"), {"POST": "pause"}),
    (("migrations", "{id}", "resume"), {"POST": "resume"}),
    (("migrations", "{id}", "cancel"), {"POST": "cancel"}),
    (("migrations", "{id}", "throttle"), {"POST": "throttle"}),
    # POST forms of the removals, for the web page (docs/web-dashboard.md).
    (("groups", "{gid}", "remove"), {"POST": "remove_group_post"}),
    (("groups", "{gid}", "servers", "{addr}", "remove"), {"POST": "remove_server_post"}),
    (("proxies", "{id}", "remove"), {"POST": "remove_proxy_post"}),
    (("sentinels", "{addr}", "remove"), {"POST": "remove_sentinel_post"}),
]


def route(segments: List[str]) -> Tuple[Dict[str, str], List[str]]:
    """The methods of the route ``segments`` match and the segments its placeholders took; ApiError 404."""
    for pattern, methods in ROUTES:
        if len(pattern) == len(segments) and all(p.startswith("{") or p == s for p, s in zip(pattern, segments)):
            return methods, [s for p, s in zip(pattern, segments) if p.startswith("{")]
    shown = "/api/" + "/".join(segments)
    raise ApiError(404, f"no such API path {shown!r} (see GET /api/status)")


class _Handlers:
    """One method per route: reads answer a document, writes a Deferred from the controller."""

    def __init__(self, state: ApiState) -> None:
        self.state = state

    def get_status(self, request: Any) -> Any:
        query_args(request, ())
        return self.state.live().status()

    def get_slots(self, request: Any) -> Any:
        values = query_args(request, ("first", "last"))
        first = query_int(values, "first", 0)
        last = query_int(values, "last", SLOT_COUNT - 1)
        return self.state.live().slots(first, last)

    def get_topology(self, request: Any) -> Any:
        query_args(request, ())
        topology = self.state.live().topology
        if topology is None:
            raise ApiError(503, "the dashboard has not loaded the topology yet")
        return topology.to_dict()

    def get_proxies(self, request: Any) -> Any:
        query_args(request, ())
        return {"proxies": self.state.live().proxies()}

    def add_group(self, request: Any) -> Any:
        fields = body_fields(request, "add_group")
        return self.state.live().add_group(fields["id"])

    def remove_group(self, request: Any, gid: str) -> Any:
        return self.state.live().remove_group(path_group(gid))

    def add_server(self, request: Any, gid: str) -> Any:
        group = path_group(gid)
        return self.state.live().add_server(group, body_fields(request, "add_server")["addr"])

    def remove_server(self, request: Any, gid: str, addr: str) -> Any:
        return self.state.live().remove_server(path_group(gid), path_address(addr))

    def promote(self, request: Any, gid: str) -> Any:
        group = path_group(gid)
        return self.state.live().promote(group, body_fields(request, "promote")["addr"])

    def assign_slots(self, request: Any) -> Any:
        fields = body_fields(request, "assign_slots")
        if fields["first"] > fields["last"]:
            raise ApiError(400, f"slot range {fields['first']}-{fields['last']}: the first slot is after the last")
        return self.state.live().assign_slots(fields["first"], fields["last"], fields["group"],
                                              fields.get("force", False))

    def rebalance(self, request: Any) -> Any:
        fields = body_fields(request, "rebalance")
        return self.state.live().rebalance(fields.get("dry_run", False), fields.get("keys_per_second"),
                                           fields.get("parallel"))

    def remove_proxy(self, request: Any, proxy_id: str) -> Any:
        force = query_flag(query_args(request, ("force",)), "force")
        if not proxy_id:
            raise ApiError(400, "the proxy id in the path is empty")
        return self.state.live().remove_proxy(proxy_id, force)

    def add_sentinel(self, request: Any) -> Any:
        return self.state.live().add_sentinel(body_fields(request, "add_sentinel")["addr"])

    def remove_sentinel(self, request: Any, addr: str) -> Any:
        return self.state.live().remove_sentinel(path_address(addr))

    def migrate(self, request: Any) -> Any:
        fields = body_fields(request, "migrate")
        if fields["first"] > fields["last"]:
            raise ApiError(400, f"slot range {fields['first']}-{fields['last']}: the first slot is after the last")
        live = self.state.live()
        args = (fields["first"], fields["last"], fields["group"], fields.get("keys_per_second"), fields.get("parallel"))
        if fields.get("warmup_seconds") is None:
            return live.migrate(*args)
        # A memcache cluster's warm-up (a Redis cluster's migration refuses it: 400).
        return live.migrator.migrate(*args, fields["warmup_seconds"])

    def adopt(self, request: Any) -> Any:
        from twinproxy.dashboard.adoption import RequestError, parse_request

        try:
            wanted = parse_request(read_body(request))
        except RequestError as err:
            raise ApiError(400, str(err))
        return self.state.live().migrator.adopt(wanted)

    def get_migrations(self, request: Any) -> Any:
        query_args(request, ())
        return self.state.live().migrations()

    def _migration_action(self, request: Any, action: str, mid: Optional[str]) -> Any:
        body_fields(request, "migration_action")
        query_args(request, ())
        return getattr(self.state.live(), action)(None if mid is None else path_migration(mid))

    def pause_all(self, request: Any) -> Any:
        return self._migration_action(request, "pause", None)

    def resume_all(self, request: Any) -> Any:
        return self._migration_action(request, "resume", None)

    def cancel_all(self, request: Any) -> Any:
        return self._migration_action(request, "cancel", None)

    def pause(self, request: Any, mid: str) -> Any:
        return self._migration_action(request, "pause", mid)

    def resume(self, request: Any, mid: str) -> Any:
        return self._migration_action(request, "resume", mid)

    def cancel(self, request: Any, mid: str) -> Any:
        return self._migration_action(request, "cancel", mid)

    def throttle(self, request: Any, mid: str) -> Any:
        query_args(request, ())
        rate = body_fields(request, "throttle")["keys_per_second"]
        return self.state.live().migrator.throttle(path_migration(mid), rate)

    def _no_body(self, request: Any) -> None:
        body_fields(request, "migration_action")
        query_args(request, ())

    def remove_group_post(self, request: Any, gid: str) -> Any:
        self._no_body(request)
        return self.remove_group(request, gid)

    def remove_server_post(self, request: Any, gid: str, addr: str) -> Any:
        self._no_body(request)
        return self.remove_server(request, gid, addr)

    def remove_proxy_post(self, request: Any, proxy_id: str) -> Any:
        query_args(request, ())
        force = body_fields(request, "remove_proxy").get("force", False)
        if not proxy_id:
            raise ApiError(400, "the proxy id in the path is empty")
        return self.state.live().remove_proxy(proxy_id, force)

    def remove_sentinel_post(self, request: Any, addr: str) -> Any:
        self._no_body(request)
        return self.remove_sentinel(request, addr)


def check_token(request: Any, token: Optional[bytes]) -> None:
    """ApiError 403 without a token file, without a bearer token (with the challenge) or for a wrong one."""
    if token is None:
        raise ApiError(403, NO_TOKEN)
    challenge = {"WWW-Authenticate": 'Bearer realm="twinproxy-dashboard"'}
    header = request.getHeader(b"authorization")
    if header is None:
        raise ApiError(403, "writes need 'Authorization: Bearer <token>', the token being the content of the "
                       "dashboard's --token-file", challenge)
    if isinstance(header, str):
        header = header.encode("latin-1", "replace")
    scheme, _, given = header.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not given.strip():
        raise ApiError(403, "the Authorization header must be 'Bearer <token>'", challenge)
    if not hmac.compare_digest(given.strip(), token):
        raise ApiError(403, "wrong token: it is not the content of the dashboard's --token-file")


class ApiResource(Resource):
    """``/api/...``: every path below it, routed by :data:`ROUTES`."""

    isLeaf = True

    def __init__(self, state: ApiState) -> None:
        super().__init__()
        self.state = state
        self.handlers = _Handlers(state)

    def render(self, request: Any) -> Any:
        method = _text(request.method).upper()
        shown = f"{method} {_text(getattr(request, 'path', b'/api'))}"
        write = method in WRITE_METHODS
        try:
            segments = [_segment(part) for part in request.postpath]
            while segments and segments[-1] == "":
                segments.pop()           # /api/status/ is /api/status
            methods, params = route(segments)
            allowed = sorted({*methods, *(["HEAD"] if "GET" in methods else [])})
            handler_name = methods.get("GET" if method == "HEAD" else method)
            if handler_name is None:
                raise ApiError(405, f"{shown} is not allowed here (allowed: {', '.join(allowed)})",
                               {"Allow": ", ".join(allowed)})
            if write:
                check_token(request, self.state.token)
            result = getattr(self.handlers, handler_name)(request, *params)
        except ApiError as err:
            if write:
                _log.warn("cluster {cluster}: {request} from {client} refused ({status}): {reason}",
                          cluster=self.state.cluster, request=shown, client=_client(request), status=err.status,
                          reason=err.message)
            self._audit(request, write, err.status, err.message)
            return _answer(request, err.status, {"error": err.message}, err.headers)
        except Exception as err:  # noqa: BLE001 - OperationError from a read, or a bug: answered all the same
            status, document = _failure_answer(Failure(err), shown, logged=False)
            self._audit(request, write, status, document.get("error"))
            return _answer(request, status, document)
        if not hasattr(result, "addCallbacks"):
            self._audit(request, write, 200, None)
            return _answer(request, 200, result)
        return _deferred_answer(request, result, shown, self.state.cluster,
                                lambda status, error: self._audit(request, write, status, error))

    def _audit(self, request: Any, write: bool, status: int, error: Optional[str]) -> None:
        if write and self.state.audit is not None:
            try:
                self.state.audit(_text(request.method).upper(), _text(getattr(request, "path", b"/api")),
                                 _client(request), request, status, error)
            except Exception:  # noqa: BLE001 - the audit trail's bug must not change the answer
                _log.failure("the audit of a write failed")


def _deferred_answer(request: Any, result: Any, shown: str, cluster: str,
                     audit: Callable[[int, Optional[str]], None]) -> Any:
    gone: List[Any] = []
    request.notifyFinish().addErrback(gone.append)   # the client hung up: the operation goes on

    def send(status: int, document: Dict[str, Any]) -> None:
        audit(status, document.get("error") if status >= 400 and isinstance(document, dict) else None)
        if not gone:
            request.write(_answer(request, status, document))
            request.finish()

    def done(document: Any) -> None:
        generation = document.get("generation") if isinstance(document, dict) else None
        _log.info("cluster {cluster}: {request} from {client} done (generation {generation})", cluster=cluster,
                  request=shown, client=_client(request), generation=generation)
        send(200, document)

    def failed(failure: Failure) -> None:
        # The controller logged an operation's failure already (one line per failed write).
        send(*_failure_answer(failure, shown, logged=True))

    result.addCallbacks(done, failed)
    return NOT_DONE_YET


def _failure_answer(failure: Failure, shown: str, logged: bool) -> Tuple[int, Dict[str, Any]]:
    """(status, body) for an error from the controller: its own status when it has one, else 500."""
    error = failure.value
    status = getattr(error, "status", None)
    message = getattr(error, "message", None)
    if isinstance(status, int) and 400 <= status <= 599 and isinstance(message, str):
        body = error.body() if hasattr(error, "body") else {"error": message}
        return status, body
    if isinstance(error, ApiError):
        return error.status, {"error": error.message}
    if not logged or not isinstance(status, int):
        _log.failure("{request}: unexpected error", failure, request=shown)
    return 500, {"error": f"internal error: {failure.getErrorMessage()}"}


def _answer(request: Any, status: int, document: Any, headers: Optional[Dict[str, str]] = None) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    for name, value in (headers or {}).items():
        request.setHeader(name.encode(), value.encode())
    return json.dumps(document).encode() + b"\n"


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _segment(part: Any) -> str:
    try:
        return part.decode("utf-8") if isinstance(part, bytes) else str(part)
    except UnicodeDecodeError:
        raise ApiError(400, f"path segment {part!r} is not UTF-8")


def _client(request: Any) -> str:
    address = request.getClientAddress()
    host = getattr(address, "host", None)
    return f"{host}:{address.port}" if host is not None else str(address)


class _Root(Resource):
    """``/``: the web page (``/``, ``/dashboard/`` and the page's assets), ``/api/...``, ``/metrics``."""

    def __init__(self, page: Resource) -> None:
        super().__init__()
        self.page = page

    def getChild(self, path: bytes, request: Any) -> Resource:
        if path != b"dashboard":
            request.postpath.insert(0, path)     # the page's file is named by this segment
        return self.page


class _Api(Resource):
    """``/api/``: the web page's documents (``web``: state, series, events) before the JSON API's routes."""

    def __init__(self, api: Resource, web: Dict[bytes, Resource]) -> None:
        super().__init__()
        self.api = api
        self.web = web

    def getChild(self, path: bytes, request: Any) -> Resource:
        if path in self.web and not request.postpath:
            return self.web[path]
        request.postpath.insert(0, path)
        return self.api

    def render(self, request: Any) -> Any:
        return self.api.render(request)


class DashboardSite(Site):
    """A Site with bounded request bodies and no access log (every write is logged by the API)."""

    noisy = False
    displayTracebacks = False

    def getContentFile(self, length: Optional[int]) -> Any:
        return BoundedBody(MAX_BODY, length)

    def log(self, request: Any) -> None:
        pass


def make_site(state: ApiState, metrics: Optional[Callable[[], bytes]] = None,
              metrics_type: str = "text/plain; version=0.0.4; charset=utf-8",
              web: Optional[Dict[bytes, Resource]] = None) -> DashboardSite:
    """The dashboard's Site: ``/api/...`` from ``state`` (and ``web``), ``/metrics`` from ``metrics()``, ``/``."""
    from twinproxy.web.resources import PageFiles

    root = _Root(PageFiles())
    root.putChild(b"api", _Api(ApiResource(state), web or {}))
    if metrics is not None:
        def page(request: Any) -> bytes:
            request.setHeader(b"content-type", metrics_type.encode())
            return metrics()

        root.putChild(b"metrics", Page(page))
    return DashboardSite(root)
