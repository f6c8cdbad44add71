"""The Redis codec: which commands route where, which the proxy answers, and merges.

Owns: the command table (built from :mod:`~twinproxy.protocols.redis_specs`:
where each command's keys are; here, how a multi-key command is split or
checked), the commands twinproxy answers
itself (PING, ECHO, QUIT, AUTH, SELECT, HELLO, CLIENT housekeeping,
COMMAND DOCS), the AUTH gate (Redis's own answers to a client that has not
authenticated, hence Redis's arity table), the merge of split replies (MGET,
MSET, DEL/UNLINK/EXISTS/TOUCH), error texts, and the per-connection backend
handshake.  Never touches the pool, a socket or the reactor: routing comes
in as a :class:`~twinproxy.protocols.Router`.

RESP3 clients get their own backend connections (opened with ``HELLO 3``),
so replies pass through unchanged in either protocol; only what the proxy
writes itself, or merges, is encoded here per dialect.
"""

from __future__ import annotations

import hmac
from typing import Any, Dict, List, Optional, Tuple

from twinproxy import __version__
from twinproxy.config import PoolConfig
from twinproxy.protocols import ProtocolError, Router, Session, group_by_server, redis_pubsub, resp
from twinproxy.protocols.redis_pubsub import FANOUT, SUBSCRIBED, SUBSCRIBED_ALLOWED
from twinproxy.protocols.redis_specs import (
    ALL_KEYS,
    ARITY,
    BLOCKING,
    KEY_SECOND,
    LOCAL_COMMAND,
    NUMKEYS,
    NUMKEYS_AFTER_DESTINATION,
    NUMKEYS_AT_1,
    NUMKEYS_AT_2,
    PUBSUB,
    REJECTED,
    SAME_SERVER,
    SERVER_ADMIN,
    SINGLE,
    SINGLE_KEY,
    SPLIT,
    STORE_OPTIONS,
    SUBCOMMAND_ARITY,
    TRANSACTIONS,
    TWO_KEYS,
    WHOLE_KEYSPACE,
    CommandSpec,
    arities,
    stored_keys,
    words,
)
from twinproxy.request import FORWARD, FRAGMENT, LOCAL, Request

WRONG_PASSWORD = "WRONGPASS invalid username-password pair or user is disabled."
NOAUTH = "NOAUTH Authentication required."
_NOAUTH_REPLY = resp.error(NOAUTH)
# Redis 7.0's text; 7.2 reworded it ("HELLO <proto> AUTH ...").
_HELLO_NOAUTH = ("NOAUTH HELLO must be called with the client already authenticated, otherwise the "
                 "HELLO AUTH <user> <pass> option can be used to authenticate the client and select "
                 "the RESP protocol version at the same time")
# The commands Redis flags ``no_auth``: served before AUTH.  RESET is one;
# twinproxy refuses it, and refuses it the same before AUTH.
_BEFORE_AUTH = frozenset((b"auth", b"hello", b"quit", b"reset"))

def cross_slot_error(keys: List[bytes], slot_of: Any) -> Optional[str]:
    """The CROSSSLOT error for ``keys`` in more than one slot, naming the slots; None if they share one."""
    slots: Dict[int, bytes] = {}
    for key in keys:
        slots.setdefault(slot_of(key), key)
    if len(slots) == 1:
        return None
    shown = ", ".join(f"'{key.decode('utf-8', 'replace')[:40]}' in slot {slot}" for slot, key in slots.items())
    return f"CROSSSLOT keys in request don't hash to the same slot ({shown}); use a {{tag}} to keep them together"


def _wrong_arity(name: bytes) -> bytes:
    return resp.error(f"ERR wrong number of arguments for '{name.decode('latin-1')}' command")


def _unknown_subcommand(args: List[bytes]) -> bytes:
    # Redis echoes the client's bytes (at most 128), with CR and LF blanked.
    shown = args[1][:128].replace(b"\r", b" ").replace(b"\n", b" ")
    return b"-ERR unknown subcommand '%s'. Try %s HELP.\r\n" % (shown, args[0].upper())


