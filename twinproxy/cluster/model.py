"""The cluster topology document: groups, the 1024-slot table, sentinels, the change in progress.

Owns :class:`Group`, :class:`Topology` (frozen; ``to_json``/``from_json``
with strict validation, the contract's §4 document) and the pure edits the
dashboard makes to it.  Every edit returns a new Topology whose generation
is one more than its own, or raises :class:`TopologyError` with the HTTP
status the refusal deserves (400 bad input, 404 unknown group/server, 409
refused by state).  Invariants kept by the edits and checked on load:

- group ids are 1..9999, groups sorted by id; ``servers[0]`` is a Redis
  group's master, the rest its replicas (memcache: every server serves);
- an address belongs to one group only, cluster-wide;
- slots run 0..1023 exactly; a slot is owned by a group (or None: offline)
  and has a state, ``stable``, ``held`` (a barrier: a promote's, or a
  migration's first phase) or ``migrating`` (owned by the migration's
  target, its keys still moving from the source: :meth:`Topology.migrating_from`);
- a group that owns slots has at least one server;
- ``migrations`` (optional in the document, written when there are any):
  the slot migrations, ordered by id: :class:`~twinproxy.cluster.migrations.Migration`
  (their rules and edits are in :mod:`twinproxy.cluster.migrations`);
- ``adopted`` (optional): an adopted twemproxy pool's placement
  (:class:`~twinproxy.cluster.legacy.Legacy`), kept until its adoption
  has finished; its servers' groups exist and have servers.  While it is
  there, proxies route each key by :meth:`Topology.adopt_states`, and no
  edit may place slots or queue other migrations.

No Twisted, no I/O.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from twinproxy.cluster.legacy import Legacy, LegacyError
from twinproxy.cluster.slots import SLOT_COUNT, runs

PROTOCOLS = ("redis", "memcache")
STATES = ("stable", "held", "migrating")
MAX_GROUP = 9999
CLUSTER_NAME = re.compile(r"^\w[\w.\-]*$", re.ASCII)   # Codis's product-name rule
_TOP_KEYS = ("cluster", "protocol", "generation", "groups", "slots", "sentinels", "change", "migrations", "adopted")
_OPTIONAL_TOP_KEYS = ("migrations", "adopted")   # a document written before migrations existed has none

if TYPE_CHECKING:
    from twinproxy.cluster.migrations import Migration

Slot = Tuple[Optional[int], str]


class TopologyError(Exception):
    """A refused edit or an invalid document; ``status`` is 400, 404 or 409."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def check_address(value: Any, what: str = "address") -> str:
    """``host:port`` (``[v6]:port``) with a port 1..65535, as given; TopologyError (400) otherwise."""
    if not isinstance(value, str) or not value:
        raise TopologyError(f"{what} must be a non-empty 'host:port' string, not {value!r}")
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise TopologyError(f"{what} '{value}': '{host}' is not a bracketed IPv6 address")
    elif not host or ":" in host or any(char.isspace() or char in "/[]" for char in host):
        raise TopologyError(f"{what} '{value}' is not 'host:port' (an IPv6 host goes in brackets)")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise TopologyError(f"{what} '{value}' needs a port from 1 to 65535")
    return value


def check_group_id(value: Any) -> int:
    """A group id 1..9999; TopologyError (400) otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_GROUP:
        raise TopologyError(f"group id must be an integer from 1 to {MAX_GROUP}, not {value!r}")
    return value


def check_slot_range(first: Any, last: Any) -> Tuple[int, int]:
    """Two slot numbers 0..1023 with first <= last; TopologyError (400) otherwise."""
    for number in (first, last):
        if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number < SLOT_COUNT:
            raise TopologyError(f"slot {number!r} is out of range (slots are 0 to {SLOT_COUNT - 1})")
    if first > last:
        raise TopologyError(f"slot range {first}-{last}: the first slot is after the last")
    return first, last


def show_slots(slots: List[int]) -> str:
    """Slot numbers as compact ranges: ``0-511, 700``."""
    ordered = sorted(slots)
    # Consecutive numbers share ``slot - index``: each run of that is one range.
    spans = [(ordered[a], ordered[b]) for a, b, _ in runs(slot - index for index, slot in enumerate(ordered))]
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in spans)


@dataclass(frozen=True)
class Group:
    """A server group: ``servers[0]`` is the master of a Redis group."""

    id: int
    servers: Tuple[str, ...] = ()

    @property
    def master(self) -> Optional[str]:
        """The master's address (the first server), None for an empty group."""
        return self.servers[0] if self.servers else None

    @property
    def replicas(self) -> Tuple[str, ...]:
        return self.servers[1:]

    def to_dict(self) -> Dict[str, Any]:
        return {"id": self.id, "servers": list(self.servers)}


