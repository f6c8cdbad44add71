"""The dashboard process: its settings, and the service that runs the controller behind the HTTP API.

Owns :class:`Settings` (what ``twinproxy-dashboard`` and ``twistd
twinproxy-dashboard`` are given, checked the same way for both: the
cluster name, ``--listen``, the token file, the data servers' credentials
file) and :class:`DashboardService`, which starts, in this order: the coordinator session; the HTTP listener
(first, so the lock document names the address really bound); the
controller, which takes the cluster's lock; the stats poller of
``/metrics`` and the web page's sampler (webstate.py).  Until the controller has started the API answers 503 with
the reason (waiting for the lock, ...).  A start that fails calls
``on_failure`` with one line (the lock held by another dashboard, the
coordinator unreachable, the address in use, ...) and undoes what it
started.  ``stopService`` stops everything, releasing the lock, so a
SIGTERM'd dashboard's successor takes over at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from twinproxy.cluster.model import CLUSTER_NAME, PROTOCOLS
from twinproxy.cluster.paths import dashboard_path
from twinproxy.credentials import Credentials, valid_user_name
from twinproxy.dashboard.api import ApiState, make_site
from twinproxy.dashboard.metrics import CONTENT_TYPE, StatsPoller, render
from twinproxy.dashboard.sampler import PERIOD as WEB_PERIOD
from twinproxy.dashboard.webstate import WebState

DEFAULT_LISTEN = "127.0.0.1:18080"
DEFAULT_BIG_KEY_BYTES = 4 * 1024 * 1024      # the same as twinproxy.dashboard.bigkeys (a test says so)
_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024 ** 2, "mb": 1024 ** 2, "mib": 1024 ** 2,
          "g": 1024 ** 3, "gb": 1024 ** 3, "gib": 1024 ** 3}


class SettingsError(Exception):
    """A bad option value; the message is one line for the operator."""


@dataclass(frozen=True)
class Settings:
    """Everything a dashboard is started with."""

    coordinator: str
    cluster: str
    protocol: str = "redis"
    listen: Tuple[str, int] = ("127.0.0.1", 18080)
    token: Optional[bytes] = None
    ack_timeout: float = 10.0
    wait: bool = False
    big_key_bytes: int = DEFAULT_BIG_KEY_BYTES
    # The data servers' credentials (a pool's redis_auth and redis_auth_user): the password never shown.
    redis_auth: Optional[Credentials] = None

    def __post_init__(self) -> None:
        if self.redis_auth is not None and self.protocol != "redis":
            raise SettingsError(f"--redis-auth-file is for Redis clusters, not {self.protocol} ones")

    @property
    def listen_text(self) -> str:
        host, port = self.listen
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_cluster(name: str) -> str:
    if not CLUSTER_NAME.match(name or ""):
        raise SettingsError(f"cluster name {name!r} must start with a letter, digit or '_' and hold only those, "
                            "'.' and '-'")
    return name


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise SettingsError(f"protocol must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")
    return protocol


def parse_listen(text: str) -> Tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``) -> (host, port); SettingsError otherwise."""
    host, sep, port = (text or "").rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise SettingsError(f"--listen {text!r} is not HOST:PORT (e.g. {DEFAULT_LISTEN})")
    return host, int(port)


def _read_one_line(path: str, what: str, wanted: str) -> bytes:
    """The content of the file at ``path``, stripped; SettingsError if unreadable or empty (never showing it)."""
    try:
        with open(path, "rb") as secret_file:
            content = secret_file.read().strip()
    except OSError as err:
        raise SettingsError(f"cannot read the {what} file {path}: {err.strerror or err}")
    if not content:
        raise SettingsError(f"the {what} file {path} is empty: put {wanted} in it")
    return content


def read_token(path: str) -> bytes:
    """The write token: the file's content, stripped; SettingsError if unreadable or empty."""
    token = _read_one_line(path, "token", "the write token")
    if any(byte <= 32 or byte >= 127 for byte in token):
        raise SettingsError(f"the token in {path} must be printable ASCII without spaces (one line)")
    return token


def read_redis_auth(path: str) -> str:
    """The data servers' password from the file at ``path``: its one line, whole (spaces are part of it).

    Read as the pool's ``redis_auth`` is: nothing splits it (an ACL user is ``--redis-auth-user``).  Only the
    line's end goes.  The messages never show the file's content.
    """
    try:
        with open(path, "rb") as secret_file:
            raw = secret_file.read().rstrip(b"\r\n")
    except OSError as err:
        raise SettingsError(f"cannot read the Redis password file {path}: {err.strerror or err}")
    if not raw.strip():
        raise SettingsError(f"the Redis password file {path} is empty: put the password in it")
    if any(byte < 32 or byte == 127 for byte in raw):
        raise SettingsError(f"the Redis password in {path} must be one line, without control characters")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SettingsError(f"the Redis password in {path} is not UTF-8 text") from None


