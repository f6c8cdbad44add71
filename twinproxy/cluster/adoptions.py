"""The adoption's edits: a twemproxy pool taken over, and its servers queued again after a cancel or a failure.

Owns :func:`adopt` (the first request: groups, slots, the pool's placement
and one adoption entry per server, in one generation; or, for a cluster
that adopted that same pool, a :func:`resume`), :func:`resume` (one pending
entry per server whose keys have not moved, from the placement the
topology keeps: the pool file was rewritten, so nothing else remembers it)
and :func:`latest_rate` (the rate a resume keeps when not told another).
What the entries are and how they run: :mod:`twinproxy.cluster.migrations`.
Each edit is a new Topology at generation + 1 or a TopologyError (400/409).
No Twisted, no I/O.
"""

from __future__ import annotations

from dataclasses import replace
from typing import List, Optional

from twinproxy.cluster.legacy import Legacy, even_spread
from twinproxy.cluster.migrations import DEFAULT_WARMUP, Migration, check_rate, check_warmup
from twinproxy.cluster.model import Group, Topology, TopologyError, check_address
from twinproxy.cluster.slots import SLOT_COUNT


def resume_command(cluster: str) -> str:
    """The command that queues an adopted pool's servers left (named by the refusals that need it)."""
    return f"twinproxy-admin adopt --resume --cluster {cluster}"


def adopt(topology: Topology, legacy: Legacy, addresses: List[str], keys_per_second: Optional[int] = None,
          warmup_seconds: Optional[int] = None) -> Topology:
    """Take over pool ``legacy``: its servers become groups, the slots spread over them, one adoption per server.

    ``addresses``: the pool's servers, in its order (``legacy.servers``'
    order).  An empty topology only (409 otherwise), or one that has
    adopted this very pool (the same placement, the same masters): then a
    :func:`resume`.  One generation.  ``keys_per_second``: each entry's
    sweep rate (None: as fast as it goes; Redis only).  ``warmup_seconds``:
    a memcache cluster's, how long each entry warms its server's keys up at
    their slots' owners (default :data:`DEFAULT_WARMUP`; memcached items
    are not moved: see :mod:`twinproxy.cluster.warmup`).
    """
    check_rate(keys_per_second)
    _check_tuning(topology, keys_per_second, warmup_seconds)
    if len(addresses) != len(legacy.servers):
        raise TopologyError(f"{len(addresses)} addresses for the {len(legacy.servers)} servers of pool "
                            f"'{legacy.pool}'")
    for address in addresses:
        check_address(address, "server address")
    if len(set(addresses)) != len(addresses):
        raise TopologyError(f"pool '{legacy.pool}' lists a server twice")
    if topology.adopted is not None:
        _same_pool(topology, legacy, addresses)
        return resume(topology, keys_per_second, warmup_seconds=warmup_seconds)
    if topology.groups or topology.migrations or topology.offline_slots != SLOT_COUNT or topology.change:
        raise TopologyError(f"cluster '{topology.cluster}' is not empty: a pool is adopted into a cluster with "
                            "no groups, no slots placed and no migrations", 409)
    groups = tuple(sorted((Group(gid, (address,)) for (gid, _, _), address in zip(legacy.servers, addresses)),
                          key=lambda g: g.id))
    spread = even_spread(list(legacy.gids), SLOT_COUNT)
    topology = replace(topology, groups=groups, slots=tuple((spread[slot], "stable") for slot in range(SLOT_COUNT)),
                       adopted=legacy)
    return _queue(topology, list(legacy.gids), keys_per_second, warmup_seconds)


def _check_tuning(topology: Topology, keys_per_second: Optional[int], warmup_seconds: Optional[int]) -> None:
    """400 for a sweep rate given to a memcache cluster's adoption, or a warm-up to a Redis one's."""
    check_warmup(warmup_seconds)
    if topology.protocol == "redis" and warmup_seconds is not None:
        raise TopologyError("warmup_seconds is for memcache clusters: a Redis pool's keys are moved, not warmed up")
    if topology.protocol != "redis" and keys_per_second is not None:
        raise TopologyError("keys_per_second tunes a Redis adoption's sweeps: a memcache pool's keys warm up "
                            "instead (warmup_seconds)")


