"""Scheduler: leases, deadlines, acks, failover, on a hand-stepped clock.

Pure and fast (no sockets). The last tests drive a simulated lossy, reordering
network between the scheduler and a ``BlockAssembler``: every block arrives
verified, nothing acked is leased again, and lost bytes are leased again within
one deadline.
"""

from __future__ import annotations

import random

import pytest

from transport.blocks.assembly import (
    BlockAssembler,
    BlockFailed,
    BlockVerified,
    BufferSink,
    LateDuplicate,
    PieceRefused,
)
from transport.blocks.digest import block_digest
from transport.blocks.layout import BlockLayout
from transport.blocks.ranges import RangeSet
from transport.blocks.scheduler import (
    TRANSITIONS,
    Event,
    Lease,
    PathTiming,
    Scheduler,
    State,
)
from transport.errors import ProtocolError

BS = 4096
FAST = PathTiming(lease_timeout=1.0, ack_timeout=2.0)


def _sched(n_blocks: int = 8, **kw: object) -> Scheduler:
    s = Scheduler({0: BlockLayout(n_blocks * BS - 1000, BS)}, **kw)  # type: ignore[arg-type]
    s.set_path("a", FAST)
    s.set_path("b", FAST)
    return s


def _bytes(leases: list[Lease]) -> int:
    return sum(x.length for x in leases)


def test_whole_blocks_lease_deliver_ack_done() -> None:
    s = _sched(4)
    assert s.want(0, [(0, 4)]) == 4
    assert s.want(0, [(1, 3)]) == 0  # already wanted
    assert not s.done and s.outstanding == 4
    got = s.lease("a", 0.0, max_pieces=10)
    assert [(x.block, x.offset, x.length) for x in got] == [
        (0, 0, BS), (1, 0, BS), (2, 0, BS), (3, 0, BS - 1000)]
    assert s.block_state(0, 0) is State.LEASED
    for x in got:
        assert s.delivered(x, 0.1)
    assert s.block_state(0, 0) is State.DELIVERED
    assert s.lease("a", 0.2, max_pieces=10) == []
    for b in range(4):
        assert s.ack(0, b)
        assert s.block_state(0, b) is State.ACKED
    assert s.done and s.stats.live_leases == 0 and s.stats.acked == 4
    assert s.get_timer() is None
    s.check_invariants()


def test_pieces_respect_piece_size_and_byte_budget() -> None:
    s = _sched(2)
    s.want(0, [(0, 2)])
    got = s.lease("a", 0.0, max_bytes=5000, piece_size=1400)
    assert [(x.block, x.offset, x.length) for x in got] == [
        (0, 0, 1400), (0, 1400, 1400), (0, 2800, 1296), (1, 0, 904)]
    assert _bytes(got) == 5000
    got = s.lease("a", 0.0, max_pieces=2, piece_size=1400)
    assert [(x.block, x.offset, x.length) for x in got] == [(1, 904, 1400), (1, 2304, 792)]
    s.check_invariants()
    with pytest.raises(ValueError):
        s.lease("a", 0.0, max_bytes=0)
    with pytest.raises(ValueError):
        s.lease("a", 0.0, max_pieces=1, piece_size=0)


def test_undelivered_lease_expires_and_is_released_first_to_another_path() -> None:
    s = _sched(4)
    s.want(0, [(0, 4)])
    (x,) = s.lease("a", 10.0)  # path a takes block 0 and stalls
    assert s.get_timer() == 11.0
    assert s.expire(10.99) == []
    y = s.lease("b", 10.5)[0]
    assert y.block == 1
    assert s.expire(11.0) == [x]
    assert s.block_state(0, 0) is State.QUEUED
    (z,) = s.lease("b", 11.0)  # the lost block comes back first, ahead of block 2
    assert (z.block, z.offset, z.length) == (0, 0, BS) and z.path == "b"
    assert not s.delivered(x, 11.1)  # the stalled path wakes up: stale, ignored
    assert s.stats.stale == 1 and s.stats.expired == 1
    s.check_invariants()


