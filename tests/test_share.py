"""The ``fair`` and ``low`` share controllers on synthetic delay traces and a fake clock,
and the governor that applies them to real download streams (issue 11 section 2).

The traces are what a sender's sockets report (``TCP_INFO``) on a 50 ms path:
an empty queue, the quarter-RTT queue one paced flow keeps alone, the standing
queue of a loss-based flow filling a 1.5 x BDP buffer beside us.
"""

from __future__ import annotations

import asyncio
import math
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import make_file
from transport.blocks.session import BlockSender
from transport.blocks.share import FairShare, LowShare, TcpSample, share_controller
from transport.blocks.source import FileSource, entry_for
from transport.http.governor import StreamGovernor
from transport.http.server import send_blocks
from transport.http.tcpinfo import read_tcp_info, set_max_pacing_rate

BASE = 0.050  # seconds
TICK = 0.1


def feed(ctl: FairShare | LowShare, start: float, seconds: float, queue: float | None = None,
         *, trace: list[float] | None = None, streams: int = 4, retrans: int = 0,
         delivery: float = 0.0, base: float = BASE, rate: float = 80e6) -> float:
    """Feed ticks of ``streams`` samples with queueing delay ``queue`` over ``base`` (or
    cycling through ``trace``) for ``seconds``, the streams delivering ``rate`` bits/s in
    all; returns the time after the last tick."""
    now, k = start, 0
    acked = ctl._counters.get("s0", (0, 0))[1]  # noqa: SLF001 - continue the counters
    while now < start + seconds:
        q = trace[k % len(trace)] if trace is not None else queue
        assert q is not None
        acked += int(rate / 8 * TICK / streams)
        ctl.on_tick(now, {f"s{i}": TcpSample(base + q, base, retrans, delivery, acked)
                          for i in range(streams)})
        now += TICK
        k += 1
    return now


def climb(ctl: FairShare, now: float = 0.0) -> float:
    """A quiet link until every stream sends, unpaced."""
    t0 = now
    while ctl.streams < ctl.max_streams or ctl.rate_bps != math.inf:
        now = feed(ctl, now, TICK, 0.002, streams=ctl.streams)
        assert now - t0 < 30
    return now


# -- fair ---------------------------------------------------------------------------------------
def test_fair_starts_as_one_flow_and_takes_every_stream_on_a_quiet_link() -> None:
    ctl = FairShare(4)
    assert ctl.streams == 1 and ctl.rate_bps == math.inf
    now = feed(ctl, 0.0, FairShare.INCREASE_HOLD - 0.2, 0.004, streams=1)
    assert ctl.streams == 1 and ctl.base_rtt == BASE  # not quiet for long enough yet
    now = feed(ctl, now, 0.4, 0.004, streams=1)
    assert ctl.streams == 4 and ctl.all_streams
    # woken together, the streams are first paced at the capacity measured, in all
    assert ctl.rate_bps == pytest.approx(80e6, rel=0.02)
    feed(ctl, now, FairShare.SETTLE, 0.004)
    assert ctl.rate_bps == math.inf and ctl.streams == 4


def test_fair_steps_down_to_one_capped_stream_under_a_standing_queue() -> None:
    ctl = FairShare(4)
    now = climb(ctl)
    t0 = now
    while not ctl.capped:  # a cubic flow fills the buffer: 40-75 ms of queue
        now = feed(ctl, now, TICK, 0.060, streams=ctl.streams)
        assert now - t0 < FairShare.DECREASE_HOLD + 0.3
    assert now - t0 >= FairShare.DECREASE_HOLD  # not before: BBR's startup queue drains
    assert ctl.streams == 1 and ctl.rate_bps == pytest.approx(40e6, rel=0.02)  # half
    now = feed(ctl, now, 20.0, trace=[0.040, 0.055, 0.070, 0.075, 0.050], streams=1,
               rate=40e6)
    assert ctl.streams == 1 and ctl.capped  # one capped stream while the queue stands
    assert ctl.rate_bps == pytest.approx(40e6, rel=0.02)  # the capacity is not its own cap


