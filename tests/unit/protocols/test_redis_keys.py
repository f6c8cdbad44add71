"""redis_keys in isolation: Redis 7's key specs applied as COMMAND GETKEYS applies them, and Redis's errors.

The same rules are checked against a live redis-server, for a corpus of
about 300 invocations, in tests/integration/test_redis_keys.py.
"""

import random
from typing import List

import pytest

from twinproxy.protocols.redis_keys import (
    TABLE,
    BadInvocation,
    CommandKeys,
    KeySpec,
    fixed_keys,
    key_positions,
    unknown_command,
    unknown_subcommand,
    xread_blocks,
)


def keys(line: str, include_not_keys: bool = False) -> List[str]:
    args = line.split()
    return [args[i] for i in key_positions([arg.encode() for arg in args], include_not_keys)]


def refusal(line: str) -> bytes:
    with pytest.raises(BadInvocation) as raised:
        key_positions([arg.encode() for arg in line.split()])
    return raised.value.message


@pytest.mark.parametrize("line, expected", [
    ("GET k", ["k"]),
    ("set k v GET", ["k"]),                                    # variable_flags: Redis's setGetKeys
    ("MSET a 1 b 2", ["a", "b"]),
    ("MSET a 1 b", ["a", "b"]),                                # GETKEYS names b; the codec refuses the odd pair
    ("BITOP AND d a b", ["d", "a", "b"]),
    ("ZUNIONSTORE d 2 a b WEIGHTS 1 2", ["d", "a", "b"]),      # the destination first, then the numkeys keys
    ("ZINTER 1 a", ["a"]),
    ("BLMPOP 0 2 a b LEFT", ["a", "b"]),
    ("EVAL s 2 a b x", ["a", "b"]),
    ("EVAL s 0 x", []),                                        # no_mandatory_keys
    ("XREAD COUNT 1 STREAMS a b 0 0", ["a", "b"]),             # keyword STREAMS, range with limit 2
    ("XREAD STREAMS a b c", ["a"]),                            # odd: GETKEYS halves down; XREAD itself refuses
    ("xread streams a streams 0 0", ["a", "streams"]),         # the first STREAMS from startfrom
    ("XREADGROUP GROUP g c STREAMS s >", ["s"]),
    ("XREADGROUP STREAMS a b c d STREAMS e", ["a", "b", "c"]),  # specs fail: Redis's xreadGetKeys walk
    ("SORT k BY w_* GET o_* STORE d", ["k", "d"]),
    ("SORT k STORE d1 STORE d2", ["k", "d2"]),                 # the last STORE is the one written
    ("SORT k GET store ALPHA", ["k"]),                         # a GET pattern, not the option
    ("SORT_RO k BY w_*", ["k"]),
    ("GEORADIUS g 15 37 200 km STORE d", ["g", "d"]),
    ("GEORADIUS g 15 37 200 km STORE d STOREDIST e", ["g", "d", "e"]),
    ("GEORADIUS g 15 37 200 km STORE", ["g"]),                 # keyword last: Redis's georadiusGetKeys
    ("GEORADIUSBYMEMBER g m 10 km STOREDIST d", ["g", "d"]),
    ("MIGRATE h 1 k 0 5", ["k"]),
    ("OBJECT ENCODING k", ["k"]),
    ("XINFO STREAM s FULL", ["s"]),
    ("MEMORY USAGE k SAMPLES 5", ["k"]),
    ("OBJECT HELP", []),
    ("PFMERGE d", ["d"]),                                      # GETKEYS refuses it; the command is valid
    ("WATCH a b", ["a", "b"]),
    ("PING", []),
    ("SPUBLISH c m", []),                                      # a channel: not_key
])
def test_keys_as_getkeys_names_them(line: str, expected: List[str]) -> None:
    assert keys(line) == expected


def test_migrate_keys_after_an_empty_key() -> None:
    args = [b"MIGRATE", b"h", b"1", b"", b"0", b"5", b"COPY", b"AUTH", b"pw", b"KEYS", b"a", b"b"]
    assert key_positions(args) == [10, 11]


def test_channels_only_when_asked() -> None:
    assert keys("SPUBLISH c m", include_not_keys=True) == ["c"]
    assert keys("SSUBSCRIBE a b", include_not_keys=True) == ["a", "b"]
    assert not TABLE[b"spublish"].has_keys


