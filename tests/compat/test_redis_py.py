"""redis-py's own features through the 3-server pool (``hash_tag "{}"``): pipelines with and without
MULTI, WATCH, scripts, locks, pub/sub in RESP2 and RESP3, SCAN, INFO and a database other than 0."""

from __future__ import annotations

import threading
import time
from typing import List

import pytest
import redis

from tests.compat.conftest import CLIENT_TIMEOUT, CompatPool

# Twelve hash tags: with the pool's fixed server names they land on all three servers.
TAGS = [f"tag{index}" for index in range(12)]


def collect(pubsub, count: int, timeout: float = CLIENT_TIMEOUT) -> List[dict]:
    """The next ``count`` messages of ``pubsub`` (acknowledgements included), or AssertionError at the deadline."""
    messages: List[dict] = []
    deadline = time.monotonic() + timeout
    while len(messages) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"{len(messages)} of {count} messages in {timeout}s: {messages}")
        message = pubsub.get_message(timeout=min(remaining, 1.0))
        if message is not None:
            messages.append(message)
    return messages


def spread_over_every_backend(pool: CompatPool, db: int = 0) -> None:
    """With more than one server behind the pool, each holds some of the keys: the work really spanned them."""
    placed = pool.backend_keys(db)
    if len(placed) > 1:
        assert all(placed.values()), placed


def test_pipeline_without_transaction_spans_the_servers(pool3: CompatPool) -> None:
    client = pool3.client()
    keys = [f"plain:{index}" for index in range(300)]
    with client.pipeline(transaction=False) as pipe:
        for index, key in enumerate(keys):
            pipe.set(key, index).incr(key).get(key)
        replies = pipe.execute()
    assert replies == [reply for index in range(300) for reply in (True, index + 1, str(index + 1).encode())]
    assert pool3.all_backend_keys() == sorted(key.encode() for key in keys)
    spread_over_every_backend(pool3)


def test_transactions_on_tagged_keys_run_whole_on_their_server(pool3: CompatPool) -> None:
    client = pool3.client()
    for tag in TAGS:
        with client.pipeline() as pipe:  # transaction=True: MULTI ... EXEC
            pipe.set(f"{{{tag}}}:status", "paid")
            pipe.hset(f"{{{tag}}}:items", mapping={"a": "1", "b": "2"})
            pipe.incrby(f"{{{tag}}}:total", 30)
            pipe.rpush(f"{{{tag}}}:log", "created", "paid")
            pipe.hgetall(f"{{{tag}}}:items")
            pipe.lrange(f"{{{tag}}}:log", 0, -1)
            assert pipe.execute() == [True, 2, 30, 2, {b"a": b"1", b"b": b"2"}, [b"created", b"paid"]]
    placed = pool3.backend_keys()
    for tag in TAGS:
        holders = [address for address, keys in placed.items() if f"{{{tag}}}:status".encode() in keys]
        assert len(holders) == 1, (tag, placed)
        assert sum(key.startswith(f"{{{tag}}}:".encode()) for key in placed[holders[0]]) == 4, placed
    spread_over_every_backend(pool3)


def test_transaction_runtime_error_leaves_the_other_commands_applied(pool3: CompatPool) -> None:
    client = pool3.client()
    with client.pipeline() as pipe:
        pipe.set("{tx}:text", "not a number").incr("{tx}:text").set("{tx}:after", "1")
        replies = pipe.execute(raise_on_error=False)
    assert replies[0] is True and replies[2] is True
    assert isinstance(replies[1], redis.ResponseError)
    assert str(replies[1]) == "value is not an integer or out of range"
    assert client.get("{tx}:after") == b"1"


def test_transaction_with_a_queueing_error_is_aborted_whole(pool3: CompatPool) -> None:
    client = pool3.client()
    with client.pipeline() as pipe:
        pipe.set("{tx}:first", "1")
        pipe.execute_command("SET", "{tx}:bad")  # wrong arity: refused when queued
        pipe.set("{tx}:last", "1")
        with pytest.raises(redis.ResponseError, match="wrong number of arguments for 'set' command"):
            pipe.execute()
    assert client.exists("{tx}:first", "{tx}:last") == 0
    assert pool3.all_backend_keys() == []
    assert client.ping()  # the connection is usable after the abort