def _empty_slots() -> Tuple[Slot, ...]:
    return ((None, "stable"),) * SLOT_COUNT


@dataclass(frozen=True)
class Topology:
    """One cluster's topology at one generation (see the module docstring for its invariants)."""

    cluster: str
    protocol: str
    generation: int = 0
    groups: Tuple[Group, ...] = ()
    slots: Tuple[Slot, ...] = field(default_factory=_empty_slots)
    sentinels: Tuple[str, ...] = ()
    change: Optional[Dict[str, Any]] = field(default=None, hash=False)
    migrations: Tuple["Migration", ...] = ()
    adopted: Optional[Legacy] = None

    # -- construction and the document -------------------------------------------

    @classmethod
    def empty(cls, cluster: str, protocol: str) -> "Topology":
        """Generation 0: no groups, every slot offline."""
        topology = cls(cluster=cluster, protocol=protocol)
        topology._validate()
        return topology

    def to_dict(self) -> Dict[str, Any]:
        document = {"cluster": self.cluster, "protocol": self.protocol, "generation": self.generation,
                    "groups": [group.to_dict() for group in self.groups], "slots": self.runs(),
                    "sentinels": list(self.sentinels), "change": self.change}
        if self.migrations:
            document["migrations"] = [migration.to_dict() for migration in self.migrations]
        if self.adopted is not None:
            document["adopted"] = self.adopted.to_dict()
        return document

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> "Topology":
        """Parse and validate a document; TopologyError (400) names the first thing wrong."""
        try:
            document = json.loads(data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data)
        except (UnicodeDecodeError, ValueError) as err:
            raise TopologyError(f"the topology is not JSON: {err}")
        return cls.from_dict(document)

    @classmethod
    def from_dict(cls, document: Any) -> "Topology":
        """Like :meth:`from_json`, from the decoded document."""
        if not isinstance(document, dict):
            raise TopologyError("the topology must be a JSON object")
        _exact_keys(document, _TOP_KEYS, "the topology", _OPTIONAL_TOP_KEYS)
        generation = document["generation"]
        if isinstance(generation, bool) or not isinstance(generation, int) or generation < 0:
            raise TopologyError(f"generation must be a non-negative integer, not {generation!r}")
        if not isinstance(document["groups"], list):
            raise TopologyError("groups must be a list")
        groups = tuple(_group_from(item) for item in document["groups"])
        ids = [group.id for group in groups]
        if ids != sorted(set(ids)):
            raise TopologyError(f"groups must be sorted by id with no duplicates, not {ids}")
        sentinels = document["sentinels"]
        if not isinstance(sentinels, list):
            raise TopologyError("sentinels must be a list of addresses")
        change = document["change"]
        if change is not None and not (isinstance(change, dict) and isinstance(change.get("op"), str)):
            raise TopologyError(f"change must be null or an object with an 'op', not {change!r}")
        from twinproxy.cluster.migrations import parse_migrations

        try:
            adopted = Legacy.from_dict(document["adopted"]) if document.get("adopted") is not None else None
        except LegacyError as err:
            raise TopologyError(str(err))
        topology = cls(cluster=document["cluster"], protocol=document["protocol"], generation=generation,
                       groups=groups, slots=_slots_from(document["slots"]),
                       sentinels=tuple(check_address(item, "sentinel") for item in sentinels), change=change,
                       migrations=parse_migrations(document.get("migrations", [])), adopted=adopted)
        topology._validate()
        return topology

    def _validate(self) -> None:
        if not isinstance(self.cluster, str) or not CLUSTER_NAME.match(self.cluster):
            raise TopologyError(f"cluster name {self.cluster!r} must be letters, digits, '_', '.', '-' "
                                "(not starting with '.' or '-')")
        if self.protocol not in PROTOCOLS:
            raise TopologyError(f"protocol must be one of {', '.join(PROTOCOLS)}, not {self.protocol!r}")
        owner: Dict[str, int] = {}
        for group in self.groups:
            for address in group.servers:
                if address in owner:
                    raise TopologyError(f"server {address} is in group {owner[address]} and group {group.id}")
                owner[address] = group.id
        if len(set(self.sentinels)) != len(self.sentinels):
            raise TopologyError("a sentinel is listed twice")
        servers = {group.id: group.servers for group in self.groups}
        if len(self.slots) != SLOT_COUNT:
            raise TopologyError(f"the slot table must have {SLOT_COUNT} slots, not {len(self.slots)}")
        for gid, count in self.slot_counts().items():
            if gid not in servers:
                raise TopologyError(f"{count} slots belong to group {gid}, which does not exist")
            if count and not servers[gid]:
                raise TopologyError(f"group {gid} owns {count} slots but has no servers")
        if self.change is not None and self.change.get("op") == "promote":
            group = self.group(self.change.get("group"))
            if group is None or self.change.get("server") not in group.servers:
                raise TopologyError(f"the promote in progress names no server of its group: {self.change}")
        if self.adopted is not None:
            for gid in self.adopted.gids:
                if gid not in servers or not servers[gid]:
                    raise TopologyError(f"group {gid} holds a server of the adopted pool "
                                        f"'{self.adopted.pool}': it must exist and have its server")
        from twinproxy.cluster.migrations import check_migrations

        check_migrations(self)

    # -- queries ---------------------------------------------------------------

    def group(self, gid: Any) -> Optional[Group]:
        return next((group for group in self.groups if group.id == gid), None)

    def owner_of(self, address: str) -> Optional[int]:
        """The id of the group ``address`` belongs to, or None."""
        return next((group.id for group in self.groups if address in group.servers), None)

    def slot_counts(self) -> Dict[int, int]:
        """Slots owned per group id, every group listed (0 for none); offline slots not counted."""
        counts = {group.id: 0 for group in self.groups}
        for gid, _ in self.slots:
            if gid is not None:
                counts[gid] = counts.get(gid, 0) + 1
        return counts

    def slots_of(self, gid: int) -> List[int]:
        return [slot for slot, (owner, _) in enumerate(self.slots) if owner == gid]

    def migration(self, mid: Any) -> Optional["Migration"]:
        return next((migration for migration in self.migrations if migration.id == mid), None)

    def migration_of(self, slot: int) -> Optional["Migration"]:
        """The migration (not ended) whose range covers ``slot``, or None."""
        return next((m for m in self.migrations if not m.ended and m.covers(slot)), None)

    def migrating_from(self, slot: int) -> Optional[int]:
        """The group a ``migrating`` slot's keys move from (its owner is where they go), else None."""
        for migration in self.migrations:
            if migration.state == "migrating" and migration.covers(slot):
                return migration.source
        return None

    def migrations_of(self, gid: int) -> List["Migration"]:
        """The migrations (not ended) group ``gid`` takes part in (an adoption: every group of its pool)."""
        adopted = self.adopted.gids if self.adopted is not None else ()
        return [m for m in self.migrations if not m.ended and ((m.adopt and gid in adopted)
                                                               or gid in (m.from_group, m.to_group))]

    @property
    def adoption(self) -> Optional["Migration"]:
        """The adoption entry that has not ended (one runs at a time), or None."""
        return next((m for m in self.migrations if m.adopt and not m.ended), None)

    def adopt_states(self) -> Dict[int, str]:
        """Per group of the adopted pool: where the keys the pool placed on its server are.

        ``legacy`` (still there: routed there), ``moving`` (its adoption
        migrates: moved as touched) or ``done`` (at their slots' owners).
        """
        if self.adopted is None:
            return {}
        states = {gid: "legacy" for gid in self.adopted.gids}
        for m in self.migrations:
            if m.adopt and m.from_group in states:
                if m.state == "finished":
                    states[m.from_group] = "done"
                elif m.state == "migrating" and states[m.from_group] != "done":
                    states[m.from_group] = "moving"
        return states

    def _not_adopting(self, doing: str) -> None:
        if self.adopted is not None:
            from twinproxy.cluster.adoptions import resume_command

            adoption = self.adoption
            # Every entry ended, some server's keys not moved: only a resume goes on (the pool file was rewritten).
            shown = (f"adoption {adoption.id} is {adoption.state}" if adoption is not None else
                     "an adoption ended before every server's keys moved: queue those servers again with "
                     f"{resume_command(self.cluster)}, then migration resume")
            raise TopologyError(f"cannot {doing}: the cluster serves the adopted pool '{self.adopted.pool}' "
                                f"({shown})", 409)

    @property
    def offline_slots(self) -> int:
        return sum(1 for gid, _ in self.slots if gid is None)

    def runs(self, first: int = 0, last: int = SLOT_COUNT - 1) -> List[Dict[str, Any]]:
        """Slots ``first..last`` as runs ``{"first", "last", "group", "state"}`` of equal owner and state."""
        first, last = check_slot_range(first, last)
        return [{"first": a + first, "last": b + first, "group": value[0], "state": value[1]}
                for a, b, value in runs(self.slots[first:last + 1])]

    # -- edits (each: a new Topology at generation + 1) --------------------------

    def _next(self, **changes: Any) -> "Topology":
        topology = replace(self, generation=self.generation + 1, **changes)
        topology._validate()
        return topology

    def _known_group(self, gid: Any) -> Group:
        group = self.group(check_group_id(gid))
        if group is None:
            raise TopologyError(f"there is no group {gid}", 404)
        return group

    def _not_changing(self, gid: int, doing: str) -> None:
        if self.change is not None and self.change.get("group") == gid:
            raise TopologyError(f"cannot {doing}: group {gid} has a change in progress ({_show_change(self.change)})",
                                409)

    def _not_migrating(self, gid: int, doing: str) -> None:
        migrations = self.migrations_of(gid)
        if migrations:
            raise TopologyError(f"cannot {doing}: group {gid} takes part in migration "
                                f"{_show_migration(migrations[0])}: wait for it to end or cancel it", 409)

    def _with_group(self, group: Group) -> Tuple[Group, ...]:
        return tuple(sorted([g for g in self.groups if g.id != group.id] + [group], key=lambda g: g.id))

    def add_group(self, gid: int) -> "Topology":
        if self.group(check_group_id(gid)) is not None:
            raise TopologyError(f"group {gid} already exists", 409)
        return self._next(groups=self._with_group(Group(gid)))

    def _not_adopted_group(self, gid: int, doing: str) -> None:
        if self.adopted is not None and gid in self.adopted.gids:
            raise TopologyError(f"cannot {doing}: group {gid} holds a server of the adopted pool "
                                f"'{self.adopted.pool}'", 409)

    def remove_group(self, gid: int) -> "Topology":
        self._known_group(gid)
        self._not_adopted_group(gid, f"remove group {gid}")
        self._not_changing(gid, f"remove group {gid}")
        self._not_migrating(gid, f"remove group {gid}")
        owned = self.slots_of(gid)
        if owned:
            raise TopologyError(f"group {gid} owns {len(owned)} slots ({show_slots(owned)}): "
                                "assign them to another group first", 409)
        return self._next(groups=tuple(g for g in self.groups if g.id != gid))

    def add_server(self, gid: int, address: str) -> "Topology":
        group = self._known_group(gid)
        check_address(address, "server address")
        owner = self.owner_of(address)
        if owner is not None:
            raise TopologyError(f"server {address} is already in group {owner}", 409)
        self._not_changing(gid, f"add a server to group {gid}")
        return self._next(groups=self._with_group(Group(gid, group.servers + (address,))))

    def remove_server(self, gid: int, address: str) -> "Topology":
        group = self._known_group(gid)
        if address not in group.servers:
            raise TopologyError(f"server {address} is not in group {gid}", 404)
        self._not_changing(gid, f"remove a server from group {gid}")
        owned = len(self.slots_of(gid))
        if owned and len(group.servers) == 1:
            raise TopologyError(f"{address} is the last server of group {gid}, which owns {owned} slots: "
                                "assign its slots to another group first", 409)
        if owned and self.protocol == "redis" and address == group.master:
            raise TopologyError(f"{address} is the master of group {gid}, which owns {owned} slots: "
                                "promote a replica first", 409)
        if address == group.master or len(group.servers) == 1:
            # The keys move master to master: a migration's groups keep theirs.
            self._not_migrating(gid, f"remove {address}, the master of group {gid}")
            self._not_adopted_group(gid, f"remove {address}, the master of group {gid}")
        return self._next(groups=self._with_group(Group(gid, tuple(s for s in group.servers if s != address))))

    def assign_slots(self, first: int, last: int, gid: Optional[int], force: bool = False) -> "Topology":
        """Give slots ``first..last`` to ``gid`` (None: offline).  Initial placement: no data moves.

        Refused (409) for slots another group owns unless ``force``, and for
        held slots always (a barrier is up on them).
        """
        first, last = check_slot_range(first, last)
        if gid is not None:
            group = self._known_group(gid)
            if not group.servers:
                raise TopologyError(f"group {gid} has no servers: add one before giving it slots", 409)
        self._not_adopting("assign slots")
        held = [slot for slot in range(first, last + 1) if self.slots[slot][1] != "stable"]
        if held:
            raise TopologyError(f"slots {show_slots(held)} are {self.slots[held[0]][1]} by a change in progress "
                                f"({_show_change(self.change)})", 409)
        self._not_in_migration(range(first, last + 1), "assign them")
        if not force:
            taken: Dict[int, List[int]] = {}
            for slot in range(first, last + 1):
                owner = self.slots[slot][0]
                if owner is not None and owner != gid:
                    taken.setdefault(owner, []).append(slot)
            if taken:
                owners = "; ".join(f"group {owner} owns {show_slots(s)}" for owner, s in sorted(taken.items()))
                raise TopologyError(f"slots {first}-{last} are partly owned ({owners}): use force to reassign "
                                    "them (no data is moved)", 409)
        table = list(self.slots)
        table[first:last + 1] = [(gid, "stable")] * (last - first + 1)
        return self._next(slots=tuple(table))

    def place(self, plan: Dict[int, Optional[int]]) -> "Topology":
        """Set each planned slot's owner in one generation (a rebalance); held slots are refused (409)."""
        self._not_in_migration(plan, "place them")
        self._not_adopting("place slots")
        table = list(self.slots)
        for slot, gid in sorted(plan.items()):
            check_slot_range(slot, slot)
            if gid is not None:
                self._known_group(gid)
            if table[slot][1] != "stable":
                raise TopologyError(f"slot {slot} is {table[slot][1]}: a change is in progress", 409)
            table[slot] = (gid, "stable")
        return self._next(slots=tuple(table))

    def hold_group(self, gid: int, change: Dict[str, Any]) -> "Topology":
        """Phase one of the barrier: every slot of ``gid`` held, ``change`` recorded."""
        self._known_group(gid)
        if self.change is not None:
            raise TopologyError(f"another change is in progress ({_show_change(self.change)})", 409)
        active = [m for m in self.migrations_of(gid) if m.active]
        if active:
            raise TopologyError(f"group {gid} takes part in migration {_show_migration(active[0])}, which is "
                                f"{active[0].state}: wait for it to end (or cancel it) first", 409)
        table = tuple((owner, "held") if owner == gid else (owner, state) for owner, state in self.slots)
        return self._next(slots=table, change=dict(change))

    def _barrier_free(self, gid: Optional[int]) -> Tuple[Slot, ...]:
        """The table with the promote barrier's held slots (of ``gid``, or all) stable; migrations' kept."""
        kept = {slot for m in self.migrations if m.active for slot in m.slot_range}
        return tuple((owner, "stable") if state == "held" and slot not in kept and gid in (None, owner)
                     else (owner, state) for slot, (owner, state) in enumerate(self.slots))

    def release(self) -> "Topology":
        """End a barrier as it is: every held slot stable again (a migration's stay), no change."""
        return self._next(slots=self._barrier_free(None), change=None)

    def promote(self, gid: int, address: str, sentinel_failover: bool = False) -> "Topology":
        """``address`` becomes the master: first, the old master last, others in order.

        This is also the barrier's last step: a hold on this group (its
        promote) is released in the same generation.  ``sentinel_failover``:
        Sentinel made it the master by itself; only the group is reordered
        (slots and any other group's change kept), refused during this group's own change.
        """
        group = self._known_group(gid)
        if self.protocol != "redis":
            raise TopologyError("memcache groups have no master to promote: all their servers serve", 409)
        if address not in group.servers:
            raise TopologyError(f"server {address} is not in group {gid}", 404)
        if address == group.master:
            raise TopologyError(f"{address} is already the master of group {gid}", 409)
        if self.change is not None and (self.change.get("group") == gid) == sentinel_failover:
            raise TopologyError(f"another change is in progress ({_show_change(self.change)})", 409)
        others = tuple(s for s in group.replicas if s != address)
        groups = self._with_group(Group(gid, (address,) + others + (group.servers[0],)))
        if sentinel_failover:
            return self._next(groups=groups)
        return self._next(groups=groups, slots=self._barrier_free(gid), change=None)

    def add_sentinel(self, address: str) -> "Topology":
        check_address(address, "sentinel address")
        if address in self.sentinels:
            raise TopologyError(f"sentinel {address} is already listed", 409)
        if self.protocol != "redis":
            raise TopologyError("sentinels watch Redis masters: a memcache cluster has none", 409)
        return self._next(sentinels=self.sentinels + (address,))

    def remove_sentinel(self, address: str) -> "Topology":
        if address not in self.sentinels:
            raise TopologyError(f"sentinel {address} is not listed", 404)
        return self._next(sentinels=tuple(s for s in self.sentinels if s != address))


    def _not_in_migration(self, slots: Any, doing: str) -> None:
        moving = [slot for slot in slots if self.migration_of(slot) is not None]
        if moving:
            raise TopologyError(f"cannot {doing}: slots {show_slots(moving)} are in migration "
                                f"{_show_migration(self.migration_of(moving[0]))}: wait for it to end or "
                                "cancel it", 409)

    # -- migrations (the rules, and what each edit does: twinproxy.cluster.migrations) --------

    def create_migration(self, first: int, last: int, gid: int, keys_per_second: Optional[int] = None,
                         parallel: Optional[int] = None) -> "Topology":
        from twinproxy.cluster import migrations

        return migrations.create(self, first, last, gid, keys_per_second, parallel)

    def advance_migration(self, mid: int) -> "Topology":
        from twinproxy.cluster import migrations

        return migrations.advance(self, mid)

    def cancel_migration(self, mid: int) -> "Topology":
        from twinproxy.cluster import migrations

        return migrations.cancel(self, mid)

    def fail_migration(self, mid: int, reason: str) -> "Topology":
        from twinproxy.cluster import migrations

        return migrations.fail(self, mid, reason)

    def unprepare_migration(self, mid: int, reason: str) -> "Topology":
        from twinproxy.cluster import migrations

        return migrations.unprepare(self, mid, reason)


