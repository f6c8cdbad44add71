"""The pure parts of the big-key copy: the claim protocol's names, the sweep's batch script call and reply, the
chunk sizes, and each type's chunk plan (what is read from the claim, what is written to the copy)."""

from __future__ import annotations

from twinproxy.cluster.movescripts import CLAIMS, claim_of
from twinproxy.dashboard import bigkeys
from twinproxy.dashboard.bigkeys import (
    CHUNK_BYTES,
    FIRST_COUNT,
    MAX_COUNT,
    STRING_CHUNK,
    SWEEP_BATCH,
    batch_command,
    batch_reply,
    claimed_key,
    is_reserved,
    next_count,
    plan_for,
    stream_info,
    tmp_of,
)
from twinproxy.dashboard.service import DEFAULT_BIG_KEY_BYTES


def test_names() -> None:
    """Claims, copies and the registry are reserved names; a claim gives its key back."""
    assert claimed_key(claim_of(b"a{t}b")) == b"a{t}b" and claimed_key(b"user:1") is None
    assert all(is_reserved(name) for name in (claim_of(b"k"), tmp_of(b"k"), CLAIMS))
    assert not is_reserved(b"__twinproxy") and not is_reserved(b"k")
    assert tmp_of(b"k") != claim_of(b"k")
    assert bigkeys.DEFAULT_BIG_KEY_BYTES == DEFAULT_BIG_KEY_BYTES


def test_the_batch_script_call() -> None:
    """KEYS are the keys; ARGV the threshold and MIGRATE's arguments; the script names claims as the proxy does."""
    head = [b"4194304", b"10.0.0.2", b"6379", b"0", b"5000"]
    assert batch_command(head, [b"a", b"b"]) == [b"EVAL", SWEEP_BATCH, b"2", b"a", b"b", *head]
    assert b"'%s' .. KEYS[i]" % claim_of(b"") in SWEEP_BATCH and b"'%s'" % CLAIMS in SWEEP_BATCH


def test_the_batch_script_reply() -> None:
    assert batch_reply([b"OK", []]) == (True, [])
    assert batch_reply([b"NOKEY", [b"big"]]) == (False, [b"big"])
    assert batch_reply(["OK", [b"x", b"y"]]) == (True, [b"x", b"y"])
    assert batch_reply(b"OK") is None and batch_reply([b"ERR", []]) is None and batch_reply([b"OK"]) is None


def test_chunk_sizes() -> None:
    """About CHUNK_BYTES a chunk, at most MAX_COUNT elements, at least one; an empty chunk doubles."""
    assert next_count(100, 100, 100 * 1024) == CHUNK_BYTES // 1024
    assert next_count(100, 100, 100) == MAX_COUNT
    assert next_count(100, 2, 10 * CHUNK_BYTES) == 1
    assert next_count(100, 0, 0) == 200 and next_count(800, 0, 0) == MAX_COUNT


def test_a_hash_is_scanned_until_the_cursor_is_0() -> None:
    plan = plan_for("hash", b"h", 4)
    assert plan.read() == [b"HSCAN", claim_of(b"h"), b"0", b"COUNT", b"%d" % FIRST_COUNT]
    assert plan.took([b"17", [b"f1", b"v1", b"f2", b"v2"]]) == [[b"HSET", tmp_of(b"h"), b"f1", b"v1", b"f2", b"v2"]]
    assert plan.read()[:3] == [b"HSCAN", claim_of(b"h"), b"17"]
    assert plan.took([b"5", []]) == []               # an empty stretch: nothing to write, go on
    assert plan.took([b"0", [b"f3", b"v3"]]) == [[b"HSET", tmp_of(b"h"), b"f3", b"v3"]]
    assert plan.read() is None and plan.chunks == 3


