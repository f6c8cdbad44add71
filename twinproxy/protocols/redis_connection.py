"""The commands about a client's own connection, answered by twinproxy for each client.

Owns :class:`ConnectionCommands` — SELECT and MOVE's database argument,
the CLIENT subcommands (about the proxy's own clients: LIST, INFO, KILL,
REPLY, SETNAME, ...), RESET, ROLE, READONLY/READWRITE and COMMAND
GETKEYS/GETKEYSANDFLAGS — and Redis's client-name rule, which HELLO
shares.  Pure: the client comes in as a
:class:`~twinproxy.protocols.Session` (its pool's other clients through
``session.peers()``), the key extraction as the codec's ``command_keys``
and the argument-count check as its ``arity_error``.  Every reply and
error text is Redis 7.0's unless a docstring says otherwise.

**Databases.**  A client sees databases 0 .. ``database_count`` - 1 (the
``databases`` pool key); its database n is the backends' ``redis_db`` + n.
A client that never SELECTs is in ``redis_db``, exactly as with
nutcracker.  Each (server, database) has its own backend connections,
opened with that SELECT (``RedisCodec.handshake``); SELECT itself only
changes the session's profile and is never sent on a shared connection.
MOVE's database is mapped the same way.  A cluster pool serves database 0
only: slot migrations move database 0.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

from twinproxy.config import PoolConfig
from twinproxy.protocols import REPLY_OFF, REPLY_ON, REPLY_SKIP, Session, resp
from twinproxy.protocols.redis_keys import long_long, unknown_subcommand
from twinproxy.protocols.redis_keys import wrong_arity as _arity_message
from twinproxy.request import FORWARD, Request

OK = b"+OK\r\n"
SYNTAX_ERROR = b"-ERR syntax error\r\n"
NOT_AN_INTEGER = b"-ERR value is not an integer or out of range\r\n"
DB_OUT_OF_RANGE = b"-ERR DB index is out of range\r\n"
RESET_REPLY = b"+RESET\r\n"
BAD_NAME = "ERR Client names cannot contain spaces, newlines or special characters."
# ROLE as a master with no replicas: what a standalone server a client writes to says.
_ROLE = b"*3\r\n$6\r\nmaster\r\n:0\r\n*0\r\n"
_NOT_A_CLUSTER = b"-ERR This instance has cluster support disabled\r\n"
_CLIENT_TYPES = (b"normal", b"master", b"replica", b"slave", b"pubsub")
_REPLY_MODES = {b"on": REPLY_ON, b"off": REPLY_OFF, b"skip": REPLY_SKIP}
# CLIENT subcommands twinproxy refuses, and why.
_CLIENT_REFUSED = {
    b"tracking": "client-side caching needs invalidation messages from every server, which twinproxy does not relay",
    b"caching": "client-side caching needs invalidation messages from every server, which twinproxy does not relay",
    b"pause": "it is a server administration command; ask the backends directly",
    b"unpause": "it is a server administration command; ask the backends directly",
    b"unblock": "twinproxy does not expose the server connections its clients may be blocked on",
}
_CLIENT_HELP = (
    "CLIENT <subcommand> [<arg> [value] [opt] ...], as twinproxy answers it (about its own clients):",
    "GETNAME | SETNAME <name> | ID | INFO | SETINFO <LIB-NAME|LIB-VER> <value>",
    "LIST [TYPE (NORMAL|MASTER|REPLICA|PUBSUB) | ID <id> ...]",
    "KILL <ip:port> | KILL [ID <id>] [ADDR <ip:port>] [LADDR <ip:port>] [TYPE <type>] [USER <name>] [SKIPME yes|no]",
    "REPLY (ON|OFF|SKIP) | NO-EVICT (ON|OFF) | NO-TOUCH (ON|OFF) | GETREDIR | TRACKINGINFO | HELP",
    "Refused: TRACKING, CACHING, PAUSE, UNPAUSE, UNBLOCK.",
)


def valid_client_name(name: bytes) -> bool:
    return all(33 <= byte <= 126 for byte in name)


def wrong_arity(name: bytes) -> bytes:
    return b"-" + _arity_message(name.decode("latin-1")) + b"\r\n"


class ConnectionCommands:
    """The handlers, for one pool's codec: each takes (request, session) and returns the reply.

    MOVE instead sets the request to go to its key's server (``kind =
    FORWARD`` and ``key``) and returns None; COMMAND GETKEYSANDFLAGS
    returns None for its planner to send it to a server.
    """

    def __init__(self, config: PoolConfig, command_keys: Callable[[List[bytes]], Tuple[Any, Any]],
                 arity_error: Callable[[List[bytes], bytes, Any], Optional[bytes]]) -> None:
        self._databases = config.database_count
        self._base = config.redis_db
        self._command_keys = command_keys
        self._arity_error = arity_error
        self._client: Dict[bytes, Callable[[Request, Session], Optional[bytes]]] = {
            b"list": self._client_list, b"info": self._client_info, b"kill": self._client_kill,
            b"reply": self._client_reply, b"setname": self._client_setname, b"getname": self._client_getname,
            b"id": self._client_id, b"setinfo": self._client_setinfo, b"no-evict": self._on_or_off,
            b"no-touch": self._on_or_off, b"getredir": self._client_getredir,
            b"trackinginfo": self._client_trackinginfo, b"help": self._client_help,
        }

    # -- databases -------------------------------------------------------------

    def _database(self, text: bytes) -> Tuple[Optional[int], Optional[bytes]]:
        """The database a client names, or Redis's error for it."""
        index = long_long(text)
        if index is None:
            return None, NOT_AN_INTEGER
        if not 0 <= index < self._databases:
            return None, DB_OUT_OF_RANGE
        return index, None

    def select(self, request: Request, session: Session) -> bytes:
        args = request.args
        if len(args) != 2:
            return wrong_arity(b"select")
        index, error = self._database(args[1])
        if error is not None:
            return error
        if index and session.in_cluster:
            return resp.error("ERR SELECT is not allowed in a twinproxy cluster pool: it serves database 0 only "
                              "(slot migrations move database 0)")
        if index != session.db and session.watch_pin is not None:
            # The WATCH's leased connection is in the database it was made in.
            return resp.error("ERR SELECT of another database while a WATCH is active is not supported by "
                              "twinproxy: EXEC, DISCARD or UNWATCH first")
        session.use(session.dialect, index)
        return OK

    def move(self, request: Request, session: Session) -> Optional[bytes]:
        """MOVE key db: to the key's server, with ``db`` mapped as SELECT maps it."""
        args = request.args
        if len(args) != 3:
            return wrong_arity(b"move")
        if session.in_cluster:
            return resp.error("ERR MOVE is not allowed in a twinproxy cluster pool: it serves database 0 only")
        index, error = self._database(args[2])
        if error is not None:
            return error
        if index == session.db:
            return b"-ERR source and destination objects are the same\r\n"
        if self._base:
            request.args = [args[0], args[1], b"%d" % (self._base + index)]
            request.raw = resp.encode_command(request.args)
        request.kind = FORWARD
        request.key = args[1]
        return None

    # -- CLIENT ----------------------------------------------------------------

    def client(self, request: Request, session: Session) -> Optional[bytes]:
        args = request.args
        if len(args) < 2:
            return wrong_arity(b"client")
        sub = args[1].lower()
        refused = _CLIENT_REFUSED.get(sub)
        handler = self._client.get(sub)
        if handler is None and refused is None:
            return b"-" + unknown_subcommand(args) + b"\r\n"
        error = self._arity_error(args, b"client", request.command)
        if error is not None:
            return error
        if refused is not None:
            return resp.error(f"ERR CLIENT {sub.decode('latin-1').upper()} is not supported by twinproxy: {refused}")
        return handler(request, session)

    def _client_setname(self, request: Request, session: Session) -> bytes:
        name = request.args[2]
        if not valid_client_name(name):
            return resp.error(BAD_NAME)
        session.client_name = name or None
        return OK

    def _client_getname(self, request: Request, session: Session) -> bytes:
        return resp.bulk(session.client_name, session.dialect)

    def _client_id(self, request: Request, session: Session) -> bytes:
        return resp.integer(session.client_id)

    def _client_setinfo(self, request: Request, session: Session) -> bytes:
        option = request.args[2]
        if option.lower() not in (b"lib-name", b"lib-ver"):
            return resp.error(f"ERR Unrecognized option '{option.decode('latin-1')}'")
        return OK

    def _on_or_off(self, request: Request, session: Session) -> bytes:
        """NO-EVICT and NO-TOUCH: the backends' eviction and LRU are theirs; accepted, as Redis does."""
        return OK if request.args[2].lower() in (b"on", b"off") else SYNTAX_ERROR

    def _client_getredir(self, request: Request, session: Session) -> bytes:
        return b":-1\r\n"   # no tracking (CLIENT TRACKING is refused)

    def _client_trackinginfo(self, request: Request, session: Session) -> bytes:
        flags = (b"~1" if session.dialect == 3 else b"*1") + b"\r\n$3\r\noff\r\n"   # a set in RESP3
        return resp.mapping([(resp.bulk(b"flags"), flags), (resp.bulk(b"redirect"), b":-1\r\n"),
                             (resp.bulk(b"prefixes"), b"*0\r\n")], session.dialect)

    def _client_help(self, request: Request, session: Session) -> bytes:
        return resp.array([resp.simple(line.encode()) for line in _CLIENT_HELP])

    def _client_reply(self, request: Request, session: Session) -> bytes:
        mode = _REPLY_MODES.get(request.args[2].lower())
        if mode is None:
            return SYNTAX_ERROR
        session.set_reply_mode(request, mode)
        return OK   # sent for ON only: the session mutes OFF's and SKIP's own reply, as Redis sends none

    def _client_info(self, request: Request, session: Session) -> bytes:
        return resp.verbatim(client_line(session, "client|info") + b"\n", session.dialect)

    def _client_list(self, request: Request, session: Session) -> bytes:
        args = request.args
        if len(args) == 4 and args[2].lower() == b"type":
            kind = args[3].lower()
            if kind not in _CLIENT_TYPES:
                return b"-ERR Unknown client type '%s'\r\n" % _one_line(args[3])
            chosen = [peer for peer in _in_order_of_id(session.peers()) if _client_type(peer) == kind]
        elif len(args) > 3 and args[2].lower() == b"id":
            by_id = {peer.client_id: peer for peer in session.peers()}
            chosen = []
            for text in args[3:]:
                wanted = long_long(text)
                if wanted is None:
                    return b"-ERR Invalid client ID\r\n"
                if wanted in by_id:
                    chosen.append(by_id[wanted])   # in the order asked, repeats and all, as Redis
        elif len(args) != 2:
            return SYNTAX_ERROR
        else:
            chosen = _in_order_of_id(session.peers())
        lines = [client_line(peer, "client|list" if peer is session else None) + b"\n" for peer in chosen]
        return resp.verbatim(b"".join(lines), session.dialect)

    def _client_kill(self, request: Request, session: Session) -> bytes:
        """CLIENT KILL, on the clients of this pool in this process; the caller is closed after its reply."""
        args = request.args
        filters: Dict[bytes, bytes] = {}
        wanted_id = 0
        skip_me = True
        if len(args) == 3:
            filters[b"addr"] = args[2]   # the old form, which may kill the caller itself
            skip_me = False
        else:
            i = 2
            while i < len(args):
                option = args[i].lower()
                if i + 1 >= len(args):
                    return SYNTAX_ERROR
                value = args[i + 1]
                if option == b"id":
                    wanted_id = long_long(value) or 0
                    if wanted_id <= 0:
                        return b"-ERR client-id should be greater than 0\r\n"
                elif option == b"type":
                    if value.lower() not in _CLIENT_TYPES:
                        return b"-ERR Unknown client type '%s'\r\n" % _one_line(value)
                    filters[option] = value.lower()
                elif option in (b"addr", b"laddr"):
                    filters[option] = value
                elif option == b"user":
                    if value != b"default":   # twinproxy's clients are all the default user
                        return b"-ERR No such user '%s'\r\n" % _one_line(value)
                elif option == b"skipme":
                    if value.lower() not in (b"yes", b"no"):
                        return SYNTAX_ERROR
                    skip_me = value.lower() == b"yes"
                else:
                    return SYNTAX_ERROR
                i += 2
        killed = 0
        for peer in _in_order_of_id(session.peers()):
            if wanted_id and peer.client_id != wanted_id:
                continue
            if b"type" in filters and _client_type(peer) != filters[b"type"]:
                continue
            if b"addr" in filters or b"laddr" in filters:
                address, local, _ = peer.addresses()
                if filters.get(b"addr", address.encode()) != address.encode():
                    continue
                if filters.get(b"laddr", local.encode()) != local.encode():
                    continue
            if peer is session:
                if skip_me:
                    continue
                request.close_after = True
            else:
                peer.kill()
            killed += 1
        if len(args) == 3:
            return OK if killed else b"-ERR No such client\r\n"
        return resp.integer(killed)

    # -- the rest of the connection's commands ----------------------------------

    def reset(self, request: Request, session: Session) -> bytes:
        if len(request.args) != 1:
            return wrong_arity(b"reset")
        session.reset(request)
        return RESET_REPLY

    def role(self, request: Request, session: Session) -> bytes:
        if len(request.args) != 1:
            return wrong_arity(b"role")
        return _ROLE

    def readonly(self, request: Request, session: Session) -> bytes:
        """READONLY/READWRITE: a cluster replica's commands; twinproxy presents a standalone server."""
        if len(request.args) != 1:
            return wrong_arity(request.args[0].lower())
        return _NOT_A_CLUSTER

    def getkeys(self, request: Request, session: Session) -> Optional[bytes]:
        """COMMAND GETKEYS from twinproxy's own key extraction (the keys it routes by).

        GETKEYSANDFLAGS, once that extraction finds the keys, is for a
        server to answer (None): its per-key flags are Redis's, from key
        specs and key procedures alike, and any server gives the same.
        """
        args = request.args
        sub = args[1].lower()
        if len(args) < 4:
            return wrong_arity(b"command|" + sub)
        target = args[2:]
        positions, error = self._command_keys(target)
        if error is not None:
            return error
        if sub == b"getkeys":
            return resp.array([resp.bulk(target[position]) for position in positions])
        if not positions:
            return b"*0\r\n"
        return None


