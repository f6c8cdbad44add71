"""The data servers' credentials, and the commands that present them.

Owns :class:`Credentials` (a pool's ``redis_auth`` password, whole as in
nutcracker, and its optional ``redis_auth_user``, a Redis 6+ ACL user) and
the arguments built from them: ``AUTH`` for every connection to a data
server (the proxy's backend handshake, its Sentinel ROLE checks, the
dashboard's admin) and MIGRATE's ``AUTH``/``AUTH2``.  Every site builds its
commands here, so one setting means the same to all of them.  The
password never appears in a repr.  Pure values: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional


@dataclass(frozen=True)
class Credentials:
    """A password (spaces are part of it) and, for a Redis 6+ ACL user, that user's name."""

    password: str = field(repr=False)
    user: Optional[str] = None

    def auth_arguments(self) -> List[bytes]:
        """``AUTH password``, or ``AUTH user password`` for an ACL user."""
        if self.user is None:
            return [b"AUTH", self.password.encode()]
        return [b"AUTH", self.user.encode(), self.password.encode()]

    def migrate_arguments(self) -> List[bytes]:
        """MIGRATE's options for the target: ``AUTH password``, or ``AUTH2 user password`` for an ACL user."""
        if self.user is None:
            return [b"AUTH", self.password.encode()]
        return [b"AUTH2", self.user.encode(), self.password.encode()]


def valid_user_name(name: str) -> bool:
    """A name Redis's ACL takes as a user: one word, no spaces or control characters."""
    return bool(name) and not any(char.isspace() or ord(char) < 32 or ord(char) == 127 for char in name)


def pool_credentials(config: Any) -> Optional[Credentials]:
    """A pool's data-server credentials (``redis_auth``, ``redis_auth_user``); None without ``redis_auth``."""
    password = getattr(config, "redis_auth", None)
    if not password:
        return None
    return Credentials(password, getattr(config, "redis_auth_user", None))


def migrate_options(credentials: Optional[Credentials]) -> List[bytes]:
    """MIGRATE's credentials options (none without credentials)."""
    return credentials.migrate_arguments() if credentials is not None else []


def sentinel_credentials(text: Optional[str]) -> Optional[Credentials]:
    """A pool's ``sentinel_auth``, for the sentinels themselves: ``"password"`` or ``"user password"``.

    Unlike ``redis_auth`` this setting is twinproxy's own and has always
    been split at its first space (the password after it may hold more)."""
    if not text:
        return None
    user, sep, password = text.strip().partition(" ")
    return Credentials(password, user) if sep else Credentials(user)