def test_a_set_is_scanned_into_sadd() -> None:
    plan = plan_for("set", b"s", 2)
    assert plan.read()[0] == b"SSCAN"
    assert plan.took([b"0", [b"m", b"n"]]) == [[b"SADD", tmp_of(b"s"), b"m", b"n"]]
    assert plan.read() is None


def test_a_sorted_set_is_read_by_rank_and_written_score_first() -> None:
    plan = plan_for("zset", b"z", 3)
    assert plan.read() == [b"ZRANGE", claim_of(b"z"), b"0", b"%d" % (FIRST_COUNT - 1), b"WITHSCORES"]
    assert plan.took([b"a", b"1.5", b"b", b"inf", b"c", b"-2"]) == [
        [b"ZADD", tmp_of(b"z"), b"1.5", b"a", b"inf", b"b", b"-2", b"c"]]
    assert plan.read() is None                      # fewer than asked: the end


def test_a_list_is_read_by_index_until_its_length() -> None:
    plan = plan_for("list", b"l", 5)
    plan.count = 2
    assert plan.read() == [b"LRANGE", claim_of(b"l"), b"0", b"1"]
    assert plan.took([b"x", b"y"]) == [[b"RPUSH", tmp_of(b"l"), b"x", b"y"]]
    plan.count = 2
    assert plan.read() == [b"LRANGE", claim_of(b"l"), b"2", b"3"]
    plan.took([b"z", b"w"])
    plan.count = 2
    assert plan.read() == [b"LRANGE", claim_of(b"l"), b"4", b"5"]
    assert plan.took([b"v"]) == [[b"RPUSH", tmp_of(b"l"), b"v"]]
    assert plan.read() is None


def test_a_string_is_read_by_range() -> None:
    plan = plan_for("string", b"s", STRING_CHUNK + 3)
    assert plan.read() == [b"GETRANGE", claim_of(b"s"), b"0", b"%d" % (STRING_CHUNK - 1)]
    assert plan.took(b"x" * STRING_CHUNK) == [[b"APPEND", tmp_of(b"s"), b"x" * STRING_CHUNK]]
    assert plan.read() == [b"GETRANGE", claim_of(b"s"), b"%d" % STRING_CHUNK, b"%d" % (2 * STRING_CHUNK - 1)]
    assert plan.took(b"yyy") == [[b"APPEND", tmp_of(b"s"), b"yyy"]]
    assert plan.read() is None


def test_a_stream_keeps_its_ids_and_counters() -> None:
    info = stream_info([b"length", 2, b"last-generated-id", b"9-0", b"max-deleted-entry-id", b"3-0",
                        b"entries-added", 5, b"groups", 0])
    plan = plan_for("stream", b"x", 2, info)
    assert plan.read() == [b"XRANGE", claim_of(b"x"), b"-", b"+", b"COUNT", b"%d" % FIRST_COUNT]
    assert plan.took([[b"1-0", [b"f", b"v"]], [b"4-1", [b"g", b"w", b"h", b"u"]]]) == [
        [b"XADD", tmp_of(b"x"), b"1-0", b"f", b"v"], [b"XADD", tmp_of(b"x"), b"4-1", b"g", b"w", b"h", b"u"]]
    assert plan.read() is None
    assert plan.finish(info) == [[b"XSETID", tmp_of(b"x"), b"9-0", b"ENTRIESADDED", b"5", b"MAXDELETEDID", b"3-0"]]
    more = plan_for("stream", b"x", 300, info)
    more.count = 1
    more.read()
    more.took([[b"1-0", [b"f", b"v"]]])
    assert more.read()[2] == b"(1-0"                 # after the last id, exclusive


def test_what_cannot_be_copied_in_chunks() -> None:
    """A stream with consumer groups and module types are MIGRATEd whole."""
    assert plan_for("stream", b"x", 2, {"groups": 1}) is None
    assert plan_for("ReJSON-RL", b"j", 1) is None
    assert plan_for("stream", b"x", 2, {"groups": 0}) is not None
