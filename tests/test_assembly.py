"""BlockAssembler: pieces in any order, duplicated, overlapping, corrupted, bounded.

Pure and fast: no sockets, no files; a hand-stepped clock. Each test checks the
bytes the sink ends up with against the source, not only the events.
"""

from __future__ import annotations

import os
import random

import pytest

from transport.blocks.assembly import (
    BlockAssembler,
    BlockEvicted,
    BlockFailed,
    BlockVerified,
    BufferSink,
    LateDuplicate,
    PartState,
    PieceRefused,
    Refusal,
)
from transport.blocks.digest import block_digest
from transport.blocks.layout import BlockLayout
from transport.errors import ProtocolError

BS = 4096  # the smallest block size a layout allows: many blocks, fast tests


class ImageSink:
    """A partial file in memory: writes land at the block's stored offset, as a
    ``pwrite`` sink would do. Records every byte written to prove none is written twice."""

    def __init__(self, layouts: dict[int, BlockLayout]) -> None:
        self.layouts = layouts
        self.images = {f: bytearray(lay.stored_size) for f, lay in layouts.items()}
        self.writes: dict[tuple[int, int], bytearray] = {}
        self.discarded: list[tuple[int, int]] = []

    def write(self, file: int, block: int, offset: int, data: memoryview) -> None:
        base, length = self.layouts[file].stored_range(block)
        assert 0 <= offset and offset + len(data) <= length
        marks = self.writes.setdefault((file, block), bytearray(length))
        assert not any(marks[offset:offset + len(data)]), "a byte was written twice"
        marks[offset:offset + len(data)] = b"\x01" * len(data)
        self.images[file][base + offset:base + offset + len(data)] = data

    def read(self, file: int, block: int, offset: int, length: int) -> bytes:
        base, _ = self.layouts[file].stored_range(block)
        return bytes(self.images[file][base + offset:base + offset + length])

    def discard(self, file: int, block: int) -> None:
        self.writes.pop((file, block), None)  # a resend may write these bytes again
        self.discarded.append((file, block))

    def block(self, file: int, block: int) -> bytes:
        return self.read(file, block, 0, self.layouts[file].stored_range(block)[1])


def _source(layouts: dict[int, BlockLayout], seed: int) -> dict[int, bytes]:
    rng = random.Random(seed)
    return {f: rng.randbytes(lay.stored_size) for f, lay in layouts.items()}


def _block_bytes(layouts: dict[int, BlockLayout], src: dict[int, bytes], f: int, b: int) -> bytes:
    off, n = layouts[f].stored_range(b)
    return src[f][off:off + n]


def _cuts(rng: random.Random, length: int, lo: int, hi: int) -> list[tuple[int, int]]:
    out, o = [], 0
    while o < length:
        n = min(length - o, rng.randint(lo, hi))
        out.append((o, n))
        o += n
    return out


