"""MULTI / EXEC / DISCARD: a transaction queued at the proxy, sent to one server in one write.

Owns :class:`Transaction` (what a client queued since MULTI, its keys,
whether a queue-time error spoiled it) and :class:`Transactions`, the Redis
codec's handlers for the transaction commands and its ``prepare`` for a
client inside MULTI.

The proxy answers MULTI and each queued command itself (``+QUEUED``, or
Redis's own error, which makes EXEC answer EXECABORT as Redis does), so
nothing reaches a server until EXEC.  EXEC becomes one request: ``MULTI``,
the queued commands and ``EXEC``, written as one block on the client's
usual connection to the server that owns every key.  Redis runs a
connection's commands in the order they arrive, so no other client's
command can fall inside the block, and the server's EXEC reply is the
client's.  A client that disconnects before EXEC leaves nothing on any
server: nothing was sent.

Sans-I/O: never touches the pool, a socket or the reactor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, Optional, Tuple

from twinproxy.protocols import Router, Session, resp
from twinproxy.request import FORWARD, FRAGMENT, LOCAL, Request

if TYPE_CHECKING:
    from twinproxy.protocols.redis import RedisCodec

EXECABORT = b"-EXECABORT Transaction discarded because of previous errors.\r\n"
QUEUED = b"+QUEUED\r\n"
_MULTI = resp.encode_command([b"MULTI"])
_EXEC = resp.encode_command([b"EXEC"])
# Answered by the proxy and queued as they are: the server runs them inside the transaction.
_QUEUED_AS_IS = frozenset((b"ping", b"echo"))
# Answered by Redis inside MULTI without queueing, and without spoiling the transaction.
_NOT_QUEUED = {
    b"multi": "ERR MULTI calls can not be nested",
    b"watch": "ERR WATCH inside MULTI is not allowed",
}


class Transaction:
    """One client's commands between MULTI and EXEC."""

    __slots__ = ("commands", "keys", "names", "spoiled")

    def __init__(self) -> None:
        self.commands: List[bytes] = []   # each queued command's bytes, as the client sent them
        self.keys: List[bytes] = []       # every key they touch, in order
        self.names: List[bytes] = []      # the command each key belongs to, for the cross-server error
        self.spoiled = False              # a queue-time error: EXEC answers EXECABORT


def is_error(reply: Optional[bytes]) -> bool:
    return reply is not None and reply[:1] in (b"-", b"!")


