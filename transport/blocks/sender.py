"""The sending half of a session: a lease scheduler over the session's sources.

``BlockSender`` replaces the take/put-back queue (``BlockFeed``) with the
``Scheduler`` of ``transport.blocks.scheduler``: each path leases pieces under
its own id (an HTTP stream leases whole blocks, one ahead of the socket),
reports them delivered when they are on the wire, and the receiver's
acknowledgements retire them: ``ack`` when a block is journaled, ``nack`` when
it failed its digest or was refused. A path that dies gives everything it held
back at once (``drop_path``); a lease a path did not deliver in time, or a
block delivered and never acknowledged, comes back when its deadline passes
(``expire``, run by the sender's own timer task at ``get_timer()``). So a lost
block is leased again within one deadline by any live path, not at the next
commit round.

Reads run in the session's worker threads; a source that fails (changed,
out of descriptors) fails the sender (``error``): every path ends at its next
lease and the session reports the error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor

from transport.blocks.leases import State
from transport.blocks.ranges import RangeSet
from transport.blocks.scheduler import DEFAULT_MAX_OPEN_BLOCKS, Lease, PathTiming, Scheduler
from transport.blocks.source import FileSource
from transport.blocks.sparse import Hole
from transport.errors import ProtocolError, TransportError

__all__ = ["HTTP_TIMING", "BlockSender", "Payload", "ReadFn"]

HTTP_TIMING = PathTiming(lease_timeout=60.0, ack_timeout=60.0, reliable=True)
"""Deadlines of an HTTP stream's leases, in seconds. A stream holds a lease while it
reads the block and waits for the socket (a 4 MiB block at 1 Mbit/s takes 34 s), so
the lease timeout is generous; a stream that dies gives its leases back at once
(``drop_path``), so the deadline is only a safety net. ``ack_timeout`` covers the
receiver's journal flush (0.5 s) and the acknowledgement's trip back."""

Payload = bytes | bytearray | memoryview | Hole
"""What a lease reads as: its bytes, or a ``Hole`` of its length (``transport.blocks.sparse``)."""

BUNDLE_OPEN = 2048
"""Open blocks allowed beyond ``DEFAULT_MAX_OPEN_BLOCKS`` when the session has one-block
files: a bundle leases up to 256 of them at once (``transport.http.framing``), and each
stream holds one bundle on the wire and one read ahead. The bound on open blocks protects
the receiver's assembly (64 MiB); bundled files never enter it, and what a stream holds in
memory is bounded by its bundles' bytes (about 1 MiB each), not by this count."""

PRUNE_MIN = 4096
"""Blocks the delivered-bytes map (``BlockSender.sent_bytes``) holds before it drops
the acknowledged ones."""

ReadFn = Callable[[int, int, bytes], None]
"""Called with (file, block, digest) for every block read from a source."""


