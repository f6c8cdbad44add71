"""Real backend processes and waiting helpers for the integration tests.

Every process is started in its own session on a free loopback port, its
output goes to a file under the test's tmp_path, and ``stop`` always
continues a frozen process before terminating it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, List, Optional

import pytest

LOOPBACK = "127.0.0.1"


def wait_until(predicate: Callable[[], object], timeout: float = 5.0, interval: float = 0.01,
               what: str = "condition") -> object:
    """Poll ``predicate`` until it is truthy; raise AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Optional[BaseException] = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except Exception as err:  # noqa: BLE001 - remembered for the message
            last_error = err
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_error!r})")
        # Waiting on an external process: the pause is the poll interval, not a timing assumption.
        _pause(interval)


def _pause(seconds: float) -> None:
    import select

    select.select([], [], [], seconds)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def bound_addresses(path: Path, process: Optional["Process"] = None, pid: Optional[int] = None,
                    generation: int = 1, timeout: float = 20.0) -> dict:
    """The ``--bound-addresses`` document at ``path``, once the proxy has written it.

    Pools listen on ``127.0.0.1:0`` and the stats and HTTP ports on 0, so the
    system picks every port and nothing races for one; this file says which.
    Waits for a document from ``process`` (or from ``pid``, for a daemon)
    showing ``generation`` or later, so a stale file from an earlier process
    never counts; fails with the output as soon as ``process`` exits.
    """
    if process is not None:
        pid = process.proc.pid

    def ready():
        if process is not None and not process.alive:
            return "exited"
        try:
            document = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        if (pid is None or document["pid"] == pid) and document["generation"] >= generation:
            return document
        return None

    output = process.output if process is not None else (lambda: "")
    try:
        document = wait_until(ready, timeout=timeout, what=f"{path} from pid {pid} at generation {generation}")
    except AssertionError as err:
        raise AssertionError(f"{err}\noutput:\n{output()}") from None
    if document == "exited":
        raise AssertionError(f"the proxy exited before writing {path}:\n{output()}")
    return document


def port_of(address: str) -> int:
    """The port of a ``host:port`` (or ``[v6]:port``) address from a bound-addresses document."""
    return int(address.rpartition(":")[2])


def require(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        pytest.fail(f"{program} is not installed: run the README's test command (make test), which installs it")
    return path


class Process:
    """A child process with a log file, stopped for sure by ``stop``."""

    def __init__(self, argv: List[str], log: Path, env: Optional[dict] = None) -> None:
        self.argv = argv
        self.log = log
        self._env = env
        self.proc: Optional[subprocess.Popen] = None
        # The proxy's --bound-addresses file, when it is one started with it.
        self.bound_path: Optional[Path] = None

    def spawn(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True, env=self._env)

    def bound(self, generation: int = 1, timeout: float = 20.0) -> dict:
        """This proxy's ``--bound-addresses`` document (see ``bound_addresses``)."""
        assert self.bound_path is not None, "started without --bound-addresses"
        return bound_addresses(self.bound_path, self, generation=generation, timeout=timeout)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def freeze(self) -> None:
        """SIGSTOP the process and return once every one of its threads is stopped.

        The signal is asynchronous: each thread stops only when it next runs,
        so without the wait a multi-threaded server (memcached's workers) can
        still answer a request sent after ``kill()`` returned.
        """
        self.proc.send_signal(signal.SIGSTOP)
        wait_until(lambda: self._group_stopped() and self._thread_states() <= {"T", "Z"}, timeout=10,
                   what=f"pid {self.proc.pid} to stop")
        if self.proc.poll() is not None:
            raise AssertionError(f"pid {self.proc.pid} exited instead of stopping:\n{self.output()}")

    def thaw(self) -> None:
        """SIGCONT the process and return once none of its threads is stopped any more.

        A process that is gone is left alone, so ``finally: thaw()`` is always safe.
        """
        if not self.alive:
            return
        self.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: "T" not in self._thread_states(), timeout=10, what=f"pid {self.proc.pid} to continue")

    def _group_stopped(self) -> bool:
        """Whether the kernel reports the child stopped (or exited), without reaping it.

        The kernel reports a stop only once the last thread of the group has
        stopped.  WNOWAIT leaves the status in place, so an exit stays for
        Popen to collect and Popen's returncode bookkeeping is not bypassed.
        """
        if not hasattr(os, "waitid"):  # /proc alone then tells
            return True
        flags = os.WSTOPPED | os.WEXITED | os.WNOHANG | os.WNOWAIT
        return os.waitid(os.P_PID, self.proc.pid, flags) is not None

    def _thread_states(self) -> set:
        """The set of /proc states ('R', 'S', 'T', ...) of the process's threads."""
        states = set()
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            try:
                stat = (task / "stat").read_text()
            except OSError:  # the thread ended meanwhile
                continue
            # The command name in parentheses may hold spaces: the state follows its last ')'.
            states.add(stat[stat.rindex(")") + 2])
        return states

    def kill(self) -> None:
        """Kill at once (no clean shutdown), as a crash would."""
        if self.alive:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


