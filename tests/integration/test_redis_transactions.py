"""MULTI / EXEC / DISCARD through the proxy, against real redis-servers, with Redis's exact replies."""

from __future__ import annotations

import pytest
import redis

from tests.conftest import key_on, pool_yaml
from tests.integration.test_redis_proxy import client, raw, raw_to

pytestmark = pytest.mark.timeout(60)


def tagged(service, index: int, tag_prefix: str = "t") -> str:
    """A hash tag whose keys the pool places on its ``index``-th server."""
    return key_on(service, index, tag_prefix)


@pytest.fixture
def three(redis_servers, proxy):
    backends = redis_servers(3)
    service = proxy(pool_yaml(backends, hash="fnv1a_64", distribution="ketama", hash_tag='"{}"'))
    return backends, service


def test_redis_py_transaction_on_one_tag_matches_a_single_redis(three) -> None:
    backends, service = three
    c = client(service, protocol=2)
    pipe = c.pipeline(transaction=True)
    pipe.set("{u1}:a", "1").incr("{u1}:a").rpush("{u1}:l", "x", "y").lrange("{u1}:l", 0, -1).ping()
    assert pipe.execute() == [True, 2, 2, [b"x", b"y"], True]
    direct = backends[0].client()
    expected = direct.pipeline(transaction=True)   # the same on one Redis, on keys of its own
    expected.set("{d1}:a", "1").incr("{d1}:a").rpush("{d1}:l", "x", "y").lrange("{d1}:l", 0, -1).ping()
    assert expected.execute() == [True, 2, 2, [b"x", b"y"], True]


def test_resp3_client_transaction(three) -> None:
    _, service = three
    c = client(service, protocol=3)
    pipe = c.pipeline(transaction=True)
    pipe.hset("{h}:x", mapping={"f": "v"}).hgetall("{h}:x")
    assert pipe.execute() == [1, {b"f": b"v"}]


def test_exact_replies_of_a_transaction_on_the_wire(three) -> None:
    _, service = three
    got = raw(service, b"MULTI\r\nMULTI\r\nSET {a}x 1\r\nWATCH k\r\nGET {a}x\r\nEXEC\r\n", expect=8)
    assert got == (b"+OK\r\n-ERR MULTI calls can not be nested\r\n+QUEUED\r\n"
                   b"-ERR WATCH inside MULTI is not allowed\r\n+QUEUED\r\n*2\r\n+OK\r\n$1\r\n1\r\n")
    assert raw(service, b"EXEC\r\nDISCARD\r\n", expect=2) == (
        b"-ERR EXEC without MULTI\r\n-ERR DISCARD without MULTI\r\n")
    assert raw(service, b"MULTI\r\nEXEC\r\n", expect=2) == b"+OK\r\n*0\r\n"
    assert raw(service, b"MULTI\r\nSET {a}x 2\r\nDISCARD\r\nGET {a}x\r\n", expect=4) == (
        b"+OK\r\n+QUEUED\r\n+OK\r\n$1\r\n1\r\n")


def test_queue_time_errors_abort_the_transaction_as_redis_does(three) -> None:
    backends, service = three
    expected = raw_direct(backends[0], b"MULTI\r\nNOSUCH x\r\nSET {a}y 1\r\nEXEC\r\n", 4)
    got = raw(service, b"MULTI\r\nNOSUCH x\r\nSET {a}y 1\r\nEXEC\r\n", expect=4)
    assert got.split(b"\r\n")[0] == b"+OK"
    assert got.endswith(b"+QUEUED\r\n-EXECABORT Transaction discarded because of previous errors.\r\n")
    assert expected.endswith(b"+QUEUED\r\n-EXECABORT Transaction discarded because of previous errors.\r\n")
    got = raw(service, b"MULTI\r\nSET {a}y\r\nEXEC\r\n", expect=3)
    assert got == (b"+OK\r\n-ERR wrong number of arguments for 'set' command\r\n"
                   b"-EXECABORT Transaction discarded because of previous errors.\r\n")
    assert all(not b.client().exists("{a}y") for b in backends)


def test_run_time_errors_are_per_element(three) -> None:
    _, service = three
    c = client(service, protocol=2)
    c.set("{r}s", "text")
    pipe = c.pipeline(transaction=True)
    pipe.incr("{r}s").set("{r}t", "1")
    results = pipe.execute(raise_on_error=False)
    assert isinstance(results[0], redis.ResponseError) and results[1] is True
    assert c.get("{r}t") == b"1"


def test_a_transaction_across_servers_is_refused_and_writes_nothing(three) -> None:
    backends, service = three
    a, b = key_on(service, 0, "x"), key_on(service, 1, "y")
    sizes = [backend.client().dbsize() for backend in backends]
    c = client(service, protocol=2)
    pipe = c.pipeline(transaction=True)
    pipe.set(a, "1").set(b, "2")
    with pytest.raises(redis.ResponseError) as caught:
        pipe.execute()
    text = str(caught.value)
    assert "EXECABORT" in text or "more than one server" in text
    assert [backend.client().dbsize() for backend in backends] == sizes
    assert service.pool.counters.transactions_refused == 1
    got = raw(service, b"MULTI\r\nSET %s 1\r\nSET %s 2\r\nEXEC\r\n" % (a.encode(), b.encode()), expect=4)
    last = got.split(b"\r\n")[3]
    assert last.startswith(b"-EXECABORT Transaction discarded: its keys are on more than one server")
    assert a.encode() in last and b.encode() in last


