"""Listening sockets: a pool's, shared between ``--workers``, and why one failed.

Owns: :func:`listen_pool` (TCP, a unix socket, one inherited from a
``--workers`` master, or TCP shared with ``SO_REUSEPORT``), making the
shareable sockets (:func:`reuse_port_socket`, :func:`unix_socket`,
:func:`reserve_port`), resolving a listen host to an address once, and
:class:`ListenError`, the one-line reason a listener could not be opened.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from typing import Any, Optional

from twisted.internet import tcp, unix
from twisted.internet.error import CannotListenError

from twinproxy.config import ListenSpec


class ListenError(Exception):
    """A listener could not be opened: ``str()`` is one line naming what, where and why."""

    def __init__(self, what: str, address: str, reason: str) -> None:
        super().__init__(f"{what}: cannot listen on {address}: {reason}")
        self.what = what
        self.address = address
        self.reason = reason


def os_reason(err: BaseException) -> str:
    """The OS's words for why a listen failed, without Twisted's wrapping."""
    if isinstance(err, CannotListenError):
        err = err.socketError
    if isinstance(err, OSError) and err.errno is not None:
        return os.strerror(err.errno)
    if isinstance(err, socket.gaierror):
        return err.strerror or str(err)
    return str(err) or type(err).__name__


def interface(host: Optional[str]) -> str:
    """An address to bind for ``host``; names are resolved once, before serving."""
    if not host:
        return ""
    if host in ("0.0.0.0", "::"):
        return host
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        return host
    except OSError:
        pass
    info = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return info[0][4][0]


def remove_stale_socket(path: str) -> None:
    # A socket left by a process that died is in the way of bind(); a file
    # of any other kind is not ours to delete.  One that someone still
    # listens on is not stale either.
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
    else:
        raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE), path)
    finally:
        probe.close()


def reuse_port_socket(listen: ListenSpec, backlog: int, host: str, listening: bool = True) -> socket.socket:
    """A TCP socket other processes can bind too (SO_REUSEPORT); listening unless told not to."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, listen.port))
        if listening:
            sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def reserve_port(listen: ListenSpec) -> socket.socket:
    """Bind (without listening) a shareable socket for ``listen``: the port it holds is the pool's.

    The ``--workers`` master does this for ``host:0``, so every worker binds
    the one port the system picked; a socket that does not listen is given
    no connections.
    """
    return reuse_port_socket(listen, 0, interface(listen.host) or "0.0.0.0", listening=False)


def unix_socket(listen: ListenSpec, backlog: int) -> socket.socket:
    """A listening unix socket, made once, before the workers are forked."""
    remove_stale_socket(listen.path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(listen.path)
        os.chmod(listen.path, listen.mode if listen.mode is not None else 0o666)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class SharedUnixPort(unix.Port):
    """A unix listener inherited from the ``--workers`` master, who made it and removes its path.

    Twisted's own port unlinks the path when it stops listening; with N
    workers sharing one socket the first would pull it from under the
    others (and the rest fail to unlink it).
    """

    def connectionLost(self, reason: Any) -> None:
        tcp.Port.connectionLost(self, reason)


def adopt_shared_unix(reactor: Any, sock: socket.socket, factory: Any) -> Any:
    """Listen on an inherited unix socket (reactor.adoptStreamPort, with the master owning the path)."""
    port = SharedUnixPort._fromListeningDescriptor(reactor, sock.fileno(), factory)
    port.startListening()
    return port


def listen_pool(reactor: Any, name: str, listen: ListenSpec, factory: Any, backlog: int,
                inherited: Any = None, reuse_port: bool = False) -> Any:
    """Open pool ``name``'s listener; raise :class:`ListenError` with one clear line."""
    try:
        if inherited is not None:
            return adopt_shared_unix(reactor, inherited, factory)
        if reuse_port and not listen.is_unix:
            host = interface(listen.host) or "0.0.0.0"
            sock = reuse_port_socket(listen, backlog, host)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            try:
                return reactor.adoptStreamPort(sock.fileno(), family, factory)
            finally:
                sock.close()  # the port holds its own duplicate
        if listen.is_unix:
            remove_stale_socket(listen.path)
            mode = listen.mode if listen.mode is not None else 0o666
            return reactor.listenUNIX(listen.path, factory, backlog=backlog, mode=mode)
        return reactor.listenTCP(listen.port, factory, backlog=backlog, interface=interface(listen.host))
    except (CannotListenError, OSError) as err:
        raise ListenError(f"pool {name}", str(listen), os_reason(err)) from None


def bound_address(port: Any) -> str:
    """What a listening port is bound to, as ``host:port`` or a path."""
    host = port.getHost()
    if hasattr(host, "port"):
        shown = f"[{host.host}]" if ":" in host.host else host.host
        return f"{shown}:{host.port}"
    name = host.name
    return name.decode() if isinstance(name, bytes) else str(name)
