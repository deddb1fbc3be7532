"""Pacing shared by every path: a token bucket and the rate policies (sans-IO).

Units everywhere: rates in **bits per second** (``float``; ``math.inf`` is
unlimited), sizes in **bytes**, time in **seconds** (``now`` passed in by the
caller from a monotonic clock: ``time.monotonic()``, not uvloop's ``loop.time()``,
which ticks in whole milliseconds).

Policies carry Aspera's names and meanings (``<bandwidth><flow>`` of
aspera.conf, ``ascp --policy``): ``target_rate``, ``min_rate`` and

* ``fixed``: the target rate regardless of congestion;
* ``fair``: an equal share with like flows (one fair share);
* ``high``: about twice the share of a fair flow;
* ``low``: only spare capacity, backing off as queueing delay appears (LEDBAT-like).

A path consults its policy for a ceiling (``rate_bps``) and feeds it
samples (``on_sample``); ``share`` tells a path how many fair shares to aim
for with its own congestion control (TCP under HTTP, where ``fair`` adapts the
number of streams; the UDP path's delay-based controllers, registered later
with ``register_policy`` in the manner of aioquic's ``congestion/base.py``).
One ``Pacer`` per session and direction caps the sum of all its paths.
"""

from __future__ import annotations

import math
import re
from abc import ABC
from dataclasses import dataclass
from typing import ClassVar, TypeVar

__all__ = [
    "FairPolicy", "FixedPolicy", "HighPolicy", "LowPolicy", "PathSample", "Pacer",
    "RatePolicy", "create_policy", "parse_rate", "policy_names", "rate_from_kbps",
    "register_policy",
]

_EPS_BYTES = 1e-6  # float slack when comparing tokens


class Pacer:
    """A token bucket: sends average ``rate_bps`` with bursts of ``burst_bytes``.

    The bucket (bytes) starts full and fills at ``rate_bps / 8`` up to
    ``burst_bytes``. A send is allowed whenever the bucket is not in debt
    (``tokens >= 0``) and may take it below zero: a 4 MiB HTTP block goes out
    at once and the rate repays it before anything else leaves. So over any
    interval of T seconds at most ``burst + rate * T / 8`` bytes plus one send
    leave; a sender that waits for ``next_send_time`` gets the rate exactly in
    the long run, whatever its send sizes; and paths of different send sizes
    sharing one pacer take turns instead of small sends starving large ones
    (a bucket that waited for ``n`` tokens would never let a 256 KiB send
    through a stream of 1,400-byte datagrams).
    """

    __slots__ = ("_burst", "_last", "_rate", "_tokens", "sent_bytes")

    def __init__(self, rate_bps: float, burst_bytes: int) -> None:
        _check_rate(rate_bps)
        if burst_bytes < 1:
            raise ValueError("burst_bytes must be at least 1")
        self._rate = float(rate_bps)
        self._burst = float(burst_bytes)
        self._tokens = float(burst_bytes)
        self._last: float | None = None
        self.sent_bytes = 0

    @property
    def rate_bps(self) -> float:
        return self._rate

    @property
    def burst_bytes(self) -> int:
        return int(self._burst)

    def tokens(self, now: float) -> float:
        """Bytes that may leave now (negative while a large send is being repaid)."""
        self._refill(now)
        return self._tokens

    def can_send(self, now: float, nbytes: int = 1) -> bool:
        """Whether a send may leave now (any size: the bucket is not in debt)."""
        if self._rate == math.inf:
            return True
        self._refill(now)
        return self._tokens >= -_EPS_BYTES

    def next_send_time(self, now: float, nbytes: int = 1) -> float:
        """The earliest time ``can_send`` holds (``now`` if it already does)."""
        if self._rate == math.inf:
            return now
        self._refill(now)
        return now if self._tokens >= -_EPS_BYTES else now - self._tokens * 8.0 / self._rate

    def consume(self, now: float, nbytes: int) -> None:
        """Account ``nbytes`` sent at ``now`` (call after ``can_send`` said yes)."""
        self.sent_bytes += nbytes
        if self._rate == math.inf:
            return
        self._refill(now)
        self._tokens -= nbytes

    def set_rate(self, now: float, rate_bps: float) -> None:
        """Change the rate from ``now`` on (tokens earned so far stay at the old rate)."""
        _check_rate(rate_bps)
        self._refill(now)
        self._rate = float(rate_bps)

    def _refill(self, now: float) -> None:
        if self._last is None:
            self._last = now
            return
        dt = now - self._last
        if dt > 0:  # a clock going backwards earns nothing
            self._last = now
            if self._rate == math.inf:
                self._tokens = self._burst
            else:
                self._tokens = min(self._burst, self._tokens + dt * self._rate / 8.0)


