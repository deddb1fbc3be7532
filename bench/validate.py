"""``python -m bench validate``: show the emulator does what it claims, in numbers.

Measures, each on a fresh link: ping RTT vs set RTT; UDP loss at 95 % of the rate vs set loss;
single-stream TCP (cubic, BBR) vs the Mathis bound and vs reference figures from a similar
forwarder; curl/aria2 against nginx at the reference settings; the emulator's own ceiling and
its CPU use at 100 Mbit/s; a live rate change and the UDP firewall switch.  Results go to
``OUT/validate.json`` and replace the marked section of bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.netem import EmulatedLink, netns
from bench.peers.nginx import start_nginx
from bench.peers.tools import Ctx, aria2_download, curl_download
from bench.report import machine
from bench.site import Site

README = Path(__file__).with_name("README.md")
BEGIN, END = "<!-- validate:begin -->", "<!-- validate:end -->"
MSS = 1448
# Reference single-stream figures (100 MB, Mbit/s) measured with a similar forwarder.
REFERENCE = {
    ("iperf3", "cubic"): {"100ms/0%": 94.2, "100ms/1%": 1.5, "200ms/2%": 0.8},
    ("iperf3", "bbr"): {"100ms/0%": 92.1, "100ms/1%": 86.7, "200ms/2%": 47.9},
    ("curl-http", "bbr"): {"100ms/0%": 81.7, "100ms/1%": 78.6, "200ms/2%": 43.7},
    ("curl-https", "bbr"): {"100ms/0%": 79.4, "100ms/1%": 79.2, "200ms/2%": 37.9},
    ("aria2c-x8", "bbr"): {"100ms/0%": 83.3, "100ms/1%": 65.8, "200ms/2%": 62.9},
}
SETTINGS = {"100ms/0%": (100, 0.0), "100ms/1%": (100, 1.0), "200ms/2%": (200, 2.0)}


def mathis_mbps(rtt_ms: float, loss_pct: float, mss: int = MSS) -> float:
    """Mathis et al. bound for loss-based TCP: MSS/RTT * 1.22/sqrt(p)."""
    if loss_pct <= 0:
        return math.inf
    return mss * 8 / (rtt_ms / 1e3) * 1.22 / math.sqrt(loss_pct / 100) / 1e6


def _run(link: EmulatedLink, side: str, argv: list[str], timeout: float) -> str:
    p = subprocess.run(link.exec_argv(side, argv), capture_output=True, text=True,
                       timeout=timeout)
    return p.stdout


def _iperf_server(link: EmulatedLink) -> subprocess.Popen[Any]:
    p = link.run_in_b(["iperf3", "-s"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return p


def _iperf(link: EmulatedLink, args: list[str], seconds: float) -> dict[str, Any]:
    """One iperf3 client run (JSON), retried once if the server was not ready."""
    for _ in range(3):
        out = _run(link, "a", ["iperf3", "-c", link.b_ip, "-J", "-t", f"{seconds:g}", *args],
                   seconds + 30)
        try:
            data: dict[str, Any] = json.loads(out)
        except ValueError:
            data = {}
        if "end" in data and "error" not in data:
            return data
        time.sleep(1.0)
    return data


def check_rtt(rtts: tuple[int, ...] = (10, 100, 300)) -> list[dict[str, Any]]:
    """ping RTT measured vs set (small packets: serialisation time is negligible)."""
    rows = []
    for rtt in rtts:
        with EmulatedLink(rate_mbit=100, rtt_ms=rtt) as link:
            link.reset_counters()
            out = _run(link, "a", ["ping", "-c", "30", "-i", "0.05", "-q", link.b_ip], 60)
            c = link.counters()
            m = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms", out)
            if m:
                mn, avg, mx, mdev = (float(x) for x in m.groups())
                # The emulator's own lateness separates its error from endpoint scheduling noise
                rows.append({"set_ms": rtt, "min_ms": mn, "avg_ms": avg, "max_ms": mx,
                             "mdev_ms": mdev,
                             "emu_late_max_ms": max(c["ab"]["late_max_ms"],
                                                    c["ba"]["late_max_ms"])})
    return rows


def check_loss(losses: tuple[float, ...] = (0.1, 1.0, 2.0)) -> list[dict[str, Any]]:
    """iperf3 UDP at 95 % of the rate: receiver-measured loss vs set loss (one direction)."""
    rows = []
    for loss in losses:
        # A deep queue (200 ms): a sender stalled by machine load catches up in a burst, and
        # drop-tail losses would pollute the random loss being measured here.
        with EmulatedLink(rate_mbit=100, rtt_ms=10, loss_pct=loss, seed=7, queue_ms=200) as link:
            _iperf_server(link)
            link.reset_counters()
            # 100 us pacing: iperf3's default 1 ms timer sends bursts that can overflow the
            # bottleneck queue and would add queue drops to the random loss being measured.
            d = _iperf(link, ["-u", "-b", "95M", "-l", "1400", "--pacing-timer", "100"], 10)
            c = link.counters()["ab"]
            s = d.get("end", {}).get("sum", {})
            rows.append({"set_pct": loss, "measured_pct": s.get("lost_percent"),
                         "packets": s.get("packets"), "queue_drops": c["drop_queue_packets"],
                         "emu_loss_pct": 100.0 * c["drop_loss_packets"] / max(1, c["rx_packets"]),
                         "late_p99_ms": c["late_p99_ms"]})
    return rows


def check_tcp(seconds: float) -> list[dict[str, Any]]:
    """Single-stream iperf3 (server->client) with cubic and BBR at the reference settings."""
    rows = []
    for label, (rtt, loss) in SETTINGS.items():
        with EmulatedLink(rate_mbit=100, rtt_ms=rtt, loss_pct=loss, seed=1) as link:
            _iperf_server(link)
            for cc in ("cubic", "bbr"):
                link.reset_counters()
                d = _iperf(link, ["-R", "-C", cc], seconds)
                end = d.get("end", {})
                c = link.counters()
                mbps = end.get("sum_received", {}).get("bits_per_second", 0) / 1e6
                rows.append({
                    "setting": label, "cc": end.get("sender_tcp_congestion", cc),
                    "mbps": round(mbps, 2), "mathis_mbps": round(mathis_mbps(rtt, loss), 2),
                    "reference_mbps": REFERENCE[("iperf3", cc)][label],
                    "retransmits": end.get("sum_sent", {}).get("retransmits"),
                    "late_p99_ms": max(c["ab"]["late_p99_ms"], c["ba"]["late_p99_ms"]),
                })
    # The single-stream cap on long lossy paths is the 4 MiB send buffer, not the emulator:
    with EmulatedLink(rate_mbit=100, rtt_ms=200, loss_pct=2.0, seed=1, tcp_buffers="wan") as link:
        _iperf_server(link)
        end = _iperf(link, ["-R", "-C", "bbr"], seconds).get("end", {})
        rows.append({
            "setting": "200ms/2%", "cc": "bbr (wan buffers)",
            "mbps": round(end.get("sum_received", {}).get("bits_per_second", 0) / 1e6, 2),
            "mathis_mbps": round(mathis_mbps(200, 2.0), 2), "reference_mbps": "-",
            "retransmits": end.get("sum_sent", {}).get("retransmits"), "late_p99_ms": "",
        })
    return rows


def check_http(work: Path, size_mb: int = 100, cap_s: float = 60) -> list[dict[str, Any]]:
    """curl (HTTP, HTTPS) and aria2c -x8 from nginx, BBR, 100 MB, at the reference settings."""
    rows = []
    root = work / "srv"
    root.mkdir(parents=True, exist_ok=True)
    name = "v100.bin"
    with open(root / name, "wb") as f:
        for _ in range(size_mb):
            f.write(os.urandom(1 << 20))
    size = size_mb << 20
    for label, (rtt, loss) in SETTINGS.items():
        with EmulatedLink(rate_mbit=100, rtt_ms=rtt, loss_pct=loss, seed=1) as link:
            for ns in (link.ns_a, link.ns_b):
                netns.run(netns.ns_exec(ns, ["sysctl", "-q", "-w",
                                             "net.ipv4.tcp_congestion_control=bbr"]))
            site = Site(label, link.b_ip, work, link=link, rate_mbit=100)
            ng = start_nginx(root, 18081, 18444, work / f"nginx-{rtt}", bind="0.0.0.0",
                             launch=link.run_in_b)
            ctx = Ctx("validate", cap_s, work / "logs", work / "dest", "bbr")
            try:
                for peer in ("curl-http", "curl-https", "aria2c-x8"):
                    if peer == "aria2c-x8":
                        r = aria2_download(site, ctx, ng, name, size)
                    else:
                        r = curl_download(site, ctx, ng, name, size, https=peer == "curl-https")
                    rows.append({"setting": label, "peer": peer, "status": r.status,
                                 "mbps": round(r.goodput_mbps or 0.0, 1),
                                 "reference_mbps": REFERENCE[(peer, "bbr")][label],
                                 "late_p99_ms": r.emu.get("late_p99_ms")})
            finally:
                ng.stop()
    return rows


def check_ceiling(seconds: float = 10) -> dict[str, Any]:
    """Emulator alone: no rate limit, no delay; and its CPU at a 100 Mbit/s bottleneck."""
    out: dict[str, Any] = {}
    for key, rate, rtt in (("ceiling", 0, 0), ("at_100M", 100, 10), ("at_200M", 200, 20)):
        with EmulatedLink(rate_mbit=rate, rtt_ms=rtt) as link:
            _iperf_server(link)
            link.reset_counters()
            c0 = link.counters()
            d = _iperf(link, ["-R", "-C", "bbr"], seconds)
            c1 = link.counters()
            dt = c1["t"] - c0["t"]
            cpu = {k: (c1["cpu_s"][k] - c0["cpu_s"][k]) / dt * 100 for k in c1["cpu_s"]}
            out[key] = {
                "mbps": round(d.get("end", {}).get("sum_received", {}).get("bits_per_second", 0)
                              / 1e6, 1),
                "cpu_pct": {k: round(v, 1) for k, v in cpu.items()},
                "cpu_pct_total": round(sum(cpu.values()), 1),
                "pps_data": round(c1["ba"]["fwd_packets"] / dt),
                "late_p99_ms": max(c1["ab"]["late_p99_ms"], c1["ba"]["late_p99_ms"]),
                "late_max_ms": max(c1["ab"]["late_max_ms"], c1["ba"]["late_max_ms"]),
                "sched": c1.get("sched"),
            }
    return out


UDP_PROBES = 50
_UDP_RECV = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(2.0)
n = 0
try:
    while True:
        s.recv(2048)
        n += 1
except TimeoutError:
    pass
print(n)
"""
_UDP_SEND = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(int(sys.argv[3])):
    s.sendto(b"x" * 100, (sys.argv[1], int(sys.argv[2])))
    time.sleep(0.005)
