"""Blocking commands in the codec: classified BLOCK, their keys checked, and how long the server may hold them."""

from __future__ import annotations

import math

import pytest

from tests.unit.protocols.test_redis_codec import Router, codec, prepared
from twinproxy.protocols.redis_blocking import AT_ONCE, FOREVER, block_seconds, timeout_milliseconds
from twinproxy.request import BLOCK, FORWARD, FRAGMENT, LOCAL

SPREAD = b"-ERR keys in request don't hash to the same server (use a hash tag to keep them together)\r\n"


@pytest.mark.parametrize("args, seconds", [
    ([b"BLPOP", b"a", b"1"], 1.0),
    ([b"brpop", b"a", b"a2", b"0.5"], 0.5),
    ([b"BRPOPLPUSH", b"a", b"a2", b"0"], FOREVER),
    ([b"BLMOVE", b"a", b"a2", b"LEFT", b"RIGHT", b"2.25"], 2.25),
    ([b"BLMPOP", b"3", b"2", b"a", b"a2", b"LEFT", b"COUNT", b"5"], 3.0),
    ([b"BZPOPMIN", b"a", b"0.0001"], 0.001),       # Redis rounds up to whole milliseconds
    ([b"BZPOPMAX", b"a", b"-0"], FOREVER),
    ([b"BZMPOP", b"0", b"1", b"a", b"MIN"], FOREVER),
    ([b"XREAD", b"BLOCK", b"1500", b"STREAMS", b"a", b"$"], 1.5),
    ([b"XREAD", b"COUNT", b"2", b"BLOCK", b"0", b"STREAMS", b"a", b"$"], FOREVER),
    ([b"XREAD", b"BLOCK", b"10", b"BLOCK", b"20", b"STREAMS", b"a", b"$"], 0.02),   # the last BLOCK counts
    ([b"XREADGROUP", b"GROUP", b"g", b"c", b"NOACK", b"BLOCK", b"250", b"STREAMS", b"a", b">"], 0.25),
])
def test_blocking_commands_are_classified_with_their_timeout(args, seconds) -> None:
    request = prepared(args)
    assert request.kind == BLOCK and request.reply is None
    assert request.blocks_for == seconds


@pytest.mark.parametrize("args", [
    [b"BLPOP", b"a", b"-1"],
    [b"BLPOP", b"a", b"x"],
    [b"BLPOP", b"a", b"inf"],
    [b"BLMOVE", b"a", b"a2", b"LEFT", b"UP", b"-1"],     # the server says "syntax error" first
    [b"XREAD", b"BLOCK", b"-5", b"STREAMS", b"a", b"$"],
    [b"XREAD", b"BLOCK", b"1.5", b"STREAMS", b"a", b"$"],
    [b"XREAD", b"BLOCK", b"x", b"BLOCK", b"10", b"STREAMS", b"a", b"$"],
])
def test_a_bad_timeout_is_left_to_the_server_which_answers_at_once(args) -> None:
    """Not answered here: the server refuses it in its own words and order, with the pool timeout as deadline."""
    request = prepared(args)
    assert request.kind == BLOCK and request.blocks_for == AT_ONCE


def test_xread_without_block_routes_as_usual() -> None:
    request = prepared([b"XREAD", b"COUNT", b"1", b"STREAMS", b"a", b"a2", b"0", b"0"])
    assert request.kind == FRAGMENT
    assert codec().fragment(request, Router()) == [("A", request)]


def test_keys_must_be_on_one_server_and_all_are_kept_for_a_migrating_slot() -> None:
    the_codec = codec()
    request = prepared([b"BRPOP", b"a", b"b", b"1"], the_codec=the_codec)
    assert the_codec.fragment(request, Router()) == [] and request.reply == SPREAD
    request = prepared([b"BLMOVE", b"a", b"a2", b"LEFT", b"RIGHT", b"1"], the_codec=the_codec)
    assert the_codec.fragment(request, Router()) == [("A", request)]
    assert (request.kind, request.key, request.positions) == (FORWARD, b"a", [1, 2])
    request = prepared([b"XREADGROUP", b"GROUP", b"g", b"c", b"BLOCK", b"0", b"STREAMS", b"b1", b"b2", b">", b">"],
                       the_codec=the_codec)
    assert the_codec.fragment(request, Router()) == [("B", request)] and request.positions == [7, 8]


