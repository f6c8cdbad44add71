"""Slot migrations in the topology: the entries, their rules, and the pure edits that drive them.

Owns :class:`Migration` (one entry of the document's ``migrations`` list),
:func:`parse_migrations` / :func:`check_migrations` (the document's rules,
called by :class:`~twinproxy.cluster.model.Topology` on load and after each
edit) and the edits, each a new Topology at generation + 1 or a
:class:`~twinproxy.cluster.model.TopologyError` (400/404/409):

- :func:`create` — ``pending``: queued, the slots unchanged.  The range's
  slots must all be owned by one other group, stable, and in no migration
  that has not ended;
- :func:`advance` — ``pending`` (or ``preparing``) -> ``prepared``: the
  range ``held`` at the source (phase one of the barrier); -> ``migrating``:
  owned by the target, state ``migrating`` (proxies move each key they touch
  from the source first); -> ``finished``: stable at the target.  A group
  is the source of one migration past pending at a time and then takes
  part in no other; a target may be shared
  (:func:`~twinproxy.cluster.concurrency.may_start_with`);
- :func:`cancel` — pending: ``cancelled``; prepared: released at the source,
  ``cancelled``; migrating: ``cancelling`` is set and the range moves back
  with the same states (held at the old target, then migrating to
  ``from_group``), ending ``cancelled`` with the slots owned by
  ``from_group``;
- :func:`fail` — a pending or prepared migration ``failed`` (the hold
  released); :func:`unprepare` — prepared back to pending (the hold's
  acknowledgements did not come: nothing moved yet).

A memcache cluster's items cannot be moved, so its migrations warm up
instead (the proxies read a miss through from the source: see
:mod:`twinproxy.cluster.warmup`): ``warmup_seconds`` (default
:data:`DEFAULT_WARMUP`) says how long the range stays ``migrating``;
``warmup_until`` (the wall-clock end, while it counts) or ``warmup_left``
(the seconds left, while paused) record where it is, so a restarted
dashboard goes on (:func:`time_warmup` writes them).  Its warm-up over,
:func:`advance` first holds the range at the target (``warmed``: every
proxy stops reading the source and drains what it sent, so no proxy still
warms from the source once another serves the target alone), then makes
it stable there.  Its cancel holds the range at the target the same way
and then gives it back to the source directly (no way back to warm up:
the source never had a stale item, since every write through a warming
proxy deleted the source's copy first).

An **adoption** (a twemproxy pool taken over, :func:`adopt`) is one
entry per server of the pool (``adopt``, ``from_group`` its group, no
``to_group``, slots 0-1023): it moves the keys the pool placed on that
server to their slots' owners.  One runs at a time (each involves every
group), so only one server is ever a source: two servers MIGRATEing to
each other block each other until the timeout.  The slot table keeps
each slot's owner throughout; proxies route a key by its source's entry
(:meth:`~twinproxy.cluster.model.Topology.adopt_states`): where the pool
placed it until that entry moves keys, moved first while it migrates, at
its slot's owner once it finished.  While an entry is ``prepared`` every
slot is held (the barrier: a few milliseconds).  ``adopted`` is dropped
when the last entry finishes.  An entry's cancel is refused once it moves
keys (they would have to go back to the pool's placement, which nothing
writes): pause it instead.  A cancelled or failed entry's server is queued
again by :func:`twinproxy.cluster.adoptions.resume` (the adoption's
edits are in :mod:`twinproxy.cluster.adoptions`).  A memcache cluster's
adoption entries warm up (``warmup_seconds`` set): migrating, the
server's keys are read through from it at their slots' owners for that
long; then every slot is held (``warmed``), then the entry finishes.
Its cancel holds every slot (prepared, ``cancelling``) and then gives the
server its keys back (``cancelled``: legacy again).

Ended entries beyond the last :data:`KEEP_ENDED` are pruned by every edit
here.  ``preparing`` (Codis's store-only step) is accepted on load and
treated as pending; this dashboard does not write it.  No Twisted, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Tuple

from twinproxy.cluster.concurrency import groups_of, may_start_with, moving_cycle, startable
from twinproxy.cluster.legacy import Legacy
from twinproxy.cluster.model import (
    Topology,
    TopologyError,
    check_group_id,
    check_slot_range,
    show_slots,
)
from twinproxy.cluster.slots import SLOT_COUNT

# A migration's states, in order; the last three end it.
MIGRATION_STATES = ("pending", "preparing", "prepared", "migrating", "finished", "cancelled", "failed")
ENDED = ("finished", "cancelled", "failed")
ACTIVE = ("preparing", "prepared", "migrating")   # past pending: its groups take part in no other
KEEP_ENDED = 50
MAX_PARALLEL = 64
MAX_RATE = 10 ** 9
_KEYS = ("id", "first", "last", "from_group", "to_group", "state")
_OPTIONAL = ("keys_per_second", "parallel", "cancelling", "error", "warmup_seconds", "warmup_until", "warmup_left",
             "warmed", "adopt")
DEFAULT_WARMUP = 60
MAX_WARMUP = 7 * 86400


@dataclass(frozen=True)
class Migration:
    """Slots ``first..last`` moving from group ``from_group`` to group ``to_group``.

    ``cancelling``: cancelled while its keys moved, so the range moves back
    with the same states (``source`` and ``target`` swapped) and ends
    ``cancelled`` with the slots owned by ``from_group``.
    ``keys_per_second`` / ``parallel`` tune the dashboard's mover (None: as
    fast as it goes / one batch in flight); ``error`` says why it failed or
    was put back to pending.  ``warmup_seconds`` (memcache clusters only,
    None for Redis) and its clock ``warmup_until`` / ``warmup_left`` and
    ``warmed``: see the module docstring.  ``adopt``: an adoption (no
    ``from_group``/``to_group``: each key's source is the adopted pool's
    placement, its target its slot's owner).
    """

    id: int
    first: int
    last: int
    from_group: Optional[int]
    to_group: Optional[int]
    state: str = "pending"
    keys_per_second: Optional[int] = None
    parallel: Optional[int] = None
    cancelling: bool = False
    error: Optional[str] = None
    warmup_seconds: Optional[int] = None
    warmup_until: Optional[float] = None
    warmup_left: Optional[float] = None
    warmed: bool = False
    adopt: bool = False

    @property
    def warms(self) -> bool:
        """A memcache cluster's migration: its range warms up rather than moves."""
        return self.warmup_seconds is not None

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    @property
    def active(self) -> bool:
        """Past pending and not ended (its source takes part in no other migration meanwhile)."""
        return self.state in ACTIVE

    @property
    def source(self) -> int:
        """The group the keys move from now (``to_group`` while cancelling)."""
        return self.to_group if self.cancelling else self.from_group

    @property
    def target(self) -> int:
        return self.from_group if self.cancelling else self.to_group

    @property
    def slot_range(self) -> range:
        return range(self.first, self.last + 1)

    def covers(self, slot: int) -> bool:
        return self.first <= slot <= self.last

    def to_dict(self) -> Dict[str, Any]:
        document = {"id": self.id, "first": self.first, "last": self.last, "from_group": self.from_group,
                    "to_group": self.to_group, "state": self.state, "keys_per_second": self.keys_per_second,
                    "parallel": self.parallel, "cancelling": self.cancelling, "error": self.error}
        if self.warms:      # a Redis migration's document stays as it was
            document.update(warmup_seconds=self.warmup_seconds, warmup_until=self.warmup_until,
                            warmup_left=self.warmup_left, warmed=self.warmed)
        if self.adopt:
            document["adopt"] = True
        return document

    def describe(self) -> str:
        if self.adopt:
            return f"{self.id} (adoption: the keys the adopted pool placed on group {self.from_group}, to their slots)"
        back = ", being moved back" if self.cancelling else ""
        return f"{self.id} (slots {self.first}-{self.last}, group {self.from_group} to {self.to_group}{back})"


# -- the document ------------------------------------------------------------------


def check_rate(value: Any) -> Optional[int]:
    """keys per second: None or 1..10**9; TopologyError (400) otherwise."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_RATE):
        raise TopologyError(f"keys_per_second must be null or an integer from 1 to {MAX_RATE}, not {value!r}")
    return value


def check_parallel(value: Any) -> Optional[int]:
    """batches in flight: None or 1..64; TopologyError (400) otherwise."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or not 0 < value <= MAX_PARALLEL):
        raise TopologyError(f"parallel must be null or an integer from 1 to {MAX_PARALLEL}, not {value!r}")
    return value


def check_warmup(value: Any) -> Optional[int]:
    """warm-up seconds: None or 0..MAX_WARMUP; TopologyError (400) otherwise."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or not 0 <= value <= MAX_WARMUP):
        raise TopologyError(f"warmup_seconds must be null or an integer from 0 to {MAX_WARMUP}, not {value!r}")
    return value


def _seconds(value: Any, what: str) -> Optional[float]:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
        raise TopologyError(f"{what} must be null or a number of seconds, not {value!r}")
    return None if value is None else float(value)


def parse_migrations(items: Any) -> Tuple[Migration, ...]:
    """The document's ``migrations`` list; TopologyError (400) names what is wrong."""
    if not isinstance(items, list):
        raise TopologyError("migrations must be a list")
    found = []
    for item in items:
        if not isinstance(item, dict):
            raise TopologyError(f"a migration must be an object, not {item!r}")
        what = f"migration {item.get('id')!r}"
        missing = [key for key in _KEYS if key not in item]
        unknown = sorted(str(key) for key in item if key not in _KEYS + _OPTIONAL)
        if missing or unknown:
            raise TopologyError(f"{what}: " + "; ".join(
                ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unknown {', '.join(unknown)}"]
                                                                          if unknown else [])))
        mid = item["id"]
        if isinstance(mid, bool) or not isinstance(mid, int) or mid < 1:
            raise TopologyError(f"{what}: id must be a positive integer")
        first, last = check_slot_range(item["first"], item["last"])
        if item["state"] not in MIGRATION_STATES:
            raise TopologyError(f"{what}: unknown state {item['state']!r} (known: {', '.join(MIGRATION_STATES)})")
        cancelling = item.get("cancelling", False)
        error = item.get("error")
        if not isinstance(cancelling, bool) or not (error is None or isinstance(error, str)):
            raise TopologyError(f"{what}: cancelling must be true or false and error null or a string")
        warmed = item.get("warmed", False)
        if not isinstance(warmed, bool):
            raise TopologyError(f"{what}: warmed must be true or false")
        adopting = item.get("adopt", False)
        if not isinstance(adopting, bool):
            raise TopologyError(f"{what}: adopt must be true or false")
        if adopting:
            if item["to_group"] is not None or (first, last) != (0, SLOT_COUNT - 1):
                raise TopologyError(f"{what}: an adoption covers slots 0-{SLOT_COUNT - 1} and has a null to_group")
            groups = (check_group_id(item["from_group"]), None)
        else:
            groups = (check_group_id(item["from_group"]), check_group_id(item["to_group"]))
        try:
            warm = (check_warmup(item.get("warmup_seconds")), _seconds(item.get("warmup_until"), "warmup_until"),
                    _seconds(item.get("warmup_left"), "warmup_left"), warmed)
        except TopologyError as err:
            raise TopologyError(f"{what}: {err.message}") from None
        found.append(Migration(mid, first, last, *groups, item["state"], check_rate(item.get("keys_per_second")),
                               check_parallel(item.get("parallel")), cancelling, error, *warm, adopting))
    return tuple(found)