def test_fair_uncaps_then_takes_every_stream_once_the_queue_is_gone() -> None:
    ctl = FairShare(4)
    now = climb(ctl)
    now = feed(ctl, now, 2.0, 0.070)
    assert ctl.capped
    t0 = now
    while ctl.capped:
        now = feed(ctl, now, TICK, 0.003, streams=1, rate=40e6)
    assert now - t0 >= FairShare.INCREASE_HOLD and ctl.streams == 1
    assert ctl.rate_bps == math.inf
    t1 = now
    now = climb(ctl, now)
    assert now - t1 >= FairShare.INCREASE_HOLD


def test_fair_waits_longer_each_time_contention_follows_a_step_up() -> None:
    """A cubic flow that backed off after losses comes back: stepping up at every lull
    would knock it down again and again."""
    ctl = FairShare(4)
    now = climb(ctl)
    holds = []
    for _ in range(4):
        # the competitor fills the queue (a step's own settling time does not count)
        now = feed(ctl, now, FairShare.SETTLE + FairShare.DECREASE_HOLD + 0.2, 0.060,
                   streams=ctl.streams)
        assert ctl.capped
        t0 = now
        while ctl.capped:  # it backed off: a lull
            now = feed(ctl, now, TICK, 0.002, streams=1, rate=40e6)
        holds.append(now - t0)
    # the climb to every stream was a step up too: the first hold is already doubled
    h = FairShare.INCREASE_HOLD
    assert holds == pytest.approx([2 * h, 4 * h, 8 * h, 8 * h], abs=0.25)  # at most 8 x
    now = feed(ctl, now, 2 * 8 * h + 1, 0.002, streams=1)  # it left for good: one, then all
    assert ctl.all_streams and not ctl.capped
    now = feed(ctl, now, 1.5, 0.060)
    assert ctl.capped and ctl.backoff == 1  # a new competitor, long after: the short hold


def test_fair_ignores_a_queue_shorter_than_its_hold() -> None:
    """BBR's startup and a step's own burst queue for a moment: not contention."""
    ctl = FairShare(4)
    now = climb(ctl)
    now = feed(ctl, now, FairShare.DECREASE_HOLD - 0.3, 0.150)
    feed(ctl, now, 5.0, 0.0)
    assert ctl.streams == 4 and not ctl.capped


def test_fair_keeps_every_stream_beside_its_own_probing_queue() -> None:
    """One flow alone queues up to a quarter of the RTT now and then: not contention."""
    ctl = FairShare(4)
    now = climb(ctl)
    changes = ctl.changes
    feed(ctl, now, 30.0, trace=[0.0, 0.003, 0.012, 0.006, 0.0, 0.0, 0.0, 0.0])
    assert ctl.streams == 4 and ctl.changes == changes and ctl.rate_bps == math.inf


def test_fair_does_not_take_its_own_startup_queue_for_contention() -> None:
    """BBR's startup overshoots for a few RTTs at the start of a session: not a competitor."""
    ctl = FairShare(4)
    now = feed(ctl, 0.0, 1.5, 0.150, streams=1)
    now = feed(ctl, now, 0.5, 0.010, streams=1)
    assert not ctl.capped
    climb(ctl, now)


def test_fair_on_loopback_scale_delays_never_counts_contention() -> None:
    ctl = FairShare(4)
    now = 0.0
    for k in range(300):  # base 20 us, smoothed RTT jittering up to 3 ms under load
        ctl.on_tick(now, {"a": TcpSample(0.00002 + (k % 7) * 0.0004, 0.00002, 0, 0.0, k << 20)})
        now += TICK
    assert ctl.streams == 4 and not ctl.capped


def test_fair_latecomer_sees_overflows_where_its_base_hides_the_queue() -> None:
    """Started after a cubic flow filled the buffer, the base RTT is 50 ms plus that
    flow's standing queue: the queue above it stays under the threshold, but the buffer
    overflows (retransmissions at the top of the RTT range) and that is contention."""
    late = 0.088
    ctl = FairShare(4)
    now, retrans = 0.0, 0
    saw: list[int] = []
    for k in range(100):
        q = [0.0, 0.010, 0.020, 0.030, 0.037][k % 5]  # the sawtooth over a base of 88 ms
        if k % 5 == 4:
            retrans += 3  # the buffer overflowed at the top
        acked = k * 500_000
        ctl.on_tick(now, {"s0": TcpSample(late + q, late, retrans, 0.0, acked)})
        saw.append(ctl.streams)
        now += TICK
    assert ctl.streams == 1 and ctl.capped, saw


