"""The memcached text protocol: framing cut every way, errors as memcached gives them, merges.

Every test runs twice: with the C reply scanners (when they are built) and
with the pure-Python ones alone.
"""

from __future__ import annotations

from typing import List

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twinproxy.config import load_text
from twinproxy.protocols import ProtocolError
from twinproxy.protocols.memcache import (
    MAX_LINE,
    MemcacheCodec,
    MemcacheReplyFramer,
    MemcacheRequestParser,
    split_values,
)
from twinproxy.request import FORWARD, FRAGMENT, LOCAL, Request

pytestmark = pytest.mark.usefixtures("scanners")


STREAM = (b"set a 0 0 5\r\nhello\r\n"
          b"get a b c\r\n"
          b"cas k 1 2 3 99 noreply\r\n\r\n\x00\r\n"
          b"incr n 5\n"
          b"delete a noreply\r\n"
          b"gat 10 a\r\n")


def parse(chunks) -> List[Request]:
    parser = MemcacheRequestParser()
    out = []
    for chunk in chunks:
        parser.feed(chunk)
        while True:
            request = parser.next()
            if request is None:
                break
            out.append(request)
    return out


def shape(requests):
    return [(r.raw, r.args, r.reply, r.quiet) for r in requests]


def test_stream_parses_into_commands_with_data_blocks() -> None:
    requests = parse([STREAM])
    assert [r.args[0] for r in requests] == [b"set", b"get", b"cas", b"incr", b"delete", b"gat"]
    assert requests[0].raw == b"set a 0 0 5\r\nhello\r\n"
    # noreply is taken off what the server gets, and the request is quiet.
    assert requests[2].raw == b"cas k 1 2 3 99\r\n\r\n\x00\r\n" and requests[2].quiet
    assert requests[3].raw == b"incr n 5\n"


def test_cut_at_every_position_and_byte_by_byte() -> None:
    expected = shape(parse([STREAM]))
    for cut in range(len(STREAM) + 1):
        assert shape(parse([STREAM[:cut], STREAM[cut:]])) == expected, cut
    assert shape(parse([bytes([b]) for b in STREAM])) == expected


@pytest.mark.parametrize("data, replies", [
    (b"\r\n", [b"ERROR\r\n"]),
    (b"set a 0 0\r\n", [b"ERROR\r\n"]),
    (b"set a 0 0 1 noreply extra\r\nx\r\n", [b"ERROR\r\n", None]),
    (b"set a 0 0 -1\r\nx\r\n", [b"CLIENT_ERROR bad command line format\r\n", None]),
    (b"set a 0 0 x\r\nx\r\n", [b"CLIENT_ERROR bad command line format\r\n", None]),
    # A bad header with a good length: the block is skipped, not run as a command.
    (b"set " + b"k" * 251 + b" 0 0 9\r\nflush_all\r\n", [b"CLIENT_ERROR bad command line format\r\n"]),
    (b"set a\x01b 0 0 1\r\nx\r\n", [b"CLIENT_ERROR bad command line format\r\n"]),
    (b"set a -1 0 1\r\nx\r\n", [b"CLIENT_ERROR bad command line format\r\n"]),
    (b"set a 0 0 1\r\nabc\r\n", [b"CLIENT_ERROR bad data chunk\r\n", b"ERROR\r\n"]),  # as memcached
])
def test_framing_errors_are_answered_like_memcached(data: bytes, replies) -> None:
    got = parse([data])
    assert [r.reply for r in got] == replies


def test_line_too_long_is_a_protocol_error_but_long_gets_wait() -> None:
    parser = MemcacheRequestParser()
    parser.feed(b"x" * (MAX_LINE + 1))
    with pytest.raises(ProtocolError, match="CLIENT_ERROR line too long"):
        parser.next()
    parser = MemcacheRequestParser()
    keys = b" ".join(b"key%d" % i for i in range(2000))
    parser.feed(b"get " + keys[:5000])
    assert parser.next() is None
    parser.feed(keys[5000:] + b"\r\n")
    assert len(parser.next().args) == 2001


def test_megabyte_value_in_small_pieces() -> None:
    value = bytes(range(256)) * 4096
    data = b"set big 0 0 %d\r\n" % len(value) + value + b"\r\n"
    (request,) = parse([data[i:i + 1000] for i in range(0, len(data), 1000)])
    assert request.raw == data


