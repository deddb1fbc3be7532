"""Rate control: a registry of small controller classes, separate from reliability.

A controller sees one ``RateSample`` per FEEDBACK and exposes ``rate`` (bytes/s of
datagrams, headers included); ``Pacer`` spends it as a token bucket. Aspera's policy
names map to controllers (``controller_for``):

* ``fixed`` -> ``FixedRate``: the target rate regardless of congestion or loss.
* ``fair`` -> ``DelayRate`` (weight 1): delay-based in FASP's spirit. Random loss is
  not a signal; the signal is *queueing delay*, one-way delay minus its minimum over a
  window. The steady-state law is FAST TCP's (Wei, Jin, Low, Hegde, "FAST TCP:
  motivation, architecture, algorithms, performance", IEEE/ACM ToN 14(6), 2006),
  ``w' = w * base/RTT + alpha``, written for a rate and driven by the *delivered*
  rate ``d`` the receiver reports (corrected for loss): ``rate -> (d * base + alpha) /
  (base + q)``, half way per RTT. Its fixed point keeps ``alpha`` bytes of each flow
  in the bottleneck queue (``d * q = alpha``): flows with equal ``alpha`` get equal
  shares whatever their RTT, and the queue holds ``sum(alpha) / capacity`` seconds.
  Steering by the delivered rate rather than by our own bounds any overshoot (a rate
  loop alone, without TCP's self-clocking window, oscillated between an empty and a
  full queue in the simulator). Start-up doubles per RTT (TCP slow start, BBR's
  STARTUP) until queueing delay appears; while the queue is empty (link not full) the
  target is 25 % above the best delivered rate of the recent window (BBR's probing
  gain over its max-filtered bottleneck bandwidth) instead of FAST's slow additive
  term, and the rate is not cut (the path carried all of it: a shortfall in delivery is
  the sending host's, e.g. late event-loop wake-ups); every ``DRAIN_INTERVAL`` seconds without an empty queue the flow
  sends at a quarter rate for one RTT so a latecomer re-measures its base delay (the
  latecomer advantage, RFC 6817 section 4.4; BBR's PROBE_RTT does the same).
* ``high`` -> ``DelayRate`` (weight 2): ``alpha`` doubled, so about twice a fair flow.
* ``low`` -> ``LedbatRate``: LEDBAT (RFC 6817) in rate form: a small delay target
  (default 2 ms, below the queue a fair flow keeps), linear-in-off-target growth and
  decrease, so it uses spare capacity only and yields to ``fair``/``fixed``/TCP flows.
* ``reno`` -> ``RenoRate``: loss-based AIMD (RFC 5681 in rate form), for comparison only:
  it collapses under random loss exactly as TCP Reno does.

One-way delay needs no synchronised clocks: the receiver reports ``receive time -
send time`` with an unknown constant offset; only differences (``q``) are used. The
base is the minimum over ``BASE_HISTORY`` buckets of ``BASE_BUCKET`` seconds (RFC 6817
section 4.1's base-delay history, shortened to bound clock-skew drift); the current
delay is the minimum of the last 4 interval minima (RFC 6817 ``CURRENT_FILTER``) and
of every sample of the last 10 ms. Control steps use an RTT of at least ``MIN_TAU``
(10 ms): on loopback (0.1 ms) the raw law swung the rate tenfold on scheduling noise.

Host noise. On a loaded host the delay signal and the sending both suffer from the
event loops' late wake-ups; three guards keep that from throttling the flow: the
receiver measures one-way delay to the kernel's receive timestamp (``UdpConnection.
receive_datagram``'s ``rx_time``, up to ``host_lag_allowance``), the empty-queue probe
steers by the windowed best delivery and never cuts, and the ``Pacer`` keeps the tokens
of a late wake-up. Without them a loaded 2-vCPU loopback moved 11-23 MB/s where the
same load let a ``fixed`` flow move 44-131 MB/s (bench/README.md).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import ClassVar

__all__ = ["RateConfig", "RateSample", "RateController", "FixedRate", "DelayRate",
           "LedbatRate", "RenoRate", "CONTROLLERS", "POLICIES", "controller_for", "Pacer",
           "DelayTracker", "DeliveryTracker", "RatePolicer"]

MIN_TAU = 0.010          # control interval floor (s): loopback RTTs are too short to steer by
Q_DETECT = 0.0005        # queueing delay (s) below which the link is taken as not full
BASE_BUCKET = 6.0        # seconds per base-delay bucket
BASE_HISTORY = 10        # buckets kept (one minute)
CURRENT_FILTER = 4       # RFC 6817 section 3.4.2
CURRENT_WINDOW = 0.010   # ... and at least this many seconds of samples
DRAIN_INTERVAL = 4.0     # seconds of standing queue before a delay-based flow drains


@dataclass(frozen=True, slots=True)
class RateConfig:
    """Flow options, Aspera's meanings. Rates in bits/s (``target_rate`` None: no cap)."""

    policy: str = "fair"
    target_rate: float | None = None
    min_rate: float = 0.0
    initial_rate: float = 10e6
    alpha: int = 64 * 1024          # bytes a fair flow keeps queued at the bottleneck
    gamma: float = 1.0              # FAST TCP's step (0 < gamma <= 1)
    low_target_delay: float = 0.002  # LEDBAT TARGET for ``low`` (s)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES and self.policy not in CONTROLLERS:
            raise ValueError(f"unknown rate policy {self.policy!r}")
        if self.min_rate < 0 or self.initial_rate <= 0:
            raise ValueError("rates must be positive")
        if self.target_rate is not None and self.target_rate < max(self.min_rate, 1.0):
            raise ValueError("target_rate below min_rate")
        if self.policy == "fixed" and self.target_rate is None:
            raise ValueError("policy fixed needs a target_rate")