class BlockSender:
    """Blocks of a session's ``sources`` to send, leased to paths (see the module docstring).

    ``sources`` maps file index -> ``FileSource``. ``want`` ranges are checked
    against the sources' block counts before any is queued; they are kept as
    ranges, so wanting every block of a 1 PiB file costs one range.
    """

    def __init__(self, sources: dict[int, FileSource], executor: Executor, *,
                 timing: PathTiming = HTTP_TIMING, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.sources = sources
        self.executor = executor
        layouts = {i: s.layout for i, s in sources.items()}
        small = any(lay.count == 1 for lay in layouts.values())
        self.sched = Scheduler(layouts, default_timing=timing,
                               max_open_blocks=DEFAULT_MAX_OPEN_BLOCKS + (BUNDLE_OPEN if small else 0))
        self.timing = timing
        self._clock = clock
        self.sent_bytes = 0
        """Bytes of leases delivered as data (holes not counted), each byte of a block
        once: a lease delivered again (its path died before the receiver had it, and
        another path took it over) counts in ``resent_bytes`` instead."""
        self.resent_bytes = 0
        self._delivered: dict[tuple[int, int], RangeSet] = {}
        """Bytes delivered per block not acknowledged yet (pruned of acked blocks as it
        grows: ``_prune``)."""
        self._prune_at = PRUNE_MIN
        self.hole_bytes = 0
        """Bytes of leases delivered as holes: announced, not sent as zeros."""
        self.on_progress: Callable[[int, int], None] | None = None
        self.on_hole: Callable[[int, int], None] | None = None
        """Called with (file, bytes) for a lease delivered as a hole (else ``on_progress``)."""
        self.on_read: ReadFn | None = None
        self.error: TransportError | None = None
        """Why the sender failed (a source changed, the system ran out of descriptors)."""
        self.closed = False
        self._changed: asyncio.Event | None = None
        self._timer: asyncio.Task[None] | None = None
        self._held: dict[str, Lease] = {}  # a lease taken while filling a bundle, sent next

    # -- bundles of one-block files ---------------------------------------------------
    def inline(self, lease: Lease) -> bool:
        """Whether ``lease`` is the whole only block of a one-block file (bundled)."""
        layout = self.sources[lease.file].layout
        return layout.count == 1 and lease.offset == 0 \
            and lease.length == layout.stored_range(0)[1]

    def take(self, path: str, *, max_items: int = 1, max_bytes: int = 0) -> tuple[list[Lease], bool]:
        """The next unit of work for ``path``: ``([lease], False)`` for an ordinary piece,
        or ``(leases, True)``: up to ``max_items`` whole one-block files (at least one,
        about ``max_bytes`` of data) to send as one bundle; ``([], False)``: nothing.
        ``max_items`` 1 (a peer without bundles) never bundles. A lease taken that does
        not fit the bundle is kept for the path's next ``take``."""
        first = self._held.pop(path, None) or self.lease(path)
        if first is None:
            return [], False
        if max_items <= 1 or not self.inline(first):
            return [first], False
        out = [first]
        total = first.length
        while len(out) < max_items and total < max_bytes:
            nxt = self.lease(path)
            if nxt is None:
                break
            if not self.inline(nxt):
                self._held[path] = nxt
                break
            out.append(nxt)
            total += nxt.length
        return out, True

    async def read_many(self, leases: list[Lease]) -> list[tuple[Payload, bytes | None]]:
        """``read`` of every lease, in one executor job (a bundle's whole one-block files;
        a file lying wholly in a hole reads as a ``Hole``, as in ``read``)."""
        if len(leases) == 1:
            return [await self.read(leases[0])]
        if self.error is not None:
            raise self.error

        def job() -> list[tuple[bytes | bytearray | Hole, bytes]]:
            return [self.sources[lease.file].read_wire(lease.block) for lease in leases]

        try:
            got = await asyncio.get_running_loop().run_in_executor(self.executor, job)
        except TransportError as exc:
            self.fail(exc)
            raise
        if self.on_read is not None:
            for lease, (_, digest) in zip(leases, got, strict=True):
                self.on_read(lease.file, lease.block, digest)
        return list(got)

    # -- what to send -----------------------------------------------------------------
    def block_count(self, file: int) -> int:
        """Blocks of ``file``; ``ProtocolError`` for a file this sender does not send."""
        src = self.sources.get(file) if type(file) is int else None
        if src is None:
            raise ProtocolError(f"unknown file index {file}")
        return src.layout.count

    def check_range(self, file: int, start: int, stop: int) -> None:
        """Raise ``ProtocolError`` unless ``0 <= start < stop <= block_count(file)``."""
        count = self.block_count(file)
        if not (type(start) is int and type(stop) is int and 0 <= start < stop <= count):
            raise ProtocolError(f"blocks [{start}, {stop}) out of range for file {file} "
                                f"({count} blocks)")

    def add_ranges(self, ranges: Sequence[tuple[int, int, int]]) -> int:
        """Want ``(file, start, stop)`` half-open block ranges (all checked first). Blocks
        the receiver lacks although acknowledged or delivered are sent again (``retry``).
        Returns the number of blocks named."""
        by_file: dict[int, list[tuple[int, int]]] = {}
        for f, start, stop in ranges:
            self.check_range(f, start, stop)
            by_file.setdefault(f, []).append((start, stop))
        for f, pairs in by_file.items():  # one call per file: its ranges merge in one pass
            self.sched.retry(f, pairs)
        self._wake()
        return sum(stop - start for _, start, stop in ranges)

    @property
    def pending(self) -> bool:
        """A path that leased now would get work."""
        return not self.closed and self.sched.leasable

    @property
    def done(self) -> bool:
        """Every wanted block is acknowledged."""
        return self.sched.done

    # -- paths ------------------------------------------------------------------------
    def lease(self, path: str) -> Lease | None:
        """The next piece for ``path`` (HTTP: the rest of a block, normally all of it)."""
        if self.closed:
            return None
        got = self.sched.lease(path, self._clock(), max_pieces=1)
        if got:
            self._ensure_timer()
            return got[0]
        return None

    async def read(self, lease: Lease) -> tuple[Payload, bytes | None]:
        """(the lease's bytes, the block's digest when the lease starts at offset 0), read
        off the event loop; a ``Hole`` of the lease's length for a block wholly in a hole
        of its file (not read). A source that fails fails the whole sender (``error``)."""
        if self.error is not None:
            raise self.error
        src = self.sources[lease.file]
        loop = asyncio.get_running_loop()
        try:
            data, digest = await loop.run_in_executor(self.executor, src.read_wire, lease.block)
        except TransportError as exc:
            self.fail(exc)
            raise
        if self.on_read is not None:
            self.on_read(lease.file, lease.block, digest)
        if lease.offset == 0 and lease.length == len(data):
            return data, digest
        if isinstance(data, Hole):
            return Hole(lease.length), digest if lease.offset == 0 else None
        view = memoryview(data)[lease.offset:lease.stop]
        return view, digest if lease.offset == 0 else None

    def delivered(self, lease: Lease, *, hole: bool = False) -> None:
        """The lease's bytes are on the wire (``hole``: announced as a hole instead)."""
        self.sched.delivered(lease, self._clock())
        self._wake()  # a stream waiting for others' undelivered leases re-checks
        if hole:
            self.hole_bytes += lease.length
            if self.on_hole is not None:
                self.on_hole(lease.file, lease.length)
            return
        key = (lease.file, lease.block)
        seen = self._delivered.get(key)
        if seen is None:
            if len(self._delivered) >= self._prune_at:
                self._prune()
            seen = self._delivered[key] = RangeSet()
        new = sum(b - a for a, b in seen.complement(lease.offset, lease.stop))
        seen.add(lease.offset, lease.stop)
        self.sent_bytes += new
        self.resent_bytes += lease.length - new
        if new and self.on_progress is not None:
            # Before: counted at every delivery, so a small upload moved from HTTPS to UDP
            # mid-bundle said "4 B (8 B sent)" (trial).
            self.on_progress(lease.file, new)

    def _prune(self) -> None:
        """Forget the blocks acknowledged since (never delivered again): the map holds
        about the blocks in flight, whatever the file count."""
        acked = State.ACKED
        self._delivered = {k: v for k, v in self._delivered.items()
                           if self.sched.block_state(k[0], k[1]) is not acked}
        self._prune_at = max(PRUNE_MIN, 2 * len(self._delivered))

    def drop_path(self, path: str) -> int:
        """``path`` died: everything it held (leased or delivered, not acknowledged) is
        leased again by the others. Returns how many leases came back."""
        self._held.pop(path, None)  # the scheduler gives it back with the others
        n = len(self.sched.drop_path(path))
        if n:
            self._wake()
        return n

    # -- the receiver's reports -------------------------------------------------------
    def ack(self, file: int, block: int) -> bool:
        """The receiver journaled the block: never send it again (unless ``retry``)."""
        return self.sched.ack(file, block)

    def ack_lease(self, lease: Lease) -> None:
        """The receiver has the lease's bytes (a stream that ended with success)."""
        if lease.offset == 0 and lease.length == self.sources[lease.file].layout.stored_range(
                lease.block)[1]:
            self.sched.ack(lease.file, lease.block)
        else:
            self.sched.received(lease.file, lease.block, [(lease.offset, lease.stop)],
                                self._clock())

    def nack(self, file: int, block: int) -> None:
        """The receiver discarded the block (failed digest, refused, evicted): resend it."""
        if self.sched.nack(file, block, None):
            self._wake()

    def acks(self, journaled: Iterable[tuple[int, int, int]],
             failed: Iterable[tuple[int, int, int]]) -> int:
        """A receiver's report: ``(file, start, stop)`` ranges journaled and failed (each
        checked against its file). Returns how many blocks it retired."""
        journaled, failed = list(journaled), list(failed)
        for f, a, b in journaled + failed:
            self.check_range(f, a, b)
        n = sum(self.sched.ack(f, k) for f, a, b in journaled for k in range(a, b))
        for f, a, b in failed:
            for k in range(a, b):
                self.nack(f, k)
        return n

    # -- time and waiting -------------------------------------------------------------
    def _ensure_timer(self) -> None:
        if self._timer is None or self._timer.done():
            self._timer = asyncio.get_running_loop().create_task(self._expire_on_time())

    async def _expire_on_time(self) -> None:
        """Re-queue leases past their deadline when ``get_timer`` says (a lost block comes
        back within one deadline, whatever the paths are doing)."""
        while not self.closed:
            when = self.sched.get_timer()
            if when is None:
                return  # started again by the next lease
            # at most 1 s: a nearer deadline may appear meanwhile (a block's ack timer)
            await asyncio.sleep(min(1.0, max(0.0, when - self._clock()) + 0.001))
            if self.sched.expire(self._clock()):
                self._wake()

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def wait_for_work(self, timeout: float) -> bool:
        """Wait until work may have come back (a nack, a dead path, an expiry, a want) or
        ``timeout`` seconds; True when something changed."""
        if self._changed is None:
            self._changed = asyncio.Event()
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # -- end --------------------------------------------------------------------------
    def fail(self, error: TransportError) -> None:
        """Stop sending for good because of ``error`` (the first one is kept)."""
        if self.error is None:
            self.error = error
        self.closed = True
        self._wake()

    def close(self) -> None:
        """End the sender and give back every source's descriptor."""
        self.closed = True
        self._wake()
        if self._timer is not None:
            self._timer.cancel()
        for s in self.sources.values():
            s.close()
