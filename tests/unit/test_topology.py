"""The pure diff between two pool files: every kind of change, and none."""

from __future__ import annotations

from twinproxy.config import load_text
from twinproxy.topology import diff_pool, diff_pools

BASE = {
    "listen": "127.0.0.1:22121",
    "redis": "true",
    "hash": "fnv1a_64",
    "distribution": "ketama",
    "timeout": "400",
}
SERVERS = ["10.0.0.1:6379:1 a", "10.0.0.2:6379:1 b", "10.0.0.3:6379:1 c"]


def pool(name: str = "alpha", servers=SERVERS, **keys):
    values = dict(BASE, **keys)
    lines = [f"{name}:"] + [f"  {k}: {v}" for k, v in values.items() if v is not None] + ["  servers:"]
    lines += [f"   - {s}" for s in servers]
    (config,) = load_text("\n".join(lines) + "\n")
    return config


def test_no_change_is_empty() -> None:
    assert diff_pool(pool(), pool()).empty
    assert diff_pools([pool()], [pool()]).empty


def test_servers_added_removed_by_name() -> None:
    diff = diff_pool(pool(), pool(servers=SERVERS[:2] + ["10.0.0.4:6379:1 d"]))
    assert [s.name for s in diff.added] == ["d"]
    assert [s.name for s in diff.removed] == ["c"]
    assert diff.ring_changed and not diff.readdressed and not diff.settings
    assert diff.describe() == ["pool alpha: server d added (10.0.0.4:6379, weight 1)",
                               "pool alpha: server c removed (10.0.0.3:6379)"]


def test_same_name_new_address_is_a_readdress_and_keeps_the_ring() -> None:
    diff = diff_pool(pool(), pool(servers=["10.0.0.9:6380:1 a", *SERVERS[1:]]))
    assert [(old.address, new.address) for old, new in diff.readdressed] == [("10.0.0.1:6379", "10.0.0.9:6380")]
    assert not diff.added and not diff.removed
    assert not diff.ring_changed  # ketama hashes the name


def test_unnamed_server_moved_is_a_rename() -> None:
    old = pool(servers=["10.0.0.1:6379:1", "10.0.0.2:6379:1"])
    new = pool(servers=["10.0.0.1:6379:1", "10.0.0.5:6379:1"])
    diff = diff_pool(old, new)
    assert [s.name for s in diff.added] == ["10.0.0.5:6379"]
    assert [s.name for s in diff.removed] == ["10.0.0.2:6379"]


def test_reweight_rename_and_order_change_the_ring() -> None:
    diff = diff_pool(pool(), pool(servers=["10.0.0.1:6379:3 a", *SERVERS[1:]]))
    assert [(o.weight, n.weight) for o, n in diff.reweighted] == [(1, 3)] and diff.ring_changed
    renamed = diff_pool(pool(), pool(servers=["10.0.0.1:6379:1 z", *SERVERS[1:]]))
    assert [s.name for s in renamed.added] == ["z"] and [s.name for s in renamed.removed] == ["a"]
    reordered = diff_pool(pool(), pool(servers=[SERVERS[1], SERVERS[0], SERVERS[2]]))
    assert reordered.ring_changed and reordered.describe() == ["pool alpha: server order changed"]


def test_hash_distribution_and_tag() -> None:
    diff = diff_pool(pool(), pool(hash="murmur", distribution="modula", hash_tag='"{}"'))
    assert diff.ring_changed and not diff.settings
    assert diff.describe() == ["pool alpha: hash fnv1a_64 -> murmur", "pool alpha: hash_tag None -> {}",
                               "pool alpha: distribution ketama -> modula"]


def test_settings_and_handshake() -> None:
    diff = diff_pool(pool(), pool(timeout="900", server_connections="3"))
    assert diff.settings == ("timeout", "server_connections") and not diff.handshake_changed
    auth = diff_pool(pool(), pool(redis_auth="secret", redis_db="2"))
    assert auth.handshake_changed
    assert "pool alpha: redis_auth changed" in auth.describe()
    assert all("secret" not in line for line in auth.describe())
    user = diff_pool(pool(redis_auth="secret"), pool(redis_auth="secret", redis_auth_user="alice"))
    assert user.settings == ("redis_auth_user",) and user.handshake_changed
    assert user.describe() == ["pool alpha: redis_auth_user None -> alice"]


def test_listen_moved() -> None:
    diff = diff_pool(pool(), pool(listen="/tmp/alpha.sock"))
    assert diff.listen_changed and diff.describe() == ["pool alpha: listen 127.0.0.1:22121 -> /tmp/alpha.sock"]


def test_pools_added_removed_replaced() -> None:
    old = [pool("alpha"), pool("beta", listen="127.0.0.1:22122")]
    new = [pool("alpha", timeout="500"), pool("beta", listen="127.0.0.1:22122", redis="false"),
           pool("gamma", listen="127.0.0.1:22123")]
    diff = diff_pools(old, new)
    assert [c.name for c in diff.added] == ["gamma"]
    assert [(o.protocol, n.protocol) for o, n in diff.replaced] == [("redis", "memcache")]
    assert [d.name for d in diff.changed] == ["alpha"]
    removed = diff_pools(old, old[:1])
    assert [c.name for c in removed.removed] == ["beta"] and not removed.changed
