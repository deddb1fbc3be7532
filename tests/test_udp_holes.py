"""Hole pieces (datagram format version 2) through the sans-IO UDP core, over a scripted
lossy link with a hand-stepped clock (``tests.udp_link``), into the receiver's assembly.

A sparse file's blocks that lie wholly in a hole cross as 18-byte hole pieces (with
the block's digest beside them), are acknowledged or reported lost like data pieces
and sent again when lost, and the assembler keeps them holes (its sink's ``zero``,
never ``write``) while the digest check passes over zeros. The bytes on the wire
are about the data's, whatever the holes' size.
"""

from __future__ import annotations

import random

import pytest

from tests.udp_link import Link, Peer, Sim, pair
from transport.blocks.assembly import (
    BlockAssembler,
    BlockFailed,
    BlockVerified,
    BufferSink,
)
from transport.blocks.digest import block_digest
from transport.blocks.layout import BlockLayout
from transport.blocks.ranges import RangeSet
from transport.errors import ProtocolError
from transport.udp import RateConfig, UdpConfig, UdpConnection, codec
from transport.udp.crypto import Sealer
from transport.udp.events import PiecesAcked, PiecesLost, PiecesReceived

DIGEST_AT = (1 << 32) - 32  # fallback's convention: a block's digest is a piece there
V2 = UdpConfig(version=2)


class HoleSource:
    """Sending owner of one sparse file: per block its digest piece, then its bytes, or a
    hole piece for a block of zeros (as ``fallback.udpblocks.UdpPump`` does); what is
    reported lost is queued again, a lost hole as a hole piece."""

    def __init__(self, blocks: list[bytes | None], block_size: int) -> None:
        self.blocks = blocks            # None: a block wholly in a hole
        self.bs = block_size
        self.digests = [block_digest(d if d is not None else bytes(block_size))
                        for d in blocks]
        self.next = 0
        self.retx: list[tuple[int, int, int, int]] = []
        self.lost_holes = 0
        self.lost_data = 0
        self.acked: dict[int, RangeSet] = {b: RangeSet() for b in range(len(blocks))}
        self.acked_digests: set[int] = set()

    def feed(self, conn: UdpConnection) -> None:
        for f, b, off, n in self.retx:
            if off >= DIGEST_AT:
                conn.queue_piece(f, b, off, self.digests[b][off - DIGEST_AT:off - DIGEST_AT + n],
                                 retransmission=True)
            elif self.blocks[b] is None:
                conn.queue_hole(f, b, off, n, retransmission=True)
            else:
                data = self.blocks[b]
                assert data is not None
                conn.queue_piece(f, b, off, memoryview(data)[off:off + n], retransmission=True)
        self.retx.clear()
        while self.next < len(self.blocks) and conn.send_budget() >= self.bs + 32:
            b = self.next
            conn.queue_piece(0, b, DIGEST_AT, self.digests[b])
            data = self.blocks[b]
            if data is None:
                conn.queue_hole(0, b, 0, self.bs)
            else:
                conn.queue_piece(0, b, 0, data)
            self.next += 1

    def on_event(self, ev: object) -> None:
        if isinstance(ev, PiecesLost):
            for ref in ev.pieces:
                if ref[2] < DIGEST_AT:
                    if self.blocks[ref[1]] is None:
                        self.lost_holes += 1
                    else:
                        self.lost_data += ref[3]
            self.retx.extend(ev.pieces)
        elif isinstance(ev, PiecesAcked):
            for _, b, off, n in ev.pieces:
                if off >= DIGEST_AT:
                    self.acked_digests.add(b)
                else:
                    self.acked[b].add(off, off + n)

    @property
    def done(self) -> bool:
        return self.next == len(self.blocks) and not self.retx and all(
            rs.covers(0, self.bs) for rs in self.acked.values())


class ZeroingSink(BufferSink):
    """``BufferSink`` that records which blocks were written and which left holes."""

    def __init__(self, layouts: dict[int, BlockLayout]) -> None:
        super().__init__(layouts)
        self.written: set[tuple[int, int]] = set()
        self.zeroed: list[tuple[int, int, int, int]] = []

    def write(self, file: int, block: int, offset: int, data: memoryview) -> None:
        self.written.add((file, block))
        super().write(file, block, offset, data)

    def zero(self, file: int, block: int, offset: int, length: int) -> None:
        self.zeroed.append((file, block, offset, length))


