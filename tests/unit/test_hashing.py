"""The twelve hash functions: published vectors, nutcracker's quirks, hash tags."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twinproxy import hashing
from twinproxy.hashing import HASH_FUNCTIONS, hash_tag_extractor

PUBLISHED = [
    # (function, key, expected) from the algorithms' reference vectors.
    ("fnv1a_32", b"", 0x811C9DC5),
    ("fnv1a_32", b"a", 0xE40C292C),
    ("fnv1a_32", b"foobar", 0xBF9CF968),
    ("fnv1_32", b"a", 0x050C5D7E),
    ("fnv1_32", b"foobar", 0x31F0B262),
    # 64-bit FNV-1 of "a" is 0xaf63bd4c8601b7be and of "foobar" 0x340d8765a4dda9c2;
    # nutcracker keeps the low 32 bits.
    ("fnv1_64", b"a", 0x8601B7BE),
    ("fnv1_64", b"foobar", 0xA4DDA9C2),
    ("crc32a", b"123456789", 0xCBF43926),
    ("one_at_a_time", b"a", 0xCA2E9442),
    ("one_at_a_time", b"The quick brown fox jumps over the lazy dog", 0x519E91F5),
    # MD5("") = d41d8cd9...: the first four bytes, little-endian.
    ("md5", b"", 0xD98C1DD4),
]


@pytest.mark.parametrize("name,key,expected", PUBLISHED)
def test_published_vectors(name, key, expected):
    """Each hash gives its algorithm's published value for the reference inputs."""
    assert HASH_FUNCTIONS[name](key) == expected


def test_lookup3_published_vectors():
    """hashlittle matches Bob Jenkins' own test values; nutcracker's jenkins is initval 13."""
    text = b"Four score and seven years ago"
    assert hashing.hashlittle(text, 0) == 0x17770551
    assert hashing.hashlittle(text, 1) == 0xCD628161
    assert hashing.jenkins(b"") == 0xDEADBEEF + 13


def test_crc16_keeps_high_bits():
    """crc16 accumulates above bit 16 as nutcracker's unmasked word does; the low half is XMODEM's."""
    value = hashing.crc16(b"123456789")
    assert value & 0xFFFF == 0x31C3
    assert value > 0xFFFF


def test_crc32_is_libmemcached_15_bit_variant():
    """crc32 is bits 16..30 of the standard CRC-32 (libmemcached's variant)."""
    assert hashing.crc32(b"123456789") == (0xCBF43926 >> 16) & 0x7FFF


def test_fnv1a_64_is_truncated_32_bit():
    """nutcracker's fnv1a_64 runs in 32 bits with the 64-bit constants truncated."""
    assert hashing.fnv1a_64(b"") == 0x84222325
    assert hashing.fnv1a_64(b"a") == ((0x84222325 ^ 0x61) * 0x1B3) & 0xFFFFFFFF


def test_high_bytes_enter_sign_extended():
    """A byte >= 0x80 enters FNV as a sign-extended C char, as on x86 nutcracker."""
    expected = ((0x811C9DC5 ^ 0xFFFFFF80) * 16777619) & 0xFFFFFFFF
    assert hashing.fnv1a_32(b"\x80") == expected


@pytest.mark.parametrize("name", sorted(HASH_FUNCTIONS))
def test_every_hash_is_32_bit(name):
    """Every function returns an unsigned 32-bit integer for keys of any length."""
    for length in range(0, 40):
        value = HASH_FUNCTIONS[name](bytes(range(200, 200 + length % 50)) + b"k" * length)
        assert 0 <= value <= 0xFFFFFFFF


def test_hash_tag_braces():
    """Only the bytes between the tag characters are hashed, when there are some."""
    extract = hash_tag_extractor("{}")
    assert extract(b"user:{42}:name") == b"42"
    assert extract(b"{}x") == b"{}x"
    assert extract(b"no-tag") == b"no-tag"
    assert extract(b"{open") == b"{open"
    assert extract(b"a{b}c{d}") == b"b"


def test_hash_tag_same_characters():
    """A tag like "$$" uses the next occurrence of the same character as the end."""
    extract = hash_tag_extractor("$$")
    assert extract(b"a$tag$b") == b"tag"
    assert extract(b"a$$b") == b"a$$b"


def test_no_hash_tag_hashes_whole_key():
    """Without hash_tag the key is hashed whole."""
    assert hash_tag_extractor(None)(b"{a}") == b"{a}"


@pytest.mark.skipif(hashing.speedups is None, reason="twinproxy._speedups is not built (or this is PyPy)")
@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64))
def test_c_hashes_are_the_python_ones(key: bytes) -> None:
    """The registry's C twins give the Python reference's value for any key, high bytes and all."""
    for name in hashing.C_HASHES:
        assert HASH_FUNCTIONS[name] is getattr(hashing.speedups, name)
        assert HASH_FUNCTIONS[name](key) == getattr(hashing, name)(key), name
