"""What the protocols' scanners share: the rule for pending bytes, and the C scanners.

Owns: how a parser joins what is left of its buffer to the bytes just
read (``append_pending``), and hands the parsers the C scanners when
:mod:`twinproxy.compiled` has them.  Pure: no Twisted.

Parsers keep ``bytes`` while requests and replies come whole (the usual
case), so what they return are slices of the bytes as read, one copy each;
only a message that is big and arrives in pieces moves to a ``bytearray``.
"""

from __future__ import annotations

from typing import Any, Tuple

from twinproxy import compiled

# A bytearray buffer is compacted once its consumed part passes this.
COMPACT_AT = 64 * 1024
# A partial message up to this size is joined to the next bytes by copying;
# past it the buffer is a bytearray grown in place, so many small writes stay linear.
SMALL_JOIN = 4096


def append_pending(buf: Any, pos: int, data: bytes) -> Tuple[Any, int]:
    """What is left of ``buf`` from ``pos`` on, then ``data``; and how far offsets into ``buf`` move back.

    The result is ``data`` itself when nothing was left (the usual case), a
    new ``bytes`` while what is pending stays under ``SMALL_JOIN``, and past
    that a ``bytearray`` grown in place and compacted once ``pos`` passes
    ``COMPACT_AT``, so many small writes of a big message stay linear.
    """
    left = len(buf) - pos
    if left <= 0:
        return (data if type(data) is bytes else bytes(data)), pos
    if type(buf) is bytes:
        if left + len(data) <= SMALL_JOIN:
            return buf[pos:] + data, pos
        joined = bytearray(buf[pos:])
        joined += data
        return joined, pos
    moved = 0
    if pos >= COMPACT_AT:
        del buf[:pos]
        moved = pos
    buf += data
    return buf, moved


# The C scanners, or None.  Parsers and framers read it when they are made
# (tests make pure-Python ones by setting their module's ``speedups`` to None).
speedups = compiled.speedups