def redis_credentials(auth_file: Optional[str], user: Optional[str]) -> Optional[Credentials]:
    """``--redis-auth-file`` and ``--redis-auth-user``: the data servers' credentials, or None without a file."""
    if auth_file is None:
        if user is not None:
            raise SettingsError("--redis-auth-user needs --redis-auth-file (the user's password)")
        return None
    if user is not None and not valid_user_name(user):
        # Not shown back: "user password" here (the old split form) would print the password.
        raise SettingsError("--redis-auth-user is not a Redis user name (one word, no spaces or control characters)")
    return Credentials(read_redis_auth(auth_file), user)


def parse_size(text: str) -> int:
    """``--big-key-bytes``: bytes, or with a binary unit (``512k``, ``4MiB``, ``1g``); 0 turns chunked copies off."""
    raw = str(text).strip().lower()
    digits = raw.rstrip("abcdefghijklmnopqrstuvwxyz ")
    unit = raw[len(digits):].strip()
    if not digits.isdigit() or unit not in _UNITS:
        raise SettingsError(f"--big-key-bytes {text!r} is not a size (bytes, or e.g. 512k, 4MiB, 1g)")
    return int(digits) * _UNITS[unit]


def check_ack_timeout(value: float) -> float:
    if not 0 < value <= 3600:
        raise SettingsError(f"--ack-timeout must be in (0, 3600] seconds, not {value:g}")
    return value


