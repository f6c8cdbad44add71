"""Cluster mode's coordinator: a small tree of byte values with versions, watches and ephemerals.

Owns the public face of the package: :func:`connect` (a URL to a backend),
:class:`Node`, the errors (:class:`CoordinatorError` and its subclasses
:class:`Conflict`, :class:`NotFound`, :class:`Unavailable`) and the URL rules
(:func:`parse_url`, :func:`check_path`).  This module is pure (no Twisted):
``twinproxy.coordinator.blocking`` imports it from applications that run no
reactor, and the backends are imported only by :func:`connect`.

URLs::

    zookeeper://h1:2181,h2:2181/chroot      (kazoo; parents are made as empty nodes)
    etcd://h1:2379,h2:2379/prefix           (the v3 JSON gateway; keys are prefix + path)
    file:///abs/dir                         (one host, no server: a directory and flocks)

with ``?session_timeout=SECONDS`` (default 10: the ZK session timeout, the etcd
lease TTL) and ``&timeout=SECONDS`` (the deadline of each operation, default 5).
``user:password@`` before the hosts is ZK digest auth or etcd's user auth; the
password never appears in a message.

Versions are opaque integers: compare them for equality only (ZK's node
version, etcd's mod_revision, the file store's revision counter).  In etcd and
the file store a path's parents need not exist; ``children`` then still lists
a name that only has descendants, as an empty Node at version 0 (what ZK's
automatically made parents look like), so listings agree across backends.
``delete`` is never recursive (ZK refuses a node with children: Conflict).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple
from urllib.parse import parse_qsl, unquote, urlsplit

if TYPE_CHECKING:
    from twinproxy.coordinator.base import Coordinator

SCHEMES = ("zookeeper", "etcd", "file")
DEFAULT_PORTS = {"zookeeper": 2181, "etcd": 2379}
DEFAULT_SESSION_TIMEOUT = 10.0
DEFAULT_TIMEOUT = 5.0


@dataclasses.dataclass(frozen=True)
class Node:
    """A value and the version it has (opaque: changes on every write)."""

    value: bytes
    version: int


class CoordinatorError(Exception):
    """An operation failed; the one-line message names the URL, the operation and the path."""

    def __init__(self, url: str, operation: str, path: str, reason: str) -> None:
        self.url = url
        self.operation = operation
        self.path = path
        self.reason = " ".join(str(reason).split())  # one line, always
        super().__init__(f"{url}: {operation} {path}: {self.reason}")


class Conflict(CoordinatorError):
    """The path exists (create, ephemeral), or its version moved on (set, delete)."""


class NotFound(CoordinatorError):
    """The path does not exist (set, delete, update)."""


class Unavailable(CoordinatorError):
    """No answer within the deadline, no session, or the coordinator is stopped."""


@dataclasses.dataclass(frozen=True)
class CoordinatorURL:
    """A parsed coordinator URL; ``display`` is the URL as messages show it (no password)."""

    scheme: str
    hosts: Tuple[Tuple[str, int], ...]
    root: str  # "" (no chroot/prefix) or "/a/b"; for file, the absolute directory
    session_timeout: float
    timeout: float
    username: Optional[str] = None
    password: Optional[str] = dataclasses.field(default=None, repr=False)

    @property
    def display(self) -> str:
        if self.scheme == "file":
            return f"file://{self.root}"
        user = f"{self.username}@" if self.username else ""
        return f"{self.scheme}://{user}{self.host_list}{self.root}"

    @property
    def host_list(self) -> str:
        """``h1:p1,h2:p2`` (IPv6 hosts in brackets)."""
        return ",".join(f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host, port in self.hosts)


def parse_url(url: str) -> CoordinatorURL:
    """The parts of a coordinator URL, or ValueError saying what is wrong with it."""
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(f"coordinator URL {_shown(url)!r} is not a URL: use zookeeper://host:2181/chroot, "
                         "etcd://host:2379/prefix or file:///abs/dir")
    try:
        parts = urlsplit(url)
    except ValueError as err:  # urllib's own complaint ("Invalid IPv6 URL")
        raise ValueError(f"coordinator URL {_shown(url)!r}: bad host ({err})") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f"coordinator URL {_shown(url)!r}: unknown scheme {parts.scheme!r} "
                         f"(use one of {', '.join(SCHEMES)})")
    if parts.fragment:
        raise ValueError(f"coordinator URL {_shown(url)!r}: a fragment (#...) means nothing here")
    options = _options(url, parts.query)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"coordinator URL {_shown(url)!r}: a file URL names no host: use file:///abs/dir")
        directory = unquote(parts.path)
        if not directory.startswith("/"):
            raise ValueError(f"coordinator URL {_shown(url)!r}: needs an absolute directory, as file:///abs/dir")
        return CoordinatorURL("file", (), directory.rstrip("/") or "/", **options)
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    username = password = None
    if userinfo:
        username, _, password = userinfo.partition(":")
        username, password = unquote(username), unquote(password)
        if not username or not password:
            raise ValueError(f"coordinator URL {_shown(url)!r}: credentials must be user:password@")
    hosts = _hosts(url, scheme, hostinfo)
    root = unquote(parts.path).rstrip("/")
    if root:
        try:
            check_path(root)
        except ValueError as err:
            raise ValueError(f"coordinator URL {_shown(url)!r}: bad root: {err}") from None
    return CoordinatorURL(scheme, hosts, root, username=username, password=password, **options)


def _options(url: str, query: str) -> dict:
    options = {"session_timeout": DEFAULT_SESSION_TIMEOUT, "timeout": DEFAULT_TIMEOUT}
    for name, text in parse_qsl(query, keep_blank_values=True):
        if name not in options:
            raise ValueError(f"coordinator URL {_shown(url)!r}: unknown option {name!r} "
                             "(known: session_timeout, timeout)")
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not 0 < value <= 3600:
            raise ValueError(f"coordinator URL {_shown(url)!r}: {name} must be a number of seconds "
                             f"in (0, 3600], not {text!r}")
        options[name] = value
    return options


def _hosts(url: str, scheme: str, hostinfo: str) -> Tuple[Tuple[str, int], ...]:
    hosts: List[Tuple[str, int]] = []
    for item in hostinfo.split(","):
        if item.startswith("["):
            host, bracket, rest = item[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                raise ValueError(f"coordinator URL {_shown(url)!r}: bad host {item!r}")
            port_text = rest[1:]
        else:
            host, _, port_text = item.partition(":")
        if not host:
            raise ValueError(f"coordinator URL {_shown(url)!r}: empty host in {hostinfo!r} "
                             f"(as {scheme}://host:{DEFAULT_PORTS[scheme]}/...)")
        try:
            port = int(port_text) if port_text else DEFAULT_PORTS[scheme]
        except ValueError:
            port = 0
        if not 0 < port < 65536:
            raise ValueError(f"coordinator URL {_shown(url)!r}: bad port {port_text!r} for host {host!r}")
        hosts.append((host, port))
    return tuple(hosts)


def _shown(url: Any) -> str:
    """The URL without its password, for messages."""
    if not isinstance(url, str) or "@" not in url or "://" not in url:
        return url if isinstance(url, str) else repr(url)
    scheme, _, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/")
    userinfo, _, hostinfo = netloc.rpartition("@")
    return f"{scheme}://{userinfo.partition(':')[0]}@{hostinfo}{slash}{tail}"


def check_path(path: str, allow_root: bool = False) -> str:
    """``path`` if it is an absolute node path (``/a/b``), else ValueError.

    No empty, ``.`` or ``..`` parts, no trailing slash, no NUL; ``/`` itself
    only where ``allow_root`` (children and watches of the root).
    """
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError(f"coordinator path {path!r} must be a string starting with /")
    if path == "/":
        if allow_root:
            return path
        raise ValueError("coordinator path '/' is the root, which holds no value")
    for part in path[1:].split("/"):
        if part in ("", ".", "..") or "\0" in part:
            raise ValueError(f"coordinator path {path!r} has an empty, '.', '..' or NUL part")
    return path


def direct_children(parent: str, nodes: Dict[str, Node]) -> Dict[str, Node]:
    """``parent``'s direct children among ``nodes`` (all paths under it); a name that only has
    descendants is an empty Node at version 0, as ZK's automatically made parents are."""
    prefix = "/" if parent == "/" else parent + "/"
    result: Dict[str, Node] = {}
    for path, node in nodes.items():
        if not path.startswith(prefix):
            continue
        name, slash, _ = path[len(prefix):].partition("/")
        if not slash:
            result[name] = node
        else:
            result.setdefault(name, Node(b"", 0))
    return result


def connect(url: str, reactor: Any) -> "Coordinator":
    """A Coordinator for ``url`` (not started yet: call ``start()``), or ValueError for a bad URL."""
    parsed = parse_url(url)
    if parsed.scheme == "file":
        from twinproxy.coordinator.file import FileCoordinator

        return FileCoordinator(parsed, reactor)
    if parsed.scheme == "etcd":
        from twinproxy.coordinator.etcd import EtcdCoordinator

        return EtcdCoordinator(parsed, reactor)
    from twinproxy.coordinator.zookeeper import ZooKeeperCoordinator

    return ZooKeeperCoordinator(parsed, reactor)


def __getattr__(name: str) -> Any:
    """``Coordinator``, ``Watch`` and ``Ephemeral`` (for type hints), imported only when asked for:
    importing this package must not import Twisted."""
    if name in ("Coordinator", "Watch", "Ephemeral"):
        from twinproxy.coordinator import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CoordinatorError", "CoordinatorURL", "Conflict", "Node", "NotFound", "Unavailable", "check_path",
           "connect", "direct_children", "parse_url"]
