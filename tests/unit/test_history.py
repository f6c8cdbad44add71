"""The register history checker of the migration tests (tests/history.py), on hand-made histories."""

from __future__ import annotations

from tests.history import Op, check


def w(value: bytes, start: float, end: float, ok: bool = True) -> Op:
    return Op("c", "write", b"k", value, start, end, ok)


def r(value, start: float, end: float) -> Op:
    return Op("c", "read", b"k", value, start, end, True)


def test_sequential_reads_of_the_latest_write_pass() -> None:
    assert check([w(b"1", 0, 1), r(b"1", 2, 3), w(b"2", 4, 5), r(b"2", 6, 7)]) == []


def test_a_read_concurrent_with_a_write_may_see_either_value() -> None:
    assert check([w(b"1", 0, 1), w(b"2", 2, 5), r(b"1", 3, 4), r(b"2", 3, 4)]) == []


def test_a_stale_read_is_found() -> None:
    problems = check([w(b"1", 0, 1), w(b"2", 2, 3), r(b"1", 4, 5)])
    assert len(problems) == 1 and "stale read of b'1'" in problems[0]


def test_a_lost_write_is_found_as_a_read_of_nothing() -> None:
    problems = check([w(b"1", 0, 1), r(None, 2, 3)])
    assert len(problems) == 1 and "read of nothing" in problems[0]


def test_a_failed_write_is_never_required_to_be_seen() -> None:
    assert check([w(b"1", 0, 1), w(b"2", 2, 3, ok=False), r(b"1", 4, 5)]) == []
    assert check([w(b"1", 0, 1), w(b"2", 2, 3, ok=False), r(b"2", 4, 5)]) == []


def test_a_value_nobody_wrote_is_found() -> None:
    assert "no write stored" in check([r(b"9", 0, 1)])[0]


def test_a_write_that_ended_in_an_unsure_window_may_be_lost_and_nothing_else_may() -> None:
    lost = [w(b"1", 0, 1), w(b"2", 2, 3), r(b"1", 4, 5)]          # 2 acknowledged, then gone (a failover)
    assert check(lost) != []
    assert check(lost, unsure=[(2.5, 3.5)]) == []
    assert check(lost, unsure=[(3.5, 4.5)]) != []                 # it ended before the window
    assert check([w(b"1", 0, 1), r(None, 2, 3)], unsure=[(1.5, 2.5)]) != []   # reads are not excused
    stale = [w(b"1", 0, 1), w(b"2", 2, 3), r(b"2", 4, 5), w(b"3", 6, 7), r(b"2", 8, 9)]
    assert check(stale, unsure=[(2.5, 3.5)]) != []               # 3 ended outside: still a stale read
