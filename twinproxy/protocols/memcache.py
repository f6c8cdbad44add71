"""The memcached text protocol: request framing, reply framing, routing and merges.

Owns: cutting a client stream into commands (a line, plus the data block
of a storage command), cutting a server stream into whole replies, which
commands route by key, which are split per server (``get``/``gets``/
``gat``/``gats``) or sent to every server (``flush_all``, ``verbosity``,
``stats``), the merge of their replies, and what the proxy answers itself
(``version``, ``quit``, errors).  Pure: no Twisted, no sockets, no pool.

``noreply`` is handled by the proxy, not passed on: the request goes to
the server without it, the server's reply is read and dropped.  A server
that answers an error to a ``noreply`` command (memcached does, for some)
can then never shift the replies of the requests behind it on a shared
connection.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, List, Tuple

from twinproxy import __version__
from twinproxy.config import PoolConfig
from twinproxy.protocols import ProtocolError, Router, Session, group_by_server
from twinproxy.protocols.memcache_text import (  # noqa: F401 - the framing, re-exported for callers
    _META_KEYED,
    _NAMES,
    _NOREPLY,
    _RETRIEVAL,
    _SERVER_ONLY,
    _STORAGE,
    BAD_FORMAT,
    CRLF,
    END,
    ERROR,
    MAX_KEY,
    MAX_LINE,
    MAX_VALUE,
    MERGE_SAME,
    MERGE_STATS,
    MERGE_VALUES,
    META_NOOP,
    META_NOOP_REPLY,
    MemcacheReplyFramer,
    MemcacheRequestParser,
    _is_int,
    bad_key,
    split_values,
)
from twinproxy.request import FORWARD, FRAGMENT, LOCAL, Request


class MemcacheCodec:
    """Codec for pools with ``redis: false``; one instance per pool."""

    default_dialect = 0
    # SERVER_ERROR, CLIENT_ERROR, ERROR by their first two bytes: one byte would also match STORED, END,
    # EXISTS, EN (and send nearly every reply to is_error).
    error_starts = frozenset((b"SE", b"CL", b"ER"))
    error_start_width = 2

    def __init__(self, config: PoolConfig) -> None:
        self._config = config
        self._started = time.time()
        self._version_reply = f"VERSION twinproxy-{__version__}\r\n".encode()
        self._handlers: Dict[bytes, Callable[[Request], None]] = {
            b"delete": self._delete,
            b"incr": self._arithmetic,
            b"decr": self._arithmetic,
            b"touch": self._touch,
            b"version": self._version,
            b"quit": self._quit,
            b"verbosity": self._verbosity,
            b"flush_all": self._flush_all,
            b"stats": self._stats,
        }
        for name in _RETRIEVAL:
            self._handlers[name] = self._retrieval
        for name in _META_KEYED:
            self._handlers[name] = self._meta
        self._handlers[b"mn"] = self._meta_noop

    # -- the Codec interface -------------------------------------------------

    def request_parser(self) -> MemcacheRequestParser:
        return MemcacheRequestParser(max_value=min(MAX_VALUE, self._config.max_request_bytes))

    def reply_framer(self) -> MemcacheReplyFramer:
        return MemcacheReplyFramer()

    def error_reply(self, message: str, code: str = "ERR") -> bytes:
        # memcached has one error line for the server's side; ``code`` is Redis's.
        return b"SERVER_ERROR " + message.replace("\r", " ").replace("\n", " ").encode("utf-8", "replace") + CRLF

    def protocol_error_reply(self, err: ProtocolError) -> bytes:
        return str(err).encode("utf-8", "replace") + CRLF

    def is_error(self, reply: bytes) -> bool:
        return reply.startswith((b"SERVER_ERROR", b"CLIENT_ERROR", b"ERROR"))

    def handshake(self, profile: int) -> List[bytes]:
        return []

    def prepare(self, request: Request, session: Session) -> None:
        if request.reply is not None:  # the parser already answered it
            request.kind = LOCAL
            return
        name = request.args[0]
        request.name = _NAMES.get(name, "unknown")
        if name in _STORAGE:
            request.kind = FORWARD
            request.key = request.args[1]
            return
        handler = self._handlers.get(name)
        if handler is not None:
            handler(request)
        elif name in _SERVER_ONLY:
            # A pool has no one answer to a question about one server.
            self._answer(request, self.error_reply(f"'{name.decode('latin-1')}' not supported by twinproxy"))
        else:
            self._answer(request, ERROR)

    def fragment(self, request: Request, router: Router) -> List[Tuple[Any, Request]]:
        if request.command is MERGE_VALUES:
            return self._split_keys(request, router)
        servers = list(router.live_servers)
        if not servers:
            self._answer(request, self.error_reply("no live server in the pool"))
            return []
        routes = []
        for server in servers:
            fragment = Request(request.raw, request.args)
            fragment.key = server.name.encode()
            routes.append((server, fragment))
        return routes

    def coalesce(self, request: Request) -> bytes:
        merge = request.command
        fragments = request.fragments
        if merge is MERGE_VALUES:
            return self._merge_values(request)
        if merge is MERGE_STATS:
            return self._merge_stats(fragments)
        return self._merge_same(request)

    # -- commands -----------------------------------------------------------

    def _answer(self, request: Request, reply: bytes) -> None:
        request.kind = LOCAL
        request.reply = reply

    def _strip_noreply(self, request: Request, base: int) -> bool:
        """Drop a trailing ``noreply`` from a command of ``base`` tokens; say if it was there."""
        args = request.args
        if len(args) == base + 1 and args[-1] == _NOREPLY:
            request.raw = b" ".join(args[:-1]) + CRLF
            request.quiet = True
            return True
        return False

    def _keyed(self, request: Request, base: int) -> None:
        args = request.args
        if len(args) not in (base, base + 1):
            self._answer(request, ERROR)
            return
        self._strip_noreply(request, base)
        if bad_key(args[1]):
            self._answer(request, BAD_FORMAT)
            return
        request.kind = FORWARD
        request.key = args[1]

    def _delete(self, request: Request) -> None:
        # delete <key> [0] [noreply]: memcached still takes the legacy zero hold time.
        args = request.args
        count = len(args)
        if count < 2 or count > 4:
            self._answer(request, ERROR)
            return
        if bad_key(args[1]):
            self._answer(request, BAD_FORMAT)
            return
        extra = args[2:]
        if extra and extra[-1] == _NOREPLY:
            request.quiet = True
            extra = extra[:-1]
        if extra not in ([], [b"0"]):
            self._answer(request, b"CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]\r\n")
            return
        if request.quiet:
            request.raw = b"delete " + args[1] + CRLF
        request.kind = FORWARD
        request.key = args[1]

    def _arithmetic(self, request: Request) -> None:
        self._keyed(request, 3)

    def _touch(self, request: Request) -> None:
        self._keyed(request, 3)

    def _retrieval(self, request: Request) -> None:
        args = request.args
        first = _RETRIEVAL[args[0]]
        if len(args) == 1:
            self._answer(request, ERROR)
            return
        if first == 2 and not _is_int(args[1]):
            self._answer(request, b"CLIENT_ERROR invalid exptime argument\r\n")
            return
        if len(args) == first:
            self._answer(request, END)
            return
        for key in args[first:]:
            if bad_key(key):
                self._answer(request, BAD_FORMAT)
                return
        request.command = MERGE_VALUES
        if len(args) == first + 1:
            request.kind = FORWARD
            request.key = args[first]
        else:
            request.kind = FRAGMENT

    def _meta(self, request: Request) -> None:
        args = request.args
        if len(args) < 2:
            self._answer(request, BAD_FORMAT)
            return
        flags = args[2:] if args[0] != b"ms" else args[3:]
        if b"b" not in flags and bad_key(args[1]):  # b: the key is base64, routed as sent
            self._answer(request, BAD_FORMAT)
            return
        if b"q" in flags:
            # Quiet mode leaves some replies out, depending on the outcome, so
            # they could not be matched to requests by order: a no-op after
            # the request makes the server end every reply with MN, which
            # the proxy drops.  Exactly what memcached sends reaches the client.
            request.raw += META_NOOP
            request.terminator = META_NOOP_REPLY
            request.gathered = []
        request.kind = FORWARD
        request.key = args[1]

    def _meta_noop(self, request: Request) -> None:
        self._answer(request, META_NOOP_REPLY)

    def _version(self, request: Request) -> None:
        # memcached ignores any arguments to version (and to quit), so clients may send them.
        self._answer(request, self._version_reply)

    def _quit(self, request: Request) -> None:
        # memcached closes without a word; the empty reply keeps the close in order.
        self._answer(request, b"")
        request.close_after = True

    def _broadcast(self, request: Request, merge: str) -> None:
        request.command = merge
        request.kind = FRAGMENT

    def _verbosity(self, request: Request) -> None:
        # The level itself is the servers' to check; they answer alike, and alike is passed on.
        args = request.args
        if len(args) > 3:
            self._answer(request, ERROR)
            return
        if len(args) > 1:
            self._strip_noreply(request, len(args) - 1)
        if len(args) - request.quiet < 2:  # no level: memcached's ERROR (unheard under noreply)
            self._answer(request, ERROR)
            return
        self._broadcast(request, MERGE_SAME)

    def _flush_all(self, request: Request) -> None:
        args = request.args
        if len(args) > 3:
            self._answer(request, ERROR)
            return
        if len(args) >= 2:
            self._strip_noreply(request, len(args) - 1)
        self._broadcast(request, MERGE_SAME)

    def _stats(self, request: Request) -> None:
        args = request.args
        if len(args) == 1:
            self._broadcast(request, MERGE_STATS)
        elif args[1] == b"reset":
            self._broadcast(request, MERGE_SAME)
        else:
            # Short: some clients read error lines into 80-byte buffers.
            shown = b" ".join(args[:2]).decode("latin-1")[:40]
            self._answer(request, self.error_reply(f"'{shown}' not supported by twinproxy"))

    # -- split and merge ----------------------------------------------------

    def _split_keys(self, request: Request, router: Router) -> List[Tuple[Any, Request]]:
        args = request.args
        first = _RETRIEVAL[args[0]]
        head = args[:first]
        servers = router.servers_for_keys(args[first:])
        if servers.count(servers[0]) == len(servers):
            request.kind = FORWARD
            request.key = args[first]
            return [(servers[0], request)]
        groups = group_by_server(range(first, len(args)), servers)
        routes = []
        for server, positions in groups.items():
            fragment_args = head + [args[p] for p in positions]
            fragment = Request(b" ".join(fragment_args) + CRLF, fragment_args)
            fragment.positions = positions
            routes.append((server, fragment))
        return routes

    def _merge_values(self, request: Request) -> bytes:
        args = request.args
        # Items by key position; a key the servers did not return stays b"".
        merged = [b""] * (len(args) + 1)
        merged[-1] = END
        for fragment in request.fragments:
            reply = fragment.reply
            if not reply.endswith(END) or self.is_error(reply):
                return reply if reply.startswith((b"SERVER_ERROR", b"CLIENT_ERROR")) else \
                    self.error_reply("unexpected reply from server")
            items = split_values(reply)
            count = len(items)
            index = 0
            for position in fragment.positions:
                if index < count and items[index][0] == args[position]:
                    merged[position] = items[index][1]
                    index += 1
        return b"".join(merged)

    def _merge_same(self, request: Request) -> bytes:
        fragments = request.fragments
        replies = {f.reply for f in fragments}
        expected = b"RESET\r\n" if request.args[0] == b"stats" else b"OK\r\n"
        if replies == {expected}:
            return expected
        if len(replies) == 1:  # every server refused it the same way
            return replies.pop()
        failed = [f for f in fragments if f.reply != expected]
        names = ", ".join(f.key.decode("latin-1") for f in failed)
        reason = failed[0].reply.strip().decode("latin-1")
        return self.error_reply(f"{request.args[0].decode('latin-1')} failed on {names}: {reason}")

    def _merge_stats(self, fragments: List[Request]) -> bytes:
        order: List[bytes] = []
        values: Dict[bytes, List[bytes]] = {}
        for fragment in fragments:
            reply = fragment.reply
            if not reply.endswith(END) or self.is_error(reply):
                return self.error_reply(f"stats failed on {fragment.key.decode('latin-1')}: "
                                        f"{reply.strip().decode('latin-1')}")
            for line in reply[:-len(END)].split(CRLF):
                parts = line.split(b" ", 2)
                if len(parts) != 3:
                    continue
                name = parts[1]
                if name not in values:
                    values[name] = []
                    order.append(name)
                values[name].append(parts[2])
        own = {
            b"pid": str(os.getpid()).encode(),
            b"uptime": str(int(time.time() - self._started)).encode(),
            b"time": str(int(time.time())).encode(),
            b"version": f"twinproxy-{__version__}".encode(),
        }
        lines = []
        for name in order:
            if name in own:
                value = own.pop(name)
            else:
                seen = values[name]
                if name not in _NOT_SUMMED and all(v.isdigit() for v in seen):
                    value = str(sum(int(v) for v in seen)).encode()
                else:
                    value = seen[0]
            lines.append(b"STAT " + name + b" " + value + CRLF)
        for name, value in own.items():
            lines.append(b"STAT " + name + b" " + value + CRLF)
        lines.append(b"STAT servers " + str(len(fragments)).encode() + CRLF)
        return b"".join(lines) + END


# Per-server facts, not counters: the first server's value stands for the pool.
_NOT_SUMMED = frozenset(
    b"pointer_size threads max_connections reserved_fds hash_power_level libevent".split())