class Receiver:
    """Receiving owner: digests to ``expect``, data to ``receive``, holes to
    ``receive_hole`` (after the data pieces of the event, as ``UdpPump`` does)."""

    def __init__(self, layout: BlockLayout) -> None:
        self.sink = ZeroingSink({0: layout})
        self.asm = BlockAssembler({0: layout}, self.sink)
        self.verified: set[int] = set()
        self.failed = 0
        self.holes_seen = 0
        self._digest: dict[int, tuple[bytearray, RangeSet]] = {}

    def on_event(self, ev: object, now: float = 0.0) -> None:
        if not isinstance(ev, PiecesReceived):
            return
        events = []
        for f, b, off, data in ev.pieces:
            if off >= DIGEST_AT:
                buf, got = self._digest.setdefault(b, (bytearray(32), RangeSet()))
                at = off - DIGEST_AT
                buf[at:at + len(data)] = data
                got.add(at, at + len(data))
                if got.covers(0, 32):
                    events += self.asm.expect(f, b, bytes(buf))
            else:
                events += self.asm.receive(f, b, off, data, now)
        for f, b, off, n in ev.holes:
            self.holes_seen += 1
            events += self.asm.receive_hole(f, b, off, n, now)
        for e in events:
            if isinstance(e, BlockVerified):
                self.verified.add(e.block)
            elif isinstance(e, BlockFailed):
                self.failed += 1


def sparse_blocks(count: int, bs: int, data_at: dict[int, int], seed: int) -> list[bytes | None]:
    """``count`` blocks, None (a hole) but at ``data_at``: block -> data bytes (the rest
    of such a block zeros, as a data extent that does not end on a block boundary)."""
    rng = random.Random(seed)
    return [rng.randbytes(data_at[b]) + bytes(bs - data_at[b]) if b in data_at else None
            for b in range(count)]


def run(blocks: list[bytes | None], bs: int, *, config: UdpConfig = V2, loss: float = 0.0,
        seed: int = 3, until: float = 60.0) -> tuple[HoleSource, Receiver, UdpConnection,
                                                     UdpConnection, Sim]:
    src = HoleSource(blocks, bs)
    rcv = Receiver(BlockLayout(bs * len(blocks), bs))
    a, b = pair(config, config)
    rng = random.Random(seed)
    sim = Sim(seed)
    sim.add("a", Peer(a, Link(rng, loss=loss), "b", src.on_event, src.feed))
    sim.add("b", Peer(b, Link(rng, loss=loss / 2), "a", lambda ev: rcv.on_event(ev, sim.now)))
    sim.run(until, stop=lambda: src.done and len(rcv.verified) == len(blocks))
    return src, rcv, a, b, sim


def test_holes_cross_as_hole_pieces_over_a_lossy_link() -> None:
    """512 blocks of 64 KiB (32 MiB apparent) with 3 data extents (one mid-block, one
    across two blocks, 150 KiB in all), 15 % loss one way and 7.5 % the other: every
    block verified, the hole blocks left holes (``zero``, never ``write``), lost hole
    pieces sent again as hole pieces, and the wire carries about the data size."""
    bs = 64 << 10
    data_at = {3: 10_000, 200: bs, 201: 30_000, 450: 50_000}
    blocks = sparse_blocks(512, bs, data_at, seed=1)
    src, rcv, a, b, sim = run(blocks, bs, loss=0.15)
    holes = {i for i, d in enumerate(blocks) if d is None}
    assert src.done and rcv.verified == set(range(512)) and rcv.failed == 0
    assert {z[1] for z in rcv.sink.zeroed} == holes and all(z[3] == bs for z in rcv.sink.zeroed)
    assert not any(k[1] in holes for k in rcv.sink.written)  # no hole block was written
    for i, d in enumerate(blocks):  # the data blocks hold their bytes
        if d is not None:
            assert bytes(rcv.sink.block(0, i)) == d
    assert src.lost_holes > 0  # some hole pieces were lost, and made it the second time
    st, rst = a.stats(), b.stats()
    assert st.sent_hole_pieces == len(holes) + src.lost_holes
    assert st.sent_hole_bytes == bs * st.sent_hole_pieces
    assert rst.received_hole_pieces >= len(holes)
    assert st.sent_piece_bytes - st.retransmitted_bytes == len(data_at) * bs + 32 * 512
    data = len(data_at) * bs
    # The wire: the data blocks (their zero tails included: the unit is the block), their
    # losses sent again, headers and the digests; nothing like the 32 MiB apparent.
    assert st.sent_bytes < 1.6 * data + 40_000, (st.sent_bytes, data)
    assert st.sent_bytes < 0.02 * 512 * bs
    assert sim.now < 10.0


def test_holes_cost_their_wire_bytes_only_in_pacing() -> None:
    """1 GiB of holes (256 blocks of 4 MiB) at a fixed 1 Mbit/s: done in well under a
    second of simulated time (their 18-byte pieces and digests), where 1 GiB of data
    would take 2.4 hours."""
    bs = 4 << 20
    cfg = UdpConfig(version=2, max_queue_bytes=16 << 20,
                    rate=RateConfig(policy="fixed", target_rate=1e6, initial_rate=1e6))
    src, rcv, a, _, sim = run([None] * 256, bs, config=cfg)
    assert src.done and rcv.verified == set(range(256))
    assert len(rcv.sink.zeroed) == 256 and not rcv.sink.written
    assert a.stats().sent_bytes < 40_000 and sim.now < 1.0


