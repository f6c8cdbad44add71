"""The C scanners (twinproxy._speedups) against the pure-Python reference.

On any input, well formed or mangled, cut anywhere, both must give the
same requests, replies and errors: the C code takes the common case and
hands everything else back, so a difference here is a bug in the C code.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twinproxy.protocols import ProtocolError, memcache_text, resp

pytestmark = pytest.mark.skipif(resp.speedups is None, reason="twinproxy._speedups is not built (or this is PyPy)")

# Bytes that matter to a RESP scanner, to mangle streams with.
SPECIAL = st.sampled_from([b"*", b"$", b"\r", b"\n", b"\r\n", b"-", b"-1", b"0", b"9", b"+", b" ", b"_", b"x",
                           b"%", b"|", b">", b"~", b"99999999999999999999", b"\x00"])


def cut(stream: bytes, cuts: List[int]) -> List[bytes]:
    cuts = sorted(min(c, len(stream)) for c in cuts)
    return [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]


def mangle(stream: bytes, edits: List[Tuple[int, bytes]]) -> bytes:
    for position, text in edits:
        position = min(position, len(stream))
        stream = stream[:position] + text + stream[position + len(text) // 2:]
    return stream


def run(make: Any, chunks: List[bytes], pure: bool) -> Tuple[list, Optional[str]]:
    parser = make()
    if pure:
        for name in ("_scan_request", "_scan_reply"):
            if hasattr(parser, name):
                setattr(parser, name, None)
        assert not any(isinstance(v, type(resp.speedups.scan_reply)) for v in vars(parser).values())
    out: list = []
    try:
        for chunk in chunks:
            parser.feed(chunk)
            while True:
                item = parser.next()
                if item is None:
                    break
                out.append((item.raw, item.args) if hasattr(item, "raw") else item)
    except ProtocolError as err:
        return out, str(err)
    return out, None


def same(make: Any, chunks: List[bytes]) -> None:
    assert run(make, chunks, pure=False) == run(make, chunks, pure=True)


argument = st.binary(max_size=30)
command = st.lists(argument, min_size=1, max_size=6)
edits = st.lists(st.tuples(st.integers(0, 400), SPECIAL), max_size=3)
cuts = st.lists(st.integers(0, 400), max_size=5)


@settings(max_examples=400, deadline=None)
@given(st.lists(command, min_size=1, max_size=6), edits, cuts, st.sampled_from([None, 40, 100]))
def test_requests_as_the_python_parser(commands, changes, places, max_request) -> None:
    stream = mangle(b"".join(resp.encode_command(c) for c in commands), changes)

    def make() -> resp.RespRequestParser:
        if max_request is None:
            return resp.RespRequestParser(max_args=5)
        return resp.RespRequestParser(max_request=max_request)

    same(make, cut(stream, places))


leaf = st.one_of(
    st.binary(max_size=20).map(lambda b: b"$%d\r\n%s\r\n" % (len(b), b)),
    st.integers(-10**20, 10**20).map(lambda n: b":%d\r\n" % n),
    st.sampled_from([b"+OK\r\n", b"-ERR x\r\n", b"$-1\r\n", b"*-1\r\n", b"_\r\n", b",1.5\r\n", b"#t\r\n",
                     b"(12345678901234567890123\r\n", b"=5\r\ntxt:a\r\n", b"!3\r\nerr\r\n", b"+a\rb\r\n"]),
)


def aggregate(children: st.SearchStrategy) -> st.SearchStrategy:
    def build(kind_items: Tuple[bytes, List[bytes]]) -> bytes:
        kind, items = kind_items
        if kind in (b"%", b"|"):
            items = items[: len(items) // 2 * 2]
            header = b"%s%d\r\n" % (kind, len(items) // 2)
            body = b"".join(items)
            return header + body + (b"+annotated\r\n" if kind == b"|" else b"")
        return b"%s%d\r\n" % (kind, len(items)) + b"".join(items)
    return st.tuples(st.sampled_from([b"*", b"~", b">", b"%", b"|"]), st.lists(children, max_size=5)).map(build)


reply = st.recursive(leaf, aggregate, max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(st.lists(reply, min_size=1, max_size=5), edits, cuts)
def test_replies_as_the_python_framer(replies, changes, places) -> None:
    stream = mangle(b"".join(replies), changes)
    same(resp.RespReplyFramer, cut(stream, places))


def test_deep_nesting_is_left_to_python() -> None:
    deep = b"*1\r\n" * 100 + b":1\r\n"
    assert resp.speedups.scan_reply(deep, 0, len(deep)) == -2
    same(resp.RespReplyFramer, [deep])


def test_a_request_that_is_the_whole_read_is_not_copied() -> None:
    data = resp.encode_command([b"GET", b"k"])
    args, raw, end = resp.speedups.scan_request(data, 0, 100, 100, 100)
    assert raw is data and args == [b"GET", b"k"] and end == len(data)


@settings(max_examples=300, deadline=None)
@given(st.lists(argument, min_size=1, max_size=9), st.data())
def test_encode_fragment_as_python(args, data) -> None:
    width = data.draw(st.integers(1, 3))
    positions = data.draw(st.lists(st.integers(1, max(1, len(args) - width)), max_size=4))
    positions = [p for p in positions if p + width <= len(args)]
    expected = resp.encode_command([args[0]] + [a for p in positions for a in args[p:p + width]])
    assert resp.speedups.encode_fragment(args, positions, width) == expected
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(resp, "speedups", None)
        assert resp.encode_fragment(args, positions, width) == expected


def test_encode_fragment_rejects_bad_input() -> None:
    with pytest.raises(IndexError):
        resp.speedups.encode_fragment([b"MGET", b"a"], [2], 1)
    with pytest.raises(TypeError):
        resp.speedups.encode_fragment([b"MGET", "a"], [1], 1)
    with pytest.raises(TypeError):
        resp.speedups.encode_fragment([b"MGET", b"a"], [1.0], 1)


element = st.one_of(st.binary(max_size=12).map(lambda b: b"$%d\r\n%s\r\n" % (len(b), b)),
                    st.just(b"$-1\r\n"), st.just(b"_\r\n"), st.just(b":1\r\n"))


@settings(max_examples=300, deadline=None)
@given(st.lists(element, max_size=8), edits)
def test_split_bulk_array_as_python(elements, changes) -> None:
    data = mangle(b"*%d\r\n" % len(elements) + b"".join(elements), changes)
    fast = resp.split_bulk_array(data)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(resp, "speedups", None)
        slow = resp.split_bulk_array(data)
    assert fast == slow


# memcached replies: items, stats, one-liners, meta, mangled and cut.
memcache_item = st.one_of(
    st.tuples(st.binary(min_size=1, max_size=8).filter(lambda k: b" " not in k and b"\r" not in k),
              st.binary(max_size=20), st.booleans()).map(
        lambda t: b"VALUE %s 0 %d%s\r\n%s\r\n" % (t[0], len(t[1]), b" 7" if t[2] else b"", t[1])),
    st.sampled_from([b"STAT pid 1\r\n", b"VALUE k 0 x\r\n", b"VALUE  k 0 1\r\na\r\n"]),
)
memcache_reply = st.one_of(
    st.lists(memcache_item, max_size=4).map(lambda items: b"".join(items) + b"END\r\n"),
    st.sampled_from([b"STORED\r\n", b"NOT_FOUND\r\n", b"ERROR\r\n", b"SERVER_ERROR out of memory\r\n",
                     b"VA 2 f1\r\nhi\r\n", b"HD\r\n", b"EN\r\n", b"MN\r\n", b"VERSION 1.6\r\n", b"5\r\n"]),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(memcache_reply, min_size=1, max_size=5), edits, cuts)
def test_memcache_replies_as_the_python_framer(replies, changes, places) -> None:
    stream = mangle(b"".join(replies), changes)
    same(memcache_text.MemcacheReplyFramer, cut(stream, places))


@settings(max_examples=300, deadline=None)
@given(st.lists(memcache_item, max_size=5), edits)
def test_split_values_as_python(items, changes) -> None:
    reply = mangle(b"".join(items) + b"END\r\n", changes)
    fast = memcache_text.speedups.split_values(reply)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(memcache_text, "speedups", None)
        try:
            slow = memcache_text.split_values(reply)
        except (ValueError, IndexError):
            slow = None  # malformed: the framer never lets such a reply through
    if fast is not None:
        assert fast == slow
