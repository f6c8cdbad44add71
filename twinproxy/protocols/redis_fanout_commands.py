"""Which planner serves each fan-out command, and the small ones: CONFIG, TIME, LASTSAVE, COMMAND.

Owns: :class:`FanoutCommands` — the planners of every FANOUT command for
one codec (:meth:`FanoutCommands.planners`, which the codec's command
table adds), with the planners of CONFIG, TIME, LASTSAVE and COMMAND and
the per-codec cache of COMMAND's replies.

- CONFIG GET (and HELP, and anything malformed, which gets Redis's own
  error) from the first live server; CONFIG SET, REWRITE and RESETSTAT are
  refused, naming the command: they would change one server of many.
- TIME and LASTSAVE from the first live server.
- COMMAND, COMMAND COUNT, COMMAND LIST and COMMAND DOCS (the whole table,
  what redis-cli asks at every start) from the first live server, cached
  per codec and RESP version after the first answer: one server's table is
  every server's, and a cached one costs no round trip.  COMMAND INFO/DOCS
  of named commands, and LIST with a filter, are asked each time.
  COMMAND GETKEYS and GETKEYSANDFLAGS are the codec's own (its key table).
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

from twinproxy.protocols import Router, redis_info, redis_keyspace, redis_scripts, resp
from twinproxy.protocols.redis_fanout import Routes, answer, first_live, is_error, merge_one, send_to
from twinproxy.request import Request

Planner = Callable[[Request, Router], Routes]
_CONFIG_REFUSED = frozenset((b"set", b"rewrite", b"resetstat"))
_LOCAL_COMMAND = frozenset((b"getkeys", b"getkeysandflags"))
_CACHED_COMMAND = frozenset((b"count", b"list", b"docs"))


class FanoutCommands:
    """The FANOUT planners of one codec; ``local_command(request, session)`` answers COMMAND GETKEYS."""

    def __init__(self, local_command: Callable) -> None:
        self._local_command = local_command
        # (RESP version, subcommand) -> a server's whole reply to COMMAND [COUNT|LIST|DOCS].
        self._command_replies: Dict[Tuple[int, bytes], bytes] = {}

    def planners(self) -> Dict[str, Planner]:
        table: Dict[str, Planner] = {
            "config": self.plan_config,
            "time": self.plan_first_live,
            "lastsave": self.plan_first_live,
            "command": self.plan_command,
        }
        table.update(redis_info.PLANNERS)
        table.update(redis_keyspace.PLANNERS)
        table.update(redis_scripts.PLANNERS)
        return table

    def plan_first_live(self, request: Request, router: Router) -> Routes:
        return send_to(request, router, first_live(request, router), merge_one)

    def plan_config(self, request: Request, router: Router) -> Routes:
        args = request.args
        if len(args) > 1 and args[1].lower() in _CONFIG_REFUSED:
            shown = args[1].decode("latin-1").upper()
            return answer(request, resp.error(
                f"ERR CONFIG {shown} is not supported by twinproxy: it would change one server of the pool; "
                "configure the servers themselves"))
        return send_to(request, router, first_live(request, router), merge_one)

    def plan_command(self, request: Request, router: Router) -> Routes:
        args = request.args
        sub = args[1].lower() if len(args) > 1 else b""
        if sub in _LOCAL_COMMAND:
            return answer(request, self._local_command(request, request.client))
        if len(args) == 1 or (len(args) == 2 and sub in _CACHED_COMMAND):
            key = (request.dialect, sub)
            cached = self._command_replies.get(key)
            if cached is not None:
                return answer(request, cached)
            return send_to(request, router, first_live(request, router), self._merge_cached, key)
        return send_to(request, router, first_live(request, router), merge_one)

    def _merge_cached(self, request: Request) -> bytes:
        part = request.fragments[0]
        if not is_error(part.reply):
            self._command_replies[part.context] = part.reply
        return part.reply
