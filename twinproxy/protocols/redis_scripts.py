"""Lua scripts and functions over a sharded pool: SCRIPT, FUNCTION, and EVALSHA's NOSCRIPT healed.

Owns: :class:`ScriptStore` (the bodies the proxy has seen, by SHA1, per
pool), :class:`ScriptHeal` (an EVALSHA's owner until its reply), the hook
the codec calls once an EVAL/EVALSHA is routed, and the SCRIPT and
FUNCTION planners and merges.

EVAL, EVALSHA, their ``_RO`` forms and FCALL stay routed by their keys.
Redis's script cache is per server and not replicated: a server that
restarted, or a new master after a failover, answers ``NOSCRIPT`` to a
script every other server knows.  So the proxy remembers every body it
sees (SCRIPT LOAD, EVAL) and, when a server answers an EVALSHA with
NOSCRIPT and the body is known, sends that server ``SCRIPT LOAD body``
and the EVALSHA again, on the client's own connection (so in that order),
and the client gets the second reply: the call runs once, since NOSCRIPT
means it did not run.  Once only: a second NOSCRIPT goes to the client.

- SCRIPT LOAD: every live server (the heal covers one that misses it);
  the SHA when any loaded it, else the first error.
- SCRIPT EXISTS: every live server, AND per position: a script is there
  only if every server that may run it has it (a sum or "any" would make
  redis-py's pipeline skip the SCRIPT LOAD its EVALSHAs need).
- SCRIPT FLUSH [ASYNC|SYNC]: every live server, ``+OK`` when all said so;
  the proxy forgets its bodies too (else it would heal scripts the client
  flushed).  SCRIPT KILL: ``+OK`` if any server killed one, else NOTBUSY.
  SCRIPT DEBUG is refused (a debugging session is one server's, on one
  connection, interactive).
- FUNCTION LOAD/DELETE/FLUSH/RESTORE: every server (functions are
  persisted, not healed: none may be skipped), the same reply or the first
  error; LIST/DUMP/STATS/HELP from the first live server; KILL as SCRIPT
  KILL.  Anything malformed goes to one server, which answers Redis's error.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Optional

from twinproxy.protocols import Router, resp
from twinproxy.protocols.redis_fanout import (
    Routes,
    answer,
    every_server,
    first_error,
    first_live,
    is_error,
    live_servers,
    merge_all_ok,
    merge_kill,
    merge_one,
    merge_same,
    send_to,
    unexpected,
)
from twinproxy.protocols.redis_specs import fits
from twinproxy.request import Request

# The store's bounds: this many bodies, and this many bytes of them (the least recently used go first).
MAX_SCRIPTS = 1000
MAX_SCRIPT_BYTES = 16 * 1024 * 1024
_STATE_KEY = "redis_scripts"
_NOSCRIPT = b"-NOSCRIPT"
_EVALS = frozenset((b"eval", b"eval_ro"))   # the rest of SCRIPT_CALLS name a SHA


def sha1_hex(body: bytes) -> bytes:
    """The name Redis gives a script: the SHA1 of its body, 40 lowercase hex digits."""
    return hashlib.sha1(body).hexdigest().encode()


class ScriptStore:
    """Script bodies by SHA1: an LRU of at most ``max_scripts`` bodies and ``max_bytes`` bytes."""

    def __init__(self, max_scripts: int = MAX_SCRIPTS, max_bytes: int = MAX_SCRIPT_BYTES) -> None:
        self._bodies: "OrderedDict[bytes, bytes]" = OrderedDict()
        self._bytes = 0
        self._max_scripts = max_scripts
        self._max_bytes = max_bytes

    def remember(self, body: bytes) -> bytes:
        """Keep ``body`` (as the most recently used); return its SHA1."""
        sha = sha1_hex(body)
        bodies = self._bodies
        if sha in bodies:
            bodies.move_to_end(sha)
            return sha
        if len(body) > self._max_bytes:
            return sha
        bodies[sha] = body
        self._bytes += len(body)
        while len(bodies) > self._max_scripts or self._bytes > self._max_bytes:
            _, dropped = bodies.popitem(last=False)
            self._bytes -= len(dropped)
        return sha

    def body(self, sha: bytes) -> Optional[bytes]:
        """The body named ``sha`` (any case, as Redis reads it), or None."""
        body = self._bodies.get(sha.lower())
        if body is not None:
            self._bodies.move_to_end(sha.lower())
        return body

    def clear(self) -> None:
        self._bodies.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._bodies)


def store_of(router: Router) -> ScriptStore:
    """The pool's store (it outlives the codec: a reload makes a new codec, not a new pool)."""
    store = router.codec_state.get(_STATE_KEY)
    if store is None:
        store = router.codec_state[_STATE_KEY] = ScriptStore()
    return store


