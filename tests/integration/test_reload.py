"""Hot reload of ``twistd -n twinproxy`` (SIGHUP and ``POST /reload``), through real processes.

Under load on both protocols no surviving pool drops a request or a
connection; placement after a reload is nutcracker's for the new file; a bad
file changes nothing; SIGHUP also reopens the ``-o`` log (logrotate); and
redis-benchmark runs clean across reloads.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import List, Sequence, Tuple

import pytest

from tests.proxy_clients import (
    http,
    memcache_client,
    metric,
    read_bound,
    read_stats,
    redis_client,
    wait_for_generation,
    write_atomically,
)
from tests.reload_layouts import Layout, PoolLayout, Server, apply_steps, full_steps, initial_layout
from tests.reload_load import ReloadDriver, load_through_reloads
from tests.servers import LOOPBACK, require, wait_until
from twinproxy.config import load_file

TABLES = Path(__file__).resolve().parent.parent / "data" / "placement"


@pytest.fixture
def sock_dir():
    """A short directory for unix sockets (tmp_path can exceed the 107-byte socket path limit)."""
    path = tempfile.mkdtemp(prefix="tpr-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start_proxy(twistd, tmp_path: Path, text: str, *extra: str):
    """``twistd -n twinproxy`` on ``text`` with a bound-addresses file; (process, config, bound path)."""
    config = tmp_path / "pools.yml"
    write_atomically(config, text)
    bound = tmp_path / "bound.json"
    process = twistd(config, "--bound-addresses", str(bound), "--stats-addr", LOOPBACK, *extra)
    wait_for_generation(bound, 1, process, timeout=30)
    return process, config, bound


def full_log(process) -> str:
    return process.log.read_text(errors="replace")


# -- 1. load under twenty reloads ------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_twenty_reloads_under_load_drop_nothing_and_place_every_write(redis_servers, memcached_servers, twistd,
                                                                      tmp_path, sock_dir) -> None:
    """Twenty SIGHUPs, each a different kind of change, under 4 redis-py and 4 pymemcache clients: no
    error, no reconnect, no wrong or misordered reply, and every write where its generation put it."""
    backends, caches = redis_servers(4), memcached_servers(4)
    layout = initial_layout()
    layouts = apply_steps(layout, full_steps(sock_dir))
    assert len(layouts) == 20
    text = layout.render([b.address for b in backends], [c.address for c in caches])
    process, config, bound_path = start_proxy(twistd, tmp_path, text, "--http-port", "0")
    driver = ReloadDriver(process, config, bound_path, backends, caches, layout)
    started = time.monotonic()
    summary = load_through_reloads(driver, layouts, backends, caches)
    print(f"\n20 reloads under load in {time.monotonic() - started:.1f}s: {summary}")
    stats = read_stats(driver.bound["stats"])
    assert (stats["reloads"], stats["reload_failures"], stats["config_generation"]) == (20, 0, 21)
    for pool in ("rpool", "mpool"):
        assert (stats[pool]["client_err"], stats[pool]["forward_error"]) == (0, 0), stats[pool]
    status, page = http(driver.bound["http"], "/metrics")
    assert status == 200
    assert metric(page, "twinproxy_reloads_total") == 20
    assert metric(page, "twinproxy_reload_failures_total") == 0
    assert metric(page, "twinproxy_config_generation") == 21
    assert "Traceback" not in full_log(process)


# -- 2. placement after a reload is nutcracker's ------------------------------------


def table_pool(table: str, pool: str, redis_protocol: bool, addresses: Sequence[str]) -> Tuple[str, List[dict]]:
    """A golden table's pool on real backends, and its rows.

    The tables were measured with unnamed servers on 127.0.0.1:74xx, so
    ketama hashed those ``host:port`` names; here every server is named
    explicitly with the table's ketama name, at a real backend's address,
    with the table's weight (modula uses neither names nor addresses).
    """
    (config,) = load_file(str(TABLES / f"{table}.yml"))
    lines = [f"{pool}:", f"  listen: {LOOPBACK}:0", f"  redis: {'true' if redis_protocol else 'false'}",
             f"  hash: {config.hash}", f"  distribution: {config.distribution}", "  timeout: 5000"]
    if config.hash_tag:
        lines.append(f'  hash_tag: "{config.hash_tag}"')
    lines.append("  servers:")
    for index, spec in enumerate(config.servers):
        lines.append(f"   - {addresses[index]}:{spec.weight} {spec.name}")
    with open(TABLES / f"{table}.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 300
    return "\n".join(lines) + "\n", rows


# (Redis pool's table, memcached pool's table) per generation: servers added
# and removed, re-weighted, renamed, re-hashed, hash tags, modula and back.
PLACEMENT_STAGES = [
    ("ketama_fnv1a_64_3eq", "ketama_md5_3eq"),
    ("ketama_fnv1a_64_4weighted", "memcache_ketama_fnv1a_64"),
    ("ketama_md5_names_weighted", "ketama_fnv1a_64_names"),
    ("modula_crc32_weighted", "ketama_murmur_hashtag_dollar"),
    ("ketama_murmur_hashtag_dollar", "modula_md5_weighted"),
    ("ketama_fnv1a_64_hashtag", "ketama_crc16_3eq"),
]


def misplaced(rows: List[dict], backends, value_of, where) -> List[str]:
    """Keys not on exactly their table's server (by index), found by their value on every backend."""
    holders = where(backends, [row["key"] for row in rows])
    wrong = []
    for row in rows:
        key, expected = row["key"], int(row["server_index"])
        on = [index for index, values in enumerate(holders) if values.get(key) == value_of(key)]
        if on != [expected]:
            wrong.append(f"{key}: on {on}, nutcracker: {expected}")
    return wrong


