"""A small RESP2 client over a plain socket, with timeouts, for sentinels and
redis-servers alike (queries and ``PSUBSCRIBE``), and readers of what they answer.

- :class:`Resp`: one connection; every read has a deadline.
- :func:`query`: one command on a fresh connection.
- :func:`pairs`, :func:`parse_info`, :func:`cmdstat_calls`: SENTINEL field lists,
  ``INFO`` text and its commandstats as dicts and counts.
"""

from __future__ import annotations

import socket
import time
from typing import Dict, Optional, Sequence, Tuple, Union

from tests.servers import LOOPBACK


class RespError(Exception):
    """An error reply (``-ERR ...``); ``call`` returns it as a value, it is not raised."""

    @property
    def text(self) -> str:
        return str(self.args[0])


RespValue = Union[None, int, str, RespError, list]


def encode_command(args: Sequence[Union[str, bytes, int]]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _IncompleteError(Exception):
    pass


def parse_reply(buffer: bytes, start: int = 0) -> Tuple[RespValue, int]:
    """One RESP2 reply from ``buffer[start:]``: (value, end); raises _IncompleteError when more is needed.

    Strings are decoded (UTF-8, bad bytes replaced): sentinel replies are ASCII.
    """
    end = buffer.find(b"\r\n", start)
    if end < 0:
        raise _IncompleteError
    kind, line = buffer[start:start + 1], buffer[start + 1:end]
    after = end + 2
    if kind == b"+":
        return line.decode(errors="replace"), after
    if kind == b"-":
        return RespError(line.decode(errors="replace")), after
    if kind == b":":
        return int(line), after
    if kind == b"$":
        length = int(line)
        if length < 0:
            return None, after
        if len(buffer) < after + length + 2:
            raise _IncompleteError
        return buffer[after:after + length].decode(errors="replace"), after + length + 2
    if kind == b"*":
        count = int(line)
        if count < 0:
            return None, after
        items = []
        position = after
        for _ in range(count):
            item, position = parse_reply(buffer, position)
            items.append(item)
        return items, position
    raise ValueError(f"not a RESP reply: {buffer[start:start + 40]!r}")


class Resp:
    """One connection to a sentinel or a redis-server; every read has a deadline."""

    def __init__(self, port: int, password: Optional[str] = None, timeout: float = 2.0) -> None:
        self.port = port
        self.timeout = timeout
        self.sock = socket.create_connection((LOOPBACK, port), timeout=timeout)
        self._buffer = b""
        if password:
            reply = self.call("AUTH", password)
            if reply != "OK":
                self.close()
                raise ConnectionError(f"AUTH to port {port} refused: {reply!r}")

    def send(self, *args: Union[str, bytes, int]) -> None:
        self.sock.sendall(encode_command(args))

    def call(self, *args: Union[str, bytes, int]) -> RespValue:
        self.send(*args)
        return self.read()

    def read(self, timeout: Optional[float] = None) -> RespValue:
        """The next reply; socket.timeout after ``timeout`` (default: the connection's) without one."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            value = self.read_buffered()
            if value is not NOTHING:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout(f"no reply from port {self.port}")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"port {self.port} closed the connection")
            self._buffer += chunk

    def read_buffered(self) -> object:
        """A reply already received in full, or ``NOTHING``."""
        try:
            value, end = parse_reply(self._buffer)
        except _IncompleteError:
            return NOTHING
        self._buffer = self._buffer[end:]
        return value

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "Resp":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


NOTHING = object()


def query(port: int, *args: Union[str, bytes, int], password: Optional[str] = None,
          timeout: float = 2.0) -> RespValue:
    """One command on a fresh connection (connect, AUTH, command and reply each within ``timeout``)."""
    with Resp(port, password, timeout) as connection:
        return connection.call(*args)


def pairs(flat: Sequence) -> Dict[str, str]:
    """A flat field/value list (SENTINEL MASTERS, REPLICAS, ...) as a dict."""
    return {flat[i]: flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def parse_info(text: str) -> Dict[str, str]:
    """``INFO`` text as {field: value} (section headers and blank lines skipped)."""
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and ":" in line:
            name, _, value = line.partition(":")
            found[name] = value
    return found


def cmdstat_calls(info: Dict[str, str], command: str) -> int:
    """``calls`` of ``cmdstat_<command>`` in parsed INFO commandstats (0: never called)."""
    line = info.get(f"cmdstat_{command}")
    if not line:
        return 0
    return int(dict(part.split("=", 1) for part in line.split(","))["calls"])


__all__ = ["NOTHING", "Resp", "RespError", "RespValue", "cmdstat_calls", "encode_command", "pairs", "parse_info",
           "parse_reply", "query"]
