"""The path manager with fake paths: signals, backoff with full jitter, giving up, stalls.

No sockets: each ``FakePath`` follows a script of outcomes, the ``FakeWork`` is a
counter of blocks to move, and time is a fake clock advanced by the manager's
own (injected) sleeps, so a minute of retries runs in milliseconds.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from fallback.client.manager import Backoff, PathManager
from fallback.client.paths import (
    ConnectFailed,
    HttpPath,
    PathDone,
    PathLost,
    PathProbe,
    PathSignal,
    PathStats,
    Stalled,
    Throttled,
    classify,
)
from transport.errors import ConnectError, ConnectionLost, PathError, RemoteError


class Clock:
    """Fake monotonic time; ``sleep`` advances it and yields to the loop."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, d: float) -> None:
        self.sleeps.append(d)
        self.now += d
        await asyncio.sleep(0)


@dataclass
class FakeWork:
    items: int
    moved: int = 0
    held: dict[str, int] = field(default_factory=dict)
    lost_paths: list[str] = field(default_factory=list)

    def pending(self) -> bool:
        return self.items > 0

    def progress(self) -> int:
        return self.moved

    def complete(self) -> bool:
        return self.items == 0 and not any(self.held.values())

    def lost(self, path: str) -> None:
        self.lost_paths.append(path)
        self.items += self.held.pop(path, 0)  # what it held goes back to the queue


class FakePath:
    """Outcomes, one per run: "done" (moves every item), "lose" (takes one, then the
    connection breaks), "refused" (cannot connect), "throttled", "hang" (holds work,
    moves nothing), or an exception to raise."""

    def __init__(self, id: str, work: FakeWork, clock: Clock, script: list[object]) -> None:
        self._id = id
        self.work = work
        self.clock = clock
        self.script = list(script)
        self.blocks = 0
        self.busy = False
        self.last = clock()
        self.closed: list[str | None] = []

    @property
    def id(self) -> str:
        return self._id

    @property
    def kind(self) -> str:
        return "fake"

    async def open(self) -> None:
        pass

    async def run(self) -> PathSignal:
        outcome = self.script.pop(0) if self.script else "done"
        if isinstance(outcome, Exception):
            raise outcome
        if outcome == "refused":
            return ConnectFailed(self._id, ConnectError("refused"))
        if outcome == "throttled":
            return Throttled(self._id, RemoteError("busy", peer_status=503), retry_after=3.0)
        if outcome == "lose":
            if self.work.items:
                self.work.items -= 1
                self.work.held[self._id] = self.work.held.get(self._id, 0) + 1
            await asyncio.sleep(0)
            return PathLost(self._id, ConnectionLost("stream lost"))
        if outcome == "hang":
            self.busy = True
            self.last = self.clock()
            await asyncio.Event().wait()
        while self.work.items:
            self.work.items -= 1
            self.work.moved += 1
            self.blocks += 1
            self.last = self.clock()
            await asyncio.sleep(0)
        return PathDone(self._id)

    async def probe(self) -> PathProbe:
        return PathProbe(alive=True)

    def stats(self) -> PathStats:
        return PathStats(self._id, "fake", self.blocks, self.blocks, 0, self.last, self.busy)

    async def close(self, error: str | None = None) -> None:
        self.busy = False
        self.closed.append(error)


def manager(paths: list[FakePath], clock: Clock, **kw: object) -> PathManager:
    return PathManager(paths, sleep=clock.sleep, clock=clock, rand=lambda: 0.5,
                       tick=0.25, **kw)  # type: ignore[arg-type]


def test_full_jitter_backoff_grows_exponentially_up_to_the_cap() -> None:
    b = Backoff(base=0.1, cap=2.0)
    assert [b.ceiling(a) for a in range(7)] == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert b.delay(3, 0.5) == pytest.approx(0.4)  # uniform(0, ceiling): u * ceiling
    assert b.delay(3, 0.0) == 0.0 and b.delay(100, 0.999) < 2.0
    assert b.delay(0, 0.5, floor=3.0) == 3.0  # a Retry-After is a floor
    with pytest.raises(ValueError):
        Backoff(base=0.0)


async def test_a_path_that_cannot_connect_is_retried_with_backoff_then_carries_the_work() -> None:
    clock, work = Clock(), FakeWork(items=5)
    p = FakePath("http-0", work, clock, ["refused", "refused", "refused", "done"])
    m = manager([p], clock)
    await m.run(work)
    assert [type(s) for s in m.signals] == [ConnectFailed] * 3 + [PathDone]
    assert work.moved == 5 and work.items == 0
    assert work.lost_paths == ["http-0"] * 3
    backoffs = [d for d in clock.sleeps if d != 0.25]  # the watchdog ticks at 0.25 s
    assert backoffs == pytest.approx([0.05, 0.1, 0.2])  # u=0.5 times 0.1, 0.2, 0.4
    assert m.kinds_used() == ["fake"]


async def test_work_a_lost_path_held_goes_to_the_other_paths() -> None:
    clock, work = Clock(), FakeWork(items=4)
    a = FakePath("http-0", work, clock, ["lose", "refused", "refused", "refused", "refused"])
    b = FakePath("http-1", work, clock, [])
    m = manager([a, b], clock)
    await m.run(work)
    assert work.moved == 4 and work.items == 0 and not work.held
    assert isinstance(m.signals[0], PathLost) and "http-0" in work.lost_paths
    assert b.blocks >= 1  # the block a held was sent by b (or by a once it came back)


