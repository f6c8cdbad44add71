"""Side-by-side benchmark: direct backends, nutcracker, and twinproxy on each interpreter.

    python bench/run.py [--quick] [--rounds N] [--json PATH] [--workloads a,b]

Starts 2 redis-servers and 2 memcacheds on free loopback ports, the same two
pools in nutcracker (when installed) and in twinproxy (CPython from this
venv; PyPy from .venv-pypy when it exists) — ketama pools, and the same
backends as two cluster pools (``-slots``: two groups each, file
coordinator, two dashboards) — and drives every target with the
same load, interleaving rounds (A B C A B C ...) and reporting medians:
requests/s, the ratio to nutcracker, the proxy's CPU seconds per 100k
requests, its peak RSS, and p50/p99 latency where the load tool gives them;
then the CPU of one route in a cluster pool's slot table against a ketama
ring (bench/routing.py).
Load loops are bounded in count; everything binds to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.servers import LOOPBACK, MemcachedServer, Process, RedisServer, free_port, wait_until  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
BIN = Path(sys.executable).parent


# -- processes ---------------------------------------------------------------


def _tree(pid: int) -> List[int]:
    """``pid`` and its children (a --workers master and its workers)."""
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            pids += [int(child) for child in children.read().split()]
    except OSError:
        pass
    return pids


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for each in _tree(pid):
        with open(f"/proc/{each}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def peak_rss_mib(pid: int) -> float:
    total = 0.0
    for each in _tree(pid):
        with open(f"/proc/{each}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024
    return total


def pools_yaml(redis_port: int, memcache_port: int, redis_backends, caches) -> str:
    return (
        "bench_redis:\n"
        f"  listen: {LOOPBACK}:{redis_port}\n  redis: true\n  hash: fnv1a_64\n  distribution: ketama\n"
        "  timeout: 2000\n  preconnect: true\n  servers:\n"
        + "".join(f"   - {b.address}:1\n" for b in redis_backends)
        + "bench_memcache:\n"
        f"  listen: {LOOPBACK}:{memcache_port}\n  hash: fnv1a_64\n  distribution: ketama\n"
        "  timeout: 2000\n  preconnect: true\n  servers:\n"
        + "".join(f"   - {c.address}:1\n" for c in caches))


class Target:
    """One thing the load is pointed at: ports for each protocol, and a pid to measure (or none)."""

    def __init__(self, name: str, redis_port: int, memcache_port: int, process: Optional[Process] = None,
                 redis_ports: Optional[List[int]] = None, memcache_ports: Optional[List[int]] = None) -> None:
        self.name = name
        self.redis_port = redis_port
        self.memcache_port = memcache_port
        self.process = process
        # A direct target spreads its load over both backends itself.
        self.redis_ports = redis_ports or [redis_port]
        self.memcache_ports = memcache_ports or [memcache_port]

    @property
    def pid(self) -> Optional[int]:
        return self.process.proc.pid if self.process is not None else None


def start_proxy(name: str, argv: List[str], workdir: Path, redis_port: int, memcache_port: int) -> Target:
    process = Process(argv, workdir / f"{name}.log")
    process.spawn()

    def ready() -> bool:
        if not process.alive:
            raise AssertionError(f"{name} exited:\n{process.output()}")
        for port in (redis_port, memcache_port):
            socket.create_connection((LOOPBACK, port), timeout=1).close()
        return True

    wait_until(ready, timeout=60, what=f"{name} to listen")
    return Target(name, redis_port, memcache_port, process)


class BenchClusters:
    """A Redis and a memcached cluster over the benchmark's backends (file coordinator, two dashboards)."""

    def __init__(self, workdir: Path, redis_backends, caches, started: List[Process]) -> None:
        self.workdir = workdir
        self.url = f"file://{workdir / 'coordinator'}"
        self.token = workdir / "token"
        self.token.write_text("bench\n")
        self.dashboards = {}
        for cluster, protocol, servers in (("bench_redis", "redis", redis_backends),
                                           ("bench_memcache", "memcache", caches)):
            port = free_port()
            process = Process([str(BIN / "twinproxy-dashboard"), "--coordinator", self.url, "--cluster", cluster,
                               "--protocol", protocol, "--listen", f"{LOOPBACK}:{port}",
                               "--token-file", str(self.token)], workdir / f"dashboard-{cluster}.log")
            process.spawn()
            started.append(process)
            address = f"{LOOPBACK}:{port}"
            wait_until(lambda a=address: self._admin(a, "status").returncode == 0, timeout=30,
                       what=f"the {cluster} dashboard")
            for command in (("group", "add", "1"), ("server", "add", "1", servers[0].address),
                            ("group", "add", "2"), ("server", "add", "2", servers[1].address),
                            ("slots", "assign", "0-511", "1"), ("slots", "assign", "512-1023", "2")):
                done = self._admin(address, *command)
                if done.returncode != 0:
                    raise AssertionError(f"twinproxy-admin {' '.join(command)}: {done.stderr}")
        self.started = started

    def _admin(self, address: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "twinproxy-admin"), "--dashboard", address, "--token-file",
                               str(self.token), *args], capture_output=True, text=True, timeout=60)

    def proxy(self, name: str, binary: Path) -> Target:
        redis_port, memcache_port = free_port(), free_port()
        config = self.workdir / f"{name}.yml"
        config.write_text("".join(
            f"{cluster}:\n  listen: {LOOPBACK}:{port}\n  redis: {redis}\n  timeout: 2000\n  preconnect: true\n"
            f"  cluster: {cluster}\n  coordinator: {self.url}\n"
            for cluster, port, redis in (("bench_redis", redis_port, "true"),
                                         ("bench_memcache", memcache_port, "false"))))
        target = start_proxy(name, [str(binary), "-c", str(config), "-s", str(free_port()), "-a", LOOPBACK, "-v", "4"],
                             self.workdir, redis_port, memcache_port)
        self.started.append(target.process)

        def serving() -> bool:   # listening is not enough: the topology must be loaded
            with socket.create_connection((LOOPBACK, redis_port), timeout=2) as sock:
                sock.sendall(b"SET bench:ready 1\r\n")
                if not sock.recv(100).startswith(b"+OK"):
                    return False
            with socket.create_connection((LOOPBACK, memcache_port), timeout=2) as sock:
                sock.sendall(b"set bench:ready 0 0 1\r\n1\r\n")
                return sock.recv(100).startswith(b"STORED")

        wait_until(serving, timeout=30, what=f"{name} to serve its clusters")
        return target


