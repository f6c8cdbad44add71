"""RESP2 and RESP3 on the wire: request parsing, reply framing, encoding.

Owns: cutting a client byte stream into commands (multibulk and inline, as
Redis accepts them), cutting a server byte stream into whole replies of any
RESP3 type without decoding them, and building the few replies the proxy
writes itself.  Pure: no Twisted, no commands, no routing.

Both parsers keep their pending bytes as :func:`buffers.append_pending`
says, so a request that arrives one byte at a time costs linear, not
quadratic, time.  Replies are framed but never decoded: their bytes pass
to clients as the server wrote them.

On CPython the common case of both (a request or reply that is whole and
well formed) is scanned by ``twinproxy._speedups`` when it was built; the
code here is the reference, takes everything else, and is all there is on
PyPy or with ``TWINPROXY_PURE_PYTHON=1`` in the environment.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

from twinproxy.protocols import ProtocolError
from twinproxy.protocols.buffers import append_pending, speedups
from twinproxy.request import Request

CRLF = b"\r\n"

# Limits Redis itself applies to client input (PROTO_INLINE_MAX_SIZE,
# proto-max-bulk-len, the multibulk count bound).
MAX_INLINE = 64 * 1024
MAX_BULK = 512 * 1024 * 1024
MAX_ARGS = 1024 * 1024
# A reply header or simple line longer than this, with no CRLF, is garbage.
MAX_REPLY_LINE = 1024 * 1024

# RESP3 types: one line; length-prefixed blob; counted aggregate.
_LINE_TYPES = frozenset(b"+-:_,#(")
_BLOB_TYPES = frozenset(b"$!=")
_AGGREGATE_ELEMENTS = {ord("*"): 1, ord("~"): 1, ord(">"): 1, ord("%"): 2, ord("|"): 2}
_ATTRIBUTE = ord("|")
_PUSH = ord(">")
_BULK = ord("$")
_STAR = ord("*")


def _number(buf: bytearray, start: int, stop: int) -> Optional[int]:
    """Parse a strict decimal (optional leading minus); None if malformed."""
    text = bytes(buf[start:stop])
    digits = text[1:] if text[:1] == b"-" else text
    if not digits.isdigit() or len(digits) > 19:
        return None
    return int(text)


class RespRequestParser:
    """Cuts a client stream into :class:`Request` objects with ``args`` filled.

    ``raw`` is always a RESP multibulk, so an inline command is re-encoded
    once here and backends only ever see RESP.  A multibulk that arrives in
    pieces is parsed once: the arguments already read are kept, and parsing
    resumes where it stopped, so a 100,000-key MGET costs linear time
    however it is cut.  ``max_request`` bounds one request's size.
    """

    def __init__(self, max_bulk: int = MAX_BULK, max_args: int = MAX_ARGS,
                 max_request: int = MAX_BULK) -> None:
        # ``bytes`` while requests come whole or in a few small pieces (slices
        # of it are the arguments, one copy each); a ``bytearray`` once a
        # request is bigger than buffers.SMALL_JOIN and arrives in pieces.
        self._buf: Any = b""
        self._pos = 0
        self._need = 0
        self._max_bulk = min(max_bulk, max_request)
        self._max_args = max_args
        self._max_request = max_request
        # A multibulk in progress: its arguments so far, where the next one starts, how many are left.
        self._args: Optional[List[bytes]] = None
        self._cursor = 0
        self._left = 0
        self._scan_request = speedups.scan_request if speedups is not None else None

    def feed(self, data: bytes) -> None:
        self._buf, moved = append_pending(self._buf, self._pos, data)
        if moved:
            self._shift(moved)

    def _shift(self, pos: int) -> None:
        """The buffer now starts at what was ``pos``: move the offsets that point into it."""
        self._pos = 0
        self._need = max(0, self._need - pos)
        self._cursor = max(0, self._cursor - pos)

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as a request."""
        return len(self._buf) - self._pos

    def next(self) -> Optional[Request]:
        buf = self._buf
        end = len(buf)
        while True:
            pos = self._pos
            if pos >= end or end < self._need:
                return None
            if self._args is not None:
                request = self._arguments(buf, pos, end)
            elif buf[pos] != _STAR:
                request = self._inline(buf, pos, end)
            else:
                scan = self._scan_request
                if scan is not None:
                    found = scan(buf, pos, self._max_bulk, self._max_args, pos + self._max_request)
                    if found is not None:
                        args, raw, self._pos = found
                        return Request(raw, args)
                request = self._multibulk(buf, pos, end)
            if request is not False:
                return request

    def _multibulk(self, buf: bytearray, pos: int, end: int):
        eol = buf.find(CRLF, pos)
        if eol < 0:
            if end - pos > MAX_INLINE:
                raise ProtocolError("Protocol error: too big mbulk count string")
            return None
        first = buf[pos + 1] if eol > pos + 1 else 0
        if (first != 45 and not 48 <= first <= 57) or eol - pos > 21:  # '-' or a digit
            raise ProtocolError("Protocol error: invalid multibulk length")
        try:
            count = int(buf[pos + 1:eol])
        except ValueError:
            raise ProtocolError("Protocol error: invalid multibulk length") from None
        if count > self._max_args:
            raise ProtocolError("Protocol error: invalid multibulk length")
        if count <= 0:
            # Redis treats '*0' and '*-1' as an empty command and reads on.
            self._pos = eol + 2
            return False
        self._args = []
        self._cursor = eol + 2
        self._left = count
        return self._arguments(buf, pos, end)

    def _arguments(self, buf: bytearray, pos: int, end: int):
        args = self._args
        append = args.append
        cursor = self._cursor
        left = self._left
        max_bulk = self._max_bulk
        limit = pos + self._max_request
        find = buf.find
        whole = type(buf) is bytes  # its slices are bytes already
        while left:
            if cursor >= end:
                break
            if buf[cursor] != _BULK:
                self._cursor = cursor
                got = chr(buf[cursor]) if 32 <= buf[cursor] < 127 else f"\\x{buf[cursor]:02x}"
                raise ProtocolError(f"Protocol error: expected '$', got '{got}'")
            eol = find(CRLF, cursor)
            if eol < 0:
                if end - cursor > MAX_INLINE:
                    raise ProtocolError("Protocol error: too big bulk count string")
                break
            # int() takes the bytearray slice as it is; the first-byte check
            # keeps out the signs and spaces it would also accept.
            first = buf[cursor + 1] if eol > cursor + 1 else 0
            if not 48 <= first <= 57 or eol - cursor > 20:
                raise ProtocolError("Protocol error: invalid bulk length")
            try:
                length = int(buf[cursor + 1:eol])
            except ValueError:
                raise ProtocolError("Protocol error: invalid bulk length") from None
            if length > max_bulk:
                raise ProtocolError("Protocol error: invalid bulk length")
            start = eol + 2
            stop = start + length
            if stop + 2 > limit:
                raise ProtocolError(f"Protocol error: request bigger than {self._max_request} bytes")
            if stop + 2 > end:
                self._need = stop + 2
                break
            if buf[stop] != 13 or buf[stop + 1] != 10:
                raise ProtocolError("Protocol error: expected CRLF after bulk string")
            append(buf[start:stop] if whole else bytes(buf[start:stop]))
            cursor = stop + 2
            left -= 1
        self._cursor = cursor
        self._left = left
        if left:
            return None
        self._args = None
        self._pos = cursor
        self._need = 0
        return Request(buf[pos:cursor] if whole else bytes(buf[pos:cursor]), args)

    def _inline(self, buf: bytearray, pos: int, end: int):
        newline = buf.find(b"\n", pos)
        if newline < 0:
            if end - pos > MAX_INLINE:
                raise ProtocolError("Protocol error: too big inline request")
            return None
        line = bytes(buf[pos:newline])
        self._pos = newline + 1
        if line.endswith(b"\r"):
            line = line[:-1]
        args = split_inline(line)
        if args is None:
            raise ProtocolError("Protocol error: unbalanced quotes in request")
        if not args:
            return False
        return Request(encode_command(args), args)