def check_migrations(topology: Topology) -> None:
    """The rules between the migrations and the slot table; TopologyError (400) for the first broken."""
    ids = [m.id for m in topology.migrations]
    if ids != sorted(set(ids)):
        raise TopologyError(f"migrations must be ordered by id with no duplicates, not {ids}")
    owner: Dict[int, Migration] = {}      # slot -> its migration (not ended)
    busy: Dict[int, Migration] = {}       # group -> the adoption past pending it takes part in
    for m in topology.migrations:
        if m.ended:
            continue
        if m.adopt:
            _check_adoption(topology, m, busy)
            continue
        if m.from_group == m.to_group:
            raise TopologyError(f"migration {m.id} moves slots from group {m.from_group} to itself")
        for gid in (m.from_group, m.to_group):
            if topology.group(gid) is None:
                raise TopologyError(f"migration {m.describe()} names group {gid}, which does not exist")
            if m.active and gid in busy:
                raise TopologyError(f"group {gid} takes part in migrations {busy[gid].id} and {m.id} at once")
        if m.cancelling and m.state not in ("prepared", "migrating"):
            raise TopologyError(f"migration {m.id} is {m.state}: only a prepared or migrating one moves back")
        if m.warms != (topology.protocol != "redis"):
            raise TopologyError(f"migration {m.id}: warmup_seconds is set for memcache clusters' migrations "
                                "(and only for theirs)")
        if m.warmed and (m.state != "migrating" or m.cancelling):
            raise TopologyError(f"migration {m.id} is {m.state}: only a migrating one has warmed up")
        expected = _expected_slot(m)
        for slot in m.slot_range:
            if slot in owner:
                raise TopologyError(f"slot {slot} is in migrations {owner[slot].id} and {m.id}")
            owner[slot] = m
            gid, state = topology.slots[slot]
            # A pending migration's slots may be held by a promote of their group meanwhile.
            if gid != expected[0] or state != expected[1] and not (expected[1] == "stable" and state == "held"):
                raise TopologyError(f"migration {m.describe()} is {m.state}, so slot {slot} must be "
                                    f"{expected[1]} in group {expected[0]}, not {state} in group {gid}")
    stray = [slot for slot, (_, state) in enumerate(topology.slots) if state == "migrating" and slot not in owner]
    if stray:
        raise TopologyError(f"slots {show_slots(stray)} are migrating but no migration covers them")
    cycle = moving_cycle([m for m in topology.migrations if m.active and not m.adopt])
    if cycle:
        raise TopologyError(f"migrations {', '.join(str(m.id) for m in cycle)} move keys in a circle: their "
                            "sources would MIGRATE into each other (each blocks until the other answers)")


