"""INFO over a sharded pool: every live server's INFO merged into one, plus a ``# Proxy`` section.

Owns: :func:`info_text` (the text of an INFO reply, RESP2 bulk or RESP3
verbatim), :func:`merge_info` (the pure merge, field by field), the proxy
section and the INFO planner.

The merge keeps the first server's sections and fields in their order
(fields only others have come after), and for each field:

- ``redis_version``: the lowest (what every server can do: BullMQ and
  Sidekiq gate features on it); ``redis_mode:standalone``, ``role:master``
  and ``cluster_enabled:0``: what the pool is to its clients;
- ``loading``, ``async_loading``, ``loading_eta_seconds``, per-connection
  peaks (``client_recent_max_*``), the fork's peak and in-progress flags:
  the highest (ioredis waits while ``loading:1``); uptimes,
  ``rdb_last_save_time``: the lowest (since when all of them);
- identities and settings (``run_id``, ``tcp_port``, ``hz``,
  ``maxmemory_policy``, replication ids and offsets, ...): the first
  server's; ``*_status`` fields: the first that is not ``ok``;
- other integers are counters and are summed: ``maxmemory`` too (the
  pool's capacity), and ``used_memory_peak`` (the sum of the peaks bounds
  the pool's, and stays above the summed ``used_memory``); ``used_cpu_*``
  and ``instantaneous_*`` rates are summed, other decimals (ratios) the
  highest; ``*_human`` fields and the memory percentages are computed again
  from the merged numbers;
- ``k=v,...`` values (``db0``, ``cmdstat_*``, ``errorstat_*``,
  ``latency_percentiles_usec_*``): integers summed, percentiles the
  highest, ``usec_per_call`` and ``avg_ttl`` recomputed (``avg_ttl``
  weighted by each server's keys with an expiry);
- ``slaveN`` lines: every server's replicas, numbered again.

Servers that answer an error (down) are left out, and the proxy section
says how many answered; only when none did is the first error the reply.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

from twinproxy import __version__
from twinproxy.protocols import Router, resp
from twinproxy.protocols.redis_fanout import Routes, live_servers, send_to, server_name
from twinproxy.request import Request

Section = Tuple[str, List[Tuple[str, str]]]

FIXED = {"redis_mode": "standalone", "role": "master", "cluster_enabled": "0"}
LOWEST = frozenset(("uptime_in_seconds", "uptime_in_days", "rdb_last_save_time", "loading_start_time",
                    "loading_loaded_perc"))
HIGHEST = frozenset((
    "loading", "async_loading", "loading_eta_seconds", "client_recent_max_input_buffer",
    "client_recent_max_output_buffer", "current_cow_peak", "rdb_bgsave_in_progress", "rdb_last_bgsave_time_sec",
    "rdb_current_bgsave_time_sec", "aof_rewrite_in_progress", "aof_rewrite_scheduled", "aof_last_rewrite_time_sec",
    "aof_current_rewrite_time_sec", "aof_enabled", "module_fork_in_progress", "active_defrag_running",
    "current_eviction_exceeded_time", "latest_fork_usec", "current_fork_perc", "current_save_keys_processed",
    "current_save_keys_total", "current_cow_size", "current_cow_size_age",
))
FIRST = frozenset((
    "redis_git_sha1", "redis_git_dirty", "redis_build_id", "os", "arch_bits", "monotonic_clock", "multiplexing_api",
    "atomicvar_api", "gcc_version", "process_id", "process_supervised", "run_id", "tcp_port", "server_time_usec",
    "hz", "configured_hz", "lru_clock", "executable", "config_file", "io_threads_active", "maxclients",
    "total_system_memory", "mem_allocator", "maxmemory_policy", "master_replid", "master_replid2",
    "master_repl_offset", "second_repl_offset", "repl_backlog_active", "repl_backlog_size",
    "repl_backlog_first_byte_offset", "repl_backlog_histlen", "master_failover_state",
))
SUMMED_RATES = ("used_cpu_", "instantaneous_")
_INTEGER = re.compile(r"-?\d+\Z")
_DECIMAL = re.compile(r"-?\d+\.\d+\Z")
_REPLICA = re.compile(r"slave\d+\Z")
# INFO's sections that include the proxy's: none named, or one of these.
_PROXY_SECTIONS = frozenset((b"default", b"all", b"everything", b"proxy"))


def info_text(reply: bytes) -> Optional[bytes]:
    """The text of an INFO reply (``$`` bulk, or RESP3 ``=`` verbatim ``txt:``); None for anything else."""
    kind = reply[:1]
    if kind not in (b"$", b"="):
        return None
    eol = reply.find(b"\r\n")
    try:
        length = int(reply[1:eol])
    except ValueError:
        return None
    body = reply[eol + 2:eol + 2 + length]
    if len(body) != length or length < 0:
        return None
    if kind == b"=":
        return body[4:] if body[:4] == b"txt:" else None
    return body


def info_reply(text: bytes, dialect: int) -> bytes:
    """``text`` as INFO's reply: a bulk string in RESP2, a verbatim ``txt`` string in RESP3 (as Redis)."""
    if dialect == 3:
        return b"=%d\r\ntxt:%s\r\n" % (len(text) + 4, text)
    return resp.bulk(text)