def test_delivered_but_unacked_expires_after_ack_timeout() -> None:
    s = _sched(2)
    s.want(0, [(0, 1)])
    (x,) = s.lease("a", 0.0)
    s.delivered(x, 0.5)
    assert s.get_timer() == 2.5  # re-armed from delivery: ack_timeout
    assert s.expire(2.4) == []
    assert s.expire(2.5) == [x]
    (y,) = s.lease("a", 2.6)
    assert (y.block, y.offset, y.length) == (0, 0, BS) and y.id != x.id
    assert s.stats.requeued_bytes == BS


def test_ack_retires_every_lease_of_the_block_and_it_is_never_leased_again() -> None:
    s = _sched(3)
    s.want(0, [(0, 3)])
    a = s.lease("a", 0.0, max_pieces=2, piece_size=1000)
    b = s.lease("b", 0.0, max_pieces=2, piece_size=1000)
    assert {x.block for x in a + b} == {0}
    assert s.ack(0, 0)
    assert s.stats.live_leases == 0
    for x in a + b:
        assert not s.delivered(x, 0.1)
        assert not s.lost(x)
    assert not s.nack(0, 0)  # a report about a verified block changes nothing
    assert s.want(0, [(0, 1)]) == 0
    leased = s.lease("a", 1.0, max_pieces=100)
    assert {x.block for x in leased} == {1, 2}
    assert not s.ack(0, 0)  # a repeated ack is harmless
    s.check_invariants()


def test_ack_before_lease_means_never_leased() -> None:
    s = _sched(3)
    s.ack(0, 1)  # the receiver already had it (e.g. journaled in an earlier run)
    assert s.want(0, [(0, 3)]) == 2
    leased = s.lease("a", 0.0, max_pieces=10)
    assert [x.block for x in leased] == [0, 2]
    s.ack(0, 0)
    s.ack(0, 2)
    assert s.done


def test_drop_path_requeues_everything_at_once_for_the_other_path() -> None:
    s = _sched(6)
    s.want(0, [(0, 6)])
    a = s.lease("a", 0.0, max_pieces=3)
    for x in a[:2]:
        s.delivered(x, 0.1)
    b = s.lease("b", 0.0, max_pieces=1)
    dropped = s.drop_path("a")
    assert sorted(x.id for x in dropped) == sorted(x.id for x in a)
    assert s.leases_of("a") == []
    again = s.lease("b", 0.2, max_pieces=3)
    assert sorted(x.block for x in again) == sorted(x.block for x in a)
    assert b[0].block not in {x.block for x in again}
    for x in a:
        assert not s.delivered(x, 0.3)
    s.check_invariants()


def test_two_paths_share_work_and_one_finishes_what_the_other_started() -> None:
    s = _sched(4)
    s.want(0, [(0, 4)])
    a = s.lease("a", 0.0, max_bytes=2000, piece_size=1000)  # a starts block 0
    s.drop_path("a")
    b = s.lease("b", 0.1, max_bytes=BS, piece_size=None)  # b finishes it, whole
    assert [(x.block, x.offset, x.length) for x in b] == [(0, 0, BS)]
    s2 = _sched(4)
    s2.want(0, [(0, 4)])
    a = s2.lease("a", 0.0, max_bytes=2000, piece_size=1000)
    b = s2.lease("b", 0.0, max_bytes=BS, piece_size=None)
    # b takes the rest of block 0 (started first), then the start of block 1.
    assert [(x.block, x.offset, x.length) for x in b] == [(0, 2000, BS - 2000), (1, 0, 2000)]
    ranges = sorted((x.block, x.offset, x.stop) for x in a + b)
    assert ranges == [(0, 0, 1000), (0, 1000, 2000), (0, 2000, BS), (1, 0, 2000)]
    s2.check_invariants()