@pytest.mark.parametrize("line, message", [
    ("GET", b"ERR wrong number of arguments for 'get' command"),
    ("GET a b", b"ERR wrong number of arguments for 'get' command"),
    ("OBJECT", b"ERR wrong number of arguments for 'object' command"),
    ("OBJECT ENCODING", b"ERR wrong number of arguments for 'object|encoding' command"),
    ("OBJECT NOSUCH k", b"ERR unknown subcommand 'NOSUCH'. Try OBJECT HELP."),
    ("nosuch a b", b"ERR unknown command 'nosuch', with args beginning with: 'a' 'b' "),
    # numkeys, each command's own text (checked against Redis 7.0 in the corpus test)
    ("ZUNIONSTORE d 0 a", b"ERR at least 1 input key is needed for 'zunionstore' command"),
    ("ZUNIONSTORE d -1 a", b"ERR at least 1 input key is needed for 'zunionstore' command"),
    ("ZUNIONSTORE d 1x a", b"ERR value is not an integer or out of range"),
    ("ZUNIONSTORE d 01 a", b"ERR value is not an integer or out of range"),
    ("ZUNIONSTORE d 3 a b", b"ERR syntax error"),
    ("ZINTERCARD 0 a", b"ERR at least 1 input key is needed for 'zintercard' command"),
    ("LMPOP 0 a LEFT", b"ERR numkeys should be greater than 0"),
    ("LMPOP x a LEFT", b"ERR numkeys should be greater than 0"),
    ("LMPOP 2 a LEFT", b"ERR syntax error"),                   # the count eats LEFT|RIGHT
    ("SINTERCARD 3 a b", b"ERR Number of keys can't be greater than number of args"),
    ("SINTERCARD -1 a", b"ERR numkeys should be greater than 0"),
    ("EVAL s -1", b"ERR Number of keys can't be negative"),
    ("EVAL s 2 a", b"ERR Number of keys can't be greater than number of args"),
    ("EVAL s 99999999999999999999", b"ERR value is not an integer or out of range"),
    ("FCALL f x", b"ERR Bad number of keys provided"),
    ("FCALL f -1", b"ERR Number of keys can't be negative"),
    # keyed commands whose keys cannot be found: XREAD's own option errors
    ("XREAD COUNT 1 STREAMS a", b"ERR Unbalanced XREAD list of streams: for each stream key an ID or '$' "
                                b"must be specified."),
    ("XREAD COUNT x STREAMS a", b"ERR value is not an integer or out of range"),
    ("XREAD COUNT 1 BLOCK 0 x", b"ERR syntax error"),
    ("XREADGROUP STREAMS a b c d e f", b"ERR Missing GROUP option for XREADGROUP"),
    ("MIGRATE h 1 k 0 5 KEYS a b", b"ERR When using MIGRATE KEYS option, the key argument must be set to the "
                                   b"empty string"),
])
def test_refused_with_redis_error(line: str, message: bytes) -> None:
    assert refusal(line) == message


@pytest.mark.parametrize("args, message", [
    ([b"nosuch"], b"ERR unknown command 'nosuch', with args beginning with: "),
    ([b"NoSuch", b"a b", b"x\r\ny"], b"ERR unknown command 'NoSuch', with args beginning with: 'a b' 'x  y' "),
    ([b"no\0such", b"a\0b", b"c"], b"ERR unknown command 'no', with args beginning with: 'a' 'c' "),
    ([b"x" * 200], b"ERR unknown command '" + b"x" * 128 + b"', with args beginning with: "),
    ([b"n", b"a" * 124, b"bb"], b"ERR unknown command 'n', with args beginning with: '" + b"a" * 124 + b"' 'b' "),
    ([b"n", b"a" * 125, b"bb"], b"ERR unknown command 'n', with args beginning with: '" + b"a" * 125 + b"' "),
    ([b"n"] + [b"a" * 50] * 5,
     b"ERR unknown command 'n', with args beginning with: " + (b"'" + b"a" * 50 + b"' ") * 2 + b"'" + b"a" * 22
     + b"' "),
])
def test_unknown_command_text_as_redis_7_0(args: List[bytes], message: bytes) -> None:
    # Measured on redis-server 7.0.15 (the integration corpus checks the short cases live).
    assert unknown_command(args) == message


