"""The sender's work: which bytes of which block each path sends next (sans-IO).

``Scheduler`` replaces the take/put-back queue with **leases**, in the manner
of aioquic's sent-packet map (``recovery.py``): a path asks for pieces of its
own size (``lease``), says when it put them on the wire (``delivered``), and
the receiver's reports retire them: ``received`` for piece-level acks (a
datagram path's SACK), ``ack`` when a block is verified and journaled. Every
live lease has a deadline; ``expire(now)`` re-queues the leases whose deadline
passed (a path that did not deliver in time, or bytes delivered and never
acknowledged), ``get_timer()`` says when to call it next. ``drop_path``
re-queues everything a dead path held at once (failover). Re-queued bytes go
to the front of the queue, so a lost piece is leased again by the next
``lease`` call of any live path: at most one deadline after it was lost.

Each byte of a wanted block is in one state (``State``): ``QUEUED`` (in the
block's to-do set), ``LEASED`` or ``DELIVERED`` (in one live lease),
``RECEIVED`` (the receiver said so; such bytes may also sit in a lease they
cover only in part, which then resends just the rest); the block is ``ACKED`` once
journaled, and then nothing of it is ever leased again. The allowed moves are
the table ``TRANSITIONS``, used by the code itself. Pieces of a block started
by one path can be finished by another: the to-do set is per block, not per path.
The lease, its states and events and the per-lease and per-block records live in
``transport.blocks.leases`` (re-exported here); this module is the policy over them.

Bounded work per call: ``lease`` costs O(pieces returned); ``want`` O(ranges
given); ``ack``, ``nack`` and ``received`` O(live leases of that block);
``drop_path`` O(leases of that path); ``expire`` O(``limit``). Memory: one
record per live lease (~200 B) and per started, unacknowledged block; blocks
wanted but not started cost one range per run of block numbers.

Time is ``now`` in seconds (any monotonic origin); sizes are stored bytes.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable, Mapping

from transport.blocks.filesets import FileSets
from transport.blocks.layout import BlockLayout
from transport.blocks.leases import (
    DEFAULT_TIMING,
    TRANSITIONS,
    Event,
    Lease,
    PathTiming,
    SchedulerStats,
    State,
    _Block,
    _Rec,
)
from transport.blocks.ranges import RangeSet
from transport.errors import ProtocolError

__all__ = [
    "DEFAULT_BLOCK_ACK_TIMEOUT", "DEFAULT_MAX_OPEN_BLOCKS", "DEFAULT_TIMING", "Event", "Lease",
    "PathTiming", "Scheduler", "SchedulerStats", "State", "TRANSITIONS",
]

DEFAULT_MAX_OPEN_BLOCKS = 16
"""Open blocks (bytes queued, leased, or delivered on a datagram path and not
acked) at once: 64 MiB of 4 MiB blocks, matching
``assembly.DEFAULT_MAX_OPEN_BYTES`` so a receiver is not asked to hold more."""

DEFAULT_BLOCK_ACK_TIMEOUT = 30.0
"""Seconds a block may sit fully received (piece-acked) without its journal ack
before it is sent again whole: a safety net for a lost ack or failure report."""


class Scheduler:
    """Leases the pieces of one session's wanted blocks to any number of paths.

    ``files`` maps file index -> ``BlockLayout``. A new block is started only
    while fewer than ``max_open_blocks`` blocks are open (bytes queued,
    leased, or delivered on an unreliable path and not piece-acked), so the
    receiver's assembly bound is respected in steady state (blocks re-opened
    by expiries may exceed it briefly; a receiver at its bound refuses and the
    sender ``nack``-s). Re-queued bytes of started blocks are always leased first.

    Raises ``ProtocolError`` for a want, ack, nack or received report naming
    an unknown file, a block out of range or bytes outside the block (these
    come from the peer); ``ValueError`` for bad arguments from the caller.
    """

    def __init__(
        self,
        files: Mapping[int, BlockLayout],
        *,
        max_open_blocks: int = DEFAULT_MAX_OPEN_BLOCKS,
        default_timing: PathTiming = DEFAULT_TIMING,
        block_ack_timeout: float = DEFAULT_BLOCK_ACK_TIMEOUT,
    ) -> None:
        if max_open_blocks < 1 or block_ack_timeout <= 0:
            raise ValueError("max_open_blocks and block_ack_timeout must be positive")
        self._files = dict(files)
        self._max_open = max_open_blocks
        self._default_timing = default_timing
        self._block_ack_timeout = block_ack_timeout
        self._timing: dict[str, PathTiming] = {}
        # Per file: blocks wanted, acked, and wanted but not started (compact: see FileSets).
        self._wanted = FileSets()
        self._acked = FileSets()
        self._fresh = FileSets()
        self._fresh_files: list[int] = []  # heap of files that may have fresh blocks
        self._blocks: dict[tuple[int, int], _Block] = {}
        self._ready: deque[_Block] = deque()  # started blocks with bytes queued
        self._open: set[tuple[int, int]] = set()
        self._leases: dict[int, _Rec] = {}
        self._by_path: dict[str, dict[int, _Rec]] = {}
        self._heap: list[tuple[float, int]] = []  # (deadline, lease id), lazily cleaned
        self._block_heap: list[tuple[float, int, int]] = []  # (deadline, file, block)
        self._next_id = 0
        self._clock = 0.0  # the latest ``now`` the caller gave (for calls without one)
        self._outstanding = 0
        self._leased_bytes = self._requeued = self._expired = self._lost = 0
        self._n_acked = self._block_timeouts = self._stale = 0

    # -- paths ------------------------------------------------------------------------
    def set_path(self, path: str, timing: PathTiming) -> None:
        """Set (or update, e.g. from a new RTT estimate) a path's deadlines.

        Applies to leases made or delivered from now on."""
        self._timing[path] = timing
        self._by_path.setdefault(path, {})

    def drop_path(self, path: str) -> list[Lease]:
        """The path is gone: re-queue every lease it holds; returns them."""
        self._timing.pop(path, None)
        recs = sorted(self._by_path.pop(path, {}).values(), key=lambda r: r.lease.id)
        for rec in reversed(recs):  # each goes to the front: the oldest ends up first
            self._requeue(rec, Event.DROP_PATH)
        return [rec.lease for rec in recs]

    # -- work in ----------------------------------------------------------------------
    def want(self, file: int, ranges: Iterable[tuple[int, int]]) -> int:
        """Add blocks ``[start, stop)`` of ``file`` to send; returns how many were new.

        Blocks already wanted or acked are not added again."""
        new = self._checked(file, ranges)
        new.difference_update(self._wanted.view(file))
        self._wanted.update(file, new)
        new.difference_update(self._acked.view(file))
        if new:
            self._fresh.update(file, new)
            heapq.heappush(self._fresh_files, file)
            self._outstanding += new.count
        return new.count

    def _checked(self, file: int, ranges: Iterable[tuple[int, int]]) -> RangeSet:
        """``ranges`` of ``file`` as a set, each checked against its block count (one sort,
        not an insertion per range: a peer may name 65,536 ranges in the worst order)."""
        count = self._layout(file).count
        pairs = list(ranges)
        for a, b in pairs:
            if not 0 <= a < b <= count:
                raise ProtocolError(f"blocks [{a}, {b}) outside file {file} ({count} blocks)")
        out = RangeSet()
        out.merge(pairs)
        return out

    def retry(self, file: int, ranges: Iterable[tuple[int, int]]) -> int:
        """The receiver lacks blocks ``[start, stop)`` although they were acked or delivered
        (a receiver that acknowledged by delivery and lost them, or dropped them after a
        failed re-verification): want them again. Acked blocks come back as new work, blocks
        delivered and awaiting their ack are sent again now, the others are wanted as usual.
        Returns how many blocks come back or are new. Costs O(ranges + min(blocks named,
        started blocks)): a want naming one block of each of 10,000 files does not walk
        every started block 10,000 times."""
        again = self._checked(file, ranges)
        not_acked = again.copy()
        not_acked.difference_update(self._acked.view(file))
        back = again.copy()
        back.difference_update(not_acked)  # the acked part of ``again``
        n = 0
        if back:
            self._acked.difference_update(file, back)
            wanted = back.copy()
            wanted.difference_update(self._wanted.view(file))
            self._wanted.update(file, back)
            self._fresh.update(file, back)
            heapq.heappush(self._fresh_files, file)
            self._outstanding += back.count
            self._n_acked -= back.count - wanted.count
            n += back.count
        if again.count <= len(self._blocks):  # a few blocks (one per small file): look them up
            started = [(file, b) for b in again.members() if (file, b) in self._blocks]
        else:
            started = [k for k in self._blocks if k[0] == file and k[1] in again]
        for key in started:
            blk = self._blocks.get(key)
            if blk is not None and not blk.todo and blk.undelivered == 0:
                self.nack(key[0], key[1], None)  # delivered, never acked: lost on the way
        return n + self.want(file, not_acked)

    @property
    def leasable(self) -> bool:
        """Whether ``lease`` would give bytes now (re-queued or started bytes, or a new
        block within the window). Amortised O(1): drops stale index entries on the way."""
        ready = self._ready
        while ready:
            blk = ready[0]
            if blk.todo and (blk.file, blk.index) in self._blocks:
                return True
            ready.popleft()
            blk.ready = False
        if len(self._open) >= self._max_open:
            return False
        heap = self._fresh_files
        while heap:
            if self._fresh.nonempty(heap[0]):
                return True
            heapq.heappop(heap)
        return False

    # -- work out ---------------------------------------------------------------------
    def lease(self, path: str, now: float, *, max_bytes: int | None = None,
              max_pieces: int | None = None, piece_size: int | None = None) -> list[Lease]:
        """Give ``path`` up to ``max_bytes`` in up to ``max_pieces`` pieces of at most
        ``piece_size`` bytes each (None: up to the rest of a contiguous run, e.g. a
        whole block). With neither bound, one piece. Re-queued bytes come first,
        then bytes of started blocks, then new blocks in file order."""
        if max_bytes is None and max_pieces is None:
            max_pieces = 1
        budget = max_bytes if max_bytes is not None else 1 << 62
        pieces = max_pieces if max_pieces is not None else 1 << 62
        if budget <= 0 or pieces <= 0 or (piece_size is not None and piece_size <= 0):
            raise ValueError("lease bounds must be positive")
        timing = self._timing.get(path)
        if timing is None:
            self.set_path(path, self._default_timing)
            timing = self._default_timing
        self._tick(now)
        deadline = now + timing.lease_timeout
        mine = self._by_path[path]
        out: list[Lease] = []
        while budget > 0 and pieces > 0:
            blk = self._next_ready()
            if blk is None:
                break
            while blk.todo and budget > 0 and pieces > 0:
                limit = budget if piece_size is None else min(piece_size, budget)
                got = blk.todo.pop_first(limit)
                assert got is not None
                start, stop = got
                lease = Lease(self._next_id, path, blk.file, blk.index, start, stop - start)
                self._next_id += 1
                rec = _Rec(lease, deadline)
                self._leases[lease.id] = rec
                blk.leases[lease.id] = rec
                mine[lease.id] = rec
                blk.undelivered += 1
                blk.holding += 1
                heapq.heappush(self._heap, (deadline, lease.id))
                out.append(lease)
                budget -= stop - start
                pieces -= 1
                self._leased_bytes += stop - start
            self._refresh(blk)
        return out

    def delivered(self, lease: Lease, now: float) -> bool:
        """The path put the lease's bytes on the wire; False if it was retired meanwhile."""
        self._tick(now)
        rec = self._leases.get(lease.id)
        if rec is None or (rec.state, Event.DELIVER) not in TRANSITIONS:
            self._stale += 1
            return False
        rec.state = TRANSITIONS[rec.state, Event.DELIVER]
        timing = self._timing.get(lease.path, self._default_timing)
        rec.deadline = now + timing.ack_timeout
        heapq.heappush(self._heap, (rec.deadline, lease.id))
        blk = self._blocks[lease.file, lease.block]
        blk.undelivered -= 1
        if timing.reliable and lease.length == blk.length:
            rec.holds = False
            blk.holding -= 1
        self._refresh(blk)
        return True

    def lost(self, lease: Lease) -> bool:
        """The path knows these bytes were lost: re-queue them now; False if stale."""
        rec = self._leases.get(lease.id)
        if rec is None:
            self._stale += 1
            return False
        self._lost += 1
        self._requeue(rec, Event.LOSE)
        return True

    # -- the receiver's reports -------------------------------------------------------
    def received(self, file: int, block: int, ranges: Iterable[tuple[int, int]],
                 now: float) -> int:
        """Piece-level ack: the receiver holds these bytes of the block. Retires the
        leases they cover; returns how many. Bytes received are not sent again
        unless the block fails (``nack``)."""
        self._tick(now)
        length = self._length(file, block)
        blk = self._blocks.get((file, block))
        if blk is None:
            self._stale += 1
            return 0
        got = RangeSet()
        for a, b in ranges:
            if not 0 <= a < b <= length:
                raise ProtocolError(f"bytes [{a}, {b}) outside block {block} of file {file}")
            got.add(a, b)
        blk.received.update(got)
        blk.todo.difference_update(got)  # queued bytes the receiver already has
        retired = 0
        for rec in list(blk.leases.values()):
            lease = rec.lease
            if blk.received.covers(lease.offset, lease.stop):
                self._retire(rec, blk)
                rec.state = TRANSITIONS[rec.state, Event.RECEIVE]
                retired += 1
        self._refresh(blk)
        return retired

    def ack(self, file: int, block: int) -> bool:
        """The receiver verified and journaled the block: retire it for good.

        Returns True if it was outstanding. A block acked before it was wanted
        is remembered, so it is never leased later."""
        self._length(file, block)
        if self._acked.contains(file, block):
            self._stale += 1
            return False
        self._acked.add(file, block)
        blk = self._blocks.pop((file, block), None)
        if blk is not None:
            for rec in list(blk.leases.values()):
                self._retire(rec, blk)
                rec.state = TRANSITIONS[rec.state, Event.ACK]
            blk.todo = RangeSet()
            self._open.discard((file, block))
        self._fresh.discard(file, block)
        if self._wanted.contains(file, block):
            self._outstanding -= 1
            self._n_acked += 1
            return True
        return False

    def nack(self, file: int, block: int,
             ranges: Iterable[tuple[int, int]] | None = None) -> bool:
        """The receiver lacks these bytes (None: the whole block failed its digest and
        was discarded): send them again. Returns False for a block acked or not started."""
        length = self._length(file, block)
        blk = self._blocks.get((file, block))
        if blk is None:
            self._stale += 1
            return False
        missing = RangeSet([(0, length)]) if ranges is None else RangeSet()
        for a, b in ranges or ():
            if not 0 <= a < b <= length:
                raise ProtocolError(f"bytes [{a}, {b}) outside block {block} of file {file}")
            missing.add(a, b)
        blk.received.difference_update(missing)
        for rec in list(blk.leases.values()):
            if ranges is None or missing.overlaps(rec.lease.offset, rec.lease.stop):
                self._requeue(rec, Event.NACK, refresh=False)
        # Bytes that were received (no live lease holds them) go back to the queue too.
        missing.difference_update((r.lease.offset, r.lease.stop) for r in blk.leases.values())
        missing.difference_update(blk.todo)
        if missing:
            self._requeued += missing.count
            blk.todo.update(missing)
        self._refresh(blk)
        return True

    # -- time -------------------------------------------------------------------------
    def expire(self, now: float, limit: int = 4096) -> list[Lease]:
        """Re-queue up to ``limit`` leases whose deadline is ``<= now``; returns them.

        Also sends again, whole, blocks fully received but unacknowledged for
        ``block_ack_timeout`` seconds (counted in ``stats.block_timeouts``)."""
        self._tick(now)
        out: list[Lease] = []
        while len(out) < limit and (rec := self._lease_due()) is not None and rec.deadline <= now:
            heapq.heappop(self._heap)
            self._expired += 1
            self._requeue(rec, Event.EXPIRE)
            out.append(rec.lease)
        while (blk := self._block_due()) is not None and blk.timer is not None and blk.timer <= now:
            heapq.heappop(self._block_heap)
            blk.timer = None
            self._block_timeouts += 1
            self.nack(blk.file, blk.index, None)
        return out

    def get_timer(self) -> float | None:
        """When ``expire`` has work next (seconds, same clock as ``now``), or None."""
        rec, blk = self._lease_due(), self._block_due()
        times = ([rec.deadline] if rec else []) + ([blk.timer] if blk and blk.timer else [])
        return min(times) if times else None

    def _lease_due(self) -> _Rec | None:
        """The live lease with the earliest deadline, dropping stale heap entries
        (leases retired, or re-armed by ``delivered``) on the way."""
        heap = self._heap
        while heap:
            rec = self._leases.get(heap[0][1])
            if rec is not None and rec.deadline == heap[0][0]:
                return rec
            heapq.heappop(heap)
        return None

    def _block_due(self) -> _Block | None:
        heap = self._block_heap
        while heap:
            deadline, f, b = heap[0]
            blk = self._blocks.get((f, b))
            if blk is not None and blk.timer == deadline:
                return blk
            heapq.heappop(heap)
        return None

    # -- queries ----------------------------------------------------------------------
    @property
    def done(self) -> bool:
        """Every wanted block is acked."""
        return self._outstanding == 0

    @property
    def outstanding(self) -> int:
        return self._outstanding

    def block_state(self, file: int, block: int) -> State | None:
        """``QUEUED`` (nothing of it out), ``LEASED`` (bytes queued or leased),
        ``DELIVERED`` (every byte delivered or received, awaiting the ack), ``ACKED``;
        None when not wanted."""
        self._length(file, block)
        if self._acked.contains(file, block):
            return State.ACKED
        blk = self._blocks.get((file, block))
        if blk is None:
            return State.QUEUED if self._fresh.contains(file, block) else None
        if blk.todo.covers(0, blk.length):
            return State.QUEUED
        return State.LEASED if blk.todo or blk.undelivered else State.DELIVERED

    def queued(self, file: int, block: int) -> RangeSet:
        """Bytes of the block waiting to be leased (a copy; empty once acked)."""
        length = self._length(file, block)
        blk = self._blocks.get((file, block))
        if blk is not None:
            return blk.todo.copy()
        return RangeSet([(0, length)]) if self._fresh.contains(file, block) else RangeSet()

    def undelivered_elsewhere(self, path: str) -> bool:
        """Whether a path other than ``path`` holds a lease it has not delivered yet
        (it would come back to the queue if that path died). O(live leases)."""
        return any(rec.state is State.LEASED and rec.lease.path != path
                   for rec in self._leases.values())

    def leases_of(self, path: str) -> list[Lease]:
        return [rec.lease for rec in self._by_path.get(path, {}).values()]

    @property
    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            outstanding=self._outstanding, open_blocks=len(self._open),
            live_leases=len(self._leases), leased_bytes=self._leased_bytes,
            requeued_bytes=self._requeued, expired=self._expired, lost=self._lost,
            acked=self._n_acked, block_timeouts=self._block_timeouts, stale=self._stale,
        )

    def check_invariants(self) -> None:
        """Assert the partition of every started block (for tests; O(everything))."""
        for (f, b), blk in self._blocks.items():
            # todo, the live leases and the received bytes cover the block; todo and
            # the leases are disjoint from everything else (received bytes may sit
            # inside a lease that they cover only in part).
            leased = RangeSet((r.lease.offset, r.lease.stop) for r in blk.leases.values())
            rest = blk.received.complement(0, blk.length)
            rest.update(leased)  # everything but the received bytes outside leases
            n_leased = sum(r.lease.length for r in blk.leases.values())
            total = blk.todo.count + n_leased + (blk.length - rest.count)
            union = RangeSet(leased)
            union.update(blk.todo)
            union.update(blk.received)
            if total != blk.length or not union.covers(0, blk.length):
                raise AssertionError(f"block {b} of file {f}: bytes lost or doubled "
                                     f"(todo {blk.todo}, received {blk.received}, "
                                     f"leases {[r.lease for r in blk.leases.values()]})")
            if self._acked.contains(f, b):
                raise AssertionError(f"block {b} of file {f} acked but still started")
            if blk.undelivered != sum(r.state is State.LEASED for r in blk.leases.values()):
                raise AssertionError(f"block {b} of file {f}: undelivered count")
            if blk.holding != sum(r.holds for r in blk.leases.values()):
                raise AssertionError(f"block {b} of file {f}: holding count")
            if blk.open != ((f, b) in self._open):
                raise AssertionError(f"block {b} of file {f}: open index")

    # -- internals --------------------------------------------------------------------
    def _layout(self, file: int) -> BlockLayout:
        try:
            return self._files[file]
        except KeyError:
            raise ProtocolError(f"unknown file index {file}") from None

    def _length(self, file: int, block: int) -> int:
        lay = self._layout(file)
        if not 0 <= block < lay.count:
            raise ProtocolError(f"block {block} out of range for file {file} ({lay.count} blocks)")
        return lay.stored_range(block)[1]

    def _next_ready(self) -> _Block | None:
        """The next started block with queued bytes, starting a new block if allowed."""
        ready = self._ready
        while ready:
            blk = ready[0]
            if blk.todo and (blk.file, blk.index) in self._blocks:
                return blk
            ready.popleft()
            blk.ready = False
        if len(self._open) >= self._max_open:
            return None
        heap = self._fresh_files
        while heap:
            f = heap[0]
            got = self._fresh.pop_first(f)
            if got is None:
                heapq.heappop(heap)
                continue
            b = got[0]
            blk = _Block(f, b, self._files[f].stored_range(b)[1])
            self._blocks[f, b] = blk
            blk.ready = True
            ready.append(blk)
            self._open.add((f, b))
            return blk
        return None

    def _retire(self, rec: _Rec, blk: _Block) -> None:
        lease = rec.lease
        del self._leases[lease.id]
        del blk.leases[lease.id]
        self._by_path.get(lease.path, {}).pop(lease.id, None)
        if rec.state is State.LEASED:
            blk.undelivered -= 1
        if rec.holds:
            blk.holding -= 1
        if len(self._heap) > 2 * len(self._leases) + 1024:
            # Retired leases leave their entries behind; rebuild so the heap stays
            # proportional to the live leases (amortised O(1) per retirement).
            self._heap = [(r.deadline, lid) for lid, r in self._leases.items()]
            heapq.heapify(self._heap)

    def _requeue(self, rec: _Rec, event: Event, *, refresh: bool = True) -> None:
        lease = rec.lease
        blk = self._blocks[lease.file, lease.block]
        self._retire(rec, blk)  # counts its LEASED state out before the move
        rec.state = TRANSITIONS[rec.state, event]
        if blk.received.overlaps(lease.offset, lease.stop):
            back = blk.received.complement(lease.offset, lease.stop)
        else:
            back = RangeSet([(lease.offset, lease.stop)])
        self._requeued += back.count
        blk.todo.update(back)
        if refresh:
            self._refresh(blk)

    def _tick(self, now: float) -> None:
        if now > self._clock:
            self._clock = now

    def _refresh(self, blk: _Block) -> None:
        """Recompute a block's place in the derived indexes after any change."""
        key = (blk.file, blk.index)
        if blk.todo and not blk.ready:
            blk.ready = True
            self._ready.appendleft(blk)  # re-queued work goes first
        if blk.open:
            self._open.add(key)
        else:
            self._open.discard(key)
        if not blk.todo and not blk.leases:
            # Every byte received, no ack yet: arm the safety net once.
            if blk.timer is None:
                blk.timer = self._clock + self._block_ack_timeout
                heapq.heappush(self._block_heap, (blk.timer, blk.file, blk.index))
        else:
            blk.timer = None