def parse_info(text: str) -> List[Section]:
    """``[(section name, [(field, value)])]`` in the text's order ("" for fields before any header)."""
    sections: List[Section] = []
    current: Optional[Section] = None
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("#"):
            current = (line[1:].strip(), [])
            sections.append(current)
        elif ":" in line:
            if current is None:
                current = ("", [])
                sections.append(current)
            field, value = line.split(":", 1)
            current[1].append((field, value))
    return sections


def merge_info(texts: Sequence[str]) -> List[Section]:
    """The sections of every server's INFO text, merged field by field (see the module's docstring)."""
    order: Dict[str, Dict[str, List[str]]] = {}
    replicas: Dict[str, List[str]] = {}
    modules: Dict[str, Dict[str, None]] = {}
    for text in texts:
        for name, fields in parse_info(text):
            merged = order.setdefault(name, {})
            for field, value in fields:
                if _REPLICA.match(field):
                    replicas.setdefault(name, []).append(value)
                elif field == "module":   # one line per module, all named "module"
                    modules.setdefault(name, {})[value] = None
                else:
                    merged.setdefault(field, []).append(value)
    sections: List[Section] = []
    for name, fields in order.items():
        lines = [(field, merge_field(field, values)) for field, values in fields.items()]
        lines += [(f"slave{number}", value) for number, value in enumerate(replicas.get(name, ()))]
        lines += [("module", value) for value in modules.get(name, {})]
        sections.append((name, _derived(lines)))
    return sections


def _derived(lines: List[Tuple[str, str]]) -> List[Tuple[str, str]]:
    """The fields Redis computes from others, computed again from the merged ones."""
    numbers = {field: int(value) for field, value in lines if _INTEGER.match(value)}

    def percent(part: str, whole: str, less: str = "") -> Optional[str]:
        base = numbers.get(whole, 0) - numbers.get(less, 0)
        return f"{numbers[part] * 100 / base:.2f}%" if part in numbers and base > 0 else None

    derived = {"used_memory_peak_perc": percent("used_memory", "used_memory_peak"),
               "used_memory_dataset_perc": percent("used_memory_dataset", "used_memory", "used_memory_startup")}
    result = []
    for field, value in lines:
        if field.endswith("_human"):
            value = _human(numbers.get(field[:-6]), value)
        elif derived.get(field) is not None:
            value = derived[field]
        result.append((field, value))
    return result


def merge_field(field: str, values: List[str]) -> str:
    """One field's value over the servers that have it."""
    if field in FIXED:
        return FIXED[field]
    if field == "redis_version":
        return min(values, key=_version_order)
    if field in FIRST:
        return values[0]
    if field.endswith("_status"):
        return next((value for value in values if value != "ok"), values[0])
    if all(_INTEGER.match(value) for value in values):
        numbers = [int(value) for value in values]
        return str(_combine(field, numbers, sum))
    if all(_INTEGER.match(value) or _DECIMAL.match(value) for value in values):
        decimals = [float(value) for value in values]
        total = sum if field.startswith(SUMMED_RATES) else max
        return f"{_combine(field, decimals, total):.{_places(values)}f}"
    if all("=" in value for value in values):
        return _merge_pairs(values)
    return values[0]


def _combine(field: str, numbers: List, default):
    if field in HIGHEST:
        return max(numbers)
    if field in LOWEST:
        return min(numbers)
    return default(numbers)


def _places(values: List[str]) -> int:
    return max((len(value) - value.index(".") - 1 for value in values if "." in value), default=2)


