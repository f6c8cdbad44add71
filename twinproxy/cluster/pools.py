"""A cluster pool as the proxy runs it: the file's settings plus the dashboard's topology.

Owns: :class:`SlotTable` (who serves each of the 1024 slots, which slots
are held, the generation and the coordinator session it was made under)
and :func:`cluster_pool`, which turns a pool file's cluster pool and a
topology document into the :class:`~twinproxy.config.PoolConfig` the
runtime applies — so a topology change reaches traffic through the same
diff and ``apply`` as a reload, in every worker.  Pure: no Twisted, no I/O.

Server names (what the stats show, and what a diff matches servers by):
a Redis group is one server, its master, named ``<cluster>-<gid>`` — the
name Codis gives the group's Sentinel master, so a promote is a new
address under the same name (the link retargets, counters stay).  A
memcached group serves with every server it lists, each
``<cluster>-<gid>-<host:port>``; each slot of the group goes to one of them
by rendezvous hashing, so adding a server moves only the slots it wins.

An adopted pool (the topology's ``adopted``): its servers became groups
(``legacy_names``, in the pool's order), and a key routes by the state of
the server the pool placed it on (``adopt_states``, same order: see
:meth:`~twinproxy.cluster.model.Topology.adopt_states`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Optional, Tuple
from zlib import crc32

from twinproxy.config import PoolConfig, ServerSpec

HELD = "held"
MIGRATING = "migrating"
CONNECTED = "connected"


@dataclass(frozen=True)
class SlotTable:
    """One generation of a cluster's routing, as one pool applies it."""

    generation: int
    owners: Tuple[Optional[str], ...]          # per slot: a server name, or None (offline)
    held: FrozenSet[int] = frozenset()
    # The coordinator session when this table was made: anything but
    # "connected" means held slots cannot be trusted, so they fail at once.
    session: str = CONNECTED
    groups: Tuple[Tuple[str, int], ...] = ()   # server name -> group id
    # Slots moving to their owner: (slot, the source's server name).  A memcache
    # slot's source server is the one the slot had in the source group (it warms up from it).
    migrating: Tuple[Tuple[int, str], ...] = ()
    # An adopted pool's placement (a cluster.legacy.Legacy), its servers' names
    # here and where each one's keys are ("legacy", "moving", "done"), in its order.
    legacy: Any = None
    legacy_names: Tuple[str, ...] = ()
    adopt_states: Tuple[str, ...] = ()

    @property
    def fenced(self) -> bool:
        return self.session != CONNECTED

    def group_of(self, name: Optional[str]) -> Optional[int]:
        for server, gid in self.groups:
            if server == name:
                return gid
        return None

    def slots_per_group(self) -> Dict[str, int]:
        """How many slots each group serves ("offline": none), for the stats."""
        by_server = dict(self.groups)
        counts: Dict[str, int] = {}
        for owner in self.owners:
            key = "offline" if owner is None else str(by_server.get(owner, owner))
            counts[key] = counts.get(key, 0) + 1
        return counts

    def describe_change(self, old: Optional["SlotTable"]) -> str:
        if old is None:
            return f"slots loaded (generation {self.generation}, {self.online} online)"
        moved = sum(1 for a, b in zip(old.owners, self.owners) if a != b)
        parts = [f"generation {old.generation} -> {self.generation}"]
        if moved:
            parts.append(f"{moved} slots moved")
        if self.held != old.held:
            parts.append(f"{len(self.held)} held" if self.held else "holds released")
        if self.session != old.session:
            parts.append(f"coordinator session {self.session}")
        if self.adopt_states != old.adopt_states:
            parts.append("adopted pool's servers: " + ", ".join(
                f"{name} {state}" for name, state in zip(self.legacy_names, self.adopt_states)))
        return "slots: " + ", ".join(parts)

    @property
    def online(self) -> int:
        return sum(1 for owner in self.owners if owner is not None)


def group_server_name(cluster: str, gid: int) -> str:
    return f"{cluster}-{gid}"


def cluster_pool(base: PoolConfig, topology: Any, session: str = CONNECTED) -> PoolConfig:
    """``base`` (a cluster pool of the file) serving ``topology`` (a model.Topology)."""
    cluster = base.cluster or topology.cluster
    specs: List[ServerSpec] = []
    groups: List[Tuple[str, int]] = []
    slot_server: Dict[int, Any] = {}    # gid -> function slot -> server name
    for group in topology.groups:
        if not group.servers:
            continue
        if base.redis:
            name = group_server_name(cluster, group.id)
            specs.append(_spec(name, group.servers[0]))
            groups.append((name, group.id))
            slot_server[group.id] = lambda slot, name=name: name
        else:
            names = []
            for address in group.servers:
                name = f"{group_server_name(cluster, group.id)}-{address}"
                specs.append(_spec(name, address))
                groups.append((name, group.id))
                names.append(name)
            slot_server[group.id] = _rendezvous(names)
    owners: List[Optional[str]] = []
    held = []
    migrating = []
    migrating_from = getattr(topology, "migrating_from", None)
    adopted = getattr(topology, "adopted", None)
    for slot, (gid, state) in enumerate(topology.slots):
        chooser = slot_server.get(gid) if gid is not None else None
        owners.append(chooser(slot) if chooser is not None else None)
        if state == HELD:
            held.append(slot)
        elif state == MIGRATING and migrating_from is not None:
            source = migrating_from(slot)
            if source is not None and source in slot_server and chooser is not None:
                migrating.append((slot, slot_server[source](slot)))
    legacy = {}
    if adopted is not None:
        states = topology.adopt_states()
        # A memcache group's servers are named by address too: the pool's server is the group's first.
        first = {group.id: group.servers[0] for group in topology.groups if group.servers}
        legacy = dict(legacy=adopted, legacy_names=tuple(
            group_server_name(cluster, gid) if base.redis else f"{group_server_name(cluster, gid)}-{first[gid]}"
            for gid in adopted.gids),
                      adopt_states=tuple(states[gid] for gid in adopted.gids))
    table = SlotTable(generation=topology.generation, owners=tuple(owners), held=frozenset(held),
                      session=session, groups=tuple(groups), migrating=tuple(migrating), **legacy)
    sentinels = tuple(_address(text) for text in topology.sentinels) if base.redis else ()
    # With sentinels, a group's requests also wait for its master to be confirmed
    # (after a promote, re-monitored sentinels take ~2 s to find each other): as
    # long as for a held slot.
    return dataclasses.replace(base, servers=tuple(specs), slots=table, sentinels=sentinels,
                               failover_hold=base.slot_hold)


def not_ready(base: PoolConfig) -> PoolConfig:
    """``base`` before its topology is known: no servers, no slots (every request: "not ready")."""
    return dataclasses.replace(base, servers=(), slots=None, sentinels=())


def _rendezvous(names: List[str]):
    if len(names) == 1:
        only = names[0]
        return lambda slot: only

    def choose(slot: int) -> str:
        return max(names, key=lambda name: crc32(f"{slot}/{name}".encode()))

    return choose


def _address(text: str) -> Tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _spec(name: str, address: str) -> ServerSpec:
    if address.startswith("/"):
        return ServerSpec(name=name, weight=1, path=address, label=name)
    host, port = _address(address)
    return ServerSpec(name=name, weight=1, host=host, port=port, label=name)
