"""The twistd plugin's options and service, and the ``twinproxy`` command."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.python import usage

from twinproxy import __version__, cli, tap

REPO = Path(__file__).resolve().parents[2]
GOOD = "alpha:\n  listen: 127.0.0.1:22121\n  redis: true\n  servers:\n   - 127.0.0.1:6379:1\n" \
       "beta:\n  listen: 127.0.0.1:22122\n  servers:\n   - 127.0.0.1:11211:1\n"


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "pools.yml"
    path.write_text(GOOD)
    return path


def test_options_load_the_config(good: Path) -> None:
    options = tap.Options()
    options.parseOptions(["--config", str(good)])
    assert [p.name for p in options.pools] == ["alpha", "beta"]
    options = tap.Options()
    options.parseOptions(["--conf-file", str(good)])
    assert len(options.pools) == 2


def test_bad_config_exits_1_with_one_line_not_a_traceback(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("alpha:\n  listen: 127.0.0.1:1\n  hash: nope\n  servers:\n   - 127.0.0.1:1:1\n")
    with pytest.raises(SystemExit) as caught:
        tap.Options().parseOptions(["--config", str(bad)])
    assert caught.value.code == 1
    assert "bad.yml: pool 'alpha': key 'hash': value 'nope'" in capsys.readouterr().err


def test_build_one_named_child_per_pool_and_the_stats_port(good: Path, tmp_path: Path) -> None:
    from twisted.internet.testing import MemoryReactorClock

    options = tap.Options()
    options.parseOptions(["--config", str(good), "-p", str(tmp_path / "tp.pid")])
    top = tap.build(options, MemoryReactorClock())
    assert [s.name for s in top] == ["pidfile", "pools", "stats", "cluster-sources", "hangup"]
    pools = top.getServiceNamed("pools")
    assert [s.name for s in pools] == ["alpha", "beta"]
    assert pools.getServiceNamed("alpha").config.redis is True
    options = tap.Options()
    options.parseOptions(["-c", str(good), "--http-port", "0", "-o", str(tmp_path / "tp.log"), "-v", "7",
                          "--bound-addresses", str(tmp_path / "bound.json")])
    assert [s.name for s in tap.build(options, MemoryReactorClock())] == [
        "log", "pools", "stats", "cluster-sources", "http", "bound-addresses", "hangup"]


def test_nutcracker_options_parse(good: Path) -> None:
    options = tap.Options()
    options.parseOptions(["-c", str(good), "-s", "22223", "-a", "127.0.0.1", "-i", "1000", "-v", "11", "-m", "512",
                          "-d"])
    assert (options["stats-port"], options["stats-addr"], options["stats-interval"]) == (22223, "127.0.0.1", 1000)
    assert (options["verbose"], options["daemonize"]) == (11, True)
    with pytest.raises(usage.UsageError):
        tap.Options().parseOptions(["-c", str(good), "-v", "12"])


def test_cli_check_config(good: Path, tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert tap.check_config(str(good), out, err) == 0
    assert "syntax is ok" in out.getvalue()
    bad = tmp_path / "bad.yml"
    bad.write_text("alpha:\n  listen: 127.0.0.1:1\n  servers:\n   - 127.0.0.1:1:0\n")
    assert tap.check_config(str(bad), out, err) == 1
    assert "syntax is invalid" in err.getvalue() and "zero weight" in err.getvalue()


def test_cli_version_describe_and_test_flag(good: Path, capsys) -> None:
    assert cli.main(["-V"]) == 0
    assert capsys.readouterr().out.strip() == f"This is twinproxy-{__version__}"
    assert cli.main(["-D"]) == 0
    described = capsys.readouterr().out
    for field in ("client_eof", "forward_error", "server_ejected_at", "out_queue_bytes", "curr_connections"):
        assert field in described
    assert cli.main(["-t", "-c", str(good)]) == 0
    assert cli.main(["-t", str(good)]) == 0
    assert cli.main(["--test-conf", str(good) + ".missing"]) == 1
    assert cli.main(["-t", str(good), "extra"]) == 1
    assert cli.main(["--test-conf", "-c", str(good) + ".missing"]) == 1
    assert cli.main(["--bogus"]) == 1


def test_twistd_lists_the_plugin_from_another_directory(tmp_path: Path) -> None:
    twistd = Path(sys.executable).parent / "twistd"
    result = subprocess.run([str(twistd), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert "twinproxy" in result.stdout, result.stdout + result.stderr


def test_workers_only_through_the_twinproxy_command(good: Path) -> None:
    options = tap.Options()
    options.parseOptions(["-c", str(good), "--workers", "2"])
    with pytest.raises(SystemExit):
        tap.makeService(options)
    with pytest.raises(usage.UsageError):
        tap.Options().parseOptions(["-c", str(good), "--workers", "0"])


def test_worker_documents_are_summed() -> None:
    from twinproxy.stats import merge_documents

    one = {"service": "twinproxy", "uptime": 5, "curr_connections": 3,
           "p": {"client_eof": 1, "s": {"requests": 10, "server_ejected_at": 5}}}
    two = {"service": "twinproxy", "uptime": 5, "curr_connections": 4,
           "p": {"client_eof": 2, "s": {"requests": 1, "server_ejected_at": 9}}}
    assert merge_documents([one, two]) == {"service": "twinproxy", "uptime": 5, "curr_connections": 7,
                                           "p": {"client_eof": 3, "s": {"requests": 11, "server_ejected_at": 9}}}


def test_pypy_restarts_once_with_a_bigger_nursery() -> None:
    script = ["/venv/bin/twinproxy", "-c", "p.yml"]
    assert cli.pypy_restart_argv("PyPy", {}, script, "/venv/bin/pypy3") == ["/venv/bin/pypy3", *script]
    assert cli.pypy_restart_argv("PyPy", {}, ["/x/twinproxy/__main__.py", "-t"], "/usr/bin/pypy3") == [
        "/usr/bin/pypy3", "-m", "twinproxy", "-t"]
    # Not on CPython, and never over the operator's own setting (nor twice).
    assert cli.pypy_restart_argv("CPython", {}, script, "/venv/bin/python") is None
    assert cli.pypy_restart_argv("PyPy", {"PYPY_GC_NURSERY": "4M"}, script, "/venv/bin/pypy3") is None
