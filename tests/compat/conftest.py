"""The compat group's fixtures: real applications against one twistd twinproxy with two Redis pools.

- ``pool3``: pool ``three``, ``hash: md5``, ``hash_tag "{}"``, over three redis-servers: where a framework's keys can be
  grouped with a hash tag (redis-py's own features, Django's cache with a tagged ``KEY_PREFIX``, limits,
  BullMQ with a ``{prefix}``).
- ``pool1``: pool ``one`` over a fourth redis-server: the single-server pool, for frameworks whose
  transactions and blocking pops span fixed, unrelated key names (rq, Celery/kombu, Django untagged), as
  twemproxy is commonly deployed for connection pooling alone.

The servers and the proxy live for the group (a twistd start costs about a second); every test starts
on empty backends (FLUSHALL, SCRIPT FLUSH, FUNCTION FLUSH on each, not through the proxy), and a proxy
that dies during a test fails that test with its log and is started again for the next one.

``TWINPROXY_COMPAT_DIRECT=1`` points both pools straight at one redis-server each (no proxy): the way to
tell a bug of a test from one of the proxy, since every test here must pass against Redis itself.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

from tests.conftest import REPO, spawn_twistd, stop_proxy
from tests.proxy_clients import write_atomically
from tests.servers import LOOPBACK, Process, RedisServer, port_of

HERE = Path(__file__).resolve().parent
# Every request a compat client makes is answered well within this; a longer wait is a hang.
CLIENT_TIMEOUT = 10
# A realistic reply timeout toward the servers: the blocking commands the frameworks send (BRPOP for
# 1 s, BZPOPMIN and XREAD BLOCK for seconds) must not be cut by it.
POOL_TIMEOUT_MS = 2000


def pytest_collection_modifyitems(items: List[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.compat)


def direct_mode() -> bool:
    return os.environ.get("TWINPROXY_COMPAT_DIRECT", "").lower() in ("1", "true", "yes")


@dataclasses.dataclass
class CompatPool:
    """One pool as the applications see it: an address, and the redis-servers behind it."""

    name: str
    port: int
    backends: List[RedisServer]

    @property
    def host(self) -> str:
        return LOOPBACK

    def url(self, db: int = 0) -> str:
        return f"redis://{LOOPBACK}:{self.port}/{db}"

    def client(self, **kwargs):
        """A redis-py client of this pool (redis-py's own defaults otherwise, RESP version included)."""
        import redis

        kwargs.setdefault("socket_timeout", CLIENT_TIMEOUT)
        kwargs.setdefault("socket_connect_timeout", CLIENT_TIMEOUT)
        return redis.Redis(host=LOOPBACK, port=self.port, **kwargs)

    def backend_keys(self, db: int = 0) -> Dict[str, List[bytes]]:
        """Each backend's keys in ``db`` (read on the servers themselves), by backend address."""
        found = {}
        for backend in self.backends:
            with backend.client(db=db) as client:
                found[backend.address] = sorted(client.keys("*"))
        return found

    def all_backend_keys(self, db: int = 0) -> List[bytes]:
        return sorted(key for keys in self.backend_keys(db).values() for key in keys)


class CompatProxy:
    """The session's twistd twinproxy over four redis-servers, with pools ``three`` and ``one``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.servers = [RedisServer(directory / f"redis{index}") for index in range(4)]
        self.processes: List[Process] = []
        self.process: Optional[Process] = None
        self.pools: Dict[str, CompatPool] = {}
        self.starts = 0

    def start(self) -> "CompatProxy":
        for server in self.servers:
            server.start()
        if direct_mode():
            self.pools = {"three": CompatPool("three", self.servers[0].port, self.servers[:1]),
                          "one": CompatPool("one", self.servers[3].port, self.servers[3:])}
            return self
        self._start_proxy()
        return self

    def _config_text(self) -> str:
        def pool(name: str, servers: List[RedisServer], *extra: str) -> str:
            lines = [f"{name}:", f"  listen: {LOOPBACK}:0", "  redis: true", f"  timeout: {POOL_TIMEOUT_MS}",
                     "  preconnect: true", *extra, "  servers:"]
            lines += [f"   - {server.address}:1 {name}{index}" for index, server in enumerate(servers)]
            return "\n".join(lines) + "\n"

        # md5, not nutcracker's default fnv1a_64: that one puts short keys that differ in their last
        # characters (news:0 ... news:5, {tag0} ... {tag11}) on one or two of the three servers, and the
        # tests must span all three.
        return pool("three", self.servers[:3], "  hash: md5", '  hash_tag: "{}"') + pool("one", self.servers[3:])

    def _start_proxy(self) -> None:
        config = self.directory / "compat-pools.yml"
        write_atomically(config, self._config_text())
        self.process = spawn_twistd(config, self.directory / f"twinproxy{self.starts}", self.processes)
        self.starts += 1
        bound = self.process.bound(timeout=30)
        self.pools = {"three": CompatPool("three", port_of(bound["pools"]["three"]), self.servers[:3]),
                      "one": CompatPool("one", port_of(bound["pools"]["one"]), self.servers[3:])}

    def ensure_running(self) -> None:
        if self.process is not None and not self.process.alive:
            self._start_proxy()

    def died(self) -> Optional[str]:
        """The log of a proxy that is no longer running, or None while it runs (or in direct mode)."""
        if self.process is None or self.process.alive:
            return None
        return self.process.output()

    def clean_backends(self) -> None:
        for server in self.servers:
            with server.client() as client:
                client.flushall()
                client.script_flush()
                client.function_flush()

    def stop(self) -> None:
        for process in self.processes:
            stop_proxy(process)
        for server in self.servers:
            server.stop()


# Package scope: stopped once the group is done, not at the end of the whole suite.
@pytest.fixture(scope="package")
def compat_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CompatProxy]:
    proxy = CompatProxy(tmp_path_factory.mktemp("compat"))
    try:
        yield proxy.start()
    finally:
        proxy.stop()


@pytest.fixture
def compat_pools(compat_proxy: CompatProxy) -> Iterator[Dict[str, CompatPool]]:
    """Both pools on empty backends; fails the test whose run the proxy did not survive."""
    compat_proxy.ensure_running()
    compat_proxy.clean_backends()
    yield compat_proxy.pools
    log = compat_proxy.died()
    if log is not None:
        pytest.fail(f"the proxy exited during this test; its log ends with:\n{log}")


@pytest.fixture
def pool3(compat_pools: Dict[str, CompatPool]) -> CompatPool:
    return compat_pools["three"]


@pytest.fixture
def pool1(compat_pools: Dict[str, CompatPool]) -> CompatPool:
    return compat_pools["one"]


@pytest.fixture
def run_log(tmp_path: Path) -> Path:
    """A file the jobs and tasks of a test append one line to per run (``O_APPEND``): how "exactly once"
    is checked without trusting the system under test."""
    return tmp_path / "runs.log"


def read_runs(path: Path) -> List[str]:
    return path.read_text().split() if path.exists() else []


def python_env(**extra: str) -> Dict[str, str]:
    """The environment of a Python subprocess that imports this checkout's ``tests`` package."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


# -- Node: ioredis and BullMQ, pinned by tests/compat/node/package-lock.json ---------------------------

NODE_DIR = HERE / "node"
NPM_TIMEOUT = 240  # seconds for `npm ci` on a fresh machine (20 packages, 13 MB)


def node_binary() -> str:
    """The ``node`` program, or a test failure saying how to get it (``make test`` installs Debian's)."""
    for name in ("node", "nodejs"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("node is not installed: run the README's test command (make test), which installs Debian's "
                "nodejs and npm (scripts/ensure-system-deps.sh)")


def install_node_packages() -> None:
    """``npm ci`` into tests/compat/node/node_modules (gitignored) unless it holds this very lockfile already.

    One session at a time installs (a file lock); the packages come from the npm registry, so a machine
    that cannot reach it fails here, with npm's own words.
    """
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("npm is not installed: run the README's test command (make test), which installs Debian's "
                    "nodejs and npm (scripts/ensure-system-deps.sh)")
    manifest, lockfile = NODE_DIR / "package.json", NODE_DIR / "package-lock.json"
    digest = hashlib.sha256(manifest.read_bytes() + (lockfile.read_bytes() if lockfile.exists() else b""))
    stamp = NODE_DIR / "node_modules" / ".twinproxy-installed"
    with open(NODE_DIR / ".install.lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        if stamp.exists() and stamp.read_text() == digest.hexdigest():
            return
        # No install scripts: the one package that has any (msgpackr-extract) works without its own.
        command = [npm, "ci" if lockfile.exists() else "install", "--ignore-scripts", "--no-audit", "--no-fund"]
        env = dict(os.environ, npm_config_update_notifier="false")
        try:
            done = subprocess.run(command, cwd=NODE_DIR, env=env, capture_output=True, text=True,
                                  timeout=NPM_TIMEOUT, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as err:
            pytest.fail(f"{' '.join(command)} in {NODE_DIR} did not finish in {NPM_TIMEOUT}s "
                        f"(is the npm registry reachable?):\n{err.stdout or ''}{err.stderr or ''}")
        if done.returncode != 0:
            pytest.fail(f"{' '.join(command)} in {NODE_DIR} failed (exit {done.returncode}; the npm registry must "
                        f"be reachable):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        stamp.write_text(digest.hexdigest())


@pytest.fixture(scope="session")
def node() -> str:
    """The ``node`` program, with the pinned ioredis and BullMQ installed beside the scripts."""
    binary = node_binary()
    install_node_packages()
    return binary


def run_node(node: str, script: str, *args: str, timeout: float = 60) -> dict:
    """Run tests/compat/node/``script``; its last stdout line, a JSON object, plus ``exit`` and ``stderr``."""
    try:
        done = subprocess.run([node, str(NODE_DIR / script), *args], cwd=NODE_DIR, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"{script} did not exit in {timeout}s:\n{err.stdout or ''}{err.stderr or ''}") from None
    lines = done.stdout.strip().splitlines()
    assert lines, f"{script} printed nothing (exit {done.returncode}):\n{done.stderr[-3000:]}"
    result = json.loads(lines[-1])
    result.update(exit=done.returncode, stderr=done.stderr[-3000:])
    return result