def test_hole_pieces_need_version_2() -> None:
    """A version 1 connection sends no hole piece (the owner sends zeros instead), and
    its receiver drops a DATA datagram holding one as malformed; the other version's
    datagrams are dropped whole."""
    a, _ = pair()
    with pytest.raises(ValueError):
        a.queue_hole(0, 0, 0, 100)
    a2, b2 = pair(V2, V2)
    with pytest.raises(ValueError):
        a2.queue_hole(0, 0, (1 << 32) - 10, 11)  # past 2**32
    with pytest.raises(ValueError):
        a2.queue_hole(0, 0, 0, 0)
    a2.queue_hole(1, 2, 3, 4 << 20)
    out = a2.datagrams_to_send(0.0)
    _, b1 = pair()  # another connection, version 1: drops version 2 datagrams
    for d, _addr in out:
        b1.receive_datagram(d, ("a", 1), 0.0)
    assert b1.drops["magic"] == len(out)


def _seal(sealer: Sealer, pn: int, body: bytes, version: int) -> bytes:
    head = codec.encode_header(codec.DATA, 0x1234, pn, version)
    out = bytearray(len(head) + len(body) + codec.TAG_SIZE)
    out[:len(head)] = head
    sealer.seal_into(pn, memoryview(out)[:len(head)], body, memoryview(out)[len(head):])
    return bytes(out)


def test_bad_hole_pieces_are_dropped_and_never_written() -> None:
    """From an authenticated peer: an empty hole, one past 2**32, a truncated one are
    malformed datagrams (counted, dropped, nothing delivered); a well-formed hole outside
    its block or file is refused by the assembler as a data piece would be, before any
    zero byte exists, and the sink is never called."""
    a, b = pair(V2, V2)
    sealer: Sealer = a._sealer  # the sender's keys, to forge well-authenticated bodies
    prefix = codec.DATA_PREFIX.pack(0, 0)
    bodies = [
        prefix + codec.HOLE_PIECE.pack(0, 0, 0, 0, 0),                 # empty hole
        prefix + codec.HOLE_PIECE.pack(0, 0, (1 << 32) - 4, 0, 5),     # past 2**32
        prefix + codec.PIECE_HEADER.pack(0, 0, 0, 0) + b"\x00\x01",    # truncated
        prefix + codec.HOLE_PIECE.pack(0, 0, 0, 0, 64) + bytes(16),    # then zeros: a header
    ]
    for pn, body in enumerate(bodies):
        b.receive_datagram(_seal(sealer, pn, body, 2), ("a", 1), 0.0)
    assert b.drops["malformed"] == len(bodies) and b.next_event() is None
    with pytest.raises(ProtocolError):
        codec.parse_data(bodies[0], 2)
    with pytest.raises(ProtocolError):
        codec.parse_data(prefix + codec.HOLE_PIECE.pack(0, 0, 0, 0, 64))  # version 1
    frame = codec.parse_data(prefix + codec.HOLE_PIECE.pack(7, 8, 9, 0, 64), 2)
    assert frame.pieces == (codec.HolePiece(7, 8, 9, 64),)
    # Well formed on the wire, wrong for the file: 4 GiB - 1 at offset 1 of a 64 KiB block.
    b.receive_datagram(_seal(sealer, 10, prefix + codec.HOLE_PIECE.pack(0, 0, 1, 0, (1 << 32) - 1),
                             2), ("a", 1), 0.0)
    ev = b.next_event()
    assert isinstance(ev, PiecesReceived) and ev.holes == [(0, 0, 1, (1 << 32) - 1)]
    rcv = Receiver(BlockLayout(2 * (64 << 10), 64 << 10))
    for f, blk, off, n in [(0, 0, 1, (1 << 32) - 1), (0, 1, 65535, 2), (0, 2, 0, 10),
                           (1, 0, 0, 10), (0, 0, 0, 0)]:
        with pytest.raises(ProtocolError):
            rcv.asm.receive_hole(f, blk, off, n, 0.0)
    assert not rcv.sink.written and not rcv.sink.zeroed and rcv.sink.held_bytes == 0


def test_the_version_is_agreed_over_the_control_call() -> None:
    """``version`` in the UDP request and offer: absent means 1 (an older peer), the
    daemon answers the lower of the request's and its own, a client refuses more."""
    from fallback.control import Flow
    from fallback.udpcontrol import MAX_VERSION, UdpOffer, UdpRequest

    assert "version" not in UdpRequest().to_json() and UdpRequest.from_json({}).version == 1
    assert UdpRequest.from_json(UdpRequest(version=2).to_json()).version == 2
    offer = UdpOffer(0xAB, 33001, 1452, Flow(), key=bytes(32), version=2)
    assert UdpOffer.from_json(offer.to_json()) == offer
    old = UdpOffer(0xAB, 33001, 1452, Flow(), key=bytes(32)).to_json()
    assert "version" not in old and UdpOffer.from_json(old).version == 1
    with pytest.raises(ProtocolError):
        UdpOffer.from_json({**offer.to_json(), "version": MAX_VERSION + 1})