"""


def _udp_probe(link: EmulatedLink, port: int) -> int:
    """Datagrams that reach a receiver on *port* in B out of UDP_PROBES sent from A."""
    rx = link.run_in_b([sys.executable, "-c", _UDP_RECV, str(port)], stdout=subprocess.PIPE,
                       text=True)
    time.sleep(0.5)
    _run(link, "a", [sys.executable, "-c", _UDP_SEND, link.b_ip, str(port), str(UDP_PROBES)], 30)
    out, _ = rx.communicate(timeout=30)
    return int(out.strip() or 0)


def check_live_and_firewall() -> dict[str, Any]:
    """Live rate change mid-transfer (100 -> 30 Mbit/s) and block_udp/unblock_udp."""
    out: dict[str, Any] = {}
    with EmulatedLink(rate_mbit=100, rtt_ms=20) as link:
        _iperf_server(link)
        p = subprocess.Popen(link.exec_argv("a", ["iperf3", "-c", link.b_ip, "-R", "-J", "-t",
                                                 "10", "-i", "1"]),
                             stdout=subprocess.PIPE, text=True)
        time.sleep(5.5)
        link.set(rate_mbit=30)
        stdout, _ = p.communicate(timeout=40)
        ivs = json.loads(stdout).get("intervals", [])
        rates = [round(i["sum"]["bits_per_second"] / 1e6, 1) for i in ivs]
        out["live_rate_change"] = {"intervals_mbps": rates,
                                   "before": rates[2:5], "after": rates[7:10]}
        link.set(rate_mbit=100)
        port = 5301
        link.block_udp(port)
        blocked = _udp_probe(link, port)
        link.unblock_udp(port)
        out["firewall"] = {"port": port, "blocked_received": blocked,
                           "unblocked_received": _udp_probe(link, port), "sent": UDP_PROBES}
    return out


def render(v: dict[str, Any]) -> str:
    """Markdown for the README section."""
    L = [BEGIN, "", f"Measured {v['date']} on {v['machine']} (`python -m bench validate`, "
         f"{v['duration_s']:.0f} s). Load average at start: {v['load']}.", ""]
    L += ["**RTT** (ping, 30 x 64 B, 100 Mbit/s link):", "",
          "| set ms | min | avg | max | mdev | emulator late max (per hop) |",
          "|---:|---:|---:|---:|---:|---:|"]
    L += [f"| {r['set_ms']} | {r['min_ms']:.2f} | {r['avg_ms']:.2f} | {r['max_ms']:.2f} | "
          f"{r['mdev_ms']:.2f} | {r.get('emu_late_max_ms', '')} |" for r in v["rtt"]]
    L += ["", "**Loss** (iperf3 UDP at 95 Mbit/s on 100 Mbit/s, 10 s, 200 ms queue):", "",
          "| set % | measured by iperf3 % | emulator loss drops % | packets | queue drops "
          "| late p99 ms |", "|---:|---:|---:|---:|---:|---:|"]
    L += [f"| {r['set_pct']} | {r['measured_pct']:.3f} | {r.get('emu_loss_pct', 0):.3f} | "
          f"{r['packets']} | {r['queue_drops']} | {r['late_p99_ms']} |"
          for r in v["loss"] if r["measured_pct"] is not None]
    L += ["", f"**Single-stream TCP** (iperf3 -R, {v['tcp_seconds']:g} s, 100 Mbit/s, loss "
          "on both directions, 1.5 x BDP drop-tail):", "",
          "| setting | cc | Mbit/s | Mathis bound | reference | retransmits | late p99 ms |",
          "|---|---|---:|---:|---:|---:|---:|"]
    for r in v["tcp"]:
        ma = "-" if math.isinf(r["mathis_mbps"]) else f"{r['mathis_mbps']:.2f}"
        if not r["mbps"]:
            continue
        L.append(f"| {r['setting']} | {r['cc']} | {r['mbps']:.1f} | {ma} | "
                 f"{r['reference_mbps']} | {r['retransmits']} | {r['late_p99_ms']} |")
    if v.get("http"):
        L += ["", "**HTTP peers** (nginx in B, client in A, BBR, 100 MB file to disk):", "",
              "| setting | peer | Mbit/s | reference | late p99 ms |", "|---|---|---:|---:|---:|"]
        L += [f"| {r['setting']} | {r['peer']} | {r['mbps']} | {r['reference_mbps']} | "
              f"{r['late_p99_ms']} |" for r in v["http"]]
    c = v["ceiling"]
    L += ["", "**Emulator cost** (iperf3 BBR, one stream):", "",
          "| link | Mbit/s | packets/s (data dir) | CPU % (ab + ba + control) | late p99 ms "
          "| late max ms |", "|---|---:|---:|---:|---:|---:|"]
    for key, label in (("ceiling", "no rate limit, 0 ms"), ("at_100M", "100 Mbit/s, 10 ms"),
                       ("at_200M", "200 Mbit/s, 20 ms")):
        x = c.get(key)
        if not x:
            continue
        parts = " + ".join(f"{x['cpu_pct'][k]:.0f}" for k in ("ab", "ba", "control"))
        L.append(f"| {label} | {x['mbps']} | {x['pps_data']} | {x['cpu_pct_total']:.0f} "
                 f"({parts}) | {x['late_p99_ms']} | {x['late_max_ms']} |")
    lv = v["live"]
    L += ["", f"**Live change**: rate 100 -> 30 Mbit/s at t = 5.5 s; iperf3 1-s intervals "
          f"before {lv['live_rate_change']['before']}, after {lv['live_rate_change']['after']}."
          f" **Firewall**: {lv['firewall']['sent']} datagrams to UDP port "
          f"{lv['firewall']['port']}: {lv['firewall']['blocked_received']} arrive after "
          f"`block_udp`, {lv['firewall']['unblocked_received']} after `unblock_udp`.", "", END]
    return "\n".join(L)


def update_readme(section: str) -> None:
    """Replace the marked section of bench/README.md (append it if the markers are missing)."""
    text = README.read_text() if README.exists() else ""
    if BEGIN in text and END in text:
        pre, rest = text.split(BEGIN, 1)
        post = rest.split(END, 1)[1]
        text = pre + section + post
    else:
        text = text.rstrip() + "\n\n## Validation\n\n" + section + "\n"
    README.write_text(text)


def main(argv: list[str]) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(prog="python -m bench validate", description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("bench/out"))
    ap.add_argument("--tcp-seconds", type=float, default=20.0)
    ap.add_argument("--no-http", action="store_true", help="skip the curl/aria2 comparison")
    ap.add_argument("--no-readme", action="store_true", help="do not touch bench/README.md")
    a = ap.parse_args(argv)
    t0 = time.monotonic()
    v: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": machine(),
                         "load": Path("/proc/loadavg").read_text().split()[0],
                         "tcp_seconds": a.tcp_seconds}
    steps: list[tuple[str, Callable[[], Any]]] = [("rtt", check_rtt), ("loss", check_loss),
             ("tcp", lambda: check_tcp(a.tcp_seconds)), ("ceiling", check_ceiling),
             ("live", check_live_and_firewall)]
    work = Path(tempfile.mkdtemp(prefix="fbvalidate-"))
    if not a.no_http:
        steps.insert(3, ("http", lambda: check_http(work)))
    try:
        for key, fn in steps:
            print(f"validate: {key} ...", file=sys.stderr, flush=True)
            v[key] = fn()
            print(json.dumps(v[key]), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    v["duration_s"] = time.monotonic() - t0
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "validate.json").write_text(json.dumps(v, indent=1, default=str))
    section = render(v)
    (a.out / "validate.md").write_text(section + "\n")
    if not a.no_readme:
        update_readme(section)
    print(section)
    return 0