def redis_holders(backends, keys) -> List[dict]:
    found = []
    for backend in backends:
        client = backend.client()
        found.append(dict(zip(keys, client.mget(keys))))
        client.close()
    return found


def memcache_holders(backends, keys) -> List[dict]:
    found = []
    for backend in backends:
        client = backend.client()
        found.append(client.get_many(keys))
        client.close()
    return found


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_placement_after_each_reload_is_nutcrackers(redis_servers, memcached_servers, twistd, tmp_path) -> None:
    """After each reload from one golden table's pool to another's (both protocols), every key
    written through the proxy lands on the server nutcracker 0.5.0 chose for that table."""
    backends, caches = redis_servers(4), memcached_servers(4)
    redis_addresses, cache_addresses = [b.address for b in backends], [c.address for c in caches]

    def stage_text(stage: int):
        redis_table, cache_table = PLACEMENT_STAGES[stage]
        redis_text, redis_rows = table_pool(redis_table, "tables", True, redis_addresses)
        cache_text, cache_rows = table_pool(cache_table, "cachetables", False, cache_addresses)
        return redis_text + cache_text, redis_rows, cache_rows

    text, _, _ = stage_text(0)
    process, config, bound_path = start_proxy(twistd, tmp_path, text)
    failures = []
    for stage in range(len(PLACEMENT_STAGES)):
        text, redis_rows, cache_rows = stage_text(stage)
        if stage:
            write_atomically(config, text)
            process.proc.send_signal(signal.SIGHUP)
        bound = wait_for_generation(bound_path, stage + 1, process)
        assert bound["generation"] == stage + 1
        client = redis_client(bound["pools"]["tables"])
        pipe = client.pipeline(transaction=False)
        for row in redis_rows:
            pipe.set(row["key"], f"g{stage}:{row['key']}")
        assert pipe.execute() == [True] * len(redis_rows)
        client.close()
        cache = memcache_client(bound["pools"]["cachetables"])
        assert cache.set_many({row["key"]: f"g{stage}:{row['key']}".encode() for row in cache_rows}) == []
        cache.close()

        def value_of(key: str, stage: int = stage) -> bytes:
            return f"g{stage}:{key}".encode()

        for table, wrong in ((PLACEMENT_STAGES[stage][0], misplaced(redis_rows, backends, value_of, redis_holders)),
                             (PLACEMENT_STAGES[stage][1], misplaced(cache_rows, caches, value_of, memcache_holders))):
            if wrong:
                failures.append(f"generation {stage + 1}, {table}: {len(wrong)} keys misplaced, e.g. {wrong[:5]}")
    assert failures == []


# -- 4. a bad file changes nothing ------------------------------------------------------


def two_server_file(backends, listen: str = f"{LOOPBACK}:0", **keys: str) -> str:
    lines = ["alpha:", f"  listen: {listen}", "  redis: true", "  timeout: 5000"]
    lines += [f"  {key}: {value}" for key, value in keys.items()]
    lines.append("  servers:")
    lines += [f"   - {backend.address}:1" for backend in backends]
    return "\n".join(lines) + "\n"


def assert_served_by(address: str, text: str, backends, token: str) -> None:
    """Keys written through ``address`` are where the pool of ``text`` puts them."""
    from twisted.internet.task import Clock

    from twinproxy.config import load_text
    from twinproxy.pool import ServerPool

    (config,) = load_text(text)
    pool = ServerPool(config, Clock())
    by_address = {backend.address: backend for backend in backends}
    client = redis_client(address)
    try:
        for number in range(40):
            key = f"{token}:{number}"
            assert client.set(key, token) is True
            owner = by_address[pool.server_for_key(key.encode()).spec.address]
            assert owner.client().get(key) == token.encode(), f"{key} is not on {owner.address}"
    finally:
        client.close()


