"""The fan-out layout: Redis commands sent to every server, or to one chosen server, and merged.

Owns: :class:`FanoutFragment` (one server's part, with the merge that
answers the client once every part is back), the choice of servers
(:func:`every_server`: all of them in configuration order, refused while
one is ejected; :func:`live_servers`; :func:`first_live`), :func:`send_to`,
which makes the parts, and the merges more than one family uses (the one
reply, every reply ``+OK``, the same reply, a sum, a KILL).

It rides on the codec's FRAGMENT machinery, not beside it: a FANOUT
command's ``fragment`` is its planner (``spec.handler(request, router)``),
which returns ``[(server, FanoutFragment)]`` or answers the request and
returns ``[]``; the frontend sends the parts as it sends a split MGET's, and
``coalesce`` calls the merge the planner chose.  A part is never the
client's request itself, so even a one-server pool gets its merge (a SCAN
cursor is rewritten, INFO gains its proxy section).

The families plan here: :mod:`~twinproxy.protocols.redis_keyspace`,
:mod:`~twinproxy.protocols.redis_scripts`,
:mod:`~twinproxy.protocols.redis_info` and
:mod:`~twinproxy.protocols.redis_fanout_commands`.  Pure: no pool, no
socket, no reactor (routing comes in as the Router).
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

from twinproxy.protocols import Router, resp
from twinproxy.request import LOCAL, Request

Routes = List[Tuple[Any, Request]]
Merge = Callable[[Request], bytes]
OK = b"+OK\r\n"


class FanoutFragment(Request):
    """One server's part of a fanned-out request.

    ``merge(parent)`` makes the client's reply from every part's
    ``reply``; ``server`` and ``index`` (its place in ``all_servers``) say
    where the part went, ``context`` is whatever the merge needs besides.
    """

    __slots__ = ("merge", "server", "index", "context")

    def __init__(self, raw: bytes, args: Optional[List[bytes]], merge: Merge, server: Any, index: int,
                 context: Any = None) -> None:
        super().__init__(raw, args)
        self.merge = merge
        self.server = server
        self.index = index
        self.context = context


def coalesce(request: Request) -> bytes:
    """The client's reply to a fanned-out request, once every part has its own."""
    return request.fragments[0].merge(request)


def answer(request: Request, reply: bytes) -> Routes:
    """Answer ``request`` here (no server asked); the planner's ``[]``."""
    request.kind = LOCAL
    request.reply = reply
    return []


def command_name(request: Request) -> str:
    """The command as the client wrote it, upper case, with its subcommand for a container."""
    args = request.args
    name = args[0].decode("latin-1").upper()
    if request.command is not None and request.command.subcommands is not None and len(args) > 1:
        return f"{name} {args[1].decode('latin-1').upper()}"
    return name


def server_name(server: Any) -> str:
    return str(getattr(server, "name", server))


def _no_server(request: Request, router: Router) -> Routes:
    return answer(request, resp.error(f"ERR no live server in pool '{router.config.name}'"))


def every_server(request: Request, router: Router) -> Optional[List[Tuple[int, Any]]]:
    """``(index, server)`` of every server, in configuration order; None (answered) while one is ejected.

    For the commands that are only right over the whole keyspace (KEYS,
    DBSIZE, FLUSHDB, FUNCTION LOAD, ...): a server out of the ring still
    holds keys, and skipping it would answer for part of the pool as if
    for all of it.
    """
    servers = router.all_servers
    if not servers:
        _no_server(request, router)
        return None
    live = set(router.live_servers)
    for server in servers:
        if server not in live:
            answer(request, resp.error(
                f"ERR {command_name(request)} needs every server of the pool, and server '{server_name(server)}' "
                "is ejected (it is tried again after server_retry_timeout)"))
            return None
    return list(enumerate(servers))


def live_servers(request: Request, router: Router) -> Optional[List[Tuple[int, Any]]]:
    """``(index, server)`` of the servers in the ring, in configuration order; None (answered) if none is."""
    live = set(router.live_servers)
    chosen = [(index, server) for index, server in enumerate(router.all_servers) if server in live]
    if not chosen:
        _no_server(request, router)
        return None
    return chosen


def first_live(request: Request, router: Router) -> Optional[List[Tuple[int, Any]]]:
    """The first server in the ring that is up (else the first in the ring); None (answered) if none is.

    For what any one server answers as well as another (CONFIG GET, TIME,
    COMMAND, FUNCTION LIST, and Redis's own errors for a malformed call).
    """
    chosen = live_servers(request, router)
    if chosen is None:
        return None
    for index, server in chosen:
        if getattr(server, "up", True):
            return [(index, server)]
    return chosen[:1]


def send_to(request: Request, router: Router, targets: Optional[Sequence[Tuple[int, Any]]], merge: Merge,
            context: Any = None, raw: Optional[bytes] = None) -> Routes:
    """One part per target, each ``raw`` (the client's bytes unless given), answered by ``merge``.

    ``targets`` None means a target chooser already answered the request.
    """
    if targets is None:
        return []
    if raw is None:
        raw = request.raw
    args = request.args
    command = request.command
    routes: Routes = []
    for index, server in targets:
        part = FanoutFragment(raw, args, merge, server, index, context)
        part.command = command
        routes.append((server, part))
    router.counters.fanouts += 1
    return routes


# -- merges more than one family uses ------------------------------------------

def is_error(reply: bytes) -> bool:
    return reply[:1] == b"-" or reply[:1] == b"!"


def first_error(request: Request) -> Optional[bytes]:
    for part in request.fragments:
        if is_error(part.reply):
            return part.reply
    return None


def unexpected(reply: bytes) -> bytes:
    return resp.error("ERR unexpected reply from server: " + reply[:60].decode("latin-1"))


def merge_one(request: Request) -> bytes:
    """The one server's reply, unchanged (first-live commands)."""
    return request.fragments[0].reply


def merge_all_ok(request: Request) -> bytes:
    """``+OK`` when every server said so; else the first error (or the first other reply)."""
    error = first_error(request)
    if error is not None:
        return error
    for part in request.fragments:
        if part.reply != OK:
            return unexpected(part.reply)
    return OK


def merge_same(request: Request) -> bytes:
    """The reply every server gave; when they differ, the first error (else the first reply)."""
    error = first_error(request)
    if error is not None:
        return error
    return request.fragments[0].reply


def sum_integers(parts: Sequence[Request]) -> bytes:
    """The sum of integer replies (DEL's count over servers, DBSIZE); the first error if any."""
    return sum_integer_replies([part.reply for part in parts])


def sum_integer_replies(replies: Sequence[bytes]) -> bytes:
    """``sum_integers`` of the replies themselves."""
    total = 0
    for reply in replies:
        if is_error(reply):
            return reply
        if reply[:1] != b":":
            return unexpected(reply)
        total += int(reply[1:-2])
    return resp.integer(total)


def merge_sum(request: Request) -> bytes:
    return sum_integers(request.fragments)


def merge_kill(request: Request) -> bytes:
    """SCRIPT KILL / FUNCTION KILL: ``+OK`` if any server killed one; else Redis's NOTBUSY (or another error)."""
    other = None
    for part in request.fragments:
        reply = part.reply
        if reply == OK:
            return OK
        if other is None and not reply.startswith(b"-NOTBUSY"):
            other = reply
    return other if other is not None else request.fragments[0].reply
