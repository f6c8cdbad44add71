"""Pub/sub end to end: real redis-servers (3 unless a test says otherwise), the proxy in-process,
redis-py's PubSub in RESP2 and RESP3, and raw sockets where the exact bytes matter."""

from __future__ import annotations

import dataclasses
import socket
import time
from typing import Dict, List

import pytest
import redis

from tests.conftest import in_reactor, pool_yaml
from tests.servers import LOOPBACK, wait_until
from twinproxy.config import load_text
from twinproxy.topology import diff_pool

pytestmark = pytest.mark.timeout(60)


def client(service, **kwargs) -> redis.Redis:
    kwargs.setdefault("socket_timeout", 5)
    kwargs.setdefault("socket_connect_timeout", 5)
    return redis.Redis(host=LOOPBACK, port=service.port_number, **kwargs)


def encode(*args) -> bytes:
    out = b"*%d\r\n" % len(args)
    for arg in args:
        arg = arg.encode() if isinstance(arg, str) else arg
        out += b"$%d\r\n%s\r\n" % (len(arg), arg)
    return out


class Raw:
    """A raw RESP connection: send commands, read exactly the bytes expected."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((LOOPBACK, port), timeout=5)
        self.buffer = b""

    def send(self, *args) -> None:
        self.sock.sendall(encode(*args))

    def read(self, size: int) -> bytes:
        while len(self.buffer) < size:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.buffer += chunk
        got, self.buffer = self.buffer[:size], self.buffer[size:]
        return got

    def ask(self, expected: bytes, *args) -> bytes:
        """Send ``args``; return as many bytes as ``expected`` has (compare them)."""
        self.send(*args)
        return self.read(len(expected))

    def closed(self, timeout: float = 5) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionError:
            return True

    def close(self) -> None:
        self.sock.close()


def channels_on_every_server(service, count: int, prefix: str = "ch") -> List[str]:
    """``count`` channel names, spread so that each server of the pool holds some."""
    servers = [server.name for server in service.pool.servers]
    by_server: Dict[str, List[str]] = {name: [] for name in servers}
    for i in range(100000):
        name = f"{prefix}{i}"
        by_server[service.pool.server_for_key(name.encode()).name].append(name)
        if all(len(found) * len(servers) >= count for found in by_server.values()):
            break
    names = [found[i] for i in range(count) for found in by_server.values() if i < len(found)]
    return names[:count]


def subscribed_backend_clients(backends) -> int:
    """Connections on the backends subscribed to anything (CLIENT LIST sub/psub/ssub)."""
    total = 0
    for backend in backends:
        for entry in backend.client().client_list():
            if int(entry.get("sub", 0)) or int(entry.get("psub", 0)) or int(entry.get("ssub", 0)):
                total += 1
    return total


def next_message(pubsub, timeout: float = 5.0) -> Dict:
    """The next message (not an ack) within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=max(0.01, deadline - time.monotonic()))
        if message is not None and message["type"] in ("message", "pmessage", "smessage"):
            return message
    raise AssertionError("no message within the deadline")


def ack(pubsub, timeout: float = 5.0) -> Dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=max(0.01, deadline - time.monotonic()))
        if message is not None:
            return message
    raise AssertionError("no ack within the deadline")