@dataclass(frozen=True, slots=True)
class RateSample:
    """What one FEEDBACK tells the controller. Times in seconds, rates in bytes/s."""

    now: float
    interval: float              # since the previous sample
    queue_delay: float           # current one-way delay minus base (>= 0)
    delivery_rate: float         # receiver's receive rate over about one RTT (0: unknown)
    delivery_max: float          # max delivery rate over the recent window
    min_rtt: float
    srtt: float
    acked_bytes: int
    lost_bytes: int
    loss_rate: float             # fraction of packets lost recently (0..1)
    app_limited: bool


class RateController:
    """Base: holds ``rate`` (bytes/s) within ``[min_rate, target_rate]``."""

    name: ClassVar[str] = ""

    def __init__(self, config: RateConfig, mss: int) -> None:
        self.config = config
        self.mss = mss
        self.min = config.min_rate / 8
        self.max = config.target_rate / 8 if config.target_rate is not None else float("inf")
        self.rate = self.clamp(config.initial_rate / 8)
        self.state = "start"

    def set_limits(self, target_rate: float | None, min_rate: float) -> None:
        """Change the cap and floor (bits/s) mid-transfer (Aspera users ask for it: the
        ascp issue tracker's #229); ``ValueError`` when the floor exceeds the cap."""
        if min_rate < 0 or (target_rate is not None and target_rate < min_rate):
            raise ValueError("min_rate must be >= 0 and <= target_rate")
        self.min = min_rate / 8
        self.max = target_rate / 8 if target_rate is not None else float("inf")
        self.rate = self.clamp(self.rate)

    def clamp(self, rate: float) -> float:
        return min(self.max, max(self.min, rate, 2.0 * self.mss))

    def on_feedback(self, s: RateSample) -> None:
        """Update ``rate`` from one feedback sample."""

    def on_silence(self) -> None:
        """The path went silent: start again gently when it returns."""
        self.rate = self.clamp(self.rate / 2)


CONTROLLERS: dict[str, type[RateController]] = {}


def register(cls: type[RateController]) -> type[RateController]:
    CONTROLLERS[cls.name] = cls
    return cls


@register
class FixedRate(RateController):
    """Aspera ``fixed``: always the target rate (needs ``target_rate``)."""

    name = "fixed"

    def __init__(self, config: RateConfig, mss: int) -> None:
        super().__init__(config, mss)
        self.rate = self.max if self.max != float("inf") else self.rate
        self.state = "fixed"

    def on_silence(self) -> None:
        pass

    def set_limits(self, target_rate: float | None, min_rate: float) -> None:
        if target_rate is None:
            raise ValueError("policy fixed needs a target_rate")
        super().set_limits(target_rate, min_rate)
        self.rate = self.max