def _check_rate(rate_bps: float) -> None:
    if not rate_bps > 0:  # also refuses NaN
        raise ValueError(f"rate must be positive bits per second (math.inf: unlimited), got {rate_bps}")


# -- policies -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PathSample:
    """What a path measured since its previous sample.

    ``rtt``: the latest round-trip time (seconds, > 0); ``interval``: seconds
    the sample covers; ``delivered_bytes`` / ``lost_bytes``: bytes acknowledged
    and declared lost in that interval.
    """

    rtt: float
    interval: float = 0.0
    delivered_bytes: int = 0
    lost_bytes: int = 0


class RatePolicy(ABC):
    """A bandwidth policy: a ceiling for the pacer, a floor, a share.

    ``rate_bps`` is the current pacing ceiling (bits/s), within
    ``[min_rate_bps, target_rate_bps]``; ``share`` the number of fair shares
    the policy aims for under congestion (None: rate-driven, not share-driven).
    """

    name: ClassVar[str]
    share: ClassVar[float | None]

    def __init__(self, *, target_rate_bps: float = math.inf, min_rate_bps: float = 0.0) -> None:
        _check_rate(target_rate_bps)
        if not 0 <= min_rate_bps <= target_rate_bps or min_rate_bps == math.inf:
            raise ValueError(f"min_rate {min_rate_bps} outside [0, target_rate {target_rate_bps}]")
        self.target_rate_bps = float(target_rate_bps)
        self.min_rate_bps = float(min_rate_bps)

    @property
    def rate_bps(self) -> float:
        return self.target_rate_bps

    def clamp(self, rate_bps: float) -> float:
        """A controller's rate bounded by the policy's floor and ceiling."""
        return max(self.min_rate_bps, min(self.target_rate_bps, rate_bps))

    def on_sample(self, now: float, sample: PathSample) -> None:  # noqa: B027 - optional hook
        """Feed a measurement; policies without their own controller ignore it."""


_P = TypeVar("_P", bound=type[RatePolicy])
_POLICIES: dict[str, type[RatePolicy]] = {}


def register_policy(cls: _P) -> _P:
    """Class decorator: make ``cls`` creatable by its ``name`` (``ValueError`` on a clash)."""
    if cls.name in _POLICIES and _POLICIES[cls.name] is not cls:
        raise ValueError(f"policy {cls.name!r} registered twice")
    _POLICIES[cls.name] = cls
    return cls


def create_policy(name: str, *, target_rate_bps: float = math.inf,
                  min_rate_bps: float = 0.0) -> RatePolicy:
    """A policy by name; ``ValueError`` naming the known ones for an unknown name."""
    try:
        cls = _POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r} (known: {', '.join(policy_names())})") from None
    return cls(target_rate_bps=target_rate_bps, min_rate_bps=min_rate_bps)


def policy_names() -> tuple[str, ...]:
    return tuple(sorted(_POLICIES))


@register_policy
class FixedPolicy(RatePolicy):
    """``fixed``: pace at the target rate regardless of congestion."""

    name = "fixed"
    share = None


@register_policy
class FairPolicy(RatePolicy):
    """``fair``: one fair share; the path's congestion control finds it under the target."""

    name = "fair"
    share = 1.0


