"""Pool files as data for the reload tests: a :class:`Layout` of
:class:`PoolLayout` s whose servers are named by the index of a real backend,
rendered to nutcracker YAML; the steps of a reload sequence are small
functions that change a copy of it (:func:`full_steps`, :func:`worker_steps`).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from tests.servers import LOOPBACK

# -- pool files as data ----------------------------------------------------------


@dataclass
class Server:
    backend: int  # index into the real redis-servers (Redis pools) or memcacheds
    weight: int = 1
    name: Optional[str] = None


@dataclass
class PoolLayout:
    listen: str
    redis: bool
    servers: List[Server]
    keys: Dict[str, str] = field(default_factory=dict)

    def server(self, backend: int) -> Server:
        return next(s for s in self.servers if s.backend == backend)

    def named(self, name: str) -> Server:
        return next(s for s in self.servers if s.name == name)


@dataclass
class Layout:
    """A whole pool file; ``render`` turns backend indexes into the real addresses."""

    pools: Dict[str, PoolLayout]

    def copy(self) -> "Layout":
        return copy.deepcopy(self)

    def render(self, redis_addresses: Sequence[str], memcache_addresses: Sequence[str]) -> str:
        lines = []
        for name, pool in self.pools.items():
            addresses = redis_addresses if pool.redis else memcache_addresses
            lines += [f"{name}:", f"  listen: {pool.listen}", f"  redis: {'true' if pool.redis else 'false'}"]
            lines += [f"  {key}: {value}" for key, value in pool.keys.items()]
            lines.append("  servers:")
            for server in pool.servers:
                line = f"   - {addresses[server.backend]}:{server.weight}"
                lines.append(line + (f" {server.name}" if server.name else ""))
        return "\n".join(lines) + "\n"


Step = Tuple[str, Callable[[Layout], None]]


def apply_steps(start: Layout, steps: Sequence[Step]) -> List[Tuple[str, Layout]]:
    """The layouts after each step, cumulatively: ``[(description, layout), ...]``."""
    layouts = []
    current = start
    for description, change in steps:
        current = current.copy()
        change(current)
        layouts.append((description, current))
    return layouts


def initial_layout(mpool_listen: str = f"{LOOPBACK}:0") -> Layout:
    """Two pools over three of four backends each, listening on ``127.0.0.1:0`` (or ``mpool_listen``)."""
    return Layout({
        "rpool": PoolLayout(f"{LOOPBACK}:0", True, [Server(0), Server(1), Server(2)], {"timeout": "5000"}),
        "mpool": PoolLayout(mpool_listen, False, [Server(0), Server(1), Server(2)], {"timeout": "5000"}),
    })


def _each(*changes: Callable[[Layout], None]) -> Callable[[Layout], None]:
    def change(layout: Layout) -> None:
        for one in changes:
            one(layout)

    return change


def _pool(name: str, change: Callable[[PoolLayout], None]) -> Callable[[Layout], None]:
    return lambda layout: change(layout.pools[name])


def _set(**keys: Optional[str]) -> Callable[[PoolLayout], None]:
    def change(pool: PoolLayout) -> None:
        for key, value in keys.items():
            if value is None:
                pool.keys.pop(key, None)
            else:
                pool.keys[key] = value

    return change


def _listen(where: str) -> Callable[[PoolLayout], None]:
    def change(pool: PoolLayout) -> None:
        pool.listen = where

    return change


def _servers(*servers: Server) -> Callable[[PoolLayout], None]:
    def change(pool: PoolLayout) -> None:
        pool.servers = [copy.copy(s) for s in servers]

    return change


def _add_pool(name: str, pool: PoolLayout) -> Callable[[Layout], None]:
    def change(layout: Layout) -> None:
        layout.pools[name] = copy.deepcopy(pool)

    return change


def _remove_pool(name: str) -> Callable[[Layout], None]:
    def change(layout: Layout) -> None:
        del layout.pools[name]

    return change


def _weight(backend: int, weight: int) -> Callable[[PoolLayout], None]:
    def change(pool: PoolLayout) -> None:
        pool.server(backend).weight = weight

    return change


def _names(*names: Optional[str]) -> Callable[[PoolLayout], None]:
    def change(pool: PoolLayout) -> None:
        for server, name in zip(pool.servers, names):
            server.name = name

    return change


def _readdress(name: str, backend: int) -> Callable[[PoolLayout], None]:
    def change(pool: PoolLayout) -> None:
        pool.named(name).backend = backend

    return change


def _drop(backend: int) -> Callable[[PoolLayout], None]:
    def change(pool: PoolLayout) -> None:
        pool.servers = [s for s in pool.servers if s.backend != backend]

    return change


def full_steps(sock_dir: str) -> List[Step]:
    """Twenty reloads: servers added, re-weighted, renamed, removed, re-addressed; hash, distribution
    and hash tag; a third pool added, flipped to the other protocol, removed, added again; both
    pools' listen moved to a unix socket and back; settings; and one reload that changes nothing."""
    rsock, msock, xsock = (os.path.join(sock_dir, f"{n}.sock") for n in ("r", "m", "x"))
    tcp = f"{LOOPBACK}:0"
    return [
        ("add a server to each pool", _each(_pool("rpool", lambda p: p.servers.append(Server(3))),
                                            _pool("mpool", lambda p: p.servers.append(Server(3))))),
        ("re-weight", _each(_pool("rpool", _weight(0, 3)), _pool("mpool", _weight(1, 2)))),
        ("rename every server", _each(_pool("rpool", _names("ra", "rb", "rc", "rd")),
                                      _pool("mpool", _names("ma", "mb", "mc", "md")))),
        ("change the hashes", _each(_pool("rpool", _set(hash="murmur")), _pool("mpool", _set(hash="md5")))),
        ("modula; a hash tag", _each(_pool("rpool", _set(distribution="modula")),
                                     _pool("mpool", _set(hash_tag='"{}"')))),
        ("add a third pool", _add_pool("xpool", PoolLayout(tcp, True, [Server(0), Server(1)]))),
        ("move rpool to a unix socket", _pool("rpool", _listen(rsock))),
        ("remove a server from each pool", _each(_pool("rpool", _drop(1)), _pool("mpool", _drop(0)))),
        ("nothing", lambda layout: None),
        ("re-address a server in each pool", _each(_pool("rpool", _readdress("ra", 1)),
                                                   _pool("mpool", _readdress("mb", 0)))),
        ("the third pool becomes memcached", _add_pool("xpool", PoolLayout(tcp, False, [Server(2), Server(3)]))),
        ("move mpool to a unix socket", _pool("mpool", _listen(msock))),
        ("settings", _each(_pool("rpool", _set(timeout="2000", server_connections="2", redis_db="1")),
                           _pool("mpool", _set(timeout="2000", server_connections="2",
                                               client_max_pending="512")))),
        ("remove the third pool", _remove_pool("xpool")),
        ("move rpool back to TCP", _pool("rpool", _listen(tcp))),
        ("ketama and crc32; no hash tag, modula", _each(
            _pool("rpool", _set(distribution="ketama", hash="crc32")),
            _pool("mpool", _set(hash_tag=None, distribution="modula")))),
        ("move mpool back to TCP; a third pool on a unix socket", _each(
            _pool("mpool", _listen(tcp)), _add_pool("xpool", PoolLayout(xsock, False, [Server(0)])))),
        ("rpool: four unnamed equal servers, db 0", _pool("rpool", _each_pool(
            _servers(Server(0), Server(1), Server(2), Server(3)), _set(redis_db=None, server_connections=None)))),
        ("remove the third pool; mpool back to its first settings", _each(_remove_pool("xpool"), _pool(
            "mpool", _each_pool(_servers(Server(0), Server(1), Server(2), Server(3)),
                                _set(hash=None, distribution=None, server_connections=None))))),
        ("remove a server, re-weight another", _each(_pool("rpool", _each_pool(_drop(3), _weight(0, 2))),
                                                     _pool("mpool", _each_pool(_drop(2), _weight(3, 3))))),
    ]


