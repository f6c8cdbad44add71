"""The migration benchmark (issue 14, "Speed"): 2 -> 3 groups under a steady client load through the proxy.

    python bench/migration.py [--quick] [--keys N] [--trials SPEC,SPEC...] [--json PATH]

Each trial builds a fresh cluster on free 127.0.0.1 ports: three
redis-servers (one master per group), a file coordinator, a dashboard
started through its own command (bench/migration_dashboard.py, which may
set the mover's BATCH and SCAN_COUNT and profile it), one twinproxy cluster
proxy; slots 0-511 on group 1 and 512-1023 on group 2, group 3 empty.  It
writes N keys (``key:0`` .. ``key:N-1``, 100-byte values that do not
compress) straight to the master their slot says, pipelined, then starts
the client load (bench/migration_load.py: a few pipelined connections
doing GET/SET on random keys through the proxy, a closed loop bounded in
time and count) and measures a window before, the migration — the
dashboard's rebalance plan (slots 342-511 of group 1 and 853-1023 of group
2 to group 3), queued as two migrations that run side by side (they share
only their target, group 3) — and a window after.  Reported per trial:
keys/s and MiB/s moved (keys and values), time to finish, the client's
ops/s and p50/p99 latency before and during and their ratio, the CPU of
every process (the load generator's own share too), the source and target
Redis' command statistics during the move, and checks (every key where its
slot says, no GET of a loaded key that found nothing).

A trial SPEC is words joined by '-': ``p4`` (--parallel 4), ``b500``
(BATCH), ``s5000`` (SCAN_COUNT), ``r20000`` (--keys-per-second 20000),
``noload`` (no client load), ``avoid`` (the load touches no moving slot:
what the sweep alone costs the clients), ``nice``
(the dashboard at nice 10, as if on a host of its own), ``profile`` (cProfile of the
dashboard during the move: slower, reported apart).
Everything started is stopped at the end, on errors and Ctrl-C too.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from array import array
from bisect import bisect_left
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

import migration_report as report  # noqa: E402

from tests.cluster_harness import TOKEN, Dashboard  # noqa: E402
from tests.servers import LOOPBACK, Process, RedisServer, free_port, wait_until  # noqa: E402
from twinproxy.cluster.slots import SLOT_COUNT, slot_of  # noqa: E402

# bench/run.py's CPU reader; imported by name so that import sorting does not depend on whether a
# ``run/`` directory (the benchmarks' output) exists in the checkout.
cpu_seconds = importlib.import_module("run").cpu_seconds

BIN = Path(sys.executable).parent
VALUE_SIZE = 100
LOAD_CHUNK = 10_000
# The defaults (see --trials); the first is the mover as it ships, the one the summary explains.
TRIALS = ["p1", "p4", "p8", "p4-b500", "p8-b500-s5000", "p1-b20-s200", "p1-avoid", "p1-noload", "p1-noload-profile"]
QUICK_TRIALS = ["p1", "p1-noload"]


class Trial:
    """One configuration of the mover (and of the load) to measure."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.parallel: Optional[int] = None
        self.batch: Optional[int] = None
        self.scan_count: Optional[int] = None
        self.load = True
        self.avoid = False
        self.rate: Optional[int] = None
        self.profile = False
        self.nice = False
        for word in spec.split("-"):
            if word == "noload":
                self.load = False
            elif word == "nice":
                self.nice = True
            elif word == "profile":
                self.profile = True
            elif word == "avoid":
                self.avoid = True
            elif word[:1] in ("p", "b", "s", "r") and word[1:].isdigit() and int(word[1:]) > 0:
                name = {"p": "parallel", "b": "batch", "s": "scan_count", "r": "rate"}[word[0]]
                setattr(self, name, int(word[1:]))
            else:
                raise SystemExit(f"migration bench: trial '{spec}': unknown word '{word}' (p<N>, b<N>, s<N>, r<N>, "
                                 "noload, avoid, nice, profile)")

    def describe(self) -> str:
        return (f"parallel {self.parallel or 1}, batch {self.batch or 100}, scan {self.scan_count or 1000}"
                + (f", at most {self.rate:,} keys/s" if self.rate else "") + ("" if self.load else ", no load")
                + (", the load avoids the moving slots" if self.avoid else "")
                + (", the dashboard at nice 10" if self.nice else "")
                + (", profiled" if self.profile else ""))