REPLIES = [
    b"STORED\r\n",
    b"END\r\n",
    b"VALUE a 0 5\r\nhello\r\nVALUE b 3 2 77\r\n\r\n\r\nEND\r\n",
    b"12\r\n",
    b"SERVER_ERROR out of memory\r\n",
    b"STAT pid 1\r\nSTAT version 1.6\r\nEND\r\n",
    b"VERSION 1.6.18\r\n",
]


def frame(chunks) -> List[bytes]:
    framer = MemcacheReplyFramer()
    out = []
    for chunk in chunks:
        framer.feed(chunk)
        while True:
            reply = framer.next()
            if reply is None:
                break
            out.append(reply)
    return out


def test_replies_framed_at_every_cut() -> None:
    stream = b"".join(REPLIES)
    assert frame([stream]) == REPLIES
    for cut in range(len(stream) + 1):
        assert frame([stream[:cut], stream[cut:]]) == REPLIES, cut
    assert frame([bytes([b]) for b in stream]) == REPLIES


@pytest.mark.parametrize("data", [b"VALUE a 0 x\r\n", b"VALUE a 0 1\r\nxyz\r\n", b"X" * 70000])
def test_reply_garbage_is_a_protocol_error(data: bytes) -> None:
    framer = MemcacheReplyFramer()
    framer.feed(data)
    with pytest.raises(ProtocolError):
        framer.next()


def test_split_values() -> None:
    assert split_values(REPLIES[2]) == [(b"a", b"VALUE a 0 5\r\nhello\r\n"), (b"b", b"VALUE b 3 2 77\r\n\r\n\r\n")]


# -- the codec --------------------------------------------------------------


class Server:
    def __init__(self, name: str) -> None:
        self.name = name


A, B = Server("A"), Server("B")


class Router:
    live_servers = (A, B)

    def server_for_key(self, key: bytes) -> Server:
        return A if key.startswith(b"a") else B

    def servers_for_keys(self, keys: List[bytes]) -> List[Server]:
        return [self.server_for_key(key) for key in keys]


def codec() -> MemcacheCodec:
    (config,) = load_text("p:\n  listen: 127.0.0.1:1\n  servers:\n   - 10.0.0.1:1:1\n")
    return MemcacheCodec(config)


def prepared(line: bytes, the_codec=None) -> Request:
    (request,) = parse([line])
    (the_codec or codec()).prepare(request, None)
    return request


@pytest.mark.parametrize("line, reply", [
    (b"version\r\n", b"VERSION twinproxy-"),
    (b"version foo bar\r\n", b"VERSION twinproxy-"),
    (b"get\r\n", b"ERROR\r\n"),
    (b"GET a\r\n", b"ERROR\r\n"),
    (b"bogus\r\n", b"ERROR\r\n"),
    (b"gat 10\r\n", b"END\r\n"),
    (b"gat x a\r\n", b"CLIENT_ERROR invalid exptime argument\r\n"),
    (b"get a " + b"k" * 251 + b"\r\n", b"CLIENT_ERROR bad command line format\r\n"),
    (b"delete\r\n", b"ERROR\r\n"),
    (b"delete a b c d e\r\n", b"ERROR\r\n"),
    (b"delete a x\r\n", b"CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]\r\n"),
    (b"incr a\r\n", b"ERROR\r\n"),
    (b"touch a\r\n", b"ERROR\r\n"),
    (b"verbosity\r\n", b"ERROR\r\n"),
    (b"verbosity foo bar my\r\n", b"ERROR\r\n"),
    (b"stats slabs\r\n", b"SERVER_ERROR 'stats slabs' not supported by twinproxy\r\n"),
    (b"slabs reassign 1 2\r\n", b"SERVER_ERROR 'slabs' not supported by twinproxy\r\n"),
])
def test_local_answers(line: bytes, reply: bytes) -> None:
    request = prepared(line)
    assert request.kind == LOCAL and request.reply.startswith(reply), request.reply


def test_quit_closes_silently() -> None:
    request = prepared(b"quit\r\n")
    assert (request.reply, request.close_after) == (b"", True)