def _same_pool(topology: Topology, legacy: Legacy, addresses: List[str]) -> None:
    """409 unless ``legacy`` at ``addresses`` is the pool the topology adopted."""
    adopted = topology.adopted
    masters = [topology.group(gid).master if topology.group(gid) is not None else None for gid in legacy.gids]
    if legacy.pool != adopted.pool:
        differs = f"it names pool '{legacy.pool}'"
    elif legacy != adopted:
        differs = "its hash, distribution, hash tag or servers' names and weights are not the adopted ones"
    elif masters != list(addresses):
        differs = (f"its servers are {', '.join(addresses)}, the adopted groups' masters "
                   f"{', '.join(str(master) for master in masters)}")
    else:
        return
    raise TopologyError(f"cluster '{topology.cluster}' has adopted pool '{adopted.pool}' already, and this request "
                        f"does not match it ({differs}): the servers whose keys have not moved are queued again "
                        f"from the placement the cluster keeps, with {resume_command(topology.cluster)}", 409)


def resume(topology: Topology, keys_per_second: Optional[int] = None, pool: Optional[str] = None,
           warmup_seconds: Optional[int] = None) -> Topology:
    """Queue again the adopted pool's servers whose keys have not moved (each one's entry was cancelled or
    failed): one pending adoption entry each, in the pool's order, one generation.

    409 when no pool is adopted, when ``pool`` (if given) is not the
    adopted one, and while an adoption entry has not ended (queued or
    moving keys: the servers it leaves are known once it ends).
    """
    check_rate(keys_per_second)
    _check_tuning(topology, keys_per_second, warmup_seconds)
    legacy = topology.adopted
    if legacy is None:
        finished = any(m.adopt and m.state == "finished" for m in topology.migrations)
        raise TopologyError(f"cluster '{topology.cluster}' has no adoption to resume: "
                            + ("every server's keys of its adopted pool have moved (its adoption finished)"
                               if finished else "it has adopted no pool"), 409)
    if pool is not None and pool != legacy.pool:
        raise TopologyError(f"cluster '{topology.cluster}' has adopted pool '{legacy.pool}', not '{pool}'", 409)
    live = topology.adoption
    if live is not None:
        then = ("wait for it to end (migration wait); a resume then queues the servers whose keys have not moved"
                if live.active else "it starts in its turn (if paused: migration resume); nothing to queue again")
        raise TopologyError(f"the adoption of pool '{legacy.pool}' is under way: adoption {live.id} (group "
                            f"{live.from_group}'s keys) is {live.state}: {then}", 409)
    states = topology.adopt_states()
    left = [gid for gid in legacy.gids if states[gid] == "legacy"]
    if not left:    # not reached: the placement is dropped with the last server's keys moved
        raise TopologyError(f"every server's keys of pool '{legacy.pool}' have moved: nothing to resume", 409)
    if warmup_seconds is None:
        warmup_seconds = latest_warmup(topology)
    return _queue(topology, left, keys_per_second, warmup_seconds)


def _queue(topology: Topology, gids: List[int], keys_per_second: Optional[int],
           warmup_seconds: Optional[int] = None) -> Topology:
    mid = max((m.id for m in topology.migrations), default=0) + 1
    if topology.protocol != "redis" and warmup_seconds is None:
        warmup_seconds = DEFAULT_WARMUP
    entries = [Migration(mid + index, 0, SLOT_COUNT - 1, gid, None, "pending", keys_per_second,
                         warmup_seconds=warmup_seconds, adopt=True)
               for index, gid in enumerate(gids)]
    return topology._next(migrations=tuple(topology.migrations) + tuple(entries))


def latest_rate(topology: Topology) -> Optional[int]:
    """The sweep rate of the latest adoption entry (None: no limit, or none): what a resume keeps."""
    rates = [m.keys_per_second for m in topology.migrations if m.adopt]
    return rates[-1] if rates else None


def latest_warmup(topology: Topology) -> Optional[int]:
    """A memcache adoption's latest entry's warm-up seconds (None: a Redis one, or none): what a resume keeps."""
    found = [m.warmup_seconds for m in topology.migrations if m.adopt]
    return found[-1] if found else None


__all__ = ["adopt", "latest_rate", "latest_warmup", "resume", "resume_command"]
