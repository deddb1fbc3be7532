"""The path manager: which paths carry the session now, and what happens when one fails.

The manager runs a set of **lanes**, each driving one path (``fallback.client
.paths``) through ``open`` → ``run`` → signal, again and again, until the work
of the phase is done. It reacts to each signal:

* ``PathDone``: the path ran out of work. It starts again at once when the
  session has work for it (``Work.pending``, e.g. blocks another path gave
  back), else it waits until some appears or every lane is done.
* ``ConnectFailed``, ``PathLost``, ``Stalled``: whatever the path held is given
  back (``Work.lost``, the scheduler's ``drop_path``) for the other lanes, which
  are woken, and the lane tries again after an **exponential backoff with full
  jitter**: ``uniform(0, min(cap, base * 2**attempt))`` seconds (M. Brooker,
  "Exponential Backoff And Jitter", AWS Architecture Blog, 2015: of the schemes
  compared there, full jitter spreads retries of many clients best for the
  least total work). ``attempt`` counts failures since the lane last moved a
  block, so a path that works again retries fast the next time.
* ``Throttled``: the same, but waiting at least the daemon's ``Retry-After``.
* ``Stalled`` is the manager's own verdict: a lane that holds work and moved
  no byte for ``stall_timeout`` seconds has its run cancelled.

The phase **fails** when no block moved for ``give_up_after`` seconds while
every lane was down (backing off after a failure): the error is the last
failure's. While any lane works, or progress is made, it goes on; there is no
fixed count of retries. A path's ``run`` that raises (a refusal, an integrity
or protocol error) ends the phase at once with that error.

The manager never looks inside a path: HTTP streams now, the UDP path and
failover between paths later use the same lanes and signals.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from fallback.client.paths import (
    ConnectFailed,
    Path,
    PathDone,
    PathFailure,
    PathLost,
    PathSignal,
    Stalled,
    Throttled,
    classify,
)
from transport.errors import ConnectionLost, TransportError

log = logging.getLogger("fallback.client")

GIVE_UP_AFTER = 10.0
"""Seconds without progress, every lane down, after which a phase fails."""
STALL_TIMEOUT = 60.0
"""Seconds a lane may hold work without moving a byte before its run is cancelled."""
TICK = 0.25
"""Seconds between the watchdog's checks (progress, stalls, giving up)."""
RETIRE_AFTER = 3
"""Throttled this many times in a row while other lanes work: the lane rests."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter (AWS, Brooker 2015), in seconds.

    ``delay(attempt, u)`` with ``u`` uniform in [0, 1): ``u * min(cap, base *
    2**attempt)``; ``attempt`` 0 is the first retry. ``floor`` (a ``Retry-After``)
    is a minimum the jitter never goes below.
    """

    base: float = 0.1
    cap: float = 2.0

    def __post_init__(self) -> None:
        if not (self.base > 0 and self.cap >= self.base):
            raise ValueError("backoff needs 0 < base <= cap")

    def ceiling(self, attempt: int) -> float:
        return min(self.cap, self.base * (1 << min(attempt, 62)))

    def delay(self, attempt: int, u: float, floor: float = 0.0) -> float:
        return max(floor, u * self.ceiling(attempt))


class Work(Protocol):
    """What the lanes of one phase work on (the session's sender or receiver)."""

    def pending(self) -> bool:
        """There is work a lane that (re)starts now could take."""
        ...

    def progress(self) -> int:
        """A counter that grows whenever blocks move or are acknowledged."""
        ...

    def lost(self, path: str) -> None:
        """``path`` failed: give back everything it held (``Scheduler.drop_path``)."""
        ...

    def complete(self) -> bool:
        """Nothing is left for any path of this phase (a failed path need not retry).
        False when only the peer knows (a download's queue is the daemon's)."""
        ...