def test_client_commands_inside_multi_are_refused_and_spoil_it(three) -> None:
    _, service = three
    got = raw(service, b"MULTI\r\nSELECT 0\r\nPING\r\nEXEC\r\nPING\r\n", expect=5)
    assert got == (b"+OK\r\n-ERR 'select' inside MULTI is not supported by twinproxy\r\n+QUEUED\r\n"
                   b"-EXECABORT Transaction discarded because of previous errors.\r\n+PONG\r\n")


def test_scripts_run_inside_a_transaction_and_whole_pool_commands_are_refused(three) -> None:
    _, service = three
    c = client(service, protocol=2)
    pipe = c.pipeline(transaction=True)
    pipe.eval("return redis.call('incr', KEYS[1])", 1, "{e}n").get("{e}n")
    assert pipe.execute() == [1, b"1"]
    got = raw(service, b"MULTI\r\nDBSIZE\r\nEXEC\r\n", expect=3)
    assert got == (b"+OK\r\n-ERR 'dbsize' inside MULTI is not supported by twinproxy\r\n"
                   b"-EXECABORT Transaction discarded because of previous errors.\r\n")


def test_publish_is_queued_and_published_at_exec(three) -> None:
    """Celery's result backend: SET the result and PUBLISH it in one transaction."""
    _, service = three
    c = client(service, protocol=2)
    listener = client(service, protocol=2).pubsub()
    listener.subscribe("{m}done")
    assert listener.get_message(timeout=5)["type"] == "subscribe"
    pipe = c.pipeline(transaction=True)
    pipe.set("{m}result", "42").publish("{m}done", "42")
    assert pipe.execute() == [True, 1]
    message = listener.get_message(timeout=5)
    assert message["type"] == "message" and message["data"] == b"42"
    listener.close()


def test_disconnect_mid_transaction_leaves_nothing(three) -> None:
    backends, service = three
    raw(service, b"MULTI\r\nSET {d}k 1\r\n", expect=2)
    c = client(service, protocol=2)
    assert c.get("{d}k") is None
    for backend in backends:
        listing = backend.client().client_list()
        assert all(entry.get("multi") in ("-1", None) for entry in listing)


def test_many_transactions_use_no_extra_connections(three) -> None:
    backends, service = three
    c = client(service, protocol=2)
    c.set("{n}count", 0)    # the proxy's one connection to that server is open from here on
    before = [len(b.client().client_list()) for b in backends]
    for i in range(300):
        pipe = c.pipeline(transaction=True)
        pipe.incr("{n}count").get("{n}count")
        assert pipe.execute() == [i + 1, str(i + 1).encode()]
    after = [len(b.client().client_list()) for b in backends]
    assert after == before
    assert service.pool.counters.transactions == 300


def test_cluster_style_one_slot_rule(redis_servers, proxy) -> None:
    backends = redis_servers(1)
    service = proxy(pool_yaml(backends))
    c = client(service, protocol=2)
    pipe = c.pipeline(transaction=True)
    pipe.set("a", "1").set("b", "2").mget("a", "b")
    # One server: unrelated keys are fine (a 1-server pool, twemproxy's connection-pooling use).
    assert pipe.execute() == [True, True, [b"1", b"2"]]


def raw_direct(backend, data: bytes, expect: int) -> bytes:
    host, port = backend.address.rsplit(":", 1)
    return raw_to(host, int(port), data, expect)


@pytest.fixture
def three_split(redis_servers, proxy):
    backends = redis_servers(3)
    service = proxy(pool_yaml(backends, hash="fnv1a_64", distribution="ketama",
                              redis_cross_server_transactions="true"))
    return backends, service


def test_opt_in_cross_server_transaction_runs_per_server_in_the_clients_order(three_split) -> None:
    """Django's set_many: MULTI, MSET over every server, EXPIRE per key, EXEC."""
    backends, service = three_split
    keys = [key_on(service, index, f"s{index}") for index in range(3)]
    c = client(service, protocol=2)
    pipe = c.pipeline(transaction=True)
    pipe.mset({key: f"v-{key}" for key in keys})
    for key in keys:
        pipe.expire(key, 100)
    pipe.mget(keys).delete(keys[0], keys[2]).ping().get(keys[1])
    assert pipe.execute() == [True, True, True, True, [f"v-{key}".encode() for key in keys], 2, True,
                              f"v-{keys[1]}".encode()]
    assert [b.client().dbsize() for b in backends] == [0, 1, 0]
    assert 0 < c.ttl(keys[1]) <= 100


