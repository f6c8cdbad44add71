"""Adopting a twemproxy pool: the request, the queued adoption, its version check and its sweeps.

Owns what the dashboard does differently for an adoption (the model's
edits are :mod:`twinproxy.cluster.adoptions`; its states are driven
by the same :class:`~twinproxy.dashboard.runner.Runner` as any migration):

- :func:`parse_request` — ``POST /api/adopt``'s body, checked: the pool
  (an :class:`AdoptRequest` with its placement), or ``{"resume": true}``
  (the placement the topology keeps: after an entry was cancelled or
  failed, the servers whose keys have not moved are queued again);
- :func:`queue` — the one generation that creates the groups, the slots
  and the adoption (one entry per server of the pool, run one after
  another), or a resume's entries, every entry **paused**: no key may move
  before every proxy serving the pool follows the cluster, and only the
  operator knows when that is (the proxies still reading the pool file are
  not registered anywhere the dashboard can see);
- :func:`check_versions` — a key moves from any server to any other, so
  no group's Redis may be older than another's (a DUMP payload of a newer
  Redis does not load in an older one; a memcache cluster's items are not
  moved, so it has none);
- :func:`sweeps` — for the entry of one source group, one
  :class:`~twinproxy.dashboard.mover.Sweep` per target group, side by side:
  the keys on the source that the pool placed there and whose slot the
  target owns.  A key the pool did not place on the server it is found on
  (left there by an ejection, say) is nobody's to move and stays.
  A memcache cluster's entry has no sweep: it warms up (the runner's
  ``_warm_up``); :func:`leftovers_of` says what to delete first when an
  earlier entry of the same server was cancelled.

Progress: each sweep counts into a :class:`_Share` of the adoption's
progress (keys moved summed; keys left the sum of the sweeps' estimates).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from twisted.internet import defer

from twinproxy.cluster import adoptions, migrations
from twinproxy.cluster.legacy import Legacy, LegacyError, legacy_router, make_legacy
from twinproxy.cluster.model import TopologyError
from twinproxy.cluster.slots import SLOT_COUNT, slot_of
from twinproxy.dashboard.errors import OperationError
from twinproxy.dashboard.mover import Sweep
from twinproxy.dashboard.servers import ServerError, unanswered

if TYPE_CHECKING:
    from twinproxy.cluster.migrations import Migration
    from twinproxy.cluster.model import Topology

_FIELDS = ("pool", "hash", "distribution", "hash_tag", "servers")
_OPTIONAL = ("keys_per_second", "cluster", "protocol", "warmup_seconds")
_RESUME_FIELDS = ("resume", "pool", "cluster", "keys_per_second", "warmup_seconds")


class RequestError(ValueError):
    """A bad ``POST /api/adopt`` body (the API answers 400 with it)."""


@dataclass(frozen=True)
class AdoptRequest:
    """``POST /api/adopt``, checked: a pool to adopt (``legacy`` at ``addresses``), or a resume (``legacy`` None:
    the placement the topology keeps).

    ``keys_per_second`` applies when ``rate_given`` (else a resume keeps the
    adoption's latest rate; a first adoption has none).  ``pool`` / ``cluster``:
    what the request means, refused (409) when the cluster is another;
    ``protocol``: the pool's (None: not said), refused (409) when the
    cluster's is another.  ``warmup_seconds``: a memcache adoption's (None:
    the default, or a resume's latest).
    """

    legacy: Optional[Legacy]
    addresses: List[str]
    keys_per_second: Optional[int]
    rate_given: bool
    pool: Optional[str]
    cluster: Optional[str]
    protocol: Optional[str] = None
    warmup_seconds: Optional[int] = None

    @property
    def resume(self) -> bool:
        return self.legacy is None

    def rate(self, topology: "Topology") -> Optional[int]:
        return self.keys_per_second if self.rate_given else adoptions.latest_rate(topology)

    def edit(self, topology: "Topology") -> "Topology":
        """The model's edit this request asks of ``topology``."""
        if self.cluster is not None and self.cluster != topology.cluster:
            raise TopologyError(f"this dashboard serves cluster '{topology.cluster}', not '{self.cluster}'", 409)
        if self.protocol is not None and self.protocol != topology.protocol:
            kind = "a Redis" if self.protocol == "redis" else "a memcached"
            raise TopologyError(f"pool '{self.pool}' is {kind} pool, and cluster '{topology.cluster}' a "
                                f"{topology.protocol} cluster: adopt it into a cluster of its protocol (a dashboard "
                                f"started with --protocol {self.protocol})", 409)
        if self.legacy is None:
            return adoptions.resume(topology, self.rate(topology), self.pool, self.warmup_seconds)
        return adoptions.adopt(topology, self.legacy, self.addresses, self.rate(topology), self.warmup_seconds)


def parse_request(document: Any) -> AdoptRequest:
    """The body: the pool (its placement, groups 1..N in its order, and its servers' addresses), or
    ``{"resume": true}`` (``pool``, ``cluster``, ``keys_per_second`` optional)."""
    if not isinstance(document, dict):
        raise RequestError("the request body must be a JSON object")
    if document.get("resume") is not None and document.get("resume") is not False:
        return _parse_resume(document)
    unknown = sorted(str(key) for key in document if key not in _FIELDS + _OPTIONAL + ("resume",))
    missing = [key for key in _FIELDS if key not in document]
    if unknown or missing:
        raise RequestError("; ".join(([f"missing field {', '.join(missing)}"] if missing else [])
                                     + ([f"unknown field {', '.join(unknown)}"] if unknown else []))
                           + f" (fields: {', '.join(_FIELDS + _OPTIONAL)}; or resume: true)")
    servers = document["servers"]
    if not isinstance(servers, list) or not servers:
        raise RequestError("servers must be a non-empty list of {address, name, weight}")
    addresses, ring = [], []
    for index, server in enumerate(servers):
        if not isinstance(server, dict) or sorted(server) != ["address", "name", "weight"]:
            raise RequestError(f"server {index + 1} must be an object with address, name and weight, not {server!r}")
        addresses.append(server["address"])
        ring.append((index + 1, server["name"], server["weight"]))
    try:
        legacy = make_legacy(document["pool"], document["hash"], document["distribution"], document["hash_tag"], ring)
    except LegacyError as err:
        raise RequestError(str(err))
    protocol = document.get("protocol")
    if protocol not in (None, "redis", "memcache"):
        raise RequestError(f"protocol must be redis or memcache, not {protocol!r}")
    return AdoptRequest(legacy, addresses, _rate(document), "keys_per_second" in document, legacy.pool,
                        _name(document, "cluster"), protocol, _warmup(document))


def _parse_resume(document: Dict[str, Any]) -> AdoptRequest:
    if document["resume"] is not True:
        raise RequestError(f"resume must be true or false, not {document['resume']!r}")
    unknown = sorted(str(key) for key in document if key not in _RESUME_FIELDS)
    if unknown:
        raise RequestError(f"unknown field {', '.join(unknown)} (a resume takes {', '.join(_RESUME_FIELDS)}: the "
                           "cluster keeps the pool's placement)")
    return AdoptRequest(None, [], _rate(document), "keys_per_second" in document, _name(document, "pool"),
                        _name(document, "cluster"), None, _warmup(document))


def _rate(document: Dict[str, Any]) -> Optional[int]:
    try:
        return migrations.check_rate(document.get("keys_per_second"))
    except TopologyError as err:
        raise RequestError(err.message)


def _warmup(document: Dict[str, Any]) -> Optional[int]:
    try:
        return migrations.check_warmup(document.get("warmup_seconds"))
    except TopologyError as err:
        raise RequestError(err.message)


def _name(document: Dict[str, Any], field: str) -> Optional[str]:
    value = document.get(field)
    if value is not None and (not isinstance(value, str) or not value):
        raise RequestError(f"{field} must be a non-empty string, not {value!r}")
    return value


@defer.inlineCallbacks
def queue(manager: Any, request: AdoptRequest) -> Any:
    """Write the adoption's new entries (paused) and wait for the proxies: the API's answer.  One operation.

    A resume's entries are paused as a first adoption's are: the dashboard
    cannot tell whether every proxy serving the pool follows the cluster (a
    cancel may have come before any of them reloaded), the operator can.
    """
    ctl = manager.ctl
    ctl.check_writable()
    ctl.dry(lambda: request.edit(ctl.current()))
    yield manager.idle(lambda: False, timeout=ctl.ack_timeout * 2 + 5)
    pool = request.pool or ctl.current().adopted.pool     # a resume's dry run found the cluster adopted

    @defer.inlineCallbacks
    def body() -> Any:
        # Paused before it exists: a runner made for it when the write lands must find it paused.
        before = {m.id for m in ctl.current().migrations}
        again = ctl.current().adopted is not None     # a resume (of either shape)
        ids = [m.id for m in ctl.dry(lambda: request.edit(ctl.current())).migrations if m.id not in before]
        for mid in ids:
            manager.book.get(mid).paused = True
        yield manager.book.write()
        new = yield ctl.write(request.edit)
        written = [m.id for m in new.migrations if m.adopt and m.id not in before]
        for mid in written:
            manager.book.get(mid).paused = True      # again: a look at the topology before it landed forgot it
        yield manager.book.write()
        if written != ids:
            raise OperationError(500, f"the adoption was written as migrations {written}, not {ids}: pause them "
                                 "by hand")
        yield ctl.wait_acks(new, f"the adoption of pool '{pool}'")
        return new, written, again

    doing = f"resume the adoption of pool '{pool}'" if request.resume else f"adopt pool '{pool}'"
    new, written, again = yield ctl._operation(doing, body)
    queued = [manager.merged(new.migration(mid)) for mid in written]
    states = new.adopt_states()
    return ctl.ok(new, migrations=queued, migration=queued[0] if queued else None,
                  resumed=again, pool=pool,
                  done=[gid for gid, state in states.items() if state == "done"])


@defer.inlineCallbacks
def check_versions(ctl: Any, topology: "Topology", m: "Migration", version_of: Callable[[Any], Any]) -> Any:
    """None when every master answers and none is older than another; else why not (OperationError 502 when
    one does not answer)."""
    versions: Dict[int, Any] = {}
    # The adopted pool's groups: its keys move between them only (a group added since, or left empty, has
    # no say, and an empty one no master to ask).
    adopted = set(topology.adopted.gids) if topology.adopted is not None else None
    for group in topology.groups:
        if (adopted is not None and group.id not in adopted) or group.master is None:
            continue
        try:
            versions[group.id] = version_of((yield ctl.admin.command(group.master, b"INFO", b"server")))
        except ServerError as err:
            raise OperationError(502, f"adoption {m.id} cannot start: group {group.id}'s master {unanswered(err)}")
    known = {gid: version for gid, version in versions.items() if version is not None}
    if known and len(set(known.values())) > 1:
        shown = ", ".join(f"group {gid} {'.'.join(map(str, version))}" for gid, version in sorted(known.items()))
        return (f"the groups run different Redis versions ({shown}): a key moves from any of them to any other, "
                "and a newer one's keys do not load in an older one")
    return None


def leftovers_of(topology: "Topology", m: "Migration") -> Optional[Tuple[List[str], Callable[[bytes], bool]]]:
    """A memcache adoption entry's leftovers to delete before it warms up: the other groups' servers and which
    of their keys (the pool placed them on ``m``'s server); None when no earlier entry of that server was
    cancelled (then they hold only the keys the pool placed on them)."""
    source = m.from_group
    if not any(o.adopt and o.from_group == source and o.state == "cancelled" and o.id < m.id
               for o in topology.migrations):
        return None
    legacy = topology.adopted
    place = legacy_router(legacy, list(legacy.gids))
    addresses = [address for gid in legacy.gids if gid != source for address in topology.group(gid).servers]
    return addresses, lambda key: place(key) == source


class _Share:
    """One sweep's view of the adoption's progress."""

    def __init__(self, progress: Any, shares: List["_Share"]) -> None:
        self._progress = progress
        self._shares = shares
        self._left: Optional[int] = None
        shares.append(self)

    @property
    def keys_moved(self) -> int:
        return self._progress.keys_moved

    @keys_moved.setter
    def keys_moved(self, value: int) -> None:
        self._progress.keys_moved = value

    @property
    def keys_left(self) -> Optional[int]:
        return self._left

    @keys_left.setter
    def keys_left(self, value: Optional[int]) -> None:
        self._left = value
        known = [share._left for share in self._shares if share._left is not None]
        self._progress.keys_left = sum(known) if known else None

    @property
    def error(self) -> Optional[str]:
        return self._progress.error

    @error.setter
    def error(self, value: Optional[str]) -> None:
        self._progress.error = value


class SweepGroup:
    """An adoption entry's sweeps, side by side, driven like one Sweep."""

    def __init__(self, sweeps: List[Sweep]) -> None:
        self.all = sweeps

    def pause(self) -> None:
        for sweep in self.all:
            sweep.pause()

    def resume(self) -> None:
        for sweep in self.all:
            sweep.resume()

    def stop(self) -> None:
        for sweep in self.all:
            sweep.stop()

    def set_rate(self, keys_per_second: Optional[int]) -> None:
        for sweep in self.all:
            sweep.set_rate(_share_of_rate(keys_per_second, len(self.all)))

    @defer.inlineCallbacks
    def run(self) -> Any:
        """True once every sweep found its keys gone; False when one was stopped first.

        When one fails, the others are stopped and waited for before its error is raised: none of the
        entry's sweeps may still be copying keys when the runner retries or fails the entry.
        """
        failures: List[Any] = []

        def failed(failure: Any) -> bool:
            if not failures:
                failures.append(failure)
                self.stop()
            return False

        results = yield defer.gatherResults([sweep.run().addErrback(failed) for sweep in self.all])
        if failures:
            failures[0].raiseException()
        return all(results)


def _share_of_rate(keys_per_second: Optional[int], sweeps: int) -> Optional[int]:
    # The sweeps run side by side: together they keep to the entry's rate.
    return None if keys_per_second is None else max(1, keys_per_second // max(1, sweeps))


def sweeps(runner: Any, topology: "Topology", m: "Migration", options: Dict[str, Any]) -> SweepGroup:
    """The sweeps of adoption entry ``m``: from its group to each other group, over the pool's placement."""
    legacy = topology.adopted
    gids = list(legacy.gids)
    place = legacy_router(legacy, gids)
    owners = [owner for owner, _ in topology.slots]
    shares: List[_Share] = []
    source = m.from_group
    found = []
    for target in gids:
        if target == source:
            continue

        def belongs(key: bytes, target: int = target) -> bool:
            return owners[slot_of(key)] == target and place(key) == source

        source_master, target_master = topology.group(source).master, topology.group(target).master
        found.append(Sweep(runner.ctl.reactor, source_master, target_master, 0, SLOT_COUNT - 1,
                           _Share(runner.progress, shares), _share_of_rate(m.keys_per_second, len(gids) - 1),
                           m.parallel,
                           may_go=lambda s=source_master, t=target_master, b=target: runner._may_sweep(
                               m, s, t, (source, b)),
                           command_timeout=runner.ctl.command_timeout,
                           label=f"adoption {m.id}: group {source} to group {target}", belongs=belongs,
                           refused=lambda reason, b=target: runner.ctl.masters.refused(reason, (source, b)),
                           **options))
    return SweepGroup(found)
