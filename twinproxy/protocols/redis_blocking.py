"""How long a server may hold a blocking command before it replies, read as Redis 7.0 reads its timeout.

Owns :func:`prepare_blocking` (the codec's classification of them) and
:func:`block_seconds` for BLPOP, BRPOP, BRPOPLPUSH, BLMOVE, BLMPOP,
BZPOPMIN, BZPOPMAX, BZMPOP and XREAD/XREADGROUP ... BLOCK, and the exact
reading of a timeout behind it.  The proxy never answers a bad timeout
itself: the server does, at once and in its own words (``ERR timeout is
negative``, ``ERR timeout is not a float or out of range``, ...) and in its
own order of checks.  What the proxy needs is when its own deadline for the
reply is: the command's timeout plus the pool's ``timeout``, none for a
timeout of 0, and the pool's ``timeout`` alone when the server will refuse
the timeout.  So the reading must match the server's, or a valid timeout
would be cut short: for seconds Redis's ``getTimeoutFromObjectOrReply``
(``strtold`` of the whole argument into an x87 80-bit long double, times
1000, ``ceill``, then a
cast to ``long long``, which gives LLONG_MIN when out of range — so
``inf`` and 1e400 are "negative"), for XREAD's milliseconds ``string2ll``.
The long double arithmetic is done exactly here (``Fraction``, rounded to a
64-bit significand as the FPU rounds).  Pure: no I/O, no Twisted.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any, Optional, Sequence

from twinproxy.protocols.redis_keys import long_long, xread_block_arguments
from twinproxy.request import BLOCK, FRAGMENT, Request

FOREVER = float("inf")   # a timeout of 0: the server holds the command until a key is ready
AT_ONCE = 0.0            # the server refuses the timeout (or finds none): it answers at once

_MAX_CHARS = 5 * 1024           # Redis's MAX_LONG_DOUBLE_CHARS: longer (or empty) is not a float
_SIGNIFICAND = 64               # x87 extended precision: 64 bits, the integer bit explicit
_MIN_EXPONENT = -16382          # the smallest normal is 2**-16382; subnormals go 63 bits lower
_OVERFLOW = Fraction(2) ** 16384
_LLONG = 1 << 63
_SPACE = b" \t\n\v\f\r"
_DECIMAL = re.compile(rb"([+-]?)(\d*)(?:\.(\d*))?(?:[eE]([+-]?\d+))?\Z")
_HEX = re.compile(rb"([+-]?)0[xX]([0-9a-fA-F]*)(?:\.([0-9a-fA-F]*))?(?:[pP]([+-]?\d+))?\Z")
_INFINITY = re.compile(rb"[+-]?(?:inf|infinity)\Z", re.IGNORECASE)
# Past these a nonzero value is certainly out of the long double's range
# (about 1.19e4932 at the top, 3.6e-4951 at the bottom), and computing it
# exactly would be needlessly big; inside them it is computed exactly.
_DECIMAL_EXPONENT_LIMIT = 5000
_BINARY_EXPONENT_LIMIT = 16500

# The blocking commands whose timeout (seconds) is their second argument; the others' is their last.
_TIMEOUT_FIRST = frozenset((b"blmpop", b"bzmpop"))
_STREAM_READS = frozenset((b"xread", b"xreadgroup"))


def prepare_blocking(request: Request, name: bytes, spec: Any) -> None:
    """Classify a BLOCKING_COMMAND: ``BLOCK`` (routed as a SAME_SERVER command, then run alone on a leased
    connection), or ``FRAGMENT`` for XREAD/XREADGROUP without BLOCK, which do not block and route as usual.

    ``blocks_for`` is how long the server may hold it: the proxy's
    deadline for its reply is that plus the pool's ``timeout``.
    """
    args = request.args
    blocks = spec.blocks
    if blocks is not None and not blocks(args):
        request.kind = FRAGMENT
        return
    request.kind = BLOCK
    request.blocks_for = block_seconds(name, args)


def block_seconds(name: bytes, args: Sequence[bytes]) -> float:
    """How long the server may hold the blocking command ``args`` (``name`` lower-case) before replying.

    :data:`FOREVER` for a timeout of 0 (BLOCK 0), :data:`AT_ONCE` when the
    server will refuse it, else the timeout in seconds as the server counts
    it (whole milliseconds, rounded up).
    """
    if name in _STREAM_READS:
        found = xread_block_arguments(args)
        if not found:
            return AT_ONCE
        # Redis checks each BLOCK as it reads it: any bad one is refused.
        values = [long_long(text) for text in found]
        if any(value is None or value < 0 for value in values):
            return AT_ONCE
        return _seconds(values[-1])
    if name in _TIMEOUT_FIRST:
        text = args[1] if len(args) > 1 else None
    else:
        text = args[-1] if len(args) > 2 else None
    if text is None:
        return AT_ONCE
    milliseconds = timeout_milliseconds(text)
    if milliseconds is None or milliseconds < 0:
        return AT_ONCE
    return _seconds(milliseconds)


def _seconds(milliseconds: int) -> float:
    return FOREVER if milliseconds == 0 else milliseconds / 1000.0


def timeout_milliseconds(text: bytes) -> Optional[int]:
    """A seconds timeout as Redis reads it: the ``long long`` milliseconds (negative: refused), None if not a float.

    ``(long long) ceill(strtold(text) * 1000.0)``, with Redis's checks on
    the string (no leading space, nothing left over, no NaN, no overflow or
    underflow to zero) and the cast of an out-of-range value to LLONG_MIN.
    """
    if not text or len(text) >= _MAX_CHARS or b"\0" in text:
        return None                    # strtold must read every byte: a NUL would end it early
    if text[0] in _SPACE:
        return None
    value = _parse(text)
    if value is None:
        return None
    if value == "inf":
        return -_LLONG
    product = _round(value * 1000)
    if product is None:
        return -_LLONG
    milliseconds = -((-product.numerator) // product.denominator)    # ceil
    if not -_LLONG <= milliseconds < _LLONG:
        return -_LLONG
    return milliseconds


def _parse(text: bytes):
    """``strtold`` of the whole of ``text``: a long double (Fraction), "inf", or None where Redis refuses it."""
    if _INFINITY.match(text):
        return "inf"
    hexadecimal = text.lstrip(b"+-")[:2] in (b"0x", b"0X")
    match = (_HEX if hexadecimal else _DECIMAL).match(text)
    if match is None:
        return None
    sign, whole, fraction, exponent = match.groups()
    fraction = fraction or b""
    if not whole and not fraction:
        return None
    digits = (whole + fraction).lstrip(b"0")
    if hexadecimal:
        base, limit, size = 2, _BINARY_EXPONENT_LIMIT, 4 * len(digits)
        power = _exponent(exponent) - 4 * len(fraction)
    else:
        base, limit, size = 10, _DECIMAL_EXPONENT_LIMIT, len(digits)
        power = _exponent(exponent) - len(fraction)
    if not digits:
        return Fraction(0)
    if not -limit < size + power < limit:
        return None                         # overflow (HUGE_VAL) or underflow to 0, with ERANGE
    mantissa = int(digits, 16) if hexadecimal else _decimal(digits)
    exact = Fraction(mantissa) * (Fraction(base) ** power)
    if sign == b"-":
        exact = -exact
    rounded = _round(exact)
    if rounded is None or rounded == 0:
        return None                         # ERANGE with HUGE_VAL or 0
    return rounded


def _exponent(text: "bytes | None") -> int:
    """An exponent's digits as an int; a long one (far past any limit) only by its sign and size."""
    if not text:
        return 0
    digits = text.lstrip(b"+-").lstrip(b"0") or b"0"
    if len(digits) > 9:
        digits = b"999999999"
    return -int(digits) if text[:1] == b"-" else int(digits)


