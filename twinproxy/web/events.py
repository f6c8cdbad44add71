"""The event log the dashboard page shows: failovers, ejections, migration steps, generations, the audit trail.

Owns :class:`EventLog`: the last :data:`KEEP` events, each with a sequence
number (``id``), a wall-clock time, a ``kind``, the ``subject`` it is about,
a line of ``text`` and the log's ``stream`` (random hex chosen when the log
is made: ids start again at 1 in a restarted process, so a page that sees
another stream knows its last id means nothing there); listeners are called with each new event (the
Server-Sent Events stream of ``resources.py`` is one).  Knows nothing of
HTTP.  The kinds are listed in docs/web-dashboard.md.
"""

from __future__ import annotations

import secrets
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional

from twisted.logger import Logger

KEEP = 500

Event = Dict[str, Any]


class EventLog:
    """A bounded, numbered log of events; ``clock()`` gives unix seconds (the reactor's ``seconds``)."""

    _log = Logger()

    def __init__(self, clock: Callable[[], float], keep: int = KEEP) -> None:
        self._clock = clock
        self.stream = secrets.token_hex(8)
        self._events: Deque[Event] = deque(maxlen=keep)
        self._next = 1
        self._listeners: List[Callable[[Event], None]] = []

    def add(self, kind: str, subject: str, text: str, **extra: Any) -> Event:
        """Record one event and tell every listener; returns it."""
        event: Event = {"id": self._next, "time": round(self._clock(), 3), "kind": kind,
                        "subject": subject, "text": text}
        event.update(extra)
        event["stream"] = self.stream
        self._next += 1
        self._events.append(event)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # noqa: BLE001 - one broken listener must not stop the others or the caller
                self._log.failure("event listener failed")
        return event

    def since(self, last_id: Optional[int]) -> List[Event]:
        """The events after ``last_id`` still kept (None or 0: all of them), oldest first.

        An id beyond the last one given was given by another log (a restarted
        process counts from 1 again): all of them too.
        """
        if not last_id or last_id > self.last_id:
            return list(self._events)
        return [event for event in self._events if event["id"] > last_id]

    @property
    def last_id(self) -> int:
        return self._next - 1

    def listen(self, listener: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``listener(event)`` for every new event; returns the function that stops it."""
        self._listeners.append(listener)

        def stop() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)
        return stop
