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
from typing import Any, Callable, Dict, List, Optional, Tuple

from twinproxy import __version__
from twinproxy.config import PoolConfig
from twinproxy.protocols import ProtocolError, Router, Session, group_by_server
from twinproxy.protocols.buffers import append_pending, speedups
from twinproxy.request import FORWARD, FRAGMENT, LOCAL, Request

CRLF = b"\r\n"
MAX_KEY = 250
# memcached drops a client whose line has no newline after this many bytes,
# unless it is a retrieval (a long multi-get); those get MAX_GET_LINE.
MAX_LINE = 2048
MAX_GET_LINE = 2 * 1024 * 1024
# memcached's own ceiling for an item (-I at most 1 GiB).
MAX_VALUE = 1024 * 1024 * 1024
MAX_REPLY_LINE = 64 * 1024

_NOREPLY = b"noreply"
_CONTROL = bytes(range(33)) + b"\x7f"

ERROR = b"ERROR\r\n"
BAD_FORMAT = b"CLIENT_ERROR bad command line format\r\n"
BAD_CHUNK = b"CLIENT_ERROR bad data chunk\r\n"
TOO_LARGE = b"SERVER_ERROR object too large for cache\r\n"
END = b"END\r\n"

_STORAGE = frozenset((b"set", b"add", b"replace", b"append", b"prepend", b"cas"))
# Where the first key is, for each retrieval command.
_RETRIEVAL = {b"get": 1, b"gets": 1, b"gat": 2, b"gats": 2}
_RETRIEVAL_PREFIXES = (b"get ", b"gets ", b"gat ", b"gats ")
# Commands a single memcached answers about itself; a pool of them has no one answer.
_SERVER_ONLY = frozenset(
    b"slabs lru_crawler lru watch cache_memlimit shutdown misbehave debugtime extstore".split())
# Meta commands routed by their key (``ms`` carries a data block, framed by the parser).
_META_KEYED = frozenset((b"mg", b"ms", b"md", b"ma", b"me"))
META_NOOP = b"mn\r\n"
META_NOOP_REPLY = b"MN\r\n"

_NAMES = {name: name.decode("ascii") for name in (
    *_STORAGE, *_RETRIEVAL, *_SERVER_ONLY, *_META_KEYED, b"mn",
    b"delete", b"incr", b"decr", b"touch", b"version", b"quit", b"verbosity", b"flush_all", b"stats")}

# Merge kinds.
MERGE_VALUES = "values"
MERGE_SAME = "same"
MERGE_STATS = "stats"


def bad_key(key: bytes) -> bool:
    """True for a key memcached's text protocol cannot carry safely."""
    return len(key) > MAX_KEY or len(key.translate(None, _CONTROL)) != len(key)


def _is_int(token: bytes) -> bool:
    digits = token[1:] if token[:1] == b"-" else token
    return digits.isdigit() and len(digits) <= 19