def client_line(session: Session, command: Optional[str] = None) -> bytes:
    """``session`` as a line of Redis 7.0's CLIENT LIST (no newline); ``command`` for the caller's own."""
    address, local, unix = session.addresses()
    fd, age, idle, unread = session.facts()
    flags = ""
    if session.subscriptions or session.pattern_subscriptions or session.shard_subscriptions:
        flags += "P"
    transaction = session.transaction
    multi = len(transaction.commands) if transaction is not None else -1
    if transaction is not None:
        flags += "x"
    if getattr(session, "blocked", False):   # waiting for a blocking command's reply (twinproxy.blocking)
        flags += "b"
    if unix:
        flags += "U"
    head = f"id={session.client_id} addr={address} laddr={local} fd={fd} name="
    tail = (f" age={age} idle={idle} flags={flags or 'N'} db={session.db} sub={session.subscriptions} "
            f"psub={session.pattern_subscriptions} ssub={session.shard_subscriptions} multi={multi} "
            f"qbuf=0 qbuf-free=0 argv-mem=0 multi-mem=0 rbs=0 rbp=0 obl=0 oll=0 omem={unread} tot-mem={unread} "
            f"events=r cmd={command or session.last_command} user=default redir=-1 resp={session.dialect}")
    return head.encode("utf-8", "replace") + (session.client_name or b"") + tail.encode("utf-8", "replace")


def _client_type(session: Session) -> bytes:
    subscribed = session.subscriptions or session.pattern_subscriptions or session.shard_subscriptions
    return b"pubsub" if subscribed else b"normal"


def _in_order_of_id(sessions: Any) -> List[Any]:
    return sorted(sessions, key=lambda session: session.client_id)


def _one_line(text: bytes) -> bytes:
    return text.replace(b"\r", b" ").replace(b"\n", b" ")
