"""The proxies' acknowledgements: who is registered, and waiting until all have applied a generation.

Owns :class:`ProxyInfo` (one registration under ``/clusters/<c>/proxies``,
contract §3), :class:`ProxyAcks` (fed by the children watch; ``wait(N)``
fires once every proxy registered *at that moment* reports ``generation``
>= N — a proxy that registers meanwhile counts, one whose registration
vanishes no longer does) and :class:`AcksMissing`, the timeout naming the
laggards.  Runs in the reactor; no I/O of its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from twisted.internet import defer


class AcksMissing(Exception):
    """Some proxies did not report ``generation`` within ``timeout``; ``lagging`` names them."""

    def __init__(self, generation: int, lagging: List[str], timeout: float) -> None:
        self.generation = generation
        self.lagging = lagging
        self.timeout = timeout
        super().__init__(f"proxies {', '.join(lagging)} did not acknowledge generation {generation} "
                         f"within {timeout:g}s")


@dataclass(frozen=True)
class ProxyInfo:
    """One proxy registration; ``generation`` is -1 when the document is unreadable (``problem`` says why)."""

    id: str
    generation: int
    addr: Optional[str] = None
    admin: Optional[str] = None
    pid: Optional[int] = None
    host: Optional[str] = None
    updated: Optional[float] = None
    problem: Optional[str] = None
    document: Dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def status(self) -> Dict[str, Any]:
        """The proxy's entry in /api/status."""
        return {"id": self.id, "addr": self.addr, "admin": self.admin, "generation": self.generation,
                "last_seen": self.updated, "pid": self.pid, "host": self.host,
                "protocol": self.document.get("protocol"), "workers": self.document.get("workers"),
                "version": self.document.get("version"), "problem": self.problem}


def parse_proxy(name: str, value: bytes) -> ProxyInfo:
    """A registration's value (never raises: a bad one is a proxy that acknowledges nothing)."""
    try:
        document = json.loads(value.decode("utf-8"))
        if not isinstance(document, dict):
            raise ValueError("not a JSON object")
        generation = document.get("generation")
        if isinstance(generation, bool) or not isinstance(generation, int):
            raise ValueError(f"generation {generation!r} is not an integer")
    except (UnicodeDecodeError, ValueError) as err:
        return ProxyInfo(id=name, generation=-1, problem=f"unreadable registration: {err}")

    def text(key: str) -> Optional[str]:
        item = document.get(key)
        return item if isinstance(item, str) else None

    pid = document.get("pid")
    updated = document.get("updated")
    return ProxyInfo(id=name, generation=generation, addr=text("addr"), admin=text("admin"),
                     pid=pid if isinstance(pid, int) and not isinstance(pid, bool) else None, host=text("host"),
                     updated=float(updated) if isinstance(updated, (int, float)) else None, document=document)


class _Wait:
    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.result: defer.Deferred = defer.Deferred()
        self.timer: Any = None


class ProxyAcks:
    """The registered proxies (``proxies``, by id) and the waits for their acknowledgements."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.proxies: Dict[str, ProxyInfo] = {}
        self._waits: List[_Wait] = []

    def update(self, children: Mapping[str, Any]) -> None:
        """The children watch's latest ``{name: Node}``."""
        self.proxies = {name: parse_proxy(name, node.value) for name, node in children.items()}
        self._check()

    def lagging(self, generation: int) -> List[str]:
        """Ids of the registered proxies that have not reported ``generation`` yet, sorted."""
        return sorted(name for name, info in self.proxies.items() if info.generation < generation)

    def wait(self, generation: int, timeout: float) -> defer.Deferred:
        """Fires (None) when no registered proxy lags ``generation``; AcksMissing after ``timeout``."""
        wait = _Wait(generation)
        if not self.lagging(generation):
            wait.result.callback(None)
            return wait.result
        self._waits.append(wait)

        def overdue() -> None:
            if wait in self._waits:
                self._waits.remove(wait)
                wait.result.errback(AcksMissing(generation, self.lagging(generation), timeout))

        wait.timer = self._reactor.callLater(timeout, overdue)
        return wait.result

    def fail_all(self, error: Exception) -> None:
        """End every wait with ``error`` (the controller stops)."""
        waits, self._waits = self._waits, []
        for wait in waits:
            if wait.timer is not None and wait.timer.active():
                wait.timer.cancel()
            wait.result.errback(error)

    def _check(self) -> None:
        for wait in list(self._waits):
            if not self.lagging(wait.generation):
                self._waits.remove(wait)
                if wait.timer is not None and wait.timer.active():
                    wait.timer.cancel()
                wait.result.callback(None)