def test_fair_random_loss_at_a_low_queue_is_not_contention() -> None:
    ctl = FairShare(4)
    now = climb(ctl)
    retrans = 0
    for k in range(200):  # 1 % loss: retransmissions whatever the queue, here low
        q = [0.0, 0.004, 0.011, 0.004][k % 4]
        retrans += 1 if q < 0.011 else 0
        ctl.on_tick(now, {f"s{i}": TcpSample(BASE + q, BASE, retrans, 0.0, k << 20)
                          for i in range(4)})
        now += TICK
    assert ctl.streams == 4 and not ctl.capped and ctl.rate_bps == math.inf


def test_fair_follows_the_streams_that_are_open() -> None:
    ctl = FairShare(16)
    ctl.set_max_streams(4)  # four joined: it still starts as one
    assert ctl.streams == 1 and ctl.max_streams == 4
    now = climb(ctl)
    assert ctl.streams == 4 and ctl.all_streams
    ctl.set_max_streams(6)  # two more joined: all of them
    assert ctl.streams == 6
    feed(ctl, now, 2.0, 0.070, streams=6)
    assert ctl.streams == 1
    ctl.set_max_streams(3)
    assert ctl.streams == 1  # a lower count stays


# -- low ----------------------------------------------------------------------------------------
def test_low_grows_on_an_empty_queue_up_to_twice_what_is_delivered_and_the_target() -> None:
    ctl = LowShare(4, target_rate_bps=50e6)
    assert ctl.streams == 1 and ctl.rate_bps == LowShare.START_RATE
    now = feed(ctl, 0.0, 1.0, 0.0, streams=1, delivery=4e6)
    assert ctl.rate_bps == pytest.approx(8e6)  # twice the delivery rate, not more
    feed(ctl, now, 5.0, 0.0, streams=1, delivery=100e6)
    assert ctl.rate_bps == 50e6  # the target rate caps it


def test_low_yields_to_a_standing_queue_down_to_min_rate() -> None:
    ctl = LowShare(4, min_rate_bps=1e6)
    now = feed(ctl, 0.0, 3.0, 0.0, streams=1, delivery=90e6)
    high = ctl.rate_bps
    assert high > 50e6
    assert ctl.target() == pytest.approx(BASE / 2)  # half the base RTT: smaller than 60 ms
    t0 = now
    while ctl.rate_bps > high / 4:  # a cubic flow's queue: 40-75 ms > the 25 ms target
        now = feed(ctl, now, TICK, 0.060, streams=1, delivery=90e6)
        assert now - t0 < 1.0
    feed(ctl, now, 10.0, trace=[0.040, 0.055, 0.070, 0.075], streams=1, delivery=90e6)
    assert ctl.rate_bps == 1e6


def test_low_never_goes_below_its_floor_so_a_block_arrives_before_a_stall() -> None:
    ctl = LowShare(1)
    feed(ctl, 0.0, 20.0, 0.070, streams=1, delivery=1e6)
    assert ctl.rate_bps == LowShare.FLOOR == 1e6
    assert (4 << 20) * 8 / ctl.rate_bps < 60  # the client's stall timeout, seconds
    assert LowShare(1, target_rate_bps=0.5e6).rate_bps == 0.5e6  # a lower target wins


def test_low_target_is_sixty_ms_on_long_paths() -> None:
    ctl = LowShare(1)
    ctl.on_tick(0.0, {"a": TcpSample(0.300, 0.300)})
    assert ctl.target() == LowShare.TARGET == 0.060


