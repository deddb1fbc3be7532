"""UDP failover (issue 13): probe beside HTTPS at the start, leave a lost or policed UDP
path for HTTPS mid-transfer without re-sending verified blocks, come back to UDP.

The network tests run the daemon (UDP on 33001) in one namespace and the client in
another (``tests/netns.py``); nftables in the client's namespace drops UDP to and from
the daemon's port (``block_udp``), or 90 % of it (``police_udp``: ``numgen random``).
The client runs ``transfer()`` in a small script there, so that the test sees the time
of each progress event (the first data byte, the longest stall). Skipped, saying why,
where namespaces cannot be made. The detection logic (``UdpHealth``) is tested alone
with a hand-stepped clock.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fallback.client.failover import FailoverConfig, HealthSample, UdpHealth
from fallback.client.udppath import UdpPath
from tests import netns
from tests.conftest import make_file, sha256
from tests.statefiles import ours
from tests.test_failover import HTTP, HTTPS, UDP, NsDaemon
from tests.test_proxy import clean_env

MB = 1 << 20

CLIENT = r"""
import json, logging, sys, time
from fallback.client.session import transfer
logging.basicConfig(level=logging.INFO, format="%(relativeCreated)d %(message)s")
src, dst, fp, kw = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
t0 = time.monotonic()
events = []
def progress(ev):
    events.append((round(time.monotonic() - t0, 3), ev.bytes_done, ev.transport))
try:
    res = transfer(src, dst, progress, fingerprint=fp, password="alice-secret", **kw).to_json()
except Exception as exc:
    res = {"ok": False, "error": str(exc)}
