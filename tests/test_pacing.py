"""Pacer and rate policies on a hand-stepped clock (no sockets, no sleeping)."""

from __future__ import annotations

import math
import random

import pytest

from transport.blocks.pacing import (
    FairPolicy,
    FixedPolicy,
    HighPolicy,
    LowPolicy,
    Pacer,
    PathSample,
    RatePolicy,
    create_policy,
    parse_rate,
    policy_names,
    rate_from_kbps,
    register_policy,
)


def _run(pacer: Pacer, sizes: list[int], duration: float, start: float = 0.0) -> tuple[int, float]:
    """Send as soon as allowed, cycling through ``sizes``; returns (bytes, end time)."""
    now, sent, i = start, 0, 0
    while True:
        n = sizes[i % len(sizes)]
        t = pacer.next_send_time(now, n)
        if t >= start + duration:
            return sent, now
        now = t
        assert pacer.can_send(now, n)
        pacer.consume(now, n)
        sent += n
        i += 1


@pytest.mark.parametrize("rate", [64e3, 20e6, 1e9, 10e9])
@pytest.mark.parametrize("sizes", [[1400], [4 << 20], [1400, 9000, 64000, 200]])
def test_rate_over_time_is_within_one_percent(rate: float, sizes: list[int]) -> None:
    burst = 16 * 1400
    pacer = Pacer(rate, burst_bytes=burst)
    # The bound allows a burst plus one send ahead of the rate: run long enough
    # (in simulated time; a few thousand sends) for that to be under 1 %.
    duration = 8 * 150 * (burst + max(sizes)) / rate
    sent, _ = _run(pacer, sizes, duration)
    assert sent * 8 / duration == pytest.approx(rate, rel=0.01)


def test_any_window_stays_under_burst_plus_rate() -> None:
    rate, burst = 8e6, 10_000  # 1 MB/s
    pacer = Pacer(rate, burst)
    rng = random.Random(1)
    log: list[tuple[float, int]] = []
    now = 0.0
    for _ in range(3000):
        n = rng.choice([100, 1400, 1400, 5000, 30_000])
        now = max(pacer.next_send_time(now, n), now + rng.choice([0.0, 0.0, 0.001]))
        assert pacer.can_send(now, n)
        pacer.consume(now, n)
        log.append((now, n))
    largest = max(n for _, n in log)
    for i in range(0, len(log), 37):
        t0 = log[i][0]
        for window in (0.001, 0.01, 0.1, 1.0):
            inside = sum(n for t, n in log[i:] if t < t0 + window)
            assert inside <= burst + rate / 8 * window + largest + 1e-6


def test_bucket_starts_full_then_waits() -> None:
    pacer = Pacer(8e3, burst_bytes=3000)  # 1,000 bytes per second
    for _ in range(2):
        assert pacer.can_send(5.0, 1400)
        pacer.consume(5.0, 1400)
    assert pacer.can_send(5.0, 1400)  # 200 tokens left: one more send, into debt
    pacer.consume(5.0, 1400)
    assert not pacer.can_send(5.0)
    assert pacer.next_send_time(5.0) == pytest.approx(6.2)  # 1,200 bytes of debt
    assert not pacer.can_send(6.19)
    assert pacer.can_send(6.2)
    assert pacer.tokens(100.0) == 3000  # never more than the burst


def test_large_send_leaves_a_debt_the_rate_repays() -> None:
    pacer = Pacer(8e6, burst_bytes=10_000)  # 1 MB/s
    pacer.consume(0.0, 4_000_000)  # a 4 MB HTTP block
    assert pacer.tokens(0.0) == pytest.approx(10_000 - 4_000_000)
    assert pacer.next_send_time(0.0, 1400) == pytest.approx((4_000_000 - 10_000) / 1e6)


def test_set_rate_applies_from_now_on() -> None:
    pacer = Pacer(10e6, burst_bytes=14_000)
    sent1, now = _run(pacer, [1400], 5.0)
    pacer.set_rate(now, 40e6)
    sent2, _ = _run(pacer, [1400], 5.0, start=now)
    assert sent1 * 8 / 5.0 == pytest.approx(10e6, rel=0.01)
    assert sent2 * 8 / 5.0 == pytest.approx(40e6, rel=0.01)


def test_one_pacer_caps_the_sum_of_two_paths() -> None:
    """Paths of different send sizes share one session pacer: the sum keeps the target."""
    pacer = Pacer(20e6, burst_bytes=64 * 1024)
    now, sent = 0.0, {"udp": 0, "http": 0}
    sizes = {"udp": 1400, "http": 256 * 1024}
    due = {"udp": 0.0, "http": 0.0}
    while True:
        path = min(due, key=lambda p: due[p])
        now = max(now, due[path])
        if now >= 30.0:
            break
        n = sizes[path]
        if pacer.can_send(now, n):
            pacer.consume(now, n)
            sent[path] += n
            due[path] = now + (0.0005 if path == "udp" else 0.01)  # each path's own cadence
        else:
            due[path] = pacer.next_send_time(now, n)
    assert sum(sent.values()) * 8 / 30.0 == pytest.approx(20e6, rel=0.01)
    assert sent["udp"] > 0 and sent["http"] > 0


def test_unlimited_rate_never_waits() -> None:
    pacer = Pacer(math.inf, burst_bytes=1)
    for i in range(100):
        assert pacer.can_send(float(i), 10**9)
        assert pacer.next_send_time(float(i), 10**9) == float(i)
        pacer.consume(float(i), 10**9)
    assert pacer.sent_bytes == 100 * 10**9


