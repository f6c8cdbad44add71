"""Fan-out commands end to end: real redis-servers (3 unless a test says), the proxy in-process, redis-py.

Whole-keyspace commands (SCAN, KEYS, DBSIZE, RANDOMKEY, FLUSHDB), scripts
(SCRIPT LOAD/EXISTS/FLUSH/KILL, the NOSCRIPT heal after a backend restart,
register_script, Lock, a pipeline of scripts), FUNCTION, INFO, CONFIG GET,
TIME, LASTSAVE, COMMAND; their counters in the stats document and
/metrics; and SCAN/KEYS/DBSIZE through a cluster pool.  Redis's exact
replies are checked against a real redis-server where the proxy must give
the same bytes.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
import redis

from tests.conftest import in_reactor, key_on, pool_yaml
from tests.servers import LOOPBACK, require, wait_until
from twinproxy.protocols import resp

pytestmark = pytest.mark.timeout(120)


def client(service, **kwargs) -> redis.Redis:
    kwargs.setdefault("socket_timeout", 10)
    kwargs.setdefault("socket_connect_timeout", 5)
    return redis.Redis(host=LOOPBACK, port=service.port_number, **kwargs)


def raw(port: int, *commands) -> list:
    """Each command's whole reply, as bytes, on one fresh connection (one command at a time)."""
    replies = []
    with socket.create_connection((LOOPBACK, port), timeout=5) as sock:
        for command in commands:
            sock.sendall(resp.encode_command([word if isinstance(word, bytes) else word.encode()
                                              for word in command]))
            framer = resp.RespReplyFramer()
            while True:
                reply = framer.next()
                if reply is not None:
                    replies.append(reply)
                    break
                chunk = sock.recv(1 << 20)
                assert chunk, "connection closed"
                framer.feed(chunk)
    return replies


@pytest.fixture
def three(redis_servers, proxy):
    backends = redis_servers(3)
    return backends, proxy(pool_yaml(backends, hash="murmur"))


def load_keys(service, count: int, prefix: str = "key:") -> set:
    c = client(service, protocol=2)
    pipe = c.pipeline(transaction=False)
    names = {f"{prefix}{i}" for i in range(count)}
    for name in names:
        pipe.set(name, "v")
    pipe.execute()
    return {name.encode() for name in names}


# -- the keyspace --------------------------------------------------------------

@pytest.mark.parametrize("protocol", [2, 3])
def test_scan_iter_over_20000_keys_returns_each_once_with_cursors_below_2_63(three, protocol) -> None:
    backends, service = three
    expected = load_keys(service, 20000)
    assert all(b.client().dbsize() > 3000 for b in backends)   # spread over the three
    c = client(service, protocol=protocol)
    assert set(c.scan_iter(count=100)) == expected
    cursor, seen, cursors = 0, [], []
    while True:
        cursor, keys = c.scan(cursor, count=100)
        cursors.append(cursor)
        seen.extend(keys)
        if cursor == 0:
            break
    assert len(seen) == len(set(seen)) == 20000 and set(seen) == expected
    assert all(0 <= value < 1 << 63 for value in cursors)
    assert {value & 1023 for value in cursors[:-1]} == {0, 1, 2}   # every server's turn
    assert service.pool.counters.scans >= len(cursors)


def test_scan_match_count_type_pass_through(three) -> None:
    backends, service = three
    c = client(service, protocol=2)
    load_keys(service, 300, "a:")
    c.rpush("list:1", "x")
    c.rpush("list:2", "x")
    assert set(c.scan_iter(match="a:1*", count=50)) == {f"a:{i}".encode() for i in range(300)
                                                       if str(i).startswith("1")}
    assert set(c.scan_iter(_type="list", count=1000)) == {b"list:1", b"list:2"}


def test_redis_cli_scan(three) -> None:
    require("redis-cli")
    backends, service = three
    expected = load_keys(service, 5000)
    result = subprocess.run(["redis-cli", "-h", LOOPBACK, "-p", str(service.port_number), "--scan"],
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) == expected and len(result.stdout.split()) == len(expected)


