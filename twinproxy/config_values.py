"""The values of a pool file's settings: one parser per kind of value, and the two address types.

Owns :class:`ListenSpec` and :class:`ServerSpec` and the pure functions
that turn one YAML scalar (always a string: see ``twinproxy.config``) into
a setting's value the way nutcracker reads it, each raising ``fail(...)``
(the caller's ConfigError, which knows the file, pool and key) with why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from twinproxy.credentials import valid_user_name
from twinproxy.distribution import DISTRIBUTIONS
from twinproxy.hashing import HASH_FUNCTIONS

# Nutcracker leaves the port out of a server's ketama name when it is the
# memcached default, to place keys as libmemcached does.
KETAMA_DEFAULT_PORT = 11211
# Envoy's names for where reads go.
READ_POLICIES = ("master", "prefer-master", "replica", "prefer-replica", "any")


@dataclass(frozen=True)
class ListenSpec:
    """Where a pool accepts clients: a TCP host and port, or a unix socket."""

    host: Optional[str] = None
    port: Optional[int] = None
    path: Optional[str] = None
    mode: Optional[int] = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    def __str__(self) -> str:
        if self.path is not None:
            return self.path
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class ServerSpec:
    """One backend line: its address, its weight and the name ketama hashes."""

    name: str
    weight: int
    host: Optional[str] = None
    port: Optional[int] = None
    path: Optional[str] = None
    label: str = ""  # what the stats show: the given name, else host:port or the path

    @property
    def stats_name(self) -> str:
        return self.label or self.name

    @property
    def address(self) -> str:
        if self.path is not None:
            return self.path
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"



def number_value(raw: str, fail) -> int:
    if not raw.isdigit() or not raw.isascii():
        raise fail("is not a number (expected a non-negative integer)")
    return int(raw)


def positive_value(raw: str, fail) -> int:
    number = number_value(raw, fail)
    if number == 0:
        raise fail("must be greater than zero")
    return number


def boolean_value(raw: str, fail) -> bool:
    if raw == "true":
        return True
    if raw == "false":
        return False
    raise fail("is not 'true' or 'false'")


def _one_of(choices: tuple, what: str):
    """The parser of a value that must be one of ``choices`` (a hash, a distribution, a read policy)."""
    def check(raw: str, fail) -> str:
        if raw not in choices:
            raise fail(f"is not a valid {what} (expected one of " + ", ".join(choices) + ")")
        return raw
    return check


hash_value = _one_of(tuple(HASH_FUNCTIONS), "hash")
distribution_value = _one_of(tuple(DISTRIBUTIONS), "distribution")
read_policy_value = _one_of(READ_POLICIES, "read policy")


def hash_tag_value(raw: str, fail) -> str:
    if len(raw) != 2:
        raise fail("is not a valid hash tag (expected exactly two characters, e.g. \"{}\")")
    return raw


def text_value(raw: str, fail) -> str:
    if not raw:
        raise fail("must not be empty")
    return raw


def user_name_value(raw: str, fail) -> str:
    if not valid_user_name(raw):
        raise fail("is not a Redis user name (one word, no spaces or control characters)")
    return raw


def port_value(raw: str, fail) -> int:
    if not raw.isdigit() or not raw.isascii() or not 0 < int(raw) < 65536:
        raise fail("has an invalid port (expected 1 to 65535)")
    return int(raw)


def host_value(raw: str, fail) -> str:
    if raw.startswith("[") and raw.endswith("]"):
        raw = raw[1:-1]
    if not raw or any(c.isspace() for c in raw):
        raise fail("has an invalid host")
    return raw


def listen_port_value(raw: str, fail) -> int:
    # 0 is twinproxy's: the system picks the port (see --bound-addresses).
    if raw == "0":
        return 0
    return port_value(raw, fail)


def listen_value(raw: str, fail) -> ListenSpec:
    raw = raw.strip()
    if raw.startswith("/"):
        parts = raw.split()
        if len(parts) > 2:
            raise fail("is not a valid unix socket listen address (expected '/path [mode]')")
        mode = None
        if len(parts) == 2:
            try:
                mode = int(parts[1], 8)
            except ValueError:
                raise fail("has an invalid socket mode (expected octal, e.g. 0666)") from None
            if not 0 <= mode <= 0o7777:
                raise fail("has an invalid socket mode (expected octal, e.g. 0666)")
        return ListenSpec(path=parts[0], mode=mode)
    host, sep, port = raw.rpartition(":")
    if not sep:
        raise fail("is not a valid listen address (expected 'host:port' or '/path/to.sock [mode]')")
    return ListenSpec(host=host_value(host, fail), port=listen_port_value(port, fail))


def server_value(line: str, fail) -> ServerSpec:
    """Parse ``host:port:weight [name]`` or ``/path:weight [name]``, from the end."""
    address, _, name = line.strip().partition(" ")
    name = name.strip()
    if name and any(c.isspace() for c in name):
        raise fail("has an invalid name (a server name is one word)")
    rest, sep, weight_text = address.rpartition(":")
    if not sep or not rest:
        raise fail("is not a valid server (expected 'host:port:weight [name]')")
    if not weight_text.isdigit() or not weight_text.isascii():
        raise fail("has an invalid weight (expected a positive integer)")
    weight = int(weight_text)
    if weight == 0:
        raise fail("has a zero weight")
    if rest.startswith("/"):
        return ServerSpec(name=name or rest, weight=weight, path=rest, label=name or rest)
    host_text, sep, port_text = rest.rpartition(":")
    if not sep:
        raise fail("is not a valid server (expected 'host:port:weight [name]')")
    host = host_value(host_text, fail)
    port = port_value(port_text, fail)
    shown = f"[{host}]" if ":" in host else host
    label = name or f"{shown}:{port}"
    if not name:
        name = shown if port == KETAMA_DEFAULT_PORT else f"{shown}:{port}"
    return ServerSpec(name=name, weight=weight, host=host, port=port, label=label)