def _check_adoption(topology: Topology, m: Migration, busy: Dict[int, Migration]) -> None:
    if topology.adopted is None or m.from_group not in topology.adopted.gids:
        raise TopologyError(f"migration {m.id} is an adoption of group {m.from_group}, which holds no server of an "
                            "adopted pool")
    if m.warms != (topology.protocol != "redis"):
        raise TopologyError(f"migration {m.id}: warmup_seconds is set for memcache clusters' adoptions (and only "
                            "for theirs)")
    if (m.cancelling and (not m.warms or m.state != "prepared")) or (m.warmed and m.state != "migrating"):
        raise TopologyError(f"migration {m.id}: a Redis adoption neither moves back nor warms up; a memcache one "
                            "moves back only while prepared and has warmed up only while migrating")
    others = [o for o in topology.migrations if not o.ended and (not o.adopt or o.from_group == m.from_group)
              and o.id != m.id]
    if others:
        raise TopologyError(f"adoption {m.id} runs with migration {others[0].id}, which is not ended")
    if m.active:
        for gid in topology.adopted.gids:
            if gid in busy:
                raise TopologyError(f"group {gid} takes part in migrations {busy[gid].id} and {m.id} at once")
            busy[gid] = m
    expected = "held" if m.state == "prepared" or m.warmed else "stable"
    wrong = [slot for slot, (gid, state) in enumerate(topology.slots)
             if gid is None or (state != expected and not (expected == "stable" and state == "held"))]
    if wrong:
        gid, state = topology.slots[wrong[0]]
        raise TopologyError(f"adoption {m.id} is {m.state}, so slot {wrong[0]} must be {expected} in a group, not "
                            f"{state} in group {gid}")


