"""The migration benchmark's output: per-trial blocks, the summary table, and where the time goes.

Pure functions of the results bench/migration.py gathers (plus reading a
cProfile stats file), so the numbers and the words come from the same
dictionaries that go to the JSON file.
"""

from __future__ import annotations

import pstats
from pathlib import Path
from typing import Any, Dict, List, Optional

# Issue 14, measured on this machine with Codis 3.2 and its forked server: 1M keys of 100 B, slots 0-511 moved.
CODIS = [("Codis 3.2 semi-async", "~41,000", "~46%"), ("Codis 3.2 sync", "~6,500", "-")]
TARGET = "target: >= 60,000 keys/s while clients keep >= 60% of their throughput"
COMMANDS = ("migrate", "scan", "restore", "get", "set", "dbsize")


def _commandstats(info: Dict[str, str]) -> Dict[str, Dict[str, float]]:
    found = {}
    for name in COMMANDS:
        line = info.get(f"cmdstat_{name}")
        if line:
            fields = dict(part.split("=") for part in line.split(","))
            found[name] = {"calls": int(fields["calls"]), "usec": int(fields["usec"]),
                           "usec_per_call": float(fields["usec_per_call"])}
    return found


def _cpu(info: Dict[str, str]) -> float:
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def redis_usage(before: Dict[int, Dict[str, str]], after: Dict[int, Dict[str, str]], seconds: float) -> Dict[str, Any]:
    """Per group's redis over the migration: CPU (% of a core, from INFO cpu) and the command statistics
    (reset when the migration began)."""
    return {str(gid): {"cpu_percent": round(100 * (_cpu(after[gid]) - _cpu(before[gid])) / max(seconds, 1e-9), 1),
                       "commands": _commandstats(after[gid])} for gid in before}


def profile_top(path: Path, lines: int) -> Dict[str, Any]:
    """The dashboard's profile: seconds in all, waiting in epoll, decoding replies; the top functions by own time."""
    stats = pstats.Stats(str(path))
    rows = []
    idle = decoding = 0.0
    for (filename, line, name), (_, calls, own, cumulative, _) in stats.stats.items():
        rows.append({"function": f"{Path(filename).name}:{line}({name})", "calls": calls, "own_s": round(own, 3),
                     "cumulative_s": round(cumulative, 3)})
        if "epoll" in name and "poll" in name:
            idle += own
        if filename.endswith("replies.py"):
            decoding += own
    rows.sort(key=lambda row: -row["own_s"])
    return {"total_s": round(stats.total_tt, 3), "idle_s": round(idle, 3), "decode_s": round(decoding, 3),
            "top": rows[:lines]}


def _latency(phase: Dict[str, float]) -> str:
    return f"{phase['p50_ms']:.2f}/{phase['p99_ms']:.2f}"


def print_trial(result: Dict[str, Any]) -> None:
    print(f"   moved {result['moved']:,} keys in {result['seconds']:.2f} s: {result['keys_per_second']:,} keys/s, "
          f"{result['mib_per_second']:.1f} MiB/s; placed right: {result['checks']['placed_right']} "
          f"(dbsize {result['checks']['dbsize']})")
    for m in result["timeline"]:
        states = ", ".join(f"{state} {at:.2f}" for state, at in m["states"].items())
        print(f"   migration {m['id']} slots {m['first']}-{m['last']} group {m['from_group']} -> {m['to_group']}: "
              f"{states} s; the sweep moved {m['keys_moved']:,}")
    load = result.get("load")
    if load:
        print(f"   clients: before {load['before']['ops']:,.0f} ops/s p50/p99 {_latency(load['before'])} ms, during "
              f"{load['during']['ops']:,.0f} ops/s {_latency(load['during'])} ms (ratio {load['ratio']:.2f}), "
              f"after {load['after']['ops']:,.0f} ops/s {_latency(load['after'])} ms; errors {load['errors']}"
              + (f" {load['error_samples']}" if load["error_samples"] else "") + f", GETs that found nothing "
              f"{load['nil_gets']}")
    for phase in ("before", "during"):
        cpu = result["cpu"][phase]
        print(f"   CPU {phase}, % of one core: " + ", ".join(f"{who} {value:g}" for who, value in cpu.items()
                                                            if who != "machine")
              + f"; machine {cpu['machine']:g}% busy")
    for gid, usage in result["redis"].items():
        commands = ", ".join(f"{name} {c['calls']:,} x {c['usec_per_call']:g} us"
                             for name, c in usage["commands"].items())
        print(f"   redis of group {gid}: {usage['cpu_percent']:g}% CPU; {commands}")
    profile = result.get("profile")
    if profile:
        print(f"   dashboard profile ({profile['total_s']:.2f} s of profiled CPU), most time of their own:")
        for row in profile["top"]:
            print(f"     {row['own_s']:7.3f} s own {row['cumulative_s']:7.3f} s cum {row['calls']:>9,}  "
                  f"{row['function']}")


