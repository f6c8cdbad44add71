"""A Sentinel pool's shards and its watcher, as one piece of the pool's runtime.

Owns: :class:`SentinelShards` — one :class:`~twinproxy.sentinel.shard.SentinelShard`
per server name (the ring still hashes the names, so placement never
changes when a master moves), the pool's
:class:`~twinproxy.sentinel.watcher.SentinelWatcher`, and how a reload
reaches them: a new shard is discovered at once, a removed one drains,
new keys reach every shard and new sentinels get new connections.  The
configured address of a server is only a first guess, so a reload that
changes it moves nothing.  :class:`~twinproxy.runtime.PoolRuntime` holds
one of these for a pool with ``sentinels``.
"""

from __future__ import annotations

from typing import Any, Dict, List

from twisted.internet import defer

from twinproxy.config import PoolConfig
from twinproxy.links import ServerLink
from twinproxy.sentinel.shard import SentinelShard
from twinproxy.sentinel.watcher import SentinelWatcher


class SentinelShards:
    """The shards of one Sentinel pool and the watcher that places their masters."""

    def __init__(self, config: PoolConfig, pool: Any, reactor: Any, outbox: Any) -> None:
        self._pool = pool
        self._reactor = reactor
        self._outbox = outbox
        self.config = config
        self.shards: Dict[str, SentinelShard] = {}
        self.watcher = SentinelWatcher(config, reactor, self.shards)
        self._retiring: List[defer.Deferred] = []

    def add(self, server: Any, codec: Any, config: PoolConfig) -> ServerLink:
        """A shard for ``server``, made with the pool's settings as of now (a reload's new ones)."""
        shard = SentinelShard(server, self._pool, codec, config, self._reactor, self.watcher.trigger)
        shard.master.outbox = self._outbox
        self.shards[server.name] = shard
        self.watcher.trigger(f"shard {server.name} added")
        return shard.master

    def remove(self, name: str) -> defer.Deferred:
        shard = self.shards.pop(name)
        return shard.drain()

    def master_moved(self, name: str, address: str) -> None:
        """A cluster's dashboard promoted ``address`` in shard ``name``: look again now, holding its requests."""
        shard = self.shards.get(name)
        if shard is not None:
            shard.suspect(f"the cluster topology names {address} as its master")

    def reconfigure(self, codec: Any, config: PoolConfig, handshake_changed: bool, added: set) -> None:
        self.config = config
        for name, shard in self.shards.items():
            if name not in added:
                shard.reconfigure(codec, config, handshake_changed)
        self.watcher.reconfigure(config)

    def start(self) -> None:
        self.watcher.start()

    def stop(self) -> defer.Deferred:
        self.watcher.stop()
        closing: List[defer.Deferred] = []
        for shard in self.shards.values():
            closing += shard.stop()
        return defer.gatherResults(closing)

    @property
    def healthy(self) -> bool:
        return all(shard.confirmed for shard in self.shards.values())

    def health_lines(self) -> List[str]:
        """One line per shard without a confirmed master (empty when all have one)."""
        problem = self.watcher.problem
        lines = []
        for name, shard in self.shards.items():
            if not shard.confirmed:
                why = f" ({problem})" if problem else ""
                lines.append(f"shard {name} has no confirmed master{why}")
        return lines