class ScriptHeal:
    """The owner of an EVALSHA whose body the proxy knows, until its reply is the client's.

    A NOSCRIPT reply is not passed on: the server the key lives on now is
    sent ``SCRIPT LOAD body`` and the same EVALSHA again, for the same
    client (so on the same connection, in that order), and the EVALSHA's
    second reply goes to the client, whatever it is.
    """

    __slots__ = ("request", "owner", "body", "router", "counted", "healing")

    def __init__(self, request: Request, body: bytes, router: Router) -> None:
        self.request = request
        self.owner = request.owner
        self.body = body
        self.router = router
        self.counted: Any = None
        self.healing = False

    def request_done(self, request: Request) -> None:
        if request is not self.request:
            return   # the SCRIPT LOAD: an error shows in the EVALSHA's second reply
        if not self.healing and request.reply.startswith(_NOSCRIPT):
            self._heal(request)
            return
        if self.healing:
            request.counted = self.counted
            if not request.reply.startswith(_NOSCRIPT):
                self.router.counters.scripts_healed += 1
        request.owner = self.owner
        self.owner.request_done(request)

    def completion_failed(self, request: Request) -> None:
        if request is self.request:
            request.owner = self.owner
            self.owner.completion_failed(request)

    def _heal(self, request: Request) -> None:
        self.healing = True
        load = Request(resp.encode_command([b"SCRIPT", b"LOAD", self.body]))
        load.owner = self
        load.client = request.client
        load.dialect = request.dialect
        load.key = request.key   # a migrating slot moves the key first, as for the call
        # The second send is timed as the command's, once; until then the request has no reply.
        self.counted, request.counted = request.counted, None
        request.reply = None
        server = self.router.server_for_key(request.key)
        server.send(load)
        server.send(request)


def routed(request: Request, server: Any, router: Router) -> None:
    """An EVAL/EVALSHA is about to go to ``server``: remember an EVAL's body, watch an EVALSHA's reply."""
    args = request.args
    if args[0].lower() in _EVALS:
        store_of(router).remember(args[1])
        return
    body = store_of(router).body(args[1])
    if body is not None:
        request.owner = ScriptHeal(request, body, router)


# -- SCRIPT --------------------------------------------------------------------

def plan_script(request: Request, router: Router) -> Routes:
    args = request.args
    sub = args[1].lower() if len(args) > 1 else b""
    arity = request.command.subcommands.get(sub)
    if arity is None or not fits(len(args), arity):
        return send_to(request, router, first_live(request, router), merge_one)   # Redis's own error
    if sub == b"load":
        store_of(router).remember(args[2])
        router.counters.script_loads += 1
        return send_to(request, router, live_servers(request, router), _merge_load)
    if sub == b"exists":
        return send_to(request, router, live_servers(request, router), _merge_exists)
    if sub == b"flush":
        if len(args) == 2 or (len(args) == 3 and args[2].lower() in (b"async", b"sync")):
            store_of(router).clear()
        return send_to(request, router, live_servers(request, router), merge_all_ok)
    if sub == b"kill":
        return send_to(request, router, live_servers(request, router), merge_kill)
    if sub == b"debug":
        return answer(request, resp.error(
            "ERR SCRIPT DEBUG is not supported by twinproxy: a debugging session belongs to one server and one "
            "connection; debug against a server directly"))
    return send_to(request, router, first_live(request, router), merge_one)   # HELP


def _merge_load(request: Request) -> bytes:
    """The SHA when any server loaded the script (the heal loads it where it is missing), else the first error."""
    for part in request.fragments:
        if not is_error(part.reply):
            return part.reply
    return request.fragments[0].reply


def _merge_exists(request: Request) -> bytes:
    """1 at each position where every server has the script, else 0."""
    error = first_error(request)
    if error is not None:
        return error
    merged: Optional[list] = None
    for part in request.fragments:
        try:
            header, elements = resp.split_aggregate(part.reply)
        except ValueError:
            return unexpected(part.reply)
        if header[:1] != b"*" or any(element[:1] != b":" for element in elements):
            return unexpected(part.reply)
        flags = [element == b":1\r\n" for element in elements]
        if merged is None:
            merged = flags
        elif len(flags) != len(merged):
            return unexpected(part.reply)
        else:
            merged = [a and b for a, b in zip(merged, flags)]
    return resp.array([b":1\r\n" if flag else b":0\r\n" for flag in merged or []])


# -- FUNCTION ------------------------------------------------------------------

_FUNCTION_EVERYWHERE = frozenset((b"load", b"delete", b"flush", b"restore"))


def plan_function(request: Request, router: Router) -> Routes:
    args = request.args
    sub = args[1].lower() if len(args) > 1 else b""
    arity = request.command.subcommands.get(sub)
    if arity is None or not fits(len(args), arity):
        return send_to(request, router, first_live(request, router), merge_one)   # Redis's own error
    if sub in _FUNCTION_EVERYWHERE:
        return send_to(request, router, every_server(request, router), merge_same)
    if sub == b"kill":
        return send_to(request, router, live_servers(request, router), merge_kill)
    return send_to(request, router, first_live(request, router), merge_one)   # LIST, DUMP, STATS, HELP


PLANNERS = {"script": plan_script, "function": plan_function}
SCRIPT_CALLS = ("eval", "eval_ro", "evalsha", "evalsha_ro")
