"""``--workers N``: N processes serving the same pools, and one stats port for all of them.

Owns: making listening sockets that several processes share (TCP with
``SO_REUSEPORT``, so the kernel spreads connections evenly; unix sockets
made once before the fork and inherited), the master process (forks the
workers, forwards stop signals, serves the stats port with every worker's
counters summed), and :func:`merge_documents`.

Workers are forked before any reactor exists: a reactor's epoll descriptor
must never be shared between processes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import tempfile
from typing import Any, Dict, List, Sequence

from twinproxy.config import ListenSpec, PoolConfig


def reuse_port_socket(listen: ListenSpec, backlog: int, interface: str) -> socket.socket:
    """A listening TCP socket other processes can bind too (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((interface, listen.port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def unix_socket(listen: ListenSpec, backlog: int) -> socket.socket:
    """A listening unix socket, made once, before the workers are forked."""
    from twinproxy.service import _remove_stale_socket

    _remove_stale_socket(listen.path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(listen.path)
    os.chmod(listen.path, listen.mode if listen.mode is not None else 0o666)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


# Fields that are not counters: the master's value (or the latest) stands.
_NOT_SUMMED = frozenset(("service", "source", "version", "uptime", "timestamp"))


def merge_documents(documents: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Sum the workers' stats documents field by field (``server_ejected_at``: the latest)."""
    if not documents:
        return {}
    merged: Dict[str, Any] = {}
    for key, value in documents[0].items():
        if isinstance(value, dict):
            merged[key] = merge_documents([d.get(key, {}) for d in documents])
        elif key in _NOT_SUMMED or not isinstance(value, int):
            merged[key] = value
        elif key == "server_ejected_at":
            merged[key] = max(d.get(key, 0) for d in documents)
        else:
            merged[key] = sum(d.get(key, 0) for d in documents)
    return merged


def run_master(options: Any, count: int) -> int:
    """Fork ``count`` workers, serve the summed stats, stop them all on SIGTERM/SIGINT."""
    from twinproxy import cli

    rundir = tempfile.mkdtemp(prefix="twinproxy-workers-")
    inherited: Dict[str, socket.socket] = {}
    for config in options.pools:
        if config.listen.is_unix:
            inherited[config.name] = unix_socket(config.listen, config.backlog)
    children: List[int] = []
    for index in range(count):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = cli.serve(options, worker_stats=os.path.join(rundir, f"worker-{index}.sock"),
                                 inherited=inherited, reuse_port=True)
            finally:
                os._exit(code)
        children.append(pid)
    for sock in inherited.values():
        sock.close()
    return _serve_master(options, children, rundir)


def _serve_master(options: Any, children: List[int], rundir: str) -> int:
    from twisted.internet import defer, reactor
    from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
    from twisted.internet.protocol import Protocol

    from twinproxy.admin import StatsPortService

    class Collect(Protocol):
        def __init__(self) -> None:
            self.data = b""
            self.done: defer.Deferred = defer.Deferred()

        def dataReceived(self, data: bytes) -> None:
            self.data += data

        def connectionLost(self, reason: Any = None) -> None:
            self.done.callback(self.data)

    def fetch(path: str) -> defer.Deferred:
        collector = Collect()
        d = connectProtocol(UNIXClientEndpoint(reactor, path, timeout=5), collector)
        d.addCallback(lambda _: collector.done)
        d.addCallback(json.loads)
        return d

    def document() -> defer.Deferred:
        paths = [os.path.join(rundir, name) for name in sorted(os.listdir(rundir)) if name.endswith(".sock")]
        waits = [fetch(path).addErrback(lambda _: None) for path in paths]
        d = defer.gatherResults(waits)
        d.addCallback(lambda docs: json.dumps(merge_documents([doc for doc in docs if doc])).encode() + b"\n")
        return d

    stats = StatsPortService(lambda: [], reactor.seconds(), reactor, options["stats-addr"],
                             options["stats-port"], document=document)
    stats.startService()

    alive = set(children)

    def reap() -> None:
        for pid in list(alive):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                alive.discard(pid)
        if not alive and reactor.running:
            reactor.stop()

    def stop_workers() -> None:
        for pid in list(alive):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                alive.discard(pid)

    # Twisted owns SIGCHLD once running; a slow poll is enough to notice a worker gone.
    from twisted.internet.task import LoopingCall

    LoopingCall(reap).start(0.5, now=False)
    reactor.addSystemEventTrigger("before", "shutdown", stop_workers)
    reactor.run()
    # Wait for the workers' own graceful stop.
    for pid in list(alive):
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    for name in os.listdir(rundir):
        os.unlink(os.path.join(rundir, name))
    os.rmdir(rundir)
    return 0


def check_supported(count: int) -> None:
    if count > 1 and not hasattr(socket, "SO_REUSEPORT"):
        print("twinproxy: --workers needs SO_REUSEPORT, which this system lacks", file=sys.stderr)
        raise SystemExit(1)


__all__ = ["merge_documents", "reuse_port_socket", "run_master", "PoolConfig"]