# -- processes ---------------------------------------------------------------


class BenchDashboard(Dashboard):
    """The harness' dashboard, started through bench/migration_dashboard.py with the trial's settings."""

    def __init__(self, workdir: Path, coordinator: str, trial: Trial) -> None:
        super().__init__(workdir, coordinator, "bench")
        self.trial = trial
        self.profile_path = workdir / "dashboard.prof"

    def argv(self) -> List[str]:
        wrapper = [sys.executable, str(BENCH / "migration_dashboard.py")]
        if self.trial.batch:
            wrapper += ["--batch", str(self.trial.batch)]
        if self.trial.scan_count:
            wrapper += ["--scan-count", str(self.trial.scan_count)]
        if self.trial.profile:
            wrapper += ["--profile", str(self.profile_path)]
        # nice: as on a host of its own, the dashboard's CPU yields to the proxy's and the servers'.
        niced = ["nice", "-n", "10"] if self.trial.nice else []
        return [*niced, *wrapper, "--", *super().argv()[1:]]

    def api(self, method: str, path: str, body: Optional[Dict[str, Any]] = None, timeout: float = 60) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"http://{self.address}{path}", data=data, method=method,
                                         headers={"Authorization": f"Bearer {TOKEN}",
                                                  "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as err:
            raise RuntimeError(f"dashboard {method} {path}: {err.code} {err.read()[:300]!r}") from None


def start_proxy(workdir: Path, coordinator: str, binary: Path, started: List[Process]) -> Tuple[Process, int]:
    port = free_port()
    config = workdir / "pools.yml"
    config.write_text(f"bench:\n  listen: {LOOPBACK}:{port}\n  redis: true\n  timeout: 5000\n  preconnect: true\n"
                      f"  cluster: bench\n  coordinator: {coordinator}\n")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = Process([str(binary), "-c", str(config), "-s", str(free_port()), "-a", LOOPBACK, "-v", "4"],
                      workdir / "proxy.log", env=env)
    process.spawn()
    started.append(process)

    def serving() -> bool:   # listening is not enough: the topology must be loaded
        if not process.alive:
            raise AssertionError(f"the proxy exited:\n{process.output()}")
        with socket.create_connection((LOOPBACK, port), timeout=2) as sock:
            sock.sendall(b"GET key:0\r\n")   # answered by a group's master, not 'not ready'
            return sock.recv(200).startswith((b"$-1", b"$100"))

    wait_until(serving, timeout=60, what="the proxy to serve the cluster")
    return process, port


def redis_call(port: int, *args: str) -> bytes:
    """One command on a fresh connection; the raw reply (enough for INFO, DBSIZE, CONFIG)."""
    encoded = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args)
    with socket.create_connection((LOOPBACK, port), timeout=10) as sock:
        sock.sendall(encoded)
        data = sock.recv(1 << 20)
        if data.startswith(b"$"):
            header, _, body = data.partition(b"\r\n")
            while len(body) < int(header[1:]) + 2:
                body += sock.recv(1 << 20)
            return body[:int(header[1:])]
        return data.strip()


def info(port: int) -> Dict[str, str]:
    text = redis_call(port, "INFO", "everything").decode()
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#"))


def machine_busy() -> Tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far (/proc/stat)."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:9]]   # guest time is in user already
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / tick, sum(fields) / tick


# -- data --------------------------------------------------------------------


def keys_by_slot(count: int) -> List[List[bytes]]:
    slots: List[List[bytes]] = [[] for _ in range(SLOT_COUNT)]
    for number in range(count):
        key = b"key:%d" % number
        slots[slot_of(key)].append(key)
    return slots


def load_keys(port: int, keys: List[bytes], blob: bytes) -> None:
    """SET ``keys`` on the redis at ``port``: raw RESP, LOAD_CHUNK commands per round trip."""
    span = len(blob) - VALUE_SIZE
    with socket.create_connection((LOOPBACK, port), timeout=60) as sock:
        for start in range(0, len(keys), LOAD_CHUNK):
            chunk = keys[start:start + LOAD_CHUNK]
            sock.sendall(b"".join(
                b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
                % (len(key), key, VALUE_SIZE, blob[offset:offset + VALUE_SIZE])
                for key, offset in zip(chunk, ((start + i) * 7919 % span for i in range(len(chunk))))))
            expected, got = 5 * len(chunk), b""
            while len(got) < expected:
                data = sock.recv(1 << 20)
                if not data:
                    raise RuntimeError(f"redis on port {port} closed the connection while loading")
                got += data
            if got.count(b"+OK\r\n") != len(chunk):
                raise RuntimeError(f"redis on port {port} refused a SET while loading: {got[:200]!r}")


