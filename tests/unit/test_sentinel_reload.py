"""A reload of a Sentinel pool, applied to its runtime in memory: new shards get the new settings."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock

from twinproxy.config import load_text
from twinproxy.credentials import Credentials, pool_credentials
from twinproxy.runtime import PoolRuntime
from twinproxy.topology import diff_pool

BEFORE = """\
alpha:
  listen: 127.0.0.1:22121
  redis: true
  redis_auth: old
  failover_hold: 2000
  sentinels:
    - 10.9.0.1:26379
  sentinel_auth: first-secret
  servers:
    - 10.0.0.1:6379:1 s1
"""
AFTER = BEFORE.replace("redis_auth: old", "redis_auth: new").replace("failover_hold: 2000", "failover_hold: 500") \
    .replace("first-secret", "second-secret").replace("    - 10.0.0.1:6379:1 s1\n",
                                                       "    - 10.0.0.1:6379:1 s1\n    - 10.0.0.2:6379:1 s2\n")


def test_a_shard_added_by_a_reload_that_changes_settings_gets_the_new_settings() -> None:
    before, after = load_text(BEFORE)[0], load_text(AFTER)[0]
    runtime = PoolRuntime(before, MemoryReactorClock(), outbox=None)
    runtime.apply(diff_pool(before, after))
    shards = runtime.sentinel.shards
    for name in ("s1", "s2"):
        shard = shards[name]
        assert shard.config.failover_hold == 500, name
        assert shard.master.codec.handshake(2)[0] == b"*2\r\n$4\r\nAUTH\r\n$3\r\nnew\r\n", name
        assert shard.replicas.config.redis_auth == "new", name
    runtime.stop()


def test_a_reload_never_shows_the_sentinel_password() -> None:
    before, after = load_text(BEFORE)[0], load_text(AFTER)[0]
    lines = diff_pool(before, after).describe()
    assert "pool alpha: sentinel_auth changed" in lines
    assert not any("secret" in line for line in lines)


def test_a_reload_that_names_an_acl_user_logs_every_data_connection_in_as_it() -> None:
    """redis_auth_user is part of the handshake and of the ROLE and replica checks' login, like redis_auth."""
    before = load_text(BEFORE)[0]
    after = load_text(BEFORE.replace("redis_auth: old\n", "redis_auth: old\n  redis_auth_user: alice\n"))[0]
    diff = diff_pool(before, after)
    assert diff.settings == ("redis_auth_user",) and diff.handshake_changed
    runtime = PoolRuntime(before, MemoryReactorClock(), outbox=None)
    watcher = runtime.sentinel.watcher
    role_client = watcher._node(("10.0.0.1", 6379))
    runtime.apply(diff)
    assert role_client._closed and watcher._node(("10.0.0.1", 6379)) is not role_client
    assert watcher._node(("10.0.0.1", 6379))._auth == [b"AUTH", b"alice", b"old"]
    shard = runtime.sentinel.shards["s1"]
    assert shard.master.codec.handshake(2)[0] == b"*3\r\n$4\r\nAUTH\r\n$5\r\nalice\r\n$3\r\nold\r\n"
    assert pool_credentials(shard.replicas.config) == Credentials("old", "alice")
    runtime.stop()
