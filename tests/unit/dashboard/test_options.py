"""The options of ``twinproxy-dashboard`` (dashboard/cli.py) and ``twistd twinproxy-dashboard``
(dashboard/tap.py): the same settings from the same words, the same refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from twinproxy.credentials import Credentials
from twinproxy.dashboard import cli, tap
from twinproxy.dashboard.bigkeys import DEFAULT_BIG_KEY_BYTES
from twinproxy.dashboard.service import (
    Settings,
    SettingsError,
    lock_held_message,
    parse_listen,
    parse_size,
    read_redis_auth,
    read_token,
)


def test_both_entry_points_make_the_same_settings(tmp_path: Path):
    token = tmp_path / "token"
    token.write_text("  s3cret \n")
    words = ["--coordinator", "file:///tmp/x", "--cluster", "shop.eu-1", "--protocol", "memcache", "--listen",
             "127.0.0.1:0", "--token-file", str(token), "--ack-timeout", "2.5", "--wait", "--big-key-bytes", "512k"]
    settings, log = cli.parse([*words, "--log", "d.log"])
    assert settings == Settings("file:///tmp/x", "shop.eu-1", "memcache", ("127.0.0.1", 0), b"s3cret", 2.5, True,
                                512 * 1024)
    assert log == "d.log"
    options = tap.Options()
    options.parseOptions(words)
    assert options.settings == settings


def test_defaults():
    settings, log = cli.parse(["--coordinator", "file:///tmp/x", "--cluster", "shop"])
    assert (settings.protocol, settings.listen_text, settings.token, settings.ack_timeout, settings.wait, log) == \
        ("redis", "127.0.0.1:18080", None, 10.0, False, None)
    assert settings.big_key_bytes == DEFAULT_BIG_KEY_BYTES == 4 * 1024 * 1024


@pytest.mark.parametrize("extra, words", [
    (["--cluster", "-bad"], None), (["--cluster", "a b"], "cluster name"), (["--listen", "18080"], "HOST:PORT"),
    (["--listen", "h:99999"], "HOST:PORT"), (["--ack-timeout", "0"], "--ack-timeout"),
    (["--big-key-bytes", "4x"], "--big-key-bytes"), (["--big-key-bytes", "-1"], "--big-key-bytes"),
])
def test_bad_values(extra, words, capsys):
    argv = ["--coordinator", "file:///tmp/x", "--cluster", "shop", *extra]
    if words is None:                    # argparse's own refusal: a usage error
        with pytest.raises(SystemExit) as stop:
            cli.parse(argv)
        assert stop.value.code == 2
        return
    with pytest.raises(SettingsError, match=words):
        cli.parse(argv)
    with pytest.raises(SystemExit) as stop:
        tap.Options().parseOptions(argv)
    assert stop.value.code == 1 and words in capsys.readouterr().err


def test_main_says_why_in_one_line(tmp_path: Path, capsys):
    assert cli.main(["--coordinator", "file:///tmp/x", "--cluster", "shop", "--token-file",
                     str(tmp_path / "missing")]) == 1
    assert capsys.readouterr().err.startswith("twinproxy-dashboard: cannot read the token file")
    assert cli.main(["--coordinator", "zookeeper://", "--cluster", "shop"]) == 1
    assert "empty host" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        tap.Options().parseOptions(["--cluster", "shop"])
    assert stop.value.code == 2 and "--coordinator is required" in capsys.readouterr().err


def test_token_file_rules(tmp_path: Path):
    path = tmp_path / "token"
    path.write_text("\n\n")
    with pytest.raises(SettingsError, match="empty"):
        read_token(str(path))
    path.write_text("two words\n")
    with pytest.raises(SettingsError, match="printable ASCII"):
        read_token(str(path))
    assert parse_listen("[::1]:18080") == ("::1", 18080)


def test_lock_held_message():
    text = lock_held_message("shop", {"addr": "127.0.0.1:18080", "pid": 123, "host": "h"}, 10.0)
    assert text.startswith("cluster 'shop' already has a dashboard at 127.0.0.1:18080 (pid 123 on host h); ")
    assert "--wait" in text


def test_sizes():
    """--big-key-bytes takes bytes or a binary unit; 0 is allowed (no chunked copies)."""
    assert [parse_size(text) for text in ("0", "4096", "512k", "4MiB", "4 mb", "1G")] == [
        0, 4096, 512 * 1024, 4 * 1024 ** 2, 4 * 1024 ** 2, 1024 ** 3]


def test_the_redis_credentials_file(tmp_path: Path, capsys):
    """--redis-auth-file: the password, its one line whole (spaces kept, as redis_auth), never shown back."""
    path = tmp_path / "redis-auth"
    path.write_text("  mover s3 cr3t \n")
    assert read_redis_auth(str(path)) == "  mover s3 cr3t "
    words = ["--coordinator", "file:///tmp/x", "--cluster", "shop", "--redis-auth-file", str(path)]
    settings, _ = cli.parse(words)
    assert settings.redis_auth == Credentials("  mover s3 cr3t ") and "cr3t" not in repr(settings)
    options = tap.Options()
    options.parseOptions(words)
    assert options.settings == settings
    assert cli.parse(words[:4])[0].redis_auth is None
    path.write_text("s3 cr3t\r\n")
    assert read_redis_auth(str(path)) == "s3 cr3t"
    for content, words_said in (("\n \n", "is empty"), (" \n", "is empty"), ("one\ntwo\n", "one line"),
                                ("a\tb", "one line")):
        path.write_text(content)
        with pytest.raises(SettingsError, match=words_said) as refused:
            read_redis_auth(str(path))
        assert "two" not in str(refused.value)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(SettingsError, match="not UTF-8"):
        read_redis_auth(str(path))
    assert cli.main(["--coordinator", "file:///tmp/x", "--cluster", "shop", "--redis-auth-file",
                     str(tmp_path / "missing")]) == 1
    assert capsys.readouterr().err.startswith("twinproxy-dashboard: cannot read the Redis password file")
    # A memcached cluster has no use for them.
    path.write_text("s3cret\n")
    with pytest.raises(SettingsError, match="for Redis clusters, not memcache"):
        cli.parse([*words, "--protocol", "memcache"])
    with pytest.raises(SystemExit) as stop:
        tap.Options().parseOptions([*words, "--protocol", "memcache"])
    assert stop.value.code == 1 and "for Redis clusters" in capsys.readouterr().err


def test_the_redis_acl_user(tmp_path: Path, capsys):
    """--redis-auth-user NAME: the ACL user whose password the file holds; only with --redis-auth-file."""
    path = tmp_path / "redis-auth"
    path.write_text("s3 cr3t\n")
    words = ["--coordinator", "file:///tmp/x", "--cluster", "shop", "--redis-auth-file", str(path),
             "--redis-auth-user", "mover"]
    settings, _ = cli.parse(words)
    assert settings.redis_auth == Credentials("s3 cr3t", "mover") and "cr3t" not in repr(settings)
    options = tap.Options()
    options.parseOptions(words)
    assert options.settings == settings
    alone = [*words[:4], *words[6:]]
    with pytest.raises(SettingsError, match="--redis-auth-user needs --redis-auth-file"):
        cli.parse(alone)
    assert cli.main(alone) == 1
    assert "--redis-auth-user needs --redis-auth-file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        tap.Options().parseOptions(alone)
    assert stop.value.code == 1 and "--redis-auth-user needs --redis-auth-file" in capsys.readouterr().err
    with pytest.raises(SettingsError, match="is not a Redis user name"):
        cli.parse([*words[:6], "--redis-auth-user", "two words"])


def test_a_refused_redis_acl_user_is_not_shown_back(tmp_path: Path) -> None:
    # "user password" given as the user (the old split form): the error must not print the password.
    path = tmp_path / "redis-auth"
    path.write_text("s3cret\n")
    with pytest.raises(SettingsError, match="is not a Redis user name") as refused:
        cli.parse(["--coordinator", "file:///tmp/x", "--cluster", "shop", "--redis-auth-file", str(path),
                   "--redis-auth-user", "mover s3cret"])
    assert "s3cret" not in str(refused.value)