def test_lost_pieces_are_released_at_once() -> None:
    s = _sched(2)
    s.want(0, [(0, 2)])
    got = s.lease("a", 0.0, max_pieces=3, piece_size=1400)
    s.delivered(got[1], 0.1)
    assert s.lost(got[1])
    assert not s.lost(got[1])
    (x,) = s.lease("a", 0.2, max_pieces=1, piece_size=1400)
    assert (x.block, x.offset, x.length) == (0, 1400, 1400)
    assert s.stats.lost == 1
    s.check_invariants()


def test_piece_acks_retire_leases_and_expiry_resends_only_the_gap() -> None:
    s = _sched(1, block_ack_timeout=5.0)
    s.want(0, [(0, 1)])
    x, y = s.lease("a", 0.0, max_pieces=2, piece_size=2000)
    s.delivered(x, 0.1)
    s.delivered(y, 0.1)
    assert s.received(0, 0, [(0, 2000)], 0.2) == 1  # x covered, y not
    assert s.received(0, 0, [(2000, 2500)], 0.3) == 0  # y covered in part only
    assert s.stats.live_leases == 1
    assert s.expire(10.0) == [y]
    (z,) = s.lease("a", 10.0, max_pieces=5)
    assert (z.offset, z.stop) == (2500, BS - 1000)  # only the bytes the receiver lacks
    assert s.received(0, 0, [(2500, BS - 1000)], 10.1) == 1
    assert s.block_state(0, 0) is State.DELIVERED
    s.check_invariants()
    # Every byte received but no journal ack: the safety net resends the block whole.
    assert s.get_timer() == pytest.approx(15.1)
    s.expire(15.1)
    assert s.stats.block_timeouts == 1
    (w,) = s.lease("a", 15.2, max_pieces=5)
    assert (w.offset, w.length) == (0, BS - 1000)


def test_nack_of_a_failed_block_resends_it_whole_even_received_bytes() -> None:
    s = _sched(2)
    s.want(0, [(0, 1)])
    x, y = s.lease("a", 0.0, max_pieces=2, piece_size=2048)
    s.delivered(x, 0.1)
    s.received(0, 0, [(0, 2048)], 0.2)
    assert s.nack(0, 0)  # the receiver's BlockFailed
    assert not s.delivered(y, 0.3)  # y was cancelled with the rest
    got = s.lease("b", 0.3, max_pieces=5)
    assert sorted((z.offset, z.stop) for z in got) == [(0, BS)]
    s.check_invariants()


def test_nack_of_refused_ranges_requeues_just_those() -> None:
    s = _sched(2)
    s.want(0, [(0, 1)])
    got = s.lease("a", 0.0, max_pieces=4, piece_size=1024)
    for x in got:
        s.delivered(x, 0.1)
    assert s.nack(0, 0, [(1024, 2048)])  # the receiver refused that piece (PieceRefused)
    assert s.nack(0, 0, [(1024, 2048)])  # reported twice: queued once, counted once
    assert s.stats.requeued_bytes == 1024
    (z,) = s.lease("a", 0.2, max_pieces=5)
    assert (z.offset, z.stop) == (1024, 2048)
    assert s.stats.live_leases == 4
    s.check_invariants()


def test_open_block_window_bounds_started_blocks() -> None:
    s = _sched(8, max_open_blocks=2)
    s.set_path("tcp", PathTiming(1.0, 2.0, reliable=True))
    s.want(0, [(0, 8)])
    got = s.lease("a", 0.0, max_pieces=100, piece_size=1000)
    assert {x.block for x in got} == {0, 1}
    assert s.stats.open_blocks == 2
    for x in got:
        s.delivered(x, 0.1)
    # Datagram pieces hold their block open until the receiver acks them...
    assert s.lease("a", 0.2, max_pieces=100, piece_size=1000) == []
    for x in got:
        s.received(x.file, x.block, [(x.offset, x.stop)], 0.3)
    assert s.stats.open_blocks == 0
    got = s.lease("a", 0.4, max_pieces=100, piece_size=1000)
    assert {x.block for x in got} == {2, 3}
    # ...whole blocks on a reliable stream release the window on delivery.
    s.drop_path("a")
    got = s.lease("tcp", 0.5, max_pieces=2)
    assert [(x.block, x.length) for x in got] == [(2, BS), (3, BS)]
    for x in got:
        s.delivered(x, 0.6)
    assert s.stats.open_blocks == 0
    assert [x.block for x in s.lease("tcp", 0.7, max_pieces=2)] == [4, 5]
    s.check_invariants()