class Transactions:
    """The Redis codec's transaction commands; one per codec (per pool)."""

    def __init__(self, codec: "RedisCodec", exec_spec: Any, arity_error: Any) -> None:
        self._codec = codec
        # The spec EXEC requests carry once they hold a transaction: codec.fragment routes them here.
        self._exec_spec = exec_spec
        self._arity_error = arity_error

    # -- outside MULTI -------------------------------------------------------

    def multi(self, request: Request, session: Session) -> bytes:
        if len(request.args) != 1:
            return resp.error("ERR wrong number of arguments for 'multi' command")
        session.transaction = Transaction()
        session.prepare = self.prepare_queued
        return b"+OK\r\n"

    def exec_without_multi(self, request: Request, session: Session) -> bytes:
        if len(request.args) != 1:
            return resp.error("ERR wrong number of arguments for 'exec' command")
        return resp.error("ERR EXEC without MULTI")

    def discard_without_multi(self, request: Request, session: Session) -> bytes:
        if len(request.args) != 1:
            return resp.error("ERR wrong number of arguments for 'discard' command")
        return resp.error("ERR DISCARD without MULTI")

    # -- inside MULTI --------------------------------------------------------

    def prepare_queued(self, request: Request, session: Session) -> None:
        """``prepare`` for a client inside MULTI: queue, or answer EXEC/DISCARD/QUIT."""
        codec = self._codec
        args = request.args
        name = args[0].lower()
        transaction: Transaction = session.transaction
        if name == b"exec" or name == b"discard":
            spec = codec.commands[name]
            request.name = spec.label
            if len(args) != 1:
                _answer(request, resp.error(f"ERR wrong number of arguments for '{name.decode()}' command"))
                transaction.spoiled = True
                return
            self._leave(session)
            if name == b"discard":
                _answer(request, b"+OK\r\n")
            elif transaction.spoiled:
                _answer(request, EXECABORT)
            elif not transaction.commands:
                _answer(request, b"*0\r\n")
            else:
                self._build_exec(request, transaction)
            return
        refusal = _NOT_QUEUED.get(name)
        if refusal is not None:
            request.name = name.decode()
            _answer(request, resp.error(refusal))
            return
        if name == b"quit":
            codec.prepare(request, session)   # QUIT is not queued: it closes the connection
            return
        spec = codec.commands.get(name)
        if spec is not None and spec.handler is not None and name not in _QUEUED_AS_IS:
            # The proxy answers it for the client's own connection (SELECT, CLIENT, HELLO, AUTH...):
            # inside a transaction it would run on a server's connection instead.
            request.name = spec.label
            _answer(request, resp.error(
                f"ERR '{name.decode('latin-1')}' inside MULTI is not supported by twinproxy"))
            transaction.spoiled = True
            return
        if spec is not None:
            # Checked here, not left to the server: Redis refuses a wrong count at queue time.
            refusal = self._arity_error(args, name, spec)
            if refusal is not None:
                request.name = spec.label
                _answer(request, refusal)
                transaction.spoiled = True
                return
        codec.prepare(request, session)
        keys = self._keys(request)
        if keys is None:                       # refused or malformed: Redis's error, and EXECABORT later
            transaction.spoiled = True
            return
        transaction.commands.append(request.raw)
        transaction.keys.extend(keys)
        transaction.names.extend([name] * len(keys))
        _answer(request, QUEUED)

    def _keys(self, request: Request) -> Optional[List[bytes]]:
        """The keys of a classified request, or None if the codec answered it with an error."""
        kind = request.kind
        if kind == LOCAL:
            return None if is_error(request.reply) else []
        if kind == FORWARD:
            return [request.key]
        positions = self._codec.key_positions(request)
        if positions is None:
            return None
        args = request.args
        return [args[position] for position in positions]

    def _build_exec(self, request: Request, transaction: Transaction) -> None:
        """Turn EXEC into the whole transaction: one request, its reply the server's EXEC reply."""
        request.raw = _MULTI + b"".join(transaction.commands) + _EXEC
        # The keys as the request's arguments: routing, the one-slot check and a migrating
        # slot's move-before-forward all read keys through args and positions.
        request.args = [b"exec"] + transaction.keys
        request.positions = list(range(1, len(transaction.keys) + 1))
        request.command = self._exec_spec
        request.kind = FRAGMENT
        # +OK for MULTI, +QUEUED per command, then EXEC's reply: the client's.
        request.terminator = len(transaction.commands) + 2
        request.gathered = []
        request.fragments = None
        request.transaction = transaction

    def _leave(self, session: Session) -> None:
        session.transaction = None
        session.prepare = self._codec.prepare

    # -- routing EXEC ----------------------------------------------------------

    def route(self, request: Request, router: Router) -> List[Tuple[Any, Request]]:
        """The one server that runs the transaction, or [] after answering EXECABORT."""
        keys = request.args[1:]
        if not keys:
            live = router.live_servers
            if not live:
                _answer(request, resp.error("ERR no server is live to run the transaction"))
                return []
            request.kind = FORWARD
            return [(live[0], request)]
        slot_of = getattr(router, "slot_of", None)
        if slot_of is not None and len(keys) > 1:
            slots = {slot_of(key) for key in keys}
            if len(slots) > 1:
                _answer(request, resp.error(
                    "EXECABORT Transaction discarded: its keys are in more than one slot "
                    f"({_shown(request, keys, [slot_of(key) for key in keys], 'in slot')}); "
                    "use a {tag} to keep them together"))
                return []
        servers = router.servers_for_keys(keys)
        first = servers[0]
        if servers.count(first) != len(servers):
            names = [getattr(server, "name", "?") for server in servers]
            _answer(request, resp.error(
                "EXECABORT Transaction discarded: its keys are on more than one server "
                f"({_shown(request, keys, names, 'on')}); use a {{tag}} to keep them together"))
            return []
        request.kind = FORWARD
        request.key = keys[0]
        return [(first, request)]


def _shown(request: Request, keys: List[bytes], places: List[Any], word: str) -> str:
    """The first key per place, for an error that says where the keys went."""
    names: List[bytes] = request.transaction.names
    seen: dict = {}
    for index, (key, place) in enumerate(zip(keys, places)):
        if place not in seen:
            seen[place] = (names[index], key)
    parts = []
    for place, (name, key) in seen.items():
        shown = key.decode("utf-8", "replace")[:40]
        parts.append(f"{name.decode('latin-1').upper()} '{shown}' {word} {place}")
    return ", ".join(parts)


def _answer(request: Request, reply: bytes) -> None:
    request.kind = LOCAL
    request.reply = reply
