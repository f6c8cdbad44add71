"""AUTH and HELLO: logging a client in, and the connection handshake it asks for.

Owns :class:`LoginCommands`, the Redis codec's handlers for AUTH and HELLO
(Redis 7.0's replies, option by option), and the password check.  The
codec keeps the AUTH gate (what a client gets before it logged in).
Sans-I/O: never touches the pool, a socket or the reactor.
"""

from __future__ import annotations

import hmac
from typing import Callable, Optional

from twinproxy import __version__
from twinproxy.credentials import Credentials
from twinproxy.protocols import Session, resp
from twinproxy.protocols.redis_connection import BAD_NAME as _BAD_NAME
from twinproxy.protocols.redis_connection import valid_client_name as _valid_client_name
from twinproxy.protocols.redis_keys import long_long, wrong_arity
from twinproxy.request import Request

WRONG_PASSWORD = "WRONGPASS invalid username-password pair or user is disabled."
NOAUTH = "NOAUTH Authentication required."
NOAUTH_REPLY = resp.error(NOAUTH)
# Redis 7.0's text; 7.2 reworded it ("HELLO <proto> AUTH ...").
_HELLO_NOAUTH = ("NOAUTH HELLO must be called with the client already authenticated, otherwise the "
                 "HELLO AUTH <user> <pass> option can be used to authenticate the client and select "
                 "the RESP protocol version at the same time")


class LoginCommands:
    """AUTH and HELLO for one pool (its ``redis_auth`` password and ``redis_auth_user``, or none)."""

    def __init__(self, credentials: Optional[Credentials], mode_changed: Callable[[Session], None]) -> None:
        self._password = credentials.password.encode() if credentials is not None else None
        # A client may name the pool's ACL user, or the default user, or no user at all.
        self._users = {b"default"}
        if credentials is not None and credentials.user is not None:
            self._users.add(credentials.user.encode())
        # The codec's: a subscribed client's rules change with its protocol version.
        self._mode_changed = mode_changed

    def check_password(self, user: Optional[bytes], password: bytes) -> bool:
        if user is not None and user not in self._users:
            return False
        if self._password is None:
            return True
        return hmac.compare_digest(password, self._password)

    def auth(self, request: Request, session: Session) -> bytes:
        args = request.args
        if len(args) < 2:
            return b"-%s\r\n" % wrong_arity("auth")
        if len(args) > 3:
            return b"-ERR syntax error\r\n"
        if len(args) == 2 and self._password is None:
            return resp.error("ERR AUTH <password> called without any password configured for the "
                              "default user. Are you sure your configuration is correct?")
        user = args[1] if len(args) == 3 else None
        if not self.check_password(user, args[-1]):
            return resp.error(WRONG_PASSWORD)
        session.authenticated = True
        return b"+OK\r\n"

    def hello(self, request: Request, session: Session) -> bytes:
        args = request.args
        dialect = session.dialect
        name = None
        if len(args) >= 2:
            version = long_long(args[1])
            if version is None:
                return resp.error("ERR Protocol version is not an integer or out of range")
            if version not in (2, 3):
                return resp.error("NOPROTO unsupported protocol version")
            dialect = version
            i = 2
            while i < len(args):
                option = args[i].lower()
                if option == b"auth" and i + 2 < len(args):
                    if not self.check_password(args[i + 1], args[i + 2]):
                        return resp.error(WRONG_PASSWORD)
                    # Redis 7.0 logs the client in here, so it stays logged in
                    # even if a later option is refused.
                    session.authenticated = True
                    i += 3
                elif option == b"setname" and i + 1 < len(args):
                    name = args[i + 1]
                    if not _valid_client_name(name):
                        return resp.error(_BAD_NAME)
                    i += 2
                else:
                    shown = args[i].replace(b"\r", b" ").replace(b"\n", b" ")
                    return b"-ERR Syntax error in HELLO option '%s'\r\n" % shown
        if not session.authenticated:
            return resp.error(_HELLO_NOAUTH)
        if dialect != session.dialect and session.watch_pin is not None:
            # The WATCH's leased connection speaks the protocol it was made with.
            return resp.error("ERR HELLO switching the protocol while a WATCH is active is not supported by "
                              "twinproxy: EXEC, DISCARD or UNWATCH first")
        changed = dialect != session.dialect
        session.use(dialect, session.db)   # HELLO keeps the database, as in Redis
        if changed and session.mode is not None:   # subscribed: the RESP2 rules start or stop with the version
            self._mode_changed(session)
        if name is not None:
            session.client_name = name or None
        fields = [
            (resp.bulk(b"server"), resp.bulk(b"twinproxy")),
            (resp.bulk(b"version"), resp.bulk(__version__.encode())),
            (resp.bulk(b"proto"), resp.integer(dialect)),
            (resp.bulk(b"id"), resp.integer(session.client_id)),
            (resp.bulk(b"mode"), resp.bulk(b"standalone")),
            (resp.bulk(b"role"), resp.bulk(b"master")),
            (resp.bulk(b"modules"), resp.array([])),
        ]
        return resp.mapping(fields, dialect)
