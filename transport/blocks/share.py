"""How much of a shared bottleneck a session's TCP streams take: ``fair`` and ``low`` (sans-IO).

A session moves its blocks over several TCP streams (HTTP(S) paths). Four
streams are four TCP flows: beside one other TCP flow they take four fifths
of the link or more (measured: four BBR streams left a cubic flow 0.4 of 100
Mbit/s). The controllers here decide, from what the kernel measures on the
sender's own sockets (``TCP_INFO``: ``tcpi_rtt``, the smoothed RTT,
``tcpi_min_rtt``, ``tcpi_total_retrans``, ``tcpi_bytes_acked``), how many
streams may carry data now and how fast the session may send. The sender
applies that (``transport.http.governor``): streams beyond the count wait
between pieces, and the rate is each socket's ``SO_MAX_PACING_RATE``.

Signals: the **base RTT** is the smallest ``min_rtt`` any stream ever saw
(the path's propagation delay, RFC 6817 section 2.4.2's base delay, from an
RTT rather than a one-way delay); the **queueing delay** ``q`` of a tick is
the smallest smoothed RTT of the streams sampled, minus the base (a queue
delays every stream alike; the minimum ignores one stream's stale estimate).
An **overflow** is a tick with retransmissions while the RTT is in the upper
half of the queue seen over the last ``TOP_WINDOW`` seconds (a queue of at
least the low threshold): a drop-tail buffer overflowing, which a buffer-filling (loss-based) flow beside
us causes and which does not depend on knowing the base (a flow that starts
after a loss-based one only ever sees the base plus that flow's standing
queue; random loss strikes at any RTT, an overflow only at the top). The
**capacity** is the highest rate the session's streams delivered over one
second (``tcpi_bytes_acked``).

* ``fair`` (``FairShare``): one TCP flow's share under contention, every
  stream when the link is ours. Three states: **one** stream (one TCP flow:
  where it starts), **capped** (one stream paced at ``CONTENDED_SHARE`` of the
  capacity) and **all** streams. **Contention** (a queue above
  ``HIGH_FRACTION`` of the base RTT, at least ``Q_FLOOR``, for
  ``DECREASE_HOLD``, at least ``DECREASE_RTTS`` RTTs; or ``OVERFLOWS``
  overflows) caps: the flow beside us gets room to grow even when its sender
  backs off harder than ours (BBR beside cubic, Cardwell et al., "BBR", ACM
  Queue 14(5), 2016). **A quiet link** (a queue below ``LOW_FRACTION`` of the
  base RTT and no overflow for ``INCREASE_HOLD``, at least ``INCREASE_RTTS``
  base RTTs, doubled each time contention follows a step up within
  ``BACKOFF_WITHIN``, up to ``MAX_BACKOFF`` times: a loss-based flow that
  backed off is coming back) steps up: capped to one, one to all. Streams woken together are
  paced at the capacity, in all, for ``SETTLE`` (their sockets' old estimates
  would otherwise overshoot at once); a step's own queue and the session's
  start (BBR's startup) do not count as contention for that long. One flow
  alone keeps a queue of about a quarter of the base RTT (BBR's probing gain
  is 1.25); a loss-based flow beside us keeps the buffer filled and the queue
  above that (Copa, Arun and Balakrishnan, NSDI 2018, section 2.3, tests for
  a buffer-filling competitor the same way: a queue that never drains).
* ``low`` (``LowShare``): only spare capacity: one stream, paced at a rate
  set like LEDBAT (RFC 6817 section 2.4.2) per RTT of samples: ``off =
  (target - q) / target`` clamped to [-1, 1]; the rate grows by ``UP_GAIN *
  off`` and shrinks by ``DOWN_GAIN * off`` of itself per RTT (slower up than
  down, as LEDBAT++, draft-irtf-iccrg-ledbat-plus-plus section 4, so it
  yields within a few RTTs), halves on retransmissions at most once per RTT
  (RFC 6817 section 2.4.2), never goes above twice the delivery rate the
  kernel measured (it would only be a number) nor below ``min_rate`` or
  ``LowShare.FLOOR`` (1 Mbit/s: a stream must deliver a 4 MiB block before its
  client's stall timeout; LEDBAT keeps a floor too, 2 segments per RTT). The
  target is LEDBAT++'s 60 ms, or half the base RTT when that is smaller: a
  queue beyond what one paced flow keeps alone means another flow is there.

Units: seconds, bits per second, bytes; ``now`` from a monotonic clock passed in.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

__all__ = ["FairShare", "LowShare", "ShareController", "TcpSample", "share_controller"]

Q_FLOOR = 0.005
"""Seconds: queueing delay below this never counts as contention (timer and
loopback noise, a 10 ms link's own probing)."""


@dataclass(frozen=True, slots=True)
class TcpSample:
    """One stream's socket as the kernel sees it (``TCP_INFO``), in seconds and bits/s.

    ``rtt``: smoothed RTT (``tcpi_rtt``); ``min_rtt``: the smallest RTT of the
    connection (``tcpi_min_rtt``); ``retrans``: total retransmitted segments
    (``tcpi_total_retrans``, a counter); ``delivery_rate``: the kernel's last
    delivery-rate sample (``tcpi_delivery_rate``, bits/s); ``acked``: bytes
    the peer acknowledged (``tcpi_bytes_acked``, a counter).
    """

    rtt: float
    min_rtt: float
    retrans: int = 0
    delivery_rate: float = 0.0
    acked: int = 0


class ShareController:
    """Base: the streams allowed (``streams``) and the session's rate (``rate_bps``).

    ``on_tick(now, samples)`` feeds one round of samples, one per stream that
    carried data since the last tick (``samples`` keyed by stream id). This class
    keeps the base RTT, the queueing delay, overflows and the capacity;
    subclasses decide (``_decide``).
    """

    name = "share"
    TOP_WINDOW = 10.0  # seconds of RTTs an overflow is judged against
    RATE_WINDOW = 1.0  # seconds over which the delivered rate is measured

    def __init__(self, max_streams: int, *, target_rate_bps: float = math.inf,
                 min_rate_bps: float = 0.0) -> None:
        if max_streams < 1:
            raise ValueError("max_streams must be at least 1")
        if not target_rate_bps > 0 or not 0 <= min_rate_bps <= target_rate_bps:
            raise ValueError(f"rates out of order: min {min_rate_bps}, target {target_rate_bps}")
        self.max_streams = max_streams
        self.target_rate_bps = float(target_rate_bps)
        self.min_rate_bps = float(min_rate_bps)
        self.streams = max_streams
        self.all_streams = True  # ``streams`` follows ``max_streams`` (set_max_streams)
        self.base_rtt: float | None = None
        self.queue_delay: float | None = None  # of the last tick
        self.rtt: float | None = None  # smallest smoothed RTT of the last tick
        self.retransmitted = 0  # segments retransmitted during the last tick
        self.overflow = False  # the last tick saw an overflow
        self.capacity_bps = 0.0  # the highest delivered rate over RATE_WINDOW
        self.changes = 0  # decisions that changed ``streams`` or ``rate_bps``
        self._counters: dict[str, tuple[int, int]] = {}  # path -> (retrans, acked)
        self._tops: deque[tuple[float, float]] = deque()  # (time, rtt), RTTs decreasing
        self._window: tuple[float, int] | None = None  # (start, bytes acked since)
        self._now = 0.0

    @property
    def rate_bps(self) -> float:
        """The session's pacing rate (bits/s, ``math.inf``: no pacing of ours)."""
        return self.target_rate_bps

    def set_max_streams(self, n: int) -> None:
        """The streams open now (``n`` >= 1): when the controller allowed all of them, it
        allows all of these; else its count stays, within ``n``."""
        n = max(1, n)
        self.streams = n if self.all_streams else min(self.streams, n)
        self.max_streams = n

    def low_threshold(self) -> float:
        return max(Q_FLOOR / 2, 0.25 * (self.base_rtt or 0.0))

    def on_tick(self, now: float, samples: dict[str, TcpSample]) -> None:
        good = {p: s for p, s in samples.items() if s.rtt > 0}
        if not good:
            return
        low = min(s.min_rtt if s.min_rtt > 0 else s.rtt for s in good.values())
        self.base_rtt = low if self.base_rtt is None else min(self.base_rtt, low)
        self.rtt = min(s.rtt for s in good.values())
        self.queue_delay = max(0.0, self.rtt - self.base_rtt)
        retrans = acked = 0
        for path, smp in good.items():
            r0, a0 = self._counters.get(path, (smp.retrans, smp.acked))
            retrans += max(0, smp.retrans - r0)
            acked += max(0, smp.acked - a0)
            self._counters[path] = (smp.retrans, smp.acked)
        self.retransmitted = retrans
        tops = self._tops  # a monotonic deque: the highest RTT of the last TOP_WINDOW
        while tops and tops[-1][1] <= self.rtt:
            tops.pop()
        tops.append((now, self.rtt))
        while tops[0][0] < now - self.TOP_WINDOW:
            tops.popleft()
        top = tops[0][1]
        queue = top - self.base_rtt  # the highest queue lately: an overflow is near it
        self.overflow = retrans > 0 and queue >= self.low_threshold() \
            and self.rtt >= top - queue / 2
        if self._window is None:
            self._window = (now, 0)
        else:
            start, nbytes = self._window
            nbytes += acked
            if now - start >= self.RATE_WINDOW:
                self.capacity_bps = max(self.capacity_bps, nbytes * 8.0 / (now - start))
                self._window = (now, 0)
            else:
                self._window = (start, nbytes)
        self._decide(now, list(good.values()))

    def forget(self, path: str) -> None:
        """A stream ended: its counters go (a new stream of that id starts afresh)."""
        self._counters.pop(path, None)

    def _decide(self, now: float, samples: list[TcpSample]) -> None:
        raise NotImplementedError


class FairShare(ShareController):
    """``fair``: one capped stream, one stream, or every stream (module docstring)."""

    name = "fair"
    HIGH_FRACTION = 0.5
    LOW_FRACTION = 0.25
    CONTENDED_SHARE = 0.5  # of the capacity, while capped
    INCREASE_HOLD = 2.0  # seconds of a quiet link before a step up
    INCREASE_RTTS = 16  # ... and at least this many base RTTs
    DECREASE_HOLD = 1.0  # seconds of a standing queue before a step down
    DECREASE_RTTS = 8  # ... and at least this many RTTs (BBR's startup queue drains sooner)
    SETTLE = 2.0  # seconds after a step (or the start): its own queue and overflows do not
    SETTLE_RTTS = 20  # count, and streams woken together are paced evenly; at least 20 RTTs
    OVERFLOWS = 2  # overflows, at least OVERFLOW_GAP apart within TOP_WINDOW, are contention
    OVERFLOW_GAP = 1.0
    BACKOFF_WITHIN = 10.0  # seconds: contention this soon after a step up doubles the hold
    MAX_BACKOFF = 8  # the hold grows to at most 8 x (16 s at the 2 s hold)

    def __init__(self, max_streams: int, *, target_rate_bps: float = math.inf,
                 min_rate_bps: float = 0.0) -> None:
        super().__init__(max_streams, target_rate_bps=target_rate_bps, min_rate_bps=min_rate_bps)
        self.streams = 1  # one TCP flow until the link shows it is ours
        self.all_streams = max_streams == 1
        self.capped = False
        self._over_since: float | None = None
        self._quiet_since: float | None = None
        self._last_change: float | None = None
        self._overflows: deque[float] = deque()
        self._last_up: float | None = None
        self.backoff = 1  # the hold before a step up, in multiples of INCREASE_HOLD

    @property
    def rate_bps(self) -> float:
        if self.capacity_bps <= 0:
            return self.target_rate_bps
        if self.capped:
            rate = self.CONTENDED_SHARE * self.capacity_bps
        elif self.all_streams and self._settling:
            rate = self.capacity_bps  # streams woken together start at one link's worth
        else:
            return self.target_rate_bps
        return max(self.min_rate_bps, min(self.target_rate_bps, rate))

    @property
    def _settling(self) -> bool:
        settle = max(self.SETTLE, self.SETTLE_RTTS * (self.base_rtt or 0.0))
        return self._last_change is not None and self._now - self._last_change < settle

    def thresholds(self) -> tuple[float, float]:
        """(low, high) queueing delays in seconds for the current base RTT."""
        base = self.base_rtt or 0.0
        return (max(Q_FLOOR / 2, self.LOW_FRACTION * base),
                max(Q_FLOOR, self.HIGH_FRACTION * base))

    def _decide(self, now: float, samples: list[TcpSample]) -> None:
        assert self.queue_delay is not None and self.rtt is not None and self.base_rtt is not None
        self._now = now
        if self._last_change is None:
            self._last_change = now  # the session's start settles like a step
        low, high = self.thresholds()
        q = self.queue_delay
        ovf = self._overflows
        if self.overflow and not self._settling and (not ovf or now - ovf[-1] >= self.OVERFLOW_GAP):
            ovf.append(now)
        while ovf and ovf[0] < now - self.TOP_WINDOW:
            ovf.popleft()
        if q > high:
            self._quiet_since = None
            if self._over_since is None:
                self._over_since = now
        elif q < low and not ovf:
            self._over_since = None
            if self._quiet_since is None:
                self._quiet_since = now
        else:
            self._over_since = self._quiet_since = None
        standing = self._over_since is not None and not self._settling \
            and now - self._over_since >= max(self.DECREASE_HOLD, self.DECREASE_RTTS * self.rtt)
        hold = max(self.INCREASE_HOLD, self.INCREASE_RTTS * self.base_rtt)
        if (standing or len(ovf) >= self.OVERFLOWS) and not self.capped \
                and self.capacity_bps > 0:
            # Contention soon after a step up: the competitor had only paused (a loss-based
            # flow backing off); wait twice as long before the next step up.
            recent = self._last_up is not None and now - self._last_up < self.BACKOFF_WITHIN
            self.backoff = min(self.MAX_BACKOFF, self.backoff * 2) if recent else 1
            self.streams, self.all_streams, self.capped = 1, False, True
            self._changed(now)
            return
        hold *= self.backoff
        if self._quiet_since is not None and now - self._quiet_since >= hold \
                and now - self._last_change >= hold:
            if self.capped:
                self.capped = False
            elif not self.all_streams:
                self.streams, self.all_streams = self.max_streams, True
            else:
                return
            self._last_up = now
            self._changed(now)

    def _changed(self, now: float) -> None:
        self._last_change = now
        self._over_since = self._quiet_since = None
        self._overflows.clear()
        self.changes += 1


class LowShare(ShareController):
    """``low``: one stream at a LEDBAT-style rate (see the module docstring)."""

    name = "low"
    TARGET = 0.060  # LEDBAT++ section 4.1
    TARGET_FRACTION = 0.5  # of the base RTT, when smaller than TARGET
    UP_GAIN = 0.25  # at most +25 % per RTT (empty queue)
    DOWN_GAIN = 1.0  # -50 % per RTT at a queue of 1.5 x target, at most -50 % per tick
    START_RATE = 2e6  # bits/s: a first guess, within [min_rate, target_rate]
    FLOOR = 1e6  # bits/s: a 4 MiB block within 34 s, inside the client's 60 s stall timeout

    def __init__(self, max_streams: int, *, target_rate_bps: float = math.inf,
                 min_rate_bps: float = 0.0) -> None:
        super().__init__(max_streams, target_rate_bps=target_rate_bps, min_rate_bps=min_rate_bps)
        self.streams = 1
        self._rate = self._clamp(self.START_RATE)
        self._last: float | None = None
        self._last_cut = -math.inf

    @property
    def rate_bps(self) -> float:
        return self._rate

    def set_max_streams(self, n: int) -> None:
        self.max_streams = max(1, n)  # always one stream
        self.all_streams = False

    def target(self) -> float:
        """The queueing delay (seconds) this flow tolerates for the current base RTT."""
        base = self.base_rtt if self.base_rtt is not None else math.inf
        return max(Q_FLOOR, min(self.TARGET, self.TARGET_FRACTION * base))

    def _clamp(self, rate: float) -> float:
        floor = max(self.min_rate_bps, min(self.FLOOR, self.target_rate_bps))
        return max(floor, min(self.target_rate_bps, rate))

    def _decide(self, now: float, samples: list[TcpSample]) -> None:
        assert self.queue_delay is not None and self.rtt is not None
        dt = 0.0 if self._last is None else max(0.0, now - self._last)
        self._last = now
        lost = self.retransmitted > 0
        before = self._rate
        if lost:
            if now - self._last_cut >= self.rtt:
                self._last_cut = now
                self._rate = self._clamp(self._rate / 2)
        elif dt > 0:
            target = self.target()
            off = max(-1.0, min(1.0, (target - self.queue_delay) / target))
            step = (self.UP_GAIN if off > 0 else self.DOWN_GAIN) * off * min(1.0, dt / self.rtt)
            rate = self._rate * max(0.5, 1.0 + step)
            delivered = max(s.delivery_rate for s in samples)
            if off > 0 and delivered > 0:  # growing past what arrives is only a number
                rate = min(rate, max(before, 2.0 * delivered))
            self._rate = self._clamp(rate)
        if self._rate != before:
            self.changes += 1


def share_controller(policy: str, max_streams: int, *, target_rate_bps: float = math.inf,
                     min_rate_bps: float = 0.0) -> ShareController | None:
    """The controller for an Aspera policy name: ``fair`` and ``low`` adapt; ``fixed`` and
    ``high`` have none (None: every stream, at the target rate, as TCP takes it).
    ``ValueError`` for an unknown name."""
    if policy in ("fixed", "high"):
        return None
    cls = {"fair": FairShare, "low": LowShare}.get(policy)
    if cls is None:
        raise ValueError(f"unknown policy {policy!r} (known: fair, fixed, high, low)")
    return cls(max_streams, target_rate_bps=target_rate_bps, min_rate_bps=min_rate_bps)