def _expected_slot(m: Migration) -> Tuple[int, str]:
    if m.state in ("pending", "preparing"):
        return m.from_group, "stable"
    if m.state == "prepared":
        return m.source, "held"
    if m.warmed:
        return m.target, "held"
    return m.target, "migrating"


# -- edits ----------------------------------------------------------------------------


def _find(topology: Topology, mid: Any) -> Migration:
    migration = topology.migration(mid)
    if migration is None:
        raise TopologyError(f"there is no migration {mid}", 404)
    return migration


def _write(topology: Topology, migration: Migration, slots: Optional[Tuple[Optional[int], str]] = None,
           **more: Any) -> Topology:
    """``migration`` replacing its entry (or appended), its range set to ``slots``, ended entries pruned.

    An adoption's slots keep their owners: only the state of ``slots`` is used.
    """
    entries = [m for m in topology.migrations if m.id != migration.id] + [migration]
    entries.sort(key=lambda m: m.id)
    ended = [m for m in entries if m.ended]
    # An adoption's entries stay while its pool is adopted: they say which servers' keys have moved.
    adopting = more.get("adopted", topology.adopted) is not None
    drop = {m.id for m in ended[:max(0, len(ended) - KEEP_ENDED)] if not (m.adopt and adopting)}
    changes: Dict[str, Any] = {"migrations": tuple(m for m in entries if m.id not in drop), **more}
    if slots is not None:
        table = list(topology.slots)
        if migration.adopt:     # every slot, its owner kept: held for the barrier, else stable
            table = [(owner, slots[1]) for owner, _ in table]
        else:
            table[migration.first:migration.last + 1] = [slots] * (migration.last - migration.first + 1)
        changes["slots"] = tuple(table)
    return topology._next(**changes)


