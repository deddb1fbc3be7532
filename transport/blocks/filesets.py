"""One set of block numbers per file, held compactly (the scheduler's per-file state).

A ``RangeSet`` costs about 220 bytes even with one range (the object and its two
lists); the scheduler keeps three per file (blocks wanted, acked, not started yet),
which at 100,000 one-block files was 66 MB. ``FileSets`` keeps nothing for a file
whose set is empty and a bare int ``n`` for a set that is the prefix ``[0, n)`` (a
one-block file's ``{0}``, a file wanted whole, a file acked in order); only a file
with gaps owns a ``RangeSet``. An int below 257 is a cached object in CPython, so a
small file's set costs its dict entry only.
"""

from __future__ import annotations

from collections.abc import Iterable

from transport.blocks.ranges import RangeSet

__all__ = ["FileSets"]


class FileSets:
    """``file -> RangeSet`` with compact storage; empty sets are not stored.

    ``view`` returns a set to read (a new one for a compactly stored set: never
    keep it or change it); the updates store the result back in its compact form."""

    __slots__ = ("_m",)

    def __init__(self) -> None:
        self._m: dict[int, int | RangeSet] = {}

    def __len__(self) -> int:
        """The number of files whose set is not empty."""
        return len(self._m)

    def nonempty(self, file: int) -> bool:
        return file in self._m

    def contains(self, file: int, value: int) -> bool:
        v = self._m.get(file)
        if v is None:
            return False
        if isinstance(v, int):
            return 0 <= value < v
        return value in v

    def view(self, file: int) -> RangeSet:
        """The file's set (empty when none): to read, or to change and ``_store`` back."""
        v = self._m.get(file)
        if v is None:
            return RangeSet()
        if isinstance(v, int):
            return RangeSet([(0, v)])
        return v

    def _store(self, file: int, s: RangeSet) -> None:
        if not s:
            self._m.pop(file, None)
        elif len(s) == 1 and s.first() == 0:
            self._m[file] = next(iter(s))[1]
        else:
            self._m[file] = s

    def update(self, file: int, other: Iterable[tuple[int, int]]) -> None:
        s = self.view(file)
        s.update(other)
        self._store(file, s)

    def add(self, file: int, value: int) -> None:
        v = self._m.get(file)
        if v is None and value == 0:
            self._m[file] = 1
        elif isinstance(v, int) and value == v:
            self._m[file] = v + 1  # the prefix grows by one (blocks acked in order)
        elif not self.contains(file, value):
            s = self.view(file)
            s.add(value)
            self._store(file, s)

    def discard(self, file: int, value: int) -> None:
        if self.contains(file, value):
            s = self.view(file)
            s.discard(value)
            self._store(file, s)

    def difference_update(self, file: int, other: Iterable[tuple[int, int]]) -> None:
        if file in self._m:
            s = self.view(file)
            s.difference_update(other)
            self._store(file, s)

    def pop_first(self, file: int) -> tuple[int, int] | None:
        """Take the lowest member (``RangeSet.pop_first``)."""
        if file not in self._m:
            return None
        s = self.view(file)
        got = s.pop_first()
        self._store(file, s)
        return got
