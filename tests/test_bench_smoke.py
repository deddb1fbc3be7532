"""Smoke test of the WAN benchmark runner: tiny sizes, checks the report, never timings.

Skipped unless running as root on a machine where ``ip netns`` and /dev/net/tun work, because
the link emulator needs network namespaces and TUN devices.
"""

from __future__ import annotations

import importlib.util
import json
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


def test_issue12_scenarios_and_udp_sizes(tmp_path: Path) -> None:
    from bench.runner import Runner, RunOptions

    by = {s.name: s for s in select(["wan-100M-200ms-2pct", "wan-1G-200ms-2pct"])}
    assert (by["wan-100M-200ms-2pct"].rtt_ms, by["wan-100M-200ms-2pct"].loss_pct) == (200, 2)
    one_g = by["wan-1G-200ms-2pct"]
    assert (one_g.rate_mbit, one_g.rtt_ms, one_g.loss_pct, one_g.published_mbps) == (
        1000, 200, 2, 505.0)
    full = Runner(RunOptions.make(tmp_path / "full", work_base=tmp_path, missing=()))
    tiny = Runner(RunOptions.make(tmp_path / "tiny", tiny=True, work_base=tmp_path, missing=()))
    try:
        # issue 12: the UDP rows move >= 400 MB (ramp-up amortised), the others keep their size
        assert full.udp_size_for(100) >= 400_000_000 > full.size_for(100)
        assert full.udp_size_for(1000) == full.size_for(1000) == 1024 << 20
        assert 60 <= full.udp_cap_s(full.udp_size_for(100), 100) <= 120
        assert tiny.udp_size_for(100) == tiny.size_for(100) < 50 << 20
    finally:
        full.close()
        tiny.close()


def test_udp_row_columns_and_published_row() -> None:
    from bench.report import row_cells
    from bench.results import PeerResult

    r = PeerResult("s", "ours-udp", bytes=400_000_000, seconds=40.0, udp_resent_bytes=8_000_000,
                   udp_loss_pct=2.01, udp_rtt_ms=201.5, load_avg=6.5)
    c = row_cells(r)
    assert (c["goodput"], c["uretx"], c["redund"], c["uloss"], c["urtt"], c["load"]) == (
        "80.0", "8.00", "2.00", "2.01", "201.5", "6.5")
    pub = PeerResult("s", "fasp-published", status="published", published_mbps=505.0)
    assert pub.goodput_mbps == 505.0 and row_cells(pub)["goodput"] == "505.0"


def test_daemon_udp_close_line_is_parsed(tmp_path: Path) -> None:
    """The download rows read the sender's figures from the daemon's close line: render
    it with the daemon's own logging call so a changed format fails here."""
    import logging

    from bench.peers.ours import OursServer
    from bench.site import Site
    from fallback import udpserver

    srv = OursServer(Site("x", "127.0.0.1", tmp_path), tmp_path, tmp_path / "root")
    srv.log_path.write_text("ready\n")
    mark = srv.log_size()
    handler = logging.FileHandler(srv.log_path)
    udpserver.log.addHandler(handler)
    old = udpserver.log.level
    udpserver.log.setLevel(logging.INFO)

    class _Stats:
        sent_packets, received_packets, loss_pct = 1000, 10, 2.5
        retransmitted_bytes, rtt_ms, rate, controller, controller_state = (
            36300, 201.25, 95.5e6, "DelayRate", "steady")
        datagram_size = 1452

    class _Conn:
        connection_id, last_heard = 7, 0.0

        def stats(self) -> _Stats:
            return _Stats()

    class _Pump:
        conn, moved = _Conn(), 0

        def close(self, *a: object) -> None:
            pass

    class _Session:
        id = "abcdef0123"
        udp_figures: dict[str, float] = {}

        def heard(self, *a: object) -> None:
            pass

    try:
        udpserver.SessionUdp(_Session(), _Pump()).close()  # type: ignore[arg-type]
    finally:
        udpserver.log.removeHandler(handler)
        udpserver.log.setLevel(old)
        handler.close()
    got = srv.udp_paths_since(mark, wait_s=0)
    assert got == [{"sent": 1000.0, "lost_pct": 2.5, "resent": 36300.0, "rtt_ms": 201.25,
                    "rate_mbit": 95.5}]