@register
class DelayRate(RateController):
    """FAST-TCP-style delay-based control (``fair``, and ``high`` with ``weight`` 2)."""

    name = "delay"
    weight: float = 1.0

    def __init__(self, config: RateConfig, mss: int, weight: float = 1.0) -> None:
        super().__init__(config, mss)
        self.weight = weight
        self.alpha = config.alpha * weight
        self.state = "startup"
        self._base_seen = 0.0      # last time the queue was seen empty (base confirmed)
        self._drain_until = 0.0
        self._saved_rate = 0.0

    def on_feedback(self, s: RateSample) -> None:
        q = s.queue_delay
        base = s.min_rtt if s.min_rtt < float("inf") else 0.1
        tau = max(base + q, MIN_TAU)
        step = min(s.interval / tau, 1.0)
        if q < Q_DETECT:
            self._base_seen = s.now
        if self.state == "drain":
            if s.now < self._drain_until:
                return
            self.state = "steady"
            self.rate = self._saved_rate
            self._base_seen = s.now
        elif (self.state == "steady" and not s.app_limited
              and s.now - self._base_seen > max(DRAIN_INTERVAL, 30 * tau)):
            # A flow that joined a standing queue takes it for base delay and gets
            # more than its share (FAST's and LEDBAT's latecomer problem, RFC 6817
            # section 4.4). Every few seconds without an empty queue, send at a
            # quarter rate for one RTT so the queue drains and the base is measured
            # again (BBR's PROBE_RTT does the same): about 0.75 RTT of sending lost
            # per DRAIN_INTERVAL, only while the queue never empties by itself.
            self.state = "drain"
            self._saved_rate = self.rate
            self._drain_until = s.now + tau
            self.rate = self.clamp(0.25 * self.rate)
            return
        r = self.rate
        d = s.delivery_rate / (1.0 - min(s.loss_rate, 0.5))  # what the path carried
        if self.state == "startup":
            # Leave when the queue holds about half this flow's alpha (or 2 ms).
            if q > max(4 * Q_DETECT, 0.5 * self.alpha / max(r, 1.0)):
                self.state = "steady"
                if d > 0:
                    r = min(r, d)
            elif not s.app_limited:
                r *= 2.0 ** step
                if d > 0:
                    r = min(r, 2.5 * d)
        elif d > 0:
            # FAST's window law w' = w * base/RTT + alpha with w the delivered window
            # d * RTT, as a rate: d * base/RTT + alpha/RTT. Its fixed point keeps
            # d * q = alpha whatever ``base`` is, so ``base`` is floored at MIN_TAU:
            # on loopback (base 0.1 ms) the raw law would swing the rate tenfold on a
            # millisecond of scheduling noise. An empty queue means spare capacity:
            # probe 25 % above what was delivered (BBR's pacing gain), which bounds any
            # overshoot to a quarter of the rate for one feedback delay.
            base = max(base, MIN_TAU)
            target = (d * base + self.alpha) / (base + q)
            if q < Q_DETECT:
                # No queue: the path carried all we sent, so a delivered rate below
                # ours says the *sender* fell short (a loaded host's late wake-ups
                # leave pacer tokens unspent), not the path. Probing from ``d`` alone
                # then ratchets down: with d = e * rate and e < 0.8 the rate sinks to
                # alpha / (MIN_TAU * (1 - e)), 20 MB/s on loopback at load 10. Probe
                # from the best delivery of the recent window (BBR's BtlBw max
                # filter) and do not cut on an empty queue, within 2 x that best.
                dmax = max(d, s.delivery_max / (1.0 - min(s.loss_rate, 0.5)))
                target = max(target, 1.25 * dmax, min(r, 2.0 * dmax))
            if target > r and s.app_limited:
                target = r
            r += step * self.config.gamma * (target - r)
        self.rate = self.clamp(r)

    def on_silence(self) -> None:
        super().on_silence()
        self.state = "steady"


@register
class LedbatRate(RateController):
    """RFC 6817 LEDBAT in rate form (``low``): aims at ``delivered * (1 + G * off_target)``.

    ``off_target = (TARGET - q) / TARGET`` clipped to ``[-2, 1]`` with ``G`` 0.25: at
    most 25 % above the delivered rate on an empty queue, 50 % below it when the queue
    is three times the target; the rate moves half way there per RTT. Loss is ignored (RFC 6817 halves on loss; random loss is not
    congestion here, and a queue that overflows shows as delay first).
    """

    name = "ledbat"

    def __init__(self, config: RateConfig, mss: int) -> None:
        super().__init__(config, mss)
        self.target = config.low_target_delay
        self.state = "low"

    def on_feedback(self, s: RateSample) -> None:
        q = s.queue_delay
        base = s.min_rtt if s.min_rtt < float("inf") else 0.1
        step = min(s.interval / max(base + q, MIN_TAU), 1.0)
        off = max(-2.0, min(1.0, (self.target - q) / self.target))
        d = s.delivery_rate / (1.0 - min(s.loss_rate, 0.5))
        if d <= 0:
            return
        target = d * (1.0 + 0.25 * off)   # up to +25 % over delivery, down to -50 %
        if target > self.rate and s.app_limited:
            return
        self.rate = self.clamp(self.rate + step * 0.5 * (target - self.rate))


