"""The etcd coordinator backend: etcd 3.4+'s v3 JSON gateway from the reactor, no threads.

Owns: :class:`EtcdCoordinator`.  A key is the URL's prefix plus the path;
versions are mod_revisions; create, set and delete are transactions (a
compare on create_revision or mod_revision, the current key read back when
it fails, to tell Conflict from NotFound).  ``set`` keeps a key's lease
(``ignore_lease``), so an ephemeral stays one.

The session is a lease of ``session_timeout`` seconds (what etcd grants, if
more), kept alive every TTL/3.  With no successful keepalive for 2/3 of the
TTL the state is "suspended" (etcd tells a frozen or cut-off client
nothing: the client has to notice by itself); when etcd says the lease is
gone, "lost", then a new lease is granted, the held ephemerals are made
again under it and the state is "connected".

Watches share one watch stream over the whole prefix (a pool of its own);
an event on a key tells the watches covering it to read again.  The stream
is opened again when it ends and whenever the session recovers, and every
watch reads again once it is back, so nothing missed meanwhile stays missed.

A stream can also die without a word (a half-open connection) while the
lease's keepalives still get through.  So every watch also reads again
every few seconds (``resync``: one range per watch), which bounds how long
a change can go unseen; and a stream is taken for dead, closed and opened
again, when such a read found a change the stream has not reported one
resync later (its messages carry the store revision), or when it has been
silent for twice etcd's progress-notification interval (progress
notifications are asked for).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet import defer, task
from twisted.python.failure import Failure

from twinproxy.coordinator import (
    Conflict,
    CoordinatorError,
    CoordinatorURL,
    Node,
    NotFound,
    Unavailable,
    direct_children,
)
from twinproxy.coordinator.base import Coordinator, Watch
from twinproxy.coordinator.etcd_http import EtcdError, EtcdHTTP, WatchStream
from twinproxy.coordinator.etcd_keys import b64, prefix_end, unb64

STREAM_RETRY_MIN = 0.1
STREAM_RETRY_MAX = 1.0
# Every watch reads again this often at most (less with a short session: TTL / 2, at least 1 s).
RESYNC_MAX = 5.0
# etcd's default --experimental-watch-progress-notify-interval: an idle stream hears at least this often.
PROGRESS_INTERVAL = 600.0
# etcd's gRPC code for "requested lease not found".
_NOT_FOUND = 5


class EtcdCoordinator(Coordinator):
    """``etcd://h1:2379,h2:2379/prefix`` through the JSON gateway."""

    def __init__(self, parsed: CoordinatorURL, reactor: Any) -> None:
        super().__init__(parsed, reactor)
        self._prefix = parsed.root.encode()
        self._http = EtcdHTTP(reactor, parsed.hosts, self.timeout, parsed.username, parsed.password)
        self._lease: Optional[str] = None
        self._ttl = max(1, math.ceil(self.session_timeout))
        self._keepalive: Optional[task.LoopingCall] = None
        self._keepalive_busy = False
        self._suspend_call: Any = None
        self._renewing = False
        self._stream: Optional[WatchStream] = None
        self._stream_retry = STREAM_RETRY_MIN
        self._stream_call: Any = None
        self._stream_opening: Optional[defer.Deferred] = None
        self._resync: Optional[task.LoopingCall] = None
        self._running = False  # between _start and _stop: a stream opened after that is closed at once

    def _key(self, path: str) -> bytes:
        return self._prefix + path.encode()

    def _path(self, key: bytes) -> Optional[str]:
        if not key.startswith(self._prefix + b"/"):
            return None
        return key[len(self._prefix):].decode("utf-8", "replace")

    def _translate(self, error: BaseException, operation: str, path: str) -> Optional[CoordinatorError]:
        if isinstance(error, EtcdError):
            return Unavailable(self.url, operation, path, f"etcd at {self._http.endpoint}: {error}")
        return Unavailable(self.url, operation, path, f"etcd at {self._http.endpoint}: {_describe(error)}")

    # -- the session (a lease) --------------------------------------------------

    def _start(self) -> "defer.Deferred[None]":
        self._running = True
        return self._grant().addCallback(lambda _: self._begin())

    def _grant(self) -> "defer.Deferred[None]":
        d = self._http.call("lease/grant", {"TTL": self._ttl}, idempotent=True)  # a lease unused just expires

        def granted(answer: Dict[str, Any]) -> None:
            if answer.get("error"):
                raise EtcdError(str(answer["error"]), 0, 200)
            self._lease = str(answer["ID"])
            self._ttl = max(self._ttl, int(answer.get("TTL", self._ttl)))

        return d.addCallback(granted)

    def _begin(self) -> None:
        """A lease is granted: keep it alive, watch for changes, say connected."""
        self._alive()
        if self._keepalive is None:
            self._keepalive = task.LoopingCall(self._send_keepalive)
            self._keepalive.clock = self._reactor
            self._keepalive.start(self._ttl / 3.0, now=False)
        if self._resync is None:
            self._resync = task.LoopingCall(self._resync_watches)
            self._resync.clock = self._reactor
            self._resync.start(self.resync_interval, now=False)
        self._set_state("connected")
        self._restart_stream()

    def _alive(self) -> None:
        """A keepalive (or grant) succeeded: suspended only if none succeeds for 2/3 of the TTL."""
        if self._suspend_call is not None and self._suspend_call.active():
            self._suspend_call.cancel()
        self._suspend_call = self._reactor.callLater(self._ttl * 2.0 / 3.0, self._suspend)

    @property
    def resync_interval(self) -> float:
        return min(RESYNC_MAX, max(1.0, self._ttl / 2.0))

    def _suspend(self) -> None:
        if self._target_state == "connected":
            self._set_state("suspended")

    def _send_keepalive(self) -> None:
        if self._keepalive_busy or self._lease is None or self.state == "stopped":
            return
        self._keepalive_busy = True
        lease = self._lease
        # Its own timeout (not _bounded's translation): etcd's own error must stay visible below.
        d = self._http.call("lease/keepalive", {"ID": lease}, idempotent=True)
        d.addTimeout(self._ttl / 3.0, self._reactor)

        def answered(answer: Dict[str, Any]) -> None:
            if lease != self._lease:
                return
            result = answer.get("result", answer)
            if int(result.get("TTL", 0)) > 0:
                self._alive()
                if self._target_state == "suspended":
                    self._set_state("connected")
                    self._restart_stream()  # the old stream may be dead without a word
            else:
                self._lost("the lease expired")

        def failed(failure: Failure) -> None:
            if failure.check(EtcdError) and failure.value.code == _NOT_FOUND and lease == self._lease:
                self._lost("the lease is gone")
            else:
                # A keepalive that hung may have left a half-dead connection: the next one tries elsewhere.
                self._http.rotate()

        d.addCallbacks(answered, failed)
        d.addBoth(lambda _: setattr(self, "_keepalive_busy", False))

    def _lost(self, reason: str) -> None:
        if self.state == "stopped":
            return
        self._log.warn("{url}: session lost: {reason}", url=self.url, reason=reason)
        self._lease = None
        if self._suspend_call is not None and self._suspend_call.active():
            self._suspend_call.cancel()
        self._set_state("lost")
        self._renew()

    def _renew(self) -> None:
        if self._renewing or self.state == "stopped":
            return
        self._renewing = True
        d = self._bounded(self._grant(), "grant", "/")

        def granted(_: Any) -> None:
            self._alive()
            self._restart_stream()
            self._session_renewed()

        def failed(failure: Failure) -> None:
            self._log.info("{url}: new lease: {error}", url=self.url, error=failure.getErrorMessage())
            self._reactor.callLater(self._ttl / 3.0, self._renew)

        d.addBoth(lambda result: setattr(self, "_renewing", False) or result)
        d.addCallbacks(granted, failed)

    def _stop(self) -> "defer.Deferred[None]":
        self._running = False
        for loop in (self._keepalive, self._resync):
            if loop is not None and loop.running:
                loop.stop()
        self._keepalive = self._resync = None  # a start after a failed one makes them anew
        for call in (self._suspend_call, self._stream_call):
            if call is not None and call.active():
                call.cancel()
        self._close_stream()
        if self._stream_opening is not None:
            self._stream_opening.cancel()  # a stream still being opened must not outlive the session
        lease, self._lease = self._lease, None
        if lease is None:
            return self._http.close()
        # Revoking the lease deletes its keys at once (else they would wait for the TTL).
        d = self._bounded(self._http.call("lease/revoke", {"ID": lease}, idempotent=True), "stop", "/")
        return d.addBoth(lambda _: self._http.close())

    # -- operations -------------------------------------------------------------

    def _get(self, path: str) -> "defer.Deferred[Optional[Node]]":
        d = self._http.call("kv/range", {"key": b64(self._key(path))}, idempotent=True)
        return d.addCallback(lambda answer: _first(answer.get("kvs")))

    def _children(self, path: str) -> "defer.Deferred[Dict[str, Node]]":
        key = self._key("" if path == "/" else path) + b"/"
        d = self._http.call("kv/range", {"key": b64(key), "range_end": b64(prefix_end(key))}, idempotent=True)

        def listed(answer: Dict[str, Any]) -> Dict[str, Node]:
            nodes = {}
            for kv in answer.get("kvs", []):
                child = self._path(unb64(kv["key"]))
                if child is not None:
                    nodes[child] = _node(kv)
            return direct_children(path, nodes)

        return d.addCallback(listed)

    def _create(self, path: str, value: bytes, ephemeral: bool) -> "defer.Deferred[Node]":
        key = b64(self._key(path))
        put: Dict[str, Any] = {"key": key, "value": b64(value)}
        if ephemeral:
            if self._lease is None:
                return defer.fail(Unavailable(self.url, "ephemeral", path, "no session (the lease was lost)"))
            put["lease"] = self._lease
        txn = {"compare": [{"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}],
               "success": [{"request_put": put}]}

        def done(answer: Dict[str, Any]) -> Node:
            if not answer.get("succeeded"):
                raise Conflict(self.url, "ephemeral" if ephemeral else "create", path, "it exists")
            return Node(value, int(answer["header"]["revision"]))

        return self._http.call("kv/txn", txn).addCallbacks(done, self._lease_trouble)

    def _set(self, path: str, value: bytes, version: Optional[int]) -> "defer.Deferred[Node]":
        put = {"request_put": {"key": b64(self._key(path)), "value": b64(value), "ignore_lease": True}}
        d = self._conditional("set", path, version, put)
        return d.addCallback(lambda answer: Node(value, int(answer["header"]["revision"])))

    def _delete(self, path: str, version: Optional[int]) -> "defer.Deferred[None]":
        delete = {"request_delete_range": {"key": b64(self._key(path))}}
        return self._conditional("delete", path, version, delete).addCallback(lambda _: None)

    def _conditional(self, operation: str, path: str, version: Optional[int],
                     request: Dict[str, Any]) -> "defer.Deferred[Dict[str, Any]]":
        key = b64(self._key(path))
        if version is None:
            compare = {"key": key, "target": "CREATE", "result": "GREATER", "create_revision": "0"}
        else:
            compare = {"key": key, "target": "MOD", "result": "EQUAL", "mod_revision": str(version)}
        txn = {"compare": [compare], "success": [request], "failure": [{"request_range": {"key": key}}]}

        def done(answer: Dict[str, Any]) -> Dict[str, Any]:
            if answer.get("succeeded"):
                return answer
            responses = answer.get("responses") or [{}]
            current = _first(responses[0].get("response_range", {}).get("kvs"))
            if current is None:
                raise NotFound(self.url, operation, path, "no such node")
            raise Conflict(self.url, operation, path, f"version is {current.version}, not {version}")

        return self._http.call("kv/txn", txn).addCallback(done)

    def _is_mine(self, path: str) -> "defer.Deferred[bool]":
        d = self._http.call("kv/range", {"key": b64(self._key(path))}, idempotent=True)
        lease = self._lease
        return d.addCallback(lambda answer: bool(answer.get("kvs")) and lease is not None
                             and str(answer["kvs"][0].get("lease", "")) == lease)

    def _lease_trouble(self, failure: Failure) -> Failure:
        if failure.check(EtcdError) and failure.value.code == _NOT_FOUND and self._lease is not None:
            self._lost("a write found the lease gone")
        return failure

    # -- the watch stream ---------------------------------------------------------

    def _watch_added(self, watch: Watch) -> None:
        if self._stream is None and self._lease is not None:
            self._restart_stream()

    def _watch_removed(self, watch: Watch) -> None:
        if not self._watches:
            self._close_stream()

    def _restart_stream(self) -> None:
        self._close_stream()
        self._open_stream()

    def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close("replaced")

    def _open_stream(self) -> None:
        if not self._wanted_stream() or self._stream is not None or self._stream_opening is not None:
            return
        prefix = self._prefix + b"/"
        stream = WatchStream(lambda: self._stream_created(stream), self._stream_events,
                             lambda reason: self._stream_closed(stream, reason), self._reactor.seconds)
        body = {"create_request": {"key": b64(prefix), "range_end": b64(prefix_end(prefix)),
                                   "progress_notify": True}}
        d = self._stream_opening = self._bounded(self._http.stream("watch", body, stream), "watch", "/")

        def opened(_: Any) -> None:
            if not self._wanted_stream():  # stopped (or the last watch went) while it was being opened
                stream.close("not wanted any more")
            elif stream._closed:  # ended already, before anyone looked
                self._stream_again()
            else:
                self._stream = stream

        def failed(failure: Failure) -> None:
            self._log.info("{url}: watch stream: {error}", url=self.url, error=failure.getErrorMessage())
            self._stream_again()

        d.addBoth(lambda result: setattr(self, "_stream_opening", None) or result)
        d.addCallbacks(opened, failed)

    def _wanted_stream(self) -> bool:
        return self._running and bool(self._watches) and self.state != "stopped"

    def _stream_created(self, stream: WatchStream) -> None:
        self._stream_retry = STREAM_RETRY_MIN
        for watch in list(self._watches):  # whatever happened before the stream was there is read now
            watch.changed()

    def _stream_events(self, events: List[Tuple[str, bytes]]) -> None:
        for _kind, key in events:
            path = self._path(key)
            if path is not None:
                self._changed(path)

    def _stream_closed(self, stream: WatchStream, reason: str) -> None:
        if stream is not self._stream:
            return  # one replaced on purpose
        self._stream = None
        self._log.info("{url}: watch stream ended: {reason}", url=self.url, reason=reason)
        self._stream_again()

    def _snapshot(self, watch: Watch) -> "defer.Deferred[Any]":
        return defer.maybeDeferred(super()._snapshot, watch).addCallback(self._compare_with_stream)

    def _compare_with_stream(self, value: Any) -> Any:
        """Remember when a read saw a change (a mod_revision) the stream has not reported yet."""
        stream = self._stream
        nodes = [value] if isinstance(value, Node) else list(value.values()) if value else []
        newest = max((node.version for node in nodes), default=0)
        if stream is not None and newest > stream.revision:
            since = stream.lag[1] if stream.lag is not None else self._reactor.seconds()
            stream.lag = (max(newest, stream.lag[0] if stream.lag is not None else 0), since)
        return value

    def _resync_watches(self) -> None:
        """The safety net: every watch reads again; a stream that fell silent is replaced."""
        if not self._watches or self.state == "stopped":
            return
        stream = self._stream
        dead = self._stream_silence(stream) if stream is not None else None
        if dead is not None:
            self._log.warn("{url}: watch stream {reason}: opening it again", url=self.url, reason=dead)
            self._restart_stream()  # once it is created, every watch reads again
            return
        for watch in list(self._watches):
            watch.changed()

    def _stream_silence(self, stream: WatchStream) -> Optional[str]:
        now = self._reactor.seconds()
        if stream.lag is not None:
            revision, since = stream.lag
            if stream.revision >= revision:
                stream.lag = None  # it did report the change: only a little late
            elif now - since >= self.resync_interval:
                return f"has not reported revision {revision}, read {now - since:.1f} s ago"
        if now - stream.last_message > 2 * PROGRESS_INTERVAL:
            return f"has been silent for {now - stream.last_message:.0f} s"
        return None

    def _stream_again(self) -> None:
        if not self._wanted_stream():
            return
        if self._stream_call is None or not self._stream_call.active():
            self._stream_call = self._reactor.callLater(self._stream_retry, self._open_stream)
            self._stream_retry = min(STREAM_RETRY_MAX, self._stream_retry * 2)


def _node(kv: Dict[str, Any]) -> Node:
    return Node(unb64(kv.get("value")), int(kv.get("mod_revision", 0)))


def _first(kvs: Optional[List[Dict[str, Any]]]) -> Optional[Node]:
    return _node(kvs[0]) if kvs else None


def _describe(error: BaseException) -> str:
    reasons = getattr(error, "reasons", None)  # ResponseFailed & co. wrap Failures
    if reasons:
        return "; ".join(reason.getErrorMessage() for reason in reasons)
    return str(error) or type(error).__name__