_ESCAPES = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("b"): b"\b", ord("a"): b"\a"}
_HEX = b"0123456789abcdefABCDEF"


def split_inline(line: bytes) -> Optional[List[bytes]]:
    """Split an inline command as Redis does (quotes and escapes); None if unbalanced."""
    args: List[bytes] = []
    i = 0
    n = len(line)
    while True:
        while i < n and line[i] in b" \t\n\r\v\f":
            i += 1
        if i >= n:
            return args
        current = bytearray()
        quote = 0
        while True:
            if i >= n:
                if quote:
                    return None
                break
            c = line[i]
            if quote == 0x22:  # inside "..."
                if (c == 0x5C and i + 3 < n and line[i + 1] == ord("x")
                        and line[i + 2] in _HEX and line[i + 3] in _HEX):
                    current.append(int(line[i + 2:i + 4], 16))
                    i += 3
                elif c == 0x5C and i + 1 < n:
                    i += 1
                    current += _ESCAPES.get(line[i], bytes((line[i],)))
                elif c == 0x22:
                    if i + 1 < n and line[i + 1] not in b" \t\n\r\v\f":
                        return None
                    i += 1
                    break
                else:
                    current.append(c)
            elif quote == 0x27:  # inside '...'
                if c == 0x5C and i + 1 < n and line[i + 1] == 0x27:
                    i += 1
                    current.append(0x27)
                elif c == 0x27:
                    if i + 1 < n and line[i + 1] not in b" \t\n\r\v\f":
                        return None
                    i += 1
                    break
                else:
                    current.append(c)
            elif c in b" \t\n\r\v\f":
                break
            elif c in (0x22, 0x27):
                quote = c
            else:
                current.append(c)
            i += 1
        args.append(bytes(current))