def test_unknown_subcommand_text() -> None:
    assert unknown_subcommand([b"xinfo", b"fo\0o"]) == b"ERR unknown subcommand 'fo'. Try XINFO HELP."
    assert unknown_subcommand([b"object", b"x\r\ny"]) == b"ERR unknown subcommand 'x  y'. Try OBJECT HELP."


@pytest.mark.parametrize("line, blocks", [
    ("XREAD BLOCK 0 STREAMS a 0", True),
    ("xread count 1 block 10 streams a 0", True),
    ("XREAD COUNT 1 STREAMS a 0", False),
    ("XREAD STREAMS block 0", False),                          # a stream named block
    ("XREAD COUNT block STREAMS a 0", False),                  # COUNT's value
    ("XREADGROUP GROUP block c STREAMS a >", False),           # a group named block
    ("XREADGROUP GROUP g block STREAMS a >", False),           # a consumer named block
    ("XREADGROUP GROUP g c NOACK BLOCK 5 STREAMS a >", True),
    ("XREAD BLOCK", False),                                    # no value: not the option (arity refuses it)
])
def test_xread_blocks_only_with_block_before_streams(line: str, blocks: bool) -> None:
    assert xread_blocks([arg.encode() for arg in line.split()]) is blocks


def test_keyword_search_from_the_end() -> None:
    # MIGRATE's KEYS spec searches back from argv[-2]; a made-up command shows it alone.
    spec = KeySpec(("RO",), ("keyword", "KEYS", -2), ("range", -1, 1, 0))
    command = CommandKeys("probe", -2, (), [spec])
    assert command.positions([b"probe", b"keys", b"a", b"KEYS", b"b", b"c"]) == [4, 5]
    assert command.positions([b"probe", b"x", b"KEYS", b"b"]) == [3]
    with pytest.raises(BadInvocation):   # KEYS last: the search starts before it, finds nothing
        command.positions([b"probe", b"x", b"KEYS"])


def test_a_range_with_a_limit_takes_its_share() -> None:
    spec = KeySpec(("RO",), ("index", 1), ("range", -1, 1, 3))
    command = CommandKeys("probe", -2, (), [spec])
    assert command.positions([b"probe"] + [b"x"] * 6) == [1, 2]
    assert command.positions([b"probe"] + [b"x"] * 7) == [1, 2]   # (7 // 3) - 1 past the first


def test_hand_written_facts_for_commands_the_table_lacks() -> None:
    single = fixed_keys("hexpire", -6, 1, 1, 1)
    assert single.single == 1 and single.range == (1, 1, 1)
    pairs = fixed_keys("mset2", -3, 1, -1, 2)
    assert pairs.range == (1, -1, 2)
    assert pairs.positions([b"mset2", b"a", b"1", b"b", b"2"]) == [1, 3]


def test_fast_paths_agree_with_the_spec_search() -> None:
    """``single``, ``range`` and ``fixed`` are shortcuts the codec takes: the spec search must agree."""
    rng = random.Random(16)
    checked = 0
    for name, command in TABLE.items():
        if command.subcommands is not None:
            continue
        for _ in range(5):
            count = abs(command.arity) if command.arity > 0 else -command.arity + rng.randrange(6)
            args = [name] + [b"a%d" % i for i in range(1, count)]
            try:
                found = command.positions(args)
            except BadInvocation:
                continue
            if command.fixed is not None:
                saved, command.fixed = command.fixed, None
                try:
                    assert command.positions(args) == found, name
                finally:
                    command.fixed = saved
            if command.single is not None:
                assert found == [command.single], name
            if command.range is not None:
                first, last, step = command.range
                assert found == list(range(first, count + last + 1 if last < 0 else last + 1, step)), name
            checked += 1
    assert checked > 500


def test_table_covers_every_command_and_subcommand() -> None:
    assert len(TABLE) > 200
    assert set(TABLE[b"object"].subcommands) == {b"encoding", b"freq", b"help", b"idletime", b"refcount"}
    assert TABLE[b"object"].subcommands[b"encoding"].single == 2
    assert TABLE[b"get"].single == 1 and TABLE[b"mget"].range == (1, -1, 1)
    assert TABLE[b"rename"].fixed == (1, 2)
    movable = {name for name, command in TABLE.items() if "movablekeys" in command.flags}
    assert len(movable) == 25 and b"xread" in movable and b"zunionstore" in movable