def test_timer_heap_stays_proportional_to_live_leases() -> None:
    s = _sched(64)
    s.want(0, [(0, 64)])
    for i in range(64):
        got = s.lease("a", float(i), max_pieces=8, piece_size=512)
        for x in got:
            s.delivered(x, float(i))
        s.ack(0, i)
        assert len(s._heap) <= 2 * s.stats.live_leases + 1024 + 16  # noqa: SLF001
    assert s.done and s.get_timer() is None


def test_reports_from_the_peer_are_validated() -> None:
    s = _sched(2)
    with pytest.raises(ProtocolError, match="unknown file"):
        s.want(3, [(0, 1)])
    with pytest.raises(ProtocolError, match="outside"):
        s.want(0, [(0, 3)])
    with pytest.raises(ProtocolError, match="outside"):
        s.want(0, [(1, 1)])
    with pytest.raises(ProtocolError, match="out of range"):
        s.ack(0, 2)
    s.want(0, [(0, 1)])
    s.lease("a", 0.0)
    with pytest.raises(ProtocolError, match="outside"):
        s.received(0, 0, [(0, BS + 1)], 0.0)
    with pytest.raises(ProtocolError, match="outside"):
        s.nack(0, 0, [(-1, 5)])


def test_transition_table_is_closed() -> None:
    """ACKED is terminal; every non-terminal state can get back to QUEUED or on to ACKED."""
    assert not [k for k in TRANSITIONS if k[0] is State.ACKED]
    for st in (State.QUEUED, State.LEASED, State.DELIVERED, State.RECEIVED):
        assert TRANSITIONS[st, Event.ACK] is State.ACKED
    for st in (State.LEASED, State.DELIVERED, State.RECEIVED):
        assert TRANSITIONS[st, Event.NACK] is State.QUEUED


def test_path_timing_from_rtt_is_quic_pto() -> None:
    t = PathTiming.from_rtt(0.1, 0.01, max_ack_delay=0.025, hold=0.5)
    assert t.ack_timeout == pytest.approx(0.1 + 0.04 + 0.025)
    assert t.lease_timeout == pytest.approx(0.5 + 0.165)
    assert PathTiming.from_rtt(0.0001, 0.0, max_ack_delay=0.0).ack_timeout == pytest.approx(0.0011)
    with pytest.raises(ValueError):
        PathTiming(0.0, 1.0)


