"""Rate control on a simulated bottleneck (drop-tail queue, random loss, hand-stepped clock).

Figures asserted here (goodput counts piece bytes, 96 % of the datagram bytes at the
default 1452-byte datagram): one delay-based flow fills a 100 Mbit/s, 100 ms, 1 % loss
bottleneck to >= 90 Mbit/s within 2 s and keeps its queue under 40 ms (the queue holds
150 ms), where a loss-based Reno-like flow gets under a fifth of that; two ``fair``
flows share within 20 %; ``high`` gets about twice ``fair``; ``low`` takes only what a
``fixed`` flow leaves; ``fixed``, ``min_rate`` and ``target_rate`` hold.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from tests.udp_link import Bottleneck, Counter, Endless, Link, Peer, Sim, pair
from transport.udp import RateConfig, UdpConfig, UdpConnection
from transport.udp.rate import (
    CONTROLLERS,
    DelayRate,
    DelayTracker,
    DeliveryTracker,
    FixedRate,
    LedbatRate,
    Pacer,
    controller_for,
)

MBIT = 1e6


class Flows:
    """Flows sharing one bottleneck; per-second goodput and queue-delay records."""

    def __init__(self, capacity: float, rtt: float, loss: float = 0.0, seed: int = 3) -> None:
        self.rng = random.Random(seed)
        self.rtt = rtt
        self.loss = loss
        self.bottleneck = Bottleneck(capacity, int(1.5 * capacity / 8 * rtt))
        self.sim = Sim()
        self.flows: list[tuple[UdpConnection, Counter]] = []
        self.goodput: list[list[float]] = []   # per flow, per second (Mbit/s)
        self.rates: list[list[float]] = []     # per flow, controller rate at each second
        self._last: list[int] = []

    def add(self, policy: str, **rate: object) -> UdpConnection:
        i = len(self.flows)
        cfg = UdpConfig(rate=RateConfig(policy=policy, **rate))  # type: ignore[arg-type]
        a, b = pair(cfg, cfg, b_name=f"b{i}", cid=100 + i, start=self.sim.now)
        src, cnt = Endless(), Counter()
        self.sim.add(f"a{i}", Peer(a, Link(self.rng, delay=self.rtt / 2, loss=self.loss,
                                           bottleneck=self.bottleneck), f"b{i}",
                                   src.on_event, src.feed))
        self.sim.add(f"b{i}", Peer(b, Link(self.rng, delay=self.rtt / 2, loss=self.loss),
                                   f"a{i}", cnt.on_event))
        self.flows.append((a, cnt))
        self.goodput.append([0.0] * int(self.sim.now))
        self.rates.append([0.0] * int(self.sim.now))
        self._last.append(0)
        return a

    def run(self, until: float, every: Callable[[float], None] | None = None) -> None:
        def tick(t: float) -> None:
            for i, (a, cnt) in enumerate(self.flows):
                self.goodput[i].append((cnt.bytes - self._last[i]) * 8 / MBIT)
                self.rates[i].append(a.controller.rate * 8 / MBIT)
                self._last[i] = cnt.bytes
            if every:
                every(t)
        self.sim.run(until, every=(1.0, tick))

    def mean(self, i: int, start: int, stop: int) -> float:
        g = self.goodput[i][start:stop]
        return sum(g) / len(g)

    def queue_max(self, since: float) -> float:
        return max((d for t, d in self.bottleneck.delays if t >= since), default=0.0)


def test_delay_based_fills_lossy_long_link_and_bounds_queue() -> None:
    net = Flows(100 * MBIT, 0.1, loss=0.01)
    net.add("fair")
    net.run(6.0)
    per_second = net.goodput[0]
    assert min(per_second[2:6]) >= 90, per_second  # >= 90 % of 100 Mbit/s from t = 2 s
    assert net.queue_max(since=2.0) <= 0.040     # the queue holds 150 ms; we keep < 40
    assert net.flows[0][0].stats().spurious_losses == 0
    # Contrast: the same link with a loss-based (Reno-like) controller collapses.
    reno = Flows(100 * MBIT, 0.1, loss=0.01)
    reno.add("reno")
    reno.run(6.0)
    assert reno.mean(0, 2, 6) < 0.2 * min(per_second[2:6]), reno.goodput[0]


def test_two_fair_flows_share_within_20_percent() -> None:
    net = Flows(50 * MBIT, 0.05)
    net.add("fair")
    net.run(1.0)
    net.add("fair")  # joins a standing queue: the latecomer case
    net.run(12.0)
    g1, g2 = net.mean(0, 8, 12), net.mean(1, 8, 12)
    assert abs(g1 - g2) <= 0.2 * max(g1, g2), (net.goodput)
    assert g1 + g2 >= 0.9 * 50


def test_high_gets_about_twice_fair() -> None:
    net = Flows(50 * MBIT, 0.05)
    net.add("high")
    net.run(1.0)
    net.add("fair")
    net.run(12.0)
    ratio = net.mean(0, 8, 12) / net.mean(1, 8, 12)
    assert 1.5 <= ratio <= 2.6, net.goodput


def test_low_takes_only_what_fixed_leaves() -> None:
    net = Flows(100 * MBIT, 0.05)
    net.add("low")
    net.run(3.0)
    net.add("fixed", target_rate=60 * MBIT)
    net.run(8.0)
    assert net.goodput[0][2] >= 85  # alone, low fills the link (after a gentle ramp)
    assert net.mean(1, 5, 8) >= 0.95 * 60 * 0.96   # fixed keeps its rate
    low = net.mean(0, 5, 8)
    assert 25 <= low <= 40 * 0.96 + 1, net.goodput  # low gets the spare 40, no more
    assert net.queue_max(since=5.0) <= 0.015


def test_low_falls_to_min_rate_never_below() -> None:
    net = Flows(100 * MBIT, 0.05)
    low = net.add("low", min_rate=2 * MBIT)
    net.add("fixed", target_rate=120 * MBIT)  # overloads the link by itself
    net.run(5.0)
    assert min(net.rates[0][1:]) >= 2.0 - 1e-9
    assert net.rates[0][-1] <= 2.5
    assert low.controller.rate * 8 >= 2 * MBIT - 1e-6


def test_fixed_holds_its_rate_under_heavy_loss() -> None:
    net = Flows(100 * MBIT, 0.1, loss=0.10)
    net.add("fixed", target_rate=50 * MBIT)
    net.run(4.0)
    assert all(r == pytest.approx(50.0) for r in net.rates[0])
    expected = 50 * 0.9 * 1394 / 1452
    assert net.mean(0, 1, 4) == pytest.approx(expected, rel=0.05)


def test_target_rate_caps_a_fair_flow_and_changes_mid_transfer() -> None:
    net = Flows(100 * MBIT, 0.05)
    a = net.add("fair", target_rate=30 * MBIT)
    net.run(4.0)
    assert max(net.rates[0]) <= 30.0 + 1e-9
    assert net.mean(0, 1, 4) >= 0.95 * 30 * 1394 / 1452
    a.controller.set_limits(10 * MBIT, 0.0)  # lowered mid-transfer: at once
    net.run(6.0)
    assert max(net.rates[0][4:]) <= 10.0 + 1e-9
    assert net.goodput[0][5] == pytest.approx(10 * 1394 / 1452, rel=0.05)
    with pytest.raises(ValueError):
        a.controller.set_limits(1e6, 2e6)


# -- units ------------------------------------------------------------------------------

def test_policies_map_to_controllers_and_registry() -> None:
    assert {"fixed", "delay", "ledbat", "reno"} <= set(CONTROLLERS)
    assert isinstance(controller_for(RateConfig("fixed", target_rate=1e6), 1452), FixedRate)
    fair = controller_for(RateConfig("fair"), 1452)
    high = controller_for(RateConfig("high"), 1452)
    assert isinstance(fair, DelayRate) and isinstance(high, DelayRate)
    assert high.alpha == 2 * fair.alpha
    assert isinstance(controller_for(RateConfig("low"), 1452), LedbatRate)
    for bad in ({"policy": "nope"}, {"policy": "fixed"}, {"min_rate": -1.0},
                {"target_rate": 1e6, "min_rate": 2e6}):
        with pytest.raises(ValueError):
            RateConfig(**bad)  # type: ignore[arg-type]


def test_pacer_never_bursts_beyond_its_bucket() -> None:
    p = Pacer(1452, burst_time=0.002)
    rate = 12.5e6  # 100 Mbit/s
    sent, t = 0.0, 0.0
    for _ in range(1000):
        t += 0.0005
        tokens = p.refill(t, rate)
        assert tokens <= max(4 * 1452, rate * 0.002) + 1e-6
        n = int(tokens // 1452)
        p.tokens -= n * 1452
        sent += n * 1452
    assert sent == pytest.approx(rate * t, rel=0.02)
    p.refill(10.0, rate)  # a long idle period does not bank a big burst
    assert p.tokens <= rate * 0.002 + 1e-6
    p.tokens = 0
    assert p.next_time(1452, rate) == pytest.approx(10.0 + 1451 / rate)


def test_delay_tracker_base_and_current_filter() -> None:
    d = DelayTracker()
    assert d.update(0.0, 5000) == 0.0
    assert d.update(0.01, 9000) == 0.0          # current = min of the last 4 samples
    for i in range(4):
        q = d.update(0.02 + i * 0.01, 9000)
    assert q == pytest.approx(0.004)
    assert d.update(0.1, 4000) == 0.0           # a new minimum lowers the base
    for i in range(4):
        q = d.update(60.0 + i, 6000)            # buckets keep the minimum for a minute
    assert q == pytest.approx(0.002)
    for i in range(20):
        q = d.update(200.0 + i * 6, 6000)       # old buckets expire (skew, route change)
    assert q == 0.0


def test_delivery_tracker() -> None:
    t = DeliveryTracker()
    rate = 0.0
    for i in range(50):
        rate, mx = t.update(i * 0.01, i * 10_000, i * 125_000, window=0.05)
    assert rate == pytest.approx(12.5e6) and mx == pytest.approx(12.5e6)
    rate, _ = t.update(0.6, 10, 10, window=0.05)  # receiver clock restarted: no garbage
    assert rate == 0.0