async def test_every_path_down_without_progress_gives_up_with_the_last_error() -> None:
    clock, work = Clock(), FakeWork(items=3)
    paths = [FakePath(f"http-{k}", work, clock, ["refused"] * 1000) for k in range(2)]
    m = manager(paths, clock, give_up_after=10.0)
    with pytest.raises(ConnectError, match="refused"):
        await m.run(work)
    assert clock.now - 1000.0 >= 10.0  # not before the window
    assert clock.now - 1000.0 < 30.0  # nor long after it
    assert len(m.signals) > 4 and all(isinstance(s, ConnectFailed) for s in m.signals)


async def test_progress_on_one_path_keeps_a_failing_one_from_ending_the_phase() -> None:
    clock, work = Clock(), FakeWork(items=200)

    class Trickle(FakePath):
        async def run(self) -> PathSignal:  # one block per 2 s of (fake) time
            while self.work.items:
                self.work.items -= 1
                self.work.moved += 1
                self.blocks += 1
                self.last = self.clock()
                await self.clock.sleep(2.0)
            return PathDone(self._id)

    slow = Trickle("http-0", work, clock, [])
    broken = FakePath("http-1", work, clock, ["refused"] * 10_000)
    m = manager([slow, broken], clock, give_up_after=10.0)
    await m.run(work)  # 400 s of fake time, far beyond give_up_after: it did not give up
    assert work.moved == 200


async def test_a_fatal_error_ends_the_phase_at_once() -> None:
    clock, work = Clock(), FakeWork(items=1000)
    a = FakePath("http-0", work, clock, [PathError("user alice may not write")])
    b = FakePath("http-1", work, clock, ["hang"])
    m = manager([a, b], clock)
    with pytest.raises(PathError, match="may not write"):
        await m.run(work)
    assert set(clock.sleeps) <= {0.25} and len(clock.sleeps) < 20  # no backoff, no retry
    assert b.script == [] and len(m.signals) == 0


async def test_a_path_holding_work_without_moving_is_stalled_and_retried() -> None:
    clock, work = Clock(), FakeWork(items=3)
    p = FakePath("http-0", work, clock, ["hang", "done"])
    m = manager([p], clock, stall_timeout=20.0)
    await m.run(work)
    assert isinstance(m.signals[0], Stalled) and m.signals[0].idle > 20.0
    assert isinstance(m.signals[1], PathDone) and work.moved == 3
    assert "no data moved" in (p.closed[0] or "")


async def test_throttled_waits_at_least_retry_after() -> None:
    clock, work = Clock(), FakeWork(items=2)
    p = FakePath("http-0", work, clock, ["throttled", "done"])
    m = manager([p], clock)
    await m.run(work)
    assert 3.0 in clock.sleeps and work.moved == 2


async def test_a_path_throttled_again_and_again_rests_while_others_work() -> None:
    clock, work = Clock(), FakeWork(items=50)

    class Slow(FakePath):
        async def run(self) -> PathSignal:
            while self.work.items:
                self.work.items -= 1
                self.work.moved += 1
                self.blocks += 1
                self.last = self.clock()
                await self.clock.sleep(1.0)
            return PathDone(self._id)

    slow = Slow("http-0", work, clock, [])
    refused = FakePath("http-1", work, clock, ["throttled"] * 1000)
    m = manager([slow, refused], clock)
    await m.run(work)
    throttled = sum(isinstance(s, Throttled) for s in m.signals)
    assert 3 <= throttled <= 6, throttled  # it rested instead of retrying every few seconds
    assert work.moved == 50


def test_errors_are_classified_into_signals() -> None:
    assert isinstance(classify("p", ConnectError("refused")), ConnectFailed)
    assert isinstance(classify("p", ConnectionLost("reset")), PathLost)
    t = classify("p", RemoteError("too many", peer_status=429, retry_after=2.0))
    assert isinstance(t, Throttled) and t.retry_after == 2.0
    assert isinstance(classify("p", RemoteError("down", peer_status=503)), Throttled)
    assert classify("p", RemoteError("refused", peer_status=403)) is None  # ends the transfer
    assert classify("p", PathError("nope")) is None


async def test_http_path_turns_stream_errors_into_signals() -> None:
    outcomes: list[Exception | None] = [ConnectError("refused"), ConnectionLost("reset"),
                                        RemoteError("busy", peer_status=503), None]

    async def stream(path, moved):  # type: ignore[no-untyped-def]
        assert path == "https-0"
        exc = outcomes.pop(0)
        if exc is not None:
            raise exc
        moved(4096)
        return {}

    p = HttpPath("https-0", "https", stream)
    got = [type(await p.run()) for _ in range(4)]
    assert got == [ConnectFailed, PathLost, Throttled, PathDone]
    st = p.stats()
    assert (st.id, st.kind, st.bytes, st.blocks, st.runs, st.busy) == \
        ("https-0", "https", 4096, 1, 4, False)

    async def refused(path, moved):  # type: ignore[no-untyped-def]
        raise RemoteError("forbidden", peer_status=403)

    with pytest.raises(RemoteError):
        await HttpPath("https-1", "https", refused).run()
