"""What changed between two versions of a pool file: pure diffs, no I/O.

Owns: :class:`PoolDiff` (one pool: servers added, removed, re-addressed,
re-weighted, the ring, the listen address, every other setting) and
:class:`ProxyDiff` (pools added, removed, replaced, changed), computed by
:func:`diff_pool` and :func:`diff_pools`.  A server's identity is its
**name** — what ketama hashes — so a new address under the same name is a
re-address (health and counters kept; Sentinel uses the same change) and
a new name is a removal plus an addition.  Knows nothing of Twisted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from twinproxy.config import PoolConfig, ServerSpec

# Keys whose change rebuilds the ring (with the server list itself).
RING_KEYS = ("hash", "hash_tag", "distribution")
# Keys that are sent when a backend connection opens: a change replaces the connections.
HANDSHAKE_KEYS = ("redis_auth", "redis_auth_user", "redis_db")
# Keys handled apart from "settings".
_STRUCTURAL = frozenset(("name", "listen", "servers", "redis", "slots", *RING_KEYS))
# Never shown in a change description.
_SECRET = frozenset(("redis_auth", "sentinel_auth"))


@dataclass(frozen=True)
class PoolDiff:
    """How one pool (same name, same protocol) changes from ``old`` to ``new``."""

    old: PoolConfig
    new: PoolConfig
    added: Tuple[ServerSpec, ...] = ()
    removed: Tuple[ServerSpec, ...] = ()
    readdressed: Tuple[Tuple[ServerSpec, ServerSpec], ...] = ()   # (old, new), same name
    reweighted: Tuple[Tuple[ServerSpec, ServerSpec], ...] = ()
    ring_changed: bool = False
    listen_changed: bool = False
    settings: Tuple[str, ...] = ()   # every other changed key, in PoolConfig's order
    # (old, new), same address, new name: a plain pool joining its cluster (adopted) keeps its links.
    renamed: Tuple[Tuple[ServerSpec, ServerSpec], ...] = ()

    @property
    def name(self) -> str:
        return self.new.name

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.readdressed or self.reweighted or self.ring_changed
                    or self.listen_changed or self.settings or self.renamed)

    @property
    def handshake_changed(self) -> bool:
        return any(key in self.settings for key in HANDSHAKE_KEYS)

    def describe(self) -> List[str]:
        """One line per change, for the log and the reload report (passwords never shown)."""
        pool = f"pool {self.name}"
        lines = []
        for spec in self.added:
            lines.append(f"{pool}: server {spec.stats_name} added ({spec.address}, weight {spec.weight})")
        for spec in self.removed:
            lines.append(f"{pool}: server {spec.stats_name} removed ({spec.address})")
        for old, new in self.renamed:
            lines.append(f"{pool}: server {old.stats_name} is now {new.stats_name} ({new.address})")
        for old, new in self.readdressed:
            lines.append(f"{pool}: server {new.stats_name} moved from {old.address} to {new.address}")
        for old, new in self.reweighted:
            lines.append(f"{pool}: server {new.stats_name} weight {old.weight} -> {new.weight}")
        for key in RING_KEYS:
            before, after = getattr(self.old, key), getattr(self.new, key)
            if before != after:
                lines.append(f"{pool}: {key} {before} -> {after}")
        if self.old.slots != self.new.slots:
            lines.append(f"{pool}: " + (self.new.slots.describe_change(self.old.slots) if self.new.slots is not None
                                        else "slots unloaded"))
        if self.ring_changed and not lines:
            lines.append(f"{pool}: server order changed")
        if self.listen_changed:
            lines.append(f"{pool}: listen {self.old.listen} -> {self.new.listen}")
        for key in self.settings:
            if key in _SECRET:
                lines.append(f"{pool}: {key} changed")
            else:
                lines.append(f"{pool}: {key} {getattr(self.old, key)} -> {getattr(self.new, key)}")
        return lines


def diff_pool(old: PoolConfig, new: PoolConfig) -> PoolDiff:
    """The difference between two configs of one pool with the same protocol."""
    before: Dict[str, ServerSpec] = {spec.name: spec for spec in old.servers}
    after: Dict[str, ServerSpec] = {spec.name: spec for spec in new.servers}
    added = tuple(spec for spec in new.servers if spec.name not in before)
    removed = tuple(spec for spec in old.servers if spec.name not in after)
    renamed: List[Tuple[ServerSpec, ServerSpec]] = []
    if new.cluster_mode and not old.cluster_mode:
        # Joining its cluster: a server under its group's name is the same server, its
        # connections kept (a client's pipelined requests stay on one connection, in order).
        gone = {spec.address: spec for spec in removed}
        renamed = [(gone.pop(spec.address), spec) for spec in added if spec.address in gone]
        moved = {spec.name for pair in renamed for spec in pair}
        added = tuple(spec for spec in added if spec.name not in moved)
        removed = tuple(spec for spec in removed if spec.name not in moved)
    readdressed = []
    reweighted = []
    for spec in new.servers:
        previous = before.get(spec.name)
        if previous is None:
            continue
        # In Sentinel mode the address is only a first guess: the sentinels place the
        # master (but in a cluster the dashboard's promote moves it: the shard looks again).
        if (previous.host, previous.port, previous.path) != (spec.host, spec.port, spec.path) \
                and (not new.sentinel_mode or new.cluster_mode):
            readdressed.append((previous, spec))
        if previous.weight != spec.weight:
            reweighted.append((previous, spec))
    ring_changed = (any(getattr(old, key) != getattr(new, key) for key in RING_KEYS) or old.slots != new.slots
                    or [(s.name, s.weight) for s in old.servers] != [(s.name, s.weight) for s in new.servers])
    settings = tuple(f.name for f in dataclasses.fields(PoolConfig)
                     if f.name not in _STRUCTURAL and getattr(old, f.name) != getattr(new, f.name))
    return PoolDiff(old=old, new=new, added=added, removed=removed, readdressed=tuple(readdressed),
                    reweighted=tuple(reweighted), ring_changed=ring_changed,
                    listen_changed=old.listen != new.listen, settings=settings, renamed=tuple(renamed))


@dataclass(frozen=True)
class ProxyDiff:
    """How a whole pool file changes: pools to start, to stop, to replace, to change in place."""

    added: Tuple[PoolConfig, ...] = ()
    removed: Tuple[PoolConfig, ...] = ()
    # A pool whose protocol changed: stopped and started anew under the same name.
    replaced: Tuple[Tuple[PoolConfig, PoolConfig], ...] = ()
    changed: Tuple[PoolDiff, ...] = ()   # only pools with some change

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.replaced or self.changed)

    def describe(self) -> List[str]:
        lines = [f"pool {config.name} added (listen {config.listen}, {len(config.servers)} servers)"
                 for config in self.added]
        lines += [f"pool {config.name} removed" for config in self.removed]
        lines += [f"pool {new.name} replaced ({_mode(old)} -> {_mode(new)})" for old, new in self.replaced]
        for diff in self.changed:
            lines += diff.describe()
        return lines


def diff_pools(old: Sequence[PoolConfig], new: Sequence[PoolConfig]) -> ProxyDiff:
    """The difference between two pool files, pools matched by name."""
    before = {config.name: config for config in old}
    after = {config.name: config for config in new}
    added = tuple(config for config in new if config.name not in before)
    removed = tuple(config for config in old if config.name not in after)
    replaced = []
    changed = []
    for config in new:
        previous = before.get(config.name)
        if previous is None:
            continue
        # A cluster pool changes Sentinel mode in place (its dashboard added sentinels); a
        # plain pool joins a cluster in place (adopted: its clients stay).
        # (Redis or memcached: a memcache pool is adopted as a Redis one is.)
        joins = not previous.cluster_mode and not previous.sentinel_mode and config.cluster_mode
        if previous.redis != config.redis \
                or (previous.sentinel_mode != config.sentinel_mode and not config.cluster_mode) \
                or ((previous.cluster, previous.coordinator) != (config.cluster, config.coordinator) and not joins):
            replaced.append((previous, config))
            continue
        diff = diff_pool(previous, config)
        if not diff.empty:
            changed.append(diff)
    return ProxyDiff(added=added, removed=removed, replaced=tuple(replaced), changed=tuple(changed))


def _mode(config: PoolConfig) -> str:
    mode = config.protocol + (" with sentinels" if config.sentinel_mode else "")
    return mode + (f" in cluster {config.cluster}" if config.cluster_mode else "")