def test_keyed_commands_forward_and_noreply_is_quiet() -> None:
    for line, raw, key in [(b"incr n 1 noreply\r\n", b"incr n 1\r\n", b"n"),
                           (b"delete k 0 noreply\r\n", b"delete k\r\n", b"k"),
                           (b"touch t 10 noreply\r\n", b"touch t 10\r\n", b"t")]:
        request = prepared(line)
        assert (request.kind, request.raw, request.key, request.quiet) == (FORWARD, raw, key, True)
    request = prepared(b"delete k 0\r\n")
    assert (request.kind, request.quiet) == (FORWARD, False)


def test_get_split_and_merged_in_key_order_with_misses_and_duplicates() -> None:
    the_codec = codec()
    request = prepared(b"gets a1 b1 a2 a1 b2\r\n", the_codec)
    assert request.kind == FRAGMENT
    routes = the_codec.fragment(request, Router())
    assert [(s.name, f.raw) for s, f in routes] == [("A", b"gets a1 a2 a1\r\n"), ("B", b"gets b1 b2\r\n")]
    request.fragments = [f for _, f in routes]
    routes[0][1].reply = b"VALUE a1 0 1 5\r\nx\r\nVALUE a1 0 1 5\r\nx\r\nEND\r\n"
    routes[1][1].reply = b"VALUE b2 0 1 6\r\ny\r\nEND\r\n"
    assert the_codec.coalesce(request) == (b"VALUE a1 0 1 5\r\nx\r\nVALUE a1 0 1 5\r\nx\r\n"
                                           b"VALUE b2 0 1 6\r\ny\r\nEND\r\n")
    routes[1][1].reply = b"SERVER_ERROR Connection timed out\r\n"
    assert the_codec.coalesce(request) == b"SERVER_ERROR Connection timed out\r\n"


def test_gat_keeps_exptime_in_every_fragment() -> None:
    the_codec = codec()
    request = prepared(b"gat 30 a b\r\n", the_codec)
    routes = the_codec.fragment(request, Router())
    assert [f.raw for _, f in routes] == [b"gat 30 a\r\n", b"gat 30 b\r\n"]


def test_broadcast_merges() -> None:
    the_codec = codec()
    request = prepared(b"flush_all 10 noreply\r\n", the_codec)
    assert request.quiet and request.kind == FRAGMENT
    routes = the_codec.fragment(request, Router())
    assert [(s.name, f.raw) for s, f in routes] == [("A", b"flush_all 10\r\n"), ("B", b"flush_all 10\r\n")]
    request.fragments = [f for _, f in routes]
    for fragment in request.fragments:
        fragment.reply = b"OK\r\n"
    assert the_codec.coalesce(request) == b"OK\r\n"
    request.fragments[1].reply = b"SERVER_ERROR Connection refused\r\n"
    assert the_codec.coalesce(request) == b"SERVER_ERROR flush_all failed on B: SERVER_ERROR Connection refused\r\n"
    for fragment in request.fragments:
        fragment.reply = b"CLIENT_ERROR invalid exptime argument\r\n"
    assert the_codec.coalesce(request) == b"CLIENT_ERROR invalid exptime argument\r\n"


def test_stats_summed_with_the_proxys_own_identity() -> None:
    the_codec = codec()
    request = prepared(b"stats\r\n", the_codec)
    routes = the_codec.fragment(request, Router())
    request.fragments = [f for _, f in routes]
    request.fragments[0].reply = b"STAT pid 1\r\nSTAT version 1.6\r\nSTAT curr_items 3\r\nSTAT threads 4\r\nEND\r\n"
    request.fragments[1].reply = b"STAT pid 2\r\nSTAT version 1.6\r\nSTAT curr_items 4\r\nSTAT threads 4\r\nEND\r\n"
    merged = the_codec.coalesce(request).decode()
    lines = dict(line.split(" ", 2)[1:] for line in merged.split("\r\n") if line.startswith("STAT"))
    assert lines["curr_items"] == "7" and lines["threads"] == "4" and lines["servers"] == "2"
    assert lines["version"].startswith("twinproxy-") and lines["pid"] != "1"
    assert merged.endswith("END\r\n")


line_token = st.binary(min_size=1, max_size=12).filter(lambda b: b" " not in b and b"\n" not in b and b"\r" not in b)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from([b"get", b"set", b"incr", b"delete", b"bogus"]),
                          st.lists(line_token, max_size=4), st.binary(max_size=20)), max_size=6), st.data())