@pytest.mark.parametrize("protocol", [2, 3])
def test_30_channels_over_3_servers_acks_1_to_30_and_every_message_arrives(redis_servers, proxy, protocol) -> None:
    backends = redis_servers(3)
    service = proxy(pool_yaml(backends, hash="murmur"))
    names = channels_on_every_server(service, 30)
    pubsub = client(service, protocol=protocol).pubsub()
    for index, name in enumerate(names, 1):
        pubsub.subscribe(name)
        got = ack(pubsub)
        assert (got["type"], got["channel"], got["data"]) == ("subscribe", name.encode(), index)
    publisher = client(service, protocol=2)
    for name in names:
        assert publisher.publish(name, f"hello {name}") == 1
    received = {}
    for _ in names:
        message = next_message(pubsub)
        received[message["channel"]] = message["data"]
    assert received == {name.encode(): f"hello {name}".encode() for name in names}
    wait_until(lambda: subscribed_backend_clients(backends) == 3, what="one subscriber connection per server")
    assert service.subscribers.connection_count == 3 and service.subscribers.subscribers == 1
    assert service.subscribers.messages == 30
    pubsub.unsubscribe()
    counts = sorted(ack(pubsub)["data"] for _ in names)
    assert counts == list(range(30))
    wait_until(lambda: subscribed_backend_clients(backends) == 0, what="no subscribed proxy connection left")
    wait_until(lambda: service.subscribers.connection_count == 0, what="subscriber connections closed")
    pubsub.close()


@pytest.mark.parametrize("protocol", [2, 3])
def test_psubscribe_receives_from_every_server(redis_servers, proxy, protocol) -> None:
    backends = redis_servers(3)
    service = proxy(pool_yaml(backends, hash="murmur"))
    names = channels_on_every_server(service, 12, prefix="n")
    pubsub = client(service, protocol=protocol).pubsub()
    pubsub.psubscribe("n*")
    got = ack(pubsub)
    assert (got["type"], got["channel"], got["data"]) == ("psubscribe", b"n*", 1)
    wait_until(lambda: subscribed_backend_clients(backends) == 3, what="the pattern on every server")
    publisher = client(service)
    for name in names:
        assert publisher.publish(name, name) == 1   # one server's pattern subscriber: the proxy's
    seen = {next_message(pubsub)["channel"] for _ in names}
    assert seen == {name.encode() for name in names}
    assert publisher.pubsub_numpat() == 1
    pubsub.close()