def _row(cells: List[str], widths: List[int]) -> str:
    return "  ".join(cell.rjust(width) if index else cell.ljust(width)
                     for index, (cell, width) in enumerate(zip(cells, widths)))


def print_summary(summary: Dict[str, Any]) -> None:
    load = summary["load"]
    print(f"\nmigration: {summary['keys']:,} keys of {summary['value_size']} B, 2 -> 3 groups (Codis's rebalance "
          f"plan), {summary['cpus']} CPUs; client load: {load['clients']} connections x {load['pipeline']} "
          f"pipelined, {load['get_ratio']:.0%} GET / SET on random keys, through one twinproxy (latency: of a "
          "pipelined batch)")
    header = ["trial", "moved", "time s", "keys/s", "MiB/s", "ops/s before", "ops/s during", "during/before",
              "p50/p99 before ms", "p50/p99 during ms", "load CPU %", "dash CPU %", "errors"]
    rows = []
    for r in summary["trials"]:
        client = r.get("load")
        if client:
            extra = [f"{client['before']['ops']:,.0f}", f"{client['during']['ops']:,.0f}", f"{client['ratio']:.0%}",
                     _latency(client["before"]), _latency(client["during"]), f"{r['cpu']['during'].get('load', 0):g}",
                     f"{r['cpu']['during'].get('dashboard', 0):g}", str(client["errors"] + client["nil_gets"])]
        else:
            extra = ["-"] * 5 + ["-", f"{r['cpu']['during'].get('dashboard', 0):g}", "-"]
        rows.append([r["trial"], f"{r['moved']:,}", f"{r['seconds']:.2f}", f"{r['keys_per_second']:,}",
                     f"{r['mib_per_second']:.1f}", *extra])
    for name, rate, clients in CODIS:
        rows.append([name, "500,000", "", rate, "", "", "", clients, "", "", "", "", ""])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    print(_row(header, widths))
    print("-" * (sum(widths) + 2 * (len(widths) - 1)))
    for row in rows:
        print(_row(row, widths))
    print("trials: p<N> --parallel N, b<N> the mover's BATCH, s<N> its SCAN_COUNT (defaults p1, b100, s1000); "
          "Codis: 500,000 keys (slots 0-511 to a second group), its clients under a saturating load")
    print(TARGET)
    print()
    print(where_the_time_goes(summary["trials"]))


def _first(trials: List[Dict[str, Any]], predicate: Any) -> Optional[Dict[str, Any]]:
    return next((t for t in trials if predicate(t)), None)


def _command(trial: Dict[str, Any], name: str) -> Dict[str, float]:
    """A command's calls and seconds summed over the three redis-servers during the move."""
    calls = seconds = 0.0
    for usage in trial["redis"].values():
        found = usage["commands"].get(name)
        if found:
            calls += found["calls"]
            seconds += found["usec"] / 1e6
    return {"calls": calls, "seconds": seconds}