def test_low_halves_on_retransmissions_once_per_rtt() -> None:
    ctl = LowShare(1, target_rate_bps=80e6)
    now = feed(ctl, 0.0, 5.0, 0.0, streams=1, delivery=100e6)
    assert ctl.rate_bps == 80e6
    ctl.on_tick(now, {"s0": TcpSample(BASE, BASE, retrans=5)})
    assert ctl.rate_bps == 40e6
    ctl.on_tick(now + 0.01, {"s0": TcpSample(BASE, BASE, retrans=9)})  # one RTT: one cut
    assert ctl.rate_bps == 40e6
    ctl.on_tick(now + 0.07, {"s0": TcpSample(BASE, BASE, retrans=12)})
    assert ctl.rate_bps == 20e6


def test_policies_map_to_controllers() -> None:
    assert share_controller("fixed", 4) is None and share_controller("high", 4) is None
    fair, low = share_controller("fair", 4), share_controller("low", 4, min_rate_bps=3e6)
    assert isinstance(fair, FairShare) and fair.rate_bps == math.inf
    assert isinstance(low, LowShare) and low.rate_bps == 3e6
    with pytest.raises(ValueError, match="unknown policy 'greedy'"):
        share_controller("greedy", 4)
    with pytest.raises(ValueError, match="max_streams"):
        FairShare(0)


# -- the kernel's side ------------------------------------------------------------------------------
def test_tcp_info_and_pacing_cap_on_a_real_socket() -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    with srv, socket.create_connection(srv.getsockname()) as c:
        peer, _ = srv.accept()
        with peer:
            c.sendall(b"x" * 100_000)
            got = 0
            while got < 100_000:
                got += len(peer.recv(1 << 20))
            info = read_tcp_info(c)
            assert info is not None and 0 < info.min_rtt <= info.rtt < 1.0
            assert set_max_pacing_rate(c, 8e6)
            raw = c.getsockopt(socket.SOL_SOCKET, 47)  # SO_MAX_PACING_RATE, bytes/s
            assert raw == 1_000_000
    assert read_tcp_info(None) is None


# -- the governor on real download streams -----------------------------------------------------------
BS = 64 << 10


async def _streams(tmp_path: Path, governor: StreamGovernor, blocks: int,
                   n: int = 4) -> tuple[dict[str, list[int]], int]:
    """Run ``n`` download streams of one file through ``governor`` to the end; returns
    the blocks each stream wrote and the most streams that wrote at once."""
    p = make_file(tmp_path / "f.bin", blocks * BS, seed=3)
    sender = BlockSender({0: FileSource(p, entry_for(p, "", BS))}, ThreadPoolExecutor(2))
    sender.add_ranges([(0, 0, blocks)])
    wrote: dict[str, list[int]] = {f"s{i}": [] for i in range(n)}
    busy: set[str] = set()
    most = 0

    def writer(path: str):  # type: ignore[no-untyped-def]
        async def write(data: bytes | bytearray | memoryview) -> None:
            nonlocal most
            busy.add(path)
            most = max(most, len(busy))
            await asyncio.sleep(0.002 if len(data) > 100 else 0)  # the socket drains
            if len(data) > 100:
                wrote[path].append(len(data))
                busy.discard(path)
        return write

    await asyncio.wait_for(asyncio.gather(*(
        send_blocks(writer(path), sender, path, acks=False, governor=governor)
        for path in wrote)), 30)
    assert sender.done
    return wrote, most


async def test_governed_streams_send_one_at_a_time_and_all_finish(tmp_path: Path) -> None:
    ctl = FairShare(4)
    ctl.streams = 1  # contention: one stream's share
    gov = StreamGovernor(ctl, max_park=60.0)
    wrote, most = await _streams(tmp_path, gov, 40)
    assert sum(len(w) for w in wrote.values()) == 40  # every block once, parked ones ended
    assert most == 1 and gov.admitted_max == 1
    assert sorted(len(w) for w in wrote.values()) == [0, 0, 0, 40]