# -- one trial ---------------------------------------------------------------


class Samples:
    """CPU seconds of each process and of the machine at the phase boundaries."""

    def __init__(self, pids: Dict[str, int]) -> None:
        self.pids = pids
        self.marks: Dict[str, Tuple[float, Dict[str, float], Tuple[float, float]]] = {}

    def mark(self, name: str) -> float:
        now = time.monotonic()
        cpu = {who: cpu_seconds(pid) for who, pid in self.pids.items()}
        own = os.times()
        cpu["bench"] = own.user + own.system    # this process alone (cpu_seconds adds its children)
        self.marks[name] = (now, cpu, machine_busy())
        return now

    def shares(self, first: str, last: str) -> Dict[str, float]:
        """Each process' CPU over the phase, in % of one core; ``machine``: % of all cores busy."""
        (start, cpu_start, (busy0, total0)), (end, cpu_end, (busy1, total1)) = self.marks[first], self.marks[last]
        wall = max(end - start, 1e-9)
        found = {who: round(100 * (cpu_end[who] - cpu_start[who]) / wall, 1) for who in cpu_start}
        found["machine"] = round(100 * (busy1 - busy0) / max(total1 - total0, 1e-9), 1)
        # Whatever else ran meanwhile (another user's tests on a shared machine), in % of one core.
        found["others"] = round(max(0.0, 100 * (busy1 - busy0) / wall - sum(found[who] for who in cpu_start)), 1)
        return found