def where_the_time_goes(trials: List[Dict[str, Any]]) -> str:
    """A paragraph from the trials' numbers: the first one under load, the one without, the profiled one."""
    main = _first(trials, lambda t: t.get("load") and not t.get("profile")) or trials[0]
    quiet = _first(trials, lambda t: not t.get("load") and not t.get("profile"))
    parts = [f"Where the time goes (trial {main['trial']}, under load): {main['seconds']:.1f} s for "
             f"{main['moved']:,} keys."]
    sweeps, spans = [], []
    for m in main["timeline"]:
        moving, done = m["states"].get("migrating"), m["states"].get("finished")
        if moving is not None and done is not None:
            sweeps.append(f"{moving:.2f}-{done:.2f} s for group {m['from_group']} -> {m['to_group']}")
            spans.append((moving, done))
    side_by_side = len(spans) > 1 and max(start for start, _ in spans) < min(end for _, end in spans)
    if sweeps:
        how = ("side by side: they share only their target" if side_by_side else
               "one after the other")
        parts.append("The migrations moved keys at " + " and ".join(sweeps) + f" ({how}; the hold and the "
                     "acknowledgements before each take about 0.1 s).")
    scan, migrate = _command(main, "scan"), _command(main, "migrate")
    text = (f"The sources were inside SCAN for {scan['seconds']:.2f} s ({scan['calls']:,.0f} calls) and inside "
            f"MIGRATE for {migrate['seconds']:.2f} s ({migrate['calls']:,.0f} calls)")
    if quiet is not None:
        swept = _command(quiet, "migrate")
        touch_calls = max(0.0, migrate["calls"] - swept["calls"])
        touch_seconds = max(0.0, migrate["seconds"] - swept["seconds"])
        text += (f": about {swept['calls']:,.0f} are the sweep's batches ({swept['seconds']:.2f} s without load, "
                 f"{1e6 * swept['seconds'] / max(quiet['moved'], 1):.1f} us per key) and "
                 f"{touch_calls:,.0f} the proxy's MIGRATEs of the keys requests touched "
                 f"({max(0, main['moved'] - sum(m['keys_moved'] for m in main['timeline'])):,} keys moved so, "
                 f"{touch_seconds:.2f} s, {1e6 * touch_seconds / max(touch_calls, 1):.0f} us a call: one key, one "
                 "round trip to the target while the source waits)")
    share = 100 * (scan["seconds"] + migrate["seconds"]) / max(main["seconds"], 1e-9)
    sources = len(spans) if side_by_side else 1
    parts.append(text + f"; each source spent about {share / sources:.0f}% of its migration inside these "
                 "commands, and every client request to it waits behind them (a pipelined batch of random keys "
                 "nearly always has one for it).")
    cpu = main["cpu"]["during"]
    redis = sum(v for who, v in cpu.items() if who.startswith("redis"))
    parts.append(f"CPU during the move, % of one core: dashboard {cpu.get('dashboard', 0):g}, proxy "
                 f"{cpu.get('proxy', 0):g} (before: {main['cpu']['before'].get('proxy', 0):g}), load generator "
                 f"{cpu.get('load', 0):g}, redis-servers {redis:g}; machine {cpu['machine']:g}% busy.")
    avoid = _first(trials, lambda t: t.get("load") and "avoid" in t["trial"].split("-"))
    if avoid is not None and main.get("load"):
        parts.append(f"With a load that touches no moving slot (trial {avoid['trial']}) clients kept "
                     f"{avoid['load']['ratio']:.0%} instead of {main['load']['ratio']:.0%}: the sweep (its blocking, "
                     "its CPU) costs the difference to 100%, the moves on touch the rest.")
    if quiet is not None:
        q = quiet["cpu"]["during"]
        quiet_spans = [(m["states"].get("migrating"), m["states"].get("finished")) for m in quiet["timeline"]]
        quiet_spans = [(a, b) for a, b in quiet_spans if a is not None and b is not None]
        together = len(quiet_spans) > 1 and max(a for a, _ in quiet_spans) < min(b for _, b in quiet_spans)
        busy = (_command(quiet, "scan")["seconds"] + _command(quiet, "migrate")["seconds"]) / max(quiet["seconds"],
                                                                                               1e-9)
        busy /= len(quiet_spans) if together else 1
        parts.append(f"Without load (trial {quiet['trial']}) the move took {quiet['seconds']:.1f} s "
                     f"({quiet['keys_per_second']:,} keys/s): a source was inside SCAN or MIGRATE "
                     f"{100 * busy:.0f}% of its migration, the dashboard used "
                     f"{q.get('dashboard', 0):g}% of a core; the sweep is a chain (SCAN, decode the reply, "
                     "MIGRATE the matches, then the next SCAN), so these add up instead of overlapping, and "
                     "three full SCAN passes run (the moving one, a clean one, the verification).")
    profiled = _first(trials, lambda t: t.get("profile"))
    if profiled is not None:
        prof = profiled["profile"]
        busy_s = max(prof["total_s"] - prof["idle_s"], 1e-9)
        decoding = 100 * prof["decode_s"] / busy_s
        top = ", ".join(f"{row['function']} {row['own_s']:.2f} s" for row in prof["top"][:5])
        parts.append(f"The dashboard's profile (trial {profiled['trial']}; {busy_s:.1f} s of CPU under cProfile, "
                     f"{prof['idle_s']:.1f} s more waiting in epoll): decoding replies in Python "
                     f"(twinproxy/sentinel/replies.py, mostly SCAN's 1000-key arrays) is {decoding:.0f}% of its CPU; "
                     f"top: {top}.")
    return _wrap(" ".join(parts))


def _wrap(text: str, width: int = 110) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return "\n".join(lines)