def test_bogus_cursors_get_redis_error(three) -> None:
    backends, service = three
    bogus = [("SCAN", "abc"), ("SCAN", "18446744073709551616"), ("SCAN", "-1"), ("SCAN", "3"), ("SCAN", "1023")]
    replies = raw(service.port_number, *bogus, ("SCAN", "0", "COUNT", "0"), ("SCAN",))
    assert replies[:len(bogus)] == [b"-ERR invalid cursor\r\n"] * len(bogus)
    redis_says = raw(backends[0].port, ("SCAN", "abc"), ("SCAN", "0", "COUNT", "0"), ("SCAN",))
    assert redis_says[0] == b"-ERR invalid cursor\r\n"
    assert replies[len(bogus):] == redis_says[1:] == [b"-ERR syntax error\r\n",
                                                      b"-ERR wrong number of arguments for 'scan' command\r\n"]


def test_keys_and_dbsize_are_the_backends_sum(three) -> None:
    backends, service = three
    expected = load_keys(service, 500)
    c = client(service, protocol=2)
    assert set(c.keys("*")) == expected and len(c.keys("*")) == 500
    assert set(c.keys("key:1?")) == {f"key:1{i}".encode() for i in range(10)}
    assert c.dbsize() == sum(b.client().dbsize() for b in backends) == 500
    assert len(client(service, protocol=3).keys()) == 500


def test_randomkey_finds_the_keys_of_the_last_server(three) -> None:
    backends, service = three
    c = client(service, protocol=2)
    assert c.randomkey() is None
    assert raw(service.port_number, ("RANDOMKEY",)) == [b"$-1\r\n"]
    backends[2].client().set("only-here", "1")
    backends[2].client().set("and-here", "1")
    assert all(c.randomkey() in (b"only-here", b"and-here") for _ in range(20))
    assert client(service, protocol=3).randomkey() in (b"only-here", b"and-here")


def test_flushdb_and_flushall_empty_every_server(three) -> None:
    backends, service = three
    c = client(service, protocol=2)
    load_keys(service, 300)
    assert c.flushdb() is True
    assert [b.client().dbsize() for b in backends] == [0, 0, 0]
    load_keys(service, 300)
    assert c.flushall(asynchronous=True) is True
    wait_until(lambda: [b.client().dbsize() for b in backends] == [0, 0, 0], what="FLUSHALL ASYNC")
    load_keys(service, 30)
    assert raw(service.port_number, ("FLUSHDB", "SYNC"), ("FLUSHDB", "bogus")) == [
        b"+OK\r\n", b"-ERR syntax error\r\n"]
    assert [b.client().dbsize() for b in backends] == [0, 0, 0]


def test_redis_deny_flush(redis_servers, proxy) -> None:
    backends = redis_servers(2)
    service = proxy(pool_yaml(backends, redis_deny_flush="true"))
    c = client(service, protocol=2)
    c.set("stays", "1")
    for call, name in ((c.flushdb, "FLUSHDB"), (c.flushall, "FLUSHALL")):
        with pytest.raises(redis.ResponseError, match=f"{name} is denied by twinproxy: the pool sets "
                                                      "redis_deny_flush"):
            call()
    assert c.get("stays") == b"1"


def test_an_ejected_server_is_an_error_not_a_skip(redis_servers, proxy) -> None:
    backends = redis_servers(3)
    service = proxy(pool_yaml(backends, hash="murmur", auto_eject_hosts="true", server_failure_limit="1",
                              server_retry_timeout="30000", timeout="1000"))
    load_keys(service, 600)
    c = client(service, protocol=2)
    cursor, keys = c.scan(0, count=10)
    assert cursor & 1023 == 0
    backends[1].kill()
    with pytest.raises(redis.ResponseError):
        c.get(key_on(service, 1))
    wait_until(lambda: len(service.pool.live_servers) == 2, what="ejection")
    with pytest.raises(redis.ResponseError, match="SCAN cannot go on: server '.*' \\(number 1 of the pool\\) is "
                                                  "ejected"):
        while True:
            cursor, _ = c.scan(cursor, count=1000)
            assert cursor != 0, "the scan ended without server 1"
    for call in (c.dbsize, lambda: c.keys("*"), c.flushdb):
        with pytest.raises(redis.ResponseError, match="needs every server of the pool, and server '.*' is ejected"):
            call()
    assert c.randomkey() is not None          # the servers in the ring
    assert "db0" in c.info("keyspace")


