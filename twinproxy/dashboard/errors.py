"""The dashboard controller's errors: what start() and the operations fail with.

- :class:`ControllerError` — start() cannot go on (bad stored topology, a
  protocol mismatch, the coordinator unavailable).
- :class:`LockHeld` — another live dashboard holds the cluster's lock.
- :class:`OperationError` — an operation failed; ``status`` is the HTTP
  status the API answers with, ``message`` the one-line reason, ``extra``
  more fields for the error body (``lagging`` for a 504, ...).
"""

from __future__ import annotations

import time
from typing import Any, Dict, Optional


class ControllerError(Exception):
    """The controller cannot start or go on; the message says why."""


class LockHeld(ControllerError):
    """The cluster's dashboard lock is held by another live dashboard (``holder`` is its lock document)."""

    def __init__(self, cluster: str, holder: Dict[str, Any], session_timeout: float) -> None:
        self.cluster = cluster
        self.holder = holder
        since = holder.get("start")
        when = (time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since))
                if isinstance(since, (int, float)) else "")
        super().__init__(
            f"another dashboard holds the lock of cluster '{cluster}': addr {holder.get('addr') or '-'}, "
            f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}{when}; the lock expires within "
            f"the coordinator's session timeout ({session_timeout:g}s) after that dashboard dies "
            "(start with wait to take over then)")


class OperationError(Exception):
    """A refused or failed operation: HTTP ``status``, one-line ``message``, ``extra`` body fields."""

    def __init__(self, status: int, message: str, extra: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra: Dict[str, Any] = dict(extra or {})

    def body(self) -> Dict[str, Any]:
        """The API's error body: ``{"error": message, **extra}``."""
        return {"error": self.message, **self.extra}

    def __repr__(self) -> str:
        return f"OperationError({self.status}, {self.message!r}, {self.extra!r})"
