"""Real cluster processes for the end-to-end tests: a dashboard, proxies, and the admin CLI.

``Dashboard`` runs ``twinproxy-dashboard`` on a free loopback port with a
token file (and a Redis credentials file when given ``redis_auth``);
``admin(...)`` runs ``twinproxy-admin`` against it and returns the exit
status, stdout and stderr; ``ClusterProxy`` runs the ``twinproxy``
command with one cluster pool (``--workers N`` when asked).  Every process
is a :class:`tests.servers.Process`: the fixture that made it stops it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from tests.conftest import spawn_proxy, stop_proxy
from tests.proxy_clients import read_stats
from tests.servers import LOOPBACK, Process, free_port, wait_until

BIN = Path(sys.executable).parent
TOKEN = "s3cret-token"


class Dashboard:
    """One ``twinproxy-dashboard`` process."""

    def __init__(self, workdir: Path, coordinator: str, cluster: str, protocol: str = "redis",
                 extra: tuple = (), redis_auth: Optional[str] = None, redis_auth_user: Optional[str] = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.coordinator = coordinator
        self.cluster = cluster
        self.protocol = protocol
        self.extra = extra
        self.port = free_port()
        self.token_file = workdir / "token"
        self.token_file.write_text(TOKEN + "\n")
        # The data servers' password (--redis-auth-file), when given, and its ACL user (--redis-auth-user);
        # rewrite the file to change the password.
        self.redis_auth_file: Optional[Path] = None
        if redis_auth is not None:
            self.redis_auth_file = workdir / "redis-auth"
            self.redis_auth_file.write_text(redis_auth + "\n")
        self.redis_auth_user = redis_auth_user
        self.process: Optional[Process] = None
        self._runs = 0

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def argv(self) -> List[str]:
        return [str(BIN / "twinproxy-dashboard"), "--coordinator", self.coordinator, "--cluster", self.cluster,
                "--protocol", self.protocol, "--listen", self.address, "--token-file", str(self.token_file),
                *(["--redis-auth-file", str(self.redis_auth_file)] if self.redis_auth_file is not None else []),
                *(["--redis-auth-user", self.redis_auth_user] if self.redis_auth_user is not None else []),
                *self.extra]

    def spawn(self) -> Process:
        self._runs += 1
        self.process = Process(self.argv(), self.workdir / f"dashboard{self._runs}.log", env=_env())
        self.process.spawn()
        return self.process

    def start(self, timeout: float = 30.0) -> "Dashboard":
        process = self.spawn()
        wait_until(lambda: self._ready(process), timeout=timeout, what=f"dashboard on {self.address}")
        return self

    def _ready(self, process: Process) -> bool:
        if not process.alive:
            raise AssertionError(f"dashboard exited ({process.proc.returncode}):\n{process.output()}")
        try:
            self.get("/api/status")
        except OSError:
            return False
        return True

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://{self.address}{path}", timeout=5) as answer:
            return json.loads(answer.read())

    def status(self) -> Dict[str, Any]:
        return self.get("/api/status")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()


def admin(dashboard: Dashboard, *args: str, token: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    """``twinproxy-admin --dashboard ... [--token-file ...] args``, run to completion."""
    argv = [str(BIN / "twinproxy-admin"), "--dashboard", dashboard.address]
    if token:
        argv += ["--token-file", str(dashboard.token_file)]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=timeout, env=_env())


def admin_ok(dashboard: Dashboard, *args: str) -> str:
    """``admin`` that must succeed; its stdout."""
    done = admin(dashboard, *args)
    assert done.returncode == 0, f"twinproxy-admin {' '.join(args)} -> {done.returncode}: {done.stderr}{done.stdout}"
    return done.stdout


def status_json(dashboard: Dashboard) -> Dict[str, Any]:
    return json.loads(admin_ok(dashboard, "status", "--json"))


class ClusterProxy:
    """The ``twinproxy`` command serving one cluster pool."""

    def __init__(self, workdir: Path, coordinator: str, cluster: str, redis: bool = True, workers: int = 1,
                 processes: Optional[List[Process]] = None, extra_keys: str = "") -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.stats_port = free_port()
        self.workers = workers
        self.config = workdir / "pools.yml"
        self.config.write_text(
            f"{cluster}:\n  listen: {LOOPBACK}:{self.port}\n  redis: {'true' if redis else 'false'}\n"
            f"  timeout: 2000\n  cluster: {cluster}\n  coordinator: {coordinator}\n{extra_keys}")
        self._processes = processes if processes is not None else []
        self.process: Optional[Process] = None

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def start(self) -> "ClusterProxy":
        argv = [str(BIN / "twinproxy"), "-c", str(self.config), "-s", str(self.stats_port), "-a", LOOPBACK,
                "-v", "6"]
        if self.workers > 1:
            argv += ["--workers", str(self.workers)]
        self.process = spawn_proxy(argv, self.workdir / "proxy.log", self._processes)
        wait_until(self._listening, timeout=30, what=f"cluster proxy on {self.address}")
        return self

    def _listening(self) -> bool:
        import socket

        if not self.process.alive:
            raise AssertionError(f"proxy exited:\n{self.process.output()}")
        try:
            socket.create_connection((LOOPBACK, self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def stats(self) -> Dict[str, Any]:
        return read_stats(f"{LOOPBACK}:{self.stats_port}")

    def stop(self) -> None:
        if self.process is not None:
            stop_proxy(self.process)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            stop_proxy(self.process)


def wait_for_status(dashboard: Dashboard, predicate: Callable[[Dict[str, Any]], bool], timeout: float = 30.0,
                    what: str = "cluster status") -> Dict[str, Any]:
    """Poll ``/api/status`` until ``predicate`` holds; the status that satisfied it."""
    seen: Dict[str, Any] = {}

    def check() -> bool:
        seen.clear()
        try:
            seen.update(dashboard.status())
        except OSError:
            return False
        return predicate(seen)

    try:
        wait_until(check, timeout=timeout, what=what)
    except AssertionError as err:
        raise AssertionError(f"{err}; last status: {json.dumps(seen)[:3000]}") from None
    return dict(seen)


def proxies_at(status: Dict[str, Any], count: int) -> bool:
    """``count`` proxies registered, every one at the cluster's generation."""
    proxies = status.get("proxies", [])
    return len(proxies) == count and all(p.get("generation") == status.get("generation") for p in proxies)


def independent_slot(key: bytes) -> int:
    """Codis's slot of ``key``, computed here apart from twinproxy's own code (zlib, the tag rule)."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end >= 0:
            key = key[start + 1:end]
    return zlib.crc32(key) % 1024


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    return env
