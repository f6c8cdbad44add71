"""The admin CLI's migration verbs: their text, and ``migration wait``.

Owns the human output of ``slots migrate``, ``migration status`` and
``pause|resume|cancel`` (a memcache cluster's migration shows its warm-up
instead of keys moved; pure functions of the API's documents, fields read
defensively) and :func:`wait`, which polls ``GET /api/migrations`` once a
second, prints a progress line per migration whose line changed, and ends
with 0 when every migration it waited for ended ``finished``, 1 when any
ended ``cancelled`` or ``failed`` (each reason on stderr) or is gone, 3 when
the dashboard stayed unreachable for longer than the request timeout (a
dashboard restarting is waited for).  Blocking I/O: this is a short-lived
command, not the reactor.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from twinproxy.admin_cli.render import table

ENDED = ("finished", "cancelled", "failed")


def _number(value: Any, unit: str = "") -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "?"
    return f"{value:g}{unit}" if isinstance(value, float) else f"{value}{unit}"


def _eta(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "?"
    seconds = int(value)
    return f"{seconds // 60}m {seconds % 60}s" if seconds >= 60 else f"{seconds}s"


def describe(m: Dict[str, Any]) -> str:
    """``migration 3 (slots 0-511, group 1 -> 2)``."""
    back = ", moving back" if m.get("cancelling") and m.get("state") not in ENDED else ""
    return (f"migration {m.get('id')} (slots {m.get('first')}-{m.get('last')}, group {m.get('from_group')} -> "
            f"{_to(m)}{back})")


def _to(m: Dict[str, Any]) -> str:
    # An adoption's keys go to their slots' owners, not to one group.
    return "their slots' owners (adoption)" if m.get("adopt") else str(m.get("to_group"))


def _warming(m: Dict[str, Any]) -> str:
    """A memcache migration's progress: ``warming up, 12s of 60s left``."""
    left = m.get("warmup_left")
    if m.get("warmed"):
        return "warmed up, finishing"
    return f"warming up, {_eta(left)} of {_eta(m.get('warmup_seconds'))} left"


def line(m: Dict[str, Any]) -> str:
    """One migration's state and progress on one line."""
    state = m.get("state")
    parts = [f"{describe(m)}: {state}" + (" (paused)" if m.get("paused") and state not in ENDED else "")]
    if m.get("warmup_seconds") is not None:      # a memcache cluster's: warmed up, no keys moved
        if state == "migrating":
            parts.append(_warming(m))
    else:
        parts.append(f"{_number(m.get('keys_moved'))} keys moved")
    if m.get("warmup_seconds") is None and state not in ENDED:
        if m.get("keys_left") is not None:
            parts.append(f"~{_number(m.get('keys_left'))} left")
        parts.append(f"{_number(m.get('rate'))} keys/s")
        if m.get("eta") is not None:
            parts.append(f"ETA {_eta(m.get('eta'))}")
    if m.get("owner") is not None:
        parts.append(f"slots owned by group {m['owner']}")
    text = ", ".join(parts)
    if m.get("error"):
        text += f"; last error: {m['error']}"
    return text


def status_text(document: Dict[str, Any]) -> str:
    """``migration status``: every migration the topology lists, the latest last."""
    migrations = document.get("migrations") or []
    if not migrations:
        return "no migrations (twinproxy-admin slots migrate FIRST-LAST GID)\n"
    rows = []
    for m in migrations:
        progress = f"{_number(m.get('keys_moved'))} moved"
        if m.get("warmup_seconds") is not None:
            progress = _warming(m) if m.get("state") == "migrating" else f"warm-up {_eta(m['warmup_seconds'])}"
        elif m.get("state") not in ENDED:
            if m.get("keys_left") is not None:
                progress += f", ~{_number(m.get('keys_left'))} left"
            progress += f", {_number(m.get('rate'))} keys/s"
            if m.get("eta") is not None:
                progress += f", ETA {_eta(m.get('eta'))}"
        state = str(m.get("state")) + (" (paused)" if m.get("paused") and m.get("state") not in ENDED else "")
        if m.get("cancelling") and m.get("state") not in ENDED:
            state += " (moving back)"
        rows.append((f"#{m.get('id')}", f"slots {m.get('first')}-{m.get('last')}",
                     f"{m.get('from_group')} -> {_to(m)}", state, progress,
                     f"error: {m['error']}" if m.get("error") else ""))
    return "\n".join(table(rows, "")) + "\n"


