#!/usr/bin/env python3
"""Generate twinproxy/protocols/redis_commands.py from a real Redis 7's COMMAND INFO.

By default this starts its own redis-server on a free 127.0.0.1 port in a
temporary directory (no persistence), asks it ``COMMAND INFO`` (every
command with its flags and subcommands) and ``INFO server`` (its version),
writes the table, and always stops the server again.  With ``--port N`` it
asks a redis-server that is already running there instead.

    scripts/gen-redis-commands.py                 # regenerate the table
    scripts/gen-redis-commands.py --check         # exit 1 if it would change
    scripts/gen-redis-commands.py --port 6379 --output /tmp/redis_commands.py

Standard library only: the RESP client below is just enough for these two
requests, and every socket operation has a timeout.
"""

from __future__ import annotations

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

    def __enter__(self) -> Connection:
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


def collect(entries: Sequence[Any], flags: Dict[str, Tuple[str, ...]]) -> None:
    """Add every command in a COMMAND INFO reply, and its subcommands, to ``flags``."""
    for entry in entries:
        if entry is None:
            continue
        # [name, arity, flags, first, last, step, acl-categories, tips, key-specs, subcommands]
        name = entry[0].lower()
        flags[name] = tuple(sorted({str(flag).lower() for flag in entry[2]}))
        if len(entry) > 9 and entry[9]:
            collect(entry[9], flags)


def sort_key(name: str) -> Tuple[str, ...]:
    return tuple(name.split("|"))  # each container command right before its subcommands


def render(version: str, flags: Dict[str, Tuple[str, ...]]) -> str:
    entries = []
    for name in sorted(flags, key=sort_key):
        values = flags[name]
        inner = ", ".join(f'"{value}"' for value in values) + ("," if len(values) == 1 else "")
        entries.append(f'"{name}": ({inner}),')
    lines: List[str] = []
    current = ""
    for entry in entries:
        candidate = f"{current} {entry}" if current else INDENT + entry
        if current and len(candidate) > LINE_LENGTH:
            lines.append(current)
            candidate = INDENT + entry
        current = candidate
    if current:
        lines.append(current)
    body = "\n".join(lines)
    return f'''"""Redis command flags, generated by scripts/gen-redis-commands.py from Redis {version}.

Do not edit by hand.  The table is ``COMMAND INFO`` from a real
redis-server: every command and subcommand (``"object|encoding"``, as Redis
names them) with its flags.  To regenerate it (the script starts its own
redis-server, or use ``--port N`` for a running one)::

    scripts/gen-redis-commands.py
    scripts/gen-redis-commands.py --check    # exit 1 if this file is stale

READ_ONLY (flagged "readonly" and not "write") is what may be sent to a
replica; scripting commands are routed to the master separately even where
Redis flags them readonly (EVAL_RO, EVALSHA_RO, FCALL_RO).
"""

from __future__ import annotations

from typing import Dict, FrozenSet, Tuple

REDIS_VERSION = "{version}"

FLAGS: Dict[str, Tuple[str, ...]] = {{
{body}
}}

READ_ONLY: FrozenSet[str] = frozenset(name for name, fl in FLAGS.items() if "readonly" in fl and "write" not in fl)
WRITE: FrozenSet[str] = frozenset(name for name, fl in FLAGS.items() if "write" in fl)
'''


def parse_table(text: str) -> Tuple[Optional[str], Optional[Dict[str, Tuple[str, ...]]]]:
    """REDIS_VERSION and FLAGS as written in an existing module, without importing it."""
    version: Optional[str] = None
    flags: Optional[Dict[str, Tuple[str, ...]]] = None
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
            elif target.id == "FLAGS":
                flags = ast.literal_eval(value)
        except ValueError:
            pass
    return version, flags


def diff_summary(old_text: str, new_text: str, new_version: str, new_flags: Dict[str, Tuple[str, ...]]) -> str:
    """What would change: the version, added, removed and changed commands, and how many lines differ."""
    old_version, old_flags = parse_table(old_text)
    out = []
    if old_version != new_version:
        out.append(f"REDIS_VERSION: {old_version!r} -> {new_version!r}")
    if not old_text:
        out.append("the file does not exist yet")
    elif old_flags is None:
        out.append("the existing FLAGS table could not be read")
    else:
        added = sorted(set(new_flags) - set(old_flags), key=sort_key)
        removed = sorted(set(old_flags) - set(new_flags), key=sort_key)
        changed = sorted((n for n in set(new_flags) & set(old_flags) if tuple(old_flags[n]) != new_flags[n]),
                         key=sort_key)
        for title, names in (("added", added), ("removed", removed)):
            if names:
                out.append(f"{len(names)} {title}: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}")
        for name in changed[:20]:
            out.append(f"changed {name}: {tuple(old_flags[name])} -> {new_flags[name]}")
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

    flags: Dict[str, Tuple[str, ...]] = {}
    collect(commands, flags)
    text = render(version, flags)
    output: Path = args.output
    old_text = output.read_text() if output.exists() else ""
    read_only = sum(1 for fl in flags.values() if "readonly" in fl and "write" not in fl)
    summary = f"Redis {version}: {len(flags)} commands and subcommands, {read_only} read-only"

    if args.check:
        if old_text == text:
            print(f"{output}: up to date ({summary})")
            return 0
        print(f"{output}: out of date ({summary})", file=sys.stderr)
        print(diff_summary(old_text, text, version, flags), file=sys.stderr)
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