async def test_a_parked_stream_answers_before_it_waits(tmp_path: Path) -> None:
    """A stream that waits its turn calls ``on_wait`` (the daemon answers its head) before
    it waits: the admitted stream's writes here stand still until it has, as a client's
    reads would if it read a stream only once every stream had answered."""
    p = make_file(tmp_path / "f.bin", 16 * BS, seed=4)
    sender = BlockSender({0: FileSource(p, entry_for(p, "", BS))}, ThreadPoolExecutor(2))
    sender.add_ranges([(0, 0, 16)])
    ctl = FairShare(2)
    ctl.streams = 1  # one sends, the other waits its turn
    gov = StreamGovernor(ctl, max_park=60.0)
    answered = {"a": asyncio.Event(), "b": asyncio.Event()}
    wrote = {"a": 0, "b": 0}

    def writer(path: str, other: str):  # type: ignore[no-untyped-def]
        async def write(data: bytes | bytearray | memoryview) -> None:
            answered[path].set()
            await answered[other].wait()  # the client reads once both have answered
            wrote[path] += len(data) > 100

        async def on_wait() -> None:
            answered[path].set()
        return write, on_wait

    (wa, oa), (wb, ob) = writer("a", "b"), writer("b", "a")
    await asyncio.wait_for(asyncio.gather(
        send_blocks(wa, sender, "a", acks=False, governor=gov, on_wait=oa),
        send_blocks(wb, sender, "b", acks=False, governor=gov, on_wait=ob)), 10)
    assert sender.done and wrote["a"] + wrote["b"] == 16
    assert sorted(wrote.values()) == [0, 16]  # the waiting one answered, sent nothing


async def test_a_parked_stream_gets_its_turn_after_max_park(tmp_path: Path) -> None:
    """No stream stays silent long enough for its client to call it stalled."""
    ctl = FairShare(4)
    ctl.streams = 1
    gov = StreamGovernor(ctl, max_park=0.03)
    wrote, most = await _streams(tmp_path, gov, 120)
    assert sum(len(w) for w in wrote.values()) == 120
    assert most <= 2  # the stream that yields still writes the piece it had read
    assert all(wrote.values()), {k: len(v) for k, v in wrote.items()}  # each took turns


async def test_without_contention_every_stream_sends(tmp_path: Path) -> None:
    ctl = FairShare(4)
    ctl.streams, ctl.all_streams = 4, True  # the ladder's top: the link is ours
    gov = StreamGovernor(ctl)
    wrote, most = await _streams(tmp_path, gov, 40)
    assert most == 4 and all(wrote.values())


# -- end to end through a real daemon --------------------------------------------------------------
@pytest.mark.parametrize("policy", ["fair", "low", "high"])
def test_transfers_under_each_policy_arrive_whole(daemon, tmp_path: Path, policy: str) -> None:
    """The governed streams (fair, low) and the ungoverned ones (high) move a file of
    many blocks both ways over 4 HTTPS streams; the daemon's governor logs nothing bad."""
    src = make_file(tmp_path / "src.bin", 9 * (4 << 20) + 123, seed=7)
    rc, res, _ = daemon.transfer(str(src), daemon.url("/up/"), "--streams", "4",
                                 "--policy", policy)
    assert rc == 0 and res["ok"]
    back = tmp_path / "back"
    rc, res, _ = daemon.transfer(daemon.url("/up/src.bin"), str(back) + "/", "--streams", "4",
                                 "--policy", policy)
    assert rc == 0 and res["ok"]
    assert (back / "src.bin").read_bytes() == src.read_bytes()
    assert "Traceback" not in daemon.log()


async def test_upload_streams_learn_their_socket(daemon) -> None:
    """``StreamConnector`` hands each request's socket to the stream that made it: the
    upload governor's only view of the path (``TCP_INFO``)."""
    import aiohttp

    from transport.http import client as hc

    async with aiohttp.ClientSession(connector=hc.StreamConnector()) as http:
        slot: list[object] = []
        token = hc._STREAM_SOCKET.set(slot)  # noqa: SLF001 - what upload_stream sets
        try:
            async with http.get(daemon.url("/.fallback/v1/info", scheme="http")) as r:
                await r.read()
        finally:
            hc._STREAM_SOCKET.reset(token)  # noqa: SLF001
        assert len(slot) == 1
        info = read_tcp_info(slot[0])  # type: ignore[arg-type]
        assert info is not None and info.rtt > 0
        async with http.get(daemon.url("/.fallback/v1/info", scheme="http")) as r:
            await r.read()
        assert len(slot) == 1  # without a slot set, nothing is recorded
