"""The memcached text protocol's framing: cutting client and server streams into messages.

Owns: :class:`MemcacheRequestParser` (a client stream into commands: a
line, plus the data block of a storage command, with memcached's limits),
:class:`MemcacheReplyFramer` (a server stream into whole replies),
:func:`split_values` (a retrieval reply's items), key validity and the
protocol's constants.  Pure: no Twisted, no sockets, no pool; the codec
(``memcache.py``) decides what each command means for routing.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

from twinproxy.protocols import ProtocolError
from twinproxy.protocols.buffers import append_pending, speedups
from twinproxy.request import LOCAL, Request

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
