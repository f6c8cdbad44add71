"""Codis's key -> slot rule: ``crc32(tag or key) % 1024``.

The tag is what lies between the first ``{`` and the first ``}`` after it,
and may be empty (``{}x`` hashes the empty string, so slot 0): Codis's rule,
which differs from Redis Cluster's and nutcracker's (an empty tag there
means "no tag").  crc32 is IEEE's, as ``zlib.crc32``; ``& 1023`` is
``% 1024`` for a non-negative number.  Knows nothing of Twisted.
"""

from __future__ import annotations

from typing import Iterable, List, Tuple
from zlib import crc32

SLOT_COUNT = 1024
SLOT_MASK = SLOT_COUNT - 1


def slot_of(key: bytes) -> int:
    """The slot Codis puts ``key`` in."""
    if 123 in key:   # b"{": a memchr, cheaper than find() for the keys with no tag
        start = key.find(b"{")
        end = key.find(b"}", start + 1)
        if end >= 0:
            return crc32(key[start + 1:end]) & SLOT_MASK
    return crc32(key) & SLOT_MASK


def parse_range(text: str) -> Tuple[int, int]:
    """``"FIRST-LAST"`` or ``"N"`` -> (first, last), both in 0..1023; ValueError names what is wrong."""
    first_text, sep, last_text = text.strip().partition("-")
    try:
        first = int(first_text)
        last = int(last_text) if sep else first
    except ValueError:
        raise ValueError(f"'{text}' is not a slot range (expected FIRST-LAST, e.g. 0-511)") from None
    for number in (first, last):
        if not 0 <= number < SLOT_COUNT:
            raise ValueError(f"slot {number} is out of range (slots are 0 to {SLOT_COUNT - 1})")
    if first > last:
        raise ValueError(f"'{text}': the first slot is after the last")
    return first, last


def runs(values: Iterable[object]) -> List[Tuple[int, int, object]]:
    """Consecutive equal values as (first, last, value), e.g. a slot table as owner runs."""
    found: List[Tuple[int, int, object]] = []
    for index, value in enumerate(values):
        if found and found[-1][2] == value and found[-1][1] == index - 1:
            found[-1] = (found[-1][0], index, value)
        else:
            found.append((index, index, value))
    return found
