"""Django's built-in Redis cache backend (``django.core.cache.backends.redis.RedisCache``).

``set_many`` is one MULTI over MSET and an EXPIRE per key, ``get_many`` an MGET, ``delete_many`` a DEL,
``clear`` a FLUSHDB. On the 3-server pool a ``KEY_PREFIX`` holding a hash tag keeps every key of the cache on
one server (so its transactions are one server's); on the 1-server pool the keys are left untagged.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator

import pytest

from tests.compat.conftest import CompatPool

VALUES = {
    "user:1": {"name": "ada", "languages": ["en", "fr"]},
    "page:/index": "<html>index</html>",
    "hits": 41,
    "raw": b"\x00\xff\r\n",
    "empty": "",
}


@pytest.fixture
def django_cache() -> Iterator[Callable[[str, str], object]]:
    """``django_cache(location, key_prefix)``: Django's ``caches["default"]``, a RedisCache at ``location``.

    Django's settings are configured once per process (``settings.configure``), so each test's cache
    comes with ``override_settings``, which also resets the cache handler.
    """
    from django.conf import settings

    if not settings.configured:
        settings.configure(CACHES={"default": {"BACKEND": "django.core.cache.backends.dummy.DummyCache"}})
    from django.core.cache import caches
    from django.test.utils import override_settings

    overrides = []

    def make(location: str, key_prefix: str):
        override = override_settings(CACHES={"default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": location,
            "KEY_PREFIX": key_prefix, "TIMEOUT": 60, "OPTIONS": {"socket_timeout": 10}}})
        override.enable()
        overrides.append(override)
        return caches["default"]

    yield make
    caches.close_all()
    for override in reversed(overrides):
        override.disable()


@pytest.mark.parametrize("pool_name, key_prefix", [("three", "{site}"), ("one", "site")])
def test_django_cache_set_get_delete_incr_clear(compat_pools: Dict[str, CompatPool], django_cache,
                                                pool_name: str, key_prefix: str) -> None:
    pool = compat_pools[pool_name]
    cache = django_cache(pool.url(), key_prefix)
    assert cache.set_many(VALUES, timeout=60) == []
    assert cache.get_many([*VALUES, "missing"]) == VALUES
    assert cache.get("user:1") == VALUES["user:1"]

    stored = {f"{key_prefix}:1:{key}".encode() for key in VALUES}
    assert set(pool.all_backend_keys()) == stored
    for backend in pool.backends:
        with backend.client() as server:
            for key in server.keys("*"):
                assert 0 < server.ttl(key) <= 60, key  # set_many's EXPIREs ran with its MSET

    assert cache.incr("hits") == 42
    assert cache.incr("hits", 8) == 50
    assert cache.decr("hits", 10) == 40
    with pytest.raises(ValueError):
        cache.incr("missing")
    assert cache.add("hits", 0) is False
    assert cache.add("fresh", "new") is True
    assert cache.get("hits") == 40 and cache.get("fresh") == "new"

    cache.delete_many(["user:1", "page:/index", "missing"])
    assert cache.get_many(list(VALUES)) == {"hits": 40, "raw": b"\x00\xff\r\n", "empty": ""}
    assert cache.has_key("raw") and not cache.has_key("user:1")

    # Other keys on every server: clear() is FLUSHDB, and empties every backend of the pool.
    other = pool.client()
    other.mset({f"{{other{index}}}": index for index in range(12)})
    placed = pool.backend_keys()
    assert all(placed.values()), placed
    assert cache.clear() is True
    assert pool.all_backend_keys() == []
    assert cache.get_many([*VALUES, "fresh"]) == {}