# -- load --------------------------------------------------------------------


def redis_benchmark(port: int, requests: int, clients: int, pipeline: int, command: List[str]) -> Dict[str, float]:
    argv = ["redis-benchmark", "-h", LOOPBACK, "-p", str(port), "-n", str(requests), "-c", str(clients),
            "-P", str(pipeline), "-r", "10000", "-d", "100", "--csv", *command]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(result.stderr)
    lines = [line for line in result.stdout.splitlines() if line and not line.startswith('"test"')]
    fields = [f.strip('"') for f in lines[-1].split('","')]
    # "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms",...
    return {"rps": float(fields[1]), "p50_ms": float(fields[4]), "p99_ms": float(fields[6])}


def memcslap(port: int, requests: int, clients: int, kind: str) -> Dict[str, float]:
    """libmemcached's memcslap: ``clients`` threads, one request at a time each (no latency figures)."""
    per_thread = max(1, requests // clients)
    argv = ["memcslap", "-s", f"{LOOPBACK}:{port}", "-c", str(clients), "-t", kind, "-e", str(per_thread)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    for line in result.stdout.splitlines():
        words = line.split()
        # "Time to get  20000 keys by  50 threads:  0.365 seconds."
        if len(words) >= 8 and words[:3] == ["Time", "to", kind] and "threads:" in words:
            keys = int(words[3])
            seconds = float(words[words.index("threads:") + 1])
            return {"rps": keys / seconds}
    raise RuntimeError(f"memcslap gave no result: {result.stdout}{result.stderr}")


def memcache_load(ports: List[int], requests: int, clients: int, pipeline: int, kind: str) -> Dict[str, float]:
    """A bounded load of our own: ``clients`` sockets, ``pipeline`` requests in flight on each.

    One process and a selector: small enough to trust, the same for every
    target, and used where memcslap cannot go (pipelining, 10-key gets).
    """
    value = b"v" * 100
    keys = [b"bench:%d" % i for i in range(1000)]
    if kind == "set":
        one = [b"set %s 0 0 100\r\n%s\r\n" % (k, value) for k in keys]
        terminator = b"STORED\r\n"
    elif kind == "get":
        one = [b"get %s\r\n" % k for k in keys]
        terminator = b"END\r\n"
    else:  # get of 10 keys
        one = [b"get " + b" ".join(keys[(i + j * 97) % len(keys)] for j in range(10)) + b"\r\n"
               for i in range(len(keys))]
        terminator = b"END\r\n"
    if kind != "set":  # the keys must exist for gets to return values
        for port in ports:
            prime = socket.create_connection((LOOPBACK, port), timeout=10)
            prime.sendall(b"".join(b"set %s 0 0 100 noreply\r\n%s\r\n" % (k, value) for k in keys))
            prime.sendall(b"version\r\n")
            _read_until(prime, b"VERSION")
            prime.close()
    selector = selectors.DefaultSelector()
    per_client = max(1, requests // clients)
    states = []
    for index in range(clients):
        sock = socket.create_connection((LOOPBACK, ports[index % len(ports)]), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        state = {"sock": sock, "left": per_client, "waiting": 0, "buf": b"", "sent_at": [], "cursor": index * 7}
        states.append(state)
        selector.register(sock, selectors.EVENT_READ, state)
    latencies: List[float] = []
    started = time.perf_counter()

    def send_batch(state) -> None:
        count = min(pipeline, state["left"])
        if count <= 0:
            return
        cursor = state["cursor"]
        batch = b"".join(one[(cursor + i) % len(one)] for i in range(count))
        state["cursor"] = cursor + count
        state["left"] -= count
        state["waiting"] = count
        state["sent_at"] = time.perf_counter()
        state["sock"].sendall(batch)

    for state in states:
        send_batch(state)
    active = len(states)
    deadline = started + 300
    while active and time.perf_counter() < deadline:
        for key, _ in selector.select(timeout=5):
            state = key.data
            data = state["sock"].recv(1 << 20)
            if not data:
                raise RuntimeError("connection closed by the target")
            state["buf"] += data
            done = state["buf"].count(terminator)
            if done >= state["waiting"]:
                latencies.append(time.perf_counter() - state["sent_at"])
                state["buf"] = b""
                state["waiting"] = 0
                if state["left"] > 0:
                    send_batch(state)
                else:
                    selector.unregister(state["sock"])
                    state["sock"].close()
                    active -= 1
    elapsed = time.perf_counter() - started
    total = per_client * clients
    latencies.sort()
    # Latency of a batch: for -P 16, the time for all 16 replies, as redis-benchmark reports it.
    return {"rps": total / elapsed,
            "p50_ms": latencies[len(latencies) // 2] * 1000,
            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000}


def _read_until(sock: socket.socket, marker: bytes) -> None:
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return
        data += chunk


class Workload:
    def __init__(self, name: str, protocol: str, run: Callable[[Target, int], Dict[str, float]],
                 requests: int) -> None:
        self.name = name
        self.protocol = protocol
        self.run = run
        self.requests = requests


def workloads(quick: bool) -> List[Workload]:
    n = 10_000 if quick else 50_000
    mget = ["MGET"] + [f"key:__rand_int__{i}" for i in range(10)]
    return [
        Workload("redis SET -c 50", "redis",
                 lambda t, r: redis_benchmark(t.redis_port, r, 50, 1, ["-t", "set"]), n),
        Workload("redis GET -c 50", "redis",
                 lambda t, r: redis_benchmark(t.redis_port, r, 50, 1, ["-t", "get"]), n),
        Workload("redis SET -P 16", "redis",
                 lambda t, r: redis_benchmark(t.redis_port, r, 50, 16, ["-t", "set"]), n * 4),
        Workload("redis GET -P 16", "redis",
                 lambda t, r: redis_benchmark(t.redis_port, r, 50, 16, ["-t", "get"]), n * 4),
        Workload("redis MGET 10 keys", "redis",
                 lambda t, r: redis_benchmark(t.redis_port, r, 50, 1, mget), n // 2),
        Workload("memcache set -c 50", "memcache",
                 lambda t, r: memcslap(t.memcache_port, r, 50, "set"), n),
        Workload("memcache get -c 50", "memcache",
                 lambda t, r: memcslap(t.memcache_port, r, 50, "get"), n),
        Workload("memcache get -P 16", "memcache",
                 lambda t, r: memcache_load(t.memcache_ports, r, 50, 16, "get"), n * 4),
        Workload("memcache get 10 keys", "memcache",
                 lambda t, r: memcache_load(t.memcache_ports, r, 50, 1, "multiget"), n // 2),
    ]


# -- the run -----------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small loads, one round: under a minute")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per workload (default 5, quick 1)")
    parser.add_argument("--json", default=str(REPO / "run" / "bench.json"), help="where to write the results")
    parser.add_argument("--workloads", default="", help="comma-separated substrings of workload names to run")
    parser.add_argument("--no-pypy", action="store_true", help="skip twinproxy on PyPy even if .venv-pypy exists")
    parser.add_argument("--workers", type=int, default=None,
                        help="also run each interpreter with this many --workers (default 2; quick: 1, i.e. don't)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 5)
    if args.workers is None:
        args.workers = 1 if args.quick else 2

    workdir = Path(tempfile.mkdtemp(prefix="twinproxy-bench-"))
    started: List[Process] = []
    try:
        redis_backends = [RedisServer(workdir / f"redis{i}").start() for i in range(2)]
        caches = [MemcachedServer(workdir / f"memcached{i}", memory_mb=256).start() for i in range(2)]
        started += [*redis_backends, *caches]
        targets = [Target("direct", redis_backends[0].port, caches[0].port,
                          redis_ports=[b.port for b in redis_backends], memcache_ports=[c.port for c in caches])]

        def proxy(name: str, argv_for: Callable[[Path, int], List[str]]) -> None:
            redis_port, memcache_port = free_port(), free_port()
            config = workdir / f"{name}.yml"
            config.write_text(pools_yaml(redis_port, memcache_port, redis_backends, caches))
            target = start_proxy(name, argv_for(config, free_port()), workdir, redis_port, memcache_port)
            started.append(target.process)
            targets.append(target)

        if shutil.which("nutcracker"):
            proxy("nutcracker", lambda conf, stats: ["nutcracker", "-c", str(conf), "-s", str(stats),
                                                     "-a", LOOPBACK, "-o", str(workdir / "nutcracker.out")])
        else:
            print("nutcracker is not installed (apt-get install nutcracker): no ratios", file=sys.stderr)
        interpreters = [("twinproxy-cpython", Path(sys.executable).parent / "twinproxy")]
        pypy = REPO / ".venv-pypy" / "bin" / "twinproxy"
        if pypy.exists() and not args.no_pypy:
            interpreters.append(("twinproxy-pypy", pypy))
        for name, binary in interpreters:
            proxy(name, lambda conf, stats, b=binary: [str(b), "-c", str(conf), "-s", str(stats), "-a", LOOPBACK,
                                                       "-v", "4"])
        # The same backends as a cluster: slots 0-511 on the first of each, 512-1023 on the second.
        clusters = BenchClusters(workdir, redis_backends, caches, started)
        for name, binary in interpreters:
            targets.append(clusters.proxy(f"{name}-slots", binary))
        if args.workers > 1:
            for name, binary in interpreters:
                proxy(f"{name}-{args.workers}w",
                      lambda conf, stats, b=binary: [str(b), "-c", str(conf), "-s", str(stats), "-a", LOOPBACK,
                                                     "-v", "4", "--workers", str(args.workers)])

        chosen = [w for w in workloads(args.quick)
                  if not args.workloads or any(part in w.name for part in args.workloads.split(","))]
        results: Dict[str, Dict[str, List[Dict[str, float]]]] = {}
        for workload in chosen:
            # Warm every target before anything is measured: PyPy's JIT needs
            # tens of thousands of requests down each path before it settles.
            for target in targets:
                workload.run(target, max(5000, workload.requests // 2))
            for _ in range(rounds):
                for target in targets:
                    before = cpu_seconds(target.pid) if target.pid else 0.0
                    outcome = workload.run(target, workload.requests)
                    if target.pid:
                        outcome["cpu_per_100k"] = (cpu_seconds(target.pid) - before) / workload.requests * 100_000
                    results.setdefault(workload.name, {}).setdefault(target.name, []).append(outcome)
                    print(f"  {workload.name:<22} {target.name:<18} {outcome['rps']:>10,.0f} req/s", flush=True)
        report = summarize(results, targets)
        print_table(report, targets)
        # A cluster pool routes by slot table, a nutcracker pool by ring: CPU per route, side by side.
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import routing

        report["route_ns_per_key"] = routing.main(["--rounds", "3" if args.quick else "5"])
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"\nresults written to {args.json}")
    finally:
        for process in started:
            process.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def summarize(results, targets) -> Dict[str, object]:
    report: Dict[str, object] = {"machine": os.uname().machine, "cpus": os.cpu_count(), "workloads": {},
                                 "peak_rss_mib": {t.name: round(peak_rss_mib(t.pid), 1) for t in targets if t.pid}}
    for workload, by_target in results.items():
        rows = {}
        for target, outcomes in by_target.items():
            row = {key: statistics.median(o[key] for o in outcomes) for key in outcomes[0]}
            rows[target] = {key: round(value, 3) for key, value in row.items()}
        nutcracker = rows.get("nutcracker", {}).get("rps")
        for target, row in rows.items():
            if nutcracker and target.startswith("twinproxy"):
                row["ratio"] = round(row["rps"] / nutcracker, 2)
        report["workloads"][workload] = rows
    return report


def _cell_rps(row: Dict[str, float]) -> str:
    text = f"{row['rps']:,.0f}"
    if "ratio" in row:
        text += f" ({row['ratio']:.2f}x)"
    return text


def _cell_latency(row: Dict[str, float]) -> str:
    if "p50_ms" not in row:
        return "-"
    return f"{row['p50_ms']:.2f}/{row['p99_ms']:.2f}"


def _cell_cpu(row: Dict[str, float]) -> str:
    return f"{row['cpu_per_100k']:.2f}" if "cpu_per_100k" in row else "-"


def print_table(report, targets) -> None:
    names = [t.name for t in targets]
    width = max(23, *(len(name) + 2 for name in names))
    for title, cell in (("requests/s (ratio to nutcracker)", _cell_rps), ("latency p50/p99 ms", _cell_latency),
                        ("proxy CPU s per 100k requests", _cell_cpu)):
        print()
        header = f"{title:<34}" + "".join(f"{name:>{width}}" for name in names)
        print(header)
        print("-" * len(header))
        for workload, rows in report["workloads"].items():
            line = f"{workload:<34}"
            for name in names:
                row = rows.get(name)
                line += f"{(cell(row) if row else '-'):>{width}}"
            print(line)
    print()
    print("peak RSS MiB: " + ", ".join(f"{k} {v}" for k, v in report["peak_rss_mib"].items()))


if __name__ == "__main__":
    raise SystemExit(main())
