"""Continua: ketama's point counts and wrap-around, modula's weighted slots."""

from __future__ import annotations

import random

from twinproxy.distribution import KetamaContinuum, ModulaContinuum, RandomContinuum, build_continuum


def test_ketama_points_scale_with_weight():
    """Equal servers get 160 points each; weights scale the count as nutcracker's float32 formula."""
    equal = KetamaContinuum([("a", 1), ("b", 1), ("c", 1)])
    assert len(equal.points) == 480
    weighted = KetamaContinuum([("a", 1), ("b", 3)])
    counts = [weighted.indices.count(i) for i in (0, 1)]
    assert counts == [80, 240]


def test_ketama_points_sorted_and_wrap():
    """A hash above the last point wraps to the first point's server."""
    continuum = KetamaContinuum([("a", 1), ("b", 1)])
    assert continuum.points == sorted(continuum.points)
    assert continuum.lookup(0xFFFFFFFF) == continuum.indices[0]
    assert continuum.lookup(continuum.points[5]) == continuum.indices[5]


def test_modula_repeats_servers_by_weight():
    """Modula takes hash modulo the weighted list, in server order."""
    continuum = ModulaContinuum([("a", 1), ("b", 2)])
    assert continuum.slots == [0, 1, 1]
    assert [continuum.lookup(h) for h in range(6)] == [0, 1, 1, 0, 1, 1]


def test_random_uses_the_weighted_list():
    """Random picks entries of the weighted list, whatever the hash."""
    continuum = RandomContinuum([("a", 1), ("b", 3)], rng=random.Random(7))
    picks = [continuum.lookup(0) for _ in range(400)]
    assert set(picks) == {0, 1}
    assert picks.count(1) > picks.count(0)


def test_build_by_name():
    """build_continuum picks the class by distribution name."""
    assert isinstance(build_continuum("modula", [("a", 1)]), ModulaContinuum)
