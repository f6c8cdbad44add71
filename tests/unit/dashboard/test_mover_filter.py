"""The sweep's filter of a SCAN step's keys (twinproxy.dashboard.mover.range_keys), pure: the same keys as
slot_of decides, with and without hash tags and the migration's reserved names among them."""

from __future__ import annotations

import random

import pytest

from twinproxy.cluster.movescripts import claim_of
from twinproxy.cluster.slots import slot_of
from twinproxy.dashboard.bigkeys import tmp_of
from twinproxy.dashboard.mover import range_keys, slot_marks

pytestmark = pytest.mark.timeout(10)


def expected(keys, first, last):
    return [key for key in keys if first <= slot_of(key) <= last]


def test_plain_keys_are_picked_by_their_slot() -> None:
    rng = random.Random(7)
    keys = [b"key:%d" % rng.randrange(10 ** 9) for _ in range(5000)]
    for first, last in ((0, 1023), (342, 511), (7, 7), (1023, 1023)):
        assert range_keys(keys, slot_marks(first, last)) == (expected(keys, first, last), [])


def test_hash_tags_and_reserved_names_take_the_careful_path() -> None:
    rng = random.Random(8)
    keys = [b"user:{%d}:name" % rng.randrange(1000) for _ in range(500)] + [b"plain%d" % i for i in range(500)]
    keys += [b"{unclosed%d" % i for i in range(50)] + [b"{}empty%d" % i for i in range(5)]
    inside = next(key for key in keys if 100 <= slot_of(key) <= 600)
    outside = next(key for key in keys if not 100 <= slot_of(key) <= 600)
    names = [claim_of(inside), claim_of(outside), tmp_of(inside), b"__twinproxy:claims"]
    rng.shuffle(keys)
    matched, claims = range_keys(keys + names, slot_marks(100, 600))
    assert matched == expected(keys, 100, 600)
    assert claims == [inside]      # a claim of a key in the range is the key's; the other reserved names nothing


def test_an_adoption_s_keys_are_picked_by_what_belongs_says() -> None:
    keys = [b"plain%d" % i for i in range(200)] + [b"user:{%d}" % i for i in range(50)]
    mine = set(keys[::3])
    names = [claim_of(keys[0]), claim_of(keys[1])]
    matched, claims = range_keys(keys + names, slot_marks(0, 0), lambda key: key in mine)
    assert matched == [key for key in keys if key in mine] and claims == [keys[0]]