print(json.dumps({**res, "events": events}))
"""


@pytest.fixture
def nsd(net: netns.Net, tmp_path: Path) -> Iterator[NsDaemon]:
    d = NsDaemon(tmp_path / "daemon", HTTP, HTTPS, {"alice": tmp_path / "daemon" / "docroot"},
                 udp_port=UDP)
    d.net = net
    d.base.mkdir(parents=True)
    d.start()
    yield d
    if d.proc is not None:
        d.stop(signal.SIGKILL)


def start(net: netns.Net, d: NsDaemon, src: str, dst: str, **kw: Any) -> subprocess.Popen[str]:
    """``transfer(src, dst, **kw)`` in the client namespace; its result on the last line."""
    return subprocess.Popen(
        net.exec("client", sys.executable, "-c", CLIENT, src, dst, d.fingerprint, json.dumps(kw)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=clean_env(PYTHONPATH=str(Path(__file__).parent.parent)))


def finish(p: subprocess.Popen[str], timeout: float = 50) -> dict[str, Any]:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"the client did not finish in {timeout} s: {err[-3000:]}") from None
    lines = out.strip().splitlines()
    assert lines, err
    res: dict[str, Any] = json.loads(lines[-1])
    assert res["ok"], (res.get("error"), err[-3000:])
    res["log"] = err[-4000:]
    return res


def longest_stall(events: list[list[Any]]) -> float:
    """Longest time between two progress events that moved bytes (after the first)."""
    moved = [t for (t, done), (_, before) in
             zip(((e[0], e[1]) for e in events[1:]), ((e[0], e[1]) for e in events), strict=False)
             if done > before]
    first = next((e[0] for e in events if e[1] > 0), None)
    times = ([first] if first is not None else []) + moved
    return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)


def wait_for(pred: Any, within: float, what: str) -> None:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def grown(partial: Path, least: int) -> bool:
    return partial.exists() and partial.stat().st_blocks * 512 >= least


# -- at the start --------------------------------------------------------------------------------
@pytest.mark.netns
def test_udp_blocked_before_start_https_at_once(net: netns.Net, nsd: NsDaemon,
                                                tmp_path: Path) -> None:
    src = make_file(tmp_path / "a.bin", 8 * MB)
    net.block_udp(UDP)
    # A long probe budget: a first data byte that waited for the probe would come late.
    p = start(net, nsd, str(src), nsd.url("/"), udp_probe_timeout=6.0, block_size="1M")
    res = finish(p)
    assert res["transports"] == ["https"] and res["switches"] == []
    assert res["udp_reason"].startswith("timeout"), res["udp_reason"]
    first = next(t for t, done, _ in res["events"] if done > 0)
    # from the transfer's start (before the session opened) to the first byte carried
    assert first < 2.0, res["events"][:5]
    assert sha256(nsd.docroots["alice"] / "a.bin") == sha256(src)


@pytest.mark.netns
def test_path_mtu_discovery_over_a_veth(net: netns.Net, nsd: NsDaemon, tmp_path: Path) -> None:
    """Over the 1,500-byte veth, datagrams grow from 1,452 to 1,472 (IPv4) in both
    directions. (A black hole for large datagrams is tested on the sans-IO core,
    ``test_udp_core``: nftables sees a UDP GSO batch whole, before segmentation, so a
    size rule here would drop every batch of small datagrams too.)"""
    src = make_file(tmp_path / "a.bin", 6 * MB)
    res = finish(start(net, nsd, str(src), nsd.url("/"), transport="udp"))
    assert res["datagram_size"] == 1472 and res["transports"] == ["https", "udp"], res
    back = tmp_path / "back.bin"
    res = finish(start(net, nsd, nsd.url("/a.bin"), str(back), transport="udp"))
    assert res["datagram_size"] == 1472 and sha256(back) == sha256(src), res


@pytest.mark.netns
def test_a_smaller_mtu_further_on_says_so(net: netns.Net, nsd: NsDaemon, tmp_path: Path) -> None:
    """A tunnel further on that drops datagrams over 1,300 bytes (ICMP filtered): the
    probes of 1,452 go unanswered while small datagrams pass. Before: "a firewall, or
    nothing on that port", though answers came back (trial); now the error says what the
    path does and suggests -Z."""
    src = make_file(tmp_path / "a.bin", 2 * MB)
    net.drop_udp_larger(UDP, 1300)
    p = start(net, nsd, str(src), nsd.url("/"), transport="udp")
    out, err = p.communicate(timeout=60)
    res = json.loads(out.strip().splitlines()[-1])
    assert res["ok"] is False, res
    assert "answered small datagrams but no 1452-byte probe" in res["error"], res["error"]
    assert "try -Z 1200" in res["error"], res["error"]


@pytest.mark.netns
def test_no_udp_daemon_and_closed_port_say_why(net: netns.Net, tmp_path: Path) -> None:
    """A daemon that offers no UDP: ``refused by server config``; a UDP port where nothing
    listens: ``unreachable`` (ICMP port unreachable), at once."""
    d = NsDaemon(tmp_path / "daemon", HTTP, HTTPS, {"alice": tmp_path / "daemon" / "docroot"})
    d.net = net
    d.base.mkdir(parents=True)
    d.start()
    try:
        src = make_file(tmp_path / "a.bin", 2 * MB)
        res = finish(start(net, d, str(src), d.url("/")))
        assert res["transports"] == ["https"]
        assert res["udp_reason"].startswith("refused by server config"), res["udp_reason"]
        res = finish(start(net, d, str(src), d.url("/b.bin"), udp_port=UDP, transport="auto"))
        # the daemon offers none: the port is not even probed
        assert res["udp_reason"].startswith("refused by server config")
    finally:
        d.stop(signal.SIGKILL)


@pytest.mark.netns
def test_closed_udp_port_is_unreachable(net: netns.Net, nsd: NsDaemon, tmp_path: Path) -> None:
    src = make_file(tmp_path / "a.bin", 4 * MB)
    t0 = time.monotonic()
    res = finish(start(net, nsd, str(src), nsd.url("/"), udp_port=UDP + 1,
                       udp_probe_timeout=10.0))
    assert res["transports"] == ["https"]
    assert res["udp_reason"].startswith("unreachable"), res["udp_reason"]
    assert time.monotonic() - t0 < 10


# -- mid-transfer --------------------------------------------------------------------------------
SIZE = 48 * MB
RATE = "100M"  # on UDP and HTTPS alike: about 4 s of data


def _on_udp(nsd: NsDaemon) -> bool:
    return "the client switched https -> udp" in nsd.log()


@pytest.mark.netns
@pytest.mark.parametrize("direction", ["upload", "download"])
def test_udp_blocked_at_30_percent(net: netns.Net, nsd: NsDaemon, tmp_path: Path,
                                   direction: str) -> None:
    src = make_file(tmp_path / "big.bin", SIZE)
    kw = {"target_rate": RATE, "block_size": "1M"}
    if direction == "upload":
        target, root = nsd.docroots["alice"] / "big.bin", nsd.docroots["alice"]
        p = start(net, nsd, str(src), nsd.url("/"), **kw)
    else:
        (nsd.docroots["alice"]).mkdir(parents=True, exist_ok=True)
        src.rename(nsd.docroots["alice"] / "big.bin")
        src = nsd.docroots["alice"] / "big.bin"
        target, root = tmp_path / "back.bin", tmp_path
        p = start(net, nsd, nsd.url("/big.bin"), str(target), **kw)
    partial = ours(target, root)[0]
    wait_for(lambda: _on_udp(nsd) and grown(partial, SIZE * 3 // 10), 30, "30 % over UDP")
    net.block_udp(UDP)
    res = finish(p)
    assert res["transports"] == ["https", "udp", "https"], res["switches"]
    assert res["switches"][-1]["reason"].startswith("UDP lost"), res["switches"]
    assert res["udp_reason"].startswith("lost")
    # Progress counts each byte once: what UDP had in flight at the cut is carried again
    # by HTTPS first (``retransmitted_bytes`` on an upload), then new bytes move.
    stall = longest_stall(res["events"])
    again = res["retransmitted_bytes"] if direction == "upload" else 0
    assert stall < 3.0 + again / (100e6 / 8), (stall, again, res["log"])
    # what was in flight is sent again, nothing more: the HTTPS streams' blocks at the
    # move to UDP (4 streams x 1 MiB, delivered or not) and the UDP path's at the cut
    assert res["sent_bytes"] <= res["bytes"], res["sent_bytes"] - res["bytes"]
    assert again <= 16 * MB, again
    assert sha256(target) == sha256(src)
    wait_for(lambda: "the client switched udp -> https" in nsd.log(), 5, "the daemon's log")


@pytest.mark.netns
def test_udp_unblocked_while_on_https_returns(net: netns.Net, nsd: NsDaemon,
                                              tmp_path: Path) -> None:
    size = 64 * MB
    src = make_file(tmp_path / "big.bin", size)
    target = nsd.docroots["alice"] / "big.bin"
    p = start(net, nsd, str(src), nsd.url("/"), target_rate="60M", block_size="1M")
    partial = ours(target, nsd.docroots["alice"])[0]
    wait_for(lambda: _on_udp(nsd) and grown(partial, size // 5), 30, "20 % over UDP")
    net.block_udp(UDP)
    wait_for(lambda: "the client left UDP path" in nsd.log(), 10, "the move to HTTPS")
    net.unblock_udp(UDP)
    res = finish(p)
    assert res["transports"] == ["https", "udp", "https", "udp"], \
        (res["switches"], res["log"], nsd.log()[-3000:])
    assert "UDP answers again" in res["switches"][-1]["reason"]
    assert res["udp_reason"] == ""
    assert sha256(target) == sha256(src)


@pytest.mark.netns
@pytest.mark.parametrize("direction", ["upload", "download"])
def test_udp_policed_falls_back(net: netns.Net, nsd: NsDaemon, tmp_path: Path,
                                direction: str) -> None:
    src = make_file(tmp_path / "big.bin", SIZE)
    kw = {"target_rate": RATE, "block_size": "1M"}
    if direction == "upload":
        target = nsd.docroots["alice"] / "big.bin"
        p = start(net, nsd, str(src), nsd.url("/"), **kw)
    else:
        nsd.docroots["alice"].mkdir(parents=True, exist_ok=True)
        src = src.rename(nsd.docroots["alice"] / "big.bin")
        target = tmp_path / "back.bin"
        p = start(net, nsd, nsd.url("/big.bin"), str(target), **kw)
    wait_for(lambda: _on_udp(nsd), 20, "the move to UDP")
    net.police_udp(UDP, 90)  # after the handshake: 90 % of UDP dropped, both ways
    t0 = time.monotonic()
    res = finish(p)
    took = time.monotonic() - t0
    assert res["transports"][-1] == "https" and "udp" in res["transports"], res["switches"]
    # seen as heavy loss (gaps in the daemon's packet numbers), or, when the policed
    # path's sender stalls for want of acknowledgements, as silence: either way it leaves
    why = res["switches"][-1]["reason"]
    assert why.startswith(("UDP degraded", "UDP lost")), res["switches"]
    # the rest at the HTTPS rate (about 4 s at most), not a crawl at 10 % of UDP's
    assert took < 15, took
    assert sha256(target) == sha256(src)


@pytest.mark.netns
def test_no_fallback_never_leaves_udp(net: netns.Net, nsd: NsDaemon, tmp_path: Path) -> None:
    """``--no-fallback`` with ``auto``: once on UDP, a lost UDP path fails the transfer
    (not retried: a re-connection would carry it over HTTPS); the partial stays."""
    src = make_file(tmp_path / "big.bin", SIZE)
    target = nsd.docroots["alice"] / "big.bin"
    p = start(net, nsd, str(src), nsd.url("/"), target_rate=RATE, block_size="1M",
              fallback=False)
    partial = ours(target, nsd.docroots["alice"])[0]
    wait_for(lambda: _on_udp(nsd) and grown(partial, SIZE // 5), 30, "20 % over UDP")
    net.block_udp(UDP)
    out, err = p.communicate(timeout=40)
    res = json.loads(out.strip().splitlines()[-1])
    assert not res["ok"] and "--no-fallback" in res["error"], (res, err[-2000:])
    assert "UDP lost" in res["error"]
    assert partial.exists() and not target.exists()


# -- the detection logic alone (sans-IO, hand-stepped clock) -------------------------------------
def _feed(h: UdpHealth, samples: list[HealthSample]) -> list[str | None]:
    return [h.observe(s) for s in samples]


def test_health_silence_is_lost_after_the_bound() -> None:
    cfg = FailoverConfig(lost_after=3.0)
    h = UdpHealth(cfg, 0.0)
    got = _feed(h, [HealthSample(t / 10, 1.0, True) for t in range(10, 40)])
    assert got[:-1] == [None] * (len(got) - 1)  # 1.0 .. 3.9 s: heard at 1.0, < 3 s ago
    assert h.observe(HealthSample(4.0, 1.0, True)) == "lost: nothing heard for 3.0 s"


def test_health_silence_is_not_taken_for_loss() -> None:
    """A cut path loses everything in flight: that is "lost" once the bound is reached,
    not "degraded" earlier from the losses its silence implies."""
    h = UdpHealth(FailoverConfig(lost_after=3.0, window=3.0), 0.0)
    heard = [min(t / 10, 2.0) for t in range(0, 51)]  # cut at 2.0 s
    # the daemon's packets: all arrive, then none (no gap is seen: silence)
    out = [h.observe(HealthSample(t / 10, heard[t], True, rx_packets=100 * min(t, 20),
                                  rx_highest=100 * min(t, 20)))
           for t in range(0, 51)]
    verdicts = [v for v in out if v is not None]
    assert verdicts and verdicts[0].startswith("lost"), verdicts


def test_health_idle_is_never_lost() -> None:
    h = UdpHealth(FailoverConfig(), 0.0)
    assert h.observe(HealthSample(100.0, 1.0, False)) is None


def test_health_heavy_loss_is_degraded_after_a_window() -> None:
    cfg = FailoverConfig(window=3.0, max_loss=0.5, min_packets=40)
    h = UdpHealth(cfg, 0.0)
    # 1,000 datagrams a second sent by the peer, 1 in 10 arriving; heard all along
    verdicts = [h.observe(HealthSample(t / 10, t / 10, True, rx_packets=10 * t,
                                       rx_highest=100 * t)) for t in range(0, 31)]
    assert verdicts[:30] == [None] * 30  # judged only over a full window
    assert verdicts[30] is not None and verdicts[30].startswith("degraded: 90%")


def test_health_light_loss_is_fine() -> None:
    h = UdpHealth(FailoverConfig(), 0.0)
    out = [h.observe(HealthSample(t / 10, t / 10, True, rx_packets=95 * t, rx_highest=100 * t,
                                  goodput=10**6 * t)) for t in range(0, 100)]
    assert out == [None] * 100 and 0.04 < h.loss < 0.06


def test_health_goodput_far_below_https_is_degraded() -> None:
    cfg = FailoverConfig(window=2.0, min_ratio=0.2, grace=3.0)
    h = UdpHealth(cfg, 0.0, http_rate=10e6)  # HTTPS gave 10 MB/s
    # 1 MB/s on UDP with no loss seen (a policer that also drops the reports)
    out = [h.observe(HealthSample(t / 10, t / 10, True, goodput=100_000 * t))
           for t in range(0, 41)]
    assert out[:30] == [None] * 30  # the grace: UDP may still be ramping up
    assert out[30] is not None and "under 20% of HTTP's" in out[30]
    # without an HTTPS figure to compare with, goodput alone never decides
    h = UdpHealth(cfg, 0.0)
    assert [h.observe(HealthSample(t / 10, t / 10, True, goodput=100 * t))
            for t in range(0, 41)] == [None] * 41


def test_reprobe_backoff_doubles_to_its_cap() -> None:
    cfg = FailoverConfig(reprobe_base=1.0, reprobe_cap=8.0)
    assert [cfg.reprobe_delay(k) for k in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    with pytest.raises(ValueError):
        FailoverConfig(max_loss=0)


class _ProbePump:
    """A stand-in for ``UdpPump`` in ``UdpPath._probe_any``: PROBE number ``i`` is
    answered after ``answers[i]`` seconds (None: lost, so ``probe`` times out)."""

    class _Endpoint:
        refused = False

    def __init__(self, answers: list[float | None]) -> None:
        self.answers = answers
        self.sent: list[float] = []
        self.endpoint = self._Endpoint()

    async def probe(self, timeout: float) -> float | None:
        self.sent.append(asyncio.get_running_loop().time())
        delay = self.answers[len(self.sent) - 1]
        if delay is None or delay > timeout:
            await asyncio.sleep(timeout)
            return None
        await asyncio.sleep(delay)
        return delay


def test_probe_any_sends_again_and_takes_a_late_answer() -> None:
    async def run(answers: list[float | None], timeout: float, probes: int
                  ) -> tuple[float | None, int, float]:
        pump = _ProbePump(answers)
        t0 = asyncio.get_running_loop().time()
        rtt = await UdpPath._probe_any(pump, timeout, probes)  # type: ignore[arg-type]
        return rtt, len(pump.sent), asyncio.get_running_loop().time() - t0

    # The first PROBE (or its answer) lost: the second, 0.2 s later, is answered.
    rtt, sent, took = asyncio.run(run([None, 0.05, 0.05, 0.05, 0.05], 1.0, 5))
    assert rtt == 0.05 and sent == 2 and took < 0.45
    # The first answer comes after the second PROBE went out: it still counts.
    rtt, sent, took = asyncio.run(run([0.3, None, None, None, None], 1.0, 5))
    assert rtt == 0.3 and sent == 2 and took < 0.45
    # Nothing answered: every PROBE sent, None once the budget is spent.
    rtt, sent, took = asyncio.run(run([None] * 5, 0.5, 5))
    assert rtt is None and sent == 5 and 0.45 <= took < 1.0
