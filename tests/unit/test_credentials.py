"""The data servers' credentials (twinproxy/credentials.py): the one place AUTH and MIGRATE's AUTH/AUTH2 are built."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from twinproxy.config import load_text
from twinproxy.credentials import (
    Credentials,
    migrate_options,
    pool_credentials,
    sentinel_credentials,
    valid_user_name,
)


def test_the_password_is_whole() -> None:
    """nutcracker's redis_auth: spaces are part of the password, never a user's name before it."""
    plain = Credentials("s3 cr et")
    assert plain.auth_arguments() == [b"AUTH", b"s3 cr et"]
    assert plain.migrate_arguments() == [b"AUTH", b"s3 cr et"]


def test_an_acl_user() -> None:
    alice = Credentials("pa ss", "alice")
    assert alice.auth_arguments() == [b"AUTH", b"alice", b"pa ss"]
    assert alice.migrate_arguments() == [b"AUTH2", b"alice", b"pa ss"]
    assert migrate_options(alice) == alice.migrate_arguments() and migrate_options(None) == []


def test_utf8_and_never_shown() -> None:
    credentials = Credentials("pässwörd", "ünser")
    assert credentials.auth_arguments() == [b"AUTH", "ünser".encode(), "pässwörd".encode()]
    assert "pässwörd" not in repr(credentials) and "ünser" in repr(credentials)


def test_equal_credentials_are_the_same_key() -> None:
    """(A MoveBatcher or MigratingSlot made for the same credentials is kept across tables.)"""
    assert Credentials("pw", "u") == Credentials("pw", "u") and hash(Credentials("pw")) == hash(Credentials("pw"))
    assert Credentials("pw") != Credentials("pw", "default") != Credentials("pw", "u")


def test_a_pools_credentials() -> None:
    head = "p:\n  listen: 127.0.0.1:1\n  redis: true\n"
    tail = "  servers:\n   - 10.0.0.1:6379:1\n"
    (plain,) = load_text(head + tail)
    (password,) = load_text(head + "  redis_auth: a b c\n" + tail)
    (user,) = load_text(head + "  redis_auth: a b c\n  redis_auth_user: alice\n" + tail)
    assert pool_credentials(plain) is None
    assert pool_credentials(password) == Credentials("a b c")
    assert pool_credentials(user) == Credentials("a b c", "alice")
    assert pool_credentials(None) is None and pool_credentials(SimpleNamespace(redis_auth="x")) == Credentials("x")


def test_sentinel_auth_keeps_its_own_form() -> None:
    """sentinel_auth (twinproxy's, not nutcracker's) was always ``password`` or ``user password``."""
    assert sentinel_credentials(None) is None and sentinel_credentials("") is None
    assert sentinel_credentials("s3cret") == Credentials("s3cret")
    assert sentinel_credentials("probe pass with spaces") == Credentials("pass with spaces", "probe")


@pytest.mark.parametrize("name, valid", [("alice", True), ("mover-1.x", True), ("ü", True), ("", False),
                                         ("two words", False), ("tab\there", False), ("nl\n", False),
                                         ("del\x7f", False)])
def test_user_names(name: str, valid: bool) -> None:
    assert valid_user_name(name) is valid