@register_policy
class HighPolicy(RatePolicy):
    """``high``: about two fair shares under congestion, the target rate at most."""

    name = "high"
    share = 2.0


@register_policy
class LowPolicy(RatePolicy):
    """``low``: only spare capacity, a rate-based LEDBAT (RFC 6817).

    Queueing delay is the sampled RTT minus the base RTT (the minimum over the
    last ``BASE_HISTORY`` minutes, RFC 6817 section 2.4.2; an RTT rather than
    a one-way delay, so reverse-path queues count too). Each sample moves the
    rate by ``GAIN * off_target`` per RTT, ``off_target = (TARGET - queueing)
    / TARGET`` clamped to [-1, 1]: up to +50 % per RTT on an empty queue, down
    to -50 % per RTT when the queue is twice the target, so a TCP flow filling
    the bottleneck queue pushes this one down to ``min_rate``. A sample with
    losses halves the rate, at most once per RTT (RFC 6817 section 2.4.2).
    ``TARGET`` is 60 ms, LEDBAT++'s (draft-irtf-iccrg-ledbat-plus-plus section
    4.1; RFC 6817 allows at most 100 ms).
    """

    name = "low"
    share = 0.0
    TARGET = 0.060
    GAIN = 0.5
    BASE_HISTORY = 10  # minutes
    START_RATE = 1e6  # bits/s when neither the target nor the floor says otherwise

    def __init__(self, *, target_rate_bps: float = math.inf, min_rate_bps: float = 0.0) -> None:
        super().__init__(target_rate_bps=target_rate_bps, min_rate_bps=min_rate_bps)
        self._rate = self.clamp(max(self.START_RATE, min_rate_bps))
        self._base: list[tuple[int, float]] = []  # (minute, min rtt) newest last
        self._last_cut = -math.inf

    @property
    def rate_bps(self) -> float:
        return self._rate

    @property
    def base_rtt(self) -> float | None:
        return min(r for _, r in self._base) if self._base else None

    def on_sample(self, now: float, sample: PathSample) -> None:
        if not sample.rtt > 0:
            return
        minute = int(now // 60)
        if self._base and self._base[-1][0] == minute:
            if sample.rtt < self._base[-1][1]:
                self._base[-1] = (minute, sample.rtt)
        else:
            self._base.append((minute, sample.rtt))
            self._base = [(m, r) for m, r in self._base if m > minute - self.BASE_HISTORY]
        base = min(r for _, r in self._base)
        if sample.lost_bytes > 0:
            if now - self._last_cut >= sample.rtt:
                self._last_cut = now
                self._rate = self.clamp(self._rate / 2)
            return
        off = max(-1.0, min(1.0, (self.TARGET - (sample.rtt - base)) / self.TARGET))
        fraction = min(1.0, sample.interval / sample.rtt) if sample.interval > 0 else 1.0
        self._rate = self.clamp(self._rate * (1.0 + self.GAIN * off * fraction))


# -- rates as people write them -------------------------------------------------------

_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*$")
_SUFFIX = {"": 1e3, "k": 1e3, "m": 1e6, "g": 1e9}


def parse_rate(text: str) -> float:
    """``"20M"`` -> 20e6 bits/s. Suffixes K, M, G (decimal, any case); a bare number
    is Kbps, as ``ascp -l`` and aspera.conf count. ``ValueError`` on anything else."""
    m = _RATE_RE.match(text)
    if m is None:
        raise ValueError(f"bad rate {text!r}: expected a number with an optional K, M or G suffix")
    return float(m.group(1)) * _SUFFIX[m.group(2).lower()]


def rate_from_kbps(kbps: int) -> float:
    """An aspera.conf ``target_rate`` (Kbps, 0 = unlimited) in bits/s (``math.inf``)."""
    if kbps < 0:
        raise ValueError(f"negative rate {kbps} Kbps")
    return math.inf if kbps == 0 else kbps * 1e3