def _merge_pairs(values: List[str]) -> str:
    """``k=v,...`` values (keyspace, command and error stats, latency percentiles) merged per key."""
    rows = [dict(item.split("=", 1) for item in value.split(",") if "=" in item) for value in values]
    keys: Dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row))
    merged: Dict[str, str] = {}
    for key in keys:
        present = [row[key] for row in rows if key in row]
        if all(_INTEGER.match(value) for value in present):
            merged[key] = str(sum(int(value) for value in present))
        elif all(_INTEGER.match(value) or _DECIMAL.match(value) for value in present):
            merged[key] = f"{max(float(value) for value in present):.{_places(present)}f}"   # percentiles
        else:
            merged[key] = present[0]
    if "avg_ttl" in merged and "expires" in merged:
        weighted = [(int(row["avg_ttl"]), int(row.get("expires", "0"))) for row in rows
                    if _INTEGER.match(row.get("avg_ttl", "")) and _INTEGER.match(row.get("expires", "0"))
                    and int(row["avg_ttl"]) > 0]
        weight = sum(expires for _, expires in weighted)
        merged["avg_ttl"] = str(sum(ttl * expires for ttl, expires in weighted) // weight if weight else 0)
    if "usec_per_call" in merged and _INTEGER.match(merged.get("calls", "")) and \
            _INTEGER.match(merged.get("usec", "")):
        calls = int(merged["calls"])
        merged["usec_per_call"] = f"{int(merged['usec']) / calls if calls else 0:.2f}"
    return ",".join(f"{key}={value}" for key, value in merged.items())


def _version_order(version: str) -> Tuple:
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        return (float("inf"), version)


def _human(count: Optional[int], value: str) -> str:
    """``count`` bytes as Redis's bytesToHuman writes them; ``value`` if there is no count."""
    if count is None:
        return value
    if count < 1024:
        return f"{count}B"
    for power, unit in enumerate("KMGTP", start=1):
        if count < 1024 ** (power + 1) or unit == "P":
            return f"{count / 1024 ** power:.2f}{unit}"
    return value   # pragma: no cover - the loop always returns


def render_info(sections: Sequence[Section]) -> str:
    """Sections as Redis writes INFO: ``# Name`` then ``field:value`` lines, a blank line between sections."""
    blocks = []
    for name, fields in sections:
        lines = [f"# {name}"] if name else []
        lines += [f"{field}:{value}" for field, value in fields]
        blocks.append("".join(line + "\r\n" for line in lines))
    return "\r\n".join(blocks)


def proxy_section(pool: str, servers: int, answers: Sequence[Tuple[str, Optional[str], Optional[str]]]) -> Section:
    """The ``# Proxy`` section: twinproxy, the pool, and each asked server's (name, redis_version, error)."""
    fields = [("proxy", "twinproxy"), ("twinproxy_version", __version__), ("pool", pool),
              ("servers", str(servers)), ("servers_asked", str(len(answers))),
              ("servers_answered", str(sum(1 for _, _, error in answers if error is None)))]
    for number, (name, version, error) in enumerate(answers):
        state = f"redis_version={version}" if error is None else "error=" + re.sub(r"[,=\r\n]", " ", error)
        fields.append((f"server{number}", f"name={name},{state}"))
    return ("Proxy", fields)


# -- the planner ---------------------------------------------------------------

def plan_info(request: Request, router: Router) -> Routes:
    sections = [arg.lower() for arg in request.args[1:]]
    with_proxy = not sections or any(section in _PROXY_SECTIONS for section in sections)
    context = (router.config.name, len(router.all_servers), with_proxy)
    return send_to(request, router, live_servers(request, router), _merge, context)


def _merge(request: Request) -> bytes:
    pool, servers, with_proxy = request.fragments[0].context
    texts: List[str] = []
    answers: List[Tuple[str, Optional[str], Optional[str]]] = []
    for part in request.fragments:
        text = info_text(part.reply)
        name = server_name(part.server)
        if text is None:
            answers.append((name, None, part.reply.strip().decode("latin-1")[1:] or "no reply"))
            continue
        decoded = text.decode("latin-1")
        texts.append(decoded)
        version = next((value for field, value in (line.split(":", 1) for line in decoded.splitlines()
                                                  if line.startswith("redis_version:"))), "")
        answers.append((name, version or "unknown", None))
    if not texts:
        return request.fragments[0].reply
    sections = merge_info(texts)
    if with_proxy:
        sections.append(proxy_section(pool, servers, answers))
    return info_reply(render_info(sections).encode("latin-1"), request.dialect)


PLANNERS = {"info": plan_info}