def _show_migration(migration: Optional["Migration"]) -> str:
    if migration is None:
        return "none"
    if migration.adopt:
        return migration.describe()
    return (f"{migration.id} (slots {migration.first}-{migration.last}, group {migration.from_group} to "
            f"{migration.to_group}{', being cancelled' if migration.cancelling else ''})")


def _show_change(change: Optional[Dict[str, Any]]) -> str:
    if not change:
        return "none"
    return " ".join(f"{key}={value}" for key, value in change.items())


def _exact_keys(item: Dict[str, Any], keys: Tuple[str, ...], what: str, optional: Tuple[str, ...] = ()) -> None:
    missing = [key for key in keys if key not in item and key not in optional]
    unknown = sorted(key for key in item if key not in keys)
    if missing or unknown:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unknown {', '.join(map(str, unknown))}"] if unknown else [])
        raise TopologyError(f"{what}: {'; '.join(parts)}")


def _group_from(item: Any) -> Group:
    if not isinstance(item, dict):
        raise TopologyError(f"a group must be an object, not {item!r}")
    _exact_keys(item, ("id", "servers"), f"group {item.get('id')!r}")
    gid = check_group_id(item["id"])
    if not isinstance(item["servers"], list):
        raise TopologyError(f"group {gid}: servers must be a list")
    return Group(gid, tuple(check_address(server, f"group {gid} server") for server in item["servers"]))


def _slots_from(items: Any) -> Tuple[Slot, ...]:
    if not isinstance(items, list):
        raise TopologyError("slots must be a list of runs")
    table: List[Slot] = []
    for item in items:
        if not isinstance(item, dict):
            raise TopologyError(f"a slot run must be an object, not {item!r}")
        _exact_keys(item, ("first", "last", "group", "state"), f"slot run {item.get('first')!r}")
        first, last = check_slot_range(item["first"], item["last"])
        if first != len(table):
            raise TopologyError(f"slot run {first}-{last} should start at slot {len(table)}: "
                                "runs must cover 0-1023 in order, without gaps or overlaps")
        gid = item["group"]
        if gid is not None:
            check_group_id(gid)
        if item["state"] not in STATES:
            raise TopologyError(f"slot run {first}-{last}: unknown state {item['state']!r} "
                                f"(known: {', '.join(STATES)})")
        table.extend([(gid, item["state"])] * (last - first + 1))
    if len(table) != SLOT_COUNT:
        raise TopologyError(f"slot runs end at slot {len(table) - 1}: they must cover 0-{SLOT_COUNT - 1}")
    return tuple(table)