def test_any_cut_parses_identically(commands, data) -> None:
    stream = b""
    for name, tokens, value in commands:
        if name == b"set":
            stream += b"set k 0 0 %d\r\n" % len(value) + value + b"\r\n"
        else:
            stream += b" ".join([name, *tokens]) + b"\r\n"
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=5)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    assert shape(parse(chunks)) == shape(parse([stream]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_garbage_raises_nothing_but_protocol_error(data: bytes) -> None:
    for make in (MemcacheRequestParser, MemcacheReplyFramer):
        parser = make()
        parser.feed(data)
        try:
            while parser.next() is not None:
                pass
        except ProtocolError:
            pass


def test_meta_commands() -> None:
    the_codec = codec()
    (ms,) = parse([b"ms k 3 T10 F5\r\nabc\r\n"])
    the_codec.prepare(ms, None)
    assert (ms.kind, ms.key, ms.raw) == (FORWARD, b"k", b"ms k 3 T10 F5\r\nabc\r\n")
    for line in (b"mg k v t\r\n", b"md k\r\n", b"ma k D5 v\r\n", b"me k\r\n"):
        request = prepared(line, the_codec)
        assert (request.kind, request.key, request.raw) == (FORWARD, b"k", line)
    assert prepared(b"mn\r\n").reply == b"MN\r\n"
    quiet = prepared(b"mg k v q\r\n")
    assert (quiet.kind, quiet.raw, quiet.terminator) == (FORWARD, b"mg k v q\r\nmn\r\n", b"MN\r\n")
    assert prepared(b"mg\r\n").reply == b"CLIENT_ERROR bad command line format\r\n"
    assert prepared(b"mg a\x01b v\r\n").reply == b"CLIENT_ERROR bad command line format\r\n"
    assert prepared(b"mg YQ== b v\r\n").kind == FORWARD  # base64 keys route as sent
    # Refused ms blocks are skipped, not run as commands.
    assert [r.reply for r in parse([b"ms k\x01 9\r\nflush_all\r\nmn\r\n"])] == [
        b"CLIENT_ERROR bad command line format\r\n", None]
    assert [r.reply for r in parse([b"ms k 1\r\nabc\r\n"])] == [b"CLIENT_ERROR bad data chunk\r\n", b"ERROR\r\n"]
    assert [r.reply for r in parse([b"ms k x\r\n"])] == [b"CLIENT_ERROR bad command line format\r\n"]


def test_meta_value_replies_are_framed() -> None:
    stream = b"VA 3 t-1 f5\r\nabc\r\nHD\r\nEN\r\nVA 0\r\n\r\nMN\r\n"
    expected = [b"VA 3 t-1 f5\r\nabc\r\n", b"HD\r\n", b"EN\r\n", b"VA 0\r\n\r\n", b"MN\r\n"]
    for cut in range(len(stream) + 1):
        assert frame([stream[:cut], stream[cut:]]) == expected


MEMCACHE_REPLIES = [b"STORED\r\n", b"NOT_STORED\r\n", b"EXISTS\r\n", b"NOT_FOUND\r\n", b"END\r\n",
                    b"VALUE k 0 1\r\nv\r\nEND\r\n", b"DELETED\r\n", b"TOUCHED\r\n", b"OK\r\n", b"VERSION 1.6\r\n",
                    b"EN\r\n", b"HD\r\n", b"NS\r\n", b"EX\r\n", b"NF\r\n", b"VA 1\r\nv\r\n", b"MN\r\n", b"42\r\n",
                    b"STAT pid 1\r\nEND\r\n", b"", b"E", b"ERROR\r\n", b"SERVER_ERROR out of memory\r\n",
                    b"CLIENT_ERROR bad data chunk\r\n"]


@pytest.mark.parametrize("reply", MEMCACHE_REPLIES)
def test_error_starts_let_only_error_replies_reach_is_error(reply: bytes) -> None:
    # The frontend's per-command error count tests reply[:error_start_width] first: STORED, END, EXISTS
    # (one byte, S/E) no longer pass that test, the three error replies still do.
    the_codec = codec()
    starts_like_error = reply[:the_codec.error_start_width] in the_codec.error_starts
    assert starts_like_error == the_codec.is_error(reply)
    assert all(len(start) == the_codec.error_start_width for start in the_codec.error_starts)