@pytest.mark.timeout(60)
def test_a_bad_file_on_sighup_changes_nothing_and_is_logged_and_counted(redis_servers, twistd, tmp_path) -> None:
    """SIGHUP with a file that does not validate: the old topology still serves, one log line names
    the file and the error, reload_failures is 1, the generation stays 1."""
    backends = redis_servers(3)
    good = two_server_file(backends[:2])
    process, config, bound_path = start_proxy(twistd, tmp_path, good)
    bound = read_bound(bound_path)
    address = bound["pools"]["alpha"]
    client = redis_client(address)
    assert client.set("before", "1") is True
    write_atomically(config, two_server_file(backends, distribution="nope"))
    process.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: read_stats(bound["stats"])["reload_failures"] == 1, timeout=20,
               what=f"reload_failures to be 1:\n{process.output()}")
    lines = [line for line in full_log(process).splitlines() if f"reload of {config} failed" in line]
    assert len(lines) == 1, full_log(process)
    assert "key 'distribution': value 'nope'" in lines[0]
    stats = read_stats(bound["stats"])
    assert (stats["reloads"], stats["config_generation"]) == (0, 1)
    assert read_bound(bound_path) == bound
    assert client.get("before") == b"1"  # the client's connection is untouched
    assert_served_by(address, good, backends, "after-bad")
    assert client.connection_pool.connection_class.connects == 1
    client.close()
    assert "Traceback" not in full_log(process)


@pytest.mark.timeout(60)
def test_post_reload_answers_400_for_a_bad_file_500_for_an_unappliable_one_200_with_changes(
        redis_servers, twistd, tmp_path) -> None:
    """POST /reload: 400 naming file, pool, key and value for a bad file; 500 when a new listen
    address is taken (nothing changes, not even the other pool); 200 with the changes, and [] for
    a reload that changes nothing; counters on the stats port and /metrics."""
    backends = redis_servers(3)
    good = two_server_file(backends[:2])
    process, config, bound_path = start_proxy(twistd, tmp_path, good, "--http-port", "0")
    bound = read_bound(bound_path)
    admin, address = bound["http"], bound["pools"]["alpha"]
    client = redis_client(address)
    assert client.set("k", "v") is True

    write_atomically(config, two_server_file(backends, hash="nope"))
    status, body = http(admin, "/reload", "POST")
    assert status == 400, body
    answer = json.loads(body)
    assert answer["ok"] is False
    for part in (str(config), "pool 'alpha'", "key 'hash'", "value 'nope'"):
        assert part in answer["error"], answer
    assert read_stats(bound["stats"])["reload_failures"] == 1

    # A second pool on a port someone holds, and a changed hash in alpha: neither may happen.
    with socket.socket() as holder:
        holder.bind((LOOPBACK, 0))
        holder.listen(1)
        taken = holder.getsockname()[1]
        unappliable = two_server_file(backends, hash="murmur") + two_server_file(
            backends[2:], listen=f"{LOOPBACK}:{taken}").replace("alpha:", "beta:")
        write_atomically(config, unappliable)
        status, body = http(admin, "/reload", "POST")
        assert status == 500, body
        answer = json.loads(body)
        assert answer["ok"] is False and answer["error"], answer
    stats = read_stats(bound["stats"])
    assert (stats["reloads"], stats["reload_failures"], stats["config_generation"]) == (0, 2, 1)
    assert set(stats) >= {"alpha"} and "beta" not in stats
    assert read_bound(bound_path) == bound
    assert_served_by(address, good, backends, "after-500")

    changed = two_server_file(backends, hash="murmur")
    write_atomically(config, changed)
    status, body = http(admin, "/reload", "POST")
    assert status == 200, body
    answer = json.loads(body)
    assert answer["ok"] is True and answer["generation"] == 2, answer
    assert answer["changes"] and all(isinstance(change, str) and change for change in answer["changes"]), answer
    assert wait_for_generation(bound_path, 2, process)["pools"]["alpha"] == address
    assert_served_by(address, changed, backends, "after-200")

    status, body = http(admin, "/reload", "POST")
    assert status == 200, body
    assert json.loads(body) == {"ok": True, "generation": 3, "changes": []}
    assert wait_for_generation(bound_path, 3, process)["generation"] == 3

    stats = read_stats(bound["stats"])
    assert (stats["reloads"], stats["reload_failures"], stats["config_generation"]) == (2, 2, 3)
    status, page = http(admin, "/metrics")
    assert status == 200
    assert (metric(page, "twinproxy_reloads_total"), metric(page, "twinproxy_reload_failures_total"),
            metric(page, "twinproxy_config_generation")) == (2, 2, 3)
    assert client.get("k") in (b"v", None)  # re-hashed: maybe on another server now
    assert client.connection_pool.connection_class.connects == 1
    client.close()