def test_clock_going_backwards_earns_nothing() -> None:
    pacer = Pacer(8e3, burst_bytes=1000)
    pacer.consume(10.0, 1500)
    assert not pacer.can_send(9.0)
    assert pacer.tokens(9.0) == pytest.approx(-500)
    assert pacer.tokens(10.25) == pytest.approx(-250)


@pytest.mark.parametrize("rate", [0, -1, math.nan])
def test_bad_rates_are_refused(rate: float) -> None:
    with pytest.raises(ValueError):
        Pacer(rate, 1000)
    with pytest.raises(ValueError):
        FixedPolicy(target_rate_bps=rate)


def test_registry_names_and_creation() -> None:
    assert {"fixed", "fair", "high", "low"} <= set(policy_names())
    p = create_policy("high", target_rate_bps=50e6, min_rate_bps=1e6)
    assert isinstance(p, HighPolicy) and p.share == 2.0 and p.rate_bps == 50e6
    assert create_policy("fair").share == 1.0 and create_policy("low").share == 0.0
    assert create_policy("fixed").share is None
    with pytest.raises(ValueError, match="known: fair, fixed, high, low"):
        create_policy("turbo")
    with pytest.raises(ValueError, match="min_rate"):
        create_policy("fair", target_rate_bps=1e6, min_rate_bps=2e6)

    class Custom(FairPolicy):
        name = "fixed"

    with pytest.raises(ValueError, match="twice"):
        register_policy(Custom)


def test_registering_a_controller_makes_it_creatable() -> None:
    @register_policy
    class Probe(RatePolicy):
        name = "test-probe"
        share = 1.0

    try:
        assert isinstance(create_policy("test-probe", target_rate_bps=1e6), Probe)
    finally:
        from transport.blocks import pacing

        del pacing._POLICIES["test-probe"]  # noqa: SLF001


def test_fixed_and_fair_ignore_samples_and_clamp() -> None:
    for cls in (FixedPolicy, FairPolicy, HighPolicy):
        p = cls(target_rate_bps=20e6, min_rate_bps=2e6)
        p.on_sample(1.0, PathSample(rtt=5.0, interval=1.0, lost_bytes=10**6))
        assert p.rate_bps == 20e6
        assert p.clamp(1e9) == 20e6 and p.clamp(1e3) == 2e6 and p.clamp(5e6) == 5e6


def test_low_climbs_to_target_on_an_empty_queue() -> None:
    p = LowPolicy(target_rate_bps=100e6, min_rate_bps=0.0)
    now = 0.0
    for _ in range(40):
        now += 0.05
        p.on_sample(now, PathSample(rtt=0.05, interval=0.05, delivered_bytes=10**5))
    assert p.rate_bps == 100e6


def test_low_yields_to_a_queue_down_to_min_rate_then_recovers() -> None:
    """A TCP flow fills the bottleneck queue (RTT 50 ms -> 250 ms): low backs off."""
    p = LowPolicy(target_rate_bps=100e6, min_rate_bps=2e6)
    now = 0.0
    for _ in range(40):
        now += 0.05
        p.on_sample(now, PathSample(rtt=0.05, interval=0.05))
    assert p.base_rtt == 0.05
    for _ in range(20):
        now += 0.25
        p.on_sample(now, PathSample(rtt=0.25, interval=0.25))
    assert p.rate_bps == 2e6  # the floor, not zero
    rates = []
    for _ in range(5):  # queue at the target: the rate holds
        now += 0.11
        p.on_sample(now, PathSample(rtt=0.11, interval=0.11))
        rates.append(p.rate_bps)
    assert rates == [2e6] * 5
    for _ in range(20):  # the TCP flow left: back up
        now += 0.05
        p.on_sample(now, PathSample(rtt=0.05, interval=0.05))
    assert p.rate_bps == 100e6


def test_low_halves_on_loss_at_most_once_per_rtt() -> None:
    p = LowPolicy(target_rate_bps=80e6)
    now = 0.0
    while p.rate_bps < 80e6:
        now += 0.1
        p.on_sample(now, PathSample(rtt=0.1, interval=0.1))
    p.on_sample(now + 0.01, PathSample(rtt=0.1, interval=0.01, lost_bytes=1400))
    p.on_sample(now + 0.05, PathSample(rtt=0.1, interval=0.04, lost_bytes=1400))
    assert p.rate_bps == 40e6
    p.on_sample(now + 0.12, PathSample(rtt=0.1, interval=0.07, lost_bytes=1400))
    assert p.rate_bps == 20e6


def test_low_base_rtt_forgets_after_ten_minutes() -> None:
    p = LowPolicy(target_rate_bps=10e6)
    p.on_sample(0.0, PathSample(rtt=0.02))
    for minute in range(1, 12):
        p.on_sample(minute * 60.0, PathSample(rtt=0.08))
    assert p.base_rtt == 0.08  # the path changed; the old minimum aged out


@pytest.mark.parametrize(
    ("text", "bps"),
    [("20M", 20e6), ("20m", 20e6), ("1.5G", 1.5e9), ("500k", 500e3), ("10000", 10e6), (" 7 M ", 7e6)],
)
def test_parse_rate(text: str, bps: float) -> None:
    assert parse_rate(text) == pytest.approx(bps)


@pytest.mark.parametrize("text", ["", "M", "20 Mbps", "-5M", "1e6", "20T", "nan"])
def test_parse_rate_refuses_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="bad rate"):
        parse_rate(text)


def test_rate_from_kbps_follows_aspera_conf() -> None:
    assert rate_from_kbps(0) == math.inf
    assert rate_from_kbps(10_000) == 10e6
    with pytest.raises(ValueError):
        rate_from_kbps(-1)