def create(topology: Topology, first: int, last: int, gid: int, keys_per_second: Optional[int] = None,
           parallel: Optional[int] = None, warmup_seconds: Optional[int] = None) -> Topology:
    """Queue moving slots ``first..last`` to group ``gid``: a pending migration, the slots unchanged.

    ``warmup_seconds`` is a memcache cluster's (default :data:`DEFAULT_WARMUP`);
    ``keys_per_second`` and ``parallel`` a Redis cluster's.
    """
    first, last = check_slot_range(first, last)
    check_rate(keys_per_second)
    check_parallel(parallel)
    check_warmup(warmup_seconds)
    topology._not_adopting("queue a migration")
    if topology.protocol == "redis" and warmup_seconds is not None:
        raise TopologyError("warmup_seconds is for memcache clusters: a Redis cluster's keys are moved, not "
                            "warmed up (tune its sweep with keys_per_second and parallel)")
    target = topology._known_group(gid)
    if topology.protocol != "redis":
        if keys_per_second is not None or parallel is not None:
            raise TopologyError("keys_per_second and parallel tune a Redis cluster's sweep: a memcache cluster's "
                                "slots warm up instead (warmup_seconds)")
        warmup_seconds = DEFAULT_WARMUP if warmup_seconds is None else warmup_seconds
    if not target.servers:
        raise TopologyError(f"group {gid} has no servers: add one before moving slots to it", 409)
    slots = range(first, last + 1)
    busy = [slot for slot in slots if topology.slots[slot][1] != "stable"]
    if busy:
        raise TopologyError(f"slots {show_slots(busy)} are {topology.slots[busy[0]][1]} by a change in progress: "
                            "wait for it to end", 409)
    queued = [slot for slot in slots if topology.migration_of(slot) is not None]
    if queued:
        raise TopologyError(f"slots {show_slots(queued)} are in migration "
                            f"{topology.migration_of(queued[0]).describe()} already", 409)
    owners: Dict[Optional[int], List[int]] = {}
    for slot in slots:
        owners.setdefault(topology.slots[slot][0], []).append(slot)
    if gid in owners:
        raise TopologyError(f"group {gid} owns slots {show_slots(owners[gid])} already: migrate only slots "
                            "another group owns")
    if None in owners:
        raise TopologyError(f"slots {show_slots(owners[None])} are offline: there is nothing to move, assign "
                            "them instead", 409)
    if len(owners) > 1:
        shown = "; ".join(f"group {owner} owns {show_slots(owned)}" for owner, owned in sorted(owners.items()))
        raise TopologyError(f"slots {first}-{last} belong to more than one group ({shown}): migrate one group's "
                            "slots at a time", 409)
    source = next(iter(owners))
    mid = max((m.id for m in topology.migrations), default=0) + 1
    return _write(topology, Migration(mid, first, last, source, gid, "pending", keys_per_second, parallel,
                                      warmup_seconds=warmup_seconds))