def window(ends: array, latencies: array, pipeline: int, start: float, end: float) -> Dict[str, float]:
    """Throughput and batch latency of the batches that ended in [start, end) (``ends`` is in time order)."""
    chosen = sorted(latencies[bisect_left(ends, start):bisect_left(ends, end)])
    if not chosen or end <= start:
        return {"ops": 0.0, "p50_ms": 0.0, "p99_ms": 0.0, "seconds": end - start}
    return {"ops": round(len(chosen) * pipeline / (end - start)), "seconds": round(end - start, 2),
            "p50_ms": round(chosen[len(chosen) // 2] * 1000, 2),
            "p99_ms": round(chosen[min(len(chosen) - 1, int(len(chosen) * 0.99))] * 1000, 2)}


def wait_for_quiet(patience: float) -> Optional[float]:
    """Wait up to ``patience`` s for a second in which the machine is under 10% busy; the last busy % seen
    when it never was (on a shared machine, someone else's work skews every number)."""
    deadline = time.monotonic() + patience
    while True:
        busy0, total0 = machine_busy()
        time.sleep(1.0)
        busy1, total1 = machine_busy()
        share = 100 * (busy1 - busy0) / max(total1 - total0, 1e-9)
        if share < 10:
            return None
        if time.monotonic() >= deadline:
            return round(share, 1)


def run_trial(trial: Trial, args: argparse.Namespace, slots: List[List[bytes]], blob: bytes,
              workdir: Path, started: List[Process]) -> Dict[str, Any]:
    print(f"\n== trial {trial.spec}: {trial.describe()}", flush=True)
    busy = wait_for_quiet(args.quiet_wait)
    if busy is not None:
        print(f"   warning: the machine was still {busy:g}% busy with other work after {args.quiet_wait:g} s: "
              "the numbers of this trial are skewed by it ('others' in the CPU lines)", flush=True)
    workdir.mkdir(parents=True)
    servers = []
    for gid in (1, 2, 3):
        servers.append(RedisServer(workdir / f"redis{gid}").start())
        started.append(servers[-1])
    coordinator = f"file://{workdir / 'coordinator'}"
    dashboard = BenchDashboard(workdir / "dashboard", coordinator, trial)
    started.append(dashboard)
    dashboard.start()
    for gid, server in zip((1, 2, 3), servers):
        dashboard.api("POST", "/api/groups", {"id": gid})
        dashboard.api("POST", f"/api/groups/{gid}/servers", {"addr": server.address})
    dashboard.api("POST", "/api/slots/assign", {"first": 0, "last": 511, "group": 1})
    dashboard.api("POST", "/api/slots/assign", {"first": 512, "last": 1023, "group": 2})
    proxy, proxy_port = start_proxy(workdir, coordinator, args.proxy_bin, started)

    began = time.monotonic()
    problems: List[BaseException] = []

    def loader(port: int, keys: List[bytes]) -> None:
        try:
            load_keys(port, keys, blob)
        except Exception as err:  # noqa: BLE001 - raised again in the main thread
            problems.append(err)

    loaders = [threading.Thread(target=loader, args=(servers[index].port, [k for s in owned for k in slots[s]]))
               for index, owned in enumerate((range(0, 512), range(512, 1024)))]
    for thread in loaders:
        thread.start()
    for thread in loaders:
        thread.join()
    if problems:
        raise problems[0]
    load_seconds = time.monotonic() - began
    loaded = [int(redis_call(s.port, "DBSIZE")[1:]) for s in servers]
    print(f"   loaded {sum(loaded):,} keys ({loaded[0]:,} + {loaded[1]:,}) in {load_seconds:.1f} s", flush=True)

    plan = dashboard.api("POST", "/api/slots/rebalance", {"dry_run": True})
    moves = split_by_owner(plan["moves"], dashboard.status())
    pids = {"proxy": proxy.proc.pid, "dashboard": dashboard.process.proc.pid,
            **{f"redis{gid}": s.proc.pid for gid, s in zip((1, 2, 3), servers)}}
    load: Optional[Process] = None
    out = workdir / "load"
    if trial.load:
        bound = args.warmup + args.before + args.migration_timeout + args.after + 60
        load = Process([args.load_python, str(BENCH / "migration_load.py"), "--port", str(proxy_port),
                        "--keys", str(args.keys), "--clients", str(args.clients), "--pipeline", str(args.pipeline),
                        "--get-ratio", str(args.get_ratio), "--seconds", str(bound), "--out", str(out),
                        "--avoid", ",".join(f"{m['first']}-{m['last']}" for m in moves) if trial.avoid else ""],
                       workdir / "load.log")
        load.spawn()
        started.append(load)
        pids["load"] = load.proc.pid
    samples = Samples(pids)
    try:
        wait_seconds(args.warmup if trial.load else 0.5, load)
        samples.mark("before")
        wait_seconds(args.before if trial.load else 0.5, load)
        for server in servers:
            redis_call(server.port, "CONFIG", "RESETSTAT")
        cpu_before = {gid: info(s.port) for gid, s in zip((1, 2, 3), servers)}
        if trial.profile:
            dashboard.process.proc.send_signal(signal.SIGUSR1)
        start = samples.mark("migration")
        migrations = [dashboard.api("POST", "/api/slots/migrate", {
            "first": run["first"], "last": run["last"], "group": run["group"],
            **({"parallel": trial.parallel} if trial.parallel else {}),
            **({"keys_per_second": trial.rate} if trial.rate else {})})["migration"]["id"] for run in moves]
        timeline = follow(dashboard, migrations, start, args.migration_timeout)
        end = samples.mark("migrated")
        if trial.profile:
            dashboard.process.proc.send_signal(signal.SIGUSR2)
        stats_after = {gid: info(s.port) for gid, s in zip((1, 2, 3), servers)}
        wait_seconds(args.after if trial.load else 0.2, load)
        samples.mark("after")
    finally:
        if load is not None and load.alive:   # SIGTERM: it finishes its batches and writes its results
            load.proc.terminate()
            load.proc.wait(60)
    result: Dict[str, Any] = {"trial": trial.spec, "settings": trial.describe(), "load_seconds": round(load_seconds, 1),
                              "keys": sum(loaded), "moves": moves, "timeline": timeline,
                              "seconds": round(end - start, 2)}
    final = [int(redis_call(s.port, "DBSIZE")[1:]) for s in servers]
    owners = owner_table(dashboard.status())
    expected = [sum(len(slots[s]) for s in range(SLOT_COUNT) if owners[s] == gid) for gid in (1, 2, 3)]
    result["checks"] = {"dbsize": final, "expected": expected, "placed_right": final == expected}
    moved = final[2]
    key_bytes = sum(len(k) for run in moves for s in range(run["first"], run["last"] + 1) for k in slots[s])
    result.update(moved=moved, keys_per_second=round(moved / max(end - start, 1e-9)),
                  mib_per_second=round((key_bytes + moved * VALUE_SIZE) / 2 ** 20 / max(end - start, 1e-9), 2))
    result["cpu"] = {"before": samples.shares("before", "migration"), "during": samples.shares("migration", "migrated"),
                     "after": samples.shares("migrated", "after")}
    result["redis"] = report.redis_usage(cpu_before, stats_after, end - start)
    if load is not None:
        if load.proc.returncode != 0:
            raise RuntimeError(f"the load generator failed (exit {load.proc.returncode}):\n{load.output()}")
        result["load"] = read_load(out, samples)
    if trial.profile and dashboard.profile_path.exists():
        result["profile"] = report.profile_top(dashboard.profile_path, args.profile_lines)
    report.print_trial(result)
    for process in reversed(started):
        process.stop()
    started.clear()
    return result


def wait_seconds(seconds: float, load: Optional[Process]) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if load is not None and not load.alive:
            raise RuntimeError(f"the load generator exited early:\n{load.output()}")
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


def follow(dashboard: BenchDashboard, ids: List[int], start: float, timeout: float) -> List[Dict[str, Any]]:
    """Poll the migrations every 0.1 s until all ended; per migration the time (from ``start``) of each state."""
    seen: Dict[int, Dict[str, Any]] = {mid: {"id": mid, "states": {}} for mid in ids}
    deadline = start + timeout
    while True:
        now = time.monotonic()
        listing = {m["id"]: m for m in dashboard.api("GET", "/api/migrations")["migrations"]}
        for mid in ids:
            m = listing[mid]
            seen[mid]["states"].setdefault(m["state"], round(now - start, 2))
            seen[mid].update(first=m["first"], last=m["last"], from_group=m["from_group"], to_group=m["to_group"],
                             keys_moved=m["keys_moved"], error=m.get("error"))
        states = [listing[mid]["state"] for mid in ids]
        if any(state in ("cancelled", "failed") for state in states):
            raise RuntimeError(f"a migration ended badly: {json.dumps(listing)[:500]}")
        if all(state == "finished" for state in states):
            return [seen[mid] for mid in ids]
        if now > deadline:
            raise RuntimeError(f"the migrations did not finish in {timeout:g} s: {json.dumps(listing)[:500]}")
        time.sleep(0.1)


def owner_table(status: Dict[str, Any]) -> List[Optional[int]]:
    owners: List[Optional[int]] = [None] * SLOT_COUNT
    for run in status["slots"]:
        for slot in range(run["first"], run["last"] + 1):
            owners[slot] = run["group"]
    return owners


def split_by_owner(moves: List[Dict[str, Any]], status: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The plan's runs cut where the current owner changes: a migration moves one group's slots."""
    owners = owner_table(status)
    found: List[Dict[str, Any]] = []
    for run in moves:
        for slot in range(run["first"], run["last"] + 1):
            if found and found[-1]["last"] == slot - 1 and found[-1]["group"] == run["group"] \
                    and found[-1]["from"] == owners[slot]:
                found[-1]["last"] = slot
            else:
                found.append({"first": slot, "last": slot, "group": run["group"], "from": owners[slot]})
    return found


def read_load(out: Path, samples: Samples) -> Dict[str, Any]:
    meta = json.loads(Path(str(out) + ".json").read_text())
    ends, latencies = array("d"), array("f")
    with open(str(out) + ".bin", "rb") as data:
        ends.fromfile(data, meta["batches"])
        latencies.fromfile(data, meta["batches"])
    marks = {name: mark[0] for name, mark in samples.marks.items()}
    phases = {"before": window(ends, latencies, meta["pipeline"], marks["before"], marks["migration"]),
              "during": window(ends, latencies, meta["pipeline"], marks["migration"], marks["migrated"]),
              "after": window(ends, latencies, meta["pipeline"], marks["migrated"], marks["after"])}
    before = phases["before"]["ops"]
    phases["ratio"] = round(phases["during"]["ops"] / before, 3) if before else 0.0
    phases.update(errors=meta["errors"], error_samples=meta["error_samples"], nil_gets=meta["nil_gets"],
                  requests=meta["requests"])
    return phases


# -- the run -----------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100k keys, one trial, short windows: under a minute")
    parser.add_argument("--keys", type=int, default=None, help="keys loaded (default 1,000,000; quick 100,000)")
    parser.add_argument("--trials", default=None,
                        help=f"comma-separated trial specs (default {','.join(TRIALS)}; "
                        f"quick {','.join(QUICK_TRIALS)})")
    parser.add_argument("--clients", type=int, default=16, help="load connections (default 16)")
    parser.add_argument("--pipeline", type=int, default=16, help="requests in flight per connection (default 16)")
    parser.add_argument("--get-ratio", type=float, default=0.5, help="share of GETs in the load (default 0.5)")
    parser.add_argument("--warmup", type=float, default=None, help="seconds of load before measuring (3; quick 2)")
    parser.add_argument("--before", type=float, default=None, help="seconds measured before (8; quick 3)")
    parser.add_argument("--after", type=float, default=None, help="seconds measured after (4; quick 2)")
    parser.add_argument("--migration-timeout", type=float, default=600.0)
    parser.add_argument("--quiet-wait", type=float, default=None,
                        help="seconds to wait for an idle machine before each trial (60; quick 10)")
    parser.add_argument("--proxy-bin", type=Path, default=BIN / "twinproxy", help="the twinproxy command to run")
    parser.add_argument("--load-python", default=shutil.which("pypy3") or sys.executable,
                        help="the interpreter of the load generator (default: pypy3 when installed, for a light "
                        "load; else this one)")
    parser.add_argument("--profile-lines", type=int, default=14)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs) instead of removing it")
    parser.add_argument("--json", default=str(REPO / "run" / "bench-migration.json"))
    args = parser.parse_args(argv)
    args.keys = args.keys or (100_000 if args.quick else 1_000_000)
    args.warmup = args.warmup if args.warmup is not None else (2.0 if args.quick else 3.0)
    args.before = args.before if args.before is not None else (3.0 if args.quick else 8.0)
    args.quiet_wait = args.quiet_wait if args.quiet_wait is not None else (10.0 if args.quick else 60.0)
    args.after = args.after if args.after is not None else (2.0 if args.quick else 4.0)
    specs = args.trials.split(",") if args.trials else (QUICK_TRIALS if args.quick else TRIALS)
    trials = [Trial(spec.strip()) for spec in specs if spec.strip()]

    print(f"migration bench: {args.keys:,} keys of {VALUE_SIZE} B, 2 -> 3 groups, load {args.clients} clients x "
          f"pipeline {args.pipeline}, {args.get_ratio:.0%} GET ({Path(args.load_python).name}), proxy "
          f"{args.proxy_bin}, {os.cpu_count()} CPUs", flush=True)
    began = time.monotonic()
    slots = keys_by_slot(args.keys)
    blob = os.urandom(3 * 2 ** 20).hex().encode()[:4 * 2 ** 20]   # values: slices of random text
    print(f"   {args.keys:,} keys placed in slots in {time.monotonic() - began:.1f} s", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="twinproxy-bench-migration-"))
    started: List[Process] = []
    results = []

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt()

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)   # also when started with SIGINT ignored (a background job)
    try:
        for index, trial in enumerate(trials):
            results.append(run_trial(trial, args, slots, blob, workdir / f"trial{index}", started))
    except KeyboardInterrupt:
        print("migration bench: interrupted; stopping everything", file=sys.stderr)
        return 130
    except (RuntimeError, AssertionError, OSError) as err:
        print(f"migration bench: {err} (run with --keep to keep the logs)", file=sys.stderr)
        return 1
    finally:
        for process in reversed(started):
            process.stop()
        if args.keep:
            print(f"migration bench: the logs are kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    summary = {"machine": os.uname().machine, "cpus": os.cpu_count(), "keys": args.keys, "value_size": VALUE_SIZE,
               "load": {"clients": args.clients, "pipeline": args.pipeline, "get_ratio": args.get_ratio,
                        "python": args.load_python}, "trials": results}
    report.print_summary(summary)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=1))
    print(f"\nresults written to {args.json}")
    failed = [r["trial"] for r in results if not r["checks"]["placed_right"] or r.get("load", {}).get("nil_gets")]
    if failed:
        print(f"migration bench: trials {', '.join(failed)} left keys misplaced or lost: see above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
