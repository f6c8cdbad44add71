"""The memcached path end to end: real memcached processes, the proxy in-process."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest
from pymemcache.client.base import Client
from pymemcache.exceptions import MemcacheServerError

from tests.conftest import pool_yaml
from tests.servers import LOOPBACK, require, wait_until


def client(service, **kwargs) -> Client:
    kwargs.setdefault("timeout", 5)
    kwargs.setdefault("connect_timeout", 5)
    return Client((LOOPBACK, service.port_number), **kwargs)


class Raw:
    """A raw socket to the proxy that reads replies byte-exact."""

    def __init__(self, service, timeout: float = 5) -> None:
        self.sock = socket.create_connection((LOOPBACK, service.port_number), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> "Raw":
        self.sock.sendall(data)
        return self

    def read_until(self, terminator: bytes, count: int = 1) -> bytes:
        while self.buf.count(terminator) < count:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                break
            self.buf += chunk
        out, self.buf = self.buf, b""
        return out

    def read_exactly(self, size: int) -> bytes:
        while len(self.buf) < size:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                break
            self.buf += chunk
        out, self.buf = self.buf[:size], self.buf[size:]
        return out

    def closed(self) -> bool:
        return self.sock.recv(10) == b""

    def close(self) -> None:
        self.sock.close()


def key_on(service, index: int, prefix: str = "k") -> str:
    name = service.pool.servers[index].name
    return next(f"{prefix}{i}" for i in range(100000)
                if service.pool.server_for_key(f"{prefix}{i}".encode()).name == name)


def test_memccapable_passes_every_ascii_check(memcached_servers, proxy) -> None:
    require("memccapable")
    service = proxy(pool_yaml(memcached_servers(3), timeout="2000"))
    result = subprocess.run(["memccapable", "-a", "-h", LOOPBACK, "-p", str(service.port_number), "-t", "5"],
                            capture_output=True, text=True, timeout=120)
    assert "All tests passed" in result.stdout or result.stdout.count("[pass]") == 27, result.stdout
    assert "[FAIL]" not in result.stdout, result.stdout
    assert result.stdout.count("[pass]") == 27, result.stdout
