"""The data-plane half of a session: what to send, where received blocks go.

A session's files are numbered by their manifest position. The sender side is
a ``BlockFeed``: a work queue of (file, block) that any number of streams pull
from (work stealing: a fast stream takes more, a dead stream's blocks are put
back). The receiver side is a ``BlockSink`` (``transport.blocks.sink``): pieces
through one ``BlockAssembler`` into one ``FileReceiver`` per file.
Both are path-agnostic: HTTP streams use them now, the UDP path (#4) will feed
and drain the very same objects, so a failover (#5) moves the remaining
blocks of one feed from one path to the other with nothing re-sent.
"""

from __future__ import annotations

import asyncio
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor

from transport.blocks.ranges import RangeSet
from transport.blocks.sink import BlockSink
from transport.blocks.source import FileSource
from transport.errors import ProtocolError, TransportError

ProgressFn = Callable[[int, int], None]
"""Called with (file index, wire bytes) for every block moved."""

__all__ = ["BlockFeed", "BlockSink", "ProgressFn"]


class BlockFeed:
    """Blocks still to send, shared by every stream of a session.

    The queue is one ``RangeSet`` over a global block numbering (file ``f``'s
    block ``b`` is ``base(f) + b``, files in index order), so asking for every
    block of a 1 PiB file, or of a million files, costs one range, not one
    entry per block; ``take`` hands blocks out in file order, block order.
    Ranges are validated against the sources' layouts before anything is queued.
    """

    def __init__(self, sources: dict[int, FileSource], executor: Executor) -> None:
        self.sources = sources
        self.executor = executor
        # Two flat arrays (16 bytes a file): the file indices in order, and _bases[k], the
        # global number of block 0 of file _files[k]; the last base is the total.
        self._files = array("q", sorted(sources))
        self._bases = array("q", [0])
        for f in self._files:
            self._bases.append(self._bases[-1] + sources[f].layout.count)
        self._queue = RangeSet()
        self._changed = asyncio.Event()
        self.closed = False
        self.sent_bytes = 0
        self.on_progress: ProgressFn | None = None

    def _slot(self, file: int) -> int:
        k = bisect_left(self._files, file) if type(file) is int else len(self._files)
        if k == len(self._files) or self._files[k] != file:
            raise ProtocolError(f"unknown file index {file}")
        return k

    def block_count(self, file: int) -> int:
        """Blocks of ``file``; raises ``ProtocolError`` for a file this feed does not send."""
        k = self._slot(file)
        return self._bases[k + 1] - self._bases[k]

    def check_range(self, file: int, start: int, stop: int) -> None:
        """Raise ``ProtocolError`` unless ``0 <= start < stop <= block_count(file)``."""
        count = self.block_count(file)
        if not (type(start) is int and type(stop) is int and 0 <= start < stop <= count):
            raise ProtocolError(f"blocks [{start}, {stop}) out of range for file {file} "
                                f"({count} blocks)")

    def add_ranges(self, ranges: Sequence[tuple[int, int, int]]) -> int:
        """Queue ``(file, start, stop)`` half-open block ranges; all are checked before
        any is queued. Returns the number of blocks named (duplicates are queued once)."""
        for f, start, stop in ranges:
            self.check_range(f, start, stop)
        named = 0
        for f, start, stop in ranges:
            base = self._bases[self._slot(f)]
            self._queue.add(base + start, base + stop)
            named += stop - start
        self._changed.set()
        return named

    def add(self, items: Iterable[tuple[int, int]]) -> None:
        """Queue single ``(file, block)`` items (checked one by one)."""
        for f, b in items:
            self.check_range(f, b, b + 1 if type(b) is int else b)
            base = self._bases[self._slot(f)]
            self._queue.add(base + b)
        self._changed.set()

    def put_back(self, items: Iterable[tuple[int, int]]) -> None:
        """Re-queue blocks a failed stream had taken but not delivered (they were
        handed out in order, so they come out again before the blocks after them)."""
        for f, b in items:
            self._queue.add(self._bases[self._slot(f)] + b)
        self._changed.set()

    def take(self) -> tuple[int, int] | None:
        if self.closed or not self._queue:
            return None
        taken = self._queue.pop_first(1)
        assert taken is not None
        g = taken[0]
        # Files without blocks share their base with the next file: bisect_right skips them.
        k = bisect_right(self._bases, g) - 1
        return self._files[k], g - self._bases[k]

    @property
    def pending(self) -> int:
        """Blocks queued and not yet taken."""
        return self._queue.count

    error: TransportError | None = None
    """Why the feed failed (a source changed, the system ran out of descriptors), or None."""

    async def read(self, item: tuple[int, int]) -> tuple[bytes | bytearray, bytes]:
        """Read (wire bytes, digest) of a block off the event loop.

        A source that fails (``SourceChanged``, ``ResourceExhausted``, an I/O
        error) fails the whole feed: ``error`` keeps the first such error and
        every stream ends at its next ``take``, so no block of a file that
        changed is sent after the change was seen.
        """
        if self.error is not None:
            raise self.error
        f, b = item
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.executor, self.sources[f].read_block, b)
        except TransportError as exc:
            self.fail(exc)
            raise

    def fail(self, error: TransportError) -> None:
        """Stop the feed for good because of ``error`` (the first one is kept)."""
        if self.error is None:
            self.error = error
        self.closed = True
        self._changed.set()

    def delivered(self, item: tuple[int, int], nbytes: int) -> None:
        self.sent_bytes += nbytes
        if self.on_progress is not None:
            self.on_progress(item[0], nbytes)

    def close(self) -> None:
        """End the feed and give back every source's descriptor (reads in flight finish first)."""
        self.closed = True
        self._changed.set()
        for s in self.sources.values():
            s.close()
