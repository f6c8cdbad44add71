"""The Redis codec: which commands route where, which the proxy answers, and merges.

Owns: the command table (built from :mod:`~twinproxy.protocols.redis_specs`:
what twinproxy does with each command, with where its keys are from Redis's
generated key specs; here, how a multi-key command is split or checked),
the commands twinproxy answers
itself (PING, ECHO, QUIT, AUTH, HELLO here; SELECT, MOVE's database,
CLIENT, RESET, ROLE, READONLY and COMMAND GETKEYS in
:mod:`~twinproxy.protocols.redis_connection`), the one entry to its key
extraction besides routing (:meth:`RedisCodec.command_keys`), the AUTH
gate (Redis's own answers to a client that has not authenticated, hence
Redis's arity table), the merge of split replies (MGET,
MSET, DEL/UNLINK/EXISTS/TOUCH), error texts, and the per-connection backend
handshake.  The commands sent to every server, or to one chosen server
(INFO, SCAN, KEYS, SCRIPT, CONFIG GET, ...), are FANOUT commands: their
planners and merges are in :mod:`~twinproxy.protocols.redis_fanout` and
the family modules it names.  Never touches the pool, a socket or the
reactor: routing comes in as a :class:`~twinproxy.protocols.Router`.

RESP3 clients get their own backend connections (opened with ``HELLO 3``),
and so does each database a client SELECTs (opened with ``SELECT
redis_db + n``): a backend connection serves one profile
(:func:`~twinproxy.request.profile_of`), so replies pass through unchanged
in either protocol; only what the proxy writes itself, or merges, is
encoded here per dialect.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from twinproxy.config import PoolConfig
from twinproxy.credentials import pool_credentials
from twinproxy.protocols import (
    ProtocolError,
    Router,
    Session,
    group_by_server,
    redis_fanout,
    redis_pubsub,
    redis_scripts,
    resp,
)
from twinproxy.protocols.redis_blocking import prepare_blocking
from twinproxy.protocols.redis_connection import RESET_REPLY, ConnectionCommands
from twinproxy.protocols.redis_fanout_commands import FanoutCommands
from twinproxy.protocols.redis_keys import (
    BadInvocation,
    unknown_command,
    unknown_subcommand,
    wrong_arity,
    xread_blocks,
)
from twinproxy.protocols.redis_login import NOAUTH_REPLY as _NOAUTH_REPLY
from twinproxy.protocols.redis_login import LoginCommands
from twinproxy.protocols.redis_pubsub import SUBSCRIBED, SUBSCRIBED_ALLOWED
from twinproxy.protocols.redis_specs import (
    ALL_KEYS,
    ARITY,
    BLOCKING,
    BLOCKING_COMMAND,
    FANOUT,
    INTERNAL,
    KEY_SECOND,
    KEYLESS,
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
    STREAM_READS,
    SUBCOMMAND,
    SUBCOMMAND_ARITY,
    TRANSACTION,
    TWO_KEYS,
    WAITS,
    WAITS_REASON,
    WATCHING,
    WHOLE_KEYSPACE,
    CommandSpec,
    arities,
    stored_keys,
    words,
)
from twinproxy.protocols.redis_tx import Transactions
from twinproxy.request import FORWARD, FRAGMENT, LOCAL, Request, profile_db, profile_dialect

# The commands Redis flags ``no_auth``: served before AUTH.
_BEFORE_AUTH = frozenset((b"auth", b"hello", b"quit", b"reset"))
# Answered by a handler that then sends them by their key (COMMAND GETKEYS lists it).
_LOCAL_WITH_KEY = frozenset((b"move",))
# COMMAND GETKEYS's own errors (Redis 7.0's commandGetKeys).
_GETKEYS_UNKNOWN = b"-ERR Invalid command specified\r\n"
_GETKEYS_NO_KEYS = b"-ERR The command has no key arguments\r\n"
_GETKEYS_ARITY = b"-ERR Invalid number of arguments specified for command\r\n"
_GETKEYS_INVALID = b"-ERR Invalid arguments specified for command\r\n"

def cross_slot_error(keys: List[bytes], slot_of: Any) -> Optional[str]:
    """The CROSSSLOT error for ``keys`` in more than one slot, naming the slots; None if they share one."""
    slots: Dict[int, bytes] = {}
    for key in keys:
        slots.setdefault(slot_of(key), key)
    if len(slots) == 1:
        return None
    shown = ", ".join(f"'{key.decode('utf-8', 'replace')[:40]}' in slot {slot}" for slot, key in slots.items())
    return f"CROSSSLOT keys in request don't hash to the same slot ({shown}); use a {{tag}} to keep them together"


def _error(message: bytes) -> bytes:
    """An error reply of a message from :mod:`~twinproxy.protocols.redis_keys` (one line already)."""
    return b"-" + message + b"\r\n"


def _wrong_arity(name: bytes) -> bytes:
    return _error(wrong_arity(name.decode("latin-1")))


def _refusal(shown: str, reason: str) -> bytes:
    return resp.error(f"ERR command '{shown}' is not supported by twinproxy: {reason}")


def arity_error(args: List[bytes], name: bytes, spec: CommandSpec) -> Optional[bytes]:
    """Redis's answer to a wrong argument count or an unknown subcommand (its order); None if neither."""
    arity = spec.arity
    label = name
    subcommands = spec.subcommands
    if subcommands is not None and len(args) > 1:
        sub = args[1].lower()
        sub_arity = subcommands.get(sub)
        if sub_arity is None:
            return _error(unknown_subcommand(args))
        arity = sub_arity
        label = name + b"|" + sub
    count = len(args)
    if (count != arity) if arity > 0 else (count < -arity):
        return _wrong_arity(label)
    return None