def ping_redis(port: int, password: Optional[str] = None) -> bool:
    with socket.create_connection((LOOPBACK, port), timeout=1) as sock:
        if password:
            sock.sendall(b"AUTH %s\r\n" % password.encode())
            if not sock.recv(100).startswith(b"+OK"):
                return False
        sock.sendall(b"PING\r\n")
        return sock.recv(100).startswith(b"+PONG")


def redis_pid(port: int, password: Optional[str] = None) -> Optional[int]:
    """The ``process_id`` of the redis-server answering on ``port`` (None if it does not answer so)."""
    with socket.create_connection((LOOPBACK, port), timeout=1) as sock:
        if password:
            sock.sendall(b"AUTH %s\r\n" % password.encode())
            if not sock.recv(100).startswith(b"+OK"):
                return None
        sock.sendall(b"INFO server\r\n")
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            data += chunk
        header, _, body = data.partition(b"\r\n")
        if not header.startswith(b"$"):  # an error (LOADING...) or not a redis at all
            return None
        while len(body) < int(header[1:]):
            chunk = sock.recv(65536)
            if not chunk:
                return None
            body += chunk
    for line in body.split(b"\r\n"):
        if line.startswith(b"process_id:"):
            return int(line.split(b":")[1])
    return None


class RedisServer(Process):
    """A real redis-server on a free loopback port."""

    def __init__(self, directory: Path, password: Optional[str] = None) -> None:
        self.directory = directory
        self.password = password
        self.port = 0
        super().__init__([], directory / "redis.log")

    def start(self, port: Optional[int] = None) -> "RedisServer":
        require("redis-server")
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            self.port = port or free_port()
            self.argv = ["redis-server", "--bind", LOOPBACK, "--port", str(self.port), "--save", "",
                         "--appendonly", "no", "--dir", str(self.directory), "--daemonize", "no"]
            if self.password:
                self.argv += ["--requirepass", self.password]
            self.spawn()
            try:
                # The port was free when probed, not necessarily when redis-server bound it: what
                # answers must be this very process (a server that lost the race exits at once).
                wait_until(lambda: not self.alive or redis_pid(self.port, self.password) == self.proc.pid,
                           timeout=10, what=f"redis-server pid {self.proc.pid} on port {self.port}")
            except AssertionError:
                self.stop()
                raise AssertionError(f"redis-server did not start:\n{self.output()}") from None
            if self.alive:
                return self
            if port:  # a fixed port (a restart) that is taken: no point retrying
                break
        raise AssertionError(f"redis-server did not start:\n{self.output()}")

    def restart(self) -> "RedisServer":
        """Start again on the same port after ``kill`` or ``stop``."""
        self.stop()
        return self.start(self.port)

    def client(self, **kwargs):
        import redis

        kwargs.setdefault("socket_timeout", 5)
        kwargs.setdefault("socket_connect_timeout", 5)
        kwargs.setdefault("protocol", 2)
        return redis.Redis(host=LOOPBACK, port=self.port, password=self.password, **kwargs)

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"


def ping_memcached(port: int) -> bool:
    with socket.create_connection((LOOPBACK, port), timeout=1) as sock:
        sock.sendall(b"version\r\n")
        return sock.recv(100).startswith(b"VERSION ")


class MemcachedServer(Process):
    """A real memcached on a port it picks itself and reports (race-free)."""

    def __init__(self, directory: Path, memory_mb: int = 64) -> None:
        self.directory = directory
        self.memory_mb = memory_mb
        self.port = 0
        super().__init__([], directory / "memcached.log")

    def start(self, port: Optional[int] = None, extra: Optional[List[str]] = None) -> "MemcachedServer":
        if extra is not None:
            self.extra = extra
        require("memcached")
        self.directory.mkdir(parents=True, exist_ok=True)
        port_file = self.directory / "ports"
        port_file.unlink(missing_ok=True)
        # "-l host:0" (not "-p 0") is what makes memcached report the port it got.
        self.argv = ["memcached", "-l", f"{LOOPBACK}:{port or 0}", "-U", "0", "-m", str(self.memory_mb),
                     "-c", "4096", *getattr(self, "extra", [])]
        if os.geteuid() == 0:
            self.argv += ["-u", "root"]
        env = dict(os.environ, MEMCACHED_PORT_FILENAME=str(port_file))
        self._env = env
        self.spawn()

        def port_known() -> bool:
            # This process writes the file once it has bound, so even a fixed port (a restart)
            # cannot be mistaken for another server that took it meanwhile.
            if not self.alive:
                return True
            text = port_file.read_text() if port_file.exists() else ""
            for line in text.splitlines():
                if line.startswith("TCP INET:"):
                    self.port = int(line.split(":")[1])
                    return ping_memcached(self.port)
            return False

        wait_until(port_known, timeout=10, what="memcached to listen")
        if not self.alive:
            raise AssertionError(f"memcached exited:\n{self.output()}")
        assert not port or self.port == port, (port, self.port)
        return self

    def restart(self) -> "MemcachedServer":
        self.stop()
        return self.start(self.port)

    def client(self, **kwargs):
        from pymemcache.client.base import Client

        kwargs.setdefault("timeout", 5)
        kwargs.setdefault("connect_timeout", 5)
        return Client((LOOPBACK, self.port), **kwargs)

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"