def _long_long(text: bytes) -> Optional[int]:
    """``text`` as Redis's string2ll reads it: no sign but '-', no leading zero, 64-bit; else None."""
    digits = text[1:] if text[:1] == b"-" else text
    if text == b"0":
        return 0
    if not digits.isdigit() or digits[:1] == b"0":
        return None
    value = int(text)
    if not -(1 << 63) <= value < (1 << 63):
        return None
    return value


class RedisCodec:
    """Codec for pools with ``redis: true``; one instance per pool."""

    default_dialect = 2
    error_starts = frozenset((b"-", b"!"))   # every reply starting so is an error (is_error says no more)
    error_start_width = 1

    def __init__(self, config: PoolConfig) -> None:
        self._config = config
        self._password = config.redis_auth.encode() if config.redis_auth else None
        self.commands: Dict[bytes, CommandSpec] = self._command_table()

    # -- the command table ---------------------------------------------------

    def _command_table(self) -> Dict[bytes, CommandSpec]:
        table: Dict[bytes, CommandSpec] = {}

        def add(names: str, *args: Any, **kwargs: Any) -> None:
            for name in words(names):
                table[name] = CommandSpec(name, *args, **kwargs)

        add(SINGLE_KEY, SINGLE)
        add(KEY_SECOND, SINGLE, first=2, last=2)
        add(TWO_KEYS, SAME_SERVER, first=1, last=2)
        add(ALL_KEYS, SAME_SERVER, first=1, last=-1)
        add("bitop", SAME_SERVER, first=2, last=-1)
        for name, options in STORE_OPTIONS.items():
            add(name, SAME_SERVER, first=1, last=1, options=options)
        add("msetnx", SAME_SERVER, first=1, last=-1, step=2)
        add(NUMKEYS_AT_1, NUMKEYS, first=1)
        add(NUMKEYS_AT_2, NUMKEYS, first=2)
        add(NUMKEYS_AFTER_DESTINATION, NUMKEYS, first=2, destination=1)
        add("mget", SPLIT, first=1, last=-1, merge="array")
        add("mset", SPLIT, first=1, last=-1, step=2, merge="ok")
        add("del unlink exists touch", SPLIT, first=1, last=-1, merge="sum")
        for name, handler in (
            ("ping", self._ping), ("echo", self._echo), ("quit", self._quit),
            ("auth", self._auth), ("select", self._select), ("hello", self._hello),
            ("client", self._client), ("command", self._command),
        ):
            add(name, LOCAL_COMMAND, handler=handler)
        # Pub/sub: the handler classifies (forward by channel, fan out, or the client's session).
        add(PUBSUB, LOCAL_COMMAND, handler=self._pubsub)
        add(BLOCKING, REJECTED, reason="blocking commands would stall a backend connection shared by many clients")
        add(TRANSACTIONS, REJECTED, reason="transactions cannot span a sharded pool")
        add(WHOLE_KEYSPACE, REJECTED, reason="it needs the whole keyspace, which is spread over many servers")
        add(SERVER_ADMIN, REJECTED, reason="it is a server administration command; ask the backends directly")
        for name, arity in arities(ARITY).items():
            table[name].arity = arity
        for container, text in SUBCOMMAND_ARITY.items():
            table[container.encode()].subcommands = arities(text)
        return table

    # -- the Codec interface -------------------------------------------------

    def request_parser(self) -> resp.RespRequestParser:
        return resp.RespRequestParser(max_request=self._config.max_request_bytes)

    def reply_framer(self) -> resp.RespReplyFramer:
        return resp.RespReplyFramer()

    def error_reply(self, message: str, code: str = "ERR") -> bytes:
        return resp.error(f"{code} {message}")

    def protocol_error_reply(self, err: ProtocolError) -> bytes:
        return resp.error("ERR " + str(err))

    def is_error(self, reply: bytes) -> bool:
        return reply[:1] == b"-" or reply[:1] == b"!"

    def handshake(self, dialect: int) -> List[bytes]:
        """The commands that open every backend connection of ``dialect``."""
        commands = []
        if self._password is not None:
            commands.append(resp.encode_command([b"AUTH", self._password]))
        if dialect == 3:
            commands.append(resp.encode_command([b"HELLO", b"3"]))
        if self._config.redis_db:
            commands.append(resp.encode_command([b"SELECT", str(self._config.redis_db).encode()]))
        return commands

    def prepare(self, request: Request, session: Session) -> None:
        """Classify ``request``; answer it here if it is local, rejected or malformed."""
        args = request.args
        name = args[0].lower()
        spec = self.commands.get(name)
        if spec is not None:
            request.name = spec.label
        if not session.authenticated and spec is not None:
            refusal = self._auth_gate(args, name, spec)
            if refusal is not None:
                self._answer(request, refusal)
                return
        if spec is None:
            shown = args[0].decode("latin-1")
            self._answer(request, resp.error(f"ERR unknown or unsupported command '{shown}'"))
            return
        if session.mode is not None:   # the one check plain commands pay for session modes
            refusal = self._mode_gate(args, name, spec, session)
            if refusal is not None:
                self._answer(request, refusal)
                return
        request.command = spec
        layout = spec.layout
        if layout is SINGLE:
            if len(args) <= spec.first:
                self._answer(request, _wrong_arity(name))
                return
            request.key = args[spec.first]
            request.kind = FORWARD
        elif layout is LOCAL_COMMAND:
            request.kind = LOCAL
            request.reply = spec.handler(request, session)
        elif layout is REJECTED:
            shown = name.decode("latin-1").upper()
            self._answer(request, resp.error(f"ERR command '{shown}' is not supported by twinproxy: {spec.reason}"))
        elif len(args) <= spec.first:
            self._answer(request, _wrong_arity(name))
        else:
            request.kind = FRAGMENT

    def fragment(self, request: Request, router: Router) -> List[Tuple[Any, Request]]:
        """Route a multi-key request: one sub-request per server, or the request itself.

        Returns ``[(server, request)]`` when every key lives on one server
        (the request goes unchanged), several ``(server, fragment)`` pairs
        for a split command, or ``[]`` after answering the request with an
        error (keys spread over servers where that is not allowed).
        """
        spec = request.command
        if spec.layout is FANOUT:
            return redis_pubsub.fanout_routes(request, router)
        positions = self._key_positions(request, spec)
        if positions is None:
            return []
        args = request.args
        keys = [args[position] for position in positions]
        if spec.layout is not SPLIT and getattr(router, "slot_of", None) is not None and len(keys) > 1:
            # A cluster: keys that must be on one node must be in one slot (a slot
            # moves alone), not merely on one server today.
            crossed = cross_slot_error(keys, router.slot_of)
            if crossed is not None:
                self._answer(request, resp.error(crossed))
                return []
        servers = router.servers_for_keys(keys)
        first = servers[0]
        if servers.count(first) == len(servers):
            request.kind = FORWARD
            request.key = args[positions[0]]
            request.positions = positions   # every key it touches (a migrating slot moves them all first)
            return [(first, request)]
        if spec.layout is not SPLIT:
            self._answer(request, resp.error(
                "ERR keys in request don't hash to the same server (use a hash tag to keep them together)"))
            return []
        groups = group_by_server(positions, servers)
        width = spec.step
        fragments = []
        for server, key_positions in groups.items():
            fragment = Request(resp.encode_fragment(args, key_positions, width))
            fragment.positions = key_positions
            fragment.command = spec
            fragments.append((server, fragment))
        return fragments

    def coalesce(self, request: Request) -> bytes:
        """Merge the fragments' replies into the one reply a single Redis would give."""
        fragments = request.fragments
        for fragment in fragments:
            if self.is_error(fragment.reply):
                return fragment.reply
        merge = request.command.merge
        if merge == "ok":
            return b"+OK\r\n"
        if merge == "sum":
            total = 0
            for fragment in fragments:
                reply = fragment.reply
                if reply[:1] != b":":
                    return self.error_reply("unexpected reply from server: " + reply[:60].decode("latin-1"))
                total += int(reply[1:-2])
            return resp.integer(total)
        if merge != "array":
            return redis_pubsub.merge_fanout(request)
        # Key positions are argument indexes from 1 up, each in one fragment.
        merged: List[bytes] = [b""] * (len(request.args) + 1)
        count = 0
        for fragment in fragments:
            elements = resp.split_bulk_array(fragment.reply)
            if elements is None:
                try:
                    _, elements = resp.split_aggregate(fragment.reply)
                except (ProtocolError, ValueError):
                    elements = []
            positions = fragment.positions
            if len(elements) != len(positions):
                return self.error_reply("unexpected reply from server: " + fragment.reply[:60].decode("latin-1"))
            for position, element in zip(positions, elements):
                merged[position] = element
            count += len(positions)
        return b"*%d\r\n" % count + b"".join(merged)

    # -- helpers -------------------------------------------------------------

    def _answer(self, request: Request, reply: bytes) -> None:
        request.kind = LOCAL
        request.reply = reply

    def _auth_gate(self, args: List[bytes], name: bytes, spec: CommandSpec) -> Optional[bytes]:
        """What Redis answers a known command from a client that has not authenticated.

        None lets the command through (AUTH, HELLO, QUIT, RESET).  Redis's
        processCommand order: an unknown subcommand, then the argument
        count, and only then NOAUTH.  A command outside the table is not
        gated: it gets the same unknown-command error as after AUTH, as
        Redis answers unknown commands before its gate.
        """
        refusal = self._arity_refusal(args, name, spec)
        if refusal is not None:
            return refusal
        if name in _BEFORE_AUTH:
            return None
        return _NOAUTH_REPLY

    def _mode_gate(self, args: List[bytes], name: bytes, spec: CommandSpec, session: Session) -> Optional[bytes]:
        """What a session in a mode refuses (RESP2 subscribed mode), in Redis's order:
        an unknown subcommand and the argument count first, then the mode's rule.

        MULTI (another family's) would be a mode too, behind the same one check in ``prepare``.
        """
        if session.mode is SUBSCRIBED and session.dialect == 2 and name not in SUBSCRIBED_ALLOWED:
            return self._arity_refusal(args, name, spec) or redis_pubsub.subscribed_refusal(args)
        return None

    def _arity_refusal(self, args: List[bytes], name: bytes, spec: CommandSpec) -> Optional[bytes]:
        """Redis's error for an unknown subcommand or a wrong argument count (COMMAND INFO's arity); else None."""
        arity = spec.arity
        label = name
        subcommands = spec.subcommands
        if subcommands is not None and len(args) > 1:
            sub = args[1].lower()
            sub_arity = subcommands.get(sub)
            if sub_arity is None:
                return _unknown_subcommand(args)
            arity = sub_arity
            label = name + b"|" + sub
        count = len(args)
        if (count != arity) if arity > 0 else (count < -arity):
            return _wrong_arity(label)
        return None

    def _key_positions(self, request: Request, spec: CommandSpec) -> Optional[List[int]]:
        args = request.args
        if spec.layout is NUMKEYS:
            count_text = args[spec.first]
            if not count_text.lstrip(b"-").isdigit():
                self._answer(request, resp.error("ERR value is not an integer or out of range"))
                return None
            count = int(count_text)
            if count < 0:
                self._answer(request, resp.error("ERR Number of keys can't be negative"))
                return None
            if count > len(args) - spec.first - 1:
                self._answer(request, resp.error("ERR Number of keys can't be greater than number of args"))
                return None
            if count == 0:
                shown = args[0].decode("latin-1").upper()
                self._answer(request, resp.error(
                    f"ERR {shown} with no keys cannot be routed by twinproxy: pass the keys it uses (numkeys >= 1)"))
                return None
            positions = list(range(spec.first + 1, spec.first + 1 + count))
            if spec.destination:
                positions.insert(0, spec.destination)
            return positions
        last = len(args) - 1 if spec.last < 0 else spec.last
        if last >= len(args) or (spec.step > 1 and (len(args) - spec.first) % spec.step):
            self._answer(request, _wrong_arity(args[0].lower()))
            return None
        positions = list(range(spec.first, last + 1, spec.step))
        if spec.options is not None:
            positions += stored_keys(args, *spec.options)
        return positions

    # -- commands answered by the proxy --------------------------------------

    def _ping(self, request: Request, session: Session) -> bytes:
        args = request.args
        if session.mode is SUBSCRIBED and session.dialect == 2 and len(args) <= 2:
            return redis_pubsub.subscribed_pong(args)
        if len(args) == 1:
            return b"+PONG\r\n"
        if len(args) == 2:
            return resp.bulk(args[1])
        return _wrong_arity(b"ping")

    def _pubsub(self, request: Request, session: Session) -> Optional[bytes]:
        """SUBSCRIBE and its kin, PUBLISH, SPUBLISH, PUBSUB: Redis's argument checks, then classified."""
        args = request.args
        name = args[0].lower()
        refusal = self._arity_refusal(args, name, self.commands[name])
        if refusal is not None:
            return refusal
        return redis_pubsub.classify(request, name)

    def _echo(self, request: Request, session: Session) -> bytes:
        if len(request.args) != 2:
            return _wrong_arity(b"echo")
        return resp.bulk(request.args[1])

    def _quit(self, request: Request, session: Session) -> bytes:
        request.close_after = True
        return b"+OK\r\n"

    def _check_password(self, user: Optional[bytes], password: bytes) -> bool:
        if user is not None and user != b"default":
            return False
        if self._password is None:
            return True
        return hmac.compare_digest(password, self._password)

    def _auth(self, request: Request, session: Session) -> bytes:
        args = request.args
        if len(args) < 2:
            return _wrong_arity(b"auth")
        if len(args) > 3:
            return b"-ERR syntax error\r\n"
        if len(args) == 2 and self._password is None:
            return resp.error("ERR AUTH <password> called without any password configured for the "
                              "default user. Are you sure your configuration is correct?")
        user = args[1] if len(args) == 3 else None
        if not self._check_password(user, args[-1]):
            return resp.error(WRONG_PASSWORD)
        session.authenticated = True
        return b"+OK\r\n"

    def _select(self, request: Request, session: Session) -> bytes:
        args = request.args
        if len(args) != 2:
            return _wrong_arity(b"select")
        index = _long_long(args[1])
        if index is None:
            return resp.error("ERR value is not an integer or out of range")
        if index != 0:
            return resp.error("ERR SELECT is not allowed by twinproxy: clients see database 0 only "
                              "(the pool's redis_db picks the backend database)")
        return b"+OK\r\n"

    def _hello(self, request: Request, session: Session) -> bytes:
        args = request.args
        dialect = session.dialect
        name = None
        if len(args) >= 2:
            version = _long_long(args[1])
            if version is None:
                return resp.error("ERR Protocol version is not an integer or out of range")
            if version not in (2, 3):
                return resp.error("NOPROTO unsupported protocol version")
            dialect = version
            i = 2
            while i < len(args):
                option = args[i].lower()
                if option == b"auth" and i + 2 < len(args):
                    if not self._check_password(args[i + 1], args[i + 2]):
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
        session.dialect = dialect
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

    def _client(self, request: Request, session: Session) -> bytes:
        args = request.args
        if len(args) < 2:
            return _wrong_arity(b"client")
        sub = args[1].lower()
        if sub == b"setname" and len(args) == 3:
            if not _valid_client_name(args[2]):
                return resp.error(_BAD_NAME)
            session.client_name = args[2] or None
            return b"+OK\r\n"
        if sub == b"getname" and len(args) == 2:
            return resp.bulk(session.client_name, session.dialect)
        if sub == b"id" and len(args) == 2:
            return resp.integer(session.client_id)
        if sub == b"setinfo" and len(args) == 4:
            if args[2].lower() not in (b"lib-name", b"lib-ver"):
                return resp.error(f"ERR Unrecognized option '{args[2].decode('latin-1')}'")
            return b"+OK\r\n"
        if sub in (b"setname", b"getname", b"id", b"setinfo"):
            return resp.error(f"ERR wrong number of arguments for 'client|{sub.decode('latin-1')}' command")
        return resp.error(f"ERR CLIENT {args[1].decode('latin-1').upper()} is not supported by twinproxy "
                          "(supported: SETNAME, GETNAME, SETINFO, ID)")

    def _command(self, request: Request, session: Session) -> bytes:
        args = request.args
        # redis-cli asks for COMMAND DOCS to show hints; an empty answer is
        # what a server with no documentation gives, and costs the cli nothing.
        if len(args) >= 2 and args[1].lower() == b"docs":
            return resp.mapping([], session.dialect)
        if len(args) == 2 and args[1].lower() == b"count":
            return resp.integer(len(self.commands))
        return resp.error("ERR COMMAND is not supported by twinproxy except COMMAND DOCS and COMMAND COUNT")


_BAD_NAME = "ERR Client names cannot contain spaces, newlines or special characters."


def _valid_client_name(name: bytes) -> bool:
    return all(33 <= byte <= 126 for byte in name)
