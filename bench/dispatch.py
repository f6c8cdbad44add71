"""CPU per request through the frontend and a backend connection, over in-memory transports.

    python bench/dispatch.py [--requests N] [--rounds R] [--pipeline P]

The whole per-request path of a Redis pool in one process, with no sockets
and no reactor: a client's bytes go into ``FrontendProtocol.dataReceived``
(parse, ``codec.prepare``, route, ``ServerLink.send``), the backend's
replies into ``BackendConnection.dataReceived`` (frame, complete, flush in
order), on ``StringTransport``s and a ``MemoryReactorClock``.  Workloads:
GET and SET of one key, and an MGET of 4 keys split over 2 servers, in
pipelines of P requests.  The best of R rounds (CPU time of this process,
so other load on the machine matters less) is reported in nanoseconds
per request, so a change to the hot path shows as a difference in ns
(compare two trees with ``TWINPROXY_TREE=/path/to/other/checkout``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

REPO = Path(os.environ.get("TWINPROXY_TREE") or Path(__file__).resolve().parent.parent)
sys.path.insert(0, str(REPO))

from twisted.internet.testing import MemoryReactorClock, StringTransport  # noqa: E402

from twinproxy.config import load_text  # noqa: E402
from twinproxy.protocols.resp import encode_command  # noqa: E402
from twinproxy.runtime import PoolRuntime  # noqa: E402

POOL = """\
bench:
  listen: 127.0.0.1:1
  redis: true
  hash: fnv1a_64
  timeout: 1000
  servers:
   - 10.0.0.1:6379:1 a
   - 10.0.0.2:6379:1 b
"""


class _Wire(StringTransport):
    """A transport that forgets what it is written (the benchmark reads nothing back)."""

    def write(self, data: bytes) -> None:
        pass

    def writeSequence(self, data: List[bytes]) -> None:  # noqa: N802 - Twisted's name
        pass


class Bench:
    """One pool, one client, both backends connected."""

    def __init__(self) -> None:
        (config,) = load_text(POOL)
        self.reactor = MemoryReactorClock()
        self.runtime = PoolRuntime(config, self.reactor, outbox=None)
        self.pool = self.runtime.pool
        self.client = self.runtime.factory.buildProtocol(None)
        self.client.makeConnection(_Wire())
        self.backends: Dict[str, object] = {}

    def key_on(self, name: str, prefix: bytes) -> bytes:
        keys = (prefix + b"%d" % i for i in range(10000))
        return next(key for key in keys if self.pool.server_for_key(key).name == name)

    def connect(self) -> None:
        while self.reactor.tcpClients:
            host, _, factory, _, _ = self.reactor.tcpClients.pop(0)
            protocol = factory.buildProtocol(None)
            protocol.makeConnection(_Wire())
            self.backends["a" if host == "10.0.0.1" else "b"] = protocol


def workloads(bench: Bench, pipeline: int) -> Dict[str, Callable[[], None]]:
    ka, kb = bench.key_on("a", b"k"), bench.key_on("a", b"j")
    kc, kd = bench.key_on("b", b"k"), bench.key_on("b", b"j")
    client = bench.client
    get = encode_command([b"GET", ka]) * pipeline
    get_replies = b"$3\r\nabc\r\n" * pipeline
    set_ = encode_command([b"SET", ka, b"abc"]) * pipeline
    set_replies = b"+OK\r\n" * pipeline
    mget = encode_command([b"MGET", ka, kc, kb, kd]) * pipeline
    mget_replies = b"*2\r\n$1\r\nx\r\n$1\r\ny\r\n" * pipeline
    # Open both servers' connections before timing anything.
    client.dataReceived(encode_command([b"MGET", ka, kc]))
    bench.connect()
    a, b = bench.backends["a"], bench.backends["b"]
    a.dataReceived(b"*1\r\n$1\r\nx\r\n")
    b.dataReceived(b"*1\r\n$1\r\ny\r\n")

    def run_get() -> None:
        client.dataReceived(get)
        a.dataReceived(get_replies)

    def run_set() -> None:
        client.dataReceived(set_)
        a.dataReceived(set_replies)

    def run_mget() -> None:
        client.dataReceived(mget)
        a.dataReceived(mget_replies)
        b.dataReceived(mget_replies)

    return {"get": run_get, "set": run_set, "mget4": run_mget}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000, help="requests per workload and round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--pipeline", type=int, default=1, help="requests per client read")
    options = parser.parse_args()
    bench = Bench()
    runs = workloads(bench, options.pipeline)
    batches = max(1, options.requests // options.pipeline)
    best: Dict[str, float] = {name: float("inf") for name in runs}
    for _ in range(options.rounds):
        for name, run in runs.items():   # interleaved, so drift hits every workload alike
            started = time.process_time()
            for _ in range(batches):
                run()
            best[name] = min(best[name], (time.process_time() - started) / (batches * options.pipeline))
            if bench.client._in_order:
                raise SystemExit(f"{name}: requests left unanswered; the benchmark is broken")
    print(f"tree {REPO} pipeline {options.pipeline}: " +
          "  ".join(f"{name} {seconds * 1e9:.0f} ns" for name, seconds in best.items()))


if __name__ == "__main__":
    main()