def test_watch_conflict_raises_watch_error_and_transaction_retries(pool3: CompatPool) -> None:
    client, rival = pool3.client(), pool3.client()
    key = "{acct:1}:balance"
    client.set(key, 100)
    with client.pipeline() as pipe:
        pipe.watch(key)
        balance = int(pipe.get(key))
        rival.set(key, 500)  # a concurrent change, from another connection
        pipe.multi()
        pipe.set(key, balance - 30)
        with pytest.raises(redis.WatchError):
            pipe.execute()
    assert client.get(key) == b"500"

    seen = []

    def debit(pipe) -> None:
        balance = int(pipe.get(key))
        if not seen:
            rival.incrby(key, 1)  # conflicts with the first attempt only
        seen.append(balance)
        pipe.multi()
        pipe.set(key, balance - 30)

    client.transaction(debit, key)
    assert seen == [500, 501]
    assert client.get(key) == b"471"

    # A change to a watched key of another server's tag does not touch this one.
    with client.pipeline() as pipe:
        pipe.watch(key)
        rival.set("{acct:2}:balance", 7)
        pipe.multi()
        pipe.incrby(key, 1)
        assert pipe.execute() == [472]


def test_register_script_runs_on_every_server_and_survives_an_emptied_script_cache(pool3: CompatPool) -> None:
    client = pool3.client()
    body = "redis.call('SET', KEYS[1], ARGV[1]); return redis.call('INCRBY', KEYS[2], ARGV[2])"
    script = client.register_script(body)
    for tag in TAGS:
        assert script(keys=[f"{{{tag}}}:value", f"{{{tag}}}:count"], args=["x", 5]) == 5
    assert client.script_exists(script.sha) == [True]
    spread_over_every_backend(pool3)

    # As after a server's restart: the first server forgets the script, the others keep it.
    with pool3.backends[0].client() as backend:
        backend.script_flush()
    assert client.script_exists(script.sha) == [False]
    for tag in TAGS:
        assert script(keys=[f"{{{tag}}}:value", f"{{{tag}}}:count"], args=["y", 5]) == 10
        assert client.get(f"{{{tag}}}:value") == b"y"
    assert client.script_load(body) == script.sha
    assert client.script_exists(script.sha) == [True]


def test_lock_acquire_extend_release_and_mutual_exclusion(pool3: CompatPool) -> None:
    client, rival_client = pool3.client(), pool3.client()
    name = "{res:1}:lock"
    lock = client.lock(name, timeout=5)
    assert lock.acquire(blocking=False)
    rival = rival_client.lock(name, timeout=5)
    assert not rival.acquire(blocking=False)
    assert 0 < client.pttl(name) <= 5000
    assert lock.extend(10)  # adds 10 s to what is left
    assert client.pttl(name) > 10000
    assert lock.owned() and lock.locked() and not rival.owned()
    assert lock.reacquire()  # back to the 5 s timeout
    assert 0 < client.pttl(name) <= 5000
    lock.release()
    assert client.exists(name) == 0
    assert rival.acquire(blocking=True, blocking_timeout=2)
    client.delete(name)  # as if it had expired
    with pytest.raises(redis.exceptions.LockNotOwnedError):
        rival.release()

    # Two threads read-modify-write one counter under the lock: no increment is lost.
    counter = "{res:1}:counter"
    client.set(counter, 0)
    errors: List[BaseException] = []

    def work() -> None:
        try:
            worker = pool3.client()
            for _ in range(25):
                with worker.lock(name, timeout=5, blocking_timeout=CLIENT_TIMEOUT):
                    value = int(worker.get(counter))
                    worker.set(counter, value + 1)
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=work, name=f"lock-worker{index}") for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert client.get(counter) == b"50"