# -- the runner end to end (root + namespaces) -------------------------------------------------


@_apply(needs_netns)
@pytest.mark.timeout(240)
def test_quick_bench_writes_sane_report(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = dict(os.environ, FB_BENCH_TINY="1", PYTHONPATH=str(REPO))
    p = subprocess.run(
        [sys.executable, "-m", "bench", "--tiny", "--out", str(out),
         "--peers", "iperf3-bbr,curl-http*,ours-https*,ours-udp*"],
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
    # ours over UDP (issue 12): a download and an upload, each with the path's figures
    udp = {(_cells(r)[cols.index("peer")], _cells(r)[cols.index("dir")]): _cells(r)
           for r in rows if _cells(r)[cols.index("peer")] == "ours-udp"}
    assert set(udp) == {("ours-udp", "down"), ("ours-udp", "up")}, text
    for cells in udp.values():
        assert cells[si] == "ok", cells
        assert 90 < float(cells[cols.index("UDP rtt ms")]) < 400, cells  # 100 ms link
        assert float(cells[cols.index("redundancy %")]) >= 0, cells
        assert float(cells[cols.index("load 1m")]) >= 0, cells
    assert (out / "results.json").exists()
    if importlib.util.find_spec("matplotlib") is not None:  # plots: the optional [bench] extra
        assert list(out.glob("*.png"))
    else:
        assert "plots skipped: matplotlib is not installed" in p.stderr
    # nothing left behind: no namespaces of this run, no run directories
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [n for n in left.split() if n.startswith(("fbA-", "fbB-"))
                and _owner_dead(n)], left


@_apply(needs_netns)
@pytest.mark.timeout(300)
def test_udp_concurrent_rows_and_published_figure(tmp_path: Path) -> None:
    """fairness (two UDP transfers), tcp-friendly (ours-udp low/fair beside cubic, cubic's
    solo rate) and the 1 Gbit/s row beside FASP's published figure, at smoke-test sizes."""
    out = tmp_path / "out"
    env = dict(os.environ, FB_BENCH_TINY="1", PYTHONPATH=str(REPO))
    p = subprocess.run(
        [sys.executable, "-m", "bench", "--tiny", "--out", str(out), "--peers",
         "ours-udp,ours-udp-low,ours-udp-fair,iperf3-cubic,fasp*", "fairness", "tcp-friendly",
         "wan-1G-200ms-2pct"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=280,
    )
    assert (out / "results.json").exists(), p.stderr[-2000:]
    rows = json.loads((out / "results.json").read_text())["results"]
    got = {(r["scenario"], r["peer"]): r for r in rows}
    for key in (("fairness", "ours-udp#1"), ("fairness", "ours-udp#2"),
                ("tcp-friendly", "iperf3-cubic#1"), ("tcp-friendly", "ours-udp-low#1"),
                ("tcp-friendly", "ours-udp-fair#1"), ("wan-1G-200ms-2pct", "ours-udp")):
        assert key in got and got[key]["status"] == "ok", (key, p.stderr[-2000:])
        assert got[key]["goodput_mbps"] > 0, got[key]
    pair = [got[("fairness", f"ours-udp#{i}")]["share_pct"] for i in (1, 2)]
    assert sum(pair) == pytest.approx(100.0)
    cubic_rows = [r for r in rows if r["scenario"] == "tcp-friendly"
                  and r["peer"] == "iperf3-cubic#2"]
    assert len(cubic_rows) == 2 and all("of its solo rate" in r["note"] for r in cubic_rows)
    fasp = got[("wan-1G-200ms-2pct", "fasp-published")]
    assert (fasp["status"], fasp["goodput_mbps"]) == ("published", 505.0)


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
