"""Logging as nutcracker's operators know it: ``-v N`` levels, ``-o FILE``, signals.

Owns: the map from nutcracker's verbosity (0-11) to ``twisted.logger``
levels, :class:`LogControl` (a level filter that can be raised and lowered,
over a file that can be reopened), and :class:`LogService`, which adds the
observer while running and wires SIGTTIN (more verbose) and SIGTTOU (less
verbose), as nutcracker does.  SIGHUP (reopen, for logrotate, and reload)
is wired by ``reload.HangupService``.
"""

from __future__ import annotations

import signal
import sys
from typing import IO, Any, List, Optional

from twisted.application.service import Service
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
    textFileLogObserver,
)

DEFAULT_VERBOSITY = 5  # nutcracker's LOG_NOTICE
MAX_VERBOSITY = 11


TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%f%z"


def level_for(verbosity: int) -> LogLevel:
    """nutcracker's 0 (emerg) ... 11 (pverb) as a twisted.logger level."""
    if verbosity <= 2:
        return LogLevel.critical
    if verbosity == 3:
        return LogLevel.error
    if verbosity == 4:
        return LogLevel.warn
    if verbosity <= 6:
        return LogLevel.info
    return LogLevel.debug


class _Reopenable:
    """A file-like that ``textFileLogObserver`` writes to; ``reopen`` swaps the file under it."""

    def __init__(self, path: Optional[str], stream: IO[str]) -> None:
        self.path = path
        self._stream = stream
        self._file: Optional[IO[str]] = None
        self.reopen()

    def reopen(self) -> None:
        if self.path is None:
            return
        old, self._file = self._file, open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - owned here
        if old is not None:
            old.close()

    def write(self, text: str) -> None:
        (self._file or self._stream).write(text)

    def flush(self) -> None:
        (self._file or self._stream).flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class LogControl:
    """A level-filtered observer over a log file (or stderr)."""

    def __init__(self, path: Optional[str] = None, verbosity: int = DEFAULT_VERBOSITY,
                 stream: Optional[IO[str]] = None) -> None:
        self.verbosity = max(0, min(MAX_VERBOSITY, verbosity))
        self.output = _Reopenable(path, stream or sys.stderr)
        self.predicate = LogLevelFilterPredicate(defaultLogLevel=level_for(self.verbosity))
        # Microseconds: a failover's steps are milliseconds apart.
        self.observer: ILogObserver = FilteringLogObserver(
            textFileLogObserver(self.output, timeFormat=TIME_FORMAT), [self.predicate])

    def set_verbosity(self, verbosity: int) -> None:
        self.verbosity = max(0, min(MAX_VERBOSITY, verbosity))
        self.predicate.setLogLevelForNamespace("", level_for(self.verbosity))

    def more(self) -> None:
        self.set_verbosity(self.verbosity + 1)

    def less(self) -> None:
        self.set_verbosity(self.verbosity - 1)

    def reopen(self) -> None:
        self.output.reopen()

    def close(self) -> None:
        self.output.close()


class LogService(Service):
    """Adds ``control``'s observer to the global log while running, with nutcracker's signals."""

    def __init__(self, control: LogControl, reactor: Any, observe: bool = True) -> None:
        self.setName("log")
        self.control = control
        self._reactor = reactor
        self._observe = observe
        self._previous: List[Any] = []

    def startService(self) -> None:
        super().startService()
        if self._observe:
            globalLogPublisher.addObserver(self.control.observer)
        # SIGHUP (reopen, and reload) is reload.HangupService's.
        for number, action in ((signal.SIGTTIN, self.control.more), (signal.SIGTTOU, self.control.less)):
            try:
                previous = signal.signal(number, self._handler(action))
            except ValueError:  # not the main thread (tests run the reactor in a thread)
                continue
            self._previous.append((number, previous))

    def _handler(self, action: Any) -> Any:
        def handle(signum: int, frame: Any) -> None:
            self._reactor.callFromThread(action)

        return handle

    def stopService(self) -> None:
        super().stopService()
        for number, previous in self._previous:
            signal.signal(number, previous)
        self._previous = []
        if self._observe:
            globalLogPublisher.removeObserver(self.control.observer)
        self.control.close()
