"""An adopted pool's placement (twinproxy.cluster.legacy): the same server for every key as the pool itself.

``legacy_router`` must put each key where a nutcracker-mode ServerPool over
the same servers (names, weights, hash, hash tag, distribution) puts it: an
adoption routes by it until the keys move and names each key's source with
it.  Then the checks of the ``adopted`` entry, and the even slot spread.
"""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from twinproxy.cluster.legacy import Legacy, LegacyError, even_spread, legacy_router, make_legacy
from twinproxy.cluster.slots import SLOT_COUNT
from twinproxy.config import PoolConfig, load_text
from twinproxy.hashing import HASH_FUNCTIONS
from twinproxy.pool import ServerPool

NAMED = ["10.0.0.1:6379:1 alpha", "10.0.0.2:6379:3 beta", "10.0.0.3:6380:1 gamma", "10.0.0.4:6379:2 delta"]
# No names: the ring hashes "host:port" (the port left out when it is 11211, as nutcracker does).
UNNAMED = ["10.0.0.1:6379:1", "10.0.0.2:11211:2", "10.0.0.3:7000:1"]
KEYS = ([b"key:%d" % i for i in range(1500)] + [b"{user%d}:cart" % i for i in range(300)]
        + [b"x{}y", b"{}", b"{a", b"a}", b"", b"\xff\x80high", b"{tag}"])


def pool_config(servers, hash_name: str = "fnv1a_64", distribution: str = "ketama", tag: str = "",
                extra=()) -> PoolConfig:
    lines = ["p:", "  listen: 127.0.0.1:22121", "  redis: true", f"  hash: {hash_name}",
             f"  distribution: {distribution}", *extra] + ([f'  hash_tag: "{tag}"'] if tag else []) + ["  servers:"]
    (config,) = load_text("\n".join(lines + [f"   - {server}" for server in servers]) + "\n")
    return config


def legacy_of(config: PoolConfig, gids=None) -> Legacy:
    """The ``adopted`` entry of ``config``: group ``gids[i]`` (default i + 1) for its i-th server."""
    gids = gids or list(range(1, len(config.servers) + 1))
    return make_legacy(config.name, config.hash, config.distribution, config.hash_tag,
                       [(gid, spec.name, spec.weight) for gid, spec in zip(gids, config.servers)])


@pytest.mark.parametrize("distribution", ["ketama", "modula"])
@pytest.mark.parametrize("hash_name", sorted(HASH_FUNCTIONS))
def test_every_key_lands_on_the_server_the_pool_puts_it_on(hash_name: str, distribution: str) -> None:
    for servers in (NAMED, UNNAMED):
        for tag in ("", "{}"):
            config = pool_config(servers, hash_name, distribution, tag)
            pool = ServerPool(config, Clock())
            # Groups in another order than the servers: the router names targets by the pool's order.
            legacy = legacy_of(config, gids=[7, 3, 9, 1][:len(servers)])
            place = legacy_router(legacy, list(range(len(servers))))
            expected = [server.index for server in pool.servers_for_keys(KEYS)]
            got = [place(key) for key in KEYS]
            wrong = [(key, want, have) for key, want, have in zip(KEYS, expected, got) if want != have]
            assert wrong == [], (hash_name, distribution, tag, servers[0], wrong[:5])
            # Every server gets keys (the check means something), save under nutcracker's crc32: its
            # 15-bit values fall below the first ketama point, so its ketama pools use one server.
            degenerate = (hash_name, distribution) == ("crc32", "ketama")
            assert len(set(got)) == (1 if degenerate else len(servers))


def test_tagged_keys_stay_together_as_in_the_pool() -> None:
    config = pool_config(NAMED, "md5", tag="{}")
    place = legacy_router(legacy_of(config), "ABCD")
    assert len({place(b"{user42}:%d" % i) for i in range(50)}) == 1
    untagged = legacy_router(legacy_of(pool_config(NAMED, "md5")), "ABCD")
    assert len({untagged(b"{user42}:%d" % i) for i in range(50)}) > 1


def test_a_one_server_pool_places_everything_on_it() -> None:
    legacy = make_legacy("p", "md5", "modula", None, [(4, "only", 1)])
    place = legacy_router(legacy, ["the-one"])
    assert {place(key) for key in KEYS[:100]} == {"the-one"}


def test_the_router_wants_one_target_per_server() -> None:
    legacy = legacy_of(pool_config(NAMED))
    with pytest.raises(ValueError, match="3 targets for the 4 servers of pool p"):
        legacy_router(legacy, [1, 2, 3])


def test_the_placement_ignores_ejection_the_pool_would_do() -> None:
    # An adopted pool never ejects: the full ring, not the pool's live servers.
    config = pool_config(NAMED, extra=["  auto_eject_hosts: true"])
    reference = ServerPool(config, Clock())
    expected = [server.index for server in reference.servers_for_keys(KEYS)]
    place = legacy_router(legacy_of(config), list(range(4)))
    pool = ServerPool(config, Clock())
    for _ in range(config.server_failure_limit):
        pool.record_failure(pool.servers[1])
    assert len(pool.live_servers) == 3
    assert [place(key) for key in KEYS] == expected


# -- the ``adopted`` entry ----------------------------------------------------------------------------

GOOD = [(1, "a", 1), (2, "b", 2)]


