"""Talking to a running proxy: its pool file (written in one rename), its
bound-addresses and stats documents, its HTTP endpoint, and clients of its
pools that count their connections.

Used by the reload tests (tests/reload_load.py and the tests themselves) and
by the Sentinel fixtures and tests.
"""

from __future__ import annotations

import json
import os
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Tuple

import redis
from pymemcache.client.base import Client as MemcacheClient
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.servers import bound_addresses

CLIENT_TIMEOUT = 10  # seconds; a reply later than this is a hang, reported as an error
RELOAD_DEADLINE = 20  # seconds for one reload to show up in the bound-addresses file


# -- files and the proxy's own reports ----------------------------------------


def write_atomically(path: os.PathLike, text: str) -> None:
    """Replace ``path`` in one rename, so a reload never reads half a file."""
    path = os.fspath(path)
    partial = f"{path}.partial"
    with open(partial, "w", encoding="utf-8") as out:
        out.write(text)
    os.replace(partial, path)


def read_bound(path: os.PathLike) -> Optional[dict]:
    """The bound-addresses document, or None while it does not exist yet."""
    try:
        with open(path, encoding="utf-8") as inp:
            return json.load(inp)
    except FileNotFoundError:
        return None


def wait_for_generation(path: os.PathLike, generation: int, process=None,
                        timeout: float = RELOAD_DEADLINE) -> dict:
    """Wait until the bound-addresses file of ``process`` shows ``generation`` (or later); return it."""
    return bound_addresses(Path(path), process, generation=generation, timeout=timeout)


def split_address(address: str) -> Tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def read_stats(address: str) -> dict:
    """nutcracker's stats port: connect, read until EOF, one JSON document."""
    with socket.create_connection(split_address(address), timeout=CLIENT_TIMEOUT) as sock:
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return json.loads(b"".join(chunks))


def http(address: str, path: str, method: str = "GET") -> Tuple[int, str]:
    """(status, body) of one HTTP request to the proxy's --http-port endpoint."""
    data = b"" if method == "POST" else None
    request = urllib.request.Request(f"http://{address}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=CLIENT_TIMEOUT) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def metric(text: str, name: str) -> float:
    """The sum of every sample of ``name`` in a Prometheus text page (KeyError if absent)."""
    found = [float(match.group(2)) for match in
             re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text, re.MULTILINE)]
    if not found:
        raise KeyError(f"{name} not in /metrics:\n{text[:2000]}")
    return sum(found)


def refuses(address: str) -> bool:
    """True when nothing accepts connections at ``address`` (host:port or a socket path)."""
    try:
        if address.startswith("/"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(2)
            try:
                sock.connect(address)
            finally:
                sock.close()
        else:
            socket.create_connection(split_address(address), timeout=2).close()
    except OSError:
        return True
    return False


# -- clients that count their connections --------------------------------------


def _counting(base: type) -> type:
    class Counting(base):
        connects = 0

        def _connect(self):
            sock = super()._connect()
            type(self).connects += 1
            return sock

    return Counting


def redis_client(address: str, **kwargs) -> redis.Redis:
    """A redis-py client, no retries (a drop is an error), which counts its connects.

    Used from one thread, its pool holds one connection (commands and
    pipelines alike); a connection found closed is replaced silently, which
    ``client.connection_pool.connection_class.connects`` (how many times it
    connected) shows.
    """
    common = dict(socket_timeout=CLIENT_TIMEOUT, socket_connect_timeout=CLIENT_TIMEOUT,
                  retry=Retry(NoBackoff(), 0), protocol=2, **kwargs)
    if address.startswith("/"):
        pool = redis.ConnectionPool(connection_class=_counting(redis.UnixDomainSocketConnection),
                                    path=address, **common)
    else:
        host, port = split_address(address)
        pool = redis.ConnectionPool(connection_class=_counting(redis.Connection), host=host, port=port,
                                    **common)
    return redis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))


def redis_connects(client: redis.Redis) -> int:
    return client.connection_pool.connection_class.connects


class CountingMemcacheClient(MemcacheClient):
    """pymemcache's client, counting how many times it (re)connected."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.connects = 0

    def _connect(self) -> None:
        super()._connect()
        self.connects += 1


def memcache_client(address: str) -> CountingMemcacheClient:
    server = address if address.startswith("/") else split_address(address)
    return CountingMemcacheClient(server, timeout=CLIENT_TIMEOUT, connect_timeout=CLIENT_TIMEOUT,
                                  default_noreply=False)


def probe(address: str, is_redis: bool, token: str) -> None:
    """A new client at ``address``: one write and its read-back, then close."""
    key, value = f"probe:{token}", f"probe-value-{token}"
    if is_redis:
        client = redis_client(address)
        try:
            assert client.set(key, value) is True
            assert client.get(key) == value.encode()
        finally:
            client.close()
    else:
        client = memcache_client(address)
        try:
            assert client.set(key, value.encode()) is True
            assert client.get(key) == value.encode()
        finally:
            client.close()


__all__ = ["CLIENT_TIMEOUT", "RELOAD_DEADLINE", "CountingMemcacheClient", "http", "memcache_client", "metric",
           "probe", "read_bound", "read_stats", "redis_client", "redis_connects", "refuses", "split_address",
           "wait_for_generation", "write_atomically"]