@register
class RenoRate(RateController):
    """Loss-based AIMD (RFC 5681 in rate form): halve once per RTT with loss, else +1 MSS/RTT.

    Only for comparison in tests: under random loss its rate falls to about
    ``1.22 * mss / (rtt * sqrt(p))`` (Mathis et al., CCR 27(3), 1997).
    """

    name = "reno"

    def __init__(self, config: RateConfig, mss: int) -> None:
        super().__init__(config, mss)
        self.slow_start = True
        self.last_cut = -1.0

    def on_feedback(self, s: RateSample) -> None:
        tau = max(s.srtt, MIN_TAU)
        step = min(s.interval / tau, 1.0)
        r = self.rate
        if s.lost_bytes > 0:
            if s.now - self.last_cut > tau:
                r /= 2
                self.last_cut = s.now
            self.slow_start = False
        elif not s.app_limited:
            r = r * 2.0 ** step if self.slow_start else r + step * self.mss / tau
        self.rate = self.clamp(r)


POLICIES = ("fixed", "fair", "high", "low")


def controller_for(config: RateConfig, mss: int) -> RateController:
    """The controller of ``config.policy`` (an Aspera policy or a registry name)."""
    p = config.policy
    if p == "fixed":
        return FixedRate(config, mss)
    if p in ("fair", "high"):
        return DelayRate(config, mss, weight=2.0 if p == "high" else 1.0)
    if p == "low":
        return LedbatRate(config, mss)
    return CONTROLLERS[p](config, mss)


class DelayTracker:
    """Queueing delay from one-way-delay samples (RFC 6817 sections 3.4.2 and 4.1).

    ``update(now, owd_us)`` takes the minimum one-way delay of one feedback interval in
    microseconds (any constant offset) and returns the queueing delay in seconds: the
    current delay (minimum of the last ``CURRENT_FILTER`` samples, and of all samples
    of the last ``CURRENT_WINDOW`` seconds: a scheduler's hiccup on a busy host lasts
    a few milliseconds and must not read as a queue) minus the base.

    A bucket's base is its *second* lowest sample (its only one while it has one): a
    single sample too low (a receive timestamp read across a preemption, bench/README.md
    "UDP over the emulated links") would otherwise stand as the base for a minute and
    every later sample read as milliseconds of queue, which FAST's law (``d * q =
    alpha``) turns into a rate cut: 2-12 ms of such offset held a 100 Mbit/s path at
    15-50 Mbit/s. A real drop of the path's delay shows in every sample after it.
    """

    __slots__ = ("_buckets", "_bucket_start", "_current")

    def __init__(self) -> None:
        self._buckets: deque[list[int]] = deque()  # [lowest, second lowest, samples]
        self._bucket_start = -1.0
        self._current: deque[tuple[float, int]] = deque()

    def update(self, now: float, owd_us: int) -> float:
        if self._bucket_start < 0 or now - self._bucket_start >= BASE_BUCKET:
            self._buckets.append([owd_us, owd_us, 1])
            self._bucket_start = now
            while len(self._buckets) > BASE_HISTORY:
                self._buckets.popleft()
        else:
            b = self._buckets[-1]
            if b[2] == 1:
                b[0], b[1] = min(b[0], owd_us), max(b[0], owd_us)
            elif owd_us < b[0]:
                b[0], b[1] = owd_us, b[0]
            elif owd_us < b[1]:
                b[1] = owd_us
            b[2] += 1
        cur = self._current
        cur.append((now, owd_us))
        while len(cur) > CURRENT_FILTER and now - cur[0][0] > CURRENT_WINDOW:
            cur.popleft()
        base = min(b[1] for b in self._buckets)
        return max(0, min(d for _, d in cur) - base) / 1e6

    def reset_current(self) -> None:
        self._current.clear()