LAYOUTS = {
    0: BlockLayout(5 * BS + 123, BS),  # a short last block
    1: BlockLayout(3 * BS, BS, header_len=40, overhead=28),  # an envelope: stored blocks grow
    2: BlockLayout(100, BS),  # one short block
}


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("sink_kind", ["buffer", "image"])
def test_random_order_duplicates_overlaps(seed: int, sink_kind: str) -> None:
    rng = random.Random(seed)
    src = _source(LAYOUTS, seed)
    sink: BufferSink | ImageSink = BufferSink(LAYOUTS) if sink_kind == "buffer" else ImageSink(LAYOUTS)
    asm = BlockAssembler(LAYOUTS, sink, inline_hash_min=512)
    pieces: list[tuple[int, int, int, int]] = []
    total = 0
    for f, lay in LAYOUTS.items():
        for b in range(lay.count):
            length = lay.stored_range(b)[1]
            total += length
            for o, n in _cuts(rng, length, 1, 1500):
                pieces.append((f, b, o, n))
            for _ in range(rng.randint(0, 4)):  # overlapping pieces straddling others
                o = rng.randrange(length)
                pieces.append((f, b, o, rng.randint(1, length - o)))
    pieces += rng.sample(pieces, len(pieces) // 3)  # duplicates
    rng.shuffle(pieces)
    digests = [(f, b) for f, lay in LAYOUTS.items() for b in range(lay.count)]
    rng.shuffle(digests)
    verified: dict[tuple[int, int], bytes] = {}
    now = 0.0

    late_bytes = 0

    def collect(events: tuple[object, ...], n: int = 0) -> None:
        nonlocal late_bytes
        for ev in events:
            if isinstance(ev, LateDuplicate):
                assert (ev.file, ev.block) in verified and not ev.committed
                late_bytes += n
                continue
            assert isinstance(ev, BlockVerified), ev
            assert (ev.file, ev.block) not in verified, "verified twice"
            verified[ev.file, ev.block] = ev.digest
            if isinstance(sink, BufferSink):
                assert bytes(sink.block(ev.file, ev.block)) == _block_bytes(LAYOUTS, src, ev.file, ev.block)
                sink.discard(ev.file, ev.block)

    for f, b, o, n in pieces:
        if digests and rng.random() < 0.05:  # digests arrive now and then, before or after
            df, db = digests.pop()
            collect(asm.expect(df, db, block_digest(_block_bytes(LAYOUTS, src, df, db))))
        data = _block_bytes(LAYOUTS, src, f, b)[o:o + n]
        collect(asm.receive(f, b, o, data, now), n)
        now += 0.001
        assert asm.stats.open_bytes <= asm.max_open_bytes
    for df, db in digests:
        collect(asm.expect(df, db, block_digest(_block_bytes(LAYOUTS, src, df, db))))
    assert set(verified) == {(f, b) for f, lay in LAYOUTS.items() for b in range(lay.count)}
    for (f, b), d in verified.items():
        assert d == block_digest(_block_bytes(LAYOUTS, src, f, b))
        assert asm.state(f, b) is PartState.VERIFIED
    if isinstance(sink, ImageSink):
        for f, lay in LAYOUTS.items():
            for b in range(lay.count):
                assert sink.block(f, b) == _block_bytes(LAYOUTS, src, f, b)
    st = asm.stats
    assert st.open_blocks == 0 and st.open_bytes == 0 and st.fragments == 0
    assert st.digests_pending == 0 and st.failed == 0 and st.refused == 0
    assert st.bytes_new == total
    assert st.pieces == len(pieces)
    # Every byte offered is accounted for once: new, duplicate, or late.
    assert st.bytes_new + st.bytes_duplicate + late_bytes == sum(p[3] for p in pieces)
    assert st.bytes_duplicate > 0 and late_bytes > 0
    assert st.hashed_inline + st.hashed_readback == total


def test_whole_block_piece_is_hashed_once_inline_and_never_read_back() -> None:
    lay = {0: BlockLayout(4 * BS, BS)}
    src = _source(lay, 1)
    sink = ImageSink(lay)
    asm = BlockAssembler(lay, sink, inline_hash_min=1024)
    for b in range(4):
        asm.expect(0, b, block_digest(_block_bytes(lay, src, 0, b)))
        (ev,) = asm.receive(0, b, 0, _block_bytes(lay, src, 0, b), 0.0)
        assert isinstance(ev, BlockVerified)
    assert asm.stats.hashed_inline == 4 * BS and asm.stats.hashed_readback == 0


def test_small_pieces_are_read_back_once_at_completion() -> None:
    lay = {0: BlockLayout(BS, BS)}
    src = _source(lay, 2)
    sink = ImageSink(lay)
    asm = BlockAssembler(lay, sink, inline_hash_min=2048)
    asm.expect(0, 0, block_digest(src[0]))
    events: tuple[object, ...] = ()
    for o in range(0, BS, 512):  # in order, but below the inline threshold
        events = asm.receive(0, 0, o, src[0][o:o + 512], 0.0)
    assert isinstance(events[0], BlockVerified)
    assert asm.stats.hashed_inline == 0 and asm.stats.hashed_readback == BS


def test_prefix_hashed_inline_rest_read_back() -> None:
    lay = {0: BlockLayout(BS, BS)}
    src = _source(lay, 3)
    asm = BlockAssembler(lay, ImageSink(lay), inline_hash_min=1024)
    asm.expect(0, 0, block_digest(src[0]))
    assert asm.receive(0, 0, 0, src[0][:1024], 0.0) == ()  # prefix: inline
    assert asm.receive(0, 0, 3072, src[0][3072:], 0.0) == ()  # past a gap: read back later
    assert asm.receive(0, 0, 1024, src[0][1024:2048], 0.0) == ()  # extends prefix: inline
    (ev,) = asm.receive(0, 0, 2048, src[0][2048:3072], 0.0)  # completes the prefix to the gap end
    assert isinstance(ev, BlockVerified)
    assert asm.stats.hashed_inline == 3072 and asm.stats.hashed_readback == 1024


@pytest.mark.parametrize("where", ["inline", "readback"])
def test_corrupted_piece_fails_block_whole_then_resend_succeeds(where: str) -> None:
    lay = {0: BlockLayout(2 * BS, BS)}
    src = _source(lay, 4)
    sink = BufferSink(lay)
    asm = BlockAssembler(lay, sink, inline_hash_min=1024 if where == "inline" else 1 << 20)
    good = src[0][:BS]
    asm.expect(0, 0, block_digest(good))
    bad = bytearray(good)
    bad[1500] ^= 0x40
    events: tuple[object, ...] = ()
    for o in range(0, BS, 1024):
        events = asm.receive(0, 0, o, bytes(bad[o:o + 1024]), 1.0)
    (ev,) = events
    assert ev == BlockFailed(0, 0, 1, "digest mismatch")
    # Discarded whole: nothing held, the buffer freed, the block can come again.
    assert asm.state(0, 0) is PartState.ABSENT
    assert not asm.received(0, 0)
    assert sink.held_bytes == 0
    assert asm.stats.open_bytes == 0 and asm.stats.fragments == 0
    # A second bad copy counts a second attempt.
    (ev,) = asm.receive(0, 0, 0, bytes(bad), 2.0)
    assert ev == BlockFailed(0, 0, 2, "digest mismatch")
    # The good bytes, in another order, now verify.
    assert asm.receive(0, 0, 2048, good[2048:], 3.0) == ()
    (ev,) = asm.receive(0, 0, 0, good[:2048], 3.0)
    assert isinstance(ev, BlockVerified) and ev.digest == block_digest(good) and ev.length == BS
    assert bytes(sink.block(0, 0)) == good
    assert asm.stats.failed == 2 and asm.stats.verified == 1


def test_overlap_never_rewrites_held_bytes() -> None:
    """A later overlapping piece with other bytes cannot change what was hashed/stored."""
    lay = {0: BlockLayout(BS, BS)}
    src = _source(lay, 5)
    sink = ImageSink(lay)
    asm = BlockAssembler(lay, sink, inline_hash_min=512)
    asm.expect(0, 0, block_digest(src[0]))
    assert asm.receive(0, 0, 0, src[0][:2000], 0.0) == ()
    garbage = bytes(2000)
    assert asm.receive(0, 0, 1000, garbage[:1500] + src[0][2500:3000], 0.0) == ()
    # Only [2000, 3000) was new: taken from the overlapping piece, so bytes
    # [2000, 2500) are zeros and the block must fail as a whole.
    assert sink.read(0, 0, 0, 2000) == src[0][:2000]
    assert asm.stats.bytes_duplicate == 1000 and asm.stats.bytes_new == 3000
    (ev,) = asm.receive(0, 0, 3000, src[0][3000:], 0.0)
    assert isinstance(ev, BlockFailed)


def test_two_feeders_interleaved_with_different_piece_sizes() -> None:
    lay = {0: BlockLayout(6 * BS + 777, BS), 1: BlockLayout(2 * BS, BS)}
    src = _source(lay, 6)
    sink = BufferSink(lay)
    asm = BlockAssembler(lay, sink)
    rng = random.Random(6)
    feeds = []
    for size in (1400, 3000):  # a datagram path and a larger-piece path
        pieces = [(f, b, o, n) for f, la in lay.items() for b in range(la.count)
                  for o, n in _cuts(rng, la.stored_range(b)[1], size, size)]
        rng.shuffle(pieces)
        feeds.append(pieces)
    for f, la in lay.items():
        for b in range(la.count):
            asm.expect(f, b, block_digest(_block_bytes(lay, src, f, b)))
    verified = []
    now = 0.0
    while any(feeds):
        feed = rng.choice([fd for fd in feeds if fd])
        f, b, o, n = feed.pop()
        for ev in asm.receive(f, b, o, _block_bytes(lay, src, f, b)[o:o + n], now):
            if isinstance(ev, LateDuplicate):
                assert (ev.file, ev.block) in verified
                continue
            assert isinstance(ev, BlockVerified)
            assert bytes(sink.block(f, b)) == _block_bytes(lay, src, f, b)
            sink.discard(f, b)
            verified.append((ev.file, ev.block))
        now += 0.01
    assert sorted(verified) == [(f, b) for f, la in lay.items() for b in range(la.count)]
    # Whatever one feeder sent after the other completed a block is a late duplicate.
    assert asm.stats.late_duplicates > 0
    assert asm.stats.bytes_new == sum(la.stored_size for la in lay.values())


def test_digest_after_pieces_verifies_on_arrival() -> None:
    lay = {0: BlockLayout(BS, BS)}
    src = _source(lay, 7)
    asm = BlockAssembler(lay, BufferSink(lay))
    assert asm.receive(0, 0, 0, src[0][:100], 0.0) == ()
    assert asm.state(0, 0) is PartState.RECEIVING
    assert asm.receive(0, 0, 100, src[0][100:], 0.0) == ()
    assert asm.state(0, 0) is PartState.AWAITING_DIGEST
    assert asm.stats.open_bytes == BS  # held, and counted in the bound, until the digest comes
    (ev,) = asm.expect(0, 0, block_digest(src[0]))
    assert isinstance(ev, BlockVerified)
    assert asm.expect(0, 0, block_digest(src[0])) == (LateDuplicate(0, 0, False),)  # harmless
    assert asm.stats.late_duplicates == 1


def test_memory_bound_is_never_exceeded_and_refused_pieces_come_back() -> None:
    """16 blocks fed in random order through a 3-block bound: refusals, never more held."""
    lay = {0: BlockLayout(16 * BS, BS)}
    src = _source(lay, 8)
    sink = BufferSink(lay, pool=0)
    bound = 3 * BS
    asm = BlockAssembler(lay, sink, max_open_bytes=bound)
    rng = random.Random(8)
    for b in range(16):
        asm.expect(0, b, block_digest(_block_bytes(lay, src, 0, b)))
    queue = [(b, o, n) for b in range(16) for o, n in _cuts(rng, BS, 300, 900)]
    rng.shuffle(queue)
    verified, refused, now = set(), 0, 0.0
    while queue:
        b, o, n = queue.pop(0)
        for ev in asm.receive(0, b, o, _block_bytes(lay, src, 0, b)[o:o + n], now):
            if isinstance(ev, PieceRefused):
                assert ev.reason is Refusal.BUSY and (ev.block, ev.offset, ev.length) == (b, o, n)
                refused += 1
                queue.append((b, o, n))  # the sender backs off: it comes again later
            else:
                assert isinstance(ev, BlockVerified)
                verified.add(ev.block)
                assert bytes(sink.block(0, ev.block)) == _block_bytes(lay, src, 0, ev.block)
                sink.discard(0, ev.block)
        assert asm.stats.open_bytes <= bound
        assert sink.held_bytes <= bound
        now += 0.001  # never idle long enough to evict
    assert verified == set(range(16))
    assert refused > 0 and asm.stats.refused == refused and asm.stats.evicted == 0
    assert asm.stats.peak_open_bytes == bound


def test_idle_block_is_evicted_to_admit_a_new_one() -> None:
    lay = {0: BlockLayout(4 * BS, BS)}
    src = _source(lay, 9)
    sink = BufferSink(lay)
    asm = BlockAssembler(lay, sink, max_open_bytes=2 * BS, idle_timeout=5.0)
    asm.receive(0, 0, 0, src[0][:100], 0.0)
    asm.receive(0, 1, 0, src[0][BS:BS + 100], 3.0)
    (ev,) = asm.receive(0, 2, 0, src[0][2 * BS:2 * BS + 100], 4.0)
    assert ev == PieceRefused(0, 2, 0, 100, Refusal.BUSY)
    (ev,) = asm.receive(0, 2, 0, src[0][2 * BS:2 * BS + 100], 5.5)
    assert ev == BlockEvicted(0, 0, 100, 5.5)  # block 0 was idle 5.5 s, block 1 only 2.5 s
    assert asm.state(0, 0) is PartState.ABSENT and asm.state(0, 2) is PartState.RECEIVING
    assert sink.held_bytes == 2 * BS and asm.stats.open_bytes == 2 * BS


def test_late_duplicates_are_counted_and_dropped() -> None:
    lay = {0: BlockLayout(2 * BS, BS), 1: BlockLayout(BS, BS)}
    src = _source(lay, 10)
    sink = ImageSink(lay)
    asm = BlockAssembler(lay, sink, have={0: [(1, 2)]})
    asm.expect(0, 0, block_digest(src[0][:BS]))
    (ev,) = asm.receive(0, 0, 0, src[0][:BS], 0.0)
    assert isinstance(ev, BlockVerified)
    writes = dict(sink.writes)
    # Each is reported, so the receiver repeats the ack the sender evidently missed.
    assert asm.receive(0, 0, 10, b"late", 1.0) == (LateDuplicate(0, 0, False),)  # this session
    assert asm.receive(0, 1, 0, b"x" * 10, 1.0) == (LateDuplicate(0, 1, False),)  # earlier run
    assert asm.state(0, 1) is PartState.VERIFIED
    asm.commit(1)
    assert asm.receive(1, 0, 0, b"y", 1.0) == (LateDuplicate(1, 0, True),)  # file committed
    assert asm.receive(1, 99, -5, b"", 1.0) == (LateDuplicate(1, 99, True),)  # even malformed
    assert asm.expect(1, 0, bytes(32)) == (LateDuplicate(1, 0, True),)
    assert asm.state(1, 0) is PartState.COMMITTED
    assert asm.stats.late_duplicates == 5
    assert sink.writes == writes  # nothing written


def test_commit_drops_half_assembled_blocks_of_the_file() -> None:
    lay = {0: BlockLayout(2 * BS, BS), 1: BlockLayout(BS, BS)}
    sink = BufferSink(lay)
    asm = BlockAssembler(lay, sink)
    asm.receive(0, 1, 0, b"a" * 10, 0.0)
    asm.receive(1, 0, 0, b"b" * 10, 0.0)
    asm.expect(0, 0, bytes(32))
    asm.commit(0)
    assert list(asm.open_blocks()) == [(1, 0)]
    assert asm.stats.open_bytes == BS and asm.stats.digests_pending == 0
    assert sink.held_bytes == BS


@pytest.mark.parametrize(
    ("file", "block", "offset", "data", "match"),
    [
        (7, 0, 0, b"x", "unknown file"),
        (0, 2, 0, b"x", "out of range"),
        (0, -1, 0, b"x", "out of range"),
        (0, 0, -1, b"x", "outside block"),
        (0, 0, BS - 1, b"xy", "outside block"),
        (0, 1, 100, b"x", "outside block"),  # the short last block is 100 bytes
        (0, 0, 0, b"", "empty piece"),
    ],
)
def test_bad_pieces_raise_protocol_error(file: int, block: int, offset: int, data: bytes,
                                         match: str) -> None:
    lay = {0: BlockLayout(BS + 100, BS)}
    asm = BlockAssembler(lay, BufferSink(lay))
    asm.receive(0, 0, 0, b"held", 0.0)  # bounds are checked on open blocks too
    asm.receive(0, 1, 0, b"h", 0.0)
    with pytest.raises(ProtocolError, match=match):
        asm.receive(file, block, offset, data, 0.0)
    assert asm.stats.bytes_new == 5


def test_envelope_piece_bounds_follow_the_stored_length() -> None:
    lay = {0: BlockLayout(BS, BS, header_len=40, overhead=28)}
    asm = BlockAssembler(lay, BufferSink(lay))
    asm.receive(0, 0, BS, b"t" * 28, 0.0)  # the tag bytes beyond the plain length
    with pytest.raises(ProtocolError):
        asm.receive(0, 0, BS + 28, b"t", 0.0)


def test_bad_digests_raise_protocol_error() -> None:
    lay = {0: BlockLayout(4 * BS, BS)}
    asm = BlockAssembler(lay, BufferSink(lay), max_digests=2)
    with pytest.raises(ProtocolError, match="bytes"):
        asm.expect(0, 0, b"short")
    with pytest.raises(ProtocolError, match="out of range"):
        asm.expect(0, 4, bytes(32))
    asm.expect(0, 0, bytes(32))
    with pytest.raises(ProtocolError, match="changed"):
        asm.expect(0, 0, b"\x01" * 32)
    asm.expect(0, 1, bytes(32))
    with pytest.raises(ProtocolError, match="ahead"):
        asm.expect(0, 2, bytes(32))
    assert asm.stats.digests_pending == 2


def test_fragment_bound_refuses_isolated_pieces_but_takes_gap_fillers() -> None:
    lay = {0: BlockLayout(2 * BS, BS)}
    src = _source(lay, 11)
    asm = BlockAssembler(lay, BufferSink(lay), max_fragments=3)
    blk = src[0][:BS]
    for o in (0, 1000, 2000):
        assert asm.receive(0, 0, o, blk[o:o + 100], 0.0) == ()
    assert asm.stats.fragments == 3
    (ev,) = asm.receive(0, 0, 3000, blk[3000:3100], 0.0)
    assert ev == PieceRefused(0, 0, 3000, 100, Refusal.FRAGMENTED)
    (ev,) = asm.receive(0, 1, 0, b"z", 0.0)  # a new block would add a range too
    assert isinstance(ev, PieceRefused) and ev.reason is Refusal.FRAGMENTED
    assert asm.receive(0, 0, 100, blk[100:1000], 0.0) == ()  # merges two ranges
    assert asm.stats.fragments == 2
    assert asm.receive(0, 0, 3000, blk[3000:3100], 0.0) == ()  # room again
    assert asm.stats.fragments == 3


def test_bound_below_one_block_is_refused() -> None:
    lay = {0: BlockLayout(BS, BS, overhead=28)}
    with pytest.raises(ValueError):
        BlockAssembler(lay, BufferSink(lay), max_open_bytes=BS)
    BlockAssembler(lay, BufferSink(lay), max_open_bytes=BS + 28)


def test_buffer_sink_recycles_buffers() -> None:
    lay = {0: BlockLayout(3 * BS, BS)}
    sink = BufferSink(lay, pool=1)
    data = os.urandom(BS)
    sink.write(0, 0, 0, memoryview(data))
    first = sink.read(0, 0, 0, BS)
    assert bytes(first) == data
    sink.discard(0, 0)
    sink.write(0, 1, 0, memoryview(b"abc"))
    assert isinstance(first, memoryview) and first.obj is sink.read(0, 1, 0, 3).obj  # type: ignore[union-attr]
    assert bytes(sink.block(0, 1)[:3]) == b"abc" and len(sink.block(0, 1)) == BS


def test_whole_block_with_known_digest_passes_a_full_bound() -> None:
    """An HTTP frame (a whole block, digest known) is checked in the call: never refused."""
    lay = {0: BlockLayout(4 * BS, BS)}
    src = _source(lay, 12)
    sink = ImageSink(lay)
    asm = BlockAssembler(lay, sink, max_open_bytes=BS)
    asm.receive(0, 0, 0, src[0][:10], 0.0)  # the bound is full with a half block
    asm.expect(0, 1, block_digest(src[0][BS:2 * BS]))
    (ev,) = asm.receive(0, 1, 0, src[0][BS:2 * BS], 0.0)
    assert isinstance(ev, BlockVerified)
    assert asm.stats.peak_open_bytes == BS and asm.stats.open_blocks == 1
    assert sink.block(0, 1) == src[0][BS:2 * BS]
    (ev,) = asm.receive(0, 2, 0, src[0][2 * BS:3 * BS], 0.0)  # no digest yet: must be held
    assert ev == PieceRefused(0, 2, 0, BS, Refusal.BUSY)
    asm.expect(0, 3, bytes(32))
    (ev,) = asm.receive(0, 3, 0, src[0][3 * BS:], 0.0)  # a bad whole block fails at once
    assert ev == BlockFailed(0, 3, 1, "digest mismatch")
    assert (0, 3) in sink.discarded