class MemcacheRequestParser:
    """Cuts a client stream into :class:`Request` objects.

    ``args`` is the command line's tokens; ``raw`` what the server is sent
    (the line and, for a storage command, its data block).  Errors memcached
    answers and reads on from come back as requests with ``reply`` set; only
    a line too long to be a command raises :class:`ProtocolError`.
    """

    def __init__(self, max_value: int = MAX_VALUE) -> None:
        self._buf: Any = b""   # bytes or bytearray, as buffers.append_pending keeps it
        self._pos = 0
        self._need = 0
        self._skip = 0
        self._max_value = max_value

    def feed(self, data: bytes) -> None:
        self._buf, moved = append_pending(self._buf, self._pos, data)
        if moved:
            self._pos -= moved
            self._need = max(0, self._need - moved)

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def next(self) -> Optional[Request]:
        buf = self._buf
        end = len(buf)
        if self._skip:
            dropped = min(self._skip, end - self._pos)
            self._skip -= dropped
            self._pos += dropped
            if self._skip:
                return None
        pos = self._pos
        if pos >= end or end < self._need:
            return None
        newline = buf.find(b"\n", pos)
        if newline < 0:
            self._check_line_length(buf, pos, end)
            return None
        line_end = newline - 1 if newline > pos and buf[newline - 1] == 13 else newline
        tokens = [t for t in bytes(buf[pos:line_end]).split(b" ") if t]
        cursor = newline + 1
        if tokens and tokens[0] in _STORAGE:
            return self._storage(buf, pos, cursor, end, tokens)
        if tokens and tokens[0] == b"ms":
            return self._meta_set(buf, pos, cursor, end, tokens)
        self._pos = cursor
        if not tokens:
            return _local(ERROR)
        return Request(bytes(buf[pos:cursor]), tokens)

    def _check_line_length(self, buf: bytearray, pos: int, end: int) -> None:
        length = end - pos
        if length <= MAX_LINE:
            return
        head = bytes(buf[pos:pos + 110]).lstrip(b" ")
        if length <= MAX_GET_LINE and head.startswith(_RETRIEVAL_PREFIXES):
            return
        raise ProtocolError("CLIENT_ERROR line too long")

    def _storage(self, buf: bytearray, pos: int, cursor: int, end: int,
                 tokens: List[bytes]) -> Optional[Request]:
        is_cas = tokens[0] == b"cas"
        count = len(tokens)
        base = 6 if is_cas else 5
        if count not in (base, base + 1):
            self._pos = cursor
            return _local(ERROR)
        length_text = tokens[4]
        if not length_text.isdigit() or len(length_text) > 10:
            # No length to skip by: memcached reads the data as the next command; so do we.
            self._pos = cursor
            return _local(BAD_FORMAT)
        length = int(length_text)
        quiet = count == base + 1 and tokens[-1] == _NOREPLY
        header_ok = (not bad_key(tokens[1]) and tokens[2].isdigit() and len(tokens[2]) <= 10
                     and _is_int(tokens[3]) and (not is_cas or tokens[5].isdigit()))
        if not header_ok or length > self._max_value:
            # The client meant the block as data: skip it rather than run it.
            self._pos = cursor
            self._skip = length + 2
            request = _local(BAD_FORMAT if not header_ok else TOO_LARGE)
            request.quiet = quiet
            return request
        stop = cursor + length + 2
        if stop > end:
            self._need = stop
            return None
        self._need = 0
        self._pos = stop
        if buf[stop - 2] != 13 or buf[stop - 1] != 10:
            request = _local(BAD_CHUNK)
            request.quiet = quiet
            return request
        if quiet:
            raw = b" ".join(tokens[:-1]) + CRLF + bytes(buf[cursor:stop])
        else:
            raw = bytes(buf[pos:stop])
        request = Request(raw, tokens)
        request.quiet = quiet
        return request


    def _meta_set(self, buf: bytearray, pos: int, cursor: int, end: int,
                  tokens: List[bytes]) -> Optional[Request]:
        """``ms <key> <datalen> <flags>*`` and its data block."""
        if len(tokens) < 3 or not tokens[2].isdigit() or len(tokens[2]) > 10:
            self._pos = cursor
            return _local(BAD_FORMAT)
        length = int(tokens[2])
        flags = tokens[3:]
        refusal = None
        if b"b" not in flags and bad_key(tokens[1]):
            refusal = BAD_FORMAT
        elif length > self._max_value:
            refusal = TOO_LARGE
        if refusal is not None:
            self._pos = cursor
            self._skip = length + 2
            return _local(refusal)
        stop = cursor + length + 2
        if stop > end:
            self._need = stop
            return None
        self._need = 0
        self._pos = stop
        if buf[stop - 2] != 13 or buf[stop - 1] != 10:
            return _local(BAD_CHUNK)
        return Request(bytes(buf[pos:stop]), tokens)


def _local(reply: bytes) -> Request:
    request = Request(b"")
    request.kind = LOCAL
    request.reply = reply
    return request


