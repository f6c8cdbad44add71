"""Adopting a twemproxy pool: the request, the queued adoption, its version check and its sweeps.

Owns what the dashboard does differently for an adoption (the model's
edit is :func:`twinproxy.cluster.migrations.adopt`; its states are driven
by the same :class:`~twinproxy.dashboard.runner.Runner` as any migration):

- :func:`parse_request` — ``POST /api/adopt``'s body, checked;
- :func:`queue` — the one generation that creates the groups, the slots
  and the adoption (one entry per server of the pool, run one after
  another), every entry **paused**: no key may move before every proxy
  serving the pool follows the cluster, and only the operator knows when
  that is (the proxies still reading the pool file are not registered
  anywhere the dashboard can see);
- :func:`check_versions` — a key moves from any server to any other, so
  no group's Redis may be older than another's (a DUMP payload of a newer
  Redis does not load in an older one);
- :func:`sweeps` — for the entry of one source group, one
  :class:`~twinproxy.dashboard.mover.Sweep` per target group, side by side:
  the keys on the source that the pool placed there and whose slot the
  target owns.  A key the pool did not place on the server it is found on
  (left there by an ejection, say) is nobody's to move and stays.

Progress: each sweep counts into a :class:`_Share` of the adoption's
progress (keys moved summed; keys left the sum of the sweeps' estimates).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from twisted.internet import defer

from twinproxy.cluster import migrations
from twinproxy.cluster.legacy import Legacy, LegacyError, legacy_router, make_legacy
from twinproxy.cluster.model import TopologyError
from twinproxy.cluster.slots import slot_of
from twinproxy.dashboard.errors import OperationError
from twinproxy.dashboard.mover import Sweep
from twinproxy.dashboard.servers import ServerError

if TYPE_CHECKING:
    from twinproxy.cluster.migrations import Migration
    from twinproxy.cluster.model import Topology

_FIELDS = ("pool", "hash", "distribution", "hash_tag", "servers")
_OPTIONAL = ("keys_per_second",)


class RequestError(ValueError):
    """A bad ``POST /api/adopt`` body (the API answers 400 with it)."""


def parse_request(document: Any) -> Tuple[Legacy, List[str], Optional[int]]:
    """The adopted pool's placement (groups 1..N in its order), its servers' addresses, the sweeps' rate."""
    if not isinstance(document, dict):
        raise RequestError("the request body must be a JSON object")
    unknown = sorted(str(key) for key in document if key not in _FIELDS + _OPTIONAL)
    missing = [key for key in _FIELDS if key not in document]
    if unknown or missing:
        raise RequestError("; ".join(([f"missing field {', '.join(missing)}"] if missing else [])
                                     + ([f"unknown field {', '.join(unknown)}"] if unknown else []))
                           + f" (fields: {', '.join(_FIELDS + _OPTIONAL)})")
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
    try:
        rate = migrations.check_rate(document.get("keys_per_second"))
    except TopologyError as err:
        raise RequestError(err.message)
    return legacy, addresses, rate


@defer.inlineCallbacks
def queue(manager: Any, legacy: Legacy, addresses: List[str], keys_per_second: Optional[int] = None) -> Any:
    """Write the adoption (paused) and wait for the proxies: the API's answer.  Runs as one operation."""
    ctl = manager.ctl
    ctl.check_writable()
    def edit(topology: Any) -> Any:
        return migrations.adopt(topology, legacy, addresses, keys_per_second)

    ctl.dry(lambda: edit(ctl.current()))
    yield manager.idle(lambda: False, timeout=ctl.ack_timeout * 2 + 5)

    @defer.inlineCallbacks
    def body() -> Any:
        # Paused before it exists: a runner made for it when the write lands must find it paused.
        before = {m.id for m in ctl.current().migrations}
        ids = [m.id for m in ctl.dry(lambda: edit(ctl.current())).migrations if m.id not in before]
        for mid in ids:
            manager.book.get(mid).paused = True
        yield manager.book.write()
        new = yield ctl.write(edit)
        written = [m.id for m in new.migrations if m.adopt and not m.ended]
        for mid in written:
            manager.book.get(mid).paused = True      # again: a look at the topology before it landed forgot it
        yield manager.book.write()
        if written != ids:
            raise OperationError(500, f"the adoption was written as migrations {written}, not {ids}: pause them "
                                 "by hand")
        yield ctl.wait_acks(new, f"the adoption of pool '{legacy.pool}'")
        return new

    new = yield ctl._operation(f"adopt pool '{legacy.pool}'", body)
    adoptions = [manager.merged(m) for m in new.migrations if m.adopt and not m.ended]
    return ctl.ok(new, migrations=adoptions, migration=adoptions[0])


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
            raise OperationError(502, f"adoption {m.id} cannot start: group {group.id}'s master does not "
                                 f"answer: {err}")
    known = {gid: version for gid, version in versions.items() if version is not None}
    if known and len(set(known.values())) > 1:
        shown = ", ".join(f"group {gid} {'.'.join(map(str, version))}" for gid, version in sorted(known.items()))
        return (f"the groups run different Redis versions ({shown}): a key moves from any of them to any other, "
                "and a newer one's keys do not load in an older one")
    return None


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
        """True once every sweep found its keys gone; False when one was stopped first."""
        results = yield defer.gatherResults([sweep.run() for sweep in self.all], consumeErrors=True)
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
        found.append(Sweep(runner.ctl.reactor, source_master, target_master, 0, 1023, _Share(runner.progress, shares),
                           _share_of_rate(m.keys_per_second, len(gids) - 1), m.parallel,
                           may_go=lambda s=source_master, t=target_master, b=target: runner._may_sweep(
                               m, s, t, (source, b)),
                           command_timeout=runner.ctl.command_timeout,
                           label=f"adoption {m.id}: group {source} to group {target}", belongs=belongs,
                           refused=lambda reason, b=target: runner.ctl.masters.refused(reason, (source, b)),
                           **options))
    return SweepGroup(found)
