"""limits (Flask-Limiter's engine): the moving-window limiter on Redis through the 3-server pool.

Each (limit, identity) is one sorted list, read and written by a Lua script (``register_script``:
EVALSHA, SCRIPT LOAD on NOSCRIPT). Flask-Limiter adds a Flask layer over this same storage and sends
nothing else to Redis, so ``limits`` alone is what is tested.
"""

from __future__ import annotations

import time

import pytest

from tests.compat.conftest import CompatPool
from tests.servers import wait_until

ALLOWED = 5
WINDOW = 3  # seconds
USERS = [f"user{index}" for index in range(6)]  # their lists land on all three servers


@pytest.mark.timeout(60)
def test_moving_window_allows_n_refuses_the_next_and_resets_after_the_window(pool3: CompatPool) -> None:
    from limits import RateLimitItemPerSecond
    from limits.storage import RedisStorage
    from limits.strategies import MovingWindowRateLimiter

    storage = RedisStorage(pool3.url(), socket_timeout=10, socket_connect_timeout=10)
    assert storage.check()
    limiter = MovingWindowRateLimiter(storage)
    limit = RateLimitItemPerSecond(ALLOWED, WINDOW)

    started = time.monotonic()
    for user in USERS:
        for hit in range(ALLOWED):
            assert limiter.hit(limit, "api", user), (user, hit)
        assert not limiter.hit(limit, "api", user)
        assert not limiter.test(limit, "api", user)
        assert limiter.get_window_stats(limit, "api", user).remaining == 0
    refused_by = time.monotonic() - started
    assert refused_by < WINDOW, f"the hits took {refused_by:.2f}s, longer than the window: the refusals prove nothing"
    assert limiter.test(limit, "api", "someone-else")
    assert len(pool3.all_backend_keys()) == len(USERS)

    # The first hit leaves the window WINDOW seconds after it was made, and not before.
    wait_until(lambda: limiter.test(limit, "api", USERS[0]), timeout=WINDOW + 5, interval=0.05,
               what="the moving window to let a hit in again")
    assert time.monotonic() - started >= WINDOW - 0.1
    for user in USERS:
        wait_until(lambda user=user: limiter.get_window_stats(limit, "api", user).remaining == ALLOWED,
                   timeout=5, interval=0.05, what=f"{user}'s window to be empty again")
        assert limiter.hit(limit, "api", user)
        assert limiter.get_window_stats(limit, "api", user).remaining == ALLOWED - 1

    limiter.clear(limit, "api", USERS[1])
    assert limiter.get_window_stats(limit, "api", USERS[1]).remaining == ALLOWED
