"""A real redis-sentinel process for the sentinel probe's integration tests.

Each sentinel gets its own directory and a config file written fresh at every
start: sentinel rewrites its file with a ``myid``, and sentinels sharing one
never count each other (reference §1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple

from tests.servers import LOOPBACK, Process, free_port, redis_pid, require, wait_until


class SentinelServer(Process):
    """redis-sentinel on a free loopback port, monitoring ``masters`` ((name, port) on 127.0.0.1)."""

    def __init__(self, directory: Path, masters: Sequence[Tuple[str, int]], quorum: int = 2,
                 down_after_ms: int = 1000, failover_timeout_ms: int = 3000) -> None:
        self.directory = directory
        self.masters = list(masters)
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.port = 0
        super().__init__([], directory / "sentinel.log")

    def _write_config(self) -> Path:
        lines = [f"port {self.port}", f"bind {LOOPBACK}", "daemonize no", "protected-mode no",
                 f"dir {self.directory}", f"logfile {self.log}"]
        for name, port in self.masters:
            lines += [f"sentinel monitor {name} {LOOPBACK} {port} {self.quorum}",
                      f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
                      f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
                      f"sentinel parallel-syncs {name} 1"]
        path = self.directory / "sentinel.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, port: Optional[int] = None) -> "SentinelServer":
        require("redis-sentinel")
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            self.port = port or free_port()
            self.argv = ["redis-sentinel", str(self._write_config())]
            self.spawn()
            try:
                # As for redis-server: what answers on the port must be this very process.
                wait_until(lambda: not self.alive or redis_pid(self.port) == self.proc.pid,
                           timeout=10, what=f"redis-sentinel pid {self.proc.pid} on port {self.port}")
            except AssertionError:
                self.stop()
                raise AssertionError(f"redis-sentinel did not start:\n{self.output()}") from None
            if self.alive:
                return self
            if port:
                break
        raise AssertionError(f"redis-sentinel did not start:\n{self.output()}")

    @property
    def address(self) -> Tuple[str, int]:
        return (LOOPBACK, self.port)
