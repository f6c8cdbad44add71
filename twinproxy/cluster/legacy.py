"""An adopted twemproxy pool's placement: where its distribution put each key before the cluster.

Owns :class:`Legacy` — the topology document's ``adopted`` entry: the
pool's name, hash, distribution and hash tag, and its servers in the pool
file's order as ``(group id, ring name, weight)`` — its strict parsing, and
:func:`legacy_router`, the pool's own key -> server function (the same
:func:`~twinproxy.distribution.ring_router` a nutcracker pool routes with)
over the groups that the servers became.  While an adoption has not moved
any key, a cluster routes by it; while it moves them, it names each key's
source.  The full ring, never a reduced one: an adopted pool does not eject.
No Twisted, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from twinproxy.distribution import build_continuum, ring_router
from twinproxy.hashing import HASH_FUNCTIONS, hash_tag_extractor

# A key may be on any server under "random": there is nothing to adopt from.
ADOPTABLE_DISTRIBUTIONS = ("ketama", "modula")
_KEYS = ("pool", "hash", "distribution", "hash_tag", "servers")


class LegacyError(ValueError):
    """An invalid ``adopted`` entry (the model turns it into a TopologyError)."""


@dataclass(frozen=True)
class Legacy:
    """The placement of pool ``pool``: ``servers`` are ``(gid, name, weight)`` in the pool's order."""

    pool: str
    hash: str
    distribution: str
    hash_tag: Optional[str]
    servers: Tuple[Tuple[int, str, int], ...]

    @property
    def gids(self) -> Tuple[int, ...]:
        return tuple(gid for gid, _, _ in self.servers)

    def to_dict(self) -> Dict[str, Any]:
        return {"pool": self.pool, "hash": self.hash, "distribution": self.distribution, "hash_tag": self.hash_tag,
                "servers": [{"group": gid, "name": name, "weight": weight} for gid, name, weight in self.servers]}

    @classmethod
    def from_dict(cls, item: Any) -> "Legacy":
        if not isinstance(item, dict):
            raise LegacyError(f"adopted must be an object, not {item!r}")
        missing = [key for key in _KEYS if key not in item]
        unknown = sorted(str(key) for key in item if key not in _KEYS)
        if missing or unknown:
            raise LegacyError("adopted: " + "; ".join(([f"missing {', '.join(missing)}"] if missing else [])
                                                      + ([f"unknown {', '.join(unknown)}"] if unknown else [])))
        servers = item["servers"]
        if not isinstance(servers, list):
            raise LegacyError("adopted: servers must be a list")
        parsed = []
        for server in servers:
            if not isinstance(server, dict) or sorted(server) != ["group", "name", "weight"]:
                raise LegacyError(f"adopted: a server must be {{group, name, weight}}, not {server!r}")
            parsed.append((server["group"], server["name"], server["weight"]))
        return make_legacy(item["pool"], item["hash"], item["distribution"], item["hash_tag"], parsed)


def make_legacy(pool: Any, hash_name: Any, distribution: Any, hash_tag: Any,
                servers: Sequence[Tuple[Any, Any, Any]]) -> Legacy:
    """A checked :class:`Legacy`; LegacyError names the first thing wrong."""
    if not isinstance(pool, str) or not pool:
        raise LegacyError(f"the adopted pool's name must be a non-empty string, not {pool!r}")
    if hash_name not in HASH_FUNCTIONS:
        raise LegacyError(f"hash {hash_name!r} is not one of nutcracker's ({', '.join(sorted(HASH_FUNCTIONS))})")
    if distribution not in ADOPTABLE_DISTRIBUTIONS:
        raise LegacyError(f"distribution {distribution!r} cannot be adopted (only {', '.join(ADOPTABLE_DISTRIBUTIONS)}:"
                          " under random a key may be on any server)")
    if hash_tag is not None and not (isinstance(hash_tag, str) and len(hash_tag) == 2):
        raise LegacyError(f"hash_tag must be null or two characters, not {hash_tag!r}")
    if not servers:
        raise LegacyError("the adopted pool has no servers")
    checked = []
    for gid, name, weight in servers:
        if isinstance(gid, bool) or not isinstance(gid, int) or not 1 <= gid <= 9999:
            raise LegacyError(f"adopted server {name!r}: group {gid!r} is not a group id (1 to 9999)")
        if not isinstance(name, str) or not name:
            raise LegacyError(f"adopted server of group {gid}: its name must be a non-empty string")
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
            raise LegacyError(f"adopted server {name!r}: weight must be a positive integer, not {weight!r}")
        checked.append((gid, name, weight))
    if len({gid for gid, _, _ in checked}) != len(checked) or len({name for _, name, _ in checked}) != len(checked):
        raise LegacyError("adopted servers must have distinct groups and distinct names")
    return Legacy(pool, hash_name, distribution, hash_tag or None, tuple(checked))


def legacy_router(legacy: Legacy, targets: Sequence[Any]) -> Callable[[bytes], Any]:
    """key -> ``targets[i]``, where the pool's i-th server is the one its distribution placed key on."""
    if len(targets) != len(legacy.servers):
        raise ValueError(f"{len(targets)} targets for the {len(legacy.servers)} servers of pool {legacy.pool}")
    if len(targets) == 1:
        only = targets[0]
        return lambda key: only
    continuum = build_continuum(legacy.distribution, [(name, weight) for _, name, weight in legacy.servers])
    return ring_router(list(targets), continuum, HASH_FUNCTIONS[legacy.hash], hash_tag_extractor(legacy.hash_tag),
                       bool(legacy.hash_tag))


def even_spread(gids: Sequence[int], slot_count: int) -> Dict[int, int]:
    """slot -> gid: contiguous, as even as can be, in ``gids``' order (group k: k*n//N .. (k+1)*n//N - 1)."""
    count = len(gids)
    return {slot: gid for k, gid in enumerate(gids)
            for slot in range(k * slot_count // count, (k + 1) * slot_count // count)}