# -- scripts -------------------------------------------------------------------

INCR_BY = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


def test_register_script_and_lock_over_three_servers(three) -> None:
    backends, service = three
    c = client(service)
    incr = c.register_script(INCR_BY)
    keys = [key_on(service, index, "s") for index in range(3)]
    for key in keys:
        assert incr(keys=[key], args=[5]) == 5
        assert incr(keys=[key], args=[2]) == 7
    assert [b.client().script_exists(incr.sha) for b in backends] == [[True]] * 3
    for index in range(3):
        lock = c.lock(key_on(service, index, "lock"), timeout=5, blocking_timeout=1)
        assert lock.acquire()
        assert not c.lock(lock.name, blocking_timeout=0.1).acquire()
        assert lock.extend(5) and lock.reacquire()
        lock.release()
        assert c.get(lock.name) is None


def test_script_load_exists_flush_kill(three) -> None:
    backends, service = three
    c = client(service, protocol=2)
    sha = c.script_load("return 1")
    assert [b.client().script_exists(sha) for b in backends] == [[True]] * 3
    assert c.script_exists(sha, "f" * 40) == [True, False]
    backends[1].client().script_flush()
    assert c.script_exists(sha) == [False]                 # an AND, not a sum
    assert raw(service.port_number, ("SCRIPT", "KILL")) == raw(backends[0].port, ("SCRIPT", "KILL")) == [
        b"-NOTBUSY No scripts in execution right now.\r\n"]
    assert c.script_flush() is True
    assert [b.client().script_exists(sha) for b in backends] == [[False]] * 3
    # After SCRIPT FLUSH the proxy forgets the body too: NOSCRIPT reaches the client, as from Redis.
    with pytest.raises(redis.exceptions.NoScriptError):
        c.evalsha(sha, 1, key_on(service, 0))
    wrong = [("SCRIPT", "LOAD"), ("SCRIPT", "EXISTS"), ("SCRIPT", "NOSUCH"), ("SCRIPT", "FLUSH", "bogus"),
             ("SCRIPT", "LOAD", "return +")]
    proxied, direct = raw(service.port_number, *wrong), raw(backends[0].port, *wrong)
    assert proxied[:4] == direct[:4]
    assert proxied[4].startswith(b"-ERR Error compiling script") and direct[4].startswith(b"-ERR Error compiling")
    assert raw(service.port_number, ("SCRIPT", "DEBUG", "YES"))[0].startswith(
        b"-ERR SCRIPT DEBUG is not supported by twinproxy")


def test_noscript_after_a_backend_restart_is_healed(three, reactor) -> None:
    backends, service = three
    c = client(service)
    incr = c.register_script(INCR_BY)
    key = key_on(service, 2, "heal")
    assert incr(keys=[key], args=[1]) == 1
    backends[2].restart()                                   # its script cache (and data) gone
    wait_until(lambda: _answers(c, key), what="the restarted server to answer through the proxy")
    assert c.script_exists(incr.sha) == [False]             # missing on one server: 0
    assert service.pool.counters.scripts_healed == 0
    assert c.evalsha(incr.sha, 1, key, 3) == 3              # NOSCRIPT from server 2, healed
    assert service.pool.counters.scripts_healed == 1
    assert backends[2].client().get(key) == b"3"           # ran once
    assert c.script_exists(incr.sha) == [True]
    # An EVAL body is remembered too.
    body = "return redis.call('GET', KEYS[1])"
    assert c.eval(body, 1, key) == b"3"
    backends[2].restart()
    wait_until(lambda: _answers(c, key), what="the restarted server to answer through the proxy")
    import hashlib

    assert c.evalsha(hashlib.sha1(body.encode()).hexdigest(), 1, key) is None
    assert service.pool.counters.scripts_healed == 2


def _answers(c, key) -> bool:
    try:
        c.get(key)
        return True
    except redis.ConnectionError:
        return False
    except redis.ResponseError:
        return False