# -- 5. logrotate ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_sighup_reopens_the_log_file_for_logrotate(redis_servers, twistd, tmp_path) -> None:
    """Move the -o log away and SIGHUP: a new file at the same path gets the reload's lines (and a
    failed reload's), the moved one gets nothing more."""
    backends = redis_servers(2)
    log = tmp_path / "twinproxy.log"
    process, config, bound_path = start_proxy(twistd, tmp_path, two_server_file(backends[:1]), "-o", str(log))
    wait_until(lambda: log.exists() and log.stat().st_size > 0, timeout=10, what="the -o log to be written")
    rotated = tmp_path / "twinproxy.log.1"
    os.rename(log, rotated)
    rotated_size = rotated.stat().st_size
    write_atomically(config, two_server_file(backends))
    process.proc.send_signal(signal.SIGHUP)
    wait_for_generation(bound_path, 2, process)
    wait_until(lambda: log.exists() and log.stat().st_size > 0, timeout=10,
               what=f"a new {log} with lines in it:\n{process.output()}")
    write_atomically(config, two_server_file(backends, hash="nope"))
    process.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: f"reload of {config} failed" in log.read_text(), timeout=10,
               what=f"the failed reload's line in the new log:\n{log.read_text()}")
    assert "reload" in log.read_text().split(f"reload of {config} failed")[0].lower(), \
        f"the applied reload is not in the new log:\n{log.read_text()}"
    assert rotated.stat().st_size == rotated_size, "the rotated log was written after SIGHUP"
    assert read_stats(read_bound(bound_path)["stats"])["reload_failures"] == 1


# -- 6. redis-benchmark across reloads ----------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_redis_benchmark_runs_clean_across_reloads(redis_servers, twistd, tmp_path) -> None:
    """redis-benchmark (20 clients, SET and GET over random keys) while four SIGHUPs change the
    servers, weights and hash: it reports no error and exits 0, and every change is applied."""
    require("redis-benchmark")
    backends = redis_servers(4)
    addresses = [b.address for b in backends]
    layout = Layout({"alpha": PoolLayout(f"{LOOPBACK}:0", True, [Server(0), Server(1)], {"timeout": "5000"})})
    process, config, bound_path = start_proxy(twistd, tmp_path, layout.render(addresses, []))
    driver = ReloadDriver(process, config, bound_path, backends, [], layout)
    host, port = driver.bound["pools"]["alpha"].rsplit(":", 1)
    output = tmp_path / "redis-benchmark.out"
    with open(output, "wb") as out:
        bench = subprocess.Popen(["redis-benchmark", "-h", host, "-p", port, "-n", "100000", "-c", "20",
                                  "-r", "100000", "-t", "set,get", "-q"], stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: bench.poll() is not None or read_stats(driver.bound["stats"])["alpha"]
                   ["client_connections"] >= 20, timeout=20, what="redis-benchmark to connect")

        steps = [
            ("add two servers", [Server(0), Server(1), Server(2), Server(3)], {}),
            ("re-weight", [Server(0, 3), Server(1), Server(2, 2), Server(3)], {}),
            ("murmur", [Server(0, 3), Server(1), Server(2, 2), Server(3)], {"hash": "murmur"}),
            ("remove a server", [Server(0, 3), Server(2, 2), Server(3)], {"hash": "murmur"}),
        ]
        for number, (description, servers, keys) in enumerate(steps):
            if number == 2:  # the other half during the GET test
                wait_until(lambda: bench.poll() is not None or "GET" in output.read_text(errors="replace"),
                           timeout=60, what="redis-benchmark to start its GET test")
            assert bench.poll() is None, f"redis-benchmark ended before the reload '{description}'"
            new = driver.layout.copy()
            new.pools["alpha"].servers = servers
            new.pools["alpha"].keys.update(keys)
            driver.reload(new)
        still_running = bench.poll() is None
        bench.wait(90)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait(5)
    text = output.read_text(errors="replace")
    assert still_running, f"redis-benchmark finished before the last reload:\n{text}"
    assert bench.returncode == 0, text
    assert "error" not in text.lower(), text
    assert "SET:" in text and "GET:" in text, text
    stats = read_stats(driver.bound["stats"])
    assert (stats["reloads"], stats["reload_failures"], stats["config_generation"]) == (4, 0, 5)
    assert (stats["alpha"]["client_err"], stats["alpha"]["forward_error"]) == (0, 0), stats["alpha"]
    assert_served_by(driver.bound["pools"]["alpha"], driver.timeline.texts[-1], backends, "after-bench")
