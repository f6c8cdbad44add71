"""RESP request parsing and reply framing on byte streams cut every way.

Every test runs twice: with the C scanners (when they are built) and with
the pure-Python ones alone.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twinproxy.protocols import ProtocolError, resp

pytestmark = pytest.mark.usefixtures("scanners")


REQUESTS = [
    [b"SET", b"key", b"value"],
    [b"GET", b""],
    [b"MSET", b"a", b"1", b"b", b"\r\n\x00binary\r\n"],
    [b"PING"],
]
STREAM = b"".join(resp.encode_command(args) for args in REQUESTS)

# One of every RESP3 reply type, nested, with an attribute and a push.
REPLIES = [
    b"+OK\r\n",
    b"-ERR bad\r\n",
    b":42\r\n",
    b"$5\r\nhel\r\n\r\n",
    b"$-1\r\n",
    b"*-1\r\n",
    b"*0\r\n",
    b"*3\r\n$1\r\na\r\n*2\r\n:1\r\n$-1\r\n+x\r\n",
    b"%2\r\n+a\r\n:1\r\n+b\r\n*1\r\n_\r\n",
    b"~2\r\n,3.14\r\n#t\r\n",
    b"(3492890328409238509324850943850943825024385\r\n",
    b"=15\r\ntxt:Some string\r\n",
    b"!21\r\nSYNTAX invalid syntax\r\n",
    b"_\r\n",
    b"|1\r\n+key-popularity\r\n%1\r\n$1\r\na\r\n,0.19\r\n:7\r\n",
]
PUSH = b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n"


def parse_all(chunks) -> list:
    parser = resp.RespRequestParser()
    out = []
    for chunk in chunks:
        parser.feed(chunk)
        while True:
            request = parser.next()
            if request is None:
                break
            out.append((request.raw, request.args))
    return out


def frame_all(chunks) -> list:
    framer = resp.RespReplyFramer()
    out = []
    for chunk in chunks:
        framer.feed(chunk)
        while True:
            reply = framer.next()
            if reply is None:
                break
            out.append(reply)
    return out


def test_requests_whole() -> None:
    assert parse_all([STREAM]) == [(resp.encode_command(a), a) for a in REQUESTS]


def test_requests_cut_at_every_position_and_byte_by_byte() -> None:
    expected = parse_all([STREAM])
    for cut in range(len(STREAM) + 1):
        assert parse_all([STREAM[:cut], STREAM[cut:]]) == expected, cut
    assert parse_all([bytes([b]) for b in STREAM]) == expected


def test_inline_commands_as_redis_splits_them() -> None:
    parsed = parse_all([b'set k "a b\\x41\\n"\r\nGET  k\n\r\n  \r\nset k \'it\\\'s\'\r\n'])
    assert [args for _, args in parsed] == [[b"set", b"k", b"a bA\n"], [b"GET", b"k"], [b"set", b"k", b"it's"]]
    # Backends always get RESP, whatever the client sent.
    assert parsed[1][0] == resp.encode_command([b"GET", b"k"])


def test_inline_quote_must_be_followed_by_space_as_in_redis() -> None:
    parser = resp.RespRequestParser()
    parser.feed(b"set k 'it''s'\r\n")
    with pytest.raises(ProtocolError):
        parser.next()


def test_empty_multibulk_is_skipped() -> None:
    assert parse_all([b"*0\r\n*-1\r\n*1\r\n$4\r\nPING\r\n"]) == [(b"*1\r\n$4\r\nPING\r\n", [b"PING"])]


@pytest.mark.parametrize("data, message", [
    (b"*x\r\n", "invalid multibulk length"),
    (b"*99999999999999999999\r\n", "invalid multibulk length"),
    (b"*1\r\n+PING\r\n", "expected '$', got '+'"),
    (b"*1\r\n$-5\r\n", "invalid bulk length"),
    (b"*1\r\n$9223372036854775808\r\n", "invalid bulk length"),
    (b"*1\r\n$4\r\nPINGxx", "expected CRLF after bulk string"),
    (b'set k "unbalanced\r\n', "unbalanced quotes"),
    (b"a" * (resp.MAX_INLINE + 2), "too big inline request"),
    (b"*1\r\n$" + b"1" * (resp.MAX_INLINE + 2), "too big bulk count string"),
])
def test_request_errors_use_redis_texts(data: bytes, message: str) -> None:
    parser = resp.RespRequestParser()
    parser.feed(data)
    with pytest.raises(ProtocolError) as caught:
        parser.next()
    assert message in str(caught.value)
    assert str(caught.value).startswith("Protocol error:")


def test_a_large_bulk_arriving_in_pieces_is_linear() -> None:
    value = b"v" * (4 * 1024 * 1024)
    data = resp.encode_command([b"SET", b"k", value])
    chunks = [data[i:i + 1000] for i in range(0, len(data), 1000)]
    ((_, args),) = parse_all(chunks)
    assert args[2] == value


def test_every_reply_type_is_framed_whole() -> None:
    assert frame_all([b"".join(REPLIES)]) == REPLIES


def test_replies_cut_at_every_position() -> None:
    stream = b"".join(REPLIES)
    for cut in range(len(stream) + 1):
        assert frame_all([stream[:cut], stream[cut:]]) == REPLIES, cut
    assert frame_all([bytes([b]) for b in stream]) == REPLIES


def test_push_messages_are_dropped() -> None:
    assert frame_all([PUSH + b"+OK\r\n" + PUSH]) == [b"+OK\r\n"]


@pytest.mark.parametrize("data", [b"?\r\n", b"$x\r\n", b"*-2\r\n", b"%-1\r\n", b"$1\r\nab\r\n"])
def test_reply_garbage_is_a_protocol_error(data: bytes) -> None:
    framer = resp.RespReplyFramer()
    framer.feed(data)
    with pytest.raises(ProtocolError):
        framer.next()


def test_split_aggregate() -> None:
    header, elements = resp.split_aggregate(b"*3\r\n$1\r\na\r\n$-1\r\n*1\r\n:1\r\n")
    assert header == b"*3\r\n" and elements == [b"$1\r\na\r\n", b"$-1\r\n", b"*1\r\n:1\r\n"]


def test_encoders() -> None:
    assert resp.encode_command([b"GET", b"k"]) == b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
    assert resp.error("ERR x\r\ny") == b"-ERR x  y\r\n"
    assert resp.integer(-3) == b":-3\r\n"
    assert resp.bulk(None, 2) == b"$-1\r\n" and resp.bulk(None, 3) == b"_\r\n"
    assert resp.array([b":1\r\n"]) == b"*1\r\n:1\r\n"
    assert resp.mapping([(b"+a\r\n", b":1\r\n")], 3) == b"%1\r\n+a\r\n:1\r\n"
    assert resp.mapping([(b"+a\r\n", b":1\r\n")], 2) == b"*2\r\n+a\r\n:1\r\n"


argument = st.binary(max_size=40)
command = st.lists(argument, min_size=1, max_size=6)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(command, min_size=1, max_size=8), st.data())
def test_well_formed_streams_parse_identically_at_any_cut(commands, data) -> None:
    stream = b"".join(resp.encode_command(c) for c in commands)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    assert [args for _, args in parse_all(chunks)] == commands


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200))
def test_garbage_never_raises_anything_but_protocol_error(data: bytes) -> None:
    for make in (resp.RespRequestParser, resp.RespReplyFramer):
        parser = make()
        parser.feed(data)
        try:
            while parser.next() is not None:
                pass
        except ProtocolError:
            pass


def test_split_bulk_array_fast_path_and_fallback() -> None:
    assert resp.split_bulk_array(b"*3\r\n$1\r\na\r\n$-1\r\n_\r\n") == [b"$1\r\na\r\n", b"$-1\r\n", b"_\r\n"]
    assert resp.split_bulk_array(b"*1\r\n:1\r\n") is None       # not bulk strings: the general scanner
    assert resp.split_bulk_array(b"-ERR x\r\n") is None
    assert resp.split_bulk_array(b"*2\r\n$1\r\na\r\n") is None  # short: not trusted