class RedisCodec:
    """Codec for pools with ``redis: true``; one instance per pool."""

    default_dialect = 2
    error_starts = frozenset((b"-", b"!"))   # every reply starting so is an error (is_error says no more)
    error_start_width = 1

    def __init__(self, config: PoolConfig) -> None:
        self._config = config
        self._credentials = pool_credentials(config)
        self._login = LoginCommands(self._credentials, self.mode_changed)
        self._transactions = Transactions(self, CommandSpec(b"exec", TRANSACTION), arity_error, self.merge_parts,
                                          config.redis_cross_server_transactions)
        self.connection = ConnectionCommands(config, self.command_keys, arity_error)
        self.commands: Dict[bytes, CommandSpec] = self._command_table()

    # -- the command table ---------------------------------------------------

    def _command_table(self) -> Dict[bytes, CommandSpec]:
        table: Dict[bytes, CommandSpec] = {}

        def add(names: str, *args: Any, **kwargs: Any) -> None:
            for name in words(names):
                table[name] = CommandSpec(name, *args, **kwargs)

        # Where the keys are comes from Redis's key specs (redis_keys.TABLE);
        # first/last/step here count only for a command newer than that table.
        add(SINGLE_KEY, SINGLE)
        add(KEY_SECOND, SUBCOMMAND)
        add(TWO_KEYS, SAME_SERVER)
        add(ALL_KEYS, SAME_SERVER)
        add("bitop", SAME_SERVER)
        for name, options in STORE_OPTIONS.items():
            add(name, SAME_SERVER, options=options)
        add("msetnx", SAME_SERVER)
        add(NUMKEYS_AT_1, NUMKEYS)
        add(NUMKEYS_AT_2, NUMKEYS)
        add(NUMKEYS_AFTER_DESTINATION, NUMKEYS)
        add(BLOCKING, BLOCKING_COMMAND)
        add(STREAM_READS, BLOCKING_COMMAND, blocks=xread_blocks)
        add("mget", SPLIT, merge="array")
        add("mset", SPLIT, merge="ok")
        add("del unlink exists touch", SPLIT, merge="sum")
        connection = self.connection
        for name, handler in (
            ("ping", self._ping), ("echo", self._echo), ("quit", self._quit),
            ("auth", self._login.auth), ("hello", self._login.hello), ("reset", self._reset),
            ("select", connection.select), ("move", connection.move), ("client", connection.client),
            ("role", connection.role), ("readonly", connection.readonly), ("readwrite", connection.readonly),
        ):
            add(name, LOCAL_COMMAND, handler=handler)
        transactions = self._transactions
        for name, handler in (("multi", transactions.multi), ("exec", transactions.exec_without_multi),
                              ("discard", transactions.discard_without_multi)):
            add(name, LOCAL_COMMAND, handler=handler)
        for name, planner in FanoutCommands(connection.getkeys).planners().items():
            add(name, FANOUT, first=0, handler=planner)
        for name in redis_scripts.SCRIPT_CALLS:
            table[name.encode()].handler = redis_scripts.routed
        add(WAITS, REJECTED, reason=WAITS_REASON)
        add("watch unwatch", WATCHING)
        # Pub/sub: SUBSCRIBE and its kin for the client's session, PUBLISH by channel, PUBSUB fanned out.
        add(PUBSUB, LOCAL_COMMAND, handler=self._pubsub)
        add("pubsub", FANOUT, first=0, handler=self._plan_pubsub)
        add(WHOLE_KEYSPACE, REJECTED, reason="it needs the whole keyspace, which is spread over many servers")
        add("swapdb", REJECTED, reason="each server would swap its databases on its own: it cannot be atomic "
                                       "across the pool's servers")
        add(SERVER_ADMIN, REJECTED, reason="it is a server administration command; ask the backends directly")
        add(INTERNAL, REJECTED, reason="it is Redis's internal or debugging command")
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

    def handshake(self, profile: int) -> List[bytes]:
        """The commands that open every backend connection of ``profile`` (its dialect and database).

        A client's database n is the backends' ``redis_db`` + n: database 0,
        all a client that never SELECTs uses, is ``redis_db`` as in nutcracker.
        """
        commands = []
        if self._credentials is not None:
            commands.append(resp.encode_command(self._credentials.auth_arguments()))
        if profile_dialect(profile) == 3:
            commands.append(resp.encode_command([b"HELLO", b"3"]))
        db = self._config.redis_db + profile_db(profile)
        if db:
            commands.append(resp.encode_command([b"SELECT", b"%d" % db]))
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
            self._answer(request, _error(unknown_command(args)))
            return
        request.command = spec
        layout = spec.layout
        if layout is SINGLE:
            if len(args) <= spec.first:
                self._answer(request, _wrong_arity(name))
                return
            request.key = args[spec.first]
            request.kind = FORWARD
        elif layout is SPLIT:         # MGET, MSET, DEL...: asked right after SINGLE, they are as common
            request.kind = FRAGMENT
        elif layout is LOCAL_COMMAND:
            request.kind = LOCAL
            request.reply = spec.handler(request, session)
        elif layout is REJECTED:
            self._answer(request, _refusal(name.decode("latin-1").upper(), spec.reason))
        elif layout is SUBCOMMAND:
            self._prepare_subcommand(request, spec)
        elif layout is BLOCKING_COMMAND:
            prepare_blocking(request, name, spec)
        else:
            request.kind = FRAGMENT   # the key specs are read when it is routed

    def prepare_subscribed(self, request: Request, session: Session) -> None:
        """``prepare`` for a RESP2 client in subscribed mode: Redis's own checks, then its rule, then as usual.

        Swapped in by :meth:`mode_changed`, so clients that subscribe to
        nothing pay nothing for the rule.
        """
        args = request.args
        name = args[0].lower()
        if name not in SUBSCRIBED_ALLOWED:
            spec = self.commands.get(name)
            if spec is not None:   # an unknown command gets Redis's unknown-command error, as in Redis
                request.name = spec.label
                self._answer(request, arity_error(args, name, spec) or redis_pubsub.subscribed_refusal(args))
                return
        self.prepare(request, session)

    def mode_changed(self, session: Session) -> None:
        """The session subscribed, unsubscribed from its last, or changed RESP version: choose its ``prepare``.

        Inside MULTI the transaction's ``prepare`` stays (it refuses pub/sub
        commands and HELLO, so the mode cannot change there).
        """
        if session.transaction is not None:
            return
        restricted = session.mode is SUBSCRIBED and session.dialect == 2
        session.prepare = self.prepare_subscribed if restricted else self.prepare

    def _prepare_subcommand(self, request: Request, container: CommandSpec) -> None:
        """A container's subcommand (OBJECT ENCODING k): classified by the subcommand's own spec."""
        args = request.args
        if len(args) < 2:
            self._answer(request, _wrong_arity(container.name))
            return
        spec = container.children.get(args[1].lower())
        if spec is None:
            self._answer(request, _error(unknown_subcommand(args)))
            return
        request.command = spec
        layout = spec.layout
        if layout is SINGLE:
            if len(args) <= spec.first:
                self._answer(request, _wrong_arity(spec.name))
                return
            request.key = args[spec.first]
            request.kind = FORWARD
        elif layout is REJECTED:
            shown = spec.label.upper().replace("|", " ")
            self._answer(request, _refusal(shown, spec.reason))
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
        layout = spec.layout
        if layout is not SPLIT:   # MGET, MSET, DEL... (the common case) pass one test
            if layout is FANOUT:
                return spec.handler(request, router)
            if layout is TRANSACTION:
                return self._transactions.route(request, router)
            if layout is WATCHING:
                return self._transactions.watch(request, router)
        positions = self._key_positions(request, spec)
        if positions is None:
            return []
        if not positions:
            return self._keyless(request, spec, router)
        args = request.args
        keys = [args[position] for position in positions]
        if layout is not SPLIT and getattr(router, "slot_of", None) is not None and len(keys) > 1:
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
            if spec.handler is not None:    # EVAL/EVALSHA: the script store sees the call
                spec.handler(request, first, router)
            return [(first, request)]
        if layout is not SPLIT:
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
        spec = request.command
        layout = spec.layout
        if layout is not SPLIT:   # MGET, MSET, DEL... (the common case) pass one test
            if layout is FANOUT:
                return redis_fanout.coalesce(request)
            if layout is TRANSACTION:
                return self._transactions.merge(request)
        return self.merge_parts(spec, len(request.args), request.fragments)

    def merge_parts(self, spec: CommandSpec, argument_count: int, parts: Sequence[Any]) -> bytes:
        """One reply from a split command's parts (its fragments, or a transaction's): each has
        ``positions``, the key positions it carried, and ``reply``; the first error is the reply.
        Read in place, with no pairs built: a split MGET's coalesce is on the hot path."""
        error_starts = self.error_starts
        for part in parts:
            reply = part.reply
            if reply[:1] in error_starts:
                return reply
        merge = spec.merge
        if merge == "ok":
            return b"+OK\r\n"
        if merge == "sum":
            return redis_fanout.sum_integer_replies([part.reply for part in parts])
        # Key positions are argument indexes from 1 up, each in one part.
        merged: List[bytes] = [b""] * (argument_count + 1)
        count = 0
        for part in parts:
            reply = part.reply
            positions = part.positions
            elements = resp.split_bulk_array(reply)
            if elements is None:
                try:
                    _, elements = resp.split_aggregate(reply)
                except (ProtocolError, ValueError):
                    elements = []
            if len(elements) != len(positions):
                return self.error_reply("unexpected reply from server: " + reply[:60].decode("latin-1"))
            for position, element in zip(positions, elements):
                merged[position] = element
            count += len(positions)
        return b"*%d\r\n" % count + b"".join(merged)

    # -- helpers -------------------------------------------------------------

    def key_positions(self, request: Request) -> Optional[List[int]]:
        """The argument indexes of a classified FRAGMENT request's keys; None after answering it with an error."""
        return self._key_positions(request, request.command)

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
        refusal = arity_error(args, name, spec)
        if refusal is not None:
            return refusal
        if name in _BEFORE_AUTH:
            return None
        return _NOAUTH_REPLY

    def command_keys(self, args: List[bytes]) -> Tuple[Optional[List[int]], Optional[bytes]]:
        """The positions in ``args`` of the keys twinproxy routes that command by, or COMMAND GETKEYS's error.

        COMMAND GETKEYS comes here, so it always agrees with the routing:
        the spec ``prepare`` classifies by, and ``_key_positions`` for what
        is routed at ``fragment``.  The checks run in Redis's order (its
        commandGetKeys): an unknown command, one without keys, a wrong
        argument count, keys that cannot be found.
        """
        name = args[0].lower()
        spec = self.commands.get(name)
        if spec is not None and spec.layout is SUBCOMMAND:
            spec = spec.children.get(args[1].lower()) if len(args) > 1 else None
        elif spec is not None and spec.subcommands is not None and len(args) > 1 \
                and args[1].lower() not in spec.subcommands:
            spec = None
        if spec is None:
            return None, _GETKEYS_UNKNOWN
        layout = spec.layout
        if layout is REJECTED:
            return None, _refusal(spec.label.upper().replace("|", " "), spec.reason)
        if layout is KEYLESS or layout is FANOUT or (layout is LOCAL_COMMAND and name not in _LOCAL_WITH_KEY):
            return None, _GETKEYS_NO_KEYS
        keys = spec.keys
        if (len(args) != keys.arity) if keys.arity > 0 else (len(args) < -keys.arity):
            return None, _GETKEYS_ARITY
        if layout is SINGLE or layout is LOCAL_COMMAND:
            return [spec.first], None
        positions = self._key_positions(Request(b"", args), spec)
        if positions is None:
            return ([], None) if keys.no_mandatory_keys else (None, _GETKEYS_INVALID)
        return positions, None

    def _key_positions(self, request: Request, spec: CommandSpec) -> Optional[List[int]]:
        """Where the keys of ``request`` are (Redis's key specs); None after answering it with Redis's error."""
        args = request.args
        keys = spec.keys
        span = keys.range
        try:
            if span is not None:
                # A plain range (MGET's 1..-1): what keys.positions finds, without its search.
                count = len(args)
                arity = keys.arity
                if (count != arity) if arity > 0 else (count < -arity):
                    raise BadInvocation(wrong_arity(keys.name))
                first, last, step = span
                positions = list(range(first, count + last + 1 if last < 0 else last + 1, step))
            else:
                positions = keys.positions(args)
        except BadInvocation as refusal:
            self._answer(request, _error(refusal.message))
            return None
        if spec.step > 1 and (len(args) - spec.first) % spec.step:
            # MSET a 1 b: Redis refuses it whole; split, a part would be written.
            self._answer(request, _wrong_arity(args[0].lower()))
            return None
        if spec.options is not None:
            # GEORADIUS ... STORE a STORE b writes b, which Redis's key specs miss.
            for position in stored_keys(args, *spec.options):
                if position not in positions:
                    positions.append(position)
        return positions

    def _keyless(self, request: Request, spec: CommandSpec, router: Router) -> List[Tuple[Any, Request]]:
        """A request without keys: a HELP to the first live server, a script with numkeys 0 refused."""
        if spec.layout is KEYLESS:
            servers = router.live_servers
            if servers:
                request.kind = FORWARD
                return [(servers[0], request)]
            self._answer(request, self.error_reply(f"no live server in pool '{self._config.name}'"))
            return []
        shown = request.args[0].decode("latin-1").upper()
        self._answer(request, resp.error(
            f"ERR {shown} with no keys cannot be routed by twinproxy: pass the keys it uses (numkeys >= 1)"))
        return []

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
        """SUBSCRIBE and its kin, PUBLISH, SPUBLISH: Redis's argument checks, then classified."""
        args = request.args
        name = args[0].lower()
        refusal = arity_error(args, name, self.commands[name])
        if refusal is not None:
            return refusal
        return redis_pubsub.classify(request, name)

    def _plan_pubsub(self, request: Request, router: Router) -> List[Tuple[Any, Request]]:
        """PUBSUB CHANNELS/NUMSUB/NUMPAT/SHARD*/HELP: Redis's argument checks, then fanned out."""
        refusal = arity_error(request.args, b"pubsub", request.command)
        if refusal is not None:
            return redis_fanout.answer(request, refusal)
        return redis_pubsub.plan(request, router)

    def _echo(self, request: Request, session: Session) -> bytes:
        if len(request.args) != 2:
            return _wrong_arity(b"echo")
        return resp.bulk(request.args[1])

    def _quit(self, request: Request, session: Session) -> bytes:
        request.close_after = True
        return b"+OK\r\n"

    def _reset(self, request: Request, session: Session) -> bytes:
        """RESET: the session's own state (redis_connection), and out of MULTI and WATCH, as Redis's."""
        profile = session.profile
        reply = self.connection.reset(request, session)
        if reply is RESET_REPLY:
            if session.transaction is not None:
                self._transactions.leave(session)
            if session.profile == profile:
                session.end_watch()    # UNWATCH on the pin, which keeps the order until it is answered
            else:
                session.drop_watch()   # the pin is of the old database or protocol: out of the routing now
        return reply
