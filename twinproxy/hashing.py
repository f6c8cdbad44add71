"""The twelve key hash functions nutcracker offers, bit for bit.

Owns: ``bytes -> int`` (unsigned 32-bit) functions, the registry of them by
the names used in pool files, and hash-tag extraction.  Owns no state, no
time and no I/O.

Nutcracker reads key bytes as C ``char``, which is signed on x86: a byte of
0x80 or more enters the FNV, one-at-a-time and CRC arithmetic sign-extended
(0x80 becomes 0xFFFFFF80).  The functions below reproduce that so non-ASCII
keys land where nutcracker puts them.

The registry holds the C twins of the byte-loop hashes when
:mod:`twinproxy.compiled` has them (md5 and the CRC-32s are C already):
a key hashed in Python costs about a microsecond, in C a few tens of
nanoseconds.  The Python functions stay the reference.
"""

from __future__ import annotations

import hashlib
import zlib
from typing import Callable, Dict, Optional

from twinproxy.compiled import speedups

HashFunction = Callable[[bytes], int]

_MASK32 = 0xFFFFFFFF


def _signed(byte: int) -> int:
    """Return ``byte`` as nutcracker sees it: a sign-extended C char, 32 bits wide."""
    return byte | 0xFFFFFF00 if byte & 0x80 else byte


# The same, as a table: an index per byte is much cheaper than a call per byte.
_SX = tuple(_signed(byte) for byte in range(256))


def one_at_a_time(key: bytes) -> int:
    """Bob Jenkins' one-at-a-time hash."""
    h = 0
    sx = _SX
    for byte in key:
        h = (h + sx[byte]) & _MASK32
        h = (h + (h << 10)) & _MASK32
        h ^= h >> 6
    h = (h + (h << 3)) & _MASK32
    h ^= h >> 11
    return (h + (h << 15)) & _MASK32


def md5(key: bytes) -> int:
    """The first four bytes of the MD5 digest, little-endian."""
    return int.from_bytes(hashlib.md5(key).digest()[:4], "little")


def _crc16_table() -> list:
    table = []
    for i in range(256):
        crc = i << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return table


_CRC16_TABLE = _crc16_table()


def crc16(key: bytes) -> int:
    """CRC-16/XMODEM computed as nutcracker does, in an unmasked 32-bit word.

    Bits above the sixteenth accumulate and are part of the result; only
    the low 16 bits equal the textbook CRC.
    """
    crc = 0
    table = _CRC16_TABLE
    for byte in key:
        crc = ((crc << 8) ^ table[((crc >> 8) ^ _signed(byte)) & 0xFF]) & _MASK32
    return crc


def crc32(key: bytes) -> int:
    """libmemcached's CRC-32 variant: bits 16..30 of the standard CRC-32.

    The CRC table index masks each byte to 8 bits, so the sign extension
    of high bytes cannot change a CRC: the raw bytes serve as they are.
    """
    return (zlib.crc32(key) >> 16) & 0x7FFF


def crc32a(key: bytes) -> int:
    """The standard CRC-32 (as ``zlib.crc32``)."""
    return zlib.crc32(key) & _MASK32


def fnv1_64(key: bytes) -> int:
    """64-bit FNV-1, truncated to its low 32 bits."""
    h = 0xCBF29CE484222325
    for byte in key:
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
        h ^= _signed(byte) | (0xFFFFFFFF00000000 if byte & 0x80 else 0)
    return h & _MASK32


def fnv1a_64(key: bytes) -> int:
    """Nutcracker's default: FNV-1a in 32-bit arithmetic with the 64-bit constants truncated."""
    h = 0x84222325
    sx = _SX
    for byte in key:
        h = ((h ^ sx[byte]) * 0x1B3) & _MASK32
    return h


def fnv1_32(key: bytes) -> int:
    """Standard 32-bit FNV-1."""
    h = 2166136261
    sx = _SX
    for byte in key:
        h = ((h * 16777619) & _MASK32) ^ sx[byte]
    return h


def fnv1a_32(key: bytes) -> int:
    """Standard 32-bit FNV-1a."""
    h = 2166136261
    sx = _SX
    for byte in key:
        h = ((h ^ sx[byte]) * 16777619) & _MASK32
    return h


def hsieh(key: bytes) -> int:
    """Paul Hsieh's SuperFastHash, started at 0 rather than at the length."""
    length = len(key)
    if length == 0:
        return 0
    h = 0
    rem = length & 3
    pos = 0
    for _ in range(length >> 2):
        h = (h + (key[pos] | (key[pos + 1] << 8))) & _MASK32
        tmp = (((key[pos + 2] | (key[pos + 3] << 8)) << 11) ^ h) & _MASK32
        h = ((h << 16) ^ tmp) & _MASK32
        h = (h + (h >> 11)) & _MASK32
        pos += 4
    if rem == 3:
        h = (h + (key[pos] | (key[pos + 1] << 8))) & _MASK32
        h ^= (h << 16) & _MASK32
        h ^= (_signed(key[pos + 2]) << 18) & _MASK32
        h = (h + (h >> 11)) & _MASK32
    elif rem == 2:
        h = (h + (key[pos] | (key[pos + 1] << 8))) & _MASK32
        h ^= (h << 11) & _MASK32
        h = (h + (h >> 17)) & _MASK32
    elif rem == 1:
        h = (h + _signed(key[pos])) & _MASK32
        h ^= (h << 10) & _MASK32
        h = (h + (h >> 1)) & _MASK32
    h ^= (h << 3) & _MASK32
    h = (h + (h >> 5)) & _MASK32
    h ^= (h << 4) & _MASK32
    h = (h + (h >> 17)) & _MASK32
    h ^= (h << 25) & _MASK32
    h = (h + (h >> 6)) & _MASK32
    return h


