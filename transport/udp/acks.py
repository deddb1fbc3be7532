"""Receiver-side record of the ack-eliciting packet numbers received, for FEEDBACK.

Ranges are kept as two ascending lists of starts and stops (half-open, disjoint,
non-adjacent), the layout of ``transport.blocks.ranges.RangeSet``, with an O(1) path for
the common case, the next number in order (``connection.py`` inlines that test). The
sender's floor (``DATA``'s ``floor_delta``) lets the tracker forget everything older, so
it holds about one window of packets' worth of gaps; ``max_ranges`` bounds it anyway
against a peer that never raises its floor (the oldest ranges are then forgotten and
``low`` rises past them: the report stays truthful, it just says less).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right


class AckTracker:
    __slots__ = ("starts", "stops", "low", "largest", "largest_time", "max_ranges")

    def __init__(self, max_ranges: int = 8192) -> None:
        self.starts: list[int] = []
        self.stops: list[int] = []
        self.low = 0            # numbers below are not reported (the sender's floor)
        self.largest = -1
        self.largest_time = 0.0
        self.max_ranges = max_ranges

    def add(self, pn: int, now: float) -> None:
        """Record ``pn`` (already authenticated and not a replay)."""
        if pn > self.largest:
            self.largest = pn
            self.largest_time = now
        if pn < self.low:
            return
        starts, stops = self.starts, self.stops
        if stops and pn == stops[-1]:
            stops[-1] = pn + 1
            return
        if not stops or pn > stops[-1]:
            starts.append(pn)
            stops.append(pn + 1)
            if len(starts) > self.max_ranges:
                self.raise_low(stops[0] + 1)
            return
        lo = bisect_left(stops, pn)          # first range whose stop >= pn
        hi = bisect_right(starts, pn + 1)    # ranges starting at or before pn + 1
        start, stop = pn, pn + 1
        if lo < hi:
            start = min(start, starts[lo])
            stop = max(stop, stops[hi - 1])
        starts[lo:hi] = [start]
        stops[lo:hi] = [stop]

    def raise_low(self, low: int) -> None:
        """Forget numbers below ``low`` (the sender no longer asks about them)."""
        if low <= self.low:
            return
        self.low = low
        starts, stops = self.starts, self.stops
        i = bisect_right(stops, low)
        if i:
            del starts[:i]
            del stops[:i]
        if starts and starts[0] < low:
            starts[0] = low

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self.starts, self.stops, strict=True))
