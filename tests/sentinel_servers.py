"""Real Redis Sentinel topologies for the Sentinel integration tests.

The recipe is /work/shared/reference/sentinel.md §1 and §6.3: per shard a
master and a replica, each a ``redis-server`` with its own config FILE
(sentinel ``CONFIG REWRITE``s them while it reconfigures), started first and
linked (``master_link_status:up``), then three ``redis-sentinel`` processes,
each from a fresh file of its own (no ``myid``: sentinels sharing one never
count each other), with ``down-after-milliseconds 1000`` and
``failover-timeout 3000`` (smaller values make sentinels turn on the new
master, §2).

- :class:`Resp`: a tiny RESP2 client over a plain socket, with timeouts, for
  sentinels and servers alike (queries and ``PSUBSCRIBE``).
- :class:`SentinelServer`: one ``redis-sentinel`` process.
- :class:`ShardServer`: a ``redis-server`` from a config file (restarts with
  the same port and the same, maybe rewritten, file).
- :class:`Topology`: the whole thing; ``start()`` returns once every sentinel
  fully agrees (§1 "When is it ready?": CKQUORUM ``OK 3``, the replica listed
  with flags exactly ``slave`` and link ok, the peers known).  Faults
  (``kill``, ``freeze``/``thaw``, ``restart``, ``failover``) and what the
  majority of sentinels says (``master``, ``replica``, ``wait_switch``).
- :class:`SwitchWatcher`: ``PSUBSCRIBE +switch-master`` on every sentinel, the
  monotonic time and payload of each message: "the switch time", precisely.
- :class:`SentinelRelay`: a TCP forwarder in front of one sentinel that can
  silently stop delivering to event (subscribed) connections only.
- :func:`pool_text` and :func:`keys_on`: a Sentinel pool file for a topology,
  and keys that its pool places on a given shard.
"""

from __future__ import annotations

import re
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from tests.servers import LOOPBACK, RedisServer, free_port, redis_pid, require, wait_until

# §1 / §2: the timings CI must use (500 flakes, 200-300 is broken).
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000
QUORUM = 2
READY_DEADLINE = 20.0  # seconds for a topology to be fully ready (~2.1 s measured after the sentinels start)


# -- a small RESP2 client ------------------------------------------------------


class RespError(Exception):
    """An error reply (``-ERR ...``); ``call`` returns it as a value, it is not raised."""

    @property
    def text(self) -> str:
        return str(self.args[0])


RespValue = Union[None, int, str, RespError, list]