def adopt(topology: Topology, legacy: Legacy, addresses: List[str], keys_per_second: Optional[int] = None,
          warmup_seconds: Optional[int] = None) -> Topology:
    """Take over pool ``legacy`` (see :func:`twinproxy.cluster.adoptions.adopt`: the adoption's edits live there)."""
    from twinproxy.cluster import adoptions

    return adoptions.adopt(topology, legacy, addresses, keys_per_second, warmup_seconds)


def advance(topology: Topology, mid: int, now: Optional[float] = None) -> Topology:
    """The migration's next state (see the module docstring); 409 when it cannot go on.

    ``now`` (wall-clock seconds): a memcache migration going ``migrating``
    records when its warm-up ends (without it, :func:`time_warmup` does later).
    """
    m = _find(topology, mid)
    if m.ended:
        raise TopologyError(f"migration {m.describe()} has ended ({m.state})", 409)
    if m.state in ("pending", "preparing"):
        for gid in sorted(groups_of(topology, m)):
            group = topology._known_group(gid)
            if not group.servers:
                raise TopologyError(f"migration {m.describe()} cannot start: group {gid} has no servers", 409)
            change = topology.change or {}
            if change.get("group") == gid:
                raise TopologyError(f"migration {m.describe()} cannot start: group {gid} has a {change.get('op')} "
                                    "in progress", 409)
        if m.adopt:
            for gid in sorted(groups_of(topology, m)):
                others = [other for other in topology.migrations_of(gid) if other.active and other.id != m.id]
                if others:
                    raise TopologyError(f"migration {m.describe()} cannot start: group {gid} takes part in "
                                        f"migration {others[0].describe()}", 409)
        else:
            why = may_start_with(topology, m)
            if why is not None:
                raise TopologyError(f"migration {m.describe()} cannot start: {why}", 409)
        return _write(topology, replace(m, state="prepared", error=None), (m.source, "held"))
    if m.state == "prepared" and m.cancelling and m.warms:
        # Held at the target (no proxy warms any more): the source serves again, as it is.
        return _write(topology, replace(m, state="cancelled"), (m.from_group, "stable"))
    if m.state == "prepared" and m.adopt:
        # The hold is over: the source's keys are moved (memcache: warmed up) as they are touched (the others
        # route as before).
        until = now + m.warmup_seconds if m.warms and now is not None else None
        return _write(topology, replace(m, state="migrating", warmup_until=until, warmup_left=None),
                      (None, "stable"))
    if m.state == "prepared":
        until = now + m.warmup_seconds if m.warms and now is not None else None
        return _write(topology, replace(m, state="migrating", warmup_until=until, warmup_left=None),
                      (m.target, "migrating"))
    if m.warms and not m.warmed:
        return _write(topology, replace(m, warmed=True, warmup_until=None, warmup_left=None), (m.target, "held"))
    if m.adopt:
        # Once every server's keys are at their slots' owners, the pool's placement is history.
        done = {o.from_group for o in topology.migrations if o.adopt and o.state == "finished"} | {m.from_group}
        last = done >= set(topology.adopted.gids)
        return _write(topology, replace(m, state="finished", warmed=False), (None, "stable"),
                      **({"adopted": None} if last else {}))
    return _write(topology, replace(m, state="cancelled" if m.cancelling else "finished", warmed=False),
                  (m.target, "stable"))


