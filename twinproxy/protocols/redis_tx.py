"""MULTI / EXEC / DISCARD: a transaction queued at the proxy, sent to one server in one write.

Owns :class:`Transaction` (what a client queued since MULTI, each command's
keys, whether a queue-time error spoiled it) and :class:`Transactions`, the
Redis codec's handlers for the transaction commands, its ``prepare`` for a
client inside MULTI, EXEC's routing and the merge of a split EXEC.

The proxy answers MULTI and each queued command itself (``+QUEUED``, or
Redis's own error, which makes EXEC answer EXECABORT as Redis does), so
nothing reaches a server until EXEC.  EXEC becomes one request: ``MULTI``,
the queued commands and ``EXEC``, written as one block on the client's
usual connection to the server that owns every key.  Redis runs a
connection's commands in the order they arrive, so no other client's
command can fall inside the block, and the server's EXEC reply is the
client's.  A client that disconnects before EXEC leaves nothing on any
server: nothing was sent.

With ``redis_cross_server_transactions`` a transaction over several
servers runs as one such block per server (a command whose keys span
servers, such as MSET, split as outside a transaction), and the replies are
put back in the client's order: each server's part is atomic, the whole is
not.

Sans-I/O: never touches the pool, a socket or the reactor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from twinproxy.protocols import ProtocolError, Router, Session, resp
from twinproxy.protocols.redis_specs import FANOUT, LOCAL_COMMAND, SPLIT
from twinproxy.request import FORWARD, FRAGMENT, LOCAL, Request

if TYPE_CHECKING:
    from twinproxy.protocols.redis import RedisCodec

EXECABORT = b"-EXECABORT Transaction discarded because of previous errors.\r\n"
QUEUED = b"+QUEUED\r\n"
_MULTI = resp.encode_command([b"MULTI"])
_EXEC = resp.encode_command([b"EXEC"])
# Answered (or routed) by the proxy's own handlers outside MULTI, queued as they are inside: the server runs
# them in the transaction (PUBLISH goes with the transaction's server, which must be its channel's).
_QUEUED_AS_IS = frozenset((b"ping", b"echo", b"publish", b"spublish"))
# Answered by Redis inside MULTI without queueing, and without spoiling the transaction.
_NOT_QUEUED = {
    b"multi": "ERR MULTI calls can not be nested",
    b"watch": "ERR WATCH inside MULTI is not allowed",
}


class Queued:
    """One command of a transaction: its bytes, arguments, spec and where its keys are."""

    __slots__ = ("raw", "args", "spec", "positions")

    def __init__(self, raw: bytes, args: List[bytes], spec: Any, positions: List[int]) -> None:
        self.raw = raw
        self.args = args
        self.spec = spec
        self.positions = positions


class Transaction:
    """One client's commands between MULTI and EXEC."""

    __slots__ = ("commands", "spoiled", "parts")

    def __init__(self) -> None:
        self.commands: List[Queued] = []
        self.spoiled = False       # a queue-time error: EXEC answers EXECABORT
        # A split EXEC: per command, [(fragment index, element index, key positions)] of its parts.
        self.parts: List[List[Tuple[int, int, List[int]]]] = []


class _SplitPart:
    """One server's share of a split command queued in a cross-server transaction, as the
    codec's ``merge_parts`` reads a fragment: the key positions it carried and its reply."""

    __slots__ = ("positions", "reply")

    def __init__(self, positions: List[int], reply: bytes) -> None:
        self.positions = positions
        self.reply = reply


def is_error(reply: Optional[bytes]) -> bool:
    return reply is not None and reply[:1] in (b"-", b"!")


