"""Mutated streams into all four parsers: only ProtocolError may come out, and nothing hangs."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from twinproxy.protocols import ProtocolError
from twinproxy.protocols.memcache import MemcacheReplyFramer, MemcacheRequestParser
from twinproxy.protocols.resp import RespReplyFramer, RespRequestParser, encode_command

SEEDS = {
    RespRequestParser: encode_command([b"SET", b"k", b"v" * 10]) + b"GET k\r\n" + encode_command([b"MGET", b"a", b"b"]),
    RespReplyFramer: b"+OK\r\n$3\r\nabc\r\n*2\r\n:1\r\n%1\r\n+a\r\n_\r\n|1\r\n+x\r\n:2\r\n,1.5\r\n",
    MemcacheRequestParser: b"set k 0 0 3\r\nabc\r\nget a b\r\ndelete k noreply\r\nincr n 1\r\n",
    MemcacheReplyFramer: b"STORED\r\nVALUE a 0 3\r\nabc\r\nEND\r\nSTAT pid 1\r\nEND\r\n5\r\n",
}

mutation = st.tuples(st.sampled_from(["flip", "insert", "delete", "duplicate"]), st.integers(0, 10_000),
                     st.integers(0, 255))


def mutate(data: bytes, mutations) -> bytes:
    buf = bytearray(data)
    for kind, where, byte in mutations:
        if not buf:
            buf.append(byte)
            continue
        at = where % len(buf)
        if kind == "flip":
            buf[at] = byte
        elif kind == "insert":
            buf.insert(at, byte)
        elif kind == "delete":
            del buf[at]
        else:
            buf[at:at] = buf[at:at + 8]
    return bytes(buf)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(sorted(SEEDS, key=lambda k: k.__name__)), st.lists(mutation, min_size=1, max_size=6),
       st.lists(st.integers(1, 40), max_size=8))
def test_mutated_streams(kind, mutations, cuts) -> None:
    data = mutate(SEEDS[kind] * 2, mutations)
    parser = kind()
    pos = 0
    try:
        for size in [*cuts, len(data)]:
            parser.feed(data[pos:pos + size])
            pos += size
            for _ in range(len(data) + 2):  # more results than bytes would mean a loop
                if parser.next() is None:
                    break
            else:
                raise AssertionError("parser produced more results than bytes")
    except ProtocolError:
        pass
