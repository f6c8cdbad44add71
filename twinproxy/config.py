"""Nutcracker's YAML pool files, read unchanged into frozen values.

Owns: every pool key nutcracker reads, with nutcracker's defaults and its
rejection rules, turned into :class:`PoolConfig` and :class:`ServerSpec`.
A bad file raises :class:`ConfigError`, which names the file, the pool,
the key and the value.  Owns no sockets, no DNS and nothing of Twisted.

The loader keeps every YAML scalar as a string and converts it the way
nutcracker does, so ``redis: yes`` is rejected here as it is there (YAML
1.1 would otherwise read it as true), and a key given twice in one pool is
an error rather than silently the last one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Tuple

import yaml

from twinproxy.config_values import (
    ListenSpec,
    ServerSpec,
    boolean_value,
    distribution_value,
    hash_tag_value,
    hash_value,
    host_value,
    listen_value,
    number_value,
    port_value,
    positive_value,
    read_policy_value,
    server_value,
    text_value,
    user_name_value,
)

# A stock Redis has 16 databases.
REDIS_DATABASES = 16

POOL_KEYS = (
    "listen", "redis", "hash", "hash_tag", "distribution", "timeout", "backlog",
    "preconnect", "client_connections", "tcpkeepalive", "redis_auth", "redis_db",
    "server_connections", "auto_eject_hosts", "server_retry_timeout",
    "server_failure_limit", "servers",
)
# twinproxy's own keys; nutcracker's files never need them.
EXTENSION_KEYS = ("client_max_pending", "client_max_pending_bytes", "max_request_bytes", "shutdown_timeout",
                  "client_output_soft_limit", "client_output_hard_limit", "redis_cross_server_transactions",
                  "server_leased_connections", "redis_deny_flush", "databases",
                  "server_subscriber_connections", "redis_auth_user")
# Sentinel mode (twinproxy's too): the pool follows the masters Sentinel names.
SENTINEL_KEYS = ("sentinels", "sentinel_auth", "read_policy", "max_replica_lag", "failover_hold")
# Cluster mode (twinproxy's too): the servers and slots come from a coordinator
# instead of ``servers:``; held slots make requests wait this many ms at most.
CLUSTER_KEYS = ("cluster", "coordinator", "slot_hold")
# What a cluster pool cannot have: its topology is the dashboard's.
# Keys whose refused value an error never repeats: "user password" (the old split form) put in
# redis_auth_user would show the password.  (redis_auth and sentinel_auth are only refused empty.)
_UNSHOWN = frozenset(("redis_auth_user",))
_NOT_IN_CLUSTER = ("servers", "hash", "hash_tag", "distribution", "auto_eject_hosts", "sentinels", "sentinel_auth",
                   "read_policy", "max_replica_lag", "redis_db", "databases")
NOT_IN_CLUSTER = _NOT_IN_CLUSTER   # (twinproxy-admin adopt drops them from a pool joining its cluster)
# Codis's rule for a product (cluster) name.
_CLUSTER_NAME = re.compile(r"^\w[\w.\-]*$")


class ConfigError(Exception):
    """A pool file that nutcracker would refuse, with where and why."""

    def __init__(self, path: str, reason: str, pool: Optional[str] = None,
                 key: Optional[str] = None, value: Any = None) -> None:
        self.path = path
        self.pool = pool
        self.key = key
        self.value = value
        self.reason = reason
        where = [path]
        if pool is not None:
            where.append(f"pool '{pool}'")
        if key is not None:
            where.append(f"key '{key}'")
        text = ": ".join(where)
        if value is not None:
            text += f": value '{value}'"
        super().__init__(f"{text}: {reason}")


@dataclass(frozen=True)
class PoolConfig:
    """One pool of a pool file, every key resolved to its value or default."""

    name: str
    listen: ListenSpec
    servers: Tuple[ServerSpec, ...]
    redis: bool = False
    hash: str = "fnv1a_64"
    hash_tag: Optional[str] = None
    distribution: str = "ketama"
    timeout: Optional[int] = None
    backlog: int = 512
    preconnect: bool = False
    client_connections: int = 0
    tcpkeepalive: bool = False
    redis_auth: Optional[str] = field(default=None, repr=False)   # the whole value is the password
    redis_db: int = 0
    server_connections: int = 1
    auto_eject_hosts: bool = False
    server_retry_timeout: int = 30000
    server_failure_limit: int = 2
    # Extensions: a client stops being read past this many requests, or
    # bytes of requests, awaiting their replies; a bigger request is refused;
    # stopping waits this many ms for requests in flight.
    client_max_pending: int = 1024
    client_max_pending_bytes: int = 64 * 1024 * 1024
    max_request_bytes: int = 512 * 1024 * 1024
    shutdown_timeout: int = 5000
    # Bytes of replies a client has not read (plus an estimate for its requests
    # in flight): past the soft limit it is not read, past the hard limit
    # (counting replies that arrived only) it is closed.  0: no limit.
    client_output_soft_limit: int = 8 * 1024 * 1024
    client_output_hard_limit: int = 32 * 1024 * 1024
    # Pub/sub: subscriber connections (one per client and server it subscribes on)
    # the proxy opens to each server at most.  0: no limit.
    server_subscriber_connections: int = 1024
    # A transaction whose keys are on several servers (slots) is run as one
    # MULTI/EXEC per server instead of refused: each is atomic, the whole is not.
    redis_cross_server_transactions: bool = False
    # Connections per server lent to one client each (WATCH pins one), besides the shared ones.
    server_leased_connections: int = 32
    # FLUSHDB and FLUSHALL, which empty every server of the pool, are refused.
    redis_deny_flush: bool = False
    # How many databases a Redis client may SELECT: 0 .. databases - 1, which are
    # the backends' redis_db .. redis_db + databases - 1.  The loader sets it when
    # the file does not (_database_counts); 0: not set (see database_count).
    databases: int = 0
    # The Redis 6+ ACL user that redis_auth is the password of (AUTH user password); None: the default user.
    redis_auth_user: Optional[str] = None
    # Sentinel mode: the sentinels to follow ((host, port), ...; empty: off),
    # their password ("password" or "user password"), where reads go, how far
    # behind (ms) a replica may be and still be read from, and how long (ms)
    # requests for a shard wait for its master to be confirmed.
    sentinels: Tuple[Tuple[str, int], ...] = ()
    sentinel_auth: Optional[str] = field(default=None, repr=False)
    read_policy: str = "master"
    max_replica_lag: int = 1000
    failover_hold: int = 2000
    # Cluster mode: the cluster's name and its coordinator's URL (both None:
    # a nutcracker pool), how long (ms) a request waits for a held slot, and
    # the slot table as last applied (None: not loaded yet; filled in by
    # twinproxy.cluster.pools, never read from the file).
    cluster: Optional[str] = None
    coordinator: Optional[str] = field(default=None, repr=False)
    slot_hold: int = 5000
    slots: Any = field(default=None, repr=False, compare=True)

    @property
    def sentinel_mode(self) -> bool:
        return bool(self.sentinels)

    @property
    def cluster_mode(self) -> bool:
        return self.cluster is not None

    @property
    def ejects(self) -> bool:
        """Failing servers leave the ring: ``auto_eject_hosts``, except in a Sentinel
        pool, where a shard's keys must not move to another shard (Sentinel
        replaces its master instead)."""
        return self.auto_eject_hosts and not self.sentinel_mode and self.cluster is None

    @property
    def database_count(self) -> int:
        """How many databases a client may SELECT (a cluster pool: 16, of which it serves 0 only)."""
        return self.databases or max(1, REDIS_DATABASES - self.redis_db)

    @property
    def protocol(self) -> str:
        return "redis" if self.redis else "memcache"

    @property
    def timeout_seconds(self) -> Optional[float]:
        """The backend timeout in seconds, or None where nutcracker waits forever."""
        return self.timeout / 1000.0 if self.timeout else None


class _StringLoader(yaml.BaseLoader):
    """Every scalar a string, and a mapping key given twice an error."""

    def construct_mapping(self, node, deep=False):  # noqa: D401 - PyYAML override
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKeyError(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_StringLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StringLoader.construct_mapping
)


class _DuplicateKeyError(Exception):
    def __init__(self, key: str, line: int) -> None:
        super().__init__(key, line)
        self.key = key
        self.line = line


def load_file(path: str) -> List[PoolConfig]:
    """Read and validate the pool file at ``path``; raise ConfigError if it is bad."""
    try:
        with open(path, "rb") as handle:
            text = handle.read()
    except OSError as err:
        raise ConfigError(path, f"cannot be read: {err.strerror or err}") from None
    return load_text(text, path)


def load_text(text: bytes | str, path: str = "<config>") -> List[PoolConfig]:
    """Validate pool-file text; ``path`` is only used in error messages."""
    try:
        document = yaml.load(text, Loader=_StringLoader)
    except _DuplicateKeyError as dup:
        raise ConfigError(path, f"key '{dup.key}' appears twice (line {dup.line})") from None
    except yaml.YAMLError as err:
        raise ConfigError(path, f"is not valid YAML: {err}".replace("\n", " ")) from None
    if not isinstance(document, dict) or not document:
        raise ConfigError(path, "has no pools (expected a mapping of pool name to pool keys)")
    pools = [_parse_pool(path, str(name), body) for name, body in document.items()]
    listens: Dict[str, str] = {}
    for pool in pools:
        where = str(pool.listen)
        if pool.listen.port == 0:
            continue  # each ":0" gets a port of its own
        if where in listens:
            raise ConfigError(path, f"duplicate listen address, already used by pool '{listens[where]}'",
                              pool.name, "listen", where)
        listens[where] = pool.name
    return _database_counts(pools, path)


def _database_counts(pools: List[PoolConfig], path: str) -> List[PoolConfig]:
    """Give each Redis pool its ``databases``, keeping pools that share a server apart.

    nutcracker files separate pools on the same servers by ``redis_db``
    (pool a in db 0, pool b in db 1): a client of a may never SELECT its
    way into b's data.  Unset, a pool's count is 16 - ``redis_db`` (a stock
    Redis's databases), cut short at the next ``redis_db`` another pool
    uses on a server they share; set, it may not reach that one.  Pools
    with the same ``redis_db`` share their data on purpose: no limit.
    """
    placed = []
    for pool in pools:
        if not pool.redis or pool.cluster_mode:
            placed.append(pool)
            continue
        addresses = {spec.address for spec in pool.servers}
        above = [other.redis_db for other in pools
                 if other.redis and other.redis_db > pool.redis_db and addresses & {s.address for s in other.servers}]
        limit = min(above) - pool.redis_db if above else None
        if pool.databases:
            if limit is not None and pool.databases > limit:
                raise ConfigError(path, f"would reach database {pool.redis_db + limit}, which another pool on the "
                                  f"same servers uses (redis_db {pool.redis_db} + at most {limit})", pool.name,
                                  "databases", str(pool.databases))
            placed.append(pool)
            continue
        count = max(1, REDIS_DATABASES - pool.redis_db)
        placed.append(replace(pool, databases=min(count, limit) if limit is not None else count))
    return placed


# The stats document puts each pool beside its top-level fields: a pool of one of twinproxy's own field names
# would replace it (``workers`` and ``workers_answered``: the --workers parent's merged document).  nutcracker's
# own fields (service, source, version, uptime, ...) stay usable names: nutcracker accepts them, and a file it
# runs must run here unchanged.
RESERVED_POOL_NAMES = frozenset(["latency", "commands", "workers", "workers_answered"])


def _parse_pool(path: str, name: str, body: Any) -> PoolConfig:
    if name in RESERVED_POOL_NAMES:
        raise ConfigError(path, "is not a usable pool name: the stats document has a top-level field of that "
                          f"name ({', '.join(sorted(RESERVED_POOL_NAMES))} are reserved)", name)
    if not isinstance(body, dict):
        raise ConfigError(path, "must be a mapping of pool keys", name)

    def fail(key: str, value: Any, reason: str) -> ConfigError:
        return ConfigError(path, reason, name, key, value)

    for key in body:
        if key not in POOL_KEYS and key not in EXTENSION_KEYS and key not in SENTINEL_KEYS \
                and key not in CLUSTER_KEYS:
            raise fail(key, None, "unknown key")
    values: Dict[str, Any] = {}
    for key, raw in body.items():
        if key == "servers":
            continue
        if key == "sentinels":
            values[key] = _sentinels(raw, lambda reason, v=None: fail("sentinels", v, reason))
            continue
        if not isinstance(raw, str):
            raise fail(key, None, "must be a single value, not a list or mapping")
        shown = None if key in _UNSHOWN else raw
        values[key] = _CONVERTERS[key](raw, lambda reason, k=key, v=shown: fail(k, v, reason))
    if "listen" not in values:
        raise fail("listen", None, "is required")
    if "redis_deny_flush" in values and not values.get("redis", False):
        raise fail("redis_deny_flush", None, "needs 'redis: true' (it denies Redis's FLUSHDB and FLUSHALL)")
    if "server_subscriber_connections" in values and not values.get("redis", False):
        raise fail("server_subscriber_connections", None, "needs 'redis: true' (it caps Redis pub/sub connections)")
    if "redis_auth_user" in values and ("redis_auth" not in values or not values.get("redis", False)):
        raise fail("redis_auth_user", None, "needs 'redis: true' and 'redis_auth' (it names the Redis ACL user "
                   "whose password redis_auth is)")
    if "cluster" in values or "coordinator" in values:
        return _cluster_pool(name, body, values, fail)
    if "slot_hold" in values:
        raise fail("slot_hold", None, "needs 'cluster' and 'coordinator' (it only applies to a cluster pool)")
    servers = body.get("servers")
    if servers is None:
        raise fail("servers", None, "is required")
    if not isinstance(servers, list) or not servers:
        raise fail("servers", None, "must be a non-empty list of 'host:port:weight [name]' lines")
    specs = []
    names: Dict[str, str] = {}
    addresses: Dict[str, str] = {}
    for line in servers:
        if not isinstance(line, str):
            raise fail("servers", None, "each server must be a 'host:port:weight [name]' line")
        spec = server_value(line, lambda reason, v=line: fail("servers", v, reason))
        if spec.name in names:
            raise fail("servers", line, f"duplicate server name '{spec.name}'")
        if spec.address in addresses:
            raise fail("servers", line, f"duplicate server address '{spec.address}'")
        names[spec.name] = line
        addresses[spec.address] = line
        specs.append(spec)
    _check_sentinel_keys(values, servers, fail)
    if "databases" in values and not values.get("redis", False):
        raise fail("databases", None, "needs 'redis: true' (memcached has no databases)")
    return PoolConfig(name=name, servers=tuple(specs), **values)


def _cluster_pool(name: str, body: Dict[str, Any], values: Dict[str, Any], fail) -> PoolConfig:
    """A pool whose servers and slots a cluster's dashboard decides (``cluster:`` and ``coordinator:``)."""
    for key in ("cluster", "coordinator"):
        if key not in values:
            other = "coordinator" if key == "cluster" else "cluster"
            raise fail(key, None, f"is required with '{other}' (a cluster pool names both)")
    for key in _NOT_IN_CLUSTER:
        if key in body:
            if key in ("redis_db", "databases"):
                raise fail(key, None, "cannot be set in a cluster pool: a cluster lives in database 0 (the "
                           "dashboard's migrations move database 0)")
            raise fail(key, None, "cannot be set in a cluster pool: the cluster's dashboard places servers and "
                       "slots (keys go to slots by crc32 of their {tag} % 1024, as in Codis)")
    return PoolConfig(name=name, servers=(), **values)


def _cluster_name(raw: str, fail) -> str:
    if not _CLUSTER_NAME.match(raw):
        raise fail("is not a valid cluster name (letters, digits, '_', then also '.' and '-')")
    return raw


def _coordinator_url(raw: str, fail) -> str:
    scheme = raw.partition("://")[0]
    if scheme not in ("zookeeper", "etcd", "file") or "://" not in raw:
        raise fail("is not a coordinator URL (expected zookeeper://host:port/root, etcd://host:port/prefix or "
                   "file:///path)")
    return raw


def _sentinels(raw: Any, fail) -> Tuple[Tuple[str, int], ...]:
    if not isinstance(raw, list) or not raw:
        raise fail("must be a non-empty list of 'host:port' lines")
    found = []
    for line in raw:
        if not isinstance(line, str):
            raise fail("each sentinel must be a 'host:port' line")
        host, sep, port = line.strip().rpartition(":")
        if not sep or not host:
            raise fail(f"'{line}' is not a valid sentinel address (expected 'host:port')")
        def refuse(reason: str, line: str = line) -> ConfigError:
            return fail(f"'{line}' {reason}")

        address = (host_value(host, refuse), port_value(port, refuse))
        if address in found:
            raise fail(f"sentinel '{line}' is listed twice")
        found.append(address)
    return tuple(found)


def _check_sentinel_keys(values: Dict[str, Any], servers: List[str], fail) -> None:
    """Sentinel mode's rules: a Redis pool, and a Sentinel master name on every server."""
    if "sentinels" not in values:
        for key in SENTINEL_KEYS:
            if key in values:
                raise fail(key, None, "needs 'sentinels' (it only applies to a Sentinel pool)")
        return
    if not values.get("redis", False):
        raise fail("sentinels", None, "needs 'redis: true' (Sentinel follows Redis masters)")
    for line in servers:
        address, _, name = line.strip().partition(" ")
        if not name.strip():
            raise fail("servers", line, "needs a name in a Sentinel pool: the master name the sentinels "
                       "monitor ('host:port:weight name')")
        if address.startswith("/"):
            raise fail("servers", line, "must be host:port in a Sentinel pool (sentinels name TCP addresses)")


_CONVERTERS = {
    "listen": listen_value,
    "redis": boolean_value,
    "hash": hash_value,
    "hash_tag": hash_tag_value,
    "distribution": distribution_value,
    "timeout": number_value,
    "backlog": positive_value,
    "preconnect": boolean_value,
    "client_connections": number_value,
    "tcpkeepalive": boolean_value,
    "redis_auth": text_value,
    "redis_auth_user": user_name_value,
    "redis_db": number_value,
    "server_connections": positive_value,
    "auto_eject_hosts": boolean_value,
    "server_retry_timeout": number_value,
    "server_failure_limit": positive_value,
    "client_max_pending": positive_value,
    "client_max_pending_bytes": positive_value,
    "max_request_bytes": positive_value,
    "shutdown_timeout": number_value,
    "client_output_soft_limit": number_value,
    "client_output_hard_limit": number_value,
    "redis_cross_server_transactions": boolean_value,
    "server_leased_connections": positive_value,
    "redis_deny_flush": boolean_value,
    "databases": positive_value,
    "server_subscriber_connections": number_value,
    "sentinel_auth": text_value,
    "read_policy": read_policy_value,
    "max_replica_lag": number_value,
    "failover_hold": number_value,
    "cluster": _cluster_name,
    "coordinator": _coordinator_url,
    "slot_hold": number_value,
}
