"""What goes into the dashboard's event log (docs/web-dashboard.md): changes seen, and every write asked for.

Owns :func:`topology_events` (the events between two topologies: a new
``generation``, a group's master changed — ``switch-master`` —, a
migration created / running / finished / cancelled / failed — ``migration``,
with its error), :class:`Audit`, which records each write request to the
API, accepted or refused (method, path, client, body capped at
:data:`MAX_AUDIT_BODY` bytes, status, error), and :func:`wire`, which
connects a controller's topology, health poll and migrations to one
:class:`~twinproxy.web.events.EventLog`.  Knows nothing of HTTP beyond the
request object it is handed.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Tuple

from twinproxy.web.events import EventLog

MAX_AUDIT_BODY = 2048
_MIGRATION_WORDS = {"pending": "created", "migrating": "running", "finished": "finished",
                    "cancelled": "cancelled", "failed": "failed"}


def topology_events(before: Any, after: Any) -> List[Tuple[str, str, str, Dict[str, Any]]]:
    """(kind, subject, text, extra) for what changed from ``before`` (None: nothing known) to ``after``."""
    if after is None or before is None or after.generation == before.generation:
        return []
    found: List[Tuple[str, str, str, Dict[str, Any]]] = []
    change = after.change if isinstance(getattr(after, "change", None), str) else None
    found.append(("generation", f"generation {after.generation}",
                  f"topology generation {after.generation}" + (f": {change}" if change else ""),
                  {"generation": after.generation}))
    old_masters = {group.id: group.master for group in before.groups}
    for group in after.groups:
        old = old_masters.get(group.id)
        if group.id in old_masters and old != group.master and old is not None and group.master is not None \
                and after.protocol == "redis":
            found.append(("switch-master", f"group {group.id}", f"group {group.id}: master {old} -> {group.master}",
                          {"group": group.id, "old": old, "new": group.master}))
    old_migrations = {m.id: m for m in before.migrations}
    for m in after.migrations:
        old = old_migrations.get(m.id)
        if old is not None and old.state == m.state and old.cancelling == m.cancelling:
            continue
        word = _MIGRATION_WORDS.get(m.state)
        if old is None:
            word = "created"
        elif m.cancelling and not old.cancelling:
            word = "cancelling"
        if word is None:
            continue
        text = f"migration {m.id} (slots {m.first}-{m.last} to group {m.to_group}) {word}"
        if m.state == "failed" and m.error:
            text += f": {m.error}"
        found.append(("migration", f"migration {m.id}", text, {"migration": m.id, "state": m.state,
                                                                 "error": m.error}))
    return found


def body_text(request: Any) -> Any:
    """The request's body for the audit log: its JSON (when it is JSON and small), else its text, capped."""
    content = getattr(request, "content", None)
    if content is None or getattr(content, "too_large", False):
        return None if content is None else "(larger than the API accepts)"
    try:
        content.seek(0)
        data = content.read(MAX_AUDIT_BODY + 1)
        content.seek(0)
    except (OSError, ValueError):
        return None
    if not data.strip():
        return None
    if len(data) <= MAX_AUDIT_BODY:
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            pass
    text = data[:MAX_AUDIT_BODY].decode("utf-8", "replace")
    return text + ("..." if len(data) > MAX_AUDIT_BODY else "")


class Audit:
    """Records write requests into ``log`` as ``audit`` events."""

    def __init__(self, log: EventLog) -> None:
        self.log = log

    def record(self, method: str, path: str, client: str, body: Any, status: int, error: Optional[str]) -> None:
        outcome = "done" if status < 400 else f"refused ({status}): {error}"
        self.log.add("audit", f"{method} {path}", f"{method} {path} from {client}: {outcome}", method=method,
                     path=path, client=client, body=body, status=status, error=error)


def wire(controller: Any, log: EventLog) -> None:
    """Send ``controller``'s changes to ``log``: topology generations, server down/up, migration pauses."""
    def topology_changed(before: Any, after: Any) -> None:
        for kind, subject, text, extra in topology_events(before, after):
            log.add(kind, subject, text, **extra)

    controller.topology_listeners.append(topology_changed)
    health = controller.health
    previous = health.on_change

    down: set = set()

    def health_changed(address: str, state: Any) -> None:
        if previous is not None:
            previous(address, state)
        if not state.up and address not in down:
            down.add(address)
            log.add("down", address, f"server {address} is down: {state.error}")
        elif state.up and address in down:
            down.discard(address)
            log.add("up", address, f"server {address} is up as {state.role or 'server'}")

    health.on_change = health_changed

    def paused(mid: int, is_paused: bool) -> None:
        log.add("migration", f"migration {mid}", f"migration {mid} {'paused' if is_paused else 'resumed'}",
                migration=mid, state="paused" if is_paused else "resumed")

    controller.migrator.pause_listeners.append(paused)
