"""The UDP loopback comparison's peers (bench/peers/quic.py, bench/udp_loopback.py) move
every byte and report what the table needs; tiny sizes, no timings asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.peers import quic
from bench.udp_loopback import ratios, scenario_rows


@pytest.mark.parametrize("lib", quic.LIBS)
def test_quic_peer_moves_every_byte(lib: str) -> None:
    if not quic.available(lib):
        pytest.skip(f"{lib} not installed (pip install '.[bench]')")
    for size in (quic.SMALL, quic.LARGE[lib]):
        res = quic.run(lib, 4, size, timeout=60)
        s, r = res["sender"], res["receiver"]
        assert r["bytes"] == s["bytes"] == 4 << 20, (size, res)
        assert s["wall"] > 0 and r["cpu"] > 0 and s["cpu"] > 0
        assert 10 < s["rss_mb"] < 500 and 10 < r["rss_mb"] < 500


def test_udp_loopback_scenario_rows() -> None:
    rows = scenario_rows("udp-loopback", 4, wants=lambda key: key.startswith("ours"))
    assert [r.peer for r in rows] == ["ours-udp-1452", "ours-udp-65000"]
    for r in rows:
        assert r.status == "ok" and r.bytes == 4 << 20 and r.goodput_mbps
        assert r.cpu_per_gb("client") and r.cpu_per_gb("server")
        assert r.client_rss_mb and r.server_rss_mb and r.sane()
    assert ratios([]) == []


@pytest.mark.parametrize("lib", quic.LIBS)
def test_quic_serve_and_fetch_roles_move_every_byte(lib: str) -> None:
    """The WAN rows' roles (``python -m bench.peers.quic serve|fetch``) on loopback."""
    if not quic.available(lib):
        pytest.skip(f"{lib} not installed (pip install '.[bench]')")
    repo = str(Path(__file__).resolve().parents[1])
    env = {"PYTHONPATH": repo, "PATH": "/usr/bin:/bin"}
    serve = subprocess.Popen([sys.executable, "-m", "bench.peers.quic", "serve", "--lib", lib,
                              "--bind", "127.0.0.1", "--port", "0", "--mb", "3",
                              "--timeout", "60"], stdout=subprocess.PIPE, text=True, env=env,
                             cwd=repo)
    try:
        assert serve.stdout is not None
        port = json.loads(serve.stdout.readline())["ready"]
        out = subprocess.run([sys.executable, "-m", "bench.peers.quic", "fetch", "--lib", lib,
                              "--port", str(port), "--deadline", "60"], capture_output=True,
                             text=True, timeout=90, env=env, cwd=repo)
        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert got["bytes"] == 3 << 20 and got["seconds"] > 0, (got, out.stderr[-500:])
    finally:
        serve.kill()
        serve.wait()
