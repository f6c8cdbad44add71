#!/usr/bin/env python3
"""Generate twinproxy/protocols/redis_commands.py from a real Redis 7's COMMAND INFO.

By default this starts its own redis-server on a free 127.0.0.1 port in a
temporary directory (no persistence), asks it ``COMMAND INFO`` (every
command with its arity, flags, key specs and subcommands) and ``INFO
server`` (its version), writes the table, and always stops the server
again.  With ``--port N`` it
asks a redis-server that is already running there instead.

    scripts/gen-redis-commands.py                 # regenerate the table
    scripts/gen-redis-commands.py --check         # exit 1 if it would change
    scripts/gen-redis-commands.py --port 6379 --output /tmp/redis_commands.py

Standard library only: the RESP client below is just enough for these two
requests, and every socket operation has a timeout.
"""

import argparse
import ast
import difflib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO / "twinproxy" / "protocols" / "redis_commands.py"
HOST = "127.0.0.1"
START_ATTEMPTS = 3
LINE_LENGTH = 120
INDENT = "    "


class RedisError(Exception):
    """An error reply, or a connection that broke mid-reply."""


# --- a minimal RESP2 client ------------------------------------------------


class Connection:
    """One blocking connection; every connect, send and receive times out after ``timeout`` seconds."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, *args: str) -> Any:
        out = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = arg.encode()
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self.sock.sendall(b"".join(out))
        reply = self._read()
        if isinstance(reply, RedisError):
            raise reply
        return reply

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise RedisError("connection closed by the server")
        self.buf += chunk

    def _line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line, self.buf = self.buf[:end], self.buf[end + 2:]
                return line
            self._fill()

    def _exactly(self, size: int) -> bytes:
        while len(self.buf) < size + 2:
            self._fill()
        data, self.buf = self.buf[:size], self.buf[size + 2:]
        return data

    def _read(self) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            return RedisError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else self._exactly(size).decode()
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [self._read() for _ in range(count)]
        raise RedisError(f"unexpected RESP line {line[:40]!r}")


# --- the server we start ---------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_ready(proc: subprocess.Popen, port: int, timeout: float, op_timeout: float) -> bool:
    """Wait until the server answers PING; False if it exits first (say, the port was taken)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with Connection(HOST, port, op_timeout) as conn:
                if conn.call("PING") == "PONG":
                    return True
        except (OSError, RedisError):
            pass
        try:
            proc.wait(timeout=0.05)  # the pause between attempts, and notice of an early exit
            return False
        except subprocess.TimeoutExpired:
            pass
    raise RuntimeError(f"redis-server on port {port} did not answer within {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def fetch_from_new_server(binary: str, timeout: float) -> Tuple[str, List[Any]]:
    path = shutil.which(binary)
    if path is None:
        raise RuntimeError(f"{binary!r} not found on PATH")
    with tempfile.TemporaryDirectory(prefix="gen-redis-commands-") as tmp:
        log = Path(tmp) / "redis.log"
        for _attempt in range(START_ATTEMPTS):
            port = free_port()
            argv = [path, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
                    "--daemonize", "no", "--dir", tmp, "--logfile", str(log)]
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                if wait_ready(proc, port, 20.0, timeout):
                    return fetch(HOST, port, timeout)
            finally:
                stop(proc)
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
        raise RuntimeError(f"redis-server failed to start {START_ATTEMPTS} times; last log:\n{tail}")


def fetch(host: str, port: int, timeout: float) -> Tuple[str, List[Any]]:
    with Connection(host, port, timeout) as conn:
        info = conn.call("INFO", "server")
        commands = conn.call("COMMAND", "INFO")
    version = ""
    for line in info.splitlines():
        if line.startswith("redis_version:"):
            version = line.split(":", 1)[1].strip()
    if not version:
        raise RuntimeError("INFO server did not report redis_version")
    if not isinstance(commands, list) or not commands:
        raise RuntimeError("COMMAND INFO returned no commands (this script needs Redis 7 or later)")
    return version, commands


# --- the table -------------------------------------------------------------

# One command: (arity, flags, key specs); one key spec: (flags, begin_search, find_keys) with
#   begin_search ("index", pos) | ("keyword", keyword, startfrom) | ("unknown",)
#   find_keys    ("range", lastkey, keystep, limit) | ("keynum", keynumidx, firstkey, keystep) | ("unknown",)
Command = Tuple[int, Tuple[str, ...], Tuple[Tuple[Any, ...], ...]]


def _fields(pairs: Sequence[Any]) -> Dict[str, Any]:
    """A RESP2 flat ``[name, value, name, value, ...]`` list as a dict."""
    return {str(pairs[i]): pairs[i + 1] for i in range(0, len(pairs) - 1, 2)}


def key_spec(raw: Sequence[Any]) -> Tuple[Any, ...]:
    """One COMMAND INFO key spec as the table writes it (its free-text ``notes`` left out)."""
    spec = _fields(raw)
    flags = tuple(sorted(str(flag) for flag in spec.get("flags") or ()))
    begin = _fields(spec["begin_search"])
    begin_args = _fields(begin.get("spec") or [])
    if begin["type"] == "index":
        begin_search: Tuple[Any, ...] = ("index", int(begin_args["index"]))
    elif begin["type"] == "keyword":
        begin_search = ("keyword", str(begin_args["keyword"]), int(begin_args["startfrom"]))
    else:
        begin_search = (str(begin["type"]),)
    find = _fields(spec["find_keys"])
    find_args = _fields(find.get("spec") or [])
    if find["type"] == "range":
        find_keys: Tuple[Any, ...] = ("range", int(find_args["lastkey"]), int(find_args["keystep"]),
                                      int(find_args["limit"]))
    elif find["type"] == "keynum":
        find_keys = ("keynum", int(find_args["keynumidx"]), int(find_args["firstkey"]), int(find_args["keystep"]))
    else:
        find_keys = (str(find["type"]),)
    return (flags, begin_search, find_keys)


def collect(entries: Sequence[Any], table: Dict[str, Command]) -> None:
    """Add every command in a COMMAND INFO reply, and its subcommands, to ``table``."""
    for entry in entries:
        if entry is None:
            continue
        # [name, arity, flags, first, last, step, acl-categories, tips, key-specs, subcommands]
        name = entry[0].lower()
        flags = tuple(sorted({str(flag).lower() for flag in entry[2]}))
        specs = tuple(key_spec(raw) for raw in (entry[8] if len(entry) > 8 and entry[8] else ()))
        table[name] = (int(entry[1]), flags, specs)
        if len(entry) > 9 and entry[9]:
            collect(entry[9], table)


def sort_key(name: str) -> Tuple[str, ...]:
    return tuple(name.split("|"))  # each container command right before its subcommands


def _literal(value: Any) -> str:
    """``value`` as Python source: strings in double quotes, one-element tuples with their comma."""
    if isinstance(value, tuple):
        inner = ", ".join(_literal(item) for item in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def render_entry(name: str, command: Command) -> List[str]:
    """One command on one line; its key specs on lines of their own when that would pass LINE_LENGTH."""
    arity, flags, specs = command
    line = f"{INDENT}{_literal(name)}: ({arity}, {_literal(flags)}, {_literal(specs)}),"
    if len(line) <= LINE_LENGTH:
        return [line]
    lines = [f"{INDENT}{_literal(name)}: ({arity}, {_literal(flags)}, ("]
    for spec in specs:
        lines.append(f"{INDENT * 2}{_literal(spec)},")
    lines.append(f"{INDENT}))," if specs else f"{INDENT})),")
    return lines


HEADER = '''"""Redis's command table, generated by scripts/gen-redis-commands.py from Redis {version}.

Do not edit by hand.  This is ``COMMAND INFO`` of a real redis-server:
every command and container subcommand (``"object|encoding"``, as Redis
names them) with its arity, its flags and its key specs.  To regenerate it
(the script starts a throw-away redis-server, or use ``--port N`` for a
running one)::

    scripts/gen-redis-commands.py
    scripts/gen-redis-commands.py --check    # exit 1 if this file is stale

COMMANDS maps a name to ``(arity, flags, key_specs)``; arity as Redis gives
it (n: exactly n arguments counting the name, -n: at least n).  A key spec
is ``(flags, begin_search, find_keys)``: begin_search is ``("index", pos)``,
``("keyword", KEYWORD, startfrom)`` (a negative startfrom searches from the
end) or ``("unknown",)``; find_keys is ``("range", lastkey, keystep,
limit)``, ``("keynum", keynumidx, firstkey, keystep)`` or ``("unknown",)``.
:mod:`twinproxy.protocols.redis_keys` applies them as ``COMMAND GETKEYS``
does.  One line per command (a long one wraps its key specs): {length}.

READ_ONLY (flagged "readonly" and not "write") is what may be sent to a
replica; scripting commands are routed to the master separately even where
Redis flags them readonly (EVAL_RO, EVALSHA_RO, FCALL_RO).
"""

from typing import Any, Dict, FrozenSet, Tuple

REDIS_VERSION = "{version}"

KeySpec = Tuple[Tuple[str, ...], Tuple[Any, ...], Tuple[Any, ...]]
Command = Tuple[int, Tuple[str, ...], Tuple[KeySpec, ...]]

COMMANDS: Dict[str, Command] = {{
'''

FOOTER = '''}}

FLAGS: Dict[str, Tuple[str, ...]] = {{name: command[1] for name, command in COMMANDS.items()}}
READ_ONLY: FrozenSet[str] = frozenset(name for name, fl in FLAGS.items() if "readonly" in fl and "write" not in fl)
WRITE: FrozenSet[str] = frozenset(name for name, fl in FLAGS.items() if "write" in fl)
'''


def render(version: str, table: Dict[str, Command]) -> str:
    body: List[str] = []
    for name in sorted(table, key=sort_key):
        body.extend(render_entry(name, table[name]))
    footer = FOOTER.format()
    # The docstring states the file's length (its own lines counted in).
    total = len(HEADER.format(version=version, length="").splitlines()) + len(body) + len(footer.splitlines())
    length = f"{total} lines"
    if total > 600:
        length += ", past the house's ~600 for a module, as a generated data file may be"
    return HEADER.format(version=version, length=length) + "\n".join(body) + "\n" + footer


def parse_table(text: str) -> Tuple[Optional[str], Optional[Dict[str, Command]]]:
    """REDIS_VERSION and COMMANDS as written in an existing module, without importing it."""
    version: Optional[str] = None
    table: Optional[Dict[str, Command]] = None
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None, None
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if not isinstance(target, ast.Name):
            continue
        try:
            if target.id == "REDIS_VERSION":
                version = ast.literal_eval(value)
            elif target.id == "COMMANDS":
                table = ast.literal_eval(value)
        except ValueError:
            pass
    return version, table


def diff_summary(old_text: str, new_text: str, new_version: str, new_table: Dict[str, Command]) -> str:
    """What would change: the version, added, removed and changed commands, and how many lines differ."""
    old_version, old_table = parse_table(old_text)
    out = []
    if old_version != new_version:
        out.append(f"REDIS_VERSION: {old_version!r} -> {new_version!r}")
    if not old_text:
        out.append("the file does not exist yet")
    elif old_table is None:
        out.append("the existing COMMANDS table could not be read")
    else:
        added = sorted(set(new_table) - set(old_table), key=sort_key)
        removed = sorted(set(old_table) - set(new_table), key=sort_key)
        changed = sorted((n for n in set(new_table) & set(old_table) if tuple(old_table[n]) != new_table[n]),
                         key=sort_key)
        for title, names in (("added", added), ("removed", removed)):
            if names:
                out.append(f"{len(names)} {title}: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}")
        for name in changed[:20]:
            out.append(f"changed {name}: {tuple(old_table[name])} -> {new_table[name]}")
        if len(changed) > 20:
            out.append(f"... and {len(changed) - 20} more changed")
    semantic = bool(out)
    udiff = list(difflib.unified_diff(old_text.splitlines(), new_text.splitlines(), "current", "generated",
                                      lineterm="", n=0))
    differing = sum(1 for line in udiff if line[:1] in "+-" and line[:3] not in ("+++", "---"))
    out.append(f"{differing} lines differ")
    if not semantic:
        out.append("same table, different text (hand edit or formatting); first differences:")
        out.extend(udiff[:40])
    return "\n".join(out)


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally that stops our redis-server


def main(argv: Optional[Sequence[str]] = None) -> int:
    signal.signal(signal.SIGTERM, _terminated)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, help="use the redis-server already listening on this port")
    parser.add_argument("--host", default=HOST, help="host for --port (default %(default)s)")
    parser.add_argument("--redis-server", default="redis-server", help="binary to start (default %(default)s)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="module to write (default %(default)s)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the output would change")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds for every socket operation")
    args = parser.parse_args(argv)

    try:
        if args.port is not None:
            version, commands = fetch(args.host, args.port, args.timeout)
        else:
            version, commands = fetch_from_new_server(args.redis_server, args.timeout)
    except (OSError, RedisError, RuntimeError) as err:
        print(f"gen-redis-commands: {err}", file=sys.stderr)
        return 2

    table: Dict[str, Command] = {}
    collect(commands, table)
    text = render(version, table)
    output: Path = args.output
    old_text = output.read_text() if output.exists() else ""
    keyed = sum(1 for command in table.values() if command[2])
    summary = f"Redis {version}: {len(table)} commands and subcommands, {keyed} with key specs"

    if args.check:
        if old_text == text:
            print(f"{output}: up to date ({summary})")
            return 0
        print(f"{output}: out of date ({summary})", file=sys.stderr)
        print(diff_summary(old_text, text, version, table), file=sys.stderr)
        return 1
    if old_text != text:
        tmp = output.with_name(output.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, output)
        print(f"{output}: written ({summary})")
    else:
        print(f"{output}: unchanged ({summary})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
