"""Pool files: nutcracker's keys and defaults, and every refusal named precisely."""

from __future__ import annotations

import pytest

from twinproxy.config import ConfigError, PoolConfig, load_file, load_text

MINIMAL = """\
alpha:
  listen: 127.0.0.1:22121
  servers:
   - 127.0.0.1:11211:1
"""


def pool(extra: str = "", servers: str = "   - 127.0.0.1:11211:1\n") -> str:
    return f"alpha:\n  listen: 127.0.0.1:22121\n{extra}  servers:\n{servers}"


def refused(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_text(text, path="pools.yml")
    return caught.value


def test_defaults_are_nutcrackers() -> None:
    (config,) = load_text(MINIMAL)
    assert config == PoolConfig(name="alpha", listen=config.listen, servers=config.servers)
    assert config.redis is False and config.protocol == "memcache"
    assert config.hash == "fnv1a_64" and config.distribution == "ketama"
    assert config.timeout is None and config.timeout_seconds is None
    assert config.backlog == 512 and config.client_connections == 0
    assert config.preconnect is False and config.tcpkeepalive is False
    assert config.redis_auth is None and config.redis_db == 0
    assert config.server_connections == 1 and config.auto_eject_hosts is False
    assert config.server_retry_timeout == 30000 and config.server_failure_limit == 2
    assert config.hash_tag is None


def test_every_key_is_read() -> None:
    text = pool(
        "  redis: true\n  hash: murmur\n  hash_tag: \"{}\"\n  distribution: modula\n  timeout: 400\n"
        "  backlog: 1024\n  preconnect: true\n  client_connections: 10\n  tcpkeepalive: true\n"
        "  redis_auth: s3cret\n  redis_db: 3\n  server_connections: 2\n  auto_eject_hosts: true\n"
        "  server_retry_timeout: 2000\n  server_failure_limit: 3\n",
        "   - 10.0.0.1:6379:2 first\n   - 10.0.0.2:6379:1\n")
    (config,) = load_text(text)
    assert (config.redis, config.hash, config.hash_tag, config.distribution) == (True, "murmur", "{}", "modula")
    assert (config.timeout, config.timeout_seconds, config.backlog) == (400, 0.4, 1024)
    assert (config.preconnect, config.client_connections, config.tcpkeepalive) == (True, 10, True)
    assert (config.redis_auth, config.redis_db, config.server_connections) == ("s3cret", 3, 2)
    assert (config.auto_eject_hosts, config.server_retry_timeout, config.server_failure_limit) == (True, 2000, 3)
    assert [(s.name, s.host, s.port, s.weight) for s in config.servers] == [
        ("first", "10.0.0.1", 6379, 2), ("10.0.0.2:6379", "10.0.0.2", 6379, 1)]
    assert "s3cret" not in repr(config)


def test_server_name_rule_matches_nutcracker_ketama() -> None:
    # nutcracker names an unnamed server "host" when its port is 11211, else "host:port".
    (config,) = load_text(pool(servers="   - 127.0.0.1:11211:1\n   - 127.0.0.1:11212:1\n   - '[::1]:11211:1'\n"))
    assert [s.name for s in config.servers] == ["127.0.0.1", "127.0.0.1:11212", "[::1]"]


def test_listen_forms() -> None:
    text = ("a:\n  listen: '[::1]:22121'\n  servers:\n   - 127.0.0.1:1:1\n"
            "b:\n  listen: /tmp/tp.sock 0600\n  servers:\n   - /tmp/backend.sock:1 sock\n"
            "c:\n  listen: localhost:22122\n  servers:\n   - 127.0.0.1:1:1\n")
    a, b, c = load_text(text)
    assert (a.listen.host, a.listen.port, str(a.listen)) == ("::1", 22121, "[::1]:22121")
    assert (b.listen.path, b.listen.mode, b.listen.is_unix) == ("/tmp/tp.sock", 0o600, True)
    assert (b.servers[0].path, b.servers[0].name) == ("/tmp/backend.sock", "sock")
    assert (c.listen.host, c.listen.port) == ("localhost", 22122)


def test_pools_keep_file_order() -> None:
    text = MINIMAL + MINIMAL.replace("alpha", "beta").replace("22121", "22122")
    assert [p.name for p in load_text(text)] == ["alpha", "beta"]


@pytest.mark.parametrize("extra, key, value, reason", [
    ("  colour: blue\n", "colour", None, "unknown key"),
    ("  hash: sha1\n", "hash", "sha1", "is not a valid hash"),
    ("  distribution: rendezvous\n", "distribution", "rendezvous", "is not a valid distribution"),
    ("  hash_tag: \"{\"\n", "hash_tag", "{", "is not a valid hash tag"),
    ("  redis: yes\n", "redis", "yes", "is not 'true' or 'false'"),
    ("  timeout: -1\n", "timeout", "-1", "is not a number"),
    ("  timeout: 1.5\n", "timeout", "1.5", "is not a number"),
    ("  backlog: 0\n", "backlog", "0", "must be greater than zero"),
    ("  server_connections: 0\n", "server_connections", "0", "must be greater than zero"),
    ("  server_failure_limit: x\n", "server_failure_limit", "x", "is not a number"),
    ("  redis_db: -2\n", "redis_db", "-2", "is not a number"),
    ("  redis_auth: ''\n", "redis_auth", "", "must not be empty"),
    ("  preconnect: [true]\n", "preconnect", None, "must be a single value"),
])
def test_bad_values_name_file_pool_key_and_value(extra: str, key: str, value: str, reason: str) -> None:
    err = refused(pool(extra))
    assert (err.path, err.pool, err.key, err.value) == ("pools.yml", "alpha", key, value)
    assert reason in err.reason
    text = str(err)
    assert text.startswith("pools.yml: pool 'alpha': key '" + key + "'")
    if value:
        assert f"value '{value}'" in text


@pytest.mark.parametrize("server, reason", [
    ("127.0.0.1:11211:0", "zero weight"),
    ("127.0.0.1:11211", "not a valid server"),
    ("127.0.0.1:11211:x", "invalid weight"),
    ("127.0.0.1:99999:1", "invalid port"),
    ("127.0.0.1:port:1", "invalid port"),
    ("nohostport", "not a valid server"),
    ("127.0.0.1:11211:1 two words", "invalid name"),
])
def test_bad_server_lines(server: str, reason: str) -> None:
    err = refused(pool(servers=f"   - {server}\n"))
    assert (err.pool, err.key, err.value) == ("alpha", "servers", server)
    assert reason in err.reason


def test_duplicate_server_name_and_address() -> None:
    assert "duplicate server name" in refused(pool(servers="   - 10.0.0.1:1:1 a\n   - 10.0.0.2:1:1 a\n")).reason
    assert "duplicate server address" in refused(pool(servers="   - 10.0.0.1:1:1 a\n   - 10.0.0.1:1:1 b\n")).reason


@pytest.mark.parametrize("listen, reason", [
    ("127.0.0.1", "not a valid listen address"),
    ("127.0.0.1:65536", "invalid port"),
    ("/tmp/x.sock 0999", "invalid socket mode"),
    ("/tmp/x.sock 0600 extra", "not a valid unix socket"),
])
def test_bad_listen(listen: str, reason: str) -> None:
    err = refused(f"alpha:\n  listen: {listen}\n  servers:\n   - 127.0.0.1:1:1\n")
    assert err.key == "listen" and reason in err.reason


def test_structure_errors() -> None:
    assert "is required" in refused("alpha:\n  servers:\n   - 127.0.0.1:1:1\n").reason
    assert "is required" in refused("alpha:\n  listen: 127.0.0.1:1\n").reason
    assert "non-empty list" in refused("alpha:\n  listen: 127.0.0.1:1\n  servers: []\n").reason
    assert "mapping of pool keys" in refused("alpha: 3\n").reason
    assert "has no pools" in refused("").reason
    assert "not valid YAML" in refused("alpha: [\n").reason
    assert "appears twice" in refused(MINIMAL + "  timeout: 1\n  timeout: 2\n").reason
    err = refused(MINIMAL + MINIMAL.replace("alpha", "beta"))
    assert err.pool == "beta" and "duplicate listen" in err.reason


@pytest.mark.parametrize("name", ["latency", "commands", "workers"])
def test_pool_named_like_a_stats_top_level_field_is_refused(name: str) -> None:
    # The stats document writes pools beside these fields: such a pool would replace one (or be replaced).
    err = refused(MINIMAL.replace("alpha", name))
    assert err.pool == name and "not a usable pool name" in err.reason and "latency" in err.reason
    assert f"pool '{name}'" in str(err)


def test_pool_named_like_a_nutcracker_stats_field_is_accepted() -> None:
    # nutcracker accepts these; a nutcracker file runs unchanged.
    assert load_text(MINIMAL.replace("alpha", "uptime"))


def test_load_file_reports_unreadable_path(tmp_path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_file(str(tmp_path / "missing.yml"))
    assert "missing.yml" in str(caught.value) and "cannot be read" in str(caught.value)
    good = tmp_path / "pools.yml"
    good.write_text(MINIMAL)
    assert [p.name for p in load_file(str(good))] == ["alpha"]


def test_shipped_example_is_valid() -> None:
    from pathlib import Path

    pools = load_file(str(Path(__file__).resolve().parents[2] / "conf" / "pools.yml"))
    assert {p.protocol for p in pools} == {"redis", "memcache"}


def test_server_subscriber_connections_is_a_redis_pools_cap() -> None:
    (config,) = load_text(pool("  redis: true\n"))
    assert config.server_subscriber_connections == 1024
    (config,) = load_text(pool("  redis: true\n  server_subscriber_connections: 0\n"))
    assert config.server_subscriber_connections == 0   # no limit
    err = refused(pool("  redis: true\n  server_subscriber_connections: many\n"))
    assert (err.key, err.value) == ("server_subscriber_connections", "many") and "not a number" in str(err)
    err = refused(pool("  server_subscriber_connections: 10\n"))
    assert err.key == "server_subscriber_connections" and "needs 'redis: true'" in str(err)


def test_redis_deny_flush() -> None:
    (config,) = load_text(pool("  redis: true\n"))
    assert config.redis_deny_flush is False
    (config,) = load_text(pool("  redis: true\n  redis_deny_flush: true\n"))
    assert config.redis_deny_flush is True
    assert str(refused(pool("  redis: true\n  redis_deny_flush: yes\n"))) == \
        "pools.yml: pool 'alpha': key 'redis_deny_flush': value 'yes': is not 'true' or 'false'"
    assert str(refused(pool("  redis_deny_flush: true\n"))) == \
        "pools.yml: pool 'alpha': key 'redis_deny_flush': needs 'redis: true' (it denies Redis's FLUSHDB and FLUSHALL)"


def _redis_pool(name: str, port: int, server: str, extra: str = "") -> str:
    return f"{name}:\n  listen: 127.0.0.1:{port}\n  redis: true\n{extra}  servers:\n   - {server}:1\n"


def test_databases_default_to_the_rest_of_a_stock_redis_above_redis_db() -> None:
    (plain,) = load_text(_redis_pool("a", 1, "10.0.0.1:6379"))
    (based,) = load_text(_redis_pool("a", 1, "10.0.0.1:6379", "  redis_db: 3\n"))
    (high,) = load_text(_redis_pool("a", 1, "10.0.0.1:6379", "  redis_db: 40\n"))
    (wide,) = load_text(_redis_pool("a", 1, "10.0.0.1:6379", "  databases: 64\n"))
    assert (plain.databases, based.databases, high.databases, wide.databases) == (16, 13, 1, 64)


def test_pools_sharing_a_server_keep_their_databases_apart() -> None:
    """nutcracker files put pools on one Redis in different redis_db: no SELECT may reach the next one."""
    a, b, c, same = load_text(
        _redis_pool("a", 1, "10.0.0.1:6379") + _redis_pool("b", 2, "10.0.0.1:6379", "  redis_db: 4\n")
        + _redis_pool("c", 3, "10.0.0.2:6379", "  redis_db: 2\n") + _redis_pool("d", 4, "10.0.0.1:6379"))
    assert (a.databases, b.databases, c.databases, same.databases) == (4, 12, 14, 4)
    with pytest.raises(ConfigError, match="would reach database 4, which another pool on the same servers uses"):
        load_text(_redis_pool("a", 1, "10.0.0.1:6379", "  databases: 5\n")
                  + _redis_pool("b", 2, "10.0.0.1:6379", "  redis_db: 4\n"))


@pytest.mark.parametrize("text, reason", [
    (_redis_pool("a", 1, "10.0.0.1:6379", "  databases: 0\n"), "must be greater than zero"),
    ("a:\n  listen: 127.0.0.1:1\n  databases: 4\n  servers:\n   - 10.0.0.1:11211:1\n", "needs 'redis: true'"),
    ("a:\n  listen: 127.0.0.1:1\n  redis: true\n  cluster: c\n  coordinator: file:///x\n  databases: 4\n",
     "cannot be set in a cluster pool"),
])
def test_bad_databases(text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        load_text(text)


def test_redis_auth_is_the_whole_password_and_redis_auth_user_an_acl_user() -> None:
    (config,) = load_text(pool("  redis: true\n  redis_auth: \"pass with  spaces \"\n"))
    assert (config.redis_auth, config.redis_auth_user) == ("pass with  spaces ", None)
    (config,) = load_text(pool("  redis: true\n  redis_auth: s3 cret\n  redis_auth_user: alice\n"))
    assert (config.redis_auth, config.redis_auth_user) == ("s3 cret", "alice")
    assert "s3 cret" not in repr(config)


@pytest.mark.parametrize("extra, reason", [
    ("  redis: true\n  redis_auth_user: alice\n", "needs 'redis: true' and 'redis_auth'"),
    ("  redis_auth: pw\n  redis_auth_user: alice\n", "needs 'redis: true' and 'redis_auth'"),
    ("  redis: true\n  redis_auth: pw\n  redis_auth_user: two words\n", "is not a Redis user name"),
    ("  redis: true\n  redis_auth: pw\n  redis_auth_user: ''\n", "is not a Redis user name"),
    ("  redis: true\n  redis_auth: pw\n  redis_auth_user: [alice]\n", "must be a single value"),
])
def test_redis_auth_user_refused(extra: str, reason: str) -> None:
    err = refused(pool(extra))
    assert (err.pool, err.key) == ("alpha", "redis_auth_user") and reason in err.reason
    assert str(err).startswith("pools.yml: pool 'alpha': key 'redis_auth_user'")
    assert "pw" not in str(err)


def test_redis_auth_user_in_a_cluster_pool() -> None:
    (config,) = load_text("c:\n  listen: 127.0.0.1:1\n  redis: true\n  cluster: shop\n"
                          "  coordinator: file:///tmp/x\n  redis_auth: pw\n  redis_auth_user: alice\n")
    assert (config.cluster, config.redis_auth_user) == ("shop", "alice")


def test_a_refused_redis_auth_user_is_not_shown_back() -> None:
    # The old split form moved whole into redis_auth_user ("user password"): the error (logged, and in
    # POST /reload's answer) must not carry the password.
    err = refused(pool("  redis: true\n  redis_auth: pw\n  redis_auth_user: alice s3cret\n"))
    assert err.key == "redis_auth_user" and "is not a Redis user name" in err.reason
    assert "s3cret" not in str(err) and err.value is None