class Transactions:
    """The Redis codec's transaction commands; one per codec (per pool)."""

    def __init__(self, codec: "RedisCodec", exec_spec: Any, arity_error: Callable[..., Optional[bytes]],
                 merge_parts: Callable[..., bytes], cross_server: bool) -> None:
        self._codec = codec
        # The spec EXEC requests carry once they hold a transaction: codec.fragment routes them here.
        self._exec_spec = exec_spec
        self._arity_error = arity_error
        self._merge_parts = merge_parts
        self._cross_server = cross_server

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
        spec = codec.commands.get(name)
        if name == b"exec" or name == b"discard":
            request.name = spec.label
            if len(args) != 1:
                _answer(request, resp.error(f"ERR wrong number of arguments for '{name.decode()}' command"))
                transaction.spoiled = True
                return
            self.leave(session)
            if name == b"exec" and not transaction.spoiled and transaction.commands:
                self._build_exec(request, transaction)
                return
            if name == b"discard":
                _answer(request, b"+OK\r\n")
            else:
                _answer(request, EXECABORT if transaction.spoiled else b"*0\r\n")
            session.end_watch()       # both unwatch, as in Redis
            return
        refusal = _NOT_QUEUED.get(name)
        if refusal is not None:
            request.name = name.decode()
            _answer(request, resp.error(refusal))
            return
        if name == b"quit" or name == b"reset":
            # Not queued, as in Redis: QUIT closes the connection, RESET ends the transaction.
            codec.prepare(request, session)
            return
        if spec is not None:
            request.name = spec.label
            if (spec.layout is LOCAL_COMMAND and name not in _QUEUED_AS_IS) or spec.layout is FANOUT:
                # The proxy answers it for the client's own connection (SELECT, CLIENT, HELLO,
                # AUTH...), or asks every server (KEYS, INFO, SCRIPT...): inside a transaction it
                # would run on one server's connection instead.
                _answer(request, resp.error(
                    f"ERR '{name.decode('latin-1')}' inside MULTI is not supported by twinproxy"))
                transaction.spoiled = True
                return
            # Checked here, not left to the server: Redis refuses a wrong count at queue time.
            refusal = self._arity_error(args, name, spec)
            if refusal is not None:
                _answer(request, refusal)
                transaction.spoiled = True
                return
        codec.prepare(request, session)
        positions = self._key_positions(request)
        if positions is None:                  # refused or malformed: Redis's error, and EXECABORT later
            transaction.spoiled = True
            return
        transaction.commands.append(Queued(request.raw, args, request.command, positions))
        _answer(request, QUEUED)

    def _key_positions(self, request: Request) -> Optional[List[int]]:
        """Where a classified request's keys are, or None if the codec answered it with an error."""
        kind = request.kind
        if kind == LOCAL:
            return None if is_error(request.reply) else []
        if kind == FORWARD:
            return [request.command.first]
        return self._codec.key_positions(request)

    def _build_exec(self, request: Request, transaction: Transaction) -> None:
        """EXEC carries the transaction from here: codec.fragment routes it (``route``)."""
        # Every key as the request's arguments: routing, the one-slot check and a migrating
        # slot's move-before-forward all read keys through args and positions.
        keys = [command.args[position] for command in transaction.commands for position in command.positions]
        request.args = [b"exec"] + keys
        request.positions = list(range(1, len(keys) + 1))
        request.command = self._exec_spec
        request.kind = FRAGMENT
        request.transaction = transaction

    def leave(self, session: Session) -> None:
        """Out of MULTI: the session's requests are prepared as usual again."""
        session.transaction = None
        session.prepare = self._codec.prepare

    # -- WATCH / UNWATCH --------------------------------------------------------

    def watch(self, request: Request, router: Router) -> List[Tuple[Any, Request]]:
        """WATCH pins the keys' server to a connection of the client's own; UNWATCH ends that."""
        pin = getattr(router, "pinned", None)
        if request.args[0].lower() == b"unwatch":
            if pin is None:
                _answer(request, b"+OK\r\n")
                return []
            return [(router.ending, request)]
        refusal = self._arity_error(request.args, b"watch", request.command)
        if refusal is not None:
            _answer(request, refusal)
            return []
        positions = self._codec.key_positions(request)
        if positions is None:
            return []
        keys = [request.args[position] for position in positions]
        slot_of = getattr(router, "slot_of", None)
        if slot_of is not None and len({slot_of(key) for key in keys}) > 1:
            _answer(request, resp.error("ERR WATCH keys in more than one slot: use a {tag} to keep them together"))
            return []
        targets = router.servers_for_keys(keys)
        target = targets[0]
        if targets.count(target) != len(targets) or (pin is not None and target is not pin):
            _answer(request, resp.error(
                "ERR WATCH keys on more than one server are not supported by twinproxy (a transaction runs on "
                "one server): use a {tag} to keep them together"))
            return []
        if pin is None:
            if getattr(target, "link", None) is None:
                _answer(request, resp.error(
                    f"ERR WATCH is not available while {getattr(target, 'name', 'the slot')} is held, migrating "
                    "or has no live server; retry"))
                return []
            pin = request.client.pin(target)
            if pin is not None:
                router.counters.watch_leases += 1
            else:
                _answer(request, resp.error(
                    f"ERR no connection to lend for WATCH on server {target.name}: server_leased_connections "
                    "are all in use"))
                return []
        pin.watched()
        request.kind = FORWARD
        return [(pin, request)]

    # -- routing EXEC ----------------------------------------------------------

    def route(self, request: Request, router: Router) -> List[Tuple[Any, Request]]:
        """Where the transaction runs: [(server, request)], a split's parts, or [] after answering EXECABORT."""
        routes = self._route(request, router)
        pin = getattr(router, "pinned", None)
        if pin is not None:
            # WATCHing: the transaction must run on the WATCH's connection, which it then unwatches.
            if not routes:
                request.client.end_watch()
            elif len(routes) > 1 or routes[0][0] is not pin:
                _answer(request, resp.error(
                    "EXECABORT Transaction discarded: its keys are not on the server of the WATCHed keys "
                    f"({pin.name}); use a {{tag}} to keep them together"))
                request.client.end_watch()
                routes = []
            else:
                routes = [(router.ending, routes[0][1])]
        # Counted once the pin has had its say: run, or refused with EXECABORT (a bad command, keys apart).
        counters = router.counters
        if routes:
            counters.transactions += 1
        elif request.reply is not None and request.reply.startswith(b"-EXECABORT"):
            counters.transactions_refused += 1
        return routes

    def _route(self, request: Request, router: Router) -> List[Tuple[Any, Request]]:
        transaction: Transaction = request.transaction
        keys = request.args[1:]
        if not keys:
            pin = getattr(router, "pinned", None)
            live = [pin] if pin is not None else router.live_servers
            if not live:
                _answer(request, resp.error("ERR no server is live to run the transaction"))
                return []
            return [(live[0], self._whole(request, transaction))]
        slot_of = getattr(router, "slot_of", None)
        if slot_of is not None and len(keys) > 1 and not self._cross_server:
            slots = [slot_of(key) for key in keys]
            if len(set(slots)) > 1:
                _answer(request, resp.error(
                    "EXECABORT Transaction discarded: its keys are in more than one slot "
                    f"({_where(transaction, slots, 'in slot')}); use a {{tag}} to keep them together"))
                return []
        servers = router.servers_for_keys(keys)
        first = servers[0]
        if servers.count(first) == len(servers):
            request.key = keys[0]
            return [(first, self._whole(request, transaction))]
        if not self._cross_server:
            names = [getattr(server, "name", "?") for server in servers]
            _answer(request, resp.error(
                "EXECABORT Transaction discarded: its keys are on more than one server "
                f"({_where(transaction, names, 'on')}); use a {{tag}} to keep them together"))
            return []
        return self._split(request, transaction, servers)

    def _whole(self, request: Request, transaction: Transaction) -> Request:
        request.raw = _MULTI + b"".join(command.raw for command in transaction.commands) + _EXEC
        request.kind = FORWARD
        _gather(request, len(transaction.commands))
        return request

    def _split(self, request: Request, transaction: Transaction, servers: List[Any]) -> List[Tuple[Any, Request]]:
        """One MULTI/EXEC per server; a command over several servers split as a SPLIT command is."""
        blocks: Dict[Any, List[bytes]] = {}
        block_keys: Dict[Any, List[int]] = {}
        order: List[Any] = []
        position = 1                  # the next key's index in request.args
        for command in transaction.commands:
            count = len(command.positions)
            mine = servers[position - 1:position - 1 + count]
            places: Dict[Any, List[int]] = {}
            for index, server in enumerate(mine):
                places.setdefault(server, []).append(index)
            if len(places) > 1 and command.spec.layout is not SPLIT:
                shown = command.args[0].decode("latin-1").upper()
                _answer(request, resp.error(
                    f"EXECABORT Transaction discarded: {shown} needs its keys on one server, they are on "
                    f"{len(places)}; use a {{tag}} to keep them together"))
                return []
            if not places:            # keyless: with the first server the transaction touches
                places = {servers[0]: []}
            parts = []
            for server, indexes in places.items():
                if server not in blocks:
                    blocks[server] = []
                    block_keys[server] = []
                    order.append(server)
                key_positions = [command.positions[i] for i in indexes]
                raw = command.raw if len(places) == 1 else resp.encode_fragment(
                    command.args, key_positions, command.spec.step)
                parts.append((order.index(server), len(blocks[server]), key_positions))
                blocks[server].append(raw)
                block_keys[server].extend(position + i for i in indexes)
            transaction.parts.append(parts)
            position += count
        routes = []
        for server in order:
            fragment = Request(_MULTI + b"".join(blocks[server]) + _EXEC)
            fragment.command = self._exec_spec
            fragment.positions = block_keys[server]
            _gather(fragment, len(blocks[server]))
            routes.append((server, fragment))
        return routes

    def merge(self, request: Request) -> bytes:
        """A split EXEC's reply: each command's element from its server's EXEC array, in the client's order."""
        transaction: Transaction = request.transaction
        arrays = []
        for fragment in request.fragments:
            reply = fragment.reply
            if reply[:1] != b"*" or reply[:3] == b"*-1":
                # EXECABORT or an error from one server: the others may have committed (not atomic).
                return reply
            try:
                _, elements = resp.split_aggregate(reply)
            except (ProtocolError, ValueError):
                return self._codec.error_reply("unexpected EXEC reply from server: " + reply[:60].decode("latin-1"))
            arrays.append(elements)
        merged = []
        for command, parts in zip(transaction.commands, transaction.parts):
            if len(parts) == 1:
                fragment_index, element_index, _ = parts[0]
                merged.append(arrays[fragment_index][element_index])
            else:
                merged.append(self._merge_parts(command.spec, len(command.args), [
                    _SplitPart(positions, arrays[fragment_index][element_index])
                    for fragment_index, element_index, positions in parts]))
        return b"*%d\r\n" % len(merged) + b"".join(merged)


def _gather(request: Request, commands: int) -> None:
    # +OK for MULTI, +QUEUED per command, then EXEC's reply: the one that answers.
    request.terminator = commands + 2
    request.gathered = []


def _where(transaction: Transaction, places: List[Any], word: str) -> str:
    """The first key per place, with its command: for an error that says where the keys went."""
    seen: dict = {}
    index = 0
    for command in transaction.commands:
        for position in command.positions:
            place = places[index]
            if place not in seen:
                seen[place] = (command.args[0], command.args[position])
            index += 1
    parts = []
    for place, (name, key) in seen.items():
        shown = key.decode("utf-8", "replace")[:40]
        parts.append(f"{name.decode('latin-1').upper()} '{shown}' {word} {place}")
    return ", ".join(parts)


def _answer(request: Request, reply: bytes) -> None:
    request.kind = LOCAL
    request.reply = reply