class DeliveryTracker:
    """Receive rate from the receiver's cumulative ``(recv_time_us, recv_bytes)`` reports."""

    __slots__ = ("_points", "_max")

    def __init__(self) -> None:
        self._points: deque[tuple[int, int]] = deque()
        self._max: deque[tuple[float, float]] = deque()  # (now, rate), decreasing rates

    def update(self, now: float, recv_time_us: int, recv_bytes: int,
               window: float) -> tuple[float, float]:
        """``(rate over about window seconds, max rate over 10 windows)``, bytes/s."""
        pts = self._points
        if pts and (recv_time_us <= pts[-1][0] or recv_bytes < pts[-1][1]):
            if recv_time_us < pts[-1][0]:
                pts.clear()  # receiver restarted its clock: start over
            else:
                return self.current(), self.maximum(now, window)
        pts.append((recv_time_us, recv_bytes))
        span = int(window * 1e6)
        while len(pts) > 2 and recv_time_us - pts[1][0] >= span:
            pts.popleft()
        rate = self.current()
        if rate > 0:
            mx = self._max
            while mx and mx[-1][1] <= rate:
                mx.pop()
            mx.append((now, rate))
        return rate, self.maximum(now, window)

    def current(self) -> float:
        pts = self._points
        if len(pts) < 2:
            return 0.0
        dt = pts[-1][0] - pts[0][0]
        return (pts[-1][1] - pts[0][1]) * 1e6 / dt if dt > 0 else 0.0

    def maximum(self, now: float, window: float) -> float:
        mx = self._max
        horizon = max(10 * window, 0.5)
        while mx and now - mx[0][0] > horizon:
            mx.popleft()
        return mx[0][1] if mx else 0.0


class Pacer:
    """Token bucket: ``burst`` bytes at most, refilled at the controller's rate.

    The burst is ``max(4 datagrams, rate x burst_time)``: 2 ms of sending by default,
    small next to a bottleneck queue of about one BDP, and long enough for a 1 ms
    event-loop timer to keep the rate.

    A late wake-up is not idleness: when the owner was waiting for tokens
    (``next_time`` named the time) and woke ``late`` seconds after it, the tokens of
    that lateness are kept, up to ``max_late`` seconds of sending (10 ms). On a loaded
    host the event loop wakes milliseconds late; a 2 ms bucket then threw away more
    tokens than it spent (160 MB of tokens for 128 MiB sent on loopback at load 9) and
    the delivered rate fell to a third of the rate asked. 10 ms at the rate is the
    queue a ``fair`` flow keeps anyway at 100 Mbit/s with two flows; idle time (no
    ``next_time`` pending) still banks only ``burst_time``.
    """

    __slots__ = ("tokens", "last", "burst_time", "min_burst", "max_late", "due")

    def __init__(self, datagram_size: int, burst_time: float = 0.002,
                 max_late: float = 0.010) -> None:
        self.tokens = 4.0 * datagram_size
        self.last = -1.0
        self.burst_time = burst_time
        self.min_burst = 4.0 * datagram_size
        self.max_late = max_late
        self.due = -1.0

    def refill(self, now: float, rate: float) -> float:
        """Add tokens for the time since the last refill; returns the tokens available."""
        if self.last >= 0:
            cap = max(self.min_burst, rate * self.burst_time)
            late = now - self.due if self.due >= 0 else 0.0
            if late > 0:
                cap = max(cap, min(cap + rate * late, rate * self.max_late))
            # Tokens granted for lateness are kept until spent (at most ``max_late``
            # of sending at the current rate); idle time only adds up to ``cap``.
            added = min(cap, self.tokens + rate * max(0.0, now - self.last))
            self.tokens = max(added, min(self.tokens, rate * self.max_late))
        self.last = now
        self.due = -1.0
        return self.tokens

    def next_time(self, size: int, rate: float) -> float:
        """When ``size`` bytes of tokens will be there (the last refill time if already);
        the owner is taken to wake then (a later wake keeps the tokens of its delay)."""
        need = size - 1.0 - self.tokens  # one byte of slack against float rounding
        self.due = self.last if need <= 0 else self.last + max(need / rate, 1e-6)
        return self.due


class RatePolicer:
    """The receiving end's cap on what it accepts (a token bucket on DATA datagram bytes).

    A server's ``<bandwidth><flow>`` target rate binds a sender that honours the flow the
    daemon answered; a sender that ignores it is held by its receiver: datagrams beyond
    ``rate`` (bytes/s, the cap plus a margin) after a ``burst`` of bytes are dropped
    unacknowledged, so its goodput stays near the cap whatever it sends (the dropped
    pieces read as lost and are sent again, at the cheater's cost). Like an ISP's
    policer (RFC 2697's single-rate meter, committed burst only).
    """

    __slots__ = ("rate", "burst", "tokens", "last", "dropped")

    def __init__(self, rate: float, burst: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("policer rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = -1.0
        self.dropped = 0

    def admit(self, size: int, now: float) -> bool:
        """Take ``size`` bytes at ``now``; False (and counted) when over the cap."""
        if self.last >= 0 and now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = max(self.last, now)
        if self.tokens >= size:
            self.tokens -= size
            return True
        self.dropped += size
        return False
