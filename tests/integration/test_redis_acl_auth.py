"""``redis_auth`` is the whole password and ``redis_auth_user`` a Redis 6+ ACL user, through a plain
(nutcracker-mode) pool on a real redis-server: the proxy's backend handshake, the AUTH forms its clients may
use, and a reload that changes the user (a handshake change: new backend connections)."""

from __future__ import annotations

import dataclasses
from typing import List

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.conftest import in_reactor, pool_yaml
from tests.servers import LOOPBACK, RedisServer
from twinproxy.config import load_text
from twinproxy.topology import diff_pool

pytestmark = pytest.mark.timeout(60)

DEFAULT_PASSWORD = "the default user's"
ALICE, ALICE_PASSWORD = "alice", "alice's pass"       # spaces are part of a password
BOB, BOB_PASSWORD = "bob", "bob-pw"


def client(port: int, **kwargs) -> redis.Redis:
    """No retries: a refused AUTH is the answer, not something to try again with backoff."""
    kwargs.setdefault("protocol", 2)
    return redis.Redis(host=LOOPBACK, port=port, socket_timeout=5, socket_connect_timeout=5,
                       retry=Retry(NoBackoff(), 0), **kwargs)


def with_users(server: RedisServer) -> RedisServer:
    """``alice`` and ``bob`` on ``server``, and a password for the default user (set after the start: the
    fixture's readiness probe sends its password inline, where a space would split it)."""
    admin = server.client()
    for user, password in ((ALICE, ALICE_PASSWORD), (BOB, BOB_PASSWORD)):
        admin.execute_command("ACL", "SETUSER", user, "on", f">{password}", "~*", "&*", "+@all")
    admin.config_set("requirepass", DEFAULT_PASSWORD)
    return server


def backend_users(server: RedisServer) -> List[str]:
    """The users the server's other clients (the proxy's connections) are logged in as."""
    admin = client(server.port, username=ALICE, password=ALICE_PASSWORD)
    me = admin.client_id()
    return sorted({entry["user"] for entry in admin.client_list() if int(entry["id"]) != me})


def test_an_acl_user_behind_a_plain_pool(redis_servers, proxy) -> None:
    (server,) = redis_servers(1)
    with_users(server)
    service = proxy(pool_yaml([server], redis_auth=ALICE_PASSWORD, redis_auth_user=ALICE))
    port = service.port_number
    as_alice = client(port, username=ALICE, password=ALICE_PASSWORD)          # AUTH alice <password>
    assert as_alice.set("k", "v") and as_alice.get("k") == b"v"
    assert backend_users(server) == [ALICE]                                   # AUTH alice <password> there too
    assert client(server.port, username=ALICE, password=ALICE_PASSWORD).get("k") == b"v"
    # A client may also give the password alone, or as the default user's (the proxy's own gate).
    assert client(port, password=ALICE_PASSWORD).get("k") == b"v"
    assert client(port, username="default", password=ALICE_PASSWORD).get("k") == b"v"
    assert client(port, password=ALICE_PASSWORD, protocol=3).get("k") == b"v"   # HELLO 3 AUTH default <password>
    assert client(port, username=ALICE, password=ALICE_PASSWORD, protocol=3).get("k") == b"v"
    for username, password, protocol in ((BOB, ALICE_PASSWORD, 2), (ALICE, "wrong", 2), (None, "alice's", 2),
                                         (BOB, ALICE_PASSWORD, 3)):
        with pytest.raises(redis.AuthenticationError):
            client(port, username=username, password=password, protocol=protocol).get("k")
    with pytest.raises(redis.AuthenticationError):
        client(port).get("k")


def test_a_password_with_spaces_is_sent_whole(redis_servers, proxy) -> None:
    (server,) = redis_servers(1)
    client(server.port).config_set("requirepass", DEFAULT_PASSWORD)
    service = proxy(pool_yaml([server], redis_auth=DEFAULT_PASSWORD))
    through = client(service.port_number, password=DEFAULT_PASSWORD)
    assert through.set("k", "spaced") and through.get("k") == b"spaced"
    assert client(server.port, password=DEFAULT_PASSWORD).get("k") == b"spaced"
    # Nothing splits it into a user "the" and a password "default user's": that pair is refused.
    with pytest.raises(redis.AuthenticationError):
        client(service.port_number, username="the", password="default user's").get("k")


def test_a_reload_that_changes_the_user_replaces_the_backend_connections(redis_servers, proxy, reactor) -> None:
    (server,) = redis_servers(1)
    with_users(server)
    service = proxy(pool_yaml([server], redis_auth=ALICE_PASSWORD, redis_auth_user=ALICE))
    before = client(service.port_number, password=ALICE_PASSWORD)
    assert before.set("k", "by alice") and backend_users(server) == [ALICE]
    (new,) = load_text(pool_yaml([server], redis_auth=BOB_PASSWORD, redis_auth_user=BOB))
    old = service.runtime.config
    diff = diff_pool(old, dataclasses.replace(new, listen=old.listen))
    assert diff.handshake_changed
    in_reactor(reactor, service.apply, diff)
    # The client that logged in before keeps its session; its next request goes out on a connection
    # that logged in as bob.
    assert before.set("k", "by bob") and before.get("k") == b"by bob"
    assert client(service.port_number, username=BOB, password=BOB_PASSWORD).get("k") == b"by bob"
    assert BOB in backend_users(server)