@pytest.mark.parametrize("seed", range(25))
def test_random_operations_keep_the_partition(seed: int) -> None:
    """Random leases, deliveries, losses, piece acks, nacks, acks, path deaths."""
    rng = random.Random(seed)
    lay = {0: BlockLayout(10 * BS - 77, BS), 1: BlockLayout(3 * BS, BS, overhead=16)}
    s = Scheduler(lay, max_open_blocks=rng.randint(1, 5), block_ack_timeout=3.0)
    for f, la in lay.items():
        s.want(f, [(0, la.count)])
    now, live, acked = 0.0, [], set()
    paths = ["a", "b", "c"]
    for p in paths:
        s.set_path(p, PathTiming(rng.uniform(0.2, 1.0), rng.uniform(0.2, 2.0)))
    for _ in range(600):
        op = rng.random()
        if op < 0.35:
            got = s.lease(rng.choice(paths), now, max_bytes=rng.randint(1, 3 * BS),
                          piece_size=rng.choice([None, 700, 1400, 5000]))
            for x in got:
                assert (x.file, x.block) not in acked, "an acked block was leased"
            live += got
        elif op < 0.55 and live:
            s.delivered(rng.choice(live), now)
        elif op < 0.6 and live:
            s.lost(rng.choice(live))
        elif op < 0.7 and live:
            x = rng.choice(live)
            s.received(x.file, x.block, [(x.offset, x.stop)], now)
        elif op < 0.73 and live:
            x = rng.choice(live)
            s.nack(x.file, x.block, None if rng.random() < 0.5 else [(x.offset, x.stop)])
        elif op < 0.83 and live:
            x = rng.choice(live)
            s.ack(x.file, x.block)
            acked.add((x.file, x.block))
        elif op < 0.85:
            s.drop_path(rng.choice(paths))
        else:
            now += rng.uniform(0, 0.5)
            s.expire(now)
        s.check_invariants()
        t = s.get_timer()
        assert t is None or t >= 0
        for f, b in acked:
            assert s.block_state(f, b) is State.ACKED
    # Finish: a perfect path sends everything left; all gets acked.
    for _ in range(1000):
        if s.done:
            break
        now += 0.1
        s.expire(now)
        for x in s.lease("a", now, max_pieces=50):
            assert (x.file, x.block) not in acked
            s.delivered(x, now)
            s.received(x.file, x.block, [(x.offset, x.stop)], now)
            if s.block_state(x.file, x.block) is State.DELIVERED:
                s.ack(x.file, x.block)
                acked.add((x.file, x.block))
    assert s.done
    assert acked == {(f, b) for f, la in lay.items() for b in range(la.count)}


class _Net:
    """A lossy, reordering, duplicating network of datagrams, on a fake clock."""

    def __init__(self, rng: random.Random, loss: float, dup: float, delay: float) -> None:
        self.rng, self.loss, self.dup, self.delay = rng, loss, dup, delay
        self.flight: list[tuple[float, int, object]] = []
        self.seq = 0

    def send(self, now: float, msg: object) -> bool:
        if self.rng.random() < self.loss:
            return False
        for _ in range(2 if self.rng.random() < self.dup else 1):
            self.flight.append((now + self.delay * self.rng.uniform(0.5, 1.5), self.seq, msg))
            self.seq += 1
        return True

    def arrivals(self, now: float) -> list[object]:
        self.flight.sort(key=lambda t: (t[0], t[1]))
        n = 0
        while n < len(self.flight) and self.flight[n][0] <= now:
            n += 1
        out = [m for _, _, m in self.flight[:n]]
        del self.flight[:n]
        return out