@dataclass(slots=True)
class _Lane:
    path: Path
    state: str = "idle"  # "running" | "down" (backing off) | "idle" (done for now)
    attempt: int = 0
    blocks_at_start: int = 0
    stalled: bool = False
    resting: bool = False  # throttled again and again: waits while other lanes work
    run: asyncio.Task[PathSignal] | None = None


class PathManager:
    """Runs ``paths`` (one lane each) over a ``Work`` until the phase is done.

    ``sleep``, ``clock`` and ``rand`` are injectable for tests (``asyncio.sleep``,
    ``time.monotonic``, ``random.random``). ``signals`` records every signal
    received, in order (for ``-v`` logs and tests).
    """

    def __init__(self, paths: Sequence[Path], *, backoff: Backoff | None = None,
                 give_up_after: float = GIVE_UP_AFTER, stall_timeout: float = STALL_TIMEOUT,
                 tick: float = TICK, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 clock: Callable[[], float] = time.monotonic,
                 rand: Callable[[], float] = random.random) -> None:
        if not paths:
            raise ValueError("a path manager needs at least one path")
        self.lanes = [_Lane(p) for p in paths]
        self.backoff = backoff or Backoff()
        self.give_up_after = give_up_after
        self.stall_timeout = stall_timeout
        self.tick = tick
        self._sleep = sleep
        self._clock = clock
        self._rand = rand
        self.signals: list[PathSignal] = []
        self._wake = asyncio.Event()
        self._finished = False
        self._last_failure: PathFailure | None = None
        self.down_since: float | None = None
        """``clock()`` when every lane was last seen down (None while any works): where a
        transfer's retries (``fallback.client.retry``) count an outage from."""

    @property
    def paths(self) -> list[Path]:
        return [lane.path for lane in self.lanes]

    def kinds_used(self) -> list[str]:
        """Kinds of the paths that moved at least one block, in lane order, once each."""
        out: list[str] = []
        for lane in self.lanes:
            st = lane.path.stats()
            if st.blocks and st.kind not in out:
                out.append(st.kind)
        return out

    async def run(self, work: Work) -> None:
        """Run every lane until all are done and ``work`` has nothing pending.

        Raises the last failure's error (``ConnectionLost`` and kin) when no
        progress was made for ``give_up_after`` seconds with every lane down;
        any error a path raises ends the phase with that error.
        """
        self._finished = False
        self._wake.clear()
        for lane in self.lanes:
            lane.state = "running"
        tasks = [asyncio.ensure_future(self._lane(lane, work)) for lane in self.lanes]
        watchdog = asyncio.ensure_future(self._watch(work))
        try:
            await asyncio.gather(*tasks, watchdog)
        finally:
            for t in [*tasks, watchdog]:
                t.cancel()
            await asyncio.gather(*tasks, watchdog, return_exceptions=True)
            for lane in self.lanes:
                if lane.run is not None and not lane.run.done():
                    lane.run.cancel()
                    await asyncio.gather(lane.run, return_exceptions=True)

    # -- lanes ------------------------------------------------------------------------
    async def _lane(self, lane: _Lane, work: Work) -> None:
        path = lane.path
        while not self._finished:
            lane.state = "running"
            lane.stalled = False
            lane.blocks_at_start = path.stats().blocks
            signal = await self._run_once(lane)
            self.signals.append(signal)
            moved = path.stats().blocks > lane.blocks_at_start
            if moved:
                lane.attempt = 0  # it worked for a while: the next failure retries fast
            if isinstance(signal, PathDone):
                lane.state = "idle"
                if work.pending():
                    if not moved:  # nothing taken although work is pending: do not spin
                        await self._sleep(self.tick)
                    continue
                if self._all_idle():
                    self._finish()
                    return
                await self._wait_wake()
                continue
            # a failure: hand its work to the others, then back off and try again
            lane.state = "down"
            self._last_failure = signal
            work.lost(path.id)
            await path.close(signal.error.message)
            self._poke()
            if isinstance(signal, Throttled) and lane.attempt >= RETIRE_AFTER \
                    and any(self._up(other) for other in self.lanes):
                # Refused again and again while other lanes work (e.g. ``streams_max``):
                # this lane rests until no other lane works.
                log.info("%s: %s; resting while other paths work", path.id, _describe(signal))
                lane.state, lane.resting = "idle", True
                while not self._finished and any(self._up(o) for o in self.lanes if o is not lane):
                    await self._sleep(self.tick)
                lane.resting = False
                if self._finished or (self._all_idle() and work.complete()):
                    self._finish()
                    return
                continue
            floor = (signal.retry_after or 0.0) if isinstance(signal, Throttled) else 0.0
            delay = self.backoff.delay(lane.attempt, self._rand(), floor)
            log.info("%s: %s; retry %d in %.2f s", path.id, _describe(signal),
                     lane.attempt + 1, delay)
            lane.attempt += 1
            await self._sleep(delay)
            if work.complete():  # the others finished the work meanwhile
                lane.state = "idle"
                if self._all_idle():
                    self._finish()
                    return
                await self._wait_wake()

    async def _run_once(self, lane: _Lane) -> PathSignal:
        path = lane.path
        try:
            await path.open()
        except TransportError as exc:
            failure = classify(path.id, exc)
            if failure is None:
                raise
            return failure
        lane.run = asyncio.ensure_future(path.run())
        try:
            await asyncio.wait({lane.run})
        finally:
            if not lane.run.done():  # the lane itself was cancelled
                lane.run.cancel()
        if lane.run.cancelled():
            if lane.stalled:
                return Stalled(path.id, self._clock() - path.stats().last_activity)
            raise asyncio.CancelledError
        return lane.run.result()  # re-raises a fatal error

    def _all_idle(self) -> bool:
        return all(lane.state == "idle" for lane in self.lanes)

    def _finish(self) -> None:
        self._finished = True
        self._wake.set()

    def _poke(self) -> None:
        """Wake idle lanes: work may have come back."""
        self._wake.set()

    async def _wait_wake(self) -> None:
        if self._finished:
            return
        self._wake.clear()
        await self._wake.wait()

    # -- watchdog ---------------------------------------------------------------------
    async def _watch(self, work: Work) -> None:
        last = work.progress()
        since = self._clock()
        self.down_since = None
        while not self._finished:
            await self._sleep(self.tick)
            now = self._clock()
            mark = work.progress()
            if mark != last:
                last, since = mark, now
            for lane in self.lanes:
                st = lane.path.stats()
                if lane.state == "running" and st.busy and lane.run is not None \
                        and not lane.run.done() and now - st.last_activity > self.stall_timeout:
                    lane.stalled = True
                    lane.run.cancel()
            if any(self._up(lane) for lane in self.lanes) \
                    or not any(lane.state in ("down", "running") for lane in self.lanes):
                self.down_since = None
            elif self.down_since is None:
                self.down_since = now
            if self.down_since is not None \
                    and now - max(since, self.down_since) > self.give_up_after:
                failure = self._last_failure
                err = failure.error if failure is not None else ConnectionLost("every path is down")
                log.info("giving up: no progress for %.0f s, every path down", now - since)
                raise err
            if work.pending() and any(lane.state == "idle" and not lane.resting
                                      for lane in self.lanes):
                self._poke()

    def _up(self, lane: _Lane) -> bool:
        """The lane works: running, and not a retry that has moved nothing yet."""
        return lane.state == "running" and (
            lane.attempt == 0 or lane.path.stats().blocks > lane.blocks_at_start)


def _describe(signal: PathFailure) -> str:
    if isinstance(signal, ConnectFailed):
        return f"cannot connect ({signal.error.message})"
    if isinstance(signal, Throttled):
        after = f", Retry-After {signal.retry_after:g} s" if signal.retry_after else ""
        return f"throttled ({signal.error.message}{after})"
    if isinstance(signal, PathLost):
        return f"lost ({signal.error.message})"
    return f"stalled for {signal.idle:.0f} s"