def time_warmup(topology: Topology, mid: int, until: Optional[float] = None,
                left: Optional[float] = None) -> Topology:
    """Record a memcache migration's warm-up clock: its end (counting) or the seconds left (paused); 409 else."""
    m = _find(topology, mid)
    if not m.warms or m.state != "migrating" or m.warmed or m.cancelling:
        raise TopologyError(f"migration {m.describe()} is {m.state}: only a memcache migration warming up has a "
                            "warm-up clock", 409)
    return _write(topology, replace(m, warmup_until=_seconds(until, "warmup_until"),
                                    warmup_left=_seconds(left, "warmup_left")))


def cancel(topology: Topology, mid: int) -> Topology:
    """Cancel the migration (see the module docstring); 409 when it has ended or is moving back already."""
    m = _find(topology, mid)
    if m.ended:
        raise TopologyError(f"migration {m.describe()} has ended ({m.state})", 409)
    if m.cancelling:
        raise TopologyError(f"migration {m.describe()} is being cancelled already", 409)
    if m.state in ("pending", "preparing"):
        return _write(topology, replace(m, state="cancelled"))
    if m.state == "prepared":
        return _write(topology, replace(m, state="cancelled"), (m.from_group, "stable"))
    if m.adopt and not m.warms:
        raise TopologyError(f"adoption {m.id} is moving keys: it cannot be cancelled (they would have to go back "
                            "to the pool's placement); pause it instead", 409)
    # Migrating: some keys are on each side.  Phase one of moving them back: hold at the new owner.
    # (A memcache migration goes from that hold straight back to the source: see advance.)
    return _write(topology, replace(m, state="prepared", cancelling=True, warmed=False, warmup_until=None,
                                    warmup_left=None), (m.to_group, "held"))


def throttle(topology: Topology, mid: int, keys_per_second: Optional[int]) -> Topology:
    """Change a Redis migration's sweep rate (None: no limit); 409 once it has ended, 400 for a memcache one."""
    m = _find(topology, mid)
    if m.ended:
        raise TopologyError(f"migration {m.describe()} has ended ({m.state}): nothing to throttle", 409)
    if m.warms:
        raise TopologyError(f"migration {m.describe()} warms up a memcache range: it has no sweep to throttle")
    return _write(topology, replace(m, keys_per_second=check_rate(keys_per_second)))


def fail(topology: Topology, mid: int, reason: str) -> Topology:
    """A pending or prepared migration ends failed (its hold released at the source); 409 otherwise."""
    m = _find(topology, mid)
    if m.state not in ("pending", "preparing", "prepared") or m.cancelling:
        raise TopologyError(f"migration {m.describe()} is {m.state}: only one whose keys have not started moving "
                            "can fail (cancel it instead)", 409)
    slots = (m.from_group, "stable") if m.state == "prepared" else None
    return _write(topology, replace(m, state="failed", error=reason), slots)


def unprepare(topology: Topology, mid: int, reason: str) -> Topology:
    """A prepared migration (not moving back) pending again, its hold released; 409 otherwise."""
    m = _find(topology, mid)
    if m.state != "prepared" or m.cancelling:
        raise TopologyError(f"migration {m.describe()} is {m.state}: only a prepared one goes back to pending", 409)
    return _write(topology, replace(m, state="pending", error=reason), (m.from_group, "stable"))


__all__ = ["ACTIVE", "DEFAULT_WARMUP", "ENDED", "KEEP_ENDED", "MIGRATION_STATES", "Migration", "adopt", "advance",
           "cancel",
           "check_migrations", "check_parallel", "check_rate", "check_warmup", "create", "fail", "parse_migrations",
           "startable", "throttle", "time_warmup", "unprepare"]