class MemcacheReplyFramer:
    """Cuts a server stream into whole replies: one line, or VALUE/STAT lines up to END."""

    def __init__(self) -> None:
        self._buf: Any = b""   # bytes or bytearray, as buffers.append_pending keeps it
        self._pos = 0      # start of the reply being framed
        self._cursor = 0   # where framing of that reply resumes
        self._scan_reply = speedups.scan_memcache_reply if speedups is not None else None

    def feed(self, data: bytes) -> None:
        self._buf, moved = append_pending(self._buf, self._pos, data)
        if moved:
            self._pos -= moved
            self._cursor -= moved

    def next(self) -> Optional[bytes]:
        buf = self._buf
        end = len(buf)
        cursor = self._cursor
        scan = self._scan_reply
        if scan is not None and cursor == self._pos and cursor < end:
            # The C scanner keeps no resume state: what it leaves (partial or
            # odd) the code below takes, and resumes, from the reply's start.
            stop = scan(buf, cursor, end)
            if stop >= 0:
                self._pos = self._cursor = stop
                return buf[cursor:stop] if type(buf) is bytes else bytes(buf[cursor:stop])
        while True:
            if cursor >= end:
                return None
            eol = buf.find(CRLF, cursor)
            if eol < 0:
                if end - cursor > MAX_REPLY_LINE:
                    raise ProtocolError("reply line too long")
                return None
            if buf.startswith(b"VALUE ", cursor):
                parts = bytes(buf[cursor:eol]).split(b" ")
                if len(parts) not in (4, 5) or not parts[3].isdigit():
                    raise ProtocolError("malformed VALUE line in reply")
                stop = eol + 2 + int(parts[3]) + 2
                if stop > end:
                    return None
                if buf[stop - 2] != 13 or buf[stop - 1] != 10:
                    raise ProtocolError("VALUE data not terminated by CRLF")
                cursor = self._cursor = stop
                continue
            if buf.startswith(b"STAT ", cursor):
                cursor = self._cursor = eol + 2
                continue
            if buf.startswith(b"VA ", cursor):  # a meta get's value: one line, one data block
                parts = bytes(buf[cursor:eol]).split(b" ", 2)
                if not parts[1].isdigit():
                    raise ProtocolError("malformed VA line in reply")
                stop = eol + 2 + int(parts[1]) + 2
                if stop > end:
                    return None
                if buf[stop - 2] != 13 or buf[stop - 1] != 10:
                    raise ProtocolError("VA data not terminated by CRLF")
                start = self._pos
                self._pos = self._cursor = stop
                return bytes(buf[start:stop])
            start = self._pos
            self._pos = self._cursor = eol + 2
            return bytes(buf[start:eol + 2])


def split_values(reply: bytes) -> List[Tuple[bytes, bytes]]:
    """A retrieval reply's items as ``(key, item bytes)``, without the END."""
    if speedups is not None:
        found = speedups.split_values(reply)
        if found is not None:
            return found
    items = []
    pos = 0
    end = len(reply)
    while pos < end and reply.startswith(b"VALUE ", pos):
        eol = reply.index(CRLF, pos)
        parts = reply[pos:eol].split(b" ")
        stop = eol + 2 + int(parts[3]) + 2
        items.append((parts[1], reply[pos:stop]))
        pos = stop
    return items


class MemcacheCodec:
    """Codec for pools with ``redis: false``; one instance per pool."""

    default_dialect = 0

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

    def error_reply(self, message: str) -> bytes:
        return b"SERVER_ERROR " + message.replace("\r", " ").replace("\n", " ").encode("utf-8", "replace") + CRLF

    def protocol_error_reply(self, err: ProtocolError) -> bytes:
        return str(err).encode("utf-8", "replace") + CRLF

    def is_error(self, reply: bytes) -> bool:
        return reply.startswith((b"SERVER_ERROR", b"CLIENT_ERROR", b"ERROR"))

    def handshake(self, dialect: int) -> List[bytes]:
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
