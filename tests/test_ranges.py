"""RangeSet against a plain Python set, on random operations (no sockets, fast)."""

from __future__ import annotations

import random

import pytest

from transport.blocks.ranges import RangeSet, parse_ranges
from transport.errors import ProtocolError


def _members(rs: RangeSet) -> set[int]:
    return set(rs.members())


@pytest.mark.parametrize("seed", range(20))
def test_random_ops_match_a_set(seed: int) -> None:
    rng = random.Random(seed)
    rs, ref = RangeSet(), set()
    for _ in range(300):
        a = rng.randrange(0, 200)
        b = a + rng.randrange(0, 20)
        op = rng.random()
        if op < 0.55:
            rs.add(a, b)
            ref.update(range(a, b))
        elif op < 0.9:
            rs.discard(a, b)
            ref.difference_update(range(a, b))
        else:
            got = rs.pop_first(rng.randrange(1, 8))
            if got is None:
                assert not ref
            else:
                assert got[0] == min(ref)
                ref.difference_update(range(*got))
        assert _members(rs) == ref
        assert rs.count == len(ref)
        ranges = list(rs)
        for (s1, e1), (s2, _) in zip(ranges, ranges[1:], strict=False):
            assert s1 < e1 < s2  # sorted, disjoint, never adjacent
        x = rng.randrange(0, 220)
        assert (x in rs) == (x in ref)
        assert rs.covers(a, b) == all(i in ref for i in range(a, b))
        assert rs.overlaps(a, b) == any(i in ref for i in range(a, b))
        assert _members(rs.complement(0, 210)) == set(range(210)) - ref


def test_huge_range_is_one_range() -> None:
    rs = RangeSet([(0, 10**10)])
    assert len(rs) == 1 and rs.count == 10**10
    rs.discard(5, 6)
    assert rs.to_list() == [(0, 5), (6, 10**10)]


@pytest.mark.parametrize("bad", [
    "xyz", [1], [[0]], [[0, 1, 2]], [[1, 0]], [[0, 11]], [[-1, 2]], [["0", 1]], [[0.5, 1]],
    [[True, 2]], {"a": 1},
])
def test_parse_ranges_refuses(bad: object) -> None:
    with pytest.raises(ProtocolError):
        parse_ranges(bad, limit=10)


def test_parse_ranges_bounds_count() -> None:
    with pytest.raises(ProtocolError):
        parse_ranges([[0, 1]] * 11, limit=10, max_ranges=10)
    assert parse_ranges([[0, 2], [1, 5]], limit=10).to_list() == [(0, 5)]


@pytest.mark.parametrize("seed", range(10))
def test_bulk_update_and_difference_match_a_set(seed: int) -> None:
    """Many ranges at once take the one-pass paths (merge, linear subtraction)."""
    rng = random.Random(seed)
    rs, ref = RangeSet(), set()
    for _ in range(20):
        pairs = [(a, a + rng.randrange(1, 6)) for a in rng.sample(range(400), 40)]
        if rng.random() < 0.5:
            rs.update(pairs)
            for a, b in pairs:
                ref.update(range(a, b))
        else:
            rs.difference_update(pairs)
            for a, b in pairs:
                ref.difference_update(range(a, b))
        assert _members(rs) == ref
        ranges = list(rs)
        for (s1, e1), (s2, _) in zip(ranges, ranges[1:], strict=False):
            assert s1 < e1 < s2


def test_difference_of_many_ranges_is_fast() -> None:
    import time

    big = RangeSet()
    big.merge((2 * k, 2 * k + 1) for k in range(65536))
    t0 = time.monotonic()
    big.difference_update(RangeSet((2 * k, 2 * k + 1) for k in range(0, 65536, 2)))
    assert big.count == 32768 and time.monotonic() - t0 < 1.0