def encode_command(args: Sequence[Union[str, bytes, int]]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _IncompleteError(Exception):
    pass


def parse_reply(buffer: bytes, start: int = 0) -> Tuple[RespValue, int]:
    """One RESP2 reply from ``buffer[start:]``: (value, end); raises _IncompleteError when more is needed.

    Strings are decoded (UTF-8, bad bytes replaced): sentinel replies are ASCII.
    """
    end = buffer.find(b"\r\n", start)
    if end < 0:
        raise _IncompleteError
    kind, line = buffer[start:start + 1], buffer[start + 1:end]
    after = end + 2
    if kind == b"+":
        return line.decode(errors="replace"), after
    if kind == b"-":
        return RespError(line.decode(errors="replace")), after
    if kind == b":":
        return int(line), after
    if kind == b"$":
        length = int(line)
        if length < 0:
            return None, after
        if len(buffer) < after + length + 2:
            raise _IncompleteError
        return buffer[after:after + length].decode(errors="replace"), after + length + 2
    if kind == b"*":
        count = int(line)
        if count < 0:
            return None, after
        items = []
        position = after
        for _ in range(count):
            item, position = parse_reply(buffer, position)
            items.append(item)
        return items, position
    raise ValueError(f"not a RESP reply: {buffer[start:start + 40]!r}")


class Resp:
    """One connection to a sentinel or a redis-server; every read has a deadline."""

    def __init__(self, port: int, password: Optional[str] = None, timeout: float = 2.0) -> None:
        self.port = port
        self.timeout = timeout
        self.sock = socket.create_connection((LOOPBACK, port), timeout=timeout)
        self._buffer = b""
        if password:
            reply = self.call("AUTH", password)
            if reply != "OK":
                self.close()
                raise ConnectionError(f"AUTH to port {port} refused: {reply!r}")

    def send(self, *args: Union[str, bytes, int]) -> None:
        self.sock.sendall(encode_command(args))

    def call(self, *args: Union[str, bytes, int]) -> RespValue:
        self.send(*args)
        return self.read()

    def read(self, timeout: Optional[float] = None) -> RespValue:
        """The next reply; socket.timeout after ``timeout`` (default: the connection's) without one."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            value = self.read_buffered()
            if value is not _NOTHING:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout(f"no reply from port {self.port}")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"port {self.port} closed the connection")
            self._buffer += chunk

    def read_buffered(self) -> object:
        """A reply already received in full, or ``_NOTHING``."""
        try:
            value, end = parse_reply(self._buffer)
        except _IncompleteError:
            return _NOTHING
        self._buffer = self._buffer[end:]
        return value

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "Resp":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_NOTHING = object()


def query(port: int, *args: Union[str, bytes, int], password: Optional[str] = None,
          timeout: float = 2.0) -> RespValue:
    """One command on a fresh connection (connect, AUTH, command and reply each within ``timeout``)."""
    with Resp(port, password, timeout) as connection:
        return connection.call(*args)


def pairs(flat: Sequence) -> Dict[str, str]:
    """A flat field/value list (SENTINEL MASTERS, REPLICAS, ...) as a dict."""
    return {flat[i]: flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def parse_info(text: str) -> Dict[str, str]:
    """``INFO`` text as {field: value} (section headers and blank lines skipped)."""
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and ":" in line:
            name, _, value = line.partition(":")
            found[name] = value
    return found


def cmdstat_calls(info: Dict[str, str], command: str) -> int:
    """``calls`` of ``cmdstat_<command>`` in parsed INFO commandstats (0: never called)."""
    line = info.get(f"cmdstat_{command}")
    if not line:
        return 0
    return int(dict(part.split("=", 1) for part in line.split(","))["calls"])


# -- processes -------------------------------------------------------------------


def _write_config(path: Path, lines: Iterable[str]) -> None:
    path.write_text("".join(f"{line}\n" for line in lines))


class ShardServer(RedisServer):
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

    def start(self, port: Optional[int] = None) -> "ShardServer":
        require("redis-server")
        self.directory.mkdir(parents=True, exist_ok=True)
        restart = port is not None and self.config_path.exists()
        for _ in range(3):
            if not restart:
                self.port = port or free_port()
                _write_config(self.config_path, self.config_lines())
            self.argv = ["redis-server", str(self.config_path)]
            self.spawn()
            try:
                # The port was free when probed: what answers must be this very process.
                wait_until(lambda: not self.alive or redis_pid(self.port) == self.proc.pid, timeout=10,
                           what=f"redis-server pid {self.proc.pid} on port {self.port}")
            except AssertionError:
                self.kill()
                raise AssertionError(f"redis-server did not start:\n{self.output()}") from None
            if self.alive:
                return self
            if restart or port:
                break
        raise AssertionError(f"redis-server did not start:\n{self.output()}")

    def restart(self) -> "ShardServer":
        """Start again on the same port from the same (possibly rewritten) file."""
        self.kill()
        return self.start(self.port)

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


class SentinelServer(RedisServer):
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

    def start(self, port: Optional[int] = None) -> "SentinelServer":
        require("redis-sentinel")
        self.directory.mkdir(parents=True, exist_ok=True)
        restart = port is not None and self.config_path.exists()
        for _ in range(3):
            if not restart:
                self.port = port or free_port()
                _write_config(self.config_path, self.config_lines())
            self.argv = ["redis-sentinel", str(self.config_path)]
            self.spawn()
            try:
                wait_until(lambda: not self.alive or redis_pid(self.port, self.password) == self.proc.pid,
                           timeout=10, what=f"redis-sentinel pid {self.proc.pid} on port {self.port}")
            except AssertionError:
                self.kill()
                raise AssertionError(f"redis-sentinel did not start:\n{self.output()}") from None
            if self.alive:
                return self
            if restart or port:
                break
        raise AssertionError(f"redis-sentinel did not start:\n{self.output()}")

    def restart(self) -> "SentinelServer":
        """Start again on the same port from its own (rewritten) file: it keeps its myid and epochs."""
        self.kill()
        return self.start(self.port)

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
        self.relays: List["SentinelRelay"] = []
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
            self.watcher = SwitchWatcher(self)
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

    def relay(self, sentinel: SentinelServer) -> "SentinelRelay":
        """A started SentinelRelay in front of ``sentinel``, stopped with the topology."""
        relay = SentinelRelay(sentinel.port)
        self.relays.append(relay)
        return relay.start()


# -- +switch-master, as it happens ----------------------------------------------------


@dataclass(frozen=True)
class SwitchEvent:
    at: float  # time.monotonic() when the watcher read it
    sentinel: int  # the port of the sentinel that published it
    payload: str  # "<name> <old-ip> <old-port> <new-ip> <new-port>"

    @property
    def name(self) -> str:
        return self.payload.split()[0]

    @property
    def old_address(self) -> str:
        parts = self.payload.split()
        return f"{parts[1]}:{parts[2]}"

    @property
    def new_address(self) -> str:
        parts = self.payload.split()
        return f"{parts[3]}:{parts[4]}"


class SwitchWatcher(threading.Thread):
    """``PSUBSCRIBE +switch-master`` on every sentinel; records every message with its time.

    ``start()`` returns once every subscription is confirmed, so a fault
    injected afterwards is seen.  A sentinel that dies just drops out.
    """

    def __init__(self, topology: Topology) -> None:
        super().__init__(name="switch-watcher", daemon=True)
        self._topology = topology
        self._connections: List[Resp] = []
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = socket.socketpair()
        self._stopping = False
        self._changed = threading.Condition()
        self.events: List[SwitchEvent] = []

    def start(self) -> None:
        for sentinel in self._topology.sentinels:
            connection = Resp(sentinel.port, sentinel.password, timeout=5)
            reply = connection.call("PSUBSCRIBE", "+switch-master")
            if not (isinstance(reply, list) and reply[0] == "psubscribe"):
                raise AssertionError(f"PSUBSCRIBE on {sentinel}: {reply!r}")
            connection.sock.setblocking(False)
            self._connections.append(connection)
            self._selector.register(connection.sock, selectors.EVENT_READ, connection)
        self._selector.register(self._wake_read, selectors.EVENT_READ, None)
        super().start()

    def run(self) -> None:
        while not self._stopping:
            for key, _ in self._selector.select(timeout=1.0):
                connection = key.data
                if connection is None:
                    continue
                try:
                    data = connection.sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self._selector.unregister(connection.sock)
                    connection.close()
                    continue
                now = time.monotonic()
                connection.feed(data)
                while True:
                    message = connection.read_buffered()
                    if message is _NOTHING:
                        break
                    if isinstance(message, list) and len(message) == 4 and message[0] == "pmessage":
                        with self._changed:
                            self.events.append(SwitchEvent(now, connection.port, message[3]))
                            self._changed.notify_all()

    def stop(self) -> None:
        self._stopping = True
        try:
            self._wake_write.send(b"x")
        except OSError:
            pass
        if self.is_alive():
            self.join(5)
        for connection in self._connections:
            connection.close()
        self._selector.close()
        self._wake_read.close()
        self._wake_write.close()

    def first(self, name: str, after: float = 0.0) -> Optional[SwitchEvent]:
        """The first ``+switch-master`` for ``name`` read at or after ``after`` (monotonic), if any."""
        with self._changed:
            return next((event for event in self.events if event.name == name and event.at >= after), None)

    def wait(self, name: str, timeout: float = 15.0, after: float = 0.0) -> SwitchEvent:
        """``first(name, after)``, waiting up to ``timeout`` seconds for it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                event = next((event for event in self.events if event.name == name and event.at >= after), None)
                if event is not None:
                    return event
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no +switch-master for {name} within {timeout}s; saw {self.events}")
                self._changed.wait(remaining)

    def count(self, name: str) -> int:
        """How many sentinels have published a +switch-master for ``name`` so far."""
        with self._changed:
            return len({event.sentinel for event in self.events if event.name == name})


# -- a relay that can silence event connections ------------------------------------------

_SUBSCRIBE = re.compile(rb"subscribe", re.IGNORECASE)


class _Link:
    """One client connection through the relay and its upstream twin."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.to_client = bytearray()
        self.to_upstream = bytearray()
        self.tail = b""  # the last client bytes, so a SUBSCRIBE split over two reads is still seen
        self.events = False  # the client sent a (P|S)SUBSCRIBE
        self.closed = False


class SentinelRelay:
    """A TCP forwarder on 127.0.0.1 in front of one sentinel (one thread, selectors).

    ``cut_events(True)``: from then on, whatever the sentinel sends on a
    connection whose client sent a (P)SUBSCRIBE is read and dropped (no
    messages, no pongs); nothing is closed, and the client's bytes still
    reach the sentinel.  Query connections keep working.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((LOOPBACK, 0))
        self._listener.listen(64)
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = socket.socketpair()
        self._links: List[_Link] = []
        self._lock = threading.Lock()
        self._cut = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"relay-{self.port}", daemon=True)
        # What went through, for the tests to check that the cut had something to cut.
        self.connections = 0
        self.event_connections = 0
        self.dropped_bytes = 0

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def start(self) -> "SentinelRelay":
        self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_read, selectors.EVENT_READ, "wake")
        self._thread.start()
        return self

    def cut_events(self, cut: bool = True) -> None:
        with self._lock:
            self._cut = cut

    @property
    def open_event_connections(self) -> int:
        with self._lock:
            return sum(1 for link in self._links if link.events and not link.closed)

    def stop(self) -> None:
        """Stop the thread and close every socket; safe to call twice."""
        if self._stopping:
            return
        self._stopping = True
        try:
            self._wake_write.send(b"x")
        except OSError:
            pass
        if self._thread.is_alive():
            self._thread.join(5)
        for link in list(self._links):
            self._close(link)
        for sock in (self._listener, self._wake_read, self._wake_write):
            sock.close()
        self._selector.close()

    # -- the loop (relay thread only)

    def _run(self) -> None:
        while not self._stopping:
            for key, mask in self._selector.select(timeout=1.0):
                if key.data == "accept":
                    self._accept()
                elif key.data == "wake":
                    continue
                else:
                    link, side = key.data
                    if not link.closed and mask & selectors.EVENT_READ:
                        self._read(link, side)
                    if not link.closed and mask & selectors.EVENT_WRITE:
                        self._flush(link, side)

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        try:
            upstream = socket.create_connection((LOOPBACK, self.target_port), timeout=2)
        except OSError:  # the sentinel is down: as it would be without a relay
            client.close()
            return
        for sock in (client, upstream):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = _Link(client, upstream)
        with self._lock:
            self._links.append(link)
            self.connections += 1
        self._selector.register(client, selectors.EVENT_READ, (link, "client"))
        self._selector.register(upstream, selectors.EVENT_READ, (link, "upstream"))

    def _read(self, link: _Link, side: str) -> None:
        sock = link.client if side == "client" else link.upstream
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(link)
            return
        if side == "client":
            if not link.events:
                seen = link.tail + data
                if _SUBSCRIBE.search(seen):
                    with self._lock:
                        link.events = True
                        self.event_connections += 1
                link.tail = seen[-16:]
            link.to_upstream += data
            self._flush(link, "upstream")
        else:
            with self._lock:
                if link.events and self._cut:
                    self.dropped_bytes += len(data)
                    return
            link.to_client += data
            self._flush(link, "client")

    def _flush(self, link: _Link, side: str) -> None:
        """Write what is pending towards ``side``; watch for writability while some is left."""
        sock, pending, other = ((link.client, link.to_client, "client") if side == "client"
                                else (link.upstream, link.to_upstream, "upstream"))
        if pending:
            try:
                sent = sock.send(pending)
                del pending[:sent]
            except BlockingIOError:
                pass
            except OSError:
                self._close(link)
                return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if pending else 0)
        self._selector.modify(sock, events, (link, other))

    def _close(self, link: _Link) -> None:
        if link.closed:
            return
        link.closed = True
        for sock in (link.client, link.upstream):
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()
        with self._lock:
            self._links.remove(link)


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


__all__ = ["Resp", "RespError", "SentinelRelay", "SentinelServer", "ShardServer", "SwitchEvent", "SwitchWatcher",
           "Topology", "dead_address", "keys_on", "pool_text", "query"]