class DashboardService(MultiService):
    """The coordinator session, the HTTP API, the controller and the stats poller of one dashboard."""

    _log = Logger()

    def __init__(self, settings: Settings, reactor: Any, on_failure: Callable[[str], None]) -> None:
        super().__init__()
        self.setName("dashboard")
        self.settings = settings
        self._reactor = reactor
        self._on_failure = on_failure
        self.state = ApiState(settings.cluster, settings.token)
        self.coordinator: Any = None
        self.controller: Any = None
        self.port: Any = None
        # Once a second: the web page's rates are the difference of two documents of each proxy.
        self.poller = StatsPoller(reactor, self._proxies, period=WEB_PERIOD)
        self.web = WebState(settings.cluster, settings.protocol, reactor, self.poller, self._proxies,
                            admin=settings.token is not None)
        self.web.reason = lambda: self.state.reason
        self.state.audit = self.web.record
        self.started: Optional[defer.Deferred] = None
        self._stopping = False

    # -- start ---------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.started = self._start()
        self.started.addErrback(self._start_failed)

    @defer.inlineCallbacks
    def _start(self) -> Any:
        from twinproxy.coordinator import CoordinatorError, connect
        from twinproxy.dashboard.controller import Controller, ControllerError, LockHeld

        settings = self.settings
        try:
            self.coordinator = connect(settings.coordinator, self._reactor)
        except ValueError as err:
            raise _StartError(str(err))
        try:
            yield self.coordinator.start()
        except CoordinatorError as err:
            raise _StartError(f"cannot reach the coordinator: {err}")
        self._still_starting()
        yield self._listen()
        self._still_starting()
        address = self.bound
        self.controller = Controller(self.coordinator, settings.cluster, settings.protocol, self._reactor,
                                     ack_timeout=settings.ack_timeout, addr=address, redis_auth=settings.redis_auth)
        # Read by the migration runner for each sweep (Runner._sweep passes it as Sweep(big_key_bytes=...)).
        self.controller.big_key_bytes = settings.big_key_bytes
        self.state.controller = self.controller
        if settings.wait:
            holder = yield self._holder()
            self._still_starting()
            if holder is not None:
                self.state.reason = (f"waiting for the lock of cluster '{settings.cluster}': "
                                     f"{_describe(holder)} holds it")
                self._log.info("cluster {cluster}: {reason}", cluster=settings.cluster, reason=self.state.reason)
        else:
            self.state.reason = f"the dashboard is taking the lock of cluster '{settings.cluster}'"
        try:
            yield self.controller.start(wait=settings.wait)
        except LockHeld as err:
            raise _StartError(lock_held_message(settings.cluster, err.holder, self.coordinator.session_timeout))
        except (ControllerError, CoordinatorError) as err:
            raise _StartError(str(err))
        self._still_starting()
        self.state.ready = True
        self.poller.start()
        self.web.start(self.controller, self.coordinator)
        self._log.info("cluster {cluster}: dashboard serving on http://{address}/ (coordinator {url}; writes "
                       "{writes}; data servers {auth})", cluster=settings.cluster, address=address,
                       url=self.coordinator.url,
                       writes="need the token" if settings.token is not None else "disabled: no --token-file",
                       auth=_credentials_said(settings.redis_auth))

    def _still_starting(self) -> None:
        """Stopped meanwhile (SIGTERM during the start): go no further."""
        if self._stopping:
            raise _StartError("stopped while starting")

    @defer.inlineCallbacks
    def _listen(self) -> Any:
        host, port = self.settings.listen
        site = make_site(self.state, self._metrics, CONTENT_TYPE, self.web.resources(lambda: self.state.ready))
        try:
            self.port = self._reactor.listenTCP(port, site, interface=host)
        except CannotListenError as err:
            holder = yield self._holder()
            if holder is not None:
                raise _StartError(lock_held_message(self.settings.cluster, holder, self.coordinator.session_timeout)
                                  + f" (and --listen {self.settings.listen_text} is in use)")
            raise _StartError(f"cannot listen on {self.settings.listen_text}: {_os_reason(err)}")

    @defer.inlineCallbacks
    def _holder(self) -> Any:
        """The lock document of the dashboard holding the cluster's lock now, or None."""
        from twinproxy.coordinator import CoordinatorError

        try:
            node = yield self.coordinator.get(dashboard_path(self.settings.cluster))
        except CoordinatorError:
            return None
        if node is None:
            return None
        try:
            holder = json.loads(node.value.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return {"addr": "(unreadable lock document)"}
        return holder if isinstance(holder, dict) else {"addr": repr(holder)}

    def _start_failed(self, failure: Any) -> None:
        if self._stopping:
            return None
        if failure.check(_StartError):
            message = failure.getErrorMessage()
        else:
            self._log.failure("the dashboard failed to start", failure)
            message = f"cannot start: {failure.getErrorMessage()}"
        self.state.reason = message
        self._on_failure(message)
        return None

    # -- what the API and metrics read ----------------------------------------------

    @property
    def bound(self) -> Optional[str]:
        if self.port is None:
            return None
        host = self.port.getHost()
        return f"[{host.host}]:{host.port}" if ":" in host.host else f"{host.host}:{host.port}"

    def _proxies(self) -> list:
        if not self.state.ready or self.controller is None:
            return []
        return self.controller.proxies()

    def _metrics(self) -> bytes:
        status = self.controller.status() if self.state.ready and self.controller is not None else None
        return render(self.settings.cluster, lambda: status, self.poller)

    # -- stop -------------------------------------------------------------------------

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        """Stop serving, release the lock, end the coordinator session (each step even if one fails)."""
        self._stopping = True
        self.state.ready = False
        self.state.reason = "the dashboard is stopping"
        yield defer.maybeDeferred(super().stopService)
        self.poller.stop()
        self.web.stop()
        port, self.port = self.port, None
        if port is not None:
            yield defer.maybeDeferred(port.stopListening).addErrback(self._log_stop, "stop listening")
        if self.controller is not None:
            yield defer.maybeDeferred(self.controller.stop).addErrback(self._log_stop, "release the lock")
        if self.coordinator is not None:
            yield defer.maybeDeferred(self.coordinator.stop).addErrback(self._log_stop, "stop the coordinator")

    def _log_stop(self, failure: Any, what: str) -> None:
        self._log.warn("dashboard stop: cannot {what}: {reason}", what=what, reason=failure.getErrorMessage())


class _StartError(Exception):
    """The dashboard cannot start; the message is the one line the operator sees."""


def _credentials_said(credentials: Optional[Credentials]) -> str:
    """How the start's log line names the data servers' credentials (never the password)."""
    if credentials is None:
        return "without credentials"
    if credentials.user is None:
        return "authenticated (--redis-auth-file)"
    return f"authenticated as {credentials.user} (--redis-auth-file, --redis-auth-user)"


def _describe(holder: dict) -> str:
    return (f"the dashboard at {holder.get('addr') or '?'} (pid {holder.get('pid', '?')} on host "
            f"{holder.get('host', '?')})")


def lock_held_message(cluster: str, holder: dict, session_timeout: float) -> str:
    """The one line of a dashboard refused because another holds the cluster's lock."""
    return (f"cluster '{cluster}' already has a dashboard at {holder.get('addr') or '?'} (pid "
            f"{holder.get('pid', '?')} on host {holder.get('host', '?')}); stop it, or start with --wait to take "
            f"over when it stops (its lock expires within {session_timeout:g}s after it dies)")


def _os_reason(err: CannotListenError) -> str:
    reason = getattr(err, "socketError", None)
    return getattr(reason, "strerror", None) or str(reason or err)
