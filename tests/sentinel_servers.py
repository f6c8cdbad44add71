"""Real Redis Sentinel topologies for the Sentinel integration tests.

The recipe is /work/shared/reference/sentinel.md §1 and §6.3: per shard a
master and a replica, each a ``redis-server`` with its own config FILE
(sentinel ``CONFIG REWRITE``s them while it reconfigures), started first and
linked (``master_link_status:up``), then three ``redis-sentinel`` processes,
each from a fresh file of its own (no ``myid``: sentinels sharing one never
count each other), with ``down-after-milliseconds 1000`` and
``failover-timeout 3000`` (smaller values make sentinels turn on the new
master, §2).

- :class:`SentinelServer`: one ``redis-sentinel`` process.
- :class:`ShardServer`: a ``redis-server`` from a config file (restarts with
  the same port and the same, maybe rewritten, file).
- :class:`Topology`: the whole thing; ``start()`` returns once every sentinel
  fully agrees (§1 "When is it ready?": CKQUORUM ``OK 3``, the replica listed
  with flags exactly ``slave`` and link ok, the peers known).  Faults
  (``kill``, ``freeze``/``thaw``, ``restart``, ``failover``) and what the
  majority of sentinels says (``master``, ``replica``, ``wait_switch``).
  Its ``watcher`` and ``relay()`` come from tests/sentinel_events.py.
- :func:`pool_text` and :func:`keys_on`: a Sentinel pool file for a topology,
  and keys that its pool places on a given shard.

The RESP2 client they speak with is tests/resp_client.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from tests.resp_client import RespError, RespValue, cmdstat_calls, pairs, parse_info, query
from tests.sentinel_events import SentinelRelay, SwitchWatcher
from tests.servers import LOOPBACK, RedisServer, free_port, redis_pid, require, wait_until

# §1 / §2: the timings CI must use (500 flakes, 200-300 is broken).
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000
QUORUM = 2
READY_DEADLINE = 20.0  # seconds for a topology to be fully ready (~2.1 s measured after the sentinels start)


# -- processes -------------------------------------------------------------------


def _write_config(path: Path, lines: Iterable[str]) -> None:
    path.write_text("".join(f"{line}\n" for line in lines))


class _ConfigFileServer(RedisServer):
    """A redis-server or redis-sentinel started from a config file in its own directory.

    The file is written at the first start (``config_lines``); a ``restart``
    reuses the port and the file as it is then, which the process itself
    (sentinel's ``CONFIG REWRITE``, a sentinel's own state) may have rewritten.
    """

    program = "redis-server"
    config_path: Path

    def config_lines(self) -> List[str]:
        raise NotImplementedError

    def start(self, port: Optional[int] = None) -> "_ConfigFileServer":
        require(self.program)
        self.directory.mkdir(parents=True, exist_ok=True)
        restart = port is not None and self.config_path.exists()
        for _ in range(3):
            if not restart:
                self.port = port or free_port()
                _write_config(self.config_path, self.config_lines())
            self.argv = [self.program, str(self.config_path)]
            self.spawn()
            try:
                # The port was free when probed: what answers must be this very process.
                wait_until(lambda: not self.alive or redis_pid(self.port, self.password) == self.proc.pid,
                           timeout=10, what=f"{self.program} pid {self.proc.pid} on port {self.port}")
            except AssertionError:
                self.kill()
                raise AssertionError(f"{self.program} did not start:\n{self.output()}") from None
            if self.alive:
                return self
            if restart or port:
                break
        raise AssertionError(f"{self.program} did not start:\n{self.output()}")

    def restart(self) -> "_ConfigFileServer":
        """Start again on the same port from the same (possibly rewritten) file."""
        self.kill()
        return self.start(self.port)


class ShardServer(_ConfigFileServer):
    """A redis-server started from a config file in its own directory.

    The file is written once, at the first start; a ``restart`` reuses the
    port and the file as it is then (sentinel may have rewritten it: a
    promoted replica's file no longer has ``replicaof``, a SIGKILLed master's
    still says it is a master).
    """

    def __init__(self, directory: Path, name: str, master_port: Optional[int] = None) -> None:
        super().__init__(directory)
        self.shard = name
        self.master_port = master_port
        self.config_path = directory / "redis.conf"

    def config_lines(self) -> List[str]:
        lines = [f"port {self.port}", f"bind {LOOPBACK}", "daemonize no", f'dir "{self.directory}"',
                 f'logfile "{self.log}"', 'save ""', "appendonly no", "protected-mode no",
                 "repl-diskless-sync yes", "repl-diskless-sync-delay 0"]
        if self.master_port:
            lines.append(f"replicaof {LOOPBACK} {self.master_port}")
        return lines


    def info(self, *sections: str, timeout: float = 2.0) -> Dict[str, str]:
        reply = query(self.port, "INFO", *sections, timeout=timeout)
        if isinstance(reply, RespError):
            raise AssertionError(f"INFO on {self.address}: {reply.text}")
        return parse_info(reply)

    def role(self, timeout: float = 2.0) -> str:
        return self.info("replication", timeout=timeout)["role"]

    def linked(self, timeout: float = 2.0) -> bool:
        """A replica whose link to its master is up (and not syncing)."""
        info = self.info("replication", timeout=timeout)
        return (info.get("role") == "slave" and info.get("master_link_status") == "up"
                and info.get("master_sync_in_progress") == "0")

    def calls(self, command: str, timeout: float = 2.0) -> int:
        """How many times ``command`` ran here (INFO commandstats)."""
        return cmdstat_calls(self.info("commandstats", timeout=timeout), command)

    def __repr__(self) -> str:
        return f"<ShardServer {self.shard} {self.address}>"


class SentinelServer(_ConfigFileServer):
    """One redis-sentinel, from a fresh config file of its own (no ``myid``).

    ``masters`` is [(name, master port), ...]; ``password`` sets
    ``requirepass`` (sentinels then authenticate to each other with it).
    """

    def __init__(self, directory: Path, masters: Sequence[Tuple[str, int]], password: Optional[str] = None,
                 down_after: int = DOWN_AFTER_MS, failover_timeout: int = FAILOVER_TIMEOUT_MS) -> None:
        super().__init__(directory, password=password)
        self.log = directory / "sentinel.log"
        self.masters = list(masters)
        self.down_after = down_after
        self.failover_timeout = failover_timeout
        self.config_path = directory / "sentinel.conf"
        self.program = "redis-sentinel"   # it keeps its myid and epochs in its file across restarts

    def config_lines(self) -> List[str]:
        lines = [f"port {self.port}", f"bind {LOOPBACK}", "daemonize no", f'dir "{self.directory}"',
                 f'logfile "{self.log}"', "protected-mode no"]
        if self.password:
            lines.append(f"requirepass {self.password}")
        for name, port in self.masters:
            lines += [f"sentinel monitor {name} {LOOPBACK} {port} {QUORUM}",
                      f"sentinel down-after-milliseconds {name} {self.down_after}",
                      f"sentinel failover-timeout {name} {self.failover_timeout}",
                      f"sentinel parallel-syncs {name} 1"]
        return lines


    def call(self, *args: Union[str, int], timeout: float = 2.0) -> RespValue:
        return query(self.port, *args, password=self.password, timeout=timeout)

    def master_address(self, name: str, timeout: float = 1.0) -> Optional[str]:
        """``SENTINEL GET-MASTER-ADDR-BY-NAME``: "ip:port", or None for an unknown name."""
        reply = self.call("SENTINEL", "GET-MASTER-ADDR-BY-NAME", name, timeout=timeout)
        if not isinstance(reply, list):
            return None
        return f"{reply[0]}:{reply[1]}"

    def masters_info(self) -> Dict[str, Dict[str, str]]:
        """``SENTINEL MASTERS``: {name: fields}."""
        return {entry["name"]: entry for entry in map(pairs, self.call("SENTINEL", "MASTERS"))}

    def master_info(self, name: str) -> Dict[str, str]:
        return pairs(self.call("SENTINEL", "MASTER", name))

    def replicas_info(self, name: str) -> List[Dict[str, str]]:
        return [pairs(entry) for entry in self.call("SENTINEL", "REPLICAS", name)]

    def sentinels_info(self, name: str) -> List[Dict[str, str]]:
        return [pairs(entry) for entry in self.call("SENTINEL", "SENTINELS", name)]

    def ckquorum(self, name: str) -> str:
        """The CKQUORUM text: "OK 3 usable Sentinels. ..." or "NOQUORUM ..." (an error reply's text)."""
        reply = self.call("SENTINEL", "CKQUORUM", name)
        return reply.text if isinstance(reply, RespError) else reply

    def __repr__(self) -> str:
        return f"<SentinelServer {self.address}>"


# -- the topology ----------------------------------------------------------------------


@dataclass
class Shard:
    name: str
    servers: List[ShardServer]  # the first-started master first, then its replicas


class Topology:
    """N shards (a master and a replica each) and ``sentinel_count`` sentinels.

    ``start()`` returns once it is ready on every sentinel for every name;
    ``stop()`` (always called by the fixture) SIGCONTs and SIGKILLs every
    process and closes the watcher and every relay.
    """

    def __init__(self, directory: Path, names: Sequence[str] = ("s1", "s2"), sentinel_count: int = 3,
                 sentinel_password: Optional[str] = None) -> None:
        self.directory = directory
        self.names = list(names)
        self.sentinel_count = sentinel_count
        self.sentinel_password = sentinel_password
        self.shards: Dict[str, Shard] = {}
        self.sentinels: List[SentinelServer] = []
        self.relays: List[SentinelRelay] = []
        self.watcher: Optional[SwitchWatcher] = None
        self.ready_seconds = 0.0  # from the first spawn to fully ready

    # -- life cycle

    def start(self) -> "Topology":
        started = time.monotonic()
        try:
            for name in self.names:
                master = ShardServer(self.directory / f"{name}-a", name).start()
                replica = ShardServer(self.directory / f"{name}-b", name, master_port=master.port).start()
                self.shards[name] = Shard(name, [master, replica])
            # Sentinels that start before the replica linked may see it only 10 s later (§1).
            for shard in self.shards.values():
                for replica in shard.servers[1:]:
                    wait_until(replica.linked, timeout=15, what=f"{replica} to link to its master")
            masters = [(name, shard.servers[0].port) for name, shard in self.shards.items()]
            for number in range(self.sentinel_count):
                self.sentinels.append(SentinelServer(self.directory / f"sentinel{number}", masters,
                                                     password=self.sentinel_password).start())
            wait_until(self._ready, timeout=READY_DEADLINE, interval=0.05,
                       what=f"the sentinels to be ready: {self._not_ready()}")
            self.ready_seconds = time.monotonic() - started
            self.watcher = SwitchWatcher(self.sentinels)
            self.watcher.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the watcher and relays, then SIGCONT and SIGKILL every process; safe to call twice."""
        if self.watcher is not None:
            self.watcher.stop()
        for relay in self.relays:
            relay.stop()
        for process in [*self.sentinels, *self.servers]:
            try:
                process.kill()
            except Exception:  # noqa: BLE001 - the others must still be stopped
                pass

    # -- readiness

    def _ready(self) -> bool:
        return not self._not_ready()

    def _not_ready(self) -> List[str]:
        """What is not ready yet, per sentinel and name (empty: ready)."""
        missing = []
        for sentinel in self.sentinels:
            if not sentinel.alive:
                missing.append(f"{sentinel} exited:\n{sentinel.output()}")
                continue
            for name, shard in self.shards.items():
                try:
                    quorum = sentinel.ckquorum(name)
                    if not quorum.startswith(f"OK {self.sentinel_count} usable"):
                        missing.append(f"{sentinel} {name}: CKQUORUM {quorum!r}")
                    replicas = {f"{entry['ip']}:{entry['port']}": entry for entry in sentinel.replicas_info(name)}
                    for replica in shard.servers[1:]:
                        entry = replicas.get(replica.address)
                        if entry is None or entry["flags"] != "slave" or entry["master-link-status"] != "ok":
                            missing.append(f"{sentinel} {name}: replica {replica.address} is {entry!r}")
                    peers = len(sentinel.sentinels_info(name))
                    if peers != self.sentinel_count - 1:
                        missing.append(f"{sentinel} {name}: {peers} peers")
                except (OSError, AssertionError, TypeError, KeyError) as err:
                    missing.append(f"{sentinel} {name}: {err!r}")
        return missing

    # -- what the sentinels say

    @property
    def servers(self) -> List[ShardServer]:
        return [server for shard in self.shards.values() for server in shard.servers]

    @property
    def sentinel_addresses(self) -> List[str]:
        return [sentinel.address for sentinel in self.sentinels]

    @property
    def majority(self) -> int:
        return self.sentinel_count // 2 + 1

    def reported_masters(self, name: str) -> Dict[str, int]:
        """{address: how many sentinels answer it} for ``name`` (dead or silent sentinels count for none)."""
        counts: Dict[str, int] = {}
        for sentinel in self.sentinels:
            if not sentinel.alive:
                continue
            try:
                address = sentinel.master_address(name, timeout=0.5)
            except OSError:
                continue
            if address:
                counts[address] = counts.get(address, 0) + 1
        return counts

    def master_address(self, name: str) -> str:
        """The address a majority of the sentinels give for ``name`` (AssertionError if none has one)."""
        for address, count in self.reported_masters(name).items():
            if count >= self.majority:
                return address
        raise AssertionError(f"no majority of sentinels agrees on the master of {name}: "
                             f"{self.reported_masters(name)}")

    def server_at(self, address: str) -> ShardServer:
        for server in self.servers:
            if server.address == address:
                return server
        raise AssertionError(f"{address} is no server of this topology")

    def master(self, name: str) -> ShardServer:
        """The ShardServer that is master of ``name`` according to the majority of sentinels."""
        return self.server_at(self.master_address(name))

    def replicas(self, name: str) -> List[ShardServer]:
        master = self.master(name)
        return [server for server in self.shards[name].servers if server is not master]

    def replica(self, name: str) -> ShardServer:
        (replica,) = self.replicas(name)
        return replica

    def wait_switch(self, name: str, old_address: str, timeout: float = 15.0) -> Tuple[str, float]:
        """(new master address, monotonic time it was first seen) once a majority of sentinels give a
        master other than ``old_address`` for ``name`` (polled every 10 ms).

        "First seen" is the first poll at which any sentinel answered that
        address; the SwitchWatcher has the time of the event itself.
        """
        first_seen: Dict[str, float] = {}

        def switched() -> Optional[str]:
            now = time.monotonic()
            for address, count in self.reported_masters(name).items():
                if address == old_address:
                    continue
                first_seen.setdefault(address, now)
                if count >= self.majority:
                    return address
            return None

        address = wait_until(switched, timeout=timeout, interval=0.01,
                             what=f"a majority of sentinels to move {name} off {old_address}")
        return address, first_seen[address]

    # -- faults

    def kill(self, process: RedisServer) -> float:
        """SIGKILL (after SIGCONT); the monotonic time once it is gone."""
        process.kill()
        return time.monotonic()

    def freeze(self, process: RedisServer) -> float:
        """SIGSTOP; the monotonic time once every thread is stopped."""
        process.freeze()
        return time.monotonic()

    def thaw(self, process: RedisServer) -> float:
        process.thaw()
        return time.monotonic()

    def restart(self, process: RedisServer) -> RedisServer:
        """Start again, same port, same config file."""
        return process.restart()

    def failover(self, name: str) -> float:
        """``SENTINEL FAILOVER name`` on the first live sentinel; the monotonic time it answered OK."""
        sentinel = next(sentinel for sentinel in self.sentinels if sentinel.alive)
        reply = sentinel.call("SENTINEL", "FAILOVER", name)
        if reply != "OK":
            raise AssertionError(f"SENTINEL FAILOVER {name} on {sentinel}: {reply!r}")
        return time.monotonic()

    def relay(self, sentinel: SentinelServer) -> SentinelRelay:
        """A started SentinelRelay in front of ``sentinel``, stopped with the topology."""
        relay = SentinelRelay(sentinel.port)
        self.relays.append(relay)
        return relay.start()


# -- the proxy's pool file ----------------------------------------------------------------


def pool_text(topology: Topology, names: Optional[Sequence[str]] = None,
              guesses: Optional[Dict[str, str]] = None, sentinels: Optional[Sequence[str]] = None,
              pool: str = "alpha", **keys: Optional[str]) -> str:
    """A one-pool Sentinel file over ``names`` (default: every shard) of ``topology``.

    Keys default to listen 127.0.0.1:0, redis true, timeout 1000,
    read_policy master, failover_hold 2000 (and sentinel_auth when the
    sentinels have a password); ``keys`` overrides them, None drops one.
    ``guesses`` {name: "ip:port"} replaces the first-guess address of a
    server (default: its real master); ``sentinels`` replaces the list
    (e.g. relay addresses).
    """
    values: Dict[str, Optional[str]] = {"listen": f"{LOOPBACK}:0", "redis": "true", "timeout": "1000",
                                        "read_policy": "master", "failover_hold": "2000"}
    if topology.sentinel_password:
        values["sentinel_auth"] = topology.sentinel_password
    values.update(keys)
    lines = [f"{pool}:"]
    lines += [f"  {key}: {value}" for key, value in values.items() if value is not None]
    lines.append("  sentinels:")
    lines += [f"    - {address}" for address in (sentinels or topology.sentinel_addresses)]
    lines.append("  servers:")
    for name in names or topology.names:
        guess = (guesses or {}).get(name) or topology.master_address(name)
        lines.append(f"    - {guess}:1 {name}")
    return "\n".join(lines) + "\n"


def keys_on(text: str, name: str, count: int, prefix: str = "k") -> List[str]:
    """``count`` keys that the (single) pool of ``text`` places on server ``name``.

    Placement comes from twinproxy's own ServerPool (ketama over the
    server names), so it does not depend on the guessed addresses.
    """
    from twisted.internet.task import Clock

    from twinproxy.config import load_text
    from twinproxy.pool import ServerPool

    (config,) = load_text(text)
    server_pool = ServerPool(config, Clock())
    found = []
    number = 0
    while len(found) < count:
        key = f"{prefix}{number}"
        if server_pool.server_for_key(key.encode()).name == name:
            found.append(key)
        number += 1
        if number > count * 1000 + 10000:
            raise AssertionError(f"no {count} keys on {name} among {number} tried")
    return found


def dead_address() -> str:
    """A loopback address nothing listens on (a stale guess)."""
    return f"{LOOPBACK}:{free_port()}"


__all__ = ["SentinelServer", "Shard", "ShardServer", "Topology", "dead_address", "keys_on", "pool_text"]
