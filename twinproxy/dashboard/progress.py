"""How far each slot migration has got: kept in memory, written to the coordinator about once a second.

Owns :class:`Progress` (one migration's counters: keys moved, an estimate
of the keys left, the rate over the last seconds, the ETA, the last error,
whether it is paused) and :class:`ProgressBook`, which keeps one per
migration and writes them all to ``/clusters/<cluster>/migration-progress``
as ``{"<id>": {"keys_moved", "keys_left", "rate", "eta", "error",
"paused", "updated"}}`` (the migration contract) when something changed —
outside the topology, so the generation does not move and no proxy has to
acknowledge anything.  A restarted dashboard reads it back (``load``): the
counts go on and a paused migration stays paused.  Runs in the reactor.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Collection, Deque, Dict, Optional, Tuple

from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from twinproxy.cluster.paths import progress_path
from twinproxy.coordinator import Conflict, CoordinatorError, NotFound

RATE_WINDOW = 5.0    # seconds the rate is measured over


@dataclass
class Progress:
    """One migration's counters (``error`` is the latest problem, None once things go well again)."""

    keys_moved: int = 0
    keys_left: Optional[int] = None
    rate: float = 0.0
    eta: Optional[float] = None
    error: Optional[str] = None
    paused: bool = False
    updated: float = 0.0
    samples: Deque[Tuple[float, int]] = field(default_factory=deque, repr=False, compare=False)
    _seen: Any = field(default=None, repr=False, compare=False)

    def tick(self, now: float) -> None:
        """Recompute the rate and the ETA from the moves of the last :data:`RATE_WINDOW` seconds.

        ``updated`` is the time of the tick that first saw the latest change.
        """
        self.samples.append((now, self.keys_moved))
        while len(self.samples) > 2 and now - self.samples[0][0] > RATE_WINDOW:
            self.samples.popleft()
        first_time, first_moved = self.samples[0]
        span = now - first_time
        self.rate = round((self.keys_moved - first_moved) / span, 1) if span > 0 and not self.paused else 0.0
        if self.keys_left == 0:
            self.eta = 0.0
        elif self.keys_left is not None and self.rate > 0:
            self.eta = round(self.keys_left / self.rate, 1)
        else:
            self.eta = None
        seen = (self.keys_moved, self.keys_left, self.rate, self.eta, self.error, self.paused)
        if seen != self._seen:
            self._seen = seen
            self.updated = now

    def to_dict(self) -> Dict[str, Any]:
        return {"keys_moved": self.keys_moved, "keys_left": self.keys_left, "rate": self.rate, "eta": self.eta,
                "error": self.error, "paused": self.paused, "updated": self.updated}

    @classmethod
    def from_dict(cls, item: Any) -> "Progress":
        """What a previous dashboard wrote (anything unreadable: a fresh Progress)."""
        progress = cls()
        if isinstance(item, dict):
            moved = item.get("keys_moved")
            if isinstance(moved, int) and not isinstance(moved, bool) and moved >= 0:
                progress.keys_moved = moved
            progress.paused = item.get("paused") is True
        return progress


class ProgressBook:
    """The progress of every migration, by id, and its copy in the coordinator."""

    _log = Logger()

    def __init__(self, coordinator: Any, cluster: str, reactor: Any, period: float = 1.0) -> None:
        self._coordinator = coordinator
        self._reactor = reactor
        self._period = period
        self.path = progress_path(cluster)
        self.entries: Dict[int, Progress] = {}
        self._written: Optional[Dict[str, Any]] = None
        self._writing: Optional[defer.Deferred] = None
        self._again = False
        self._loop: Optional[LoopingCall] = None
        self._problem: Optional[str] = None

    def get(self, mid: int) -> Progress:
        progress = self.entries.get(mid)
        if progress is None:
            progress = self.entries[mid] = Progress(updated=self._reactor.seconds())
        return progress

    @defer.inlineCallbacks
    def load(self) -> Any:
        """Read what the previous dashboard left (a missing or unreadable node: nothing)."""
        try:
            node = yield self._coordinator.get(self.path)
        except CoordinatorError as err:
            self._log.warn("cannot read the migration progress at {path}: {reason}", path=self.path, reason=str(err))
            return
        if node is None:
            return
        try:
            document = json.loads(node.value.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            document = {}
        for key, item in (document.items() if isinstance(document, dict) else ()):
            if key.isdigit():
                self.entries[int(key)] = Progress.from_dict(item)

    @property
    def running(self) -> bool:
        return self._loop is not None

    def start(self) -> None:
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._reactor
        self._loop.start(self._period, now=False)

    def stop(self) -> defer.Deferred:
        """Stop ticking; fires after a last write (its failure only logged)."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return self.write()

    def keep(self, ids: Collection[int]) -> None:
        """Forget the progress of migrations no longer listed."""
        for mid in [mid for mid in self.entries if mid not in ids]:
            del self.entries[mid]

    def _tick(self) -> None:
        now = self._reactor.seconds()
        for progress in self.entries.values():
            progress.tick(now)
        self.write()

    def document(self) -> Dict[str, Any]:
        return {str(mid): self.entries[mid].to_dict() for mid in sorted(self.entries)}

    def write(self) -> defer.Deferred:
        """Write the progress if it changed (one write at a time; a change meanwhile is written after)."""
        if self._writing is not None:
            self._again = True
            return self._writing
        document = self.document()
        if document == self._written:
            return defer.succeed(None)
        self._writing = self._store(document)
        return self._writing

    @defer.inlineCallbacks
    def _store(self, document: Dict[str, Any]) -> Any:
        value = json.dumps(document, separators=(",", ":")).encode()
        try:
            try:
                yield self._coordinator.set(self.path, value)
            except NotFound:
                try:
                    yield self._coordinator.create(self.path, value)
                except Conflict:
                    yield self._coordinator.set(self.path, value)
            self._written = document
            if self._problem is not None:
                self._log.info("the migration progress is written again to {path}", path=self.path)
            self._problem = None
        except CoordinatorError as err:
            if self._problem is None:
                self._log.warn("cannot write the migration progress to {path}: {reason}", path=self.path,
                               reason=str(err))
            self._problem = str(err)
        finally:
            self._writing = None
        if self._again:
            self._again = False
            yield self.write()