def scan_value(buf: bytes | bytearray, pos: int, end: int) -> int:
    """Return the offset just past the RESP value at ``pos``, or -1 if incomplete.

    An attribute (``|``) and the value it annotates count as one value.
    Raises ProtocolError on bytes that are not RESP.
    """
    return _scan(buf, pos, end, None)[0]


def _scan(buf: bytes | bytearray, pos: int, end: int, stack: Optional[List[int]]) -> Tuple[int, int, Any]:
    """Scan one value from ``pos`` with ``stack`` (elements left in each open aggregate).

    Returns ``(stop, pos, stack)``: ``stop`` is the offset past the value, or
    -1 when the bytes end first, and then ``pos`` and ``stack`` say where to
    resume once more bytes come, without reading again what was read.
    """
    while True:
        if pos >= end:
            return -1, pos, stack
        kind = buf[pos]
        eol = buf.find(CRLF, pos, end)
        if eol < 0:
            if end - pos > MAX_REPLY_LINE:
                raise ProtocolError("reply line too long")
            return -1, pos, stack
        if kind in _LINE_TYPES:
            next_pos = eol + 2
        elif kind in _BLOB_TYPES:
            length = _reply_number(buf, pos + 1, eol)
            if length < -1 or (length == -1 and kind != _BULK):
                raise ProtocolError("invalid bulk length in reply")
            if length == -1:
                next_pos = eol + 2
            else:
                stop = eol + 2 + length
                if stop + 2 > end:
                    return -1, pos, stack
                if buf[stop] != 13 or buf[stop + 1] != 10:
                    raise ProtocolError("bulk reply not terminated by CRLF")
                next_pos = stop + 2
        else:
            per_entry = _AGGREGATE_ELEMENTS.get(kind)
            if per_entry is None:
                raise ProtocolError(f"unexpected reply type byte 0x{kind:02x}")
            count = _reply_number(buf, pos + 1, eol)
            if count < -1 or (count == -1 and kind != _STAR):
                raise ProtocolError("invalid aggregate length in reply")
            pos = eol + 2
            children = count * per_entry if count > 0 else 0
            if kind == _ATTRIBUTE:
                children += 1  # the annotated value that follows
            if children and kind == _STAR and not stack:
                # An array of bulk strings (MGET, LRANGE, HMGET ...), the most
                # common aggregate, skipped element by element with no stack.
                while children:
                    if pos >= end or buf[pos] != _BULK:
                        break
                    eol = buf.find(CRLF, pos, end)
                    if eol < 0:
                        break  # the general path below waits, or reports a line too long
                    length = _reply_number(buf, pos + 1, eol)
                    if length < 0:
                        if length != -1:
                            raise ProtocolError("invalid bulk length in reply")
                        pos = eol + 2
                    else:
                        stop = eol + 2 + length
                        if stop + 2 > end:
                            break
                        if buf[stop] != 13 or buf[stop + 1] != 10:
                            raise ProtocolError("bulk reply not terminated by CRLF")
                        pos = stop + 2
                    children -= 1
                if not children:
                    return pos, pos, None
            if children:
                stack = [*stack, children] if stack else [children]
                continue
            next_pos = pos
        pos = next_pos
        # One whole value ends at ``pos``: close every aggregate it completes.
        if not stack:
            return pos, pos, None
        while True:
            stack[-1] -= 1
            if stack[-1]:
                break
            stack.pop()
            if not stack:
                return pos, pos, None


class RespReplyFramer:
    """Cuts a server stream into whole replies, as raw bytes.

    Out-of-band push messages (``>``) are dropped: on a request/reply
    connection they answer no request.  With ``pushes`` they are framed like
    any reply (a subscriber connection, whose messages are pushes in RESP3).
    A reply that arrives in pieces is scanned once: scanning resumes at the
    element where the bytes ran out.
    """

    def __init__(self, pushes: bool = False) -> None:
        self._pushes = pushes
        # bytes or bytearray, as in RespRequestParser: replies that come whole
        # are sliced out of the bytes they came in, with no copy to a buffer.
        self._buf: Any = b""
        self._pos = 0       # start of the reply being framed
        self._resume = 0    # where scanning of it resumes
        self._stack: Optional[List[int]] = None
        self._scan_reply = speedups.scan_reply if speedups is not None else None

    def feed(self, data: bytes) -> None:
        self._buf, moved = append_pending(self._buf, self._pos, data)
        if moved:
            self._pos = 0
            self._resume -= moved

    def next(self) -> Optional[bytes]:
        buf = self._buf
        end = len(buf)
        scan = self._scan_reply
        while True:
            start = self._pos
            if start >= end:
                return None
            # The C scanner keeps no resume state: it only starts replies, and
            # what it leaves (partial or odd) the Python scanner takes, so a
            # long reply arriving in pieces is still scanned once.
            stop = scan(buf, start, end) if scan is not None and self._resume == start else -1
            if stop < 0:
                stop, resume, stack = _scan(buf, self._resume, end, self._stack)
                if stop < 0:
                    self._resume = resume
                    self._stack = stack
                    return None
            self._pos = self._resume = stop
            self._stack = None
            if buf[start] != _PUSH or self._pushes:
                return buf[start:stop] if type(buf) is bytes else bytes(buf[start:stop])


