"""Client discovery for applications (Codis's Jodis): talk to whichever twinproxy proxies are alive.

Owns: :class:`ProxyDirectory` (the live proxies of a cluster, read from the
coordinator's ``/clusters/<cluster>/proxies/*`` registrations -- their
``"addr"`` -- by a daemon thread every ``poll_interval`` seconds, handed out
round-robin, a proxy that just failed skipped for ``quarantine`` seconds
while another is there), :func:`redis_pool` / :func:`redis_client` (a
redis-py ConnectionPool whose every new connection goes to the next live
proxy; a command whose proxy dies is retried once, on a new connection, so
on another proxy) and :func:`memcache_client` (a pymemcache Client per
current proxy behind the same methods, switching and retrying once on a
socket error).  No Twisted: the coordinator is read with BlockingDirectory.

Example::

    from twinproxy.client import memcache_client, redis_client

    r = redis_client("zookeeper://zk1:2181,zk2:2181/twinproxy", "shop", socket_timeout=1)
    r.set("greeting", "hello")                  # on some live proxy of cluster "shop"
    m = memcache_client("etcd://127.0.0.1:2379/twinproxy", "sessions", timeout=1)
    m.set("k", b"v"); assert m.get("k") == b"v"

A retried command may have been applied once already when the failure was
a timeout (INCR, APPEND...): retry_on_error is yours to narrow.  Proxies
joining are seen within ``poll_interval``; one dying is avoided at once by
the connection that saw it fail, and by everyone once its registration goes.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from typing import Any, Dict, Iterable, List, Optional, Tuple

from twinproxy.cluster.paths import proxies_path
from twinproxy.coordinator import CoordinatorError
from twinproxy.coordinator.blocking import BlockingDirectory

_log = logging.getLogger("twinproxy.client")
DEFAULT_POLL_INTERVAL = 1.0
DEFAULT_QUARANTINE = 5.0


class ProxyDirectory:
    """The live proxies of ``cluster`` at ``coordinator_url``, kept current by a daemon thread."""

    def __init__(self, coordinator_url: str, cluster: str, poll_interval: float = DEFAULT_POLL_INTERVAL,
                 quarantine: float = DEFAULT_QUARANTINE) -> None:
        if not cluster or "/" in cluster:
            raise ValueError(f"bad cluster name {cluster!r}")
        self.cluster = cluster
        self.path = proxies_path(cluster)
        self._directory = BlockingDirectory(coordinator_url)
        self.url = self._directory.url
        self.poll_interval = poll_interval
        self.quarantine = quarantine
        self.problem: Optional[str] = None  # why the last read failed, if it did
        self._lock = threading.Lock()
        self._addresses: List[str] = []
        self._turn = 0
        self._failed: Dict[str, float] = {}
        self._stop = threading.Event()
        self.refresh()  # the first read before any connection; a failure is kept in ``problem``
        self._thread = threading.Thread(target=self._follow, name=f"twinproxy-discovery-{cluster}", daemon=True)
        self._thread.start()

    def refresh(self) -> List[str]:
        """Read the registrations now; the live addresses (the last known ones if the read fails)."""
        try:
            registrations = self._directory.children(self.path)
        except CoordinatorError as err:
            if self.problem != str(err):
                _log.warning("proxy discovery: %s (keeping %d known proxies)", err, len(self._addresses))
            self.problem = str(err)
            return self.addresses()
        self.problem = None
        found = set()
        for name, value in registrations.items():
            try:
                address = json.loads(value)["addr"]
                _split(address)
            except (ValueError, KeyError, TypeError):
                _log.warning("proxy discovery: %s/%s holds no usable \"addr\": %r", self.path, name, value[:200])
                continue
            found.add(address)
        with self._lock:
            if found != set(self._addresses):
                _log.info("proxy discovery: cluster %s proxies now %s", self.cluster, sorted(found))
            self._addresses = sorted(found)
        return self.addresses()

    def addresses(self) -> List[str]:
        with self._lock:
            return list(self._addresses)

    def is_live(self, address: str) -> bool:
        """Whether ``address`` is still registered."""
        with self._lock:
            return address in self._addresses

    def pick(self, exclude: Iterable[str] = ()) -> Optional[str]:
        """The next live proxy round-robin, not in ``exclude``, preferring those that did not just fail."""
        excluded = set(exclude)
        now = time.monotonic()
        with self._lock:
            candidates = [a for a in self._addresses if a not in excluded]
            healthy = [a for a in candidates if self._failed.get(a, 0.0) <= now]
            choice = healthy or candidates
            if not choice:
                return None
            self._turn += 1
            return choice[self._turn % len(choice)]

    def failed(self, address: str) -> None:
        """``address`` just failed: others go first for a while."""
        with self._lock:
            self._failed[address] = time.monotonic() + self.quarantine

    def no_proxy(self) -> str:
        """Why there is nothing to connect to, for an error message."""
        because = f" (last read: {self.problem})" if self.problem else ""
        return f"no live proxy registered under {self.path} at {self.url}{because}"

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(self._directory.timeout + 1)
        self._directory.close()

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_interval):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - the thread must outlive a surprise
                _log.exception("proxy discovery: reading %s failed", self.path)


def _split(address: str) -> Tuple[str, int]:
    host, colon, port = address.rpartition(":")
    if not colon or not host or not port.isdigit():
        raise ValueError(f"bad address {address!r}")
    return host.strip("[]"), int(port)


# -- Redis (redis-py) -------------------------------------------------------------

@functools.cache
def _redis_classes() -> Tuple[type, type, type]:
    """The pool, connection and client classes, made on first use: importing this module needs no redis-py."""
    import redis

    class DiscoveryConnection(redis.Connection):
        """A redis-py connection to the next live proxy, picked anew at each (re)connect."""

        def __init__(self, proxies: ProxyDirectory, **kwargs: Any) -> None:
            kwargs.pop("host", None)
            kwargs.pop("port", None)
            super().__init__(host="", port=0, **kwargs)
            self.proxies = proxies
            self.proxy: Optional[str] = None

        def _connect(self) -> Any:
            tried: List[str] = []
            last: Optional[OSError] = None
            while True:
                address = self.proxies.pick(exclude=tried)
                if address is None:
                    break
                self.host, self.port = _split(address)
                try:
                    sock = super()._connect()
                except OSError as err:
                    self.proxies.failed(address)
                    tried.append(address)
                    last = err
                    continue
                self.proxy = address
                return sock
            self.proxy = None
            if last is not None:
                raise last
            self.host, self.port = "", 0
            raise ConnectionRefusedError(self.proxies.no_proxy())

        def _host_error(self) -> str:
            if self.host:
                return f"{self.host}:{self.port}"
            return f"a proxy of cluster {self.proxies.cluster!r}"

    class DiscoveryConnectionPool(redis.ConnectionPool):
        """A ConnectionPool over the live proxies of one cluster (see the module docstring)."""

        def __init__(self, proxies: ProxyDirectory, **connection_kwargs: Any) -> None:
            self.proxies = proxies
            super().__init__(connection_class=DiscoveryConnection, proxies=proxies, **connection_kwargs)

        def get_connection(self, *args: Any, **kwargs: Any) -> Any:
            connection = super().get_connection(*args, **kwargs)
            proxy = connection.proxy
            if proxy is not None and not self.proxies.is_live(proxy) and self.proxies.addresses():
                # Its proxy left the cluster (maybe shutting down cleanly): move on before it goes.
                connection.disconnect()
                try:
                    connection.connect()
                except BaseException:
                    self.release(connection)
                    raise
            return connection

        def close(self) -> None:
            self.disconnect()
            self.proxies.close()

    class DiscoveryRedis(redis.Redis):
        """redis.Redis whose ``close()`` also closes its pool and the discovery."""

        def close(self) -> None:
            super().close()
            self.connection_pool.close()

    return DiscoveryConnectionPool, DiscoveryConnection, DiscoveryRedis


def redis_pool(coordinator_url: str, cluster: str, poll_interval: float = DEFAULT_POLL_INTERVAL,
               **connection_kwargs: Any) -> Any:
    """A ``redis.ConnectionPool`` whose connections go to the live proxies of ``cluster``, round-robin.

    ``connection_kwargs`` are redis-py's (socket_timeout, password, protocol, ...); unless given,
    a command is retried once (on a new connection, hence another proxy) on ConnectionError and
    TimeoutError.  ``pool.close()`` also stops following the coordinator.
    """
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    connection_kwargs.setdefault("retry", Retry(NoBackoff(), 1))
    connection_kwargs.setdefault("retry_on_error", [redis.ConnectionError, redis.TimeoutError])
    pool_class, _, _ = _redis_classes()
    return pool_class(ProxyDirectory(coordinator_url, cluster, poll_interval), **connection_kwargs)


def redis_client(coordinator_url: str, cluster: str, poll_interval: float = DEFAULT_POLL_INTERVAL,
                 **connection_kwargs: Any) -> Any:
    """A ``redis.Redis`` on :func:`redis_pool` (closing it closes the pool, and the discovery)."""
    _, _, client_class = _redis_classes()
    return client_class(connection_pool=redis_pool(coordinator_url, cluster, poll_interval, **connection_kwargs))


# -- memcached (pymemcache) -----------------------------------------------------------

class DiscoveryMemcacheClient:
    """pymemcache's Client API on the current live proxy; on a socket error, once more on another.

    Like pymemcache's Client, one instance is for one thread at a time.
    """

    def __init__(self, proxies: ProxyDirectory, **client_kwargs: Any) -> None:
        from pymemcache.client.base import Client
        from pymemcache.exceptions import MemcacheUnexpectedCloseError

        self.proxies = proxies
        self._client_class = Client
        self._retry_on = (OSError, MemcacheUnexpectedCloseError)
        # Replies are awaited, so a dead proxy is noticed (and the command retried) instead of lost.
        client_kwargs.setdefault("default_noreply", False)
        self._kwargs = client_kwargs
        self._client: Any = None
        self.proxy: Optional[str] = None

    def _current(self, exclude: Iterable[str] = ()) -> Any:
        if self._client is not None and self.proxy is not None and self.proxy not in exclude:
            # Kept while registered, or while nothing else is (a proxy that left but still answers).
            if self.proxies.is_live(self.proxy) or not self.proxies.addresses():
                return self._client
        self._drop()
        address = self.proxies.pick(exclude=exclude)
        if address is None:
            raise ConnectionRefusedError(self.proxies.no_proxy())
        self._client = self._client_class(_split(address), **self._kwargs)
        self.proxy = address
        return self._client

    def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except OSError:
                pass

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if not callable(getattr(self._client_class, name, None)):
            return getattr(self._current(), name)

        def call(*args: Any, **kwargs: Any) -> Any:
            client = self._current()
            try:
                return getattr(client, name)(*args, **kwargs)
            except self._retry_on:
                failed = self.proxy
                self._drop()
                if failed is not None:
                    self.proxies.failed(failed)
                    if self.proxies.pick(exclude=[failed]) is None:
                        raise  # no other proxy to try: the error as it is
                return getattr(self._current(exclude=[failed] if failed else []), name)(*args, **kwargs)

        call.__name__ = name
        return call

    def close(self) -> None:
        """Close the connection and stop following the coordinator."""
        self._drop()
        self.proxies.close()


def memcache_client(coordinator_url: str, cluster: str, poll_interval: float = DEFAULT_POLL_INTERVAL,
                    **client_kwargs: Any) -> DiscoveryMemcacheClient:
    """A pymemcache-compatible client on the live proxies of ``cluster`` (``client_kwargs``: pymemcache's)."""
    return DiscoveryMemcacheClient(ProxyDirectory(coordinator_url, cluster, poll_interval), **client_kwargs)
