"""A history checker for keys used as registers, and the client load that records the history.

Every write stores a value no other write uses (client name and a counter),
so a read names the write it saw.  A history is correct per key when no read
is stale: a read returns a value that was written, and no write that
finished before the read began had itself begun after the write the read saw
had finished (that write would have overwritten it for everyone).  A read of
nothing is stale once any write of that key finished before the read began
(nothing here deletes).  This is the register condition of linearizability,
checked with the operations' invocation and response times.

One allowance, asked for explicitly: ``unsure`` windows of time in which
Redis itself may lose acknowledged writes — a Sentinel failover promotes a
replica that may lack the master's last writes (asynchronous replication;
not the proxies' or the migration's doing).  A write that *completed*
inside such a window counts as a failed one (it may or may not have
happened); every other operation, and every read, is held to the same rule.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import redis


@dataclass
class Op:
    client: str
    kind: str              # "write" or "read"
    key: bytes
    value: Optional[bytes]
    start: float
    end: float
    ok: bool               # answered (a failed write may or may not have happened: never trusted as done)


def check(ops: Sequence[Op], unsure: Sequence[Tuple[float, float]] = ()) -> List[str]:
    """The problems of ``ops`` (empty: the history is correct per key).

    ``unsure``: (first, last) windows of ``time.monotonic()``; a write that
    ended inside one is not trusted as done (see the module docstring).
    """
    problems: List[str] = []
    by_key: Dict[bytes, List[Op]] = {}
    for op in ops:
        by_key.setdefault(op.key, []).append(op)

    def trusted(op: Op) -> bool:
        return op.ok and not any(first <= op.end <= last for first, last in unsure)

    for key, key_ops in by_key.items():
        writes = {op.value: op for op in key_ops if op.kind == "write"}
        done = [op for op in key_ops if op.kind == "write" and trusted(op)]
        for read in (op for op in key_ops if op.kind == "read" and op.ok):
            if read.value is None:
                before = [w for w in done if w.end < read.start]
                if before:
                    problems.append(f"{key!r}: read of nothing at {read.start:.6f} after the write of "
                                    f"{before[0].value!r} finished at {before[0].end:.6f}")
                continue
            seen = writes.get(read.value)
            if seen is None:
                problems.append(f"{key!r}: read {read.value!r}, which no write stored")
                continue
            if seen.start > read.end:
                problems.append(f"{key!r}: read {read.value!r} before its write began")
                continue
            newer = [w for w in done if w.start > seen.end and w.end < read.start]
            if newer:
                problems.append(f"{key!r}: stale read of {read.value!r} at {read.start:.6f}: {newer[0].value!r} "
                                f"was written after it and finished at {newer[0].end:.6f}")
    return problems


class RegisterLoad(threading.Thread):
    """One client: alternately writes a new value to a key and reads a key, through ``address``."""

    def __init__(self, name: str, address: str, keys: Sequence[bytes], deadline: float,
                 history: List[Op], limit: int = 200000, password: Optional[str] = None) -> None:
        super().__init__(daemon=True, name=f"load-{name}")
        host, _, port = address.rpartition(":")
        self.client = redis.Redis(host=host, port=int(port), socket_timeout=10, protocol=2, password=password)
        self.label = name
        self.keys = list(keys)
        self.deadline = deadline
        self.history = history
        self.limit = limit
        self.count = 0
        self.errors: List[str] = []
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        number = 0
        while not self._halt.is_set() and time.monotonic() < self.deadline and number < self.limit:
            key = self.keys[number % len(self.keys)]
            if number % 2 == 0:
                value = f"{self.label}:{number}".encode()
                start = time.monotonic()
                try:
                    ok = bool(self.client.set(key, value))
                except redis.RedisError as err:
                    ok = False
                    self.errors.append(f"set {key!r}: {type(err).__name__}: {err} @{time.time():.3f}")
                self.history.append(Op(self.label, "write", key, value, start, time.monotonic(), ok))
            else:
                start = time.monotonic()
                try:
                    got = self.client.get(key)
                    ok = True
                except redis.RedisError as err:
                    got, ok = None, False
                    self.errors.append(f"get {key!r}: {type(err).__name__}: {err} @{time.time():.3f}")
                self.history.append(Op(self.label, "read", key, got, start, time.monotonic(), ok))
            number += 1
            self.count = number