@pytest.mark.parametrize("seed", range(6))
def test_end_to_end_over_lossy_paths_with_failover(seed: int) -> None:
    """Scheduler -> lossy network -> BlockAssembler -> acks back, two paths, one dies.

    Every block arrives verified with the source's bytes; no acked block is leased
    again; the bytes of every dropped datagram are leased again within the UDP
    path's ack timeout plus a few steps (round-free: no waiting for a round to
    end); the receiver's bound holds throughout.
    """
    rng = random.Random(seed)
    lay = {0: BlockLayout(70 * BS + 999, BS), 1: BlockLayout(9 * BS, BS)}
    src = {f: rng.randbytes(la.stored_size) for f, la in lay.items()}

    def blk(f: int, b: int) -> bytes:
        off, n = lay[f].stored_range(b)
        return src[f][off:off + n]

    sched = Scheduler(lay, max_open_blocks=4, block_ack_timeout=2.0)
    sink = BufferSink(lay)
    asm = BlockAssembler(lay, sink, max_open_bytes=6 * BS, idle_timeout=1.0)
    for f, la in lay.items():
        sched.want(f, [(0, la.count)])
        for b in range(la.count):  # the sender announces digests once, on the control channel
            asm.expect(f, b, block_digest(blk(f, b)))
    timing = {"udp": PathTiming(0.2, 0.3), "http": PathTiming(0.5, 0.8, reliable=True)}
    for p, t in timing.items():
        sched.set_path(p, t)
    fwd = {"udp": _Net(rng, 0.1, 0.05, 0.05), "http": _Net(rng, 0.0, 0.0, 0.1)}
    back = _Net(rng, 0.05, 0.0, 0.05)
    step, now = 0.01, 0.0
    alive = {"udp", "http"}
    verified: set[tuple[int, int]] = set()
    acked: set[tuple[int, int]] = set()
    dropped: list[tuple[float, int, int, RangeSet]] = []  # (when, file, block, bytes not re-leased)
    waits: list[float] = []
    for tick in range(20000):
        if sched.done:
            break
        now = tick * step
        if tick == 40:  # the UDP path dies mid-transfer: failover
            alive.discard("udp")
            for x in sched.drop_path("udp"):
                dropped.append((now, x.file, x.block, RangeSet([(x.offset, x.stop)])))
        sched.expire(now)
        for p in sorted(alive):
            size = 1400 if p == "udp" else None
            for x in sched.lease(p, now, max_bytes=8 * 1400 if p == "udp" else BS, piece_size=size):
                assert (x.file, x.block) not in acked, "an acked block was leased again"
                for _, f, b, pending in dropped:
                    if (f, b) == (x.file, x.block):
                        pending.discard(x.offset, x.stop)
                sched.delivered(x, now)
                msg = (x.file, x.block, x.offset, blk(x.file, x.block)[x.offset:x.stop])
                if not fwd[p].send(now, msg):
                    dropped.append((now, x.file, x.block, RangeSet([(x.offset, x.stop)])))
        for item in list(dropped):
            t0, f, b, pending = item
            if not pending or sched.block_state(f, b) is State.ACKED:
                waits.append(now - t0)
                dropped.remove(item)
        for p in sorted(alive):
            for msg in fwd[p].arrivals(now):
                f, b, o, data = msg  # type: ignore[misc]
                for ev in asm.receive(f, b, o, data, now):
                    if isinstance(ev, BlockVerified):
                        assert bytes(sink.block(f, b)) == blk(f, b)
                        sink.discard(f, b)
                        verified.add((f, b))
                        back.send(now, ("ack", f, b, None))
                    elif isinstance(ev, PieceRefused):
                        back.send(now, ("nack", f, b, [(ev.offset, ev.offset + ev.length)]))
                    elif isinstance(ev, BlockFailed):
                        back.send(now, ("nack", f, b, None))
                    elif isinstance(ev, LateDuplicate):  # the ack was lost: repeat it
                        back.send(now, ("ack", f, b, None))
                    else:  # evicted: the whole block again
                        back.send(now, ("nack", ev.file, ev.block, None))
                if asm.state(f, b).value == "receiving":  # piece-level ack, as a SACK
                    back.send(now, ("recv", f, b, asm.received(f, b).to_list()))
                assert asm.stats.open_bytes <= asm.max_open_bytes
        for msg in back.arrivals(now):
            kind, f, b, ranges = msg  # type: ignore[misc]
            if kind == "ack":
                sched.ack(f, b)
                acked.add((f, b))
            elif kind == "nack":
                sched.nack(f, b, ranges)
            else:
                sched.received(f, b, ranges, now)
        if tick % 50 == 0:
            sched.check_invariants()
    assert sched.done, sched.stats
    assert verified == {(f, b) for f, la in lay.items() for b in range(la.count)}
    # Every dropped datagram's bytes were leased again (or made moot by an ack)
    # within the UDP ack timeout plus a few steps of queue drain: round-free.
    assert not dropped and waits
    assert max(waits) <= timing["udp"].ack_timeout + 10 * step, max(waits)
    assert sched.stats.expired > 0
