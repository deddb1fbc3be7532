"""Smoke test of the WAN benchmark runner: tiny sizes, checks the report, never timings.

Skipped unless running as root on a machine where ``ip netns`` and /dev/net/tun work, because
the link emulator needs network namespaces and TUN devices.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from bench.netem.config import LinkConfig
from bench.netem.shaper import DirectionParams, Shaper
from bench.scenarios import select

REPO = Path(__file__).resolve().parents[1]


def _netns_works() -> bool:
    if os.geteuid() != 0 or not shutil.which("ip") or not os.path.exists("/dev/net/tun"):
        return False
    name = f"fbA-smoke{uuid.uuid4().hex[:6]}"
    try:
        ok = subprocess.run(["ip", "netns", "add", name], capture_output=True, timeout=10)
        return ok.returncode == 0
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


needs_netns = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.skipif(not _netns_works(), reason="needs root and working `ip netns`"),
    pytest.mark.skipif(not shutil.which("iperf3") or not shutil.which("nginx"),
                       reason="needs iperf3 and nginx"),
]


def _apply(marks: list[pytest.MarkDecorator]):  # type: ignore[no-untyped-def]
    def deco(fn):  # type: ignore[no-untyped-def]
        for m in marks:
            fn = m(fn)
        return fn

    return deco


# -- the emulator's arithmetic (no root needed) ------------------------------------------------


def _shaper(**kw: float) -> Shaper:
    return Shaper(DirectionParams(**kw), seed=3)  # type: ignore[arg-type]


def test_serialisation_clock_spaces_packets_at_the_bottleneck_rate() -> None:
    s = _shaper(rate_bps=8e6, delay_s=0.010, queue_bytes=10**6)  # 1 byte per microsecond
    s.ingest([b"x" * 1000] * 3, now=100.0)
    sent: list[bytes] = []
    assert s.emit(lambda: 100.010, sent.append) == 0  # first one is due at 100.011
    assert s.emit(lambda: 100.0115, sent.append) == 1
    assert s.next_due() == pytest.approx(100.012)
    assert s.emit(lambda: 100.02, sent.append) == 2
    assert s.counters.fwd_bytes == 3000


def test_drop_tail_queue_is_bounded_in_bytes() -> None:
    s = _shaper(rate_bps=8e6, delay_s=0.0, queue_bytes=5000)
    s.ingest([b"x" * 1000] * 10, now=0.0)
    assert s.counters.drop_queue_packets == 5
    assert s.pending() == 5


def test_random_loss_rate_and_seed_reproducibility() -> None:
    a, b = _shaper(loss=0.02), _shaper(loss=0.02)
    for s in (a, b):
        s.ingest([b"x"] * 50_000, now=0.0)
    assert a.counters.drop_loss_packets == b.counters.drop_loss_packets
    assert 800 < a.counters.drop_loss_packets < 1200


def test_jitter_never_reorders_unless_asked() -> None:
    s = _shaper(delay_s=0.05, jitter_s=0.02)
    for i in range(200):
        s.ingest([i.to_bytes(2, "big")], now=i * 1e-4)
    out: list[bytes] = []
    s.emit(lambda: 10.0, out.append)
    assert [int.from_bytes(p, "big") for p in out] == list(range(200))


def test_counter_windows_and_totals() -> None:
    s = _shaper()
    s.ingest([b"x"] * 5, now=0.0)
    s.emit(lambda: 0.002, lambda p: None)  # 2 ms late each
    s.reset_counters()
    s.ingest([b"x"] * 3, now=1.0)
    s.emit(lambda: 1.0, lambda p: None)
    w, t = s.window().summary(), s.total().summary()
    assert (w["fwd_packets"], t["fwd_packets"]) == (3, 8)
    assert w["late_max_ms"] < 0.5 < t["late_max_ms"]


def test_link_config_queue_defaults_to_one_and_a_half_bdp() -> None:
    p = LinkConfig(rate_mbit=100, rtt_ms=100).to_params()
    assert p.queue_bytes == int(1.5 * 100e6 / 8 * 0.1)
    assert p.delay_s == pytest.approx(0.05)
    assert LinkConfig(rate_mbit=100, rtt_ms=100, queue_ms=20).queue_bytes() == 250_000


def test_scenario_globs() -> None:
    names = [s.name for s in select(["wan-100M-*-1pct"])]
    assert names == ["wan-100M-10ms-1pct", "wan-100M-100ms-1pct", "wan-100M-300ms-1pct"]
    with pytest.raises(ValueError):
        select(["no-such-*"])


# -- the runner end to end (root + namespaces) -------------------------------------------------


@_apply(needs_netns)
@pytest.mark.timeout(240)
def test_quick_bench_writes_sane_report(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = dict(os.environ, FB_BENCH_TINY="1", PYTHONPATH=str(REPO))
    p = subprocess.run(
        [sys.executable, "-m", "bench", "--tiny", "--out", str(out),
         "--peers", "iperf3-bbr,curl-http*,ours-https*"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=220,
    )
    report = out / "report.md"
    assert report.exists(), p.stderr[-2000:]
    text = report.read_text()
    assert "nan" not in text.lower() and "inf" not in re.sub(r"[A-Za-z]inf|inf[a-z]", "", text)

    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| scenario | peer"))
    head, rows = lines[start], []
    for line in lines[start + 2:]:  # the results table ends at the first non-table line
        if not line.startswith("|"):
            break
        rows.append(line)
    assert rows, text
    cols = _cells(head)
    gi, si = cols.index("goodput Mbit/s"), cols.index("status")
    goodputs = []
    for row in rows:
        cells = _cells(row)
        if cells[si] == "skipped":
            continue
        assert cells[si] in ("ok", "capped"), row
        g = float(cells[gi])
        assert math.isfinite(g) and g > 0, row
        goodputs.append(g)
    assert goodputs
    assert (out / "results.json").exists()
    if importlib.util.find_spec("matplotlib") is not None:  # plots: the optional [bench] extra
        assert list(out.glob("*.png"))
    else:
        assert "plots skipped: matplotlib is not installed" in p.stderr
    # nothing left behind: no namespaces of this run, no run directories
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [n for n in left.split() if n.startswith(("fbA-", "fbB-"))
                and _owner_dead(n)], left


def _cells(row: str) -> list[str]:
    """Cells of a markdown table row (pipes inside cells are escaped as \\|)."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", row.strip().strip("|"))]


def _owner_dead(ns: str) -> bool:
    """A namespace of a run whose owner is gone would be a leak (others may run in parallel)."""
    owner = Path("/tmp/fbnetem") / ns.split("-", 1)[1] / "owner.pid"
    try:
        pid = int(owner.read_text())
    except (OSError, ValueError):
        return True
    return not Path(f"/proc/{pid}").exists()
