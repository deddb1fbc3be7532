"""Sets of integers kept as sorted, disjoint, half-open ranges.

The shape follows aioquic's ``RangeSet`` (``aioquic/quic/rangeset.py``): a list
of ``range`` objects, merged on insert, so the memory a set takes grows with
the number of *gaps*, never with the number of members. Block numbers of a
10 TiB file (2.6 million 4 MiB blocks) received in order cost one range, and
a peer that names ``[0, 10**10)`` costs one range too, not ten billion ints.

Used for blocks received, blocks still missing and blocks asked for, and for
byte ranges within one block (piece assembly).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, Sequence

from transport.errors import ProtocolError

__all__ = ["RangeSet", "parse_ranges"]

_FEW = 8
"""Up to this many ranges, ``update``/``difference_update`` work range by range."""


class RangeSet:
    """Sorted, disjoint, non-adjacent half-open ranges ``[start, stop)`` of ints.

    Operations cost O(log n + k) where n is the number of ranges held and k
    the number of ranges an operation merges or splits; nothing is expanded
    into members.
    """

    __slots__ = ("_starts", "_stops")

    def __init__(self, ranges: Iterable[tuple[int, int] | range] = ()) -> None:
        self._starts: list[int] = []
        self._stops: list[int] = []
        for r in ranges:
            if isinstance(r, range):
                self.add(r.start, r.stop)
            else:
                self.add(r[0], r[1])

    # -- queries ----------------------------------------------------------------------
    def __bool__(self) -> bool:
        return bool(self._starts)

    def __len__(self) -> int:
        """The number of ranges (not of members: see ``count``)."""
        return len(self._starts)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(zip(self._starts, self._stops, strict=True))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RangeSet):
            return NotImplemented
        return self._starts == other._starts and self._stops == other._stops

    def __repr__(self) -> str:
        return f"RangeSet({list(self)!r})"

    def __contains__(self, value: int) -> bool:
        i = bisect_right(self._starts, value) - 1
        return i >= 0 and value < self._stops[i]

    @property
    def count(self) -> int:
        """The number of members."""
        return sum(b - a for a, b in self)

    def first(self) -> int | None:
        return self._starts[0] if self._starts else None

    def covers(self, start: int, stop: int) -> bool:
        """Whether every member of ``[start, stop)`` is in the set (True when empty)."""
        if start >= stop:
            return True
        i = bisect_right(self._starts, start) - 1
        return i >= 0 and self._stops[i] >= stop

    def overlaps(self, start: int, stop: int) -> bool:
        """Whether any member of ``[start, stop)`` is in the set."""
        if start >= stop:
            return False
        i = bisect_left(self._stops, start + 1)
        return i < len(self._starts) and self._starts[i] < stop

    def members(self) -> Iterator[int]:
        """Every member in order (lazily: only for sets known to be small)."""
        for a, b in self:
            yield from range(a, b)

    def to_list(self) -> list[tuple[int, int]]:
        """``[(start, stop), ...]``: the wire form (JSON arrays of two ints)."""
        return list(self)

    def copy(self) -> RangeSet:
        out = RangeSet()
        out._starts = list(self._starts)
        out._stops = list(self._stops)
        return out

    # -- updates ----------------------------------------------------------------------
    def add(self, start: int, stop: int | None = None) -> None:
        """Add ``[start, stop)`` (``stop`` defaults to ``start + 1``), merging neighbours."""
        if stop is None:
            stop = start + 1
        if start >= stop:
            return
        # Ranges touching or overlapping [start, stop) are those with stop >= start
        # and start <= stop; they are contiguous in the sorted lists.
        lo = bisect_left(self._stops, start)
        hi = bisect_right(self._starts, stop)
        if lo < hi:
            start = min(start, self._starts[lo])
            stop = max(stop, self._stops[hi - 1])
        self._starts[lo:hi] = [start]
        self._stops[lo:hi] = [stop]

    def discard(self, start: int, stop: int | None = None) -> None:
        """Remove ``[start, stop)`` (``stop`` defaults to ``start + 1``), splitting ranges."""
        if stop is None:
            stop = start + 1
        if start >= stop:
            return
        lo = bisect_right(self._stops, start)
        hi = bisect_left(self._starts, stop)
        if lo >= hi:
            return
        new_starts: list[int] = []
        new_stops: list[int] = []
        if self._starts[lo] < start:
            new_starts.append(self._starts[lo])
            new_stops.append(start)
        if self._stops[hi - 1] > stop:
            new_starts.append(stop)
            new_stops.append(self._stops[hi - 1])
        self._starts[lo:hi] = new_starts
        self._stops[lo:hi] = new_stops

    def pop_first(self, limit: int = 1) -> tuple[int, int] | None:
        """Remove and return up to ``limit`` members from the front, as ``(start, stop)``."""
        if not self._starts:
            return None
        start = self._starts[0]
        stop = min(self._stops[0], start + max(1, limit))
        self.discard(start, stop)
        return start, stop

    def update(self, other: Iterable[tuple[int, int]]) -> None:
        """Add every range of ``other``: one at a time for a few, ``merge`` for many."""
        pairs = list(other)
        if len(pairs) > _FEW:
            self.merge(pairs)
            return
        for a, b in pairs:
            self.add(a, b)

    def merge(self, other: Iterable[tuple[int, int]]) -> None:
        """Add many ``(start, stop)`` ranges at once: one sort of the held and the new
        ranges and one coalescing pass, O((n + m) log(n + m)); ``update`` costs a list
        insertion per range, O(n) each when they land in the middle."""
        pairs = sorted([*zip(self._starts, self._stops, strict=True),
                        *((a, b) for a, b in other if a < b)])
        starts: list[int] = []
        stops: list[int] = []
        for a, b in pairs:
            if stops and a <= stops[-1]:
                if b > stops[-1]:
                    stops[-1] = b
            else:
                starts.append(a)
                stops.append(b)
        self._starts, self._stops = starts, stops

    def difference_update(self, other: Iterable[tuple[int, int]]) -> None:
        """Remove every range of ``other``. A few are discarded one by one; many are
        subtracted in one walk over both sorted lists, O((n + m) log m), so subtracting a
        set of 65,536 ranges from another does not cost a list deletion per range."""
        pairs = list(other)
        if len(pairs) <= _FEW:
            for a, b in pairs:
                self.discard(a, b)
            return
        cut = RangeSet()
        cut.merge(pairs)  # sorted, disjoint
        cs, ce = cut._starts, cut._stops
        starts: list[int] = []
        stops: list[int] = []
        j, n = 0, len(cs)
        for s, e in zip(self._starts, self._stops, strict=True):
            while j < n and ce[j] <= s:
                j += 1
            cur, k = s, j
            while k < n and cs[k] < e:
                if cs[k] > cur:
                    starts.append(cur)
                    stops.append(cs[k])
                cur = max(cur, ce[k])
                if ce[k] >= e:
                    break
                k += 1
            if cur < e:
                starts.append(cur)
                stops.append(e)
        self._starts, self._stops = starts, stops

    def complement(self, start: int, stop: int) -> RangeSet:
        """The members of ``[start, stop)`` that are *not* in the set."""
        out = RangeSet([(start, stop)] if start < stop else [])
        out.difference_update(self)
        return out


def parse_ranges(value: object, *, limit: int, what: str = "ranges",
                 max_ranges: int = 1 << 20) -> RangeSet:
    """Validate a wire list ``[[start, stop], ...]`` against ``0 <= start < stop <= limit``.

    ``limit`` is the exclusive upper bound known from the session's manifest (a
    file's block count, a block's length). Raises ``ProtocolError`` naming the
    first bad item; never allocates more than ``max_ranges`` ranges, so a peer
    cannot make the receiver of the list do unbounded work.
    """
    if not isinstance(value, list | tuple):
        raise ProtocolError(f"{what} must be a list of [start, stop] pairs")
    if len(value) > max_ranges:
        raise ProtocolError(f"{what}: more than {max_ranges} ranges")
    out = RangeSet()
    for item in value:
        if (not isinstance(item, Sequence) or isinstance(item, str) or len(item) != 2
                or not all(type(x) is int for x in item)):
            raise ProtocolError(f"{what}: bad item {str(item)[:40]!r}, expected [start, stop]")
        start, stop = item
        if not 0 <= start < stop <= limit:
            raise ProtocolError(f"{what}: range [{start}, {stop}) outside [0, {limit})")
        out.add(start, stop)
    return out
