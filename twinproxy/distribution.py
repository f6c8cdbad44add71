"""Continua that map a key hash to a server index, as nutcracker builds them.

Owns: the ketama, modula and random distributions, built from the
``(name, weight)`` pairs of the *live* servers in pool order, and the
lookup from a 32-bit hash to a position in that live list.  Knows nothing
of server health, time, configuration files or sockets: the pool rebuilds
a continuum whenever its live set changes.

Ketama reproduces nutcracker's float32 arithmetic for the number of points
per server, because a double-precision result differs for some weights and
moves keys.
"""

from __future__ import annotations

import bisect
import hashlib
import random
import struct
from bisect import bisect_left
from typing import Any, Callable, List, Optional, Sequence, Tuple

KETAMA_POINTS_PER_SERVER = 160
KETAMA_POINTS_PER_HASH = 4

_F32 = struct.Struct("<f")


def _f32(value: float) -> float:
    """Round ``value`` to the nearest IEEE single-precision number."""
    return _F32.unpack(_F32.pack(value))[0]


class Continuum:
    """Maps a hash to an index into the live-server list it was built from."""

    __slots__ = ()

    def lookup(self, hash_value: int) -> int:
        raise NotImplementedError


class KetamaContinuum(Continuum):
    """Consistent hashing: 160 points per server scaled by weight, MD5-placed."""

    __slots__ = ("points", "indices")

    def __init__(self, servers: Sequence[Tuple[str, int]]) -> None:
        total_weight = sum(weight for _, weight in servers)
        live = len(servers)
        pairs: List[Tuple[int, int]] = []
        for index, (name, weight) in enumerate(servers):
            pct = _f32(_f32(float(weight)) / _f32(float(total_weight)))
            scaled = _f32(_f32(pct * KETAMA_POINTS_PER_SERVER) / 4)
            scaled = _f32(scaled * _f32(float(live)))
            count = int(scaled + 1e-10) * KETAMA_POINTS_PER_HASH
            for pointer in range(count // KETAMA_POINTS_PER_HASH):
                digest = hashlib.md5(f"{name}-{pointer}".encode()).digest()
                for group in range(KETAMA_POINTS_PER_HASH):
                    value = int.from_bytes(digest[group * 4:group * 4 + 4], "little")
                    pairs.append((value, index))
        pairs.sort()
        self.points = [value for value, _ in pairs]
        self.indices = [index for _, index in pairs]

    def lookup(self, hash_value: int) -> int:
        position = bisect.bisect_left(self.points, hash_value)
        if position == len(self.points):
            position = 0
        return self.indices[position]


class ModulaContinuum(Continuum):
    """Each server repeated ``weight`` times; the hash modulo that list picks one."""

    __slots__ = ("slots",)

    def __init__(self, servers: Sequence[Tuple[str, int]]) -> None:
        self.slots = [index for index, (_, weight) in enumerate(servers) for _ in range(weight)]

    def lookup(self, hash_value: int) -> int:
        return self.slots[hash_value % len(self.slots)]


class RandomContinuum(ModulaContinuum):
    """A random entry of the weighted list for every request, ignoring the hash."""

    __slots__ = ("_random",)

    def __init__(self, servers: Sequence[Tuple[str, int]], rng: Optional[random.Random] = None) -> None:
        super().__init__(servers)
        self._random = rng or random.Random()

    def lookup(self, hash_value: int) -> int:
        return self._random.choice(self.slots)


DISTRIBUTIONS = {
    "ketama": KetamaContinuum,
    "modula": ModulaContinuum,
    "random": RandomContinuum,
}


def build_continuum(distribution: str, servers: Sequence[Tuple[str, int]]) -> Continuum:
    """Build the continuum named ``distribution`` over ``servers`` (non-empty)."""
    return DISTRIBUTIONS[distribution](servers)


def ring_router(targets: Sequence[Any], continuum: Continuum, hash_key: Callable[[bytes], int],
                tag: Callable[[bytes], bytes], tagged: bool) -> Callable[[bytes], Any]:
    """key -> the one of ``targets`` (in the continuum's server order) that ``continuum`` places it on.

    The plain function a pool routes with: nutcracker's placement over any
    objects, the pool's live servers or (an adopted pool's) its groups.
    ``tagged``: a hash tag is configured (ketama skips ``tag`` without one).
    """
    if isinstance(continuum, KetamaContinuum) and continuum.points:
        # One target per ring point; the point past the last wraps to the first.
        by_point = [targets[index] for index in continuum.indices]
        by_point.append(by_point[0])
        points = continuum.points
        if not tagged:
            def ring_route(key: bytes) -> Any:
                return by_point[bisect_left(points, hash_key(key))]
        else:
            def ring_route(key: bytes) -> Any:
                return by_point[bisect_left(points, hash_key(tag(key)))]
        return ring_route
    lookup = continuum.lookup

    def looked_up(key: bytes) -> Any:
        return targets[lookup(hash_key(tag(key)))]

    return looked_up
