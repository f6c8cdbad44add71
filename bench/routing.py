"""CPU per route: a cluster pool's slot table against a nutcracker pool's ketama ring.

    python bench/routing.py [--keys N] [--rounds R]

Both routes are the functions a pool calls once per request
(``ServerPool.route``), built from real configs: ketama over two servers
with fnv1a_64 (C when twinproxy._speedups is built), and the 1024-slot table
of a two-group cluster.  Keys are distinct, so neither route's caches help
more than they would under real traffic; the best of R rounds is reported,
in nanoseconds per key, with the ratio slots / ketama.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from twinproxy.cluster.pools import cluster_pool  # noqa: E402
from twinproxy.config import load_text  # noqa: E402
from twinproxy.pool import ServerPool  # noqa: E402

KETAMA = """\
ring:
  listen: 127.0.0.1:1
  redis: true
  hash: fnv1a_64
  distribution: ketama
  servers:
   - 127.0.0.1:6379:1
   - 127.0.0.1:6380:1
"""
CLUSTER = """\
slots:
  listen: 127.0.0.1:2
  redis: true
  cluster: bench
  coordinator: file:///nowhere
"""


class _Clock:
    def seconds(self) -> float:
        return 0.0

    def callLater(self, *args, **kwargs):  # noqa: N802 - the reactor's name
        raise AssertionError("no timers in a route")


def routes() -> Dict[str, Callable[[bytes], object]]:
    (ring,) = load_text(KETAMA)
    (base,) = load_text(CLUSTER)
    groups = [SimpleNamespace(id=1, servers=("127.0.0.1:6379",)), SimpleNamespace(id=2, servers=("127.0.0.1:6380",))]
    topology = SimpleNamespace(cluster="bench", protocol="redis", generation=1, groups=groups, sentinels=(),
                               slots=tuple((1 if slot < 512 else 2, "stable") for slot in range(1024)))
    return {"ketama": ServerPool(ring, _Clock()).route,
            "slots": ServerPool(cluster_pool(base, topology), _Clock()).route}


def measure(route: Callable[[bytes], object], keys: List[bytes], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for key in keys:
            route(key)
        best = min(best, (time.process_time() - started) / len(keys))
    return best * 1e9


def main(argv=None) -> Dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    keys = [b"key:%d" % number for number in range(args.keys)]
    found = {name: measure(route, keys, args.rounds) for name, route in routes().items()}
    print(f"route CPU per key: ketama {found['ketama']:.0f} ns, slots {found['slots']:.0f} ns "
          f"(slots / ketama = {found['slots'] / found['ketama']:.2f})")
    return found


if __name__ == "__main__":
    main()