def created_text(result: Dict[str, Any]) -> str:
    m = result.get("migration") or {}
    return (f"ok: {describe(m)} queued as {m.get('state')} (generation {result.get('generation')}); "
            f"follow it with: twinproxy-admin migration wait {m.get('id')}\n")


def action_text(action: str) -> Callable[[Dict[str, Any]], str]:
    """The text of ``migration pause|resume|cancel``'s answer."""
    def show(result: Dict[str, Any]) -> str:
        if action == "cancel" and "migration" in result:
            m = result["migration"]
            return (f"ok: {describe(m)} is {m.get('state')}: {result.get('note')} (the slots are group "
                    f"{result.get('owner')}'s; generation {result.get('generation')})\n")
        items = result.get("migrations") or result.get("cancelled") or []
        if not items:
            return f"ok: no migration to {action}\n"
        owners = result.get("owners") or {}
        lines = []
        for m in items:
            owner = owners.get(str(m.get("id")))
            lines.append(f"ok: {action} {describe(m)}: {m.get('state')}"
                         + (f", the slots are group {owner}'s" if owner is not None else ""))
        return "\n".join(lines) + "\n"
    return show


def wait(client: Any, mid: Optional[int], out: Any, err: Any, as_json: bool, interval: float = 1.0,
         unreachable: Any = Exception, patience: float = 60.0, clock: Callable[[], float] = time.monotonic) -> int:
    """``migration wait [ID]``: poll until the migrations end; the exit status (see the module docstring)."""
    pause = threading.Event()
    document = client.get("/api/migrations")
    listed = {m.get("id"): m for m in document.get("migrations") or []}
    if mid is not None:
        if mid not in listed:
            print(f"twinproxy-admin: there is no migration {mid}", file=err)
            return 1
        watched = [mid]
    else:
        watched = [m_id for m_id, m in listed.items() if m.get("state") not in ENDED]
        if not watched:
            if as_json:
                out.write("[]\n")
            else:
                out.write("no migration in progress\n")
            return 0
    shown: Dict[Any, str] = {}
    away_since: Optional[float] = None
    while True:
        entries = [listed.get(m_id) for m_id in watched]
        if not as_json:
            for m_id, m in zip(watched, entries):
                text = line(m) if m is not None else f"migration {m_id}: gone from the topology"
                if shown.get(m_id) != text:
                    shown[m_id] = text
                    out.write(text + "\n")
                    out.flush()
        if all(m is None or m.get("state") in ENDED for m in entries):
            break
        pause.wait(interval)
        try:
            document = client.get("/api/migrations")
            away_since = None
        except unreachable as problem:
            now = clock()
            away_since = away_since if away_since is not None else now
            if now - away_since > patience:
                print(f"twinproxy-admin: {problem}", file=err)
                return 3
            continue
        listed = {m.get("id"): m for m in document.get("migrations") or []}
    if as_json:
        out.write(json.dumps([m for m in entries if m is not None], indent=2) + "\n")
    failed: List[str] = []
    for m_id, m in zip(watched, entries):
        if m is None:
            failed.append(f"migration {m_id} is gone from the topology")
        elif m.get("state") != "finished":
            reason = f": {m['error']}" if m.get("error") else ""
            failed.append(f"{describe(m)} ended {m.get('state')}{reason}; the slots are group {m.get('owner')}'s")
    for reason in failed:
        print(f"twinproxy-admin: {reason}", file=err)
    return 1 if failed else 0