def test_pipeline_of_scripts(three) -> None:
    backends, service = three
    c = client(service)
    incr = c.register_script(INCR_BY)
    keys = [key_on(service, index % 3, f"p{index}") for index in range(9)]
    pipe = c.pipeline(transaction=False)
    for key in keys:
        incr(keys=[key], args=[4], client=pipe)
        pipe.get(key)
    assert pipe.execute() == [4, b"4"] * 9
    backends[0].client().script_flush()     # the pipeline's SCRIPT EXISTS must see it missing
    pipe = c.pipeline(transaction=False)
    for key in keys:
        incr(keys=[key], args=[1], client=pipe)
    assert pipe.execute() == [5] * 9


def test_functions_broadcast_and_list(three) -> None:
    backends, service = three
    c = client(service, protocol=2)
    library = "#!lua name=tplib\nredis.register_function('tp_get', function(keys, args) " \
              "return redis.call('GET', keys[1]) end)"
    assert c.function_load(library) in (b"tplib", "tplib")
    assert all(b.client().function_list() for b in backends)
    for index in range(3):
        key = key_on(service, index, "f")
        c.set(key, f"v{index}")
        assert c.fcall("tp_get", 1, key) == f"v{index}".encode()
    assert [lib[b"library_name"] if b"library_name" in lib else lib["library_name"]
            for lib in map(_pairs, c.function_list())] == [b"tplib"]
    with pytest.raises(redis.ResponseError, match="Library 'tplib' already exists"):
        c.function_load(library)
    assert raw(service.port_number, ("FUNCTION", "KILL")) == raw(backends[0].port, ("FUNCTION", "KILL"))
    assert c.function_delete("tplib") in (True, b"OK", "OK")
    assert not any(b.client().function_list() for b in backends)
    assert raw(service.port_number, ("FUNCTION", "DELETE", "tplib")) == [b"-ERR Library not found\r\n"]


def _pairs(item):
    return item if isinstance(item, dict) else dict(zip(item[::2], item[1::2]))


# -- INFO, CONFIG, TIME, LASTSAVE, COMMAND ---------------------------------------

@pytest.mark.parametrize("protocol", [2, 3])
def test_info_sums_the_keyspace_and_says_it_is_a_proxy(three, protocol) -> None:
    backends, service = three
    load_keys(service, 900)
    client(service, protocol=2).set("ttl-key", "1", ex=1000)
    c = client(service, protocol=protocol)
    info = c.info()
    assert info["db0"]["keys"] == 901 == sum(b.client().dbsize() for b in backends)
    assert info["db0"]["expires"] == 1 and 0 <= info["db0"]["avg_ttl"] <= 1000_000   # 0 until Redis samples it
    assert info["redis_version"] == backends[0].client().info()["redis_version"]
    assert info["redis_mode"] == "standalone" and info["role"] == "master" and info["loading"] == 0
    assert info["proxy"] == "twinproxy" and info["pool"] == "alpha" and info["servers"] == 3
    assert info["servers_answered"] == 3
    assert info["connected_clients"] >= 3
    everything = c.info("everything")
    assert everything["cmdstat_set"]["calls"] >= 901
    assert c.info("keyspace") == {"db0": info["db0"]}
    text = raw(service.port_number, ("INFO", "server", "keyspace"))[0]
    assert text.startswith(b"$") and b"# Server\r\n" in text and b"\r\n\r\n# Keyspace\r\ndb0:keys=901," in text


def test_info_survives_a_down_server(redis_servers, proxy) -> None:
    backends = redis_servers(3)
    service = proxy(pool_yaml(backends, timeout="1000"))
    c = client(service, protocol=2)
    backends[1].kill()
    info = c.info()
    assert info["servers_answered"] == 2 and "error" in info["server1"]


@pytest.mark.parametrize("protocol", [2, 3])
def test_config_get_time_lastsave(three, protocol) -> None:
    backends, service = three
    c = client(service, protocol=protocol)
    assert c.config_get("maxmemory") == {"maxmemory": "0"}
    assert set(c.config_get("max*")) >= {"maxmemory", "maxclients"}
    seconds, micros = c.time()
    assert abs(seconds - backends[0].client().time()[0]) <= 2 and 0 <= micros < 1_000_000
    assert c.lastsave() == backends[0].client().lastsave()
    for sub in ("SET", "REWRITE", "RESETSTAT"):
        with pytest.raises(redis.ResponseError, match=f"CONFIG {sub} is not supported by twinproxy"):
            c.execute_command("CONFIG", sub, *(["maxmemory", "1"] if sub == "SET" else []))
    assert raw(service.port_number, ("CONFIG", "NOSUCH"), ("CONFIG", "GET")) == raw(
        backends[0].port, ("CONFIG", "NOSUCH"), ("CONFIG", "GET"))