def test_resp2_subscribed_mode_has_redis_rules_and_replies(redis_servers, proxy) -> None:
    """GET while subscribed gets Redis's exact error, PING its ``pong`` array; redis-py sees the same."""
    backends = redis_servers(3)
    service = proxy(pool_yaml(backends))
    raw = Raw(service.port_number)
    assert raw.ask(b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n", "SUBSCRIBE", "a") == \
        b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n"
    refusal = (b"-ERR Can't execute 'get': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are "
               b"allowed in this context\r\n")
    assert raw.ask(refusal, "GET", "k") == refusal
    assert raw.ask(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n", "PING") == b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"
    raw.close()
    pubsub = client(service, protocol=2).pubsub()
    pubsub.subscribe("a")
    ack(pubsub)
    pubsub.execute_command("PING")
    assert pubsub.parse_response(timeout=5) == [b"pong", b""]
    pubsub.execute_command("GET", "k")
    with pytest.raises(redis.ResponseError, match="Can't execute 'get'"):
        pubsub.parse_response(timeout=5)
    pubsub.close()


def test_replies_are_byte_for_byte_those_of_one_redis(redis_servers, proxy) -> None:
    """The same session against one redis-server and through the proxy over 3 gets the same bytes."""
    backends = redis_servers(4)
    direct, behind = backends[0], backends[1:]
    service = proxy(pool_yaml(behind, hash="murmur"))
    a, b, c = channels_on_every_server(service, 3, prefix="x")
    script = [
        ("UNSUBSCRIBE",), ("PUNSUBSCRIBE",), ("SUNSUBSCRIBE",), ("UNSUBSCRIBE", "nothing"),
        ("SUBSCRIBE", a, b, a), ("PSUBSCRIBE", "x*"), ("SSUBSCRIBE", b, c), ("SUBSCRIBE", c),
        ("GET", "k"), ("GET",), ("PING",), ("PING", "hi"), ("PING", "a", "b"), ("HELLO", "3"), ("SUBSCRIBE",),
        ("CLIENT", "LIST"), ("PUBLISH", "a", "b"), ("PUBSUB", "NUMSUB"),
        ("UNSUBSCRIBE", "zz"), ("UNSUBSCRIBE", b), ("PUNSUBSCRIBE", "x*", "y*"), ("PUNSUBSCRIBE",),
        ("GET", "k"), ("SUNSUBSCRIBE", b), ("GET", "k"), ("SUNSUBSCRIBE",), ("UNSUBSCRIBE", a, c),
        ("GET", "k"),
        ("HELLO", "3", "SETNAME", "n"), ("SUBSCRIBE", a), ("GET", "k"), ("PING",), ("UNSUBSCRIBE",),
        ("SSUBSCRIBE", a), ("SUNSUBSCRIBE",),
    ]
    direct_raw, proxy_raw = Raw(direct.port), Raw(service.port_number)
    for command in script:
        want = _exchange(direct_raw, command)
        if command[0] == "HELLO":   # the server's identity differs; the proto does not
            _exchange(proxy_raw, command)
            continue
        assert _exchange(proxy_raw, command) == want, command


def _exchange(raw: Raw, command: tuple) -> bytes:
    """Send ``command`` then ``PING <marker>``; everything up to the marker's echo (whatever the mode)."""
    raw.marker = getattr(raw, "marker", 0) + 1
    marker = b"marker-%d\r\n" % raw.marker
    raw.send(*command)
    raw.send("PING", marker[:-2])
    while marker not in raw.buffer:
        chunk = raw.sock.recv(65536)
        assert chunk, "connection closed"
        raw.buffer += chunk
    end = raw.buffer.index(marker) + len(marker)
    got, raw.buffer = raw.buffer[:end], raw.buffer[end:]
    return got


def test_pubsub_questions_merge_over_servers_as_one_redis(redis_servers, proxy) -> None:
    backends = redis_servers(3)
    service = proxy(pool_yaml(backends, hash="murmur"))
    names = channels_on_every_server(service, 9, prefix="q")
    subscriber = client(service).pubsub()
    subscriber.subscribe(*names)
    subscriber.psubscribe("q*", "r*")
    subscriber.ssubscribe(names[0], names[1])
    for _ in range(len(names) + 4):
        ack(subscriber)
    asker = client(service)
    assert sorted(asker.pubsub_channels()) == sorted(name.encode() for name in names)
    assert sorted(asker.pubsub_channels("q1*")) == sorted(n.encode() for n in names if n.startswith("q1"))
    assert asker.pubsub_numsub(*names, "nobody") == [(name.encode(), 1) for name in names] + [(b"nobody", 0)]
    assert asker.pubsub_numpat() == 2
    assert sorted(asker.pubsub_shardchannels()) == sorted([names[0].encode(), names[1].encode()])
    assert asker.pubsub_shardnumsub(names[1], names[0]) == [(names[1].encode(), 1), (names[0].encode(), 1)]
    assert asker.spublish(names[0], "s") == 1
    message = next_message(subscriber)
    assert (message["type"], message["data"]) == ("smessage", b"s")
    raw = Raw(service.port_number)
    for command, want in [
        (("PUBSUB",), b"-ERR wrong number of arguments for 'pubsub' command\r\n"),
        (("PUBSUB", "BOGUS"), b"-ERR unknown subcommand 'BOGUS'. Try PUBSUB HELP.\r\n"),
        (("PUBSUB", "NUMPAT", "x"), b"-ERR wrong number of arguments for 'pubsub|numpat' command\r\n"),
        (("PUBSUB", "channels", "a", "b"),
         b"-ERR unknown subcommand or wrong number of arguments for 'channels'. Try PUBSUB HELP.\r\n"),
        (("PUBSUB", "NUMSUB"), b"*0\r\n"),
        (("PUBLISH", "a"), b"-ERR wrong number of arguments for 'publish' command\r\n"),
    ]:
        assert raw.ask(want, *command) == want   # as redis-server 7.0 answers (checked in the byte test)
        direct = Raw(backends[0].port)
        assert direct.ask(want, *command) == want
        direct.close()
    subscriber.close()


def test_resp3_normal_commands_work_while_subscribed(redis_servers, proxy) -> None:
    backends = redis_servers(3)
    service = proxy(pool_yaml(backends))
    raw = Raw(service.port_number)
    raw.send("HELLO", "3")
    _exchange(raw, ("PING",))
    sub = b">3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n"
    assert raw.ask(sub, "SUBSCRIBE", "a") == sub
    assert raw.ask(b"+OK\r\n", "SET", "k", "v") == b"+OK\r\n"
    assert raw.ask(b"$1\r\nv\r\n", "GET", "k") == b"$1\r\nv\r\n"
    assert raw.ask(b"+PONG\r\n", "PING") == b"+PONG\r\n"
    client(service).publish("a", "m")
    pushed = b">3\r\n$7\r\nmessage\r\n$1\r\na\r\n$1\r\nm\r\n"
    assert raw.read(len(pushed)) == pushed


def test_after_unsubscribe_normal_commands_work_and_no_backend_is_subscribed(redis_servers, proxy) -> None:
    backends = redis_servers(3)
    service = proxy(pool_yaml(backends, hash="murmur"))
    names = channels_on_every_server(service, 6)
    raw = Raw(service.port_number)
    raw.send("SUBSCRIBE", *names)
    raw.send("PSUBSCRIBE", "p*")
    _exchange(raw, ("PING",))
    wait_until(lambda: subscribed_backend_clients(backends) == 3, what="subscriptions on the backends")
    _exchange(raw, ("UNSUBSCRIBE",))
    _exchange(raw, ("PUNSUBSCRIBE",))
    assert raw.ask(b"+OK\r\n", "SET", "k", "v") == b"+OK\r\n"
    assert raw.ask(b"$1\r\nv\r\n", "GET", "k") == b"$1\r\nv\r\n"
    wait_until(lambda: subscribed_backend_clients(backends) == 0, what="no subscribed proxy connection")
    wait_until(lambda: service.subscribers.connection_count == 0, what="subscriber connections closed")


def test_a_client_that_disconnects_leaves_no_subscriber_connection(redis_servers, proxy) -> None:
    backends = redis_servers(3)
    service = proxy(pool_yaml(backends, hash="murmur"))
    pubsub = client(service, protocol=3).pubsub()
    pubsub.subscribe(*channels_on_every_server(service, 6))
    pubsub.psubscribe("z*")
    for _ in range(7):
        ack(pubsub)
    wait_until(lambda: subscribed_backend_clients(backends) == 3, what="subscriptions on the backends")
    pubsub.connection.disconnect()
    wait_until(lambda: subscribed_backend_clients(backends) == 0, what="the subscriber connections closed")
    wait_until(lambda: service.subscribers.connection_count == 0 and service.subscribers.subscribers == 0,
               what="the hub to forget the client")


def test_keyevent_expired_is_seen_from_every_server(redis_servers, proxy) -> None:
    backends = redis_servers(3)
    for backend in backends:
        backend.client().config_set("notify-keyspace-events", "Ex")
    service = proxy(pool_yaml(backends, hash="murmur"))
    keys = channels_on_every_server(service, 9, prefix="exp")
    pubsub = client(service).pubsub()
    pubsub.psubscribe("__keyevent@0__:expired")
    ack(pubsub)
    wait_until(lambda: subscribed_backend_clients(backends) == 3, what="the pattern on every server")
    writer = client(service)
    for key in keys:
        writer.set(key, "v", px=30)
    expired = set()
    deadline = time.monotonic() + 10
    while expired != {key.encode() for key in keys} and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.2)
        if message is None:
            for key in keys:   # a read expires a key at once, if the active cycle has not yet
                writer.get(key)
            continue
        if message["type"] == "pmessage":
            assert message["channel"] == b"__keyevent@0__:expired"
            expired.add(message["data"])
    assert expired == {key.encode() for key in keys}


def test_keyspace_channel_routes_by_the_key_it_names(redis_servers, proxy) -> None:
    backends = redis_servers(3)
    for backend in backends:
        backend.client().config_set("notify-keyspace-events", "K$")
    service = proxy(pool_yaml(backends, hash="murmur"))
    keys = channels_on_every_server(service, 9, prefix="ks")
    pubsub = client(service, protocol=3).pubsub()
    pubsub.subscribe(*(f"__keyspace@0__:{key}" for key in keys))
    for _ in keys:
        ack(pubsub)
    writer = client(service)
    for key in keys:
        writer.set(key, "v")
    seen = {next_message(pubsub)["channel"] for _ in keys}
    assert seen == {f"__keyspace@0__:{key}".encode() for key in keys}
    # Each key's server got exactly that key's subscription.
    for key in keys:
        name = service.pool.server_for_key(key.encode()).name
        backend = next(b for b in backends if b.address == name)
        assert backend.client().pubsub_numsub(f"__keyspace@0__:{key}") == [(f"__keyspace@0__:{key}".encode(), 1)]


def test_a_subscriber_idle_longer_than_the_pool_timeout_keeps_receiving(redis_servers, proxy) -> None:
    backends = redis_servers(2)
    service = proxy(pool_yaml(backends, timeout=200))
    pubsub = client(service).pubsub()
    pubsub.subscribe("idle")
    ack(pubsub)
    assert pubsub.get_message(timeout=0.8) is None   # four timeouts of silence
    assert client(service).publish("idle", "still here") == 1
    assert next_message(pubsub)["data"] == b"still here"


def test_subscriber_connections_per_server_are_capped_with_a_clear_error(redis_servers, proxy) -> None:
    backends = redis_servers(1)
    service = proxy(pool_yaml(backends, server_subscriber_connections=2))
    first, second = client(service).pubsub(), client(service).pubsub()
    first.subscribe("a")
    second.subscribe("b")
    ack(first), ack(second)
    raw = Raw(service.port_number)
    want = (b"-ERR max number of subscriber connections to server '%s' reached (server_subscriber_connections: 2)\r\n"
            % service.pool.servers[0].name.encode())
    assert raw.ask(want, "SUBSCRIBE", "c") == want
    assert raw.ask(b"$-1\r\n", "GET", "nothing") == b"$-1\r\n"   # not subscribed: a normal client still
    assert service.subscribers.refused == 1
    first.close()
    wait_until(lambda: service.subscribers.connection_count == 1, what="a freed subscriber connection")
    sub = b"*3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n"
    assert raw.ask(sub, "SUBSCRIBE", "c") == sub


def test_a_server_removed_by_reload_moves_its_subscriptions(redis_servers, proxy, reactor) -> None:
    """What the removed server held is subscribed where the channels now live; the client notices nothing."""
    backends = redis_servers(3)
    service = proxy(pool_yaml(backends, hash="murmur"))
    names = channels_on_every_server(service, 12)
    pubsub = client(service).pubsub()
    pubsub.subscribe(*names)
    for _ in names:
        ack(pubsub)
    (new,) = load_text(pool_yaml(backends[:2], hash="murmur"))
    new = dataclasses.replace(new, listen=service.config.listen)
    in_reactor(reactor, service.apply, diff_pool(service.config, new))
    publisher = client(service)
    wait_until(lambda: publisher.pubsub_numsub(*names) == [(name.encode(), 1) for name in names],
               what="every channel subscribed on its new server")
    for name in names:
        assert publisher.publish(name, name) == 1
    seen = {next_message(pubsub)["channel"] for _ in names}
    assert seen == {name.encode() for name in names}
    wait_until(lambda: subscribed_backend_clients(backends[2:]) == 0, what="the removed server left alone")


def test_stats_and_metrics_count_subscribers_connections_and_messages(redis_servers, proxy) -> None:
    from twinproxy import metrics, stats

    backends = redis_servers(2)
    service = proxy(pool_yaml(backends))
    pubsub = client(service).pubsub()
    pubsub.psubscribe("m*")
    ack(pubsub)
    client(service).publish("m1", "x")
    next_message(pubsub)
    document = stats.pool_document(service)
    assert (document["subscribers"], document["subscriber_connections"], document["messages_relayed"]) == (1, 2, 1)
    text = metrics.render(lambda: [service], 0.0, service._reactor).decode()
    assert 'twinproxy_pool_subscribers{pool="alpha"} 1.0' in text
    assert 'twinproxy_pool_subscriber_connections{pool="alpha"} 2.0' in text
    assert 'twinproxy_pool_messages_relayed_total{pool="alpha"} 1.0' in text


def test_a_sentinel_master_switch_moves_the_subscriptions_to_the_new_master(sentinel_topology,
                                                                             sentinel_proxy) -> None:
    """SENTINEL FAILOVER: the same PubSub connection goes on receiving, from the new master."""
    from tests.sentinel_servers import keys_on

    topology = sentinel_topology
    process, _ = sentinel_proxy(topology)
    host, _, port = process.bound_doc["pools"]["alpha"].rpartition(":")

    def make_client(protocol: int) -> redis.Redis:
        return redis.Redis(host=host, port=int(port), protocol=protocol, socket_timeout=5, socket_connect_timeout=5)

    channels = keys_on(process.text, "s1", 3, prefix="sw")
    pubsub = make_client(protocol=3).pubsub()
    pubsub.subscribe(*channels)
    pubsub.psubscribe("sw*")
    for _ in range(4):
        ack(pubsub)
    old, new = topology.master("s1"), topology.replica("s1")
    asked = topology.failover("s1")
    topology.watcher.wait("s1", timeout=15, after=asked)

    def subscribed_on_new_master() -> bool:
        entries = new.client().client_list()
        return any(int(entry.get("sub", 0)) == 3 and int(entry.get("psub", 0)) == 1 for entry in entries)

    wait_until(subscribed_on_new_master, timeout=15, what="the subscriptions on the new master")
    publisher = make_client(protocol=2)
    wait_until(lambda: publisher.publish(channels[0], "probe") >= 2, timeout=15,
               what="publishes reaching the new master")
    for channel in channels:
        publisher.publish(channel, "after")
    got = []
    deadline = time.monotonic() + 10
    while len(got) < 2 * len(channels) and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.5)
        if message is not None and message.get("data") == b"after":
            got.append((message["type"], message["channel"]))
    assert sorted(got) == sorted([("message", c.encode()) for c in channels]
                                 + [("pmessage", c.encode()) for c in channels])
    # The old master keeps only the sentinels' own subscriptions (__sentinel__:hello).
    wait_until(lambda: not any(int(entry.get("psub", 0)) or int(entry.get("sub", 0)) > 1
                               for entry in old.client().client_list()),
               what="the proxy's subscriber connection to the old master closed")


def test_pubsub_inside_multi_is_refused_and_spoils_the_transaction(redis_servers, proxy) -> None:
    service = proxy(pool_yaml(redis_servers(2)))
    raw = Raw(service.port_number)
    assert raw.ask(b"+OK\r\n", "MULTI") == b"+OK\r\n"
    refusal = b"-ERR 'subscribe' inside MULTI is not supported by twinproxy\r\n"
    assert raw.ask(refusal, "SUBSCRIBE", "x") == refusal
    aborted = b"-EXECABORT Transaction discarded because of previous errors.\r\n"
    assert raw.ask(aborted, "EXEC") == aborted
    assert service.subscribers.connection_count == 0
