"""The server pool on a fake clock: routing, ejection, retry, topology swaps."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twinproxy import hashing
from twinproxy.config import load_text
from twinproxy.pool import ServerPool

TEXT = """\
alpha:
  listen: 127.0.0.1:22121
  hash: fnv1a_64
  distribution: ketama
  auto_eject_hosts: {eject}
  server_failure_limit: 2
  server_retry_timeout: 5000
  servers:
   - 10.0.0.1:11211:1 a
   - 10.0.0.2:11211:1 b
   - 10.0.0.3:11211:1 c
"""


def make_pool(eject: str = "true"):
    (config,) = load_text(TEXT.format(eject=eject))
    clock = Clock()
    return ServerPool(config, clock), clock, config


KEYS = [b"key:%d" % i for i in range(300)]


class PoolTests(SynchronousTestCase):
    def test_every_server_owns_some_keys(self) -> None:
        pool, _, _ = make_pool()
        owners = {pool.server_for_key(k).name for k in KEYS}
        self.assertEqual(owners, {"a", "b", "c"})

    def test_failures_below_limit_do_not_eject(self) -> None:
        pool, clock, _ = make_pool()
        a = pool.servers[0]
        pool.record_failure(a)
        pool.record_success(a)
        pool.record_failure(a)
        self.assertEqual(len(pool.live_servers), 3)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_limit_ejects_and_retry_timeout_brings_back(self) -> None:
        pool, clock, _ = make_pool()
        before = {k: pool.server_for_key(k).name for k in KEYS}
        a = pool.servers[0]
        pool.record_failure(a, "Connection refused")
        pool.record_failure(a, "Connection refused")
        self.assertEqual([s.name for s in pool.live_servers], ["b", "c"])
        self.assertTrue(a.ejected)
        self.assertEqual((a.ejects, a.ejected_at), (1, 0.0))
        moved = {k for k in KEYS if before[k] == "a"}
        for key in KEYS:
            owner = pool.server_for_key(key).name
            self.assertNotEqual(owner, "a")
            if key not in moved:  # consistent hashing: only a's keys move
                self.assertEqual(owner, before[key])
        clock.advance(4.999)
        self.assertEqual(len(pool.live_servers), 2)
        clock.advance(0.002)
        self.assertEqual([s.name for s in pool.live_servers], ["a", "b", "c"])
        self.assertEqual({k: pool.server_for_key(k).name for k in KEYS}, before)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_no_eject_without_auto_eject_hosts(self) -> None:
        pool, clock, _ = make_pool("false")
        for _ in range(10):
            pool.record_failure(pool.servers[1])
        self.assertEqual(len(pool.live_servers), 3)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_all_ejected_routes_to_unavailable(self) -> None:
        pool, clock, _ = make_pool()
        for server in pool.servers:
            pool.record_failure(server)
            pool.record_failure(server)
        self.assertIs(pool.server_for_key(b"k"), pool.unavailable)
        clock.advance(5)
        self.assertEqual(len(pool.live_servers), 3)

    def test_stop_leaves_no_delayed_calls(self) -> None:
        pool, clock, _ = make_pool()
        pool.record_failure(pool.servers[0])
        pool.record_failure(pool.servers[0])
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        pool.stop()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_install_keeps_servers_by_name(self) -> None:
        pool, _, config = make_pool()
        a, b, c = pool.servers
        (other,) = load_text(TEXT.format(eject="true").replace("10.0.0.3:11211:1 c", "10.0.0.4:11211:1 d")
                             .replace("10.0.0.2:11211:1 b", "10.0.0.9:11211:1 b"))
        dropped = pool.install(other)
        self.assertEqual(dropped, [c])
        self.assertIs(pool.servers[0], a)
        self.assertIs(pool.servers[1], b)  # same name, new address: the same server
        self.assertEqual(b.spec.host, "10.0.0.9")
        self.assertEqual({pool.server_for_key(k).name for k in KEYS}, {"a", "b", "d"})

    def test_install_changes_hash_and_distribution_at_once(self) -> None:
        pool, _, config = make_pool()
        (modula,) = load_text(TEXT.format(eject="true").replace("hash: fnv1a_64", "hash: md5")
                               .replace("distribution: ketama", "distribution: modula"))
        reference = ServerPool(modula, Clock())
        pool.install(modula)
        self.assertEqual([pool.server_for_key(k).name for k in KEYS],
                         [reference.server_for_key(k).name for k in KEYS])

    def test_install_without_auto_eject_returns_ejected_servers(self) -> None:
        pool, _, config = make_pool()
        pool.record_failure(pool.servers[0])
        pool.record_failure(pool.servers[0])
        self.assertEqual(len(pool.live_servers), 2)
        (no_eject,) = load_text(TEXT.format(eject="false"))
        pool.install(no_eject)
        self.assertEqual(len(pool.live_servers), 3)

    def test_single_server_pool(self) -> None:
        (config,) = load_text("p:\n  listen: 127.0.0.1:1\n  servers:\n   - 10.0.0.1:1:1\n")
        pool = ServerPool(config, Clock())
        self.assertIs(pool.server_for_key(b"anything"), pool.servers[0])


class RouteTests(SynchronousTestCase):
    """Every way ``server_for_key`` is built (hash in C or Python, ketama or
    modula, hash tag or not) routes as the reference: the continuum's own
    lookup of the Python hash of the tagged key."""

    def test_routes_match_the_reference(self) -> None:
        keys = [b"key:%d" % i for i in range(200)] + [b"{user1}:a", b"{user1}:b", b"\xff\x80high", b""]
        for name in hashing.HASH_FUNCTIONS:
            for distribution in ("ketama", "modula"):
                for tag in ("", "  hash_tag: \"{}\"\n"):
                    (config,) = load_text(
                        f"p:\n  listen: 127.0.0.1:1\n  hash: {name}\n  distribution: {distribution}\n{tag}"
                        "  servers:\n   - 10.0.0.1:1:1 a\n   - 10.0.0.2:1:2 b\n   - 10.0.0.3:1:1 c\n")
                    pool = ServerPool(config, Clock())
                    reference = getattr(hashing, name)
                    extract = hashing.hash_tag_extractor(config.hash_tag)
                    expected = [pool.live_servers[pool._continuum.lookup(reference(extract(k)))] for k in keys]
                    label = f"{name} {distribution} tag={bool(tag)}"
                    for _ in range(2):  # the second time from the route cache, where there is one
                        self.assertEqual([pool.server_for_key(k) for k in keys], expected, label)
                        self.assertEqual(pool.servers_for_keys(keys), expected, label)

    def test_routes_follow_the_ring_after_an_ejection(self) -> None:
        pool, clock, _ = make_pool()
        owner = pool.server_for_key(b"key:1")
        pool.record_failure(owner)
        pool.record_failure(owner)
        self.assertNotIn(owner, pool.servers_for_keys(KEYS))
        clock.advance(5)
        self.assertIs(pool.server_for_key(b"key:1"), owner)