@pytest.mark.parametrize("args, words", [
    (("p", "fnv1a_64", "random", None, GOOD), "distribution 'random' cannot be adopted"),
    (("p", "fnv1a_64", "Ketama", None, GOOD), "distribution 'Ketama' cannot be adopted"),
    (("p", "sha1", "ketama", None, GOOD), "hash 'sha1' is not one of nutcracker's"),
    (("p", "fnv1a_64", "ketama", "{", GOOD), "hash_tag must be null or two characters"),
    (("p", "fnv1a_64", "ketama", "{}}", GOOD), "hash_tag must be null or two characters"),
    (("p", "fnv1a_64", "ketama", "", GOOD), "hash_tag must be null or two characters"),
    (("p", "fnv1a_64", "ketama", 12, GOOD), "hash_tag must be null or two characters"),
    (("", "fnv1a_64", "ketama", None, GOOD), "name must be a non-empty string"),
    ((None, "fnv1a_64", "ketama", None, GOOD), "name must be a non-empty string"),
    (("p", "fnv1a_64", "ketama", None, []), "has no servers"),
    (("p", "fnv1a_64", "ketama", None, [(1, "a", 1), (2, "a", 1)]), "distinct groups and distinct names"),
    (("p", "fnv1a_64", "ketama", None, [(1, "a", 1), (1, "b", 1)]), "distinct groups and distinct names"),
    (("p", "fnv1a_64", "ketama", None, [(1, "a", 0)]), "weight must be a positive integer"),
    (("p", "fnv1a_64", "ketama", None, [(1, "a", True)]), "weight must be a positive integer"),
    (("p", "fnv1a_64", "ketama", None, [(1, "a", "1")]), "weight must be a positive integer"),
    (("p", "fnv1a_64", "ketama", None, [(1, "a", 1.5)]), "weight must be a positive integer"),
    (("p", "fnv1a_64", "ketama", None, [(0, "a", 1)]), "is not a group id"),
    (("p", "fnv1a_64", "ketama", None, [(10000, "a", 1)]), "is not a group id"),
    (("p", "fnv1a_64", "ketama", None, [(True, "a", 1)]), "is not a group id"),
    (("p", "fnv1a_64", "ketama", None, [("1", "a", 1)]), "is not a group id"),
    (("p", "fnv1a_64", "ketama", None, [(1, "", 1)]), "its name must be a non-empty string"),
    (("p", "fnv1a_64", "ketama", None, [(1, 5, 1)]), "its name must be a non-empty string"),
])
def test_make_legacy_refusals(args, words: str) -> None:
    with pytest.raises(LegacyError) as caught:
        make_legacy(*args)
    assert words in str(caught.value)


def test_make_legacy_keeps_the_pool_order_and_names_the_groups() -> None:
    legacy = make_legacy("p", "murmur", "modula", "{}", [(5, "e", 1), (2, "b", 3), (9, "i", 1)])
    assert legacy.gids == (5, 2, 9)
    assert legacy.servers == ((5, "e", 1), (2, "b", 3), (9, "i", 1))
    assert legacy.hash_tag == "{}"


def test_to_dict_from_dict_round_trip() -> None:
    for tag in (None, "{}", "$$"):
        legacy = make_legacy("shop", "crc32a", "ketama", tag, [(3, "a", 1), (1, "b", 4)])
        document = legacy.to_dict()
        assert document == {"pool": "shop", "hash": "crc32a", "distribution": "ketama", "hash_tag": tag,
                            "servers": [{"group": 3, "name": "a", "weight": 1}, {"group": 1, "name": "b", "weight": 4}]}
        assert Legacy.from_dict(document) == legacy


@pytest.mark.parametrize("change, words", [
    (lambda d: ["not", "a", "dict"], "adopted must be an object"),
    (lambda d: {k: v for k, v in d.items() if k != "hash"}, "missing hash"),
    (lambda d: dict(d, extra=1), "unknown extra"),
    (lambda d: dict(d, servers={"group": 1}), "servers must be a list"),
    (lambda d: dict(d, servers=[{"group": 1, "name": "a"}]), "a server must be {group, name, weight}"),
    (lambda d: dict(d, servers=[{"group": 1, "name": "a", "weight": 1, "address": "x"}]),
     "a server must be {group, name, weight}"),
    (lambda d: dict(d, servers=["a"]), "a server must be {group, name, weight}"),
    (lambda d: dict(d, distribution="random"), "cannot be adopted"),
    (lambda d: dict(d, servers=[]), "has no servers"),
])
def test_from_dict_refusals(change, words: str) -> None:
    document = make_legacy("shop", "fnv1a_64", "ketama", None, GOOD).to_dict()
    with pytest.raises(LegacyError) as caught:
        Legacy.from_dict(change(document))
    assert words in str(caught.value)


# -- the slots spread over the groups -------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3, 5, 7, 10, 1024])
def test_even_spread_is_contiguous_in_the_given_order_at_k_n_over_N(count: int) -> None:
    gids = [k * 7919 % 9973 + 1 for k in range(count)]     # distinct ids, in no sorted order
    spread = even_spread(gids, SLOT_COUNT)
    assert sorted(spread) == list(range(SLOT_COUNT))
    for k, gid in enumerate(gids):
        owned = [slot for slot, owner in spread.items() if owner == gid]
        assert owned == list(range(k * SLOT_COUNT // count, (k + 1) * SLOT_COUNT // count)), (k, gid)
    sizes = [list(spread.values()).count(gid) for gid in gids]
    assert max(sizes) - min(sizes) <= 1


def test_even_spread_boundaries_for_three_groups() -> None:
    spread = even_spread([3, 1, 2], SLOT_COUNT)
    assert (spread[0], spread[340], spread[341], spread[681], spread[682], spread[1023]) == (3, 3, 1, 1, 2, 2)