def _decimal(digits: bytes) -> int:
    """``int(digits)`` for up to Redis's 5 KiB of digits (past Python's 4300-digit guard, in pieces)."""
    value = 0
    for start in range(0, len(digits), 4000):
        piece = digits[start:start + 4000]
        value = value * 10 ** len(piece) + int(piece)
    return value


def _round(value: Fraction) -> Optional[Fraction]:
    """``value`` rounded to the nearest x87 long double (ties to even); None when that overflows."""
    if value == 0:
        return value
    negative = value < 0
    numerator, denominator = abs(value.numerator), value.denominator
    exponent = numerator.bit_length() - denominator.bit_length()     # floor(log2), or one more
    if (numerator << -exponent if exponent < 0 else numerator) < (denominator << exponent if exponent > 0
                                                                 else denominator):
        exponent -= 1
    quantum = max(exponent, _MIN_EXPONENT) - (_SIGNIFICAND - 1)      # the value of the last bit
    if quantum >= 0:
        scaled_num, scaled_den = numerator, denominator << quantum
    else:
        scaled_num, scaled_den = numerator << -quantum, denominator
    significand, remainder = divmod(scaled_num, scaled_den)
    twice = remainder * 2
    if twice > scaled_den or (twice == scaled_den and significand & 1):
        significand += 1
    rounded = Fraction(significand) * (Fraction(2) ** quantum)
    if rounded >= _OVERFLOW:
        return None
    return -rounded if negative else rounded