def _reply_number(buf: bytes | bytearray, start: int, stop: int) -> int:
    """A length in a server's reply.  Servers are trusted to write decimals, so
    ``int`` alone checks them (it would also take '+5' or '1_0'; no server writes those)."""
    if stop - start > 20:
        raise ProtocolError("invalid length in reply")
    try:
        return int(buf[start:stop])
    except ValueError:
        raise ProtocolError("invalid length in reply") from None


def split_bulk_array(reply: bytes) -> Optional[List[bytes]]:
    """The elements of an array reply made only of bulk strings and nulls (an
    MGET reply), found without the general scanner; None for any other reply."""
    if speedups is not None:
        elements = speedups.split_bulk_array(reply)
        if elements is not None:
            return elements
    if reply[:1] != b"*":
        return None
    eol = reply.find(CRLF)
    try:
        count = int(reply[1:eol])
    except ValueError:
        return None
    elements = []
    append = elements.append
    pos = eol + 2
    find = reply.find
    for _ in range(count):
        kind = reply[pos:pos + 1]
        eol = find(CRLF, pos)
        if eol < 0:
            return None
        if kind == b"$":
            try:
                length = int(reply[pos + 1:eol])
            except ValueError:
                return None
            stop = eol + 2 if length < 0 else eol + 4 + length
        elif kind == b"_":
            stop = eol + 2
        else:
            return None
        append(reply[pos:stop])
        pos = stop
    return elements if pos == len(reply) else None


def split_aggregate(reply: bytes) -> Tuple[bytes, List[bytes]]:
    """Return an aggregate reply's header line and its elements' raw bytes."""
    eol = reply.index(CRLF)
    header = reply[:eol + 2]
    elements = []
    pos = eol + 2
    end = len(reply)
    while pos < end:
        stop = scan_value(reply, pos, end)
        if stop < 0:
            raise ProtocolError("truncated aggregate")
        elements.append(reply[pos:stop])
        pos = stop
    return header, elements


def encode_command(args: Sequence[bytes]) -> bytes:
    """Encode a command as a RESP multibulk."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


def encode_fragment(args: List[bytes], positions: List[int], width: int) -> bytes:
    """The multibulk of ``args[0]`` and, for each index in ``positions``, the
    ``width`` arguments from it: a split command's part for one server."""
    if speedups is not None:
        return speedups.encode_fragment(args, positions, width)
    return encode_command([args[0], *(arg for position in positions for arg in args[position:position + width])])


def simple(text: bytes) -> bytes:
    return b"+" + text + CRLF


def error(message: str) -> bytes:
    """An error reply; CR and LF in ``message`` are replaced so it stays one line."""
    return b"-" + message.replace("\r", " ").replace("\n", " ").encode("utf-8", "replace") + CRLF


def integer(value: int) -> bytes:
    return b":%d\r\n" % value


def bulk(value: Optional[bytes], dialect: int = 2) -> bytes:
    if value is None:
        return null(dialect)
    return b"$%d\r\n%s\r\n" % (len(value), value)


def null(dialect: int) -> bytes:
    return b"_\r\n" if dialect == 3 else b"$-1\r\n"


def array(items: Sequence[bytes]) -> bytes:
    """An array of already-encoded items."""
    return b"*%d\r\n" % len(items) + b"".join(items)


def mapping(pairs: Sequence[Tuple[bytes, bytes]], dialect: int) -> bytes:
    """A map of already-encoded keys and values (a flat array in RESP2)."""
    body = b"".join(k + v for k, v in pairs)
    if dialect == 3:
        return b"%%%d\r\n" % len(pairs) + body
    return b"*%d\r\n" % (2 * len(pairs)) + body


def verbatim(text: bytes, dialect: int) -> bytes:
    """Text as Redis sends INFO and CLIENT LIST: a verbatim string (``txt``) in RESP3, a bulk string in RESP2."""
    if dialect == 3:
        return b"=%d\r\ntxt:%s\r\n" % (len(text) + 4, text)
    return b"$%d\r\n%s\r\n" % (len(text), text)