def test_opt_in_cross_server_keeps_one_server_commands_whole(three_split) -> None:
    _, service = three_split
    a, b = key_on(service, 0, "x"), key_on(service, 1, "y")
    got = raw(service, b"MULTI\r\nSET %s 1\r\nRENAME %s %s\r\nEXEC\r\n" % (a.encode(), a.encode(), b.encode()),
              expect=4)
    assert got.split(b"\r\n")[3].startswith(b"-EXECABORT Transaction discarded: RENAME needs its keys on one server")


# -- WATCH ---------------------------------------------------------------------------------------


def test_watch_conflict_raises_watch_error_and_writes_nothing(three) -> None:
    _, service = three
    c = client(service, protocol=2)
    other = client(service, protocol=2)
    c.set("{w}balance", 10)
    with c.pipeline(transaction=True) as pipe:
        pipe.watch("{w}balance")
        assert int(pipe.get("{w}balance")) == 10
        other.set("{w}balance", 99)          # a second client changes it before EXEC
        pipe.multi()
        pipe.set("{w}balance", 11).set("{w}note", "x")
        with pytest.raises(redis.WatchError):
            pipe.execute()
    assert c.get("{w}balance") == b"99" and c.get("{w}note") is None


def test_watch_then_exec_commits_and_the_connection_is_reused(three) -> None:
    backends, service = three
    c = client(service, protocol=2)
    c.set("{v}n", 0)
    owner_index = next(i for i, b in enumerate(backends) if b.client().exists("{v}n"))
    before = len(backends[owner_index].client().client_list())

    def increment(pipe):
        value = int(pipe.get("{v}n"))
        pipe.multi()
        pipe.set("{v}n", value + 1)

    for _ in range(200):
        c.transaction(increment, "{v}n")
    assert c.get("{v}n") == b"200"
    # One leased connection came and was kept for the next WATCH: not one per transaction.
    assert len(backends[owner_index].client().client_list()) == before + 1


def test_watch_pins_reads_and_unwatch_discard_release(three) -> None:
    _, service = three
    got = raw(service, b"WATCH {p}a\r\nSET {p}a 1\r\nGET {p}a\r\nUNWATCH\r\nGET {p}a\r\n", expect=5)
    assert got == b"+OK\r\n+OK\r\n$1\r\n1\r\n+OK\r\n$1\r\n1\r\n"
    got = raw(service, b"WATCH {p}a\r\nMULTI\r\nSET {p}a 2\r\nDISCARD\r\nGET {p}a\r\nUNWATCH\r\n", expect=6)
    assert got == b"+OK\r\n+OK\r\n+QUEUED\r\n+OK\r\n$1\r\n1\r\n+OK\r\n"
    assert raw(service, b"UNWATCH\r\nWATCH\r\n", expect=2) == (
        b"+OK\r\n-ERR wrong number of arguments for 'watch' command\r\n")


def test_pipelined_read_after_exec_sees_the_transaction(three) -> None:
    _, service = three
    got = raw(service, b"WATCH {q}a\r\nMULTI\r\nINCR {q}a\r\nEXEC\r\nGET {q}a\r\n", expect=6)
    assert got == b"+OK\r\n+OK\r\n+QUEUED\r\n*1\r\n:1\r\n$1\r\n1\r\n"


def test_watch_across_servers_and_exec_elsewhere_are_refused(three) -> None:
    _, service = three
    a, b = key_on(service, 0, "x"), key_on(service, 1, "y")
    got = raw(service, b"WATCH %s %s\r\n" % (a.encode(), b.encode()))
    assert got.startswith(b"-ERR WATCH keys on more than one server")
    got = raw(service, b"WATCH %s\r\nMULTI\r\nSET %s 1\r\nEXEC\r\nSET %s 2\r\n" % (a.encode(), b.encode(), a.encode()),
              expect=5)
    lines = got.split(b"\r\n")
    assert lines[3].startswith(b"-EXECABORT Transaction discarded: its keys are not on the server of the WATCHed")
    assert lines[4] == b"+OK"


def test_a_watching_client_that_disconnects_leaves_no_connection(three) -> None:
    backends, service = three
    c = client(service, protocol=2)
    c.set("{z}k", 1)
    owner_index = next(i for i, b in enumerate(backends) if b.client().exists("{z}k"))
    before = len(backends[owner_index].client().client_list())
    raw(service, b"WATCH {z}k\r\nGET {z}k\r\n", expect=2)     # closes without EXEC
    from tests.servers import wait_until

    wait_until(lambda: len(backends[owner_index].client().client_list()) == before, timeout=5,
               what="the pinned connection closed")


def test_lease_cap_gives_a_clear_error(redis_servers, proxy) -> None:
    backends = redis_servers(1)
    service = proxy(pool_yaml(backends, server_leased_connections=1))
    first = client(service, protocol=2, single_connection_client=True)
    second = client(service, protocol=2, single_connection_client=True)
    assert first.execute_command("WATCH", "a") in (b"OK", "OK", True)
    with pytest.raises(redis.ResponseError, match="server_leased_connections"):
        second.execute_command("WATCH", "b")
    first.execute_command("UNWATCH")
    assert second.execute_command("WATCH", "b") in (b"OK", "OK", True)