def _each_pool(*changes: Callable[[PoolLayout], None]) -> Callable[[PoolLayout], None]:
    def change(pool: PoolLayout) -> None:
        for one in changes:
            one(pool)

    return change


def worker_layout(sock_dir: str) -> Layout:
    """The start of :func:`worker_steps`: mpool on a unix socket, which ``--workers`` opens before
    forking (a unix listen cannot be added by a reload there, only left)."""
    return initial_layout(mpool_listen=os.path.join(sock_dir, "m.sock"))


def worker_steps(port: int) -> List[Step]:
    """Eight reloads for ``--workers``: the same kinds of change, fewer of them.  rpool's listen
    moves from ``127.0.0.1:0`` to ``127.0.0.1:port`` and back; mpool's from its unix socket to TCP."""
    tcp = f"{LOOPBACK}:0"
    return [
        ("add a server to each pool", _each(_pool("rpool", lambda p: p.servers.append(Server(3))),
                                            _pool("mpool", lambda p: p.servers.append(Server(3))))),
        ("re-weight and rename", _each(_pool("rpool", _each_pool(_weight(0, 3), _names("ra", "rb", "rc", "rd"))),
                                       _pool("mpool", _each_pool(_weight(1, 2), _names("ma", "mb", "mc", "md"))))),
        ("hash and distribution", _each(_pool("rpool", _set(hash="murmur", distribution="modula")),
                                        _pool("mpool", _set(hash="md5", hash_tag='"{}"')))),
        ("add a third pool", _add_pool("xpool", PoolLayout(tcp, True, [Server(0), Server(1)]))),
        ("move rpool to another port; mpool from its unix socket to TCP", _each(
            _pool("rpool", _listen(f"{LOOPBACK}:{port}")), _pool("mpool", _listen(tcp)))),
        ("remove a server from each pool; re-address one", _each(
            _pool("rpool", _each_pool(_drop(1), _readdress("ra", 1))), _pool("mpool", _drop(0)))),
        ("remove the third pool", _remove_pool("xpool")),
        ("move rpool back; ketama", _pool("rpool", _each_pool(_listen(tcp), _set(distribution="ketama")))),
    ]


__all__ = ["Layout", "PoolLayout", "Server", "Step", "apply_steps", "full_steps", "initial_layout", "worker_layout",
           "worker_steps"]