@pytest.mark.parametrize("protocol", [2, 3])
def test_pubsub_channels_and_patterns(pool3: CompatPool, protocol: int) -> None:
    subscriber, publisher = pool3.client(protocol=protocol), pool3.client(protocol=protocol)
    channels = [f"news:{index}" for index in range(6)]
    pubsub = subscriber.pubsub()
    try:
        pubsub.subscribe(*channels)
        pubsub.psubscribe("alerts.*")
        acks = [(m["type"], m["channel"], m["data"]) for m in collect(pubsub, 7)]
        assert acks == [("subscribe", channel.encode(), count) for count, channel in enumerate(channels, 1)] \
            + [("psubscribe", b"alerts.*", 7)]
        assert publisher.pubsub_numsub("news:1", "nobody") == [(b"news:1", 1), (b"nobody", 0)]
        assert publisher.pubsub_numpat() == 1
        assert sorted(publisher.pubsub_channels("news:*")) == sorted(channel.encode() for channel in channels)

        for channel in channels:
            assert publisher.publish(channel, f"to {channel}") == 1
        assert publisher.publish("alerts.fire", "hot") == 1
        assert publisher.publish("nobody", "lost") == 0
        got = [(m["type"], m["pattern"], m["channel"], m["data"]) for m in collect(pubsub, 7)]
        assert got == [("message", None, channel.encode(), f"to {channel}".encode()) for channel in channels] \
            + [("pmessage", b"alerts.*", b"alerts.fire", b"hot")]

        pubsub.unsubscribe("news:0")
        assert [(m["type"], m["channel"], m["data"]) for m in collect(pubsub, 1)] == [("unsubscribe", b"news:0", 6)]
        assert publisher.publish("news:0", "gone") == 0
        pubsub.punsubscribe("alerts.*")
        assert [(m["type"], m["channel"], m["data"]) for m in collect(pubsub, 1)] == \
            [("punsubscribe", b"alerts.*", 5)]
        assert publisher.publish("alerts.fire", "gone") == 0
        assert publisher.publish("news:5", "still") == 1
        assert [(m["type"], m["data"]) for m in collect(pubsub, 1)] == [("message", b"still")]
    finally:
        pubsub.close()
    assert subscriber.ping() and publisher.ping()


def test_scan_iter_sees_every_key_of_every_server_once(pool3: CompatPool) -> None:
    client = pool3.client()
    strings = {f"scan:{index}".encode() for index in range(200)}
    client.mset({key: "v" for key in strings})
    client.mset({f"other:{index}": "v" for index in range(20)})
    client.hset("scan:hash", "field", "v")
    spread_over_every_backend(pool3)
    assert set(client.scan_iter(match="scan:*", count=25)) == strings | {b"scan:hash"}
    assert list(client.scan_iter(match="scan:*", count=25, _type="hash")) == [b"scan:hash"]
    assert client.dbsize() == 221

    cursor, seen, calls = 0, set(), 0
    while True:
        cursor, keys = client.scan(cursor, match="other:*", count=10)
        assert 0 <= cursor < 2 ** 63  # a Java or .NET client parses it as a signed 64-bit number
        seen.update(keys)
        calls += 1
        assert calls < 500, "SCAN did not come back to cursor 0"
        if cursor == 0:
            break
    assert seen == {f"other:{index}".encode() for index in range(20)}


def test_info_reports_the_servers_version_and_the_summed_keyspace(pool3: CompatPool) -> None:
    client = pool3.client()
    client.mset({f"info:{index}": index for index in range(300)})
    spread_over_every_backend(pool3)
    with pool3.backends[0].client() as backend:
        version = backend.info("server")["redis_version"]
    info = client.info()
    assert info["redis_version"] == version
    assert info["loading"] == 0
    assert info["db0"]["keys"] == 300
    assert client.info("keyspace")["db0"]["keys"] == 300
    assert client.info("server")["redis_version"] == version


def test_database_3_is_database_3_on_the_servers(pool3: CompatPool) -> None:
    in_db3, in_db0 = pool3.client(db=3), pool3.client()
    assert in_db3.set("dbkey", "three")
    assert in_db0.get("dbkey") is None
    assert in_db0.set("dbkey", "zero")
    assert in_db3.get("dbkey") == b"three"
    in_db3.mset({f"db3:{index}": index for index in range(30)})
    assert in_db3.mget([f"db3:{index}" for index in range(30)]) == [str(index).encode() for index in range(30)]
    assert pool3.all_backend_keys(db=3) == sorted([b"dbkey"] + [f"db3:{index}".encode() for index in range(30)])
    assert pool3.all_backend_keys(db=0) == [b"dbkey"]
    spread_over_every_backend(pool3, db=3)
    for backend in pool3.backends:
        with backend.client(db=3) as server:
            if server.exists("dbkey"):
                assert server.get("dbkey") == b"three"
