"""The generated Redis command-flag table, and that it matches the installed redis-server."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from twinproxy.protocols.redis_commands import FLAGS, READ_ONLY, REDIS_VERSION, WRITE

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "scripts" / "gen-redis-commands.py"


@pytest.mark.parametrize("name", [
    "get", "mget", "hgetall", "zrange", "exists", "ttl", "object|encoding", "xinfo|stream", "memory|usage",
])
def test_read_only(name: str) -> None:
    assert name in READ_ONLY
    assert name not in WRITE


@pytest.mark.parametrize("name", ["set", "del", "eval", "evalsha", "fcall", "incr", "xgroup|create"])
def test_not_read_only(name: str) -> None:
    assert name in FLAGS
    assert name not in READ_ONLY


@pytest.mark.parametrize("name", ["set", "del", "incr", "xgroup|create"])
def test_writes(name: str) -> None:
    assert name in WRITE


@pytest.mark.parametrize("name", ["multi", "exec"])
def test_transactions_are_not_read_only(name: str) -> None:
    assert name in FLAGS
    assert name not in READ_ONLY


def test_sets_are_derived_from_flags() -> None:
    assert READ_ONLY <= set(FLAGS)
    assert WRITE <= set(FLAGS)
    assert not READ_ONLY & WRITE
    for name in READ_ONLY:
        assert "readonly" in FLAGS[name] and "write" not in FLAGS[name]


def test_table_shape() -> None:
    assert REDIS_VERSION.startswith("7.")
    for name, flags in FLAGS.items():
        assert name == name.lower()
        assert name.count("|") <= 1
        if "|" in name:
            assert name.split("|")[0] in FLAGS, name  # a subcommand's container is listed too
        assert isinstance(flags, tuple)
        assert list(flags) == sorted(set(flags)), name


def _installed_redis_version() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        return ""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    match = re.search(r"\bv=(\S+)", out)
    return match.group(1) if match else ""


@pytest.mark.timeout(60)
def test_table_matches_installed_redis() -> None:
    installed = _installed_redis_version()
    if installed != REDIS_VERSION:
        pytest.skip(f"the table is from Redis {REDIS_VERSION}; installed redis-server is "
                    f"{installed or 'missing'}, so its COMMAND INFO may differ")
    # The script starts (and always stops) its own redis-server on a free port in a temp dir.  On a
    # timeout it gets SIGTERM, not SIGKILL, so its finally still stops that server.
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--check"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        output, _ = proc.communicate(timeout=45)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            output, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        pytest.fail(f"gen-redis-commands.py --check did not finish in 45s:\n{output}")
    assert proc.returncode == 0, output
