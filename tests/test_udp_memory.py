"""Flat memory on the UDP path: a 200 MB encrypted loopback transfer between two
processes (``bench.udp_loopback``), the receiver writing every piece to a sparse file,
keeps each side's peak RSS far below the bytes moved (issue #12: 10 GB under 200 MB RSS
per side; ``python -m bench.udp_loopback --memory 10`` is the full-size run)."""

from __future__ import annotations

from pathlib import Path

from bench.udp_loopback import ours

MIB = 1 << 20


def test_200_mb_loopback_keeps_rss_bounded(tmp_path: Path) -> None:
    mb = 192  # 201 MB
    sink = tmp_path / "sink.bin"
    res = ours(mb, 1452, sink=str(sink), timeout=150.0)
    s, r = res["sender"], res["receiver"]
    assert s["bytes"] == r["bytes"] == mb * MIB, res
    assert sink.stat().st_size == mb * MIB
    # Python, cryptography and uvloop take ~35-45 MB; the sender's queue is bounded by
    # max_queue_bytes (16 MiB in the bench) and the receiver holds no piece after writing
    # it. A side that kept the data would be above 200 MB.
    print(f"peak RSS: sender {s['rss_mb']:.0f} MB, receiver {r['rss_mb']:.0f} MB")
    assert s["rss_mb"] < 110, s
    assert r["rss_mb"] < 110, r