def murmur(key: bytes) -> int:
    """MurmurHash2 with nutcracker's seed (0xdeadbeef times the length)."""
    m = 0x5BD1E995
    length = len(key)
    seed = (0xDEADBEEF * length) & _MASK32
    h = seed ^ length
    pos = 0
    while length - pos >= 4:
        k = int.from_bytes(key[pos:pos + 4], "little")
        k = (k * m) & _MASK32
        k ^= k >> 24
        k = (k * m) & _MASK32
        h = (h * m) & _MASK32
        h ^= k
        pos += 4
    rem = length - pos
    if rem == 3:
        h ^= key[pos + 2] << 16
    if rem >= 2:
        h ^= key[pos + 1] << 8
    if rem >= 1:
        h ^= key[pos]
        h = (h * m) & _MASK32
    h ^= h >> 13
    h = (h * m) & _MASK32
    h ^= h >> 15
    return h


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _MASK32


def hashlittle(key: bytes, initval: int) -> int:
    """Bob Jenkins' lookup3 ``hashlittle``."""
    length = len(key)
    a = b = c = (0xDEADBEEF + length + initval) & _MASK32
    pos = 0
    while length - pos > 12:
        a = (a + int.from_bytes(key[pos:pos + 4], "little")) & _MASK32
        b = (b + int.from_bytes(key[pos + 4:pos + 8], "little")) & _MASK32
        c = (c + int.from_bytes(key[pos + 8:pos + 12], "little")) & _MASK32
        # mix(a, b, c)
        a = (a - c) & _MASK32; a ^= _rot(c, 4); c = (c + b) & _MASK32  # noqa: E702
        b = (b - a) & _MASK32; b ^= _rot(a, 6); a = (a + c) & _MASK32  # noqa: E702
        c = (c - b) & _MASK32; c ^= _rot(b, 8); b = (b + a) & _MASK32  # noqa: E702
        a = (a - c) & _MASK32; a ^= _rot(c, 16); c = (c + b) & _MASK32  # noqa: E702
        b = (b - a) & _MASK32; b ^= _rot(a, 19); a = (a + c) & _MASK32  # noqa: E702
        c = (c - b) & _MASK32; c ^= _rot(b, 4); b = (b + a) & _MASK32  # noqa: E702
        pos += 12
    rem = length - pos
    if rem == 0:
        return c
    tail = key[pos:] + b"\0" * (12 - rem)
    a = (a + int.from_bytes(tail[0:4], "little")) & _MASK32
    b = (b + int.from_bytes(tail[4:8], "little")) & _MASK32
    c = (c + int.from_bytes(tail[8:12], "little")) & _MASK32
    # final(a, b, c)
    c ^= b; c = (c - _rot(b, 14)) & _MASK32  # noqa: E702
    a ^= c; a = (a - _rot(c, 11)) & _MASK32  # noqa: E702
    b ^= a; b = (b - _rot(a, 25)) & _MASK32  # noqa: E702
    c ^= b; c = (c - _rot(b, 16)) & _MASK32  # noqa: E702
    a ^= c; a = (a - _rot(c, 4)) & _MASK32  # noqa: E702
    b ^= a; b = (b - _rot(a, 14)) & _MASK32  # noqa: E702
    c ^= b; c = (c - _rot(b, 24)) & _MASK32  # noqa: E702
    return c


def jenkins(key: bytes) -> int:
    """lookup3 ``hashlittle`` with nutcracker's initval of 13."""
    return hashlittle(key, 13)


HASH_FUNCTIONS: Dict[str, HashFunction] = {
    "one_at_a_time": one_at_a_time,
    "md5": md5,
    "crc16": crc16,
    "crc32": crc32,
    "crc32a": crc32a,
    "fnv1_64": fnv1_64,
    "fnv1a_64": fnv1a_64,
    "fnv1_32": fnv1_32,
    "fnv1a_32": fnv1a_32,
    "hsieh": hsieh,
    "murmur": murmur,
    "jenkins": jenkins,
}

# Hashes with a C twin in twinproxy._speedups, under the same name.
C_HASHES = ("one_at_a_time", "crc16", "fnv1_64", "fnv1a_64", "fnv1_32", "fnv1a_32", "hsieh", "murmur", "jenkins")

if speedups is not None:
    HASH_FUNCTIONS.update({name: getattr(speedups, name) for name in C_HASHES})


def hash_tag_extractor(tag: Optional[str]) -> Callable[[bytes], bytes]:
    """Return a function that cuts the hashed part out of a key.

    With a two-character tag such as ``"{}"``, a key that holds the opening
    character followed, at least one byte later, by the closing one hashes
    only the bytes between them; any other key hashes whole.
    """
    if not tag:
        return _whole_key
    opening = tag[0].encode("latin-1")
    closing = tag[1].encode("latin-1")

    def extract(key: bytes) -> bytes:
        start = key.find(opening)
        if start < 0:
            return key
        end = key.find(closing, start + 1)
        if end <= start + 1:
            return key
        return key[start + 1:end]

    return extract


def _whole_key(key: bytes) -> bytes:
    return key
