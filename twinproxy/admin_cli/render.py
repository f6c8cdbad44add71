"""The admin CLI's human output: the status, slot runs, proxies, and what a write did.

Owns pure functions from the API's documents (contract §5) to text; they
read fields defensively (an older or newer dashboard may send more or
fewer), never do I/O and take ``now`` as a parameter so "3s ago" is
testable.  ``--json`` output bypasses all of this (the API's object as is).
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence


def ago(when: Any, now: float) -> str:
    """``3s ago``, ``4m 10s ago``, ``2h 5m ago``, ``3d 4h ago``; ``never`` without a time."""
    if isinstance(when, bool) or not isinstance(when, (int, float)):
        return "never"
    seconds = max(0, int(now - when))
    if seconds < 60:
        return f"{seconds}s ago"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60}s ago"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m ago"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h ago"


def table(rows: Sequence[Sequence[Any]], indent: str = "  ") -> List[str]:
    """Rows as left-aligned columns (the last column is not padded)."""
    texts = [[str(cell) for cell in row] for row in rows]
    if not texts:
        return []
    widths = [max(len(row[i]) for row in texts if i < len(row)) for i in range(max(len(r) for r in texts))]
    lines = []
    for row in texts:
        cells = [cell.ljust(widths[i]) if i < len(row) - 1 else cell for i, cell in enumerate(row)]
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


def slot_range(run: Dict[str, Any]) -> str:
    first, last = run.get("first"), run.get("last")
    return f"{first}-{last}" if first != last else f"{first}"


def owner(run: Dict[str, Any]) -> str:
    group = run.get("group")
    text = f"group {group}" if group is not None else "offline"
    state = run.get("state")
    return text if state in (None, "stable") else f"{text} ({state})"


def slot_lines(runs: Sequence[Dict[str, Any]], indent: str = "  ") -> List[str]:
    return table([(slot_range(run), owner(run)) for run in runs], indent)


def _count(run: Dict[str, Any]) -> int:
    try:
        return int(run["last"]) - int(run["first"]) + 1
    except (KeyError, TypeError, ValueError):
        return 0


def status_text(status: Dict[str, Any], now: Optional[float] = None) -> str:
    """``twinproxy-admin status``: the cluster, its groups and servers, slots, proxies, sentinels."""
    now = time.time() if now is None else now
    generation = status.get("generation")
    lines = [f"cluster {status.get('cluster')} ({status.get('protocol')}), generation {generation}"]
    dashboard = status.get("dashboard") or {}
    if dashboard:
        since = dashboard.get("start")
        started = f", started {ago(since, now)}" if isinstance(since, (int, float)) else ""
        lines.append(f"dashboard {dashboard.get('addr')} (pid {dashboard.get('pid')} on host "
                     f"{dashboard.get('host')}{started})")
    if status.get("writable") is False:
        lines.append(f"NOT WRITABLE: {status.get('problem') or 'the dashboard does not hold its lock'}")
    if status.get("busy"):
        lines.append(f"in progress: {status['busy']}")
    change = status.get("change")
    if change:
        lines.append("change in progress: " + ", ".join(f"{key} {value}" for key, value in change.items()))

    per_group = status.get("slots_per_group") or {}
    groups = status.get("groups") or []
    lines += ["", f"groups ({len(groups)}):"]
    if not groups:
        lines.append("  (none: twinproxy-admin group add GID)")
    for group in groups:
        gid = group.get("id")
        count = per_group.get(str(gid), group.get("slots", 0))
        servers = group.get("servers") or []
        lines.append(f"  group {gid}: {count} slots, {len(servers)} servers")
        rows = []
        for server in servers:
            health = "up" if server.get("up") else "down"
            notes = []
            actual = server.get("actual_role")
            if actual and actual != server.get("role") and server.get("up"):
                notes.append(f"is a {actual} now")
            if server.get("role") == "replica" and server.get("link_up") is False:
                notes.append("replication link down")
            if server.get("error") and not server.get("up"):
                notes.append(str(server["error"]))
            rows.append((server.get("role"), health, server.get("addr"), "; ".join(notes)))
        lines += table(rows, "    ") if rows else ["    (no servers: twinproxy-admin server add GID ADDR)"]

    runs = status.get("slots") or []
    offline = status.get("offline_slots")
    if offline is None:
        offline = sum(_count(run) for run in runs if run.get("group") is None)
    lines += ["", f"slots ({offline} offline):"]
    lines += slot_lines(runs)

    proxies = status.get("proxies") or []
    lagging = set(status.get("lagging") or [])
    lines += ["", f"proxies ({len(proxies)}):"]
    lines += proxy_lines(proxies, generation, now, lagging) or ["  (none registered)"]

    sentinels = status.get("sentinels") or []
    if sentinels:
        up = {item.get("addr"): item.get("up") for item in status.get("sentinel_status") or []}
        shown = [f"{addr} ({'up' if up.get(addr) else 'down'})" if addr in up else addr for addr in sentinels]
        lines += ["", "sentinels: " + ", ".join(shown)]
    return "\n".join(lines) + "\n"


def proxy_lines(proxies: Sequence[Dict[str, Any]], generation: Any, now: float, lagging: Any = ()) -> List[str]:
    rows = []
    for proxy in proxies:
        applied = proxy.get("generation")
        behind = (proxy.get("id") in lagging or
                  (isinstance(generation, int) and isinstance(applied, int) and applied < generation))
        note = "  BEHIND" if behind else ""
        if proxy.get("problem"):
            note += f"  ({proxy['problem']})"
        rows.append((proxy.get("id"), proxy.get("addr") or "-", f"generation {applied}",
                     f"last seen {ago(proxy.get('last_seen'), now)}{note}"))
    return table(rows)


def proxies_text(document: Dict[str, Any], now: Optional[float] = None) -> str:
    proxies = document.get("proxies") or []
    lines = [f"proxies ({len(proxies)}):"]
    lines += table([(p.get("id"), p.get("addr") or "-", f"admin {p.get('admin') or '-'}",
                     f"generation {p.get('generation')}", f"pid {p.get('pid')} on {p.get('host')}",
                     f"last seen {ago(p.get('last_seen'), time.time() if now is None else now)}")
                    for p in proxies]) or ["  (none registered)"]
    return "\n".join(lines) + "\n"


def slots_text(document: Dict[str, Any]) -> str:
    return "\n".join(slot_lines(document.get("slots") or [], "")) + "\n"


def plan_text(result: Dict[str, Any]) -> str:
    """``slots rebalance``: the plan, the offline slots placed, the moves and the migrations queued for them."""
    applied = result.get("applied")
    queued = result.get("migrations") or []
    lines = [("applied" if applied else "not applied") + f", generation {result.get('generation')}"]
    for key, title in (("plan", "plan (the even spread)"), ("placements", "offline slots placed" if applied
                                                                        else "offline slots to place")):
        runs = result.get(key)
        if runs is None:
            continue
        lines.append(f"{title}:")
        lines += slot_lines(runs) or ["  (none)"]
    moves = result.get("moves")
    if moves is not None:
        lines.append("owned slots moving, a migration each:" if queued else "owned slots that would move:")
        lines += table([(slot_range(run), f"group {run['from_group']} -> group {run.get('group')}"
                         if run.get("from_group") is not None else owner(run)) for run in moves]) or ["  (none)"]
    if queued:
        lines.append(f"migrations queued ({len(queued)}):")
        lines += table([(f"#{m.get('id')}", f"slots {m.get('first')}-{m.get('last')}",
                         f"group {m.get('from_group')} -> {m.get('to_group')}", m.get("state")) for m in queued])
        lines.append("follow them with: twinproxy-admin migration wait")
    for note in list(result.get("notes") or []) + ([result["note"]] if result.get("note") else []):
        lines.append(f"note: {note}")
    return "\n".join(lines) + "\n"


def done_text(what: str, result: Dict[str, Any]) -> str:
    """A write's success: ``ok: <what> (generation N)``, then its notes."""
    lines = [f"ok: {what} (generation {result.get('generation')})"]
    for note in result.get("notes") or []:
        lines.append(f"note: {note}")
    if result.get("note"):
        lines.append(f"note: {result['note']}")
    if result.get("slots"):
        lines += slot_lines(result["slots"])
    return "\n".join(lines) + "\n"


def problems(result: Dict[str, Any]) -> List[str]:
    """What a successful write could not do besides (sentinels not updated, ...): warnings for stderr."""
    return [str(problem) for problem in result.get("problems") or []]


def error_lines(error: Any) -> List[str]:
    """The stderr lines of a refused operation (``Refused``): the reason, then the laggards if any."""
    body = getattr(error, "body", {}) or {}
    lines = [str(body.get("error") or error)]
    lagging = body.get("lagging")
    if lagging:
        lines.append("lagging proxies: " + ", ".join(str(item) for item in lagging))
    queued = [m for m in body.get("migrations") or [] if isinstance(m, dict)]
    if queued:      # a rebalance stopped midway: what it queued stays queued
        lines.append("migrations queued: " + ", ".join(f"#{m.get('id')}" for m in queued)
                     + " (follow them with: twinproxy-admin migration wait)")
    return lines
