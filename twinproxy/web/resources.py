"""The web dashboard's HTTP pieces shared by the cluster dashboard and a plain proxy (twisted.web).

Owns :class:`PageFiles` (the page and its assets from package data, the
version written into ``index.html`` so every asset URL changes with a new
release), :class:`EventStream` (``GET /api/events``: Server-Sent Events, or
JSON with ``format=json``; a reconnecting browser's ``Last-Event-ID`` gets
what it missed, and wins over ``?since=``), :func:`series_answer` (``GET /api/series``) and
:func:`json_body`.  The documents themselves are built by the dashboard
(``twinproxy/dashboard/webstate.py``) and by the proxy (``twinproxy/webstate.py``).
"""

from __future__ import annotations

import json
from importlib import resources as package_files
from typing import Any, Optional, Set

from twisted.internet.task import LoopingCall
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from twinproxy import __version__
from twinproxy.web.events import Event, EventLog
from twinproxy.web.series import MAX_POINTS, Series

VERSION_MARK = b"__TWINPROXY_VERSION__"
HEARTBEAT_SECONDS = 15.0
# Open event streams at most: each holds a connection and what its browser has not read yet.
MAX_STREAMS = 64
CONTENT_TYPES = {".html": b"text/html; charset=utf-8", ".js": b"text/javascript; charset=utf-8",
                 ".css": b"text/css; charset=utf-8", ".svg": b"image/svg+xml", ".png": b"image/png"}


def json_body(request: Any, status: int, document: Any) -> bytes:
    """``document`` as the JSON answer of ``request`` with ``status``; never cached by the browser."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(document, separators=(",", ":"), default=str).encode()


def _static(name: str) -> Optional[bytes]:
    if "/" in name or name.startswith(".") or not name:
        return None
    try:
        return package_files.files("twinproxy.web").joinpath("static").joinpath(name).read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


class PageFiles(Resource):
    """``/`` (index.html) and ``/<asset>``: the page's files; 404 for anything else."""

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        parts = [p for p in request.postpath if p]
        name = parts[0].decode("utf-8", "replace") if len(parts) == 1 else ("index.html" if not parts else "")
        body = _static(name)
        if body is None:
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"not found\n"
        suffix = name[name.rfind("."):]
        request.setHeader(b"content-type", CONTENT_TYPES.get(suffix, b"application/octet-stream"))
        if name == "index.html":
            request.setHeader(b"cache-control", b"no-cache")
            return body.replace(VERSION_MARK, __version__.encode())
        # Asset URLs carry ?v=<version>: a new release is a new URL, so they may be kept.
        request.setHeader(b"cache-control", b"max-age=86400")
        return body


class EventStream:
    """``GET /api/events`` over one :class:`EventLog`; ``close()`` ends every open stream (service stop)."""

    def __init__(self, log: EventLog, reactor: Any) -> None:
        self._log = log
        self._reactor = reactor
        self._streams: Set[Any] = set()
        self._heartbeat: Optional[LoopingCall] = None
        self._unlisten = log.listen(self._send)

    def render(self, request: Any) -> Any:
        """The answer to ``request`` (SSE unless ``format=json``)."""
        args = request.args or {}
        # The header wins: a reconnecting EventSource sends it with its original URL, whose ?since= is stale.
        since = _int(request.getHeader(b"last-event-id"))
        if since is None:
            since = _int((args.get(b"since") or [None])[0])
        if (args.get(b"format") or [b""])[0] == b"json":
            return json_body(request, 200, {"events": self._log.since(since), "last_id": self._log.last_id,
                                            "stream": self._log.stream})
        if len(self._streams) >= MAX_STREAMS:
            return json_body(request, 503, {"error": f"{MAX_STREAMS} event streams are open already: poll "
                                                     "/api/events?format=json instead"})
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-store")
        request.write(b"retry: 1000\n\n")
        for event in self._log.since(since):
            request.write(_frame(event))
        self._streams.add(request)
        request.notifyFinish().addBoth(lambda _: self._streams.discard(request))
        if self._heartbeat is None:
            # A comment line now and then finds the streams whose browser went away.
            self._heartbeat = LoopingCall(self._beat)
            self._heartbeat.clock = self._reactor
            self._heartbeat.start(HEARTBEAT_SECONDS, now=False)
        return NOT_DONE_YET

    def _write(self, request: Any, data: bytes) -> None:
        # A request whose connection went away may raise here before its notifyFinish fired: it leaves
        # the streams (an exception would otherwise stop the heartbeat's LoopingCall for good).
        try:
            request.write(data)
        except Exception:  # noqa: BLE001 - any failure to write ends that stream only
            self._streams.discard(request)

    def _send(self, event: Event) -> None:
        frame = _frame(event)
        for request in list(self._streams):
            self._write(request, frame)

    def _beat(self) -> None:
        for request in list(self._streams):
            self._write(request, b": keep-alive\n\n")

    def close(self) -> None:
        self._unlisten()
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        self._heartbeat = None
        for request in list(self._streams):
            self._streams.discard(request)
            try:
                request.finish()
            except Exception:  # noqa: BLE001 - already gone: nothing to end
                pass


def series_answer(request: Any, series: Series, now: float, period: float) -> bytes:
    """``GET /api/series?seconds=S`` (default 300, at most the buffer)."""
    seconds = _int((request.args.get(b"seconds") or [None])[0])
    if seconds is None or seconds <= 0:
        seconds = 300
    return json_body(request, 200, series.document(now, min(seconds, MAX_POINTS * period), period))


def _frame(event: Event) -> bytes:
    return b"id: %d\ndata: %s\n\n" % (event["id"], json.dumps(event, separators=(",", ":")).encode())


def _int(value: Any) -> Optional[int]:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None