def test_command_from_a_backend_and_cached(three) -> None:
    backends, service = three
    direct = raw(backends[0].port, ("COMMAND", "COUNT"), ("COMMAND", "INFO", "get"))
    assert raw(service.port_number, ("COMMAND", "COUNT"), ("COMMAND", "INFO", "get")) == direct
    docs = raw(service.port_number, ("COMMAND", "DOCS"))[0]
    sent = sum(server.counters.requests for server in service.pool.servers)
    assert raw(service.port_number, ("COMMAND", "DOCS"))[0] == docs          # from the cache
    assert sum(server.counters.requests for server in service.pool.servers) == sent
    assert len(docs) > 10000 and b"getrange" in docs
    assert len(client(service).command()) == int(direct[0][1:-2])          # RESP3: its own cache entry


def test_redis_cli_reads_dbsize(three) -> None:
    """redis-cli with a command on its input (interactive, it also asks COMMAND DOCS: see above)."""
    require("redis-cli")
    backends, service = three
    result = subprocess.run(["redis-cli", "-h", LOOPBACK, "-p", str(service.port_number)], input=b"DBSIZE\n",
                            capture_output=True, timeout=30)
    assert result.returncode == 0 and result.stdout.strip().endswith(b"0"), result


# -- counters ------------------------------------------------------------------

def test_counters_in_stats_and_metrics(three, reactor) -> None:
    from twinproxy import metrics, stats

    backends, service = three
    c = client(service, protocol=2)
    c.script_load("return 2")
    c.dbsize()
    c.scan(0)
    document = in_reactor(reactor, stats.snapshot, [service], 0.0, 1.0)["alpha"]
    assert document["script_loads"] == 1 and document["scans"] == 1 and document["fanouts"] == 3
    assert document["scripts_healed"] == 0
    text = in_reactor(reactor, metrics.render, lambda: [service], 0.0, reactor).decode()
    assert 'twinproxy_pool_script_loads_total{pool="alpha"} 1.0' in text
    assert 'twinproxy_pool_scans_total{pool="alpha"} 1.0' in text
    assert 'twinproxy_pool_scripts_healed_total{pool="alpha"} 0.0' in text


# -- a cluster pool ------------------------------------------------------------

def test_cluster_pool_scan_keys_dbsize(redis_servers, reactor, tmp_path: Path, request) -> None:
    from tests.cluster_harness import ClusterProxy
    from tests.coordinator_servers import coordinator_url_for
    from tests.integration.test_cluster_proxy import Writer
    from twinproxy.cluster.model import Group, Topology

    backends = redis_servers(3)
    url = coordinator_url_for("file", request, tmp_path)
    writer = Writer(reactor, url)
    processes = []
    try:
        groups = tuple(Group(id=gid, servers=(b.address,)) for gid, b in enumerate(backends, start=1))
        slots = tuple((1 + slot * 3 // 1024, "stable") for slot in range(1024))
        writer.write(Topology(cluster="shop", protocol="redis", generation=1, groups=groups, slots=slots))
        cluster = ClusterProxy(tmp_path / "proxy", url, "shop", processes=processes).start()
        c = redis.Redis(host=LOOPBACK, port=cluster.port, socket_timeout=10, protocol=2)
        wait_until(lambda: _serving(c), timeout=20, what="the cluster proxy to serve")
        pipe = c.pipeline(transaction=False)
        names = {f"c:{i}".encode() for i in range(3000)}
        for name in names:
            pipe.set(name, "1")
        pipe.execute()
        assert all(b.client().dbsize() > 500 for b in backends)
        assert set(c.scan_iter(count=100)) == names
        assert set(c.keys("c:*")) == names and c.dbsize() == 3000
        assert c.info("keyspace")["db0"]["keys"] == 3000
    finally:
        for process in processes:
            process.stop()
        writer.stop()


def _serving(c) -> bool:
    try:
        return c.set("probe", "1") and c.delete("probe") == 1
    except redis.RedisError:
        return False