def test_wrong_arity_and_bad_numkeys_get_redis_errors_when_routed() -> None:
    the_codec = codec()
    request = prepared([b"BLPOP", b"a"], the_codec=the_codec)
    assert the_codec.fragment(request, Router()) == []
    assert request.reply == b"-ERR wrong number of arguments for 'blpop' command\r\n"
    request = prepared([b"BLMPOP", b"1", b"x", b"a", b"LEFT"], the_codec=the_codec)
    assert the_codec.fragment(request, Router()) == []
    assert request.reply == b"-ERR numkeys should be greater than 0\r\n"


def test_wait_and_waitaof_stay_refused() -> None:
    for args in ([b"WAIT", b"0", b"0"], [b"WAITAOF", b"0", b"0", b"0"]):
        request = prepared(args)
        assert request.kind == LOCAL
        assert request.reply.startswith(b"-ERR command '%s' is not supported by twinproxy: it waits for replicas"
                                        % args[0])


def test_xread_block_goes_to_replicas_as_a_read_and_blpop_does_not() -> None:
    commands = codec().commands
    assert commands[b"xread"].readonly and not commands[b"xreadgroup"].readonly
    assert not commands[b"blpop"].readonly


@pytest.mark.parametrize("text, milliseconds", [
    (b"1", 1000), (b"1.5", 1500), (b"+0.01", 10), (b"1.", 1000), (b".5e-3", 1), (b"0x10", 16000),
    (b"0x1p-20", 1), (b"0.0001", 1), (b"1e-9", 1), (b"1e-4940", 1),      # ceilingl: any positive is >= 1 ms
    (b"0", 0), (b"-0", 0), (b"-0.0001", 0), (b"-0.0009999", 0),
    (b"-0.001", 0),          # the long double nearest -0.001, times 1000, is above -1: ceilingl gives 0
    (b"-0.002", -1), (b"-1", -1000),
    (b"9223372036854775.807", (1 << 63) - 1),
    (b"0e99999999999999", 0), (b"0." + b"0" * 4000 + b"1", 1), (b"1" + b"0" * 4400 + b"e-4400", 1000),
])
def test_seconds_timeouts_read_as_redis_reads_them(text, milliseconds) -> None:
    assert timeout_milliseconds(text) == milliseconds


@pytest.mark.parametrize("text", [b"9223372036854775.808", b"9223372036854776", b"1e400", b"-1e400", b"inf",
                                  b"-infinity", b"INF"])
def test_out_of_range_timeouts_are_negative_as_the_cast_makes_them(text) -> None:
    assert timeout_milliseconds(text) == -(1 << 63)


@pytest.mark.parametrize("text", [b"", b" 1", b"1 ", b"x", b"nan", b"1_0", b"1e", b"0x", b"0x1p", b"--1",
                                  b"1e5000", b"-1e5000", b"1e-5000", b"0x1p99999", b"1" * 5120,
                                  b"1e99999999999999999999",
                                  b"1e" + b"9" * 5000, b"0x1p" + b"9" * 5000, b"0." + b"0" * 5100 + b"1",
                                  b"\0abc", b"1\0"])      # strtold must read every byte
def test_what_is_not_a_float_to_redis_is_none(text) -> None:
    assert timeout_milliseconds(text) is None


def test_block_seconds_of_the_timeout_positions() -> None:
    assert block_seconds(b"blpop", [b"BLPOP", b"a"]) == AT_ONCE             # no timeout: arity error at once
    assert block_seconds(b"blmpop", [b"BLMPOP"]) == AT_ONCE
    assert block_seconds(b"xread", [b"XREAD", b"STREAMS", b"a", b"$"]) == AT_ONCE
    assert math.isinf(block_seconds(b"xreadgroup", [b"XREADGROUP", b"GROUP", b"g", b"c", b"BLOCK", b"0",
                                                    b"STREAMS", b"a", b">"]))
